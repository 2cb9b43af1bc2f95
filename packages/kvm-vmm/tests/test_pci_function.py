"""A plain PCI function's BARs follow its configuration space (PCI Local Bus
Specification 3.0 §6.2.2: COMMAND bit 0 enables I/O decode, bit 1 memory decode;
§6.2.5.1: a BAR holds the base the function decodes)."""

from __future__ import annotations

from typing import cast

import kvmfast
from kvm_devices.pci.host_bridge import PciBus
from kvm_devices.pci_testdev import IO_BAR, IO_BAR_SIZE, MEMORY_BAR, MEMORY_BAR_SIZE, PciTestdev
from kvm_vmm.pci_function import BarDevice, MappedFunction, attach_function
from kvm_vmm.platform_table import PlatformTable


class RecordingVm:
    """kvmfast.Vm's address map as a dict: (space, base) -> length."""

    def __init__(self, refuse: int | None = None) -> None:
        self.ranges: dict[tuple[str, int], int] = {}
        self.refuse = refuse

    def _add(self, space: str, base: int, length: int) -> None:
        if base == self.refuse:
            raise ValueError("overlaps RAM")
        self.ranges[(space, base)] = length

    def add_mmio(self, base: int, length: int, handler: object) -> None:
        self._add("mmio", base, length)

    def add_pio(self, base: int, length: int, handler: object) -> None:
        self._add("pio", base, length)

    def remove_mmio(self, base: int) -> None:
        del self.ranges[("mmio", base)]

    def remove_pio(self, base: int) -> None:
        del self.ranges[("pio", base)]


class Host:
    def __init__(self, vm: RecordingVm) -> None:
        self.vm = cast(kvmfast.Vm, vm)


def attach(vm: RecordingVm) -> tuple[PciTestdev, MappedFunction, PciBus]:
    device = PciTestdev()
    bars = [
        BarDevice(MEMORY_BAR, MEMORY_BAR_SIZE, device.memory),
        BarDevice(IO_BAR, IO_BAR_SIZE, device.io),
    ]
    bus = PciBus()
    mapped = attach_function(Host(vm), bus, PlatformTable(), device, "pci-testdev", bars)
    return device, mapped, bus


def test_firmware_placement_bars_in_their_windows_and_decode_on() -> None:
    vm = RecordingVm()
    device, mapped, bus = attach(vm)
    memory, io = device.config.bar_address(MEMORY_BAR), device.config.bar_address(IO_BAR)
    assert memory is not None and 0xC000_0000 <= memory < 0xE000_0000  # PCI_MMIO_WINDOW
    assert io == 0xC000  # the first block of PCI_IO_WINDOW
    assert device.config.memory_enabled and device.config.io_enabled
    assert vm.ranges == {("mmio", memory): MEMORY_BAR_SIZE, ("pio", io): IO_BAR_SIZE}
    assert mapped.decoded() == {MEMORY_BAR: memory, IO_BAR: io}
    assert bus.function(bus.free_slot() - 1) is device


def test_decode_off_and_a_moved_bar_are_followed() -> None:
    vm = RecordingVm()
    device, mapped, _ = attach(vm)
    memory = device.config.bar_address(MEMORY_BAR)
    device.config.write(0x04, 2, 0x0002)  # memory only: the I/O BAR goes
    assert vm.ranges == {("mmio", memory): MEMORY_BAR_SIZE}
    device.config.write(0x14, 4, 0xD000)
    device.config.write(0x04, 2, 0x0003)
    assert ("pio", 0xD000) in vm.ranges and mapped.decoded()[IO_BAR] == 0xD000
    device.config.write(0x10, 4, 0xFFFF_FFFF)  # sized with decode on: it moves there
    assert vm.ranges[("mmio", 0xFFFF_F000)] == MEMORY_BAR_SIZE
    assert ("mmio", memory) not in vm.ranges


def test_a_bar_the_bus_cannot_decode_is_left_undecoded() -> None:
    vm = RecordingVm(refuse=0x0010_0000)
    device, mapped, _ = attach(vm)
    device.config.write(0x10, 4, 0x0010_0000)  # over RAM: kvmfast refuses the range
    assert MEMORY_BAR not in mapped.decoded() and mapped.unmapped_bars == 1
