"""A plain PCI function on bus 0: its BARs placed as firmware places them, then decoded
wherever the guest programs them.

kvm-vmm has no firmware, so it does what SeaBIOS does for a function before the kernel
runs (kvm-unit-tests relies on it: its x86 library reads BARs, it assigns none): each
BAR gets a block of the PCI memory or I/O window (:mod:`kvm_vmm.board`), and COMMAND
gets memory- and I/O-space decode. From then on the function's configuration space
is the truth: a BAR is decoded (an MMIO or PIO range in kvmfast) while its space's
decode bit is on and it holds an address inside what the bus decodes (below 4 GiB for a
32-bit memory BAR, below 64 KiB for I/O); the guest may move it or turn decode off.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import kvmfast
from kvm_devices.interfaces import Device
from kvm_devices.pci.config_space import BAR0, COMMAND, COMMAND_IO, COMMAND_MEMORY
from kvm_devices.pci.host_bridge import PciBus, PciFunction
from kvm_vmm.added_devices import GuardedDevice
from kvm_vmm.platform_table import AddressSpace, PlatformTable, Window

_SPACE_LIMIT: dict[AddressSpace, int] = {"mmio": 1 << 32, "pio": 1 << 16}


class FunctionHost(Protocol):
    vm: kvmfast.Vm


@dataclass(frozen=True)
class BarDevice:
    """BAR ``index`` of ``size`` bytes, its registers ``device`` (offsets in the BAR)."""

    index: int
    size: int
    device: Device


class MappedFunction:
    """The function's BARs in kvmfast's address map, following its configuration space."""

    def __init__(
        self, vm: kvmfast.Vm, name: str, function: PciFunction, bars: Sequence[BarDevice]
    ) -> None:
        self.name = name
        self.function = function
        self._vm = vm
        self._bars = tuple(bars)
        self._mapped: dict[int, int] = {}
        self._lock = threading.Lock()
        self.unmapped_bars = 0  # addresses the bus could not decode (over RAM or a device)
        function.config.on_bars_changed = self._bars_changed
        self._bars_changed()

    def _space(self, bar: BarDevice) -> AddressSpace:
        return "pio" if self.function.config.bar_is_io(bar.index) else "mmio"

    def _wanted(self, bar: BarDevice) -> int | None:
        config = self.function.config
        space = self._space(bar)
        enabled = config.io_enabled if space == "pio" else config.memory_enabled
        address = config.bar_address(bar.index)
        if not enabled or address is None or address + bar.size > _SPACE_LIMIT[space]:
            return None
        return address

    def _bars_changed(self) -> None:
        with self._lock:
            for bar in self._bars:
                self._remap(bar)

    def _remap(self, bar: BarDevice) -> None:
        wanted, current = self._wanted(bar), self._mapped.get(bar.index)
        if wanted == current:
            return
        space = self._space(bar)
        if current is not None:
            remove = self._vm.remove_pio if space == "pio" else self._vm.remove_mmio
            remove(current)
            del self._mapped[bar.index]
        if wanted is None:
            return
        window = Window(space, wanted, bar.size, f"{self.name}-bar{bar.index}")
        add = self._vm.add_pio if space == "pio" else self._vm.add_mmio
        try:
            add(wanted, bar.size, GuardedDevice(self.name, window, bar.device))
        except ValueError:
            self.unmapped_bars += 1  # over RAM or another device: undecoded, as on a bus
            return
        self._mapped[bar.index] = wanted

    def decoded(self) -> dict[int, int]:
        """BAR index -> where it is decoded now."""
        with self._lock:
            return dict(self._mapped)


def attach_function(
    host: FunctionHost,
    bus: PciBus,
    table: PlatformTable,
    function: PciFunction,
    name: str,
    bars: Sequence[BarDevice],
) -> MappedFunction:
    """``function`` in bus 0's first free slot under ``name`` (or ``name#n``), each BAR
    given a block of its window and decode on, as firmware leaves a function."""
    name = table.unused_name(name)
    slot = bus.free_slot()
    config = function.config
    windows = []
    for bar in bars:
        io = config.bar_is_io(bar.index)
        space = table.io_bar_space if io else table.bar_space
        address = space.allocate(bar.size, name)
        config.write(BAR0 + 4 * bar.index, 4, address)
        windows.append(Window("pio" if io else "mmio", address, bar.size, f"{name}-bar{bar.index}"))
    table.add(name, tuple(windows), ())
    config.write(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY)
    mapped = MappedFunction(host.vm, name, function, bars)
    bus.add(slot, function)
    return mapped
