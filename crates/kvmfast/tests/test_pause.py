"""VcpuKicker.pause(): run() returns Exit("paused") at a clean point and a later run()
continues from there (KVM API doc 5, immediate_exit and signals, for the kick itself)."""

from __future__ import annotations

import struct

import pytest
from emulation_support import (
    enter_user_mode64,
    exception_handlers_asm,
    gate64,
    install_exception_handlers,
    make_guest,
    run_until_exit,
    setup_tss64,
)
from kvmfast_guest_support import (
    RecordingDevice,
    VcpuThread,
    boot_guest,
    wait_until_in_kvm_run,
)
from test_emulate_syscall_quirk import (
    EFER_SCE,
    MSR_FMASK,
    MSR_LSTAR,
    MSR_STAR,
    PAGE_FAULT_HANDLER,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

LIMIT = 200_000
COUNTER = f"""
.global entry, again, count
entry:
    xor eax, eax
again:
    inc rax
    mov [rip + count], rax
    cmp rax, {LIMIT}
    jne again
    out 0xf4, al
    .balign 8
count: .quad 0
"""


def _count(guest_memory: bytes) -> int:
    value: int = struct.unpack("<Q", guest_memory)[0]
    return value


def test_a_paused_counter_continues_from_where_it_was(kvm: Kvm) -> None:
    guest = boot_guest(kvm, COUNTER)
    vcpu, kicker = guest.vcpu, guest.vcpu.kicker()
    count_at = guest.program.symbols["count"]
    seen: list[int] = []
    for _ in range(3):
        running = VcpuThread(vcpu)
        wait_until_in_kvm_run(vcpu)
        kicker.pause()
        exit = running.join()
        if exit.reason == "device_exit":
            break  # the guest finished between two pauses: fine, fewer rounds
        assert exit.reason == "paused"
        rax = vcpu.get_regs()["rax"]
        stored = _count(guest.vm.read(count_at, 8))
        # Out of KVM_RUN the registers and memory agree: the store of rax is either
        # done or the next instruction.
        assert stored in (rax, rax - 1)
        assert not seen or rax >= seen[-1]
        seen.append(rax)
    else:
        assert VcpuThread(vcpu).join().reason == "device_exit"
    # Every increment happened once: pausing lost or repeated none.
    assert vcpu.get_regs()["rax"] == LIMIT
    assert _count(guest.vm.read(count_at, 8)) == LIMIT
    assert seen, "no pause landed before the guest finished"


def test_registers_set_while_paused_are_where_the_guest_continues(kvm: Kvm) -> None:
    guest = boot_guest(kvm, COUNTER)
    vcpu, kicker = guest.vcpu, guest.vcpu.kicker()
    running = VcpuThread(vcpu)
    wait_until_in_kvm_run(vcpu)
    kicker.pause()
    assert running.join().reason == "paused"
    rip = vcpu.get_regs()["rip"]
    vcpu.set_regs({"rip": guest.program.symbols["again"], "rax": LIMIT - 10})
    assert VcpuThread(vcpu).join().reason == "device_exit"
    assert vcpu.get_regs()["rax"] == LIMIT
    assert guest.program.symbols["entry"] <= rip < guest.program.symbols["count"]


def test_a_pause_before_run_is_honoured_at_the_next_run(kvm: Kvm) -> None:
    guest = boot_guest(kvm, COUNTER)
    guest.vcpu.kicker().pause()
    assert guest.vcpu.run().reason == "paused"
    assert guest.vcpu.get_regs()["rip"] == guest.program.symbols["entry"]
    assert guest.vcpu.run().reason == "device_exit"


def test_a_halted_vcpu_pauses_and_stays_halted(kvm: Kvm) -> None:
    """With the split irqchip HLT stays in KVM_RUN (../shared/HOST-KVM.md): the kick
    takes it out, and after the pause it is still halted, waiting for an interrupt."""
    guest = boot_guest(kvm, ".global entry\nentry:\n    cli\n    hlt\n    out 0xf4, al\n")
    vcpu, kicker = guest.vcpu, guest.vcpu.kicker()
    running = VcpuThread(vcpu)
    wait_until_in_kvm_run(vcpu)
    kicker.pause()
    assert running.join().reason == "paused"
    assert vcpu.get_regs()["rip"] == guest.program.symbols["entry"] + 2  # after the HLT
    running = VcpuThread(vcpu)
    wait_until_in_kvm_run(vcpu)
    assert running.alive
    kicker.stop()
    assert running.join().reason == "stopped"


def test_a_pause_during_a_syscall_repair_waits_until_the_guest_ran_from_it(kvm: Kvm) -> None:
    """The pause is posted from the trace hook of the exit that performs the repair, so
    it is taken before the entry that must not be cut short
    (emulate::syscall_quirk::PendingRepair). run() returns only after the guest ran the
    kernel entry's first instruction, an OUT that exits to userspace."""
    guest = make_guest(
        kvm,
        f"""
.global entry, page_fault, syscall_entry, after_out
entry:
    hlt
{PAGE_FAULT_HANDLER}syscall_entry:
    out 0x80, al
after_out:
    mov r12, rcx
    add rax, 1
    sysretq
{exception_handlers_asm()}
""",
    )
    setup_tss64(guest)
    install_exception_handlers(guest, {14: gate64(guest.symbols["page_fault"])})
    user = enter_user_mode64(
        guest,
        """
.global user_entry, after_syscall, trap
user_entry:
    mov eax, 41
    syscall
after_syscall:
    mov r9, rax
trap:
    ud2
""",
    )
    guest.vcpu.set_sregs({"efer": guest.vcpu.get_sregs()["efer"] | EFER_SCE})
    guest.vcpu.set_msrs(
        {
            MSR_STAR: (0x20 << 48) | (0x08 << 32),
            MSR_LSTAR: guest.symbols["syscall_entry"],
            MSR_FMASK: 0x4700,
        }
    )
    if not guest.vm.host_quirks()["syscall_keeps_user_cs"]:
        pytest.skip("this host's SYSCALL loads CS itself: no repair to wait for")
    port = RecordingDevice()
    guest.vm.add_pio(0x80, 1, port)
    kicker = guest.vcpu.kicker()

    def pause_at_the_repair(name: str, address: int, size: int, write: bool, value: int) -> None:
        if name == "internal_error" and guest.vcpu.counters()["quirk_repairs"]:
            kicker.pause()
            guest.vcpu.set_trace(None)

    guest.vcpu.set_trace(pause_at_the_repair)
    exit = guest.vcpu.run()
    assert exit.reason == "paused"
    regs = guest.vcpu.get_regs()
    assert regs["rip"] == guest.symbols["after_out"], regs
    assert guest.vcpu.get_sregs()["cs"]["selector"] == 0x08
    assert [entry[0] for entry in port.log] == ["write"]
    # Resumed: the rest of the SYSCALL and the SYSRET, as without a pause.
    assert run_until_exit(guest) == 6
    regs = guest.vcpu.get_regs()
    assert regs["r9"] == 42 and regs["r12"] == user["after_syscall"]
    assert regs["rdx"] == user["trap"]
    assert guest.vcpu.counters()["quirk_repairs"] == {"syscall_keeps_user_cs": 1}


@pytest.mark.parametrize(
    ("space", "read"),
    [("pio", "in eax, dx"), ("mmio", "mov eax, dword ptr [rdx]")],
)
def test_a_pause_right_after_a_read_returns_with_the_read_completed(
    kvm: Kvm, space: str, read: str
) -> None:
    """KVM puts an IN's or MMIO read's value in the register and moves RIP past it only
    at the next KVM_RUN (KVM API doc 5, kvm_run: "the corresponding operations are
    complete ... only after userspace has re-entered the kernel with KVM_RUN"). A
    pause taken at that exit must complete the read first: registers copied while
    paused would read the device again, and a resume that sets them would lose the
    value. The device posts the pause from its read, so it lands on that exit."""
    address = 0x3E0 if space == "pio" else 0xD000_0000
    guest = boot_guest(
        kvm,
        f"""
.global entry, after_read
entry:
    mov edx, {address}
    {read}
after_read:
    out 0xf4, al
""",
    )
    kicker = guest.vcpu.kicker()

    def answer(offset: int, size: int) -> int:
        kicker.pause()
        return 0x1234_5678

    device = RecordingDevice(answer)
    if space == "pio":
        guest.vm.add_pio(address, 4, device)
    else:
        guest.vm.add_mmio(address, 0x1000, device)
    assert guest.vcpu.run().reason == "paused"
    regs = guest.vcpu.get_regs()
    assert (regs["rip"], regs["rax"]) == (guest.program.symbols["after_read"], 0x1234_5678)
    assert guest.vcpu.run().reason == "device_exit"
    assert len(device.log) == 1
