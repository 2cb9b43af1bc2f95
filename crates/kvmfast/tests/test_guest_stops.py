"""Guest-caused stops surface as GuestStop exceptions with the vCPU's registers:
KVM_EXIT_SHUTDOWN (triple fault) and KVM_EXIT_INTERNAL_ERROR (KVM API doc 5; the
emulation-failure layout with instruction bytes is described in ../shared/HOST-KVM.md)."""

from __future__ import annotations

import pytest
from kvmfast_guest_support import MMIO_BASE, boot_guest

from kvmfast import EmulationFailure, GuestStop, Kvm, NullSink, TripleFault

pytestmark = pytest.mark.kvm


def test_triple_fault_raises_with_registers(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        """
    .global entry, fault
    entry:
        mov rax, 0x1234abcd
    fault:
        ud2
        """,
    )
    # No IDT: #UD cannot be delivered, nor #GP, nor #DF (SDM Vol. 3A 6.15, "Interrupt 8").
    guest.vcpu.set_sregs({"idt": {"base": 0, "limit": 0}})
    with pytest.raises(TripleFault) as raised:
        guest.vcpu.run()
    assert isinstance(raised.value, GuestStop)
    assert raised.value.regs["rax"] == 0x1234ABCD
    assert raised.value.sregs["cs"]["l"] == 1
    assert "RIP" in str(raised.value)
    assert guest.vcpu.counters()["exits"]["shutdown"] == 1


def test_instruction_kvm_cannot_emulate_raises_emulation_failure(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
    .global entry, bad
    entry:
        mov rbx, {MMIO_BASE:#x}
        mov rcx, 0x77
    bad:
        popcnt rax, [rbx]
        """,
    )
    # An MMIO operand makes KVM emulate the instruction, and its emulator has no POPCNT;
    # with the fallback off nothing completes it.
    guest.vm.add_mmio(MMIO_BASE, 0x1000, NullSink())
    guest.vcpu.emulation_fallback = False
    with pytest.raises(EmulationFailure) as raised:
        guest.vcpu.run()
    failure = raised.value
    assert failure.suberror == 1  # KVM_INTERNAL_ERROR_EMULATION
    assert failure.regs["rip"] == guest.program.symbols["bad"]
    assert failure.regs["rcx"] == 0x77
    if failure.data and failure.data[0] & 1:
        # KVM reports the bytes it fetched (insn_size may cover more than the
        # instruction itself).
        assert failure.insn_bytes.startswith(bytes.fromhex("f3480fb803"))
    else:
        assert failure.insn_bytes == b""
    assert failure.instruction == "popcnt rax,[rbx]"
    assert failure.instruction_bytes == bytes.fromhex("f3480fb803")
    assert failure.cpl == 0
    assert "emulation fallback is off" in str(failure)
