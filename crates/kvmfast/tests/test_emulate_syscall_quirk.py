"""A guest user-mode SYSCALL/SYSRET round trip (SDM Vol. 2B "SYSCALL", "SYSRET").

On this host KVM leaves CS at CPL 3 on SYSCALL and the guest takes a #PF at LSTAR
(../shared/HOST-KVM.md); the start-up probe finds that, and the run loop performs the
SYSCALL when the #PF handler's first instruction (CLAC, as in Linux) exits. On a host
without the quirk the SYSCALL works by itself and the same assertions hold."""

from __future__ import annotations

import pytest
from emulation_support import (
    USER_STACK,
    enter_user_mode64,
    exception_handlers_asm,
    gate64,
    install_exception_handlers,
    make_guest,
    run_until_exit,
    setup_tss64,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_FMASK = 0xC0000084
EFER_SCE = 1


def test_user_syscall_and_sysret_round_trip(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, page_fault, syscall_entry
entry:
    hlt
page_fault:
    clac
    pop rbx
    mov rcx, cr2
    pop rdx
    mov al, 14
    out 0xf4, al
syscall_entry:
    mov r12, rcx
    mov r13, r11
    mov r14, rsp
    mov r15, cs
    pushfq
    pop rbp
    mov rsi, ss
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
    mov rdi, cs
trap:
    ud2
""",
    )
    guest.vcpu.set_sregs({"efer": guest.vcpu.get_sregs()["efer"] | EFER_SCE})
    # STAR[63:48] = 0x20: SYSRET's CS is 0x20 + 16 | 3 = 0x33, the value this host's
    # SYSRET loads whatever STAR says (Linux's __USER_CS; docs/emulation.md).
    guest.vcpu.set_msrs(
        {
            MSR_STAR: (0x20 << 48) | (0x08 << 32),
            MSR_LSTAR: guest.symbols["syscall_entry"],
            MSR_FMASK: 0x4700,
        }
    )
    vector = run_until_exit(guest)
    regs = guest.vcpu.get_regs()
    assert vector == 6, f"stopped with vector {vector}, regs {regs}"
    # In the kernel: CS from STAR, RCX the return address, R11 the user's RFLAGS,
    # RSP unchanged, IF cleared by FMASK.
    assert regs["r15"] == 0x08 and regs["rsi"] == 0x10
    assert regs["r12"] == user["after_syscall"]
    assert regs["r14"] == USER_STACK
    assert regs["rbp"] & 0x200 == 0
    assert regs["r13"] & 0x2 == 0x2
    # Back in user mode after SYSRET: CS = STAR[63:48] + 16 | 3, RAX from the kernel.
    assert regs["rdi"] == 0x33
    assert regs["r9"] == 42
    assert regs["rdx"] == user["trap"]
    quirks = guest.vm.host_quirks()
    repairs = guest.vcpu.counters()["quirk_repairs"]
    if quirks["syscall_keeps_user_cs"]:
        assert repairs == {"syscall_keeps_user_cs": 1}
    else:
        assert repairs == {}
