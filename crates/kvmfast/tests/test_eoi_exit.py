"""KVM_EXIT_IOAPIC_EOI on the split irqchip (KVM API doc 5, "KVM_EXIT_IOAPIC_EOI";
4.110 KVM_CAP_SPLIT_IRQCHIP): the guest's EOI of a vector that a level-triggered MSI
route (data bit 15) below the reserved IOAPIC GSIs delivered comes back to the VMM on
the vCPU's own thread, before the handler's IRET."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from kvmfast_guest_support import (
    EXIT_SEQUENCE,
    LAPIC_BASE,
    LAPIC_EOI,
    LAPIC_SOFTWARE_ENABLE,
    RecordingDevice,
    boot_guest,
    run_with_timeout,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

MSI_LEVEL_TRIGGER = 1 << 15
VECTOR = 0x45
GSI = 5


@dataclass
class EoiRun:
    eois: list[int]
    line_statuses: list[int]
    order: list[str]
    exits: dict[str, int]


def eoi_guest(kvm: Kvm, route_data: int) -> EoiRun:
    guest = boot_guest(
        kvm,
        f"""
    .global entry, handler
    entry:
        {LAPIC_SOFTWARE_ENABLE}
        mov al, 1
        out 0x82, al        # the VMM asserts the GSI
        sti
        hlt
        {EXIT_SEQUENCE}
    handler:
        mov al, {VECTOR:#x}
        out 0x81, al
        {LAPIC_EOI}
        mov al, 2
        out 0x81, al        # after the EOI, before IRET
        iretq
        """,
        vectors={VECTOR: "handler"},
    )
    vm, vcpu = guest.vm, guest.vcpu
    vm.set_msi_route(GSI, LAPIC_BASE, route_data)
    eois: list[int] = []
    statuses: list[int] = []
    order = RecordingDevice()

    def on_eoi(vector: int) -> None:
        eois.append(vector)
        order.log.append(("eoi", 0, 0, vector))
        vm.irq_line(GSI, False)

    class Assert:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            statuses.append(vm.irq_line(GSI, True))

    vcpu.set_eoi_handler(on_eoi)
    vm.add_pio(0x81, 1, order)
    vm.add_pio(0x82, 1, Assert())
    assert run_with_timeout(vcpu).reason == "device_exit"
    return EoiRun(
        eois=eois,
        line_statuses=statuses,
        order=[entry[0] for entry in order.log],
        exits=vcpu.counters()["exits"],
    )


def test_level_msi_route_eoi_reaches_the_handler(kvm: Kvm) -> None:
    run = eoi_guest(kvm, MSI_LEVEL_TRIGGER | VECTOR)
    assert run.eois == [VECTOR]
    assert run.line_statuses == [1]
    assert run.order == ["write", "eoi", "write"]
    assert run.exits["ioapic_eoi"] == 1


def test_edge_msi_route_has_no_eoi_exit(kvm: Kvm) -> None:
    run = eoi_guest(kvm, VECTOR)
    assert run.eois == []
    assert run.line_statuses == [1]
    assert "ioapic_eoi" not in run.exits
