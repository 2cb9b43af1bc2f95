"""Interrupt wiring on the split irqchip.

IOAPIC inputs carry the electrical level (True = high); the redirection
entry's polarity bit, which the guest programs from the MADT and the DSDT,
says which level asserts a pin.

ISA IRQ n drives PIC input n and IOAPIC pin n, except IRQ0 (the PIT), which
is wired to pin 2 as on every PC since the MADT override IRQ0 -> GSI 2. ISA
lines are active high (the ISA default of the MPS INTI flags; the SCI's
override says active high too), so their logical level is their electrical one.

PCI INTx# lines (PCI Local Bus Spec 3.0 §2.2.6) are active low, open drain and
wire-ORed: every function whose INTx pin :func:`kvm_vmm.board.pci_intx_gsi`
maps to the same IOAPIC pin shares it, and a pull-up holds it high while none
asserts. They reach the IOAPIC only (no PIC: the _PRT names GSIs above 15).

IOAPIC pin n owns the reserved MSI route GSI n; firing it is KVM_IRQ_LINE on
that GSI (an MSI route delivers on level 1; level 0 is a no-op for it).
The PIC's INTR output goes to the boot vCPU's ExtINT injector in kvmfast.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from kvm_vmm import board

ISA_IRQ_TO_IOAPIC_PIN = {board.PIT_IRQ: board.PIT_GSI}


class PicInput(Protocol):
    def set_irq(self, irq: int, level: bool) -> None: ...


class IoapicInput(Protocol):
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive ``pin`` to the electrical ``level`` (True = high)."""


class RoutingVm(Protocol):
    def set_msi_route(self, gsi: int, address: int, data: int) -> None: ...

    def irq_line(self, gsi: int, level: bool) -> int: ...


def ioapic_pin_of_isa_irq(irq: int) -> int:
    return ISA_IRQ_TO_IOAPIC_PIN.get(irq, irq)


@dataclass
class IsaIrqLine:
    """kvm-devices' InterruptLine for one ISA IRQ: PIC input and IOAPIC pin together."""

    irq: int
    pic: PicInput | None
    ioapic: IoapicInput | None

    def set_level(self, level: bool) -> None:
        if self.pic is not None:
            self.pic.set_irq(self.irq, level)
        if self.ioapic is not None:
            self.ioapic.set_irq(ioapic_pin_of_isa_irq(self.irq), level)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)


@dataclass
class PciIntxWires:
    """The INTx# wires of PCI bus 0, one per IOAPIC pin of ``board.PCI_INTX_GSIS``.

    Made with the machine, before the guest runs: it pulls every wire high, so that
    a pin the guest programs level-triggered, active low (as the _PRT tells it) reads
    deasserted while no function asserts it.
    """

    ioapic: IoapicInput
    # Per GSI, the (slot, function, pin) of every function pulling its wire low.
    _asserting: dict[int, set[tuple[int, int, int]]] = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._asserting = {gsi: set() for gsi in board.PCI_INTX_GSIS}
        with self._lock:
            for gsi in board.PCI_INTX_GSIS:
                self.ioapic.set_irq(gsi, True)

    def line(self, slot: int, pin: int, function: int = 0) -> PciIntxLine:
        """The line of INTx ``pin`` (0..3 = INTA#..INTD#) of ``function`` of device
        ``slot``: functions of one device using the same pin share its wire."""
        if not 0 <= function < board.PCI_FUNCTIONS:
            raise ValueError(f"PCI function {function} is outside 0..{board.PCI_FUNCTIONS - 1}")
        return PciIntxLine(self, slot, function, pin, board.pci_intx_gsi(slot, pin))

    def drive(self, line: PciIntxLine, asserted: bool) -> None:
        source = (line.slot, line.function, line.pin)
        # Under the lock: two functions sharing a wire must not reorder their levels.
        with self._lock:
            sources = self._asserting[line.gsi]
            if asserted:
                sources.add(source)
            else:
                sources.discard(source)
            self.ioapic.set_irq(line.gsi, not sources)

    def asserting(self, gsi: int) -> frozenset[tuple[int, int, int]]:
        """The (slot, function, pin) of every function pulling the wire of ``gsi`` low."""
        with self._lock:
            return frozenset(self._asserting[gsi])


@dataclass(frozen=True)
class PciIntxLine:
    """One function's INTx pin: asserted pulls its shared wire low."""

    wires: PciIntxWires
    slot: int
    function: int
    pin: int
    gsi: int

    def set_asserted(self, asserted: bool) -> None:
        self.wires.drive(self, asserted)


@dataclass
class KvmIoapicSink:
    """kvm-devices' IoapicSink over the reserved MSI routes of a kvmfast Vm.

    A masked entry keeps its route: the kernel's EOI-exit bitmap is built from
    the routes, and a pin masked while its interrupt is in service must still
    get its EOI back.
    """

    vm: RoutingVm
    routes: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def route_changed(self, pin: int, msi_address: int, msi_data: int, masked: bool) -> None:
        with self._lock:
            previous = self.routes.get(pin)
            self.routes[pin] = (msi_address, msi_data, masked)
            if previous is not None and previous[:2] == (msi_address, msi_data):
                return
            self.vm.set_msi_route(pin, msi_address, msi_data)

    def deliver(self, pin: int) -> None:
        self.vm.irq_line(pin, True)
