"""Interrupt wiring: ISA IRQs to PIC and IOAPIC, IOAPIC pins to reserved MSI routes."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvm_devices.ioapic import Ioapic
from kvm_vmm.interrupts import IsaIrqLine, KvmIoapicSink, ioapic_pin_of_isa_irq


@dataclass
class RecordingController:
    changes: list[tuple[int, bool]] = field(default_factory=list)

    def set_irq(self, irq: int, level: bool) -> None:
        self.changes.append((irq, level))


@dataclass
class FakeVm:
    routes: dict[int, tuple[int, int]] = field(default_factory=dict)
    route_commits: int = 0
    lines: list[tuple[int, bool]] = field(default_factory=list)

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (address, data)
        self.route_commits += 1

    def irq_line(self, gsi: int, level: bool) -> int:
        self.lines.append((gsi, level))
        return 1


def test_irq0_goes_to_ioapic_pin_2_as_the_madt_override_says() -> None:
    assert ioapic_pin_of_isa_irq(0) == 2
    assert ioapic_pin_of_isa_irq(4) == 4
    pic, ioapic = RecordingController(), RecordingController()
    IsaIrqLine(0, pic, ioapic).pulse()
    assert pic.changes == [(0, True), (0, False)]
    assert ioapic.changes == [(2, True), (2, False)]


def test_a_line_without_a_pic_drives_only_the_ioapic() -> None:
    ioapic = RecordingController()
    IsaIrqLine(9, None, ioapic).set_level(True)
    assert ioapic.changes == [(9, True)]


def test_ioapic_routes_reach_the_vm_and_unchanged_messages_are_not_recommitted() -> None:
    vm = FakeVm()
    ioapic = Ioapic(KvmIoapicSink(vm))
    assert set(vm.routes) == set(range(24))
    commits = vm.route_commits
    # Unmask pin 4 (edge, vector 0x34): the message is the same, only the mask changed.
    ioapic.write(0x00, 4, 0x10 + 2 * 4)
    ioapic.write(0x10, 4, 0x0001_0034)
    ioapic.write(0x10, 4, 0x0000_0034)
    assert vm.routes[4] == (0xFEE0_0000, 0x34)
    assert vm.route_commits == commits + 1
    ioapic.set_irq(4, True)
    assert vm.lines == [(4, True)]


def test_level_pins_route_with_the_msi_trigger_bit() -> None:
    vm = FakeVm()
    ioapic = Ioapic(KvmIoapicSink(vm))
    ioapic.write(0x00, 4, 0x10 + 2 * 9)
    ioapic.write(0x10, 4, (1 << 15) | 0x39)
    assert vm.routes[9] == (0xFEE0_0000, (1 << 15) | 0x39)
