"""POPCNT, LZCNT and TZCNT completed in userspace (SDM Vol. 2B "POPCNT", "LZCNT",
"TZCNT"): register and memory sources, 16/32/64-bit operands, 64- and 32-bit code,
each result and flag compared with the same body run natively on the host.

Some hosts' KVM runs LZCNT and TZCNT itself, as BSR and BSF, with no exit
(docs/emulation.md): the guest gets BSR's and BSF's results (LZCNT of 1 is 0, not 63).
A module probe finds which of the two this host runs so; their cases then assert what
the guest really gets there -- the native BSR/BSF result and no completion -- and
elsewhere kvmfast's completion. That completion's semantics are unit-tested in
bitcount.rs whatever the host."""

from __future__ import annotations

import random

import pytest
from emulation_support import (
    BUF_SIZE,
    CpuState,
    assert_same_results,
    completions,
    emulated_cpl0,
    run_in_guest,
    run_natively,
)

from kvmfast import Kvm
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

SOURCES = [
    0,
    1,
    0x8000_0000_0000_0000,
    0xF0F0,
    *(random.Random(8).getrandbits(64) for _ in range(3)),
]
WIDTHS = {16: ("ax", "bx", "word"), 32: ("eax", "ebx", "dword"), 64: ("rax", "rbx", "qword")}


# What the encoding F3 0F BD / F3 0F BC is without LZCNT / BMI1 (SDM Vol. 2A LZCNT).
SUBSTITUTES = {"lzcnt": "bsr", "tzcnt": "bsf"}


@pytest.fixture(scope="module")
def run_by_kvm_as_bsr_bsf() -> frozenset[str]:
    """The mnemonics this host's KVM runs itself as BSR/BSF: LZCNT of 1 giving 0 and
    TZCNT of 0 keeping its destination, with no exit to kvmfast."""
    require_kvm()
    kvm = Kvm()
    found = set()
    for mnemonic, source, bsr_bsf_result in (("lzcnt", 1, 0), ("tzcnt", 0, 0x5A5A)):
        state = CpuState().with_gprs(rax=0x5A5A, rbx=source)
        guest, vm_guest = run_in_guest(kvm, f"{mnemonic} rax, rbx", state)
        if not completions(vm_guest) and guest.gprs["rax"] == bsr_bsf_result:
            found.add(mnemonic)
    return frozenset(found)


def _as_the_guest_runs_it(body: str, mnemonic: str, run_by_kvm: frozenset[str]) -> str:
    """The body the host processor must run to give the guest's results."""
    if mnemonic in run_by_kvm:
        return body.replace(mnemonic, SUBSTITUTES[mnemonic])
    return body


def _expected_completions(mnemonic: str, count: int, run_by_kvm: frozenset[str]) -> dict[str, int]:
    return {} if mnemonic in run_by_kvm else {mnemonic: count}


def _flags(seed: int) -> int:
    # Status flags in, so that the ones the instruction leaves alone are seen kept.
    return 0x2 | (0x8D5 if seed % 2 else 0)


@emulated_cpl0
@pytest.mark.parametrize("mnemonic", ["popcnt", "lzcnt", "tzcnt"])
@pytest.mark.parametrize("width", [16, 32, 64])
@pytest.mark.parametrize("source", ["register", "memory"])
def test_bit_count_matches_the_host(
    kvm: Kvm, run_by_kvm_as_bsr_bsf: frozenset[str], mnemonic: str, width: int, source: str
) -> None:
    destination, register, size = WIDTHS[width]
    if source == "register":
        body = f"{mnemonic} {destination}, {register}"
    else:
        body = f"lea rsi, [rip + buf + 8]\n{mnemonic} {destination}, {size} ptr [rsi]"
    for index, value in enumerate(SOURCES[:4] if source == "memory" else SOURCES):
        state = CpuState(
            rflags=_flags(index),
            buf=(bytes(8) + value.to_bytes(8, "little")).ljust(BUF_SIZE, b"\0"),
        ).with_gprs(rax=0x1111_2222_3333_4444, rbx=value)
        guest, vm_guest = run_in_guest(kvm, body, state)
        native = run_natively(_as_the_guest_runs_it(body, mnemonic, run_by_kvm_as_bsr_bsf), state)
        assert_same_results(guest, native, ignore=frozenset({"rsi"}))
        assert completions(vm_guest) == _expected_completions(mnemonic, 1, run_by_kvm_as_bsr_bsf)


@emulated_cpl0
@pytest.mark.parametrize("mnemonic", ["popcnt", "lzcnt", "tzcnt"])
def test_bit_count_in_32_bit_code(
    kvm: Kvm, run_by_kvm_as_bsr_bsf: frozenset[str], mnemonic: str
) -> None:
    body = f"mov esi, offset buf\n{mnemonic} eax, ebx\n{mnemonic} ecx, dword ptr [esi + 4]"
    state = CpuState(
        buf=(bytes(4) + (0x00F0_0100).to_bytes(4, "little")).ljust(BUF_SIZE, b"\0")
    ).with_gprs(rax=0x1234, rbx=0x8000_0001, rcx=0xFFFF)
    guest, vm_guest = run_in_guest(kvm, body, state, bits=32)
    native = run_natively(_as_the_guest_runs_it(body, mnemonic, run_by_kvm_as_bsr_bsf), state)
    assert_same_results(guest, native, ignore=frozenset({"rsi"}))
    assert completions(vm_guest) == _expected_completions(mnemonic, 2, run_by_kvm_as_bsr_bsf)


def test_operand_crossing_a_page(kvm: Kvm) -> None:
    """buf + 60 .. buf + 67 spans two pages (SDM Vol. 3A 4.10: each page translated)."""
    body = "lea rsi, [rip + buf + 60]\npopcnt rax, qword ptr [rsi]"
    buf = (bytes(60) + (0x0123_4567_89AB_CDEF).to_bytes(8, "little")).ljust(BUF_SIZE, b"\0")
    state = CpuState(buf=buf)
    guest, _ = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state), ignore=frozenset({"rsi"}))
