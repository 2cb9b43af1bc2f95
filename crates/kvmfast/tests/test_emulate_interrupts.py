"""Software interrupts and IRET completed in userspace: INT3, INT n, INTO through the
guest IDT (SDM Vol. 2A "INT n/INTO/INT3/INT1", Vol. 3A 6.12.1 and 6.14: gate checks,
TSS stack switch, IST, the frame), 32-bit IRET to the same and to an outer privilege
level (Vol. 2A "IRET/IRETD"), and the #GP of a gate whose DPL is below the CPL."""

from __future__ import annotations

import struct

import pytest
from emulation_support import (
    IST1_STACK,
    KERNEL_STACK,
    STACK_TOP,
    USER_STACK,
    Guest,
    completions,
    emulated_cpl0,
    enter_user_mode64,
    exception_handlers_asm,
    exceptions_raised,
    gate32,
    gate64,
    install_exception_handlers,
    make_guest,
    run_until_exit,
    setup_tss32,
    setup_tss64,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

RFLAGS_IF = 1 << 9
FRAME_READER_64 = """
    mov rdx, [rsp]
    mov rsi, [rsp + 8]
    mov rdi, [rsp + 16]
    mov r8, [rsp + 24]
    mov r9, [rsp + 32]
    mov r10, rsp
    pushfq
    pop r11
"""


def _skip_if_host_raised_ud(guest: Guest, vector: int, int_at: int) -> None:
    """This host's KVM runs guest user mode natively and raises #UD there for INT n
    itself (docs/emulation.md): the fallback never sees such an INT."""
    if vector == 6 and _regs(guest)["rdx"] == int_at:
        pytest.skip("this host raises #UD for a guest user-mode INT n before any exit")


def _regs(guest: Guest) -> dict[str, int]:
    regs: dict[str, int] = guest.vcpu.get_regs()
    return regs


@emulated_cpl0
def test_int3_delivers_through_the_idt_and_iretq_returns(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, after, handler
entry:
    int3
after:
    mov al, 0x33
    out 0xf4, al
handler:
{FRAME_READER_64}
    mov al, 3
    out 0xf4, al
    iretq
{exception_handlers_asm()}
""",
    )
    install_exception_handlers(guest, {3: gate64(guest.symbols["handler"])})
    guest.vcpu.set_regs({"rflags": 0x202 | 0x8C5})
    assert run_until_exit(guest) == 3
    regs = _regs(guest)
    # The frame: RIP past INT3, CS, RFLAGS, RSP, SS (SDM Vol. 3A Figure 6-9).
    assert regs["rdx"] == guest.symbols["after"]
    assert regs["rsi"] == 0x08 and regs["r9"] == 0x10
    assert regs["rdi"] == 0x202 | 0x8C5
    assert regs["r8"] == STACK_TOP
    assert regs["r10"] == (STACK_TOP & ~0xF) - 40
    assert regs["r11"] & RFLAGS_IF == 0  # an interrupt gate clears IF
    assert run_until_exit(guest) == 0x33
    assert _regs(guest)["rsp"] == STACK_TOP
    assert completions(guest) == {"int3": 1}


@emulated_cpl0
def test_int_n_through_a_trap_gate_on_the_ist_stack(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, after, handler
entry:
    int 0x41
after:
    out 0xf4, al
handler:
{FRAME_READER_64}
    mov al, 0x41
    out 0xf4, al
{exception_handlers_asm()}
""",
    )
    setup_tss64(guest)
    install_exception_handlers(guest, {0x41: gate64(guest.symbols["handler"], ist=1, trap=True)})
    guest.vcpu.set_regs({"rflags": 0x202})
    assert run_until_exit(guest) == 0x41
    regs = _regs(guest)
    assert regs["rdx"] == guest.symbols["after"]
    assert regs["r10"] == IST1_STACK - 40
    assert regs["r8"] == STACK_TOP  # the interrupted RSP
    assert regs["r11"] & RFLAGS_IF  # a trap gate leaves IF alone
    assert completions(guest) == {"int": 1}


def test_int_n_from_cpl3_switches_to_rsp0(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, handler
entry:
    hlt
handler:
{FRAME_READER_64}
    mov al, 0x80
    out 0xf4, al
{exception_handlers_asm()}
""",
    )
    setup_tss64(guest)
    install_exception_handlers(guest, {0x80: gate64(guest.symbols["handler"], dpl=3)})
    user = enter_user_mode64(guest, ".global user_entry, after\nuser_entry:\n int 0x80\nafter:\n")
    vector = run_until_exit(guest)
    _skip_if_host_raised_ud(guest, vector, user["user_entry"])
    assert vector == 0x80
    regs = _regs(guest)
    assert regs["rdx"] == user["after"]
    assert regs["rsi"] == 0x2B and regs["r9"] == 0x23
    assert regs["r8"] == USER_STACK
    assert regs["r10"] == KERNEL_STACK - 40
    sregs = guest.vcpu.get_sregs()
    assert sregs["cs"]["selector"] == 0x08 and sregs["ss"]["dpl"] == 0


@emulated_cpl0
def test_int_n_through_a_dpl0_gate_from_cpl3_is_gp(kvm: Kvm) -> None:
    """SDM Vol. 2A INT n: "#GP(error code) ... if the DPL of the gate is less than the
    CPL", error code vector*8 + 2 (IDT)."""
    guest = make_guest(kvm, f".global entry\nentry:\n hlt\n{exception_handlers_asm()}")
    setup_tss64(guest)
    install_exception_handlers(guest, {0x80: gate64(0x1000, dpl=0)})
    user = enter_user_mode64(guest, ".global user_entry\nuser_entry:\n int 0x80\n")
    vector = run_until_exit(guest)
    _skip_if_host_raised_ud(guest, vector, user["user_entry"])
    assert vector == 13
    regs = _regs(guest)
    assert regs["rbx"] == 0x80 * 8 + 2
    assert regs["rdx"] == user["user_entry"]
    assert exceptions_raised(guest) == {"#GP": 1}


@emulated_cpl0
def test_int_and_iret_in_32_bit_protected_mode(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, after, handler, user_entry, user_after, syscall_handler
entry:
    mov ebx, 0x1234
    int 0x30
after:
    mov al, 0x31
    out 0xf4, al
    push 0x23
    push {USER_STACK}
    push 0x3202
    push 0x1b
    push offset user_entry
    iretd
user_entry:
    mov al, 0x44
    out 0xf4, al
.global user_int
user_int:
    int 0x80
user_after:
handler:
    mov edx, [esp]
    mov esi, [esp + 4]
    mov edi, [esp + 8]
    mov ebp, esp
    mov al, 0x30
    out 0xf4, al
    iretd
syscall_handler:
    mov edx, [esp]
    mov esi, [esp + 4]
    mov edi, [esp + 12]
    mov ecx, [esp + 16]
    mov ebp, esp
    mov al, 0x80
    out 0xf4, al
{exception_handlers_asm(32)}
""",
        bits=32,
    )
    setup_tss32(guest)
    install_exception_handlers(
        guest,
        {
            0x30: gate32(guest.symbols["handler"]),
            0x80: gate32(guest.symbols["syscall_handler"], dpl=3),
        },
    )
    guest.vcpu.set_regs({"rflags": 0x202})
    assert run_until_exit(guest) == 0x30
    regs = _regs(guest)
    assert regs["rdx"] == guest.symbols["after"]
    assert regs["rsi"] == 0x08 and regs["rdi"] == 0x202
    assert regs["rbp"] == STACK_TOP - 12  # same privilege: EFLAGS, CS, EIP only
    # IRET back to the same level: EIP, CS, EFLAGS popped.
    assert run_until_exit(guest) == 0x31
    regs = _regs(guest)
    assert regs["rsp"] == STACK_TOP and regs["rbx"] == 0x1234
    assert regs["rflags"] & RFLAGS_IF
    # IRET to CPL 3: SS:ESP popped too.
    assert run_until_exit(guest) == 0x44
    sregs = guest.vcpu.get_sregs()
    assert sregs["cs"]["selector"] == 0x1B and sregs["ss"]["selector"] == 0x23
    assert sregs["ss"]["dpl"] == 3
    assert _regs(guest)["rsp"] == USER_STACK
    assert _regs(guest)["rflags"] & 0x3000 == 0x3000
    assert completions(guest) == {"int": 1, "iretd": 2}
    # INT 0x80 from CPL 3: the TSS's SS0:ESP0, and SS:ESP of the user in the frame.
    vector = run_until_exit(guest)
    _skip_if_host_raised_ud(guest, vector, guest.symbols["user_int"])
    assert vector == 0x80
    regs = _regs(guest)
    assert regs["rdx"] == guest.symbols["user_after"]
    assert regs["rsi"] == 0x1B
    assert regs["rdi"] == USER_STACK and regs["rcx"] == 0x23
    assert regs["rbp"] == KERNEL_STACK - 20
    assert guest.vcpu.get_sregs()["ss"]["selector"] == 0x10
    assert completions(guest) == {"int": 2, "iretd": 2}


@emulated_cpl0
@pytest.mark.parametrize("overflow", [True, False])
def test_into_interrupts_only_on_overflow(kvm: Kvm, overflow: bool) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, after, handler
entry:
    into
after:
    mov al, 0x99
    out 0xf4, al
handler:
    mov edx, [esp]
    mov al, 4
    out 0xf4, al
{exception_handlers_asm(32)}
""",
        bits=32,
    )
    install_exception_handlers(guest, {4: gate32(guest.symbols["handler"])})
    guest.vcpu.set_regs({"rflags": 0x2 | (0x800 if overflow else 0)})
    assert run_until_exit(guest) == (4 if overflow else 0x99)
    if overflow:
        assert _regs(guest)["rdx"] == guest.symbols["after"]
        assert completions(guest) == {"into": 1}
    # Without OF, INTO is a no-op that KVM's emulator may well complete itself.


@emulated_cpl0
def test_iretd_to_a_not_present_code_segment_is_np(kvm: Kvm) -> None:
    """IRET: "#NP(selector) If the return code segment is not present"."""
    guest = make_guest(
        kvm,
        f"""
.global entry, iret_at
entry:
    push 0x202
    push 0x30
    push 0x1000
iret_at:
    iretd
{exception_handlers_asm(32)}
""",
        bits=32,
    )
    setup_tss32(guest)
    gdt = bytearray(guest.vm.read(0x11000, 0x30))
    gdt += struct.pack("<Q", 0x00CF_1B00_0000_FFFF)  # code, DPL 0, not present
    guest.vm.write(0x11000, bytes(gdt))
    guest.vcpu.set_sregs({"gdt": {"base": 0x11000, "limit": len(gdt) - 1}})
    install_exception_handlers(guest, {11: gate32(guest.symbols["vector_13"])})
    assert run_until_exit(guest) == 13  # vector_13's code runs for gate 11 too
    regs = _regs(guest)
    assert regs["rbx"] == 0x30
    assert regs["rdx"] == guest.symbols["iret_at"]
    assert exceptions_raised(guest) == {"#NP": 1}
