"""A guest user-mode SYSCALL/SYSRET round trip (SDM Vol. 2B "SYSCALL", "SYSRET").

On this host KVM leaves CS at CPL 3 on SYSCALL and the guest takes a #PF at LSTAR
(../shared/HOST-KVM.md); the start-up probe finds that, and the run loop performs the
SYSCALL when the #PF handler's first instruction (CLAC, as in Linux) exits. On a host
without the quirk the SYSCALL works by itself and the same assertions hold."""

from __future__ import annotations

import struct
import threading
import time

import pytest
from emulation_support import (
    GDT_AT,
    USER_STACK,
    Guest,
    enter_user_mode64,
    exception_handlers_asm,
    gate64,
    install_exception_handlers,
    make_guest,
    run_until_exit,
    setup_tss64,
    user_segment,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

# Linux's #PF entry shape (CLAC first, where kvmfast recognises the quirk), reporting
# any #PF that reaches it: error code in RBX, CR2 in RCX, RIP in RDX, exit with 14.
PAGE_FAULT_HANDLER = """page_fault:
    clac
    pop rbx
    mov rcx, cr2
    pop rdx
    mov al, 14
    out 0xf4, al
"""

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
{PAGE_FAULT_HANDLER}syscall_entry:
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


# Linux's GDT layout, which this host's SYSRET assumes (CS 0x33, SS 0x2b).
LINUX_USER_DS, LINUX_USER_CS = 0x2B, 0x33
_UDATA = 0x00CF_F300_0000_FFFF
_UCODE64 = 0x00AF_FB00_0000_FFFF
CR4_SMAP = 1 << 21
TIMER_VECTOR = 0x30


def _linux_gdt(guest: Guest) -> None:
    """setup_tss64's GDT moved to Linux's slots: user data 0x28, user code 0x30, TSS 0x40."""
    gdt = bytearray(guest.vm.read(GDT_AT, 64))
    tss = gdt[0x30:0x40]
    struct.pack_into("<QQQ", gdt, 0x28, _UDATA, _UCODE64, 0)
    gdt += tss
    guest.vm.write(GDT_AT, bytes(gdt))
    tr = guest.vcpu.get_sregs()["tr"]
    tr["selector"] = 0x40
    guest.vcpu.set_sregs({"gdt": {"base": GDT_AT, "limit": len(gdt) - 1}, "tr": tr})


def test_syscalls_survive_kicks_and_timer_interrupts_with_smap(kvm: Kvm) -> None:
    """Linux's shape: entry with SWAPGS and a stack switch, IF off until then, SMAP on, a
    LAPIC timer firing and the vCPU kicked from another thread all along (a profiler,
    a stop). On this host a kick that ends the first KVM_RUN after a repair used to
    undo it: the fault was then taken at CPL 0 on the user stack, a triple fault here
    and a double fault in Linux. The run loop now applies the repair again."""
    syscalls = 2000
    guest = make_guest(
        kvm,
        f"""
.global entry, page_fault, syscall_entry, timer, ticks
entry:
    hlt
{PAGE_FAULT_HANDLER}syscall_entry:
    swapgs
    mov [rip + user_rsp], rsp
    lea rsp, [rip + kernel_stack_top]
    push rcx
    push r11
    sti
    add rax, 1
    cli
    pop r11
    pop rcx
    mov rsp, [rip + user_rsp]
    swapgs
    sysretq
timer:
    push rax
    mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    inc qword ptr [rip + ticks]
    pop rax
    iretq
    .balign 8
user_rsp: .quad 0
ticks: .quad 0
    .skip 4096
kernel_stack_top:
{exception_handlers_asm()}
""",
    )
    setup_tss64(guest)
    _linux_gdt(guest)
    install_exception_handlers(
        guest,
        {14: gate64(guest.symbols["page_fault"]), TIMER_VECTOR: gate64(guest.symbols["timer"])},
    )
    user = enter_user_mode64(
        guest,
        f"""
.global user_entry, trap
user_entry:
    mov ecx, {syscalls}
    xor eax, eax
again:
    push rcx
    syscall
    pop rcx
    dec ecx
    jnz again
    mov r9, rax
trap:
    ud2
""",
    )
    data = user_segment(LINUX_USER_DS, code=False)
    sregs = guest.vcpu.get_sregs()
    guest.vcpu.set_sregs(
        {
            "cs": user_segment(LINUX_USER_CS, code=True),
            "ss": data,
            "ds": data,
            "es": data,
            "efer": sregs["efer"] | EFER_SCE,
            "cr4": sregs["cr4"] | CR4_SMAP,
        }
    )
    guest.vcpu.set_msrs(
        {
            MSR_STAR: (0x23 << 48) | (0x08 << 32),
            MSR_LSTAR: guest.symbols["syscall_entry"],
            MSR_FMASK: 0x47700,  # TF, IF, DF, AC, NT, IOPL: as Linux
        }
    )
    lapic = bytearray(guest.vcpu.get_lapic())
    struct.pack_into("<I", lapic, 0xF0, 0x1FF)  # software enable
    struct.pack_into("<I", lapic, 0x320, (1 << 17) | TIMER_VECTOR)  # periodic
    struct.pack_into("<I", lapic, 0x3E0, 0xB)  # divide by 1
    struct.pack_into("<I", lapic, 0x380, 20_000)
    guest.vcpu.set_lapic(bytes(lapic))
    kicker = guest.vcpu.kicker()
    done = threading.Event()

    def kick() -> None:
        while not done.is_set():
            kicker.request_sample()
            time.sleep(0.0001)

    kicks = threading.Thread(target=kick)
    kicks.start()
    try:
        vector = run_until_exit(guest)
    finally:
        done.set()
        kicks.join()
    regs = guest.vcpu.get_regs()
    assert vector == 6 and regs["rdx"] == user["trap"], (vector, regs)
    assert regs["r9"] == syscalls
    ticks = struct.unpack("<Q", guest.vm.read(guest.symbols["ticks"], 8))[0]
    assert ticks > 0
    assert sum(guest.vm.rip_samples().values()) > 0  # the kicks did land
