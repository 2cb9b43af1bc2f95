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
    KERNEL_CS64,
    USER_CS64,
    USER_STACK,
    Guest,
    InterruptInFlightAtAnExit,
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


# ---- a user-mode jump to LSTAR is not a SYSCALL ------------------------------------------

RFLAGS_IF = 1 << 9
RFLAGS_IOPL = 3 << 12
RFLAGS_VM = 1 << 17
RFLAGS_RF = 1 << 16
PF_USER = 1 << 2
LINUX_FMASK = 0x47700  # TF, IF, DF, IOPL, NT, AC
USER_FLAGS = 0x202  # what a Linux process runs with: IF, IOPL 0
UNMAPPED = 0x7FFF_FFFF_F000  # PML4[255]: nothing mapped there
DONE_SYSCALL = 0x5C

# The #PF handler reports the fault (error code in RBX, saved RIP in RDX, saved CS in
# RSI, saved RFLAGS in RDI, CR2 in RCX; AL = 14), then, when run again, sends the user to
# `resume_at`. The SYSCALL entry reports RFLAGS (RBP), RCX (R12), R11 (R13) and CS (R14).
# `kernel_syscall` is a SYSCALL on a supervisor-only page, for an RCX the user may not
# fetch from.
FAKE_KERNEL = f"""
.global entry, page_fault, syscall_entry, kernel_syscall_end, resume_at
entry:
    hlt
page_fault:
    clac
    mov rbx, [rsp]
    mov rdx, [rsp + 8]
    mov rsi, [rsp + 16]
    mov rdi, [rsp + 24]
    mov rcx, cr2
    mov al, 14
    out 0xf4, al
    add rsp, 8
    mov rax, [rip + resume_at]
    mov [rsp], rax
    iretq
syscall_entry:
    pushfq
    pop rbp
    mov r12, rcx
    mov r13, r11
    mov r14, cs
    mov al, {DONE_SYSCALL}
    out 0xf4, al
    syscall
kernel_syscall_end:
    hlt
    .balign 8
resume_at: .quad 0
{exception_handlers_asm()}
"""


def _fake_syscall_guest(
    kvm: Kvm, *, r11: str, rcx: str, fmask: int
) -> tuple[Guest, dict[str, int]]:
    """A CPL-3 program that loads R11 and RCX (assembly operands, or ``flags`` for its
    own RFLAGS; ``{name}`` in ``rcx`` is a kernel symbol) and jumps to LSTAR; at
    `resume` it makes a real SYSCALL."""
    guest = make_guest(kvm, FAKE_KERNEL)
    rcx = rcx.format(**guest.symbols)
    setup_tss64(guest)
    install_exception_handlers(guest, {14: gate64(guest.symbols["page_fault"])})
    load_r11 = "pushfq\n    pop r11" if r11 == "flags" else f"mov r11, {r11}"
    user = enter_user_mode64(
        guest,
        f"""
.global user_entry, resume, after_syscall, no_syscall_here
user_entry:
    mov rcx, {rcx}
    {load_r11}
    jmp [rip + lstar]
resume:
    syscall
after_syscall:
    ud2
    nop
    nop
no_syscall_here:
    ud2
    .balign 8
lstar: .quad {guest.symbols["syscall_entry"]}
""",
    )
    guest.vcpu.set_regs({"rflags": USER_FLAGS})
    guest.vcpu.set_sregs({"efer": guest.vcpu.get_sregs()["efer"] | EFER_SCE})
    guest.vcpu.set_msrs(
        {
            MSR_STAR: (0x20 << 48) | (0x08 << 32),
            MSR_LSTAR: guest.symbols["syscall_entry"],
            MSR_FMASK: fmask,
        }
    )
    return guest, user


def _assert_ordinary_user_fault_then_real_syscall(guest: Guest, user: dict[str, int]) -> None:
    lstar = guest.symbols["syscall_entry"]
    vector = run_until_exit(guest)
    regs = guest.vcpu.get_regs()
    assert vector == 14, f"the jump to LSTAR was taken for a SYSCALL: {vector}, {regs}"
    assert regs["rcx"] == lstar and regs["rdx"] == lstar
    assert regs["rbx"] & PF_USER and regs["rsi"] == USER_CS64
    assert regs["rdi"] & RFLAGS_IF  # the user's own RFLAGS, as a jump leaves them
    assert guest.vcpu.counters()["quirk_repairs"] == {}
    # The guest runs on: its handler returns to the user, whose real SYSCALL still works.
    guest.vm.write(guest.symbols["resume_at"], struct.pack("<Q", user["resume"]))
    guest.vcpu.set_msrs({MSR_FMASK: LINUX_FMASK})
    vector = run_until_exit(guest)
    regs = guest.vcpu.get_regs()
    assert vector == DONE_SYSCALL, (vector, regs)
    assert regs["r14"] == KERNEL_CS64 and regs["r12"] == user["after_syscall"]
    assert regs["r13"] & ~(RFLAGS_RF | 0xFF) == USER_FLAGS & ~0xFF  # R11: the user's RFLAGS
    # SDM Vol. 2B "SYSCALL": RFLAGS AND NOT FMASK (RF clear): IOPL 0, IF clear.
    assert regs["rbp"] == (regs["r13"] & ~(LINUX_FMASK | RFLAGS_RF)) | 2
    assert regs["rbp"] & (RFLAGS_IOPL | RFLAGS_IF) == 0
    quirk = guest.vm.host_quirks()["syscall_keeps_user_cs"]
    assert guest.vcpu.counters()["quirk_repairs"] == ({"syscall_keeps_user_cs": 1} if quirk else {})


HOSTILE_R11 = {
    "reserved-bits": (1 << 63) | (1 << 22) | (1 << 15) | (1 << 3) | USER_FLAGS,
    "vm": RFLAGS_VM | USER_FLAGS,
    "iopl3": RFLAGS_IOPL | USER_FLAGS,
}


@pytest.mark.parametrize("fmask", [LINUX_FMASK, 0], ids=["linux-fmask", "no-fmask"])
@pytest.mark.parametrize("r11", list(HOSTILE_R11.values()), ids=list(HOSTILE_R11))
def test_a_user_jump_to_lstar_with_hostile_r11_is_an_ordinary_fault(
    kvm: Kvm, r11: int, fmask: int
) -> None:
    """RCX points just past a real SYSCALL in the user's code: only the flags give the
    jump away. Before, the repair built the kernel's RFLAGS from this R11: reserved
    bits or VM stopped the VM at entry, IOPL 3 went back to the process."""
    guest, user = _fake_syscall_guest(kvm, r11=hex(r11), rcx="offset after_syscall", fmask=fmask)
    _assert_ordinary_user_fault_then_real_syscall(guest, user)


@pytest.mark.parametrize(
    "rcx",
    ["offset no_syscall_here", hex(UNMAPPED + 1), "{kernel_syscall_end}"],
    ids=["not-syscall-bytes", "unmapped", "supervisor-page"],
)
def test_a_user_jump_to_lstar_without_a_syscall_at_rcx_is_an_ordinary_fault(
    kvm: Kvm, rcx: str
) -> None:
    """R11 holds the user's own RFLAGS and FMASK is 0, so the flags match a SYSCALL's;
    RCX - 2 is not a SYSCALL the user could have executed."""
    guest, user = _fake_syscall_guest(kvm, r11="flags", rcx=rcx, fmask=0)
    _assert_ordinary_user_fault_then_real_syscall(guest, user)


def test_no_interrupt_lands_on_a_repaired_syscall_with_if_clear(kvm: Kvm) -> None:
    """A repair writes CS and SS back through the run page, whose interrupt_bitmap KVM
    never clears (docs/emulation.md, test_emulate_completion_interrupts.py): after one
    exit with an interrupt in flight, every later repair made KVM inject that vector
    again at LSTAR, at CPL 0 with IF clear and the user's RSP. The frame went onto the
    user stack, and with SMAP a Linux guest double-faulted there (the failure seen
    under --profile). The kernel here enables interrupts around a CLAC (an exit with
    the window open, for InterruptInFlightAtAnExit); the interrupt handler counts
    entries with IF clear and entries at LSTAR."""
    syscalls = 2000
    guest = make_guest(
        kvm,
        f"""
.global entry, page_fault, syscall_entry, timer, ticks, timer_with_if_clear, timer_at_lstar
entry:
    hlt
{PAGE_FAULT_HANDLER}syscall_entry:
    sti
    nop
    clac
    cli
    sysretq
timer:
    push rax
    test qword ptr [rsp + 24], 0x200
    jnz 1f
    inc qword ptr [rip + timer_with_if_clear]
1:  lea rax, [rip + syscall_entry]
    cmp [rsp + 8], rax
    jne 2f
    inc qword ptr [rip + timer_at_lstar]
2:  mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    inc qword ptr [rip + ticks]
    pop rax
    iretq
    .balign 8
ticks: .quad 0
timer_with_if_clear: .quad 0
timer_at_lstar: .quad 0
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
    mov r15d, {syscalls}
again:
    syscall
    dec r15d
    jnz again
trap:
    ud2
""",
    )
    data = user_segment(LINUX_USER_DS, code=False)
    guest.vcpu.set_sregs(
        {
            "cs": user_segment(LINUX_USER_CS, code=True),
            "ss": data,
            "ds": data,
            "es": data,
            "efer": guest.vcpu.get_sregs()["efer"] | EFER_SCE,
        }
    )
    guest.vcpu.set_regs({"rflags": USER_FLAGS})
    guest.vcpu.set_msrs(
        {
            MSR_STAR: (0x23 << 48) | (0x08 << 32),
            MSR_LSTAR: guest.symbols["syscall_entry"],
            MSR_FMASK: LINUX_FMASK,
        }
    )
    in_flight = InterruptInFlightAtAnExit(guest.vcpu, TIMER_VECTOR, after_exits=100)
    in_flight.install()
    vector = run_until_exit(guest)
    regs = guest.vcpu.get_regs()
    assert vector == 6 and regs["rdx"] == user["trap"], (vector, regs)

    def counter(name: str) -> int:
        value: int = struct.unpack("<Q", guest.vm.read(guest.symbols[name], 8))[0]
        return value

    assert in_flight.fired and guest.vcpu.counters()["exits"].get("intr") == 1
    assert (counter("timer_with_if_clear"), counter("timer_at_lstar")) == (0, 0)
    # The interrupt in flight, then the same vector as the PIC's ExtINT: nothing more.
    assert counter("ticks") == 2
    if guest.vm.host_quirks()["syscall_keeps_user_cs"]:
        assert guest.vcpu.counters()["quirk_repairs"]["syscall_keeps_user_cs"] == syscalls
