"""Clause 5 — KVM_NMI for LINT1 (api.rst 4.65).

"Queues an NMI on the thread's vcpu. Note this is well defined only when
KVM_CREATE_IRQCHIP has not been called, since this is an interface between
the virtual cpu core and virtual local APIC. After KVM_CREATE_IRQCHIP has been
called, this interface is completely emulated within the kernel. To use this
to emulate the LINT1 input with KVM_CREATE_IRQCHIP, use the following
algorithm: pause the vcpu, read the local APIC's state (KVM_GET_LAPIC), check
whether changing LINT1 will queue an NMI (see the LVT entry for LINT1), if so,
issue KVM_NMI, resume the vcpu."
"""

from __future__ import annotations

import pytest
from guests import GuestMachine, passed

pytestmark = pytest.mark.kvm

HOST_DONE = 0x9_0000  # a word the host sets once it has raised LINT1

NMI_GUEST = f"""
        .set HOST_DONE, {HOST_DONE}
main:
        SET_GATE 2, on_nmi
        call lapic_enable
        cmp dword ptr [mask_lint1], 0
        je 1f
        LAPIC_WRITE LAPIC_LINT1, 0x10400   /* NMI delivery, masked */
1:      REPORT 0x1000
        sti
2:      cmp dword ptr [HOST_DONE], 0    /* the host raised LINT1 */
        je 2b
        mov ecx, 100000                 /* time for a queued NMI to land */
        call spin_sti
        mov eax, [nmis]
        REPORT eax
        xor eax, eax
        ret

on_nmi:
        inc dword ptr [nmis]
        iretq

        .data
nmis:   .long 0
mask_lint1:
        .long MASK_LINT1
"""


@pytest.mark.parametrize("masked", [False, True])
def test_lint1_raises_an_nmi_only_when_its_lvt_says_nmi_unmasked(masked: bool) -> None:
    guest = GuestMachine(f"        .set MASK_LINT1, {int(masked)}\n{NMI_GUEST}")
    try:
        thread, outcome = guest.run_in_background()
        assert guest.report.wait_for(1)
        guest.machine.raise_lint1()
        guest.machine.write_memory(HOST_DONE, (1).to_bytes(4, "little"))
        thread.join(60)
        assert outcome and passed(outcome[0]), outcome
        assert guest.report.values == [0x1000, 0 if masked else 1]
        counters = guest.machine.vcpus[0].counters()
        assert counters["lint1_nmi"] == (0 if masked else 1)
    finally:
        guest.close()
