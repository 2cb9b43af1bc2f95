"""x87/SSE/AVX state instructions completed over KVM_GET/SET_XSAVE: LDMXCSR/STMXCSR
(SDM Vol. 2A, #GP for reserved MXCSR bits), FXSAVE/FXRSTOR in both forms (Vol. 1
10.5.1, #GP for a misaligned operand), the XSAVE family in the standard and the
compacted format (Vol. 1 13.7-13.12) and XGETBV/XSETBV, compared with the host where
the host can run the same body."""

from __future__ import annotations

import random
import struct
from dataclasses import replace

import pytest
from emulation_support import (
    BUF_SIZE,
    XSAVE_XSTATE_BV,
    CpuState,
    Guest,
    assert_same_results,
    completions,
    emulated_cpl0,
    exception_handlers_asm,
    exceptions_raised,
    install_exception_handlers,
    load_state,
    make_guest,
    read_state,
    run_in_guest,
    run_natively,
    run_until_exit,
)

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

RNG = random.Random(13)
XMM = [RNG.randbytes(16) for _ in range(16)]


def _state(buf: bytes = b"", **gprs: int) -> CpuState:
    return CpuState(xmm=list(XMM), mxcsr=0x1F80, buf=buf.ljust(BUF_SIZE, b"\0")).with_gprs(**gprs)


def _compare(kvm: Kvm, body: str, state: CpuState, *, bits: int = 64) -> Guest:
    guest, vm_guest = run_in_guest(kvm, body, state, bits=bits)
    assert_same_results(guest, run_natively(body, state), ignore=frozenset({"rsi"}))
    return vm_guest


@emulated_cpl0
def test_ldmxcsr_and_stmxcsr(kvm: Kvm) -> None:
    body = "lea rsi, [rip + buf]\nldmxcsr [rsi]\nstmxcsr [rsi + 68]"
    guest = _compare(kvm, body, _state(struct.pack("<I", 0x7F80 | 0x6000 | 0x3F)))
    assert completions(guest) == {"ldmxcsr": 1, "stmxcsr": 1}


def _fault_guest(kvm: Kvm, body: str) -> Guest:
    source = f".global entry, at\nentry:\n lea rsi, [rip + buf]\nat:\n{body}\n"
    guest = make_guest(kvm, source + exception_handlers_asm())
    install_exception_handlers(guest)
    return guest


@emulated_cpl0
def test_ldmxcsr_reserved_bits_are_gp(kvm: Kvm) -> None:
    guest = _fault_guest(kvm, "ldmxcsr [rsi]")
    guest.vm.write(guest.symbols["buf"], struct.pack("<I", 0xFFFF_0000))
    assert run_until_exit(guest) == 13
    assert guest.vcpu.get_regs()["rbx"] == 0
    assert guest.vcpu.get_regs()["rdx"] == guest.symbols["at"]
    assert exceptions_raised(guest) == {"#GP": 1}


# FXSAVE/FXRSTOR on RAM: this host's KVM emulator runs them itself (docs/emulation.md),
# so these compare what the guest gets, whoever ran it. An operand on an MMIO device
# makes any KVM give up (its emulator reads and writes such operands only as RAM), so
# the tests that follow on one reach kvmfast's completion.


@pytest.mark.parametrize("form", ["fxsave64", "fxsave"])
def test_fxsave_matches_the_host(kvm: Kvm, form: str) -> None:
    body = f"lea rsi, [rip + buf]\n{form} [rsi]"
    _compare(kvm, body, _state())


def _fxrstor_image() -> bytes:
    image = bytearray(512)
    struct.pack_into("<HH", image, 0, 0x37F, 0)
    struct.pack_into("<II", image, 24, 0x3F80, 0xFFFF)
    for i, value in enumerate(RNG.randbytes(16) for _ in range(16)):
        image[160 + 16 * i : 176 + 16 * i] = value
    return bytes(image)


@pytest.mark.parametrize("form", ["fxrstor64", "fxrstor"])
def test_fxrstor_loads_what_fxsave_stored(kvm: Kvm, form: str) -> None:
    body = f"lea rsi, [rip + buf]\n{form} [rsi]"
    _compare(kvm, body, _state(_fxrstor_image()))


MMIO_BASE = 0x1000_0000


class _DeviceMemory:
    """An MMIO device that keeps what is written to it and reads it back."""

    def __init__(self, contents: bytes = b"") -> None:
        self.bytes = bytearray(contents.ljust(0x1000, b"\0"))

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.bytes[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.bytes[offset : offset + size] = value.to_bytes(size, "little")


def _run_on_device(
    kvm: Kvm, body: str, state: CpuState, device: _DeviceMemory
) -> tuple[CpuState, Guest]:
    guest = make_guest(kvm, f".global entry\nentry:\n{body}\n out 0xf4, al\n")
    guest.vm.add_mmio(MMIO_BASE, 0x1000, device)
    load_state(guest, state)
    run_until_exit(guest)
    return read_state(guest), guest


def _require_completion(guest: Guest, form: str) -> None:
    if not completions(guest):
        pytest.skip(f"this host's KVM ran {form} on an MMIO operand itself")
    assert completions(guest) == {form: 1}


@pytest.mark.parametrize("form", ["fxsave64", "fxsave"])
def test_fxsave_to_a_device_is_completed_and_matches_the_host(kvm: Kvm, form: str) -> None:
    state = _state()
    device = _DeviceMemory()
    guest, vm_guest = _run_on_device(kvm, f"mov rsi, {MMIO_BASE:#x}\n{form} [rsi]", state, device)
    _require_completion(vm_guest, form)
    native = run_natively(f"lea rsi, [rip + buf]\n{form} [rsi]", state)
    written = replace(guest, buf=bytes(device.bytes[:BUF_SIZE]))
    assert_same_results(written, native, ignore=frozenset({"rsi"}))


@pytest.mark.parametrize("form", ["fxrstor64", "fxrstor"])
def test_fxrstor_from_a_device_is_completed_and_matches_the_host(kvm: Kvm, form: str) -> None:
    image = _fxrstor_image()
    state = _state(image)
    device = _DeviceMemory(image)
    guest, vm_guest = _run_on_device(kvm, f"mov rsi, {MMIO_BASE:#x}\n{form} [rsi]", state, device)
    _require_completion(vm_guest, form)
    native = run_natively(f"lea rsi, [rip + buf]\n{form} [rsi]", state)
    assert_same_results(guest, native, ignore=frozenset({"rsi"}))


def test_fxrstor_misaligned_is_gp(kvm: Kvm) -> None:
    """SDM Vol. 2A FXRSTOR: #GP(0) for an operand not 16-byte aligned. On a device, so
    that KVM's emulator (which loads a misaligned one from RAM) does not take it."""
    guest = make_guest(
        kvm,
        f".global entry, at\nentry:\n mov rsi, {MMIO_BASE + 8:#x}\nat:\n fxrstor [rsi]\n"
        f" out 0xf4, al\n{exception_handlers_asm()}",
    )
    guest.vm.add_mmio(MMIO_BASE, 0x1000, _DeviceMemory())
    install_exception_handlers(guest)
    assert run_until_exit(guest) == 13
    assert guest.vcpu.get_regs()["rdx"] == guest.symbols["at"]
    if not exceptions_raised(guest):
        pytest.skip("this host's KVM raised #GP for the misaligned FXRSTOR itself")
    assert exceptions_raised(guest) == {"#GP": 1}


def test_fxrstor_reserved_mxcsr_bits_are_gp(kvm: Kvm) -> None:
    """SDM Vol. 2A FXRSTOR: #GP(0) for reserved MXCSR bits set; nothing is loaded."""
    image = bytearray(_fxrstor_image())
    struct.pack_into("<I", image, 24, 0x1_0000)
    guest = make_guest(
        kvm,
        f".global entry, at\nentry:\n mov rsi, {MMIO_BASE:#x}\nat:\n fxrstor [rsi]\n"
        f" out 0xf4, al\n{exception_handlers_asm()}",
    )
    guest.vm.add_mmio(MMIO_BASE, 0x1000, _DeviceMemory(bytes(image)))
    install_exception_handlers(guest)
    before = guest.vcpu.get_xsave()[:416]
    assert run_until_exit(guest) == 13
    assert guest.vcpu.get_regs()["rdx"] == guest.symbols["at"]
    assert guest.vcpu.get_xsave()[:416] == before
    if not exceptions_raised(guest):
        pytest.skip("this host's KVM raised #GP for the reserved MXCSR bits itself")
    assert exceptions_raised(guest) == {"#GP": 1}


@emulated_cpl0
@pytest.mark.parametrize("form", ["xsave", "xsave64", "xsaveopt", "xsavec", "xsavec64"])
def test_xsave_of_sse_state_matches_the_host(kvm: Kvm, form: str) -> None:
    """RFBM = SSE only: the component both the guest and the host have in use."""
    body = f"lea rsi, [rip + buf]\nmov eax, 2\nxor edx, edx\n{form} [rsi]"
    header = struct.pack("<QQ", 0x10, 0)  # an XSTATE_BV bit outside RFBM: XSAVE keeps it
    guest = _compare(kvm, body, _state(bytes(512) + header))
    assert completions(guest) == {form: 1}


@emulated_cpl0
def test_xrstor_loads_and_initialises(kvm: Kvm) -> None:
    """XSTATE_BV[1]=1 loads the XMM registers; RFBM[2] with XSTATE_BV[2]=0 initialises
    AVX (the upper halves the host and the guest both have at zero)."""
    image = bytearray(576)
    struct.pack_into("<II", image, 24, 0x1F80 | 0x2000, 0)
    for i, value in enumerate(RNG.randbytes(16) for _ in range(16)):
        image[160 + 16 * i : 176 + 16 * i] = value
    struct.pack_into("<QQ", image, XSAVE_XSTATE_BV, 0x2, 0)
    body = "lea rsi, [rip + buf]\nmov eax, 6\nxor edx, edx\nxrstor [rsi]"
    guest = _compare(kvm, body, _state(bytes(image)))
    assert completions(guest) == {"xrstor": 1}


@emulated_cpl0
def test_xrstor_of_a_compacted_image_with_sse_in_init_state(kvm: Kvm) -> None:
    image = bytearray(576)
    struct.pack_into("<QQ", image, XSAVE_XSTATE_BV, 0x0, (1 << 63) | 0x2)
    body = "lea rsi, [rip + buf]\nmov eax, 2\nxor edx, edx\nxrstor [rsi]"
    guest = _compare(kvm, body, _state(bytes(image)))
    assert completions(guest) == {"xrstor": 1}


@emulated_cpl0
def test_xsave_then_xrstor_round_trip(kvm: Kvm) -> None:
    body = """
    lea rsi, [rip + buf]
    mov eax, 3
    xor edx, edx
    xsave [rsi]
    xorps xmm3, xmm3
    xrstor [rsi]
    """
    state = _state()
    guest_state, guest = run_in_guest(kvm, body.replace("xorps xmm3, xmm3", "nop"), state)
    assert guest_state.xmm == state.xmm
    assert completions(guest) == {"xsave": 1, "xrstor": 1}


def test_xrstor_with_bytes_16_to_63_of_the_header_set_is_gp(kvm: Kvm) -> None:
    guest = _fault_guest(kvm, "mov eax, 3\nxor edx, edx\nxrstor [rsi]")
    guest.vm.write(guest.symbols["buf"] + 512 + 16, b"\x01")
    guest.vcpu.set_regs({"rip": guest.symbols["entry"]})
    assert run_until_exit(guest) == 13


def test_xsave_misaligned_is_gp_and_with_ts_is_nm(kvm: Kvm) -> None:
    guest = _fault_guest(kvm, "mov eax, 3\nxor edx, edx\nxsave [rsi + 16]")
    assert run_until_exit(guest) == 13
    guest = _fault_guest(kvm, "mov eax, 3\nxor edx, edx\nxsave [rsi]")
    guest.vcpu.set_sregs({"cr0": guest.vcpu.get_sregs()["cr0"] | 0x8})
    assert run_until_exit(guest) == 7


def test_xgetbv_and_xsetbv(kvm: Kvm) -> None:
    guest = make_guest(
        kvm,
        """
.global entry
entry:
    xor ecx, ecx
    mov eax, 3
    xor edx, edx
    xsetbv
    xgetbv
    out 0xf4, al
""",
    )
    run_until_exit(guest)
    assert guest.vcpu.get_xcrs()[0] == 3
    regs = guest.vcpu.get_regs()
    assert (regs["rax"], regs["rdx"]) == (3, 0)


@emulated_cpl0
def test_xsaves_writes_the_compacted_format_and_xrstors_reads_it(kvm: Kvm) -> None:
    """XSAVES is CPL 0 only, so the host cannot run it: the image must equal what
    XSAVEC (compared with the host above) writes, and XRSTORS must load it back."""
    body = """
    lea rsi, [rip + buf]
    mov eax, 2
    xor edx, edx
    xsaves [rsi]
    xsavec [rsi + 576]
    xrstors [rsi]
    """
    state = _state()
    result, guest = run_in_guest(kvm, body, state)
    assert result.buf[:448] == result.buf[576:1024]
    assert struct.unpack_from("<QQ", result.buf, 512) == (2, (1 << 63) | 2)
    assert result.xmm == state.xmm
    assert completions(guest) == {"xsaves": 1, "xsavec": 1, "xrstors": 1}


@emulated_cpl0
def test_xrstors_of_a_standard_image_is_gp(kvm: Kvm) -> None:
    guest = _fault_guest(kvm, "mov eax, 2\nxor edx, edx\nxrstors [rsi]")
    assert run_until_exit(guest) == 13
    assert exceptions_raised(guest) == {"#GP": 1}
