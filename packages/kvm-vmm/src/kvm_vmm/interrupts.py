"""Interrupt wiring on the split irqchip.

ISA IRQ n drives PIC input n and IOAPIC pin n, except IRQ0 (the PIT), which
is wired to pin 2 as on every PC since the MADT override IRQ0 -> GSI 2.
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
    def set_irq(self, pin: int, level: bool) -> None: ...


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
