"""Optional devices named on the command line, in QEMU's spelling.

``--device pc-testdev`` and ``--device isa-debug-exit,iobase=0xf4,iosize=0x4``
take the same words as ``qemu-system-x86_64 -device``, so a test kernel's
QEMU command line carries over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvm_devices import pci_testdev
from kvm_devices.debug_exit import DebugExit
from kvm_devices.interfaces import Device
from kvm_devices.pc_testdev import PcTestdev
from kvm_devices.pci.host_bridge import PciFunction
from kvm_devices.pci_testdev import PciTestdev
from kvm_vmm.pci_function import BarDevice, MappedFunction
from kvm_vmm.platform_table import Window, pio


class DeviceSpecError(ValueError):
    """A --device value we do not understand, with what we do."""


class DeviceHost(Protocol):
    """What an optional device needs of the machine."""

    def add_device_windows(
        self, model: object, name: str, windows: Sequence[tuple[Window, Device]]
    ) -> str: ...

    def set_isa_irq(self, irq: int, level: bool) -> None: ...

    def debug_exit(self, status: int) -> None: ...

    def add_pci_function(
        self, function: PciFunction, name: str, bars: Sequence[BarDevice]
    ) -> MappedFunction: ...


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    options: dict[str, str]


KNOWN_DEVICES = {
    "pc-testdev": set[str](),
    "isa-debug-exit": {"iobase", "iosize"},
    "pci-testdev": set[str](),
}
PCI_DEVICES = {"pci-testdev"}  # on bus 0; the others are ISA


def parse_device_spec(text: str) -> DeviceSpec:
    name, *pairs = text.split(",")
    if name not in KNOWN_DEVICES:
        raise DeviceSpecError(
            f"--device {text!r}: unknown device {name!r}"
            f" (known: {', '.join(sorted(KNOWN_DEVICES))})"
        )
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in KNOWN_DEVICES[name]:
            allowed = ", ".join(sorted(KNOWN_DEVICES[name])) or "none"
            raise DeviceSpecError(f"--device {text!r}: bad option {pair!r} (options: {allowed})")
        options[key] = value
    return DeviceSpec(name, options)


def _number(spec: DeviceSpec, key: str, default: int, limit: int) -> int:
    text = spec.options.get(key)
    if text is None:
        return default
    try:
        value = int(text, 0)
    except ValueError:
        raise DeviceSpecError(f"--device {spec.name}: {key}={text!r} is not a number") from None
    if not 0 <= value <= limit:
        raise DeviceSpecError(f"--device {spec.name}: {key}={text} out of range 0..{limit:#x}")
    return value


def add_device_option(
    host: DeviceHost, text: str
) -> tuple[str, DebugExit | PcTestdev | PciTestdev]:
    """Create the device a --device value names and map it into ``host``; its name in
    the platform table (``isa-debug-exit``, ``isa-debug-exit#2``...) and the device."""
    spec = parse_device_spec(text)
    if spec.name == "pci-testdev":
        function = PciTestdev()
        bars = [
            BarDevice(pci_testdev.MEMORY_BAR, pci_testdev.MEMORY_BAR_SIZE, function.memory),
            BarDevice(pci_testdev.IO_BAR, pci_testdev.IO_BAR_SIZE, function.io),
        ]
        return host.add_pci_function(function, spec.name, bars).name, function
    if spec.name == "isa-debug-exit":
        iobase = _number(spec, "iobase", DebugExit.BASE, 0xFFFF)
        iosize = _number(spec, "iosize", DebugExit.SIZE, 0x10000 - iobase)
        if iosize == 0:
            raise DeviceSpecError("--device isa-debug-exit: iosize must be at least 1")
        debug_exit = DebugExit(host.debug_exit, size=iosize)
        window = pio(iobase, iosize, "isa-debug-exit")
        return host.add_device_windows(debug_exit, spec.name, [(window, debug_exit)]), debug_exit
    testdev = PcTestdev(host.set_isa_irq)
    windows: list[tuple[Window, Device]] = [
        (
            pio(PcTestdev.BASE_SCRATCH, PcTestdev.SCRATCH_SIZE, "testdev-scratch"),
            testdev.scratch_port,
        ),
        (pio(PcTestdev.BASE_FLUSH, PcTestdev.FLUSH_SIZE, "testdev-flush"), testdev.flush_port),
        (
            pio(PcTestdev.BASE_SCRATCH_BYTE, PcTestdev.SCRATCH_BYTE_SIZE, "testdev-scratch8"),
            testdev.scratch_byte_port,
        ),
        (pio(PcTestdev.BASE_IRQ, PcTestdev.IRQ_SIZE, "testdev-irq"), testdev.irq_ports),
        (
            Window("mmio", PcTestdev.BASE_IOMEM, PcTestdev.IOMEM_SIZE, "testdev-iomem"),
            testdev.iomem,
        ),
    ]
    return host.add_device_windows(testdev, spec.name, windows), testdev
