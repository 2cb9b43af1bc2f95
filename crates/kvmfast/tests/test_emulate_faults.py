"""Completions that change flags or raise exceptions: CLAC/STAC (SDM Vol. 2A, #UD at
CPL > 0), FWAIT (#NM with CR0.MP+TS, #MF with an unmasked pending x87 exception),
#PF for an operand on a not-present page (Vol. 3A 4.7: CR2 and the error code, also
for an operand that crosses into such a page), and the report of an instruction that
nobody can complete."""

from __future__ import annotations

import os
import resource
import struct
from pathlib import Path

import pytest
from emulation_support import (
    XSAVE_XSTATE_BV,
    CpuState,
    Guest,
    completions,
    emulated_cpl0,
    enter_user_mode64,
    exception_handlers_asm,
    exceptions_raised,
    install_exception_handlers,
    make_guest,
    run_until_exit,
    setup_tss64,
    split_second_2m_page,
)

from kvmfast import EmulationFailure, Kvm, NullSink

pytestmark = pytest.mark.kvm

RFLAGS_AC = 1 << 18
MMIO_BASE = 0x1000_0000


def _regs(guest: Guest) -> dict[str, int]:
    regs: dict[str, int] = guest.vcpu.get_regs()
    return regs


@emulated_cpl0
@pytest.mark.parametrize(("mnemonic", "before"), [("clac", 0x2 | RFLAGS_AC | 0x8D5), ("stac", 0x2)])
def test_clac_stac_change_only_ac(kvm: Kvm, mnemonic: str, before: int) -> None:
    state = CpuState(rflags=before & 0xFFF)
    guest = make_guest(kvm, f".global entry\nentry:\n {mnemonic}\n out 0xf4, al\n")
    guest.vcpu.set_regs({"rflags": before, **{k: v for k, v in state.gprs.items() if k != "rsp"}})
    run_until_exit(guest)
    expected = before & ~RFLAGS_AC if mnemonic == "clac" else before | RFLAGS_AC
    assert _regs(guest)["rflags"] == expected
    assert _regs(guest)["rip"] == guest.symbols["entry"] + 5  # 3 bytes + the OUT
    assert completions(guest) == {mnemonic: 1}


def test_clac_at_cpl3_is_ud(kvm: Kvm) -> None:
    guest = make_guest(kvm, f".global entry\nentry:\n hlt\n{exception_handlers_asm()}")
    setup_tss64(guest)
    install_exception_handlers(guest)
    user = enter_user_mode64(guest, ".global user_entry\nuser_entry:\n clac\n")
    assert run_until_exit(guest) == 6
    assert _regs(guest)["rdx"] == user["user_entry"]


@emulated_cpl0
def test_operand_on_a_not_present_page_is_pf(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, load
entry:
    mov rsi, 0x205010
load:
    popcnt rax, [rsi]
{exception_handlers_asm()}
""",
    )
    split_second_2m_page(guest, not_present=(0x205000,))
    install_exception_handlers(guest)
    assert run_until_exit(guest) == 14
    regs = _regs(guest)
    assert regs["rcx"] == 0x205010  # CR2: the linear address
    assert regs["rbx"] == 0  # not present, read, supervisor
    assert regs["rdx"] == guest.symbols["load"]  # a fault: RIP on the instruction
    assert exceptions_raised(guest) == {"#PF": 1}
    assert completions(guest) == {}


def test_operand_crossing_into_a_not_present_page_is_pf_on_that_page(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, load
entry:
    mov rsi, 0x204ffc
load:
    popcnt rax, [rsi]
{exception_handlers_asm()}
""",
    )
    split_second_2m_page(guest, not_present=(0x205000,))
    install_exception_handlers(guest)
    guest.vcpu.set_regs({"rax": 0x77})
    assert run_until_exit(guest) == 14
    regs = _regs(guest)
    assert regs["rcx"] == 0x205000
    assert regs["rbx"] == 0
    assert regs["rdx"] == guest.symbols["load"]


def _set_x87_status(guest: Guest, *, fcw: int, fsw: int) -> None:
    area = bytearray(guest.vcpu.get_xsave())
    struct.pack_into("<HH", area, 0, fcw, fsw)
    bv = struct.unpack_from("<Q", area, XSAVE_XSTATE_BV)[0]
    struct.pack_into("<Q", area, XSAVE_XSTATE_BV, bv | 1)
    guest.vcpu.set_xsave(bytes(area))


FWAIT_GUEST = f"""
.global entry, wait_at
entry:
wait_at:
    fwait
    mov al, 0x77
    out 0xf4, al
{exception_handlers_asm()}
"""


@emulated_cpl0
def test_fwait_without_pending_exception_completes(kvm: Kvm) -> None:
    guest = make_guest(kvm, FWAIT_GUEST)
    install_exception_handlers(guest)
    _set_x87_status(guest, fcw=0x37F, fsw=0x0001)  # IE raised but masked
    assert run_until_exit(guest) == 0x77
    assert completions(guest) == {"wait": 1}


@emulated_cpl0
def test_fwait_with_unmasked_pending_exception_is_mf(kvm: Kvm) -> None:
    guest = make_guest(kvm, FWAIT_GUEST)
    install_exception_handlers(guest)
    _set_x87_status(guest, fcw=0x37E, fsw=0x0081)  # IE unmasked, ES set
    assert run_until_exit(guest) == 16
    assert _regs(guest)["rdx"] == guest.symbols["wait_at"]
    assert exceptions_raised(guest) == {"#MF": 1}


@emulated_cpl0
def test_fwait_with_mp_and_ts_is_nm(kvm: Kvm) -> None:
    guest = make_guest(kvm, FWAIT_GUEST)
    install_exception_handlers(guest)
    guest.vcpu.set_sregs({"cr0": guest.vcpu.get_sregs()["cr0"] | 0xA})  # MP | TS
    assert run_until_exit(guest) == 7
    assert exceptions_raised(guest) == {"#NM": 1}


def test_unknown_instruction_ends_the_run_with_a_precise_report(kvm: Kvm, tmp_path: Path) -> None:
    guest = make_guest(
        kvm,
        f"""
.global entry, bad
entry:
    mov rbx, {MMIO_BASE:#x}
    nop
bad:
    crc32 eax, dword ptr [rbx]
""",
    )
    # The MMIO operand makes any KVM emulate it; neither KVM nor kvmfast has CRC32.
    guest.vm.add_mmio(MMIO_BASE, 0x1000, NullSink())
    system_map = tmp_path / "System.map"
    system_map.write_text(
        "".join(f"{address:016x} T {name}\n" for name, address in guest.symbols.items())
    )
    assert guest.vm.load_symbols(system_map) == len(set(guest.symbols.values()))
    with pytest.raises(EmulationFailure) as raised:
        guest.vcpu.run()
    failure = raised.value
    bad = guest.symbols["bad"]
    assert failure.rip == bad
    assert failure.instruction == "crc32 eax,dword ptr [rbx]"
    assert failure.instruction_bytes == bytes.fromhex("f20f38f103")
    assert failure.cpl == 0
    assert failure.symbol is not None and failure.symbol.startswith("bad+0x0/")
    message = str(failure)
    for text in (f"{bad:#x}", "crc32 eax,dword ptr [rbx]", "f2 0f 38 f1 03", "CPL 0", "<bad+0x0/"):
        assert text in message
    assert f"RBX={MMIO_BASE:016x}" in message


@emulated_cpl0
def test_many_completions_counted_exactly_without_growth(kvm: Kvm) -> None:
    """10^5 CLACs: the counter is exact, and neither file descriptors nor resident
    memory grow with the number of completions."""
    loop = ".global entry\nentry:\n mov ecx, {n}\n1: clac\n dec ecx\n jnz 1b\n out 0xf4, al\n"

    def run(n: int) -> Guest:
        state_guest = make_guest(kvm, loop.format(n=n))
        run_until_exit(state_guest)
        assert completions(state_guest) == {"clac": n}
        return state_guest

    run(1000)
    fds_before = len(os.listdir("/proc/self/fd"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    guest = run(100_000)
    assert guest.vm.counters()["completions"] == {"clac": 100_000}
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 8  # this VM's own fds
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 16 * 1024


@emulated_cpl0
def test_fallback_off_stops_at_the_first_failure(kvm: Kvm) -> None:
    state = CpuState()
    guest = make_guest(kvm, ".global entry\nentry:\n clac\n out 0xf4, al\n")
    guest.vcpu.emulation_fallback = False
    with pytest.raises(EmulationFailure) as raised:
        guest.vcpu.run()
    assert raised.value.instruction == "clac"
    assert raised.value.rip == guest.symbols["entry"]
    assert completions(guest) == {}
    guest.vcpu.emulation_fallback = True
    assert run_until_exit(guest) == state.gprs["rax"] & 0xFF
    assert completions(guest) == {"clac": 1}


def test_vm_default_applies_to_new_vcpus(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    assert vm.emulation_fallback
    vm.emulation_fallback = False
    assert not vm.create_vcpu(0).emulation_fallback


def test_memory_operand_on_a_python_mmio_device(kvm: Kvm) -> None:
    """An operand outside RAM is read from the device that owns the address, as the
    bus would deliver it (one 8-byte read at the device's offset)."""
    reads: list[tuple[int, int]] = []

    class Register:
        def read(self, offset: int, size: int) -> int:
            reads.append((offset, size))
            return 0xF0F0_0000_0000_F0F1

        def write(self, offset: int, size: int, value: int) -> None:
            raise AssertionError("POPCNT does not write its source")

    source = f"mov rbx, {MMIO_BASE + 0x18:#x}\n popcnt rax, [rbx]\n out 0xf4, al\n"
    guest = make_guest(kvm, ".global entry\nentry:\n " + source)
    guest.vm.add_mmio(MMIO_BASE, 0x1000, Register())
    run_until_exit(guest)
    assert _regs(guest)["rax"] == bin(0xF0F0_0000_0000_F0F1).count("1")
    assert reads == [(0x18, 8)]
    assert completions(guest) == {"popcnt": 1}
