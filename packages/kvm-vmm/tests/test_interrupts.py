"""Interrupt wiring: ISA IRQs to PIC and IOAPIC, PCI INTx to the IOAPIC, IOAPIC pins to
reserved MSI routes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kvm_devices.ioapic import Ioapic
from kvm_vmm import board
from kvm_vmm.interrupts import IsaIrqLine, KvmIoapicSink, PciIntxWires, ioapic_pin_of_isa_irq


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


# --------------------------------------------------------------------- PCI INTx


def program_as_the_prt_says(ioapic: Ioapic, gsi: int, vector: int) -> None:
    """Level-triggered, active low: what a _PRT entry naming a GSI means (ACPI 6.5
    §6.2.13), written as Linux writes an entry (82093AA §3.2.4: bit 13 polarity,
    bit 15 trigger mode)."""
    ioapic.write(0x00, 4, 0x10 + 2 * gsi)
    ioapic.write(0x10, 4, vector | 1 << 13 | 1 << 15)


def test_pci_intx_gsi_rotates_the_pins_of_each_slot_over_the_pins_above_isa() -> None:
    assert [board.pci_intx_gsi(1, pin) for pin in range(4)] == [17, 18, 19, 20]
    assert board.pci_intx_gsi(7, 1) == 16
    assert board.pci_intx_gsi(9, 0) == board.pci_intx_gsi(1, 0)
    gsis = {board.pci_intx_gsi(slot, pin) for slot in range(32) for pin in range(4)}
    assert gsis == set(board.PCI_INTX_GSIS)
    assert min(gsis) >= board.ISA_IRQS
    for slot, pin in ((32, 0), (-1, 0), (0, 4), (0, -1)):
        with pytest.raises(ValueError):
            board.pci_intx_gsi(slot, pin)


def test_pci_intx_wires_are_pulled_high_from_the_start() -> None:
    ioapic = RecordingController()
    wires = PciIntxWires(ioapic)
    assert ioapic.changes == [(gsi, True) for gsi in board.PCI_INTX_GSIS]
    line = wires.line(3, 2)
    assert line.gsi == board.pci_intx_gsi(3, 2)
    line.set_asserted(True)
    line.set_asserted(False)
    assert ioapic.changes[-2:] == [(line.gsi, False), (line.gsi, True)]


def test_an_idle_pci_pin_programmed_active_low_delivers_nothing() -> None:
    vm = FakeVm()
    ioapic = Ioapic(KvmIoapicSink(vm))
    PciIntxWires(ioapic)
    for gsi in board.PCI_INTX_GSIS:
        program_as_the_prt_says(ioapic, gsi, 0x60 + gsi)
    assert vm.lines == []


def test_pci_intx_is_level_active_low_through_our_ioapic_and_redelivered_on_eoi() -> None:
    vm = FakeVm()
    ioapic = Ioapic(KvmIoapicSink(vm))
    line = PciIntxWires(ioapic).line(2, 0)
    program_as_the_prt_says(ioapic, line.gsi, 0x62)
    line.set_asserted(True)
    assert vm.lines == [(line.gsi, True)]
    ioapic.eoi(0x62)  # the driver has not read ISR yet: still asserted
    assert vm.lines == [(line.gsi, True)] * 2
    line.set_asserted(False)
    ioapic.eoi(0x62)
    assert vm.lines == [(line.gsi, True)] * 2


def test_functions_sharing_a_wire_keep_it_asserted_until_the_last_lets_go() -> None:
    vm = FakeVm()
    ioapic = Ioapic(KvmIoapicSink(vm))
    wires = PciIntxWires(ioapic)
    first, second = wires.line(1, 0), wires.line(9, 0)
    assert first.gsi == second.gsi
    program_as_the_prt_says(ioapic, first.gsi, 0x61)
    first.set_asserted(True)
    second.set_asserted(True)
    first.set_asserted(False)
    assert wires.asserting(first.gsi) == {(9, 0, 0)}
    ioapic.eoi(0x61)
    assert vm.lines == [(first.gsi, True)] * 2
    second.set_asserted(False)
    ioapic.eoi(0x61)
    assert vm.lines == [(first.gsi, True)] * 2
    assert wires.asserting(first.gsi) == frozenset()


def test_two_functions_of_one_device_on_the_same_pin_share_its_wire() -> None:
    ioapic = RecordingController()
    wires = PciIntxWires(ioapic)
    function0, function1 = wires.line(4, 0), wires.line(4, 0, function=1)
    function0.set_asserted(True)
    function1.set_asserted(True)
    function0.set_asserted(False)
    assert ioapic.changes[-1] == (function0.gsi, False)  # function 1 still holds it low
    function1.set_asserted(False)
    assert ioapic.changes[-1] == (function0.gsi, True)
    with pytest.raises(ValueError):
        wires.line(4, 0, function=8)
