"""SSE..SSE4.1 computations completed by running them on the host against the guest's
vector state (SDM Vol. 1 chapters 10-12 and the instruction pages): register and memory
operands, 64- and 32-bit code, flags from (U)COMISS and PTEST, #GP for a misaligned
16-byte operand, #XM for an unmasked floating-point exception; every result compared
with the same body run natively on the host."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from emulation_support import (
    BUF_SIZE,
    PAGE_TABLE_AT,
    XSAVE_MXCSR,
    CpuState,
    Guest,
    assert_same_results,
    completions,
    emulated_cpl0,
    exception_handlers_asm,
    exceptions_raised,
    gate64,
    install_exception_handlers,
    install_gates,
    make_guest,
    run_in_guest,
    run_natively,
    run_until_exit,
    split_second_2m_page,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

RNG = random.Random(2024)


def _floats(*values: float) -> bytes:
    return struct.pack("<4f", *values)


def _state() -> CpuState:
    gprs = {name: RNG.getrandbits(64) for name in ("rax", "rbx", "rcx", "rdx", "r9")}
    xmm = [RNG.randbytes(16) for _ in range(16)]
    xmm[4] = _floats(1.5, -2.25, 3.0e10, 0.125)
    xmm[5] = _floats(4.0, 0.5, -1.0, 9.0)
    buf = bytearray(RNG.randbytes(BUF_SIZE))
    buf[32:48] = _floats(2.0, 8.0, 0.25, -16.0)
    return CpuState(xmm=xmm, buf=bytes(buf), rflags=0x2 | 0x8D5).with_gprs(**gprs)


INSTRUCTIONS = [
    "paddd xmm0, xmm1",
    "pxor xmm2, xmm3",
    "pshufb xmm0, xmm7",
    "pshufd xmm1, xmm2, 0x93",
    "psrld xmm3, 7",
    "pslld xmm3, 25",
    "por xmm8, xmm15",
    "palignr xmm9, xmm10, 4",
    "punpcklqdq xmm11, xmm12",
    "pshuflw xmm13, xmm14, 0xb1",
    "addps xmm4, xmm5",
    "mulpd xmm4, xmm5",
    "sqrtps xmm6, xmm4",
    "haddps xmm4, xmm5",
    "pmulld xmm0, xmm1",
    "pminud xmm2, xmm3",
    "paddd xmm0, xmmword ptr [rsi]",
    "pshufb xmm1, xmmword ptr [rsi + 16]",
    "addps xmm4, xmmword ptr [rsi + 32]",
    "movdqu xmm2, xmmword ptr [rsi + 57]",
    "movdqa xmmword ptr [rsi + 64], xmm3",
    "movq xmm5, qword ptr [rsi + 8]",
    "movss dword ptr [rsi + 100], xmm4",
    "aesenc xmm0, xmm1",
    "aesdeclast xmm2, xmmword ptr [rsi + 16]",
    "pclmulqdq xmm3, xmm4, 0x11",
    "vmovdqu xmm0, xmmword ptr [rsi + 3]",
    "vpaddd xmm0, xmm1, xmm2",
    "vpshufb xmm1, xmm2, xmmword ptr [rsi + 16]",
    "vpxor ymm3, ymm4, ymm5\nvmovdqu ymmword ptr [rsi + 64], ymm3",
    "vpaddq ymm6, ymm7, ymmword ptr [rsi + 96]\nvmovdqu ymmword ptr [rsi + 160], ymm6",
    "vaesenc xmm0, xmm1, xmm2",
    "vzeroupper",
    "vmovd xmm5, ecx",
    "pmovmskb eax, xmm1",
    "pextrw edx, xmm2, 3",
    "cvtsi2sd xmm4, rbx",
    "cvttsd2si rax, xmm5",
    "movq rax, xmm3",
    "pinsrd xmm0, ebx, 2",
    "vpextrq rcx, xmm2, 1",
    "vpinsrd xmm7, xmm6, r9d, 3",
    "vmovdqa ymm8, ymmword ptr [rsi + 64]\nvmovdqa ymmword ptr [rsi + 128], ymm8",
]

AVX512 = [
    "vpaddd zmm0, zmm1, zmm2\nvmovdqu64 zmmword ptr [rsi + 128], zmm0",
    "vpermi2d ymm8, ymm6, ymm7\nvmovdqu ymmword ptr [rsi + 64], ymm8",
    "vprord xmm1, xmm2, 7",
    "vpxorq zmm17, zmm17, zmm17\nvpaddq zmm17, zmm17, zmm1\n"
    "vmovdqu64 zmmword ptr [rsi + 192], zmm17",
    "mov eax, 0x5555\nkmovw k1, eax\nvpaddd zmm3{k1}{z}, zmm4, zmm5\n"
    "vmovdqu64 zmmword ptr [rsi + 256], zmm3\nkmovw ebx, k1",
    "vmovdqu32 zmm9, zmmword ptr [rsi + 4]\nvmovdqu32 zmmword ptr [rsi + 320], zmm9",
]


def _host_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)


@pytest.mark.parametrize("instruction", INSTRUCTIONS + AVX512)
def test_sse_matches_the_host(kvm: Kvm, instruction: str) -> None:
    if instruction in AVX512 and not _host_has("avx512vl"):
        pytest.skip("the host processor has no AVX-512 to compare with")
    body = f"lea rsi, [rip + buf]\n{instruction}"
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state), ignore=frozenset({"rsi"}))
    expected = Counter(line.split()[0] for line in instruction.splitlines())
    # KVM's emulator moves some registers itself (MOVDQU/MOVDQA/MOVQ on this host).
    done = completions(vm_guest)
    assert all(done[mnemonic] in (0, expected[mnemonic]) for mnemonic in done), done
    assert set(done) <= set(expected), done


@emulated_cpl0
@pytest.mark.parametrize(
    "instruction", ["ucomiss xmm4, xmm5", "comisd xmm5, xmm4", "ptest xmm0, xmm1"]
)
def test_sse_flags_match_the_host(kvm: Kvm, instruction: str) -> None:
    body = instruction
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state))
    assert completions(vm_guest) == {instruction.split()[0]: 1}


@emulated_cpl0
def test_sse_round_of_blake2s_shape(kvm: Kvm) -> None:
    """The shape of blake2s_compress_ssse3's G function: add, xor, rotate by PSHUFB and
    by shift pairs, shuffle, all on registers and one message load."""
    body = """
    lea rsi, [rip + buf]
    paddd xmm0, xmmword ptr [rsi]
    paddd xmm0, xmm1
    pxor xmm3, xmm0
    pshufb xmm3, xmm7
    paddd xmm2, xmm3
    pxor xmm1, xmm2
    movdqa xmm8, xmm1
    psrld xmm1, 12
    pslld xmm8, 20
    por xmm1, xmm8
    pshufd xmm0, xmm0, 0x93
    pshufd xmm3, xmm3, 0x4e
    pshufd xmm2, xmm2, 0x39
    """
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state), ignore=frozenset({"rsi"}))
    assert sum(completions(vm_guest).values()) >= 11


@emulated_cpl0
def test_sse_in_32_bit_code(kvm: Kvm) -> None:
    body = "mov esi, offset buf\npaddd xmm0, xmm1\npshufb xmm2, xmmword ptr [esi + 16]"
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state, bits=32)
    assert_same_results(guest, run_natively(body, state), ignore=frozenset({"rsi", "xmm"}))
    for n in range(8):  # 32-bit code has XMM0-7
        assert guest.xmm[n] == run_natively(body, state).xmm[n]
    assert completions(vm_guest) == {"paddd": 1, "pshufb": 1}


def _fault_guest(kvm: Kvm, instruction: str) -> tuple[int, dict[str, int], dict[str, int]]:
    guest = make_guest(
        kvm,
        f".global entry, at\nentry:\n lea rsi, [rip + buf]\nat:\n {instruction}\n"
        f"{exception_handlers_asm()}",
    )
    install_exception_handlers(guest)
    return run_until_exit(guest), guest.vcpu.get_regs(), guest.symbols


def test_misaligned_16_byte_operand_is_gp(kvm: Kvm) -> None:
    vector, regs, symbols = _fault_guest(kvm, "paddd xmm0, xmmword ptr [rsi + 8]")
    assert vector == 13
    assert regs["rdx"] == symbols["at"]


@emulated_cpl0
def test_unmasked_division_by_zero_is_xm_and_changes_no_register(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        f".global entry, at\nentry:\nat:\n divps xmm4, xmm5\n out 0xf4, al\n"
        f"{exception_handlers_asm()}\n.global vector_19\nvector_19:\n"
        " pop rdx\n mov al, 19\n out 0xf4, al\n",
    )
    gates = {v: gate64(guest.symbols[f"vector_{v}"]) for v in (6, 7, 13, 14, 19)}
    install_gates(guest, gates)
    area = bytearray(guest.vcpu.get_xsave())
    struct.pack_into("<I", area, XSAVE_MXCSR, 0x1F80 & ~0x200)  # ZM clear
    area[160 + 64 : 160 + 96] = _floats(1.0, 2.0, 3.0, 4.0) + _floats(1.0, 0.0, 1.0, 1.0)
    struct.pack_into("<Q", area, 512, struct.unpack_from("<Q", area, 512)[0] | 3)
    guest.vcpu.set_xsave(bytes(area))
    assert run_until_exit(guest) == 19
    after = guest.vcpu.get_xsave()
    assert after[160 + 64 : 160 + 80] == _floats(1.0, 2.0, 3.0, 4.0)
    assert struct.unpack_from("<I", after, XSAVE_MXCSR)[0] & 0x4  # ZE raised
    assert guest.vcpu.get_regs()["rdx"] == guest.symbols["at"]
    assert exceptions_raised(guest) == {"#XM": 1}


def _internal_error_exits(guest: Guest) -> int:
    return int(guest.vcpu.counters()["exits"].get("internal_error", 0))


@emulated_cpl0
def test_a_run_of_vector_instructions_is_completed_on_one_exit(kvm: Kvm) -> None:
    """Straight vector code (the blake2s shape) costs one exit and one KVM_GET/SET_XSAVE
    pair for the run, not per instruction; each instruction is still counted."""
    body = "\n".join(["paddd xmm0, xmm1", "pxor xmm2, xmm0", "pshufd xmm3, xmm2, 0x39"] * 5)
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state))
    assert completions(vm_guest) == {"paddd": 5, "pxor": 5, "pshufd": 5}
    assert _internal_error_exits(vm_guest) == 1


@emulated_cpl0
def test_a_run_stops_at_the_first_non_vector_instruction(kvm: Kvm) -> None:
    body = "paddd xmm0, xmm1\npaddd xmm0, xmm1\nadd rax, rbx\npxor xmm2, xmm0\npxor xmm2, xmm0"
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state))
    assert completions(vm_guest) == {"paddd": 2, "pxor": 2}
    assert _internal_error_exits(vm_guest) == 2


@emulated_cpl0
def test_a_run_is_at_most_max_run_long(kvm: Kvm) -> None:
    body = "\n".join(["paddd xmm0, xmm1"] * 100)
    state = _state()
    guest, vm_guest = run_in_guest(kvm, body, state)
    assert_same_results(guest, run_natively(body, state))
    assert completions(vm_guest) == {"paddd": 100}
    assert _internal_error_exits(vm_guest) == 2  # 64 + 36


@emulated_cpl0
def test_a_follower_that_faults_is_left_for_its_own_exit(kvm: Kvm) -> None:
    """The instructions before it are complete; it raises #GP at its own RIP, as the
    processor would, with the state the earlier ones left."""
    guest = make_guest(
        kvm,
        ".global entry, at\nentry:\n lea rsi, [rip + buf]\n paddd xmm0, xmm1\n"
        " pxor xmm2, xmm2\nat:\n paddd xmm0, xmmword ptr [rsi + 8]\n"
        f"{exception_handlers_asm()}",
    )
    install_exception_handlers(guest)
    assert run_until_exit(guest) == 13
    assert guest.vcpu.get_regs()["rdx"] == guest.symbols["at"]
    assert completions(guest) == {"paddd": 1, "pxor": 1}
    assert guest.vcpu.get_xsave()[160 + 32 : 160 + 48] == bytes(16)  # pxor's zero
    assert exceptions_raised(guest) == {"#GP": 1}


# ---- memory operands: only the bytes the instruction reads or writes ------------------

MMIO_BASE = 0x1000_0000
PAGE_NOT_PRESENT = 0x205000
PAGE_READ_ONLY = 0x206000
CR0_WP = 1 << 16


class _RecordingRegisters:
    """An MMIO device whose reads are side effects the test can see."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


ZMM0_ELEMENTS = [0x11111111 * (n + 1) & 0xFFFF_FFFF for n in range(16)]
# ZMM0 loaded from buf (a completed EVEX load) before the store under test.
LOAD_ZMM0 = "lea rdi, [rip + buf]\n vmovdqu64 zmm0, zmmword ptr [rdi]"


def _load_zmm0(guest: Guest) -> list[int]:
    guest.vm.write(
        guest.symbols["buf"], b"".join(value.to_bytes(4, "little") for value in ZMM0_ELEMENTS)
    )
    return ZMM0_ELEMENTS


def _store_to_device(kvm: Kvm, store: str, mask: int) -> tuple[_RecordingRegisters, list[int]]:
    guest = make_guest(
        kvm,
        f".global entry\nentry:\n {LOAD_ZMM0}\n mov rbx, {MMIO_BASE:#x}\n"
        f" mov eax, {mask:#x}\n kmovw k1, eax\n {store}\n out 0xf4, al\n",
    )
    device = _RecordingRegisters()
    guest.vm.add_mmio(MMIO_BASE, 0x1000, device)
    elements = _load_zmm0(guest)
    run_until_exit(guest)
    assert completions(guest)[store.split()[0]] >= 1
    return device, elements


def _requires_avx512() -> None:
    # kvmfast's ZMM stubs move opmasks with KMOVQ (AVX512BW).
    if not (_host_has("avx512f") and _host_has("avx512bw")):
        pytest.skip("the host processor has no AVX-512F and BW")


def test_a_masked_store_writes_only_the_selected_elements_and_reads_nothing(kvm: Kvm) -> None:
    """SDM Vol. 2C VMOVDQU32: "elements ... not updated" where the mask bit is 0; the
    device sees the two selected dwords and no read."""
    _requires_avx512()
    device, elements = _store_to_device(kvm, "vmovdqu32 zmmword ptr [rbx]{k1}, zmm0", 0b0101)
    assert device.reads == []
    assert device.writes == [(0, 4, elements[0]), (8, 4, elements[2])]


def test_an_unmasked_store_is_written_whole_and_never_read(kvm: Kvm) -> None:
    _requires_avx512()
    device, elements = _store_to_device(kvm, "vmovdqu64 zmmword ptr [rbx], zmm0", 0)
    assert device.reads == []
    expected = [(8 * n, 8, elements[2 * n] | elements[2 * n + 1] << 32) for n in range(8)]
    assert device.writes == expected


def test_a_compress_store_writes_only_as_many_elements_as_selected(kvm: Kvm) -> None:
    """SDM Vol. 2C VPCOMPRESSD: the selected elements stored contiguously, "the
    upper elements ... are not written" in memory."""
    _requires_avx512()
    device, elements = _store_to_device(kvm, "vpcompressd zmmword ptr [rbx]{k1}, zmm0", 0b1010)
    assert device.reads == []
    assert device.writes == [(0, 8, elements[1] | elements[3] << 32)]


def test_a_masked_load_reads_only_the_selected_elements(kvm: Kvm) -> None:
    _requires_avx512()
    guest = make_guest(
        kvm,
        f".global entry\nentry:\n mov rbx, {MMIO_BASE:#x}\n mov eax, 0b0101\n"
        " kmovw k1, eax\n vmovdqu32 zmm1{k1}{z}, zmmword ptr [rbx]\n out 0xf4, al\n",
    )
    device = _RecordingRegisters()
    guest.vm.add_mmio(MMIO_BASE, 0x1000, device)
    run_until_exit(guest)
    assert device.reads == [(0, 4), (8, 4)]
    assert device.writes == []
    assert completions(guest)["vmovdqu32"] == 1


def _fault_on_pages(kvm: Kvm, body: str, *, read_only: bool = False) -> Guest:
    guest = make_guest(
        kvm, f".global entry, at\nentry:\n{body}\nat:\n out 0xf4, al\n{exception_handlers_asm()}"
    )
    split_second_2m_page(guest, not_present=(PAGE_NOT_PRESENT,))
    if read_only:
        # Present, not writable; CR0.WP makes that hold at CPL 0 (SDM Vol. 3A 4.6.1).
        guest.vm.write(PAGE_TABLE_AT + 8 * 6, struct.pack("<Q", PAGE_READ_ONLY | 0x1))
        guest.vcpu.set_sregs({"cr0": guest.vcpu.get_sregs()["cr0"] | CR0_WP})
    install_exception_handlers(guest)
    return guest


@pytest.mark.parametrize(
    ("address", "error_code"), [(PAGE_NOT_PRESENT + 8, 0x2), (PAGE_READ_ONLY + 8, 0x3)]
)
@emulated_cpl0
def test_a_store_only_operand_faults_as_a_write(kvm: Kvm, address: int, error_code: int) -> None:
    """#PF error code bit 1 (W/R) set for a store (SDM Vol. 3A 4.7), whether the page is
    not present or read-only: the operand is never read first."""
    guest = _fault_on_pages(
        kvm,
        f" mov rsi, {address:#x}\n mov rbx, 0x5555\n pextrd dword ptr [rsi], xmm0, 1",
        read_only=address >= PAGE_READ_ONLY,
    )
    assert run_until_exit(guest) == 14
    regs = guest.vcpu.get_regs()
    assert (regs["rbx"], regs["rcx"]) == (error_code, address)
    assert exceptions_raised(guest) == {"#PF": 1}


@emulated_cpl0
def test_masked_off_elements_on_a_not_present_page_do_not_fault(kvm: Kvm) -> None:
    """Memory fault suppression (SDM Vol. 1 15.6.2): a masked store whose masked-off
    elements lie on a not-present page stores the others and raises nothing."""
    _requires_avx512()
    start = PAGE_NOT_PRESENT - 32
    guest = _fault_on_pages(
        kvm,
        f" {LOAD_ZMM0}\n mov rsi, {start:#x}\n mov eax, 0xff\n kmovw k1, eax\n"
        " vmovdqu32 zmmword ptr [rsi]{k1}, zmm0",
    )
    elements = _load_zmm0(guest)
    guest.vm.write(start - 4, b"\xaa" * 36)
    assert run_until_exit(guest) == 0xFF  # AL from the body, not a handler's vector
    stored = b"".join(value.to_bytes(4, "little") for value in elements[:8])
    assert guest.vm.read(start - 4, 36) == b"\xaa" * 4 + stored
    assert exceptions_raised(guest) == {}
