"""Guests and native runs for the emulation tests.

An instruction under test is written once, as a *body* of assembly. The same body runs

- in a guest (64-bit or 32-bit, CPL 0 unless a test moves it to CPL 3), where this
  host's KVM cannot emulate it and kvmfast completes it; registers come in through
  KVM_SET_REGS / KVM_SET_FPU and go out through the GET ioctls, and the body ends at
  ``out 0xf4, al`` (which changes no register);
- natively on the host, in a static executable built with GNU as and ld that loads the
  same registers, runs the body and prints them back,

so that the expected values are the host processor's own results, not typed-in ones.
Both worlds have a data block ``area`` (8 KiB, page aligned) and ``buf`` = area + 4032,
256 bytes that cross the page boundary at buf + 64; bodies reach it with
``lea REG, [rip + buf]`` (64-bit) or ``mov REG, offset buf`` (32-bit).
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmfast import Exit, ExitSink, GuestMemory, Kvm, Vcpu, Vm
from kvmfast.testing import assemble_program, setup_long_mode, setup_protected_mode

RAM_SIZE = 8 << 20
CODE_AT = 0x1000
STACK_TOP = 0x8000
IDT_AT = 0x10000
EXIT_PORT = 0xF4
AREA_SIZE = 8192
BUF_OFFSET = 4096 - 64
BUF_SIZE = 256

# Encoding order, as the native state block stores them.
GPRS = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
STATE_FLAGS = 128
STATE_XMM = 144
STATE_MXCSR = 400
# CF, PF, AF, ZF, SF, OF and DF: the flags a test may set and compare.
FLAGS_COMPARED = 0x0CD5

# The standard XSAVE layout (SDM Vol. 1 13.4.1).
XSAVE_MXCSR = 24
XSAVE_XMM = 160
XSAVE_XSTATE_BV = 512

EXCEPTION_VECTORS = {"#DE": 0, "#UD": 6, "#NM": 7, "#GP": 13, "#PF": 14, "#MF": 16, "#AC": 17}
VECTORS_WITH_ERROR_CODE = {13, 14, 17}


@dataclass
class CpuState:
    """Registers and the buffer: what a body starts from and ends with."""

    gprs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GPRS, 0))
    rflags: int = 0x2
    xmm: list[bytes] = field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80
    buf: bytes = bytes(BUF_SIZE)

    def with_gprs(self, **values: int) -> CpuState:
        return replace(self, gprs={**self.gprs, **values})

    def block(self) -> bytes:
        """The 8 KiB area as the native program reads it."""
        area = bytearray(AREA_SIZE)
        struct.pack_into("<16Q", area, 0, *(self.gprs[name] for name in GPRS))
        struct.pack_into("<Q", area, STATE_FLAGS, self.rflags)
        for i, value in enumerate(self.xmm):
            area[STATE_XMM + 16 * i : STATE_XMM + 16 * (i + 1)] = value
        struct.pack_into("<I", area, STATE_MXCSR, self.mxcsr)
        area[BUF_OFFSET : BUF_OFFSET + BUF_SIZE] = self.buf
        return bytes(area)

    @classmethod
    def from_block(cls, area: bytes) -> CpuState:
        values = struct.unpack_from("<16Q", area, 0)
        return cls(
            gprs=dict(zip(GPRS, values, strict=True)),
            rflags=struct.unpack_from("<Q", area, STATE_FLAGS)[0],
            xmm=[area[STATE_XMM + 16 * i : STATE_XMM + 16 * (i + 1)] for i in range(16)],
            mxcsr=struct.unpack_from("<I", area, STATE_MXCSR)[0],
            buf=area[BUF_OFFSET : BUF_OFFSET + BUF_SIZE],
        )


def assert_same_results(
    guest: CpuState, native: CpuState, *, ignore: frozenset[str] = frozenset()
) -> None:
    """Every register but RSP and the ignored ones (addresses), the compared flags,
    the XMM registers, MXCSR and the buffer must be equal."""
    for name in GPRS:
        if name == "rsp" or name in ignore:
            continue
        assert guest.gprs[name] == native.gprs[name], (
            f"{name}: guest {guest.gprs[name]:#x}, native {native.gprs[name]:#x}"
        )
    assert guest.rflags & FLAGS_COMPARED == native.rflags & FLAGS_COMPARED, (
        f"rflags: guest {guest.rflags:#x}, native {native.rflags:#x}"
    )
    if "xmm" not in ignore:
        for i in range(16):
            assert guest.xmm[i] == native.xmm[i], (
                f"xmm{i}: guest {guest.xmm[i].hex()}, native {native.xmm[i].hex()}"
            )
        assert guest.mxcsr == native.mxcsr, f"mxcsr: {guest.mxcsr:#x} vs {native.mxcsr:#x}"
    assert guest.buf == native.buf, f"buf: guest {guest.buf.hex()}, native {native.buf.hex()}"


# ---- native ---------------------------------------------------------------------------


def _load_state_asm() -> str:
    lines = ["push qword ptr [rip + area + 128]", "popfq"]
    lines += [f"movdqu xmm{i}, [rip + area + {STATE_XMM + 16 * i}]" for i in range(16)]
    lines.append(f"ldmxcsr [rip + area + {STATE_MXCSR}]")
    lines += [f"mov {name}, [rip + area + {8 * i}]" for i, name in enumerate(GPRS) if name != "rsp"]
    return "\n".join(lines)


def _store_state_asm() -> str:
    lines = [f"mov [rip + area + {8 * i}], {name}" for i, name in enumerate(GPRS) if name != "rsp"]
    lines += ["pushfq", "pop qword ptr [rip + area + 128]"]
    lines += [f"movdqu [rip + area + {STATE_XMM + 16 * i}], xmm{i}" for i in range(16)]
    lines.append(f"stmxcsr [rip + area + {STATE_MXCSR}]")
    return "\n".join(lines)


_AREA_ASM = f"""
.balign 4096
.global area, buf
area:
    .space {BUF_OFFSET}
buf:
    .space {AREA_SIZE - BUF_OFFSET}
"""


@functools.cache
def _native_program(body: str) -> Path:
    tools = {name: shutil.which(name) for name in ("as", "ld")}
    assert all(tools.values()), "GNU as and ld are needed"
    source = f"""
.intel_syntax noprefix
.code64
.text
.global _start
_start:
    lea rsi, [rip + area]
    mov r12, {AREA_SIZE}
1:  xor eax, eax
    xor edi, edi
    mov rdx, r12
    syscall
    test rax, rax
    jle 9f
    add rsi, rax
    sub r12, rax
    jnz 1b
{_load_state_asm()}
{body}
{_store_state_asm()}
    lea rsi, [rip + area]
    mov r12, {AREA_SIZE}
2:  mov eax, 1
    mov edi, 1
    mov rdx, r12
    syscall
    test rax, rax
    jle 9f
    add rsi, rax
    sub r12, rax
    jnz 2b
    mov eax, 60
    xor edi, edi
    syscall
9:  mov eax, 60
    mov edi, 1
    syscall
{_AREA_ASM}
"""
    work = Path(tempfile.mkdtemp(prefix="kvmfast-native-"))
    (work / "native.s").write_text(source)
    subprocess.run(
        [str(tools["as"]), "--64", "-o", str(work / "native.o"), str(work / "native.s")],
        check=True,
        capture_output=True,
    )
    # -N: text and data in one writable segment, so that `area` sits in .text as in
    # the guest image.
    subprocess.run(
        [str(tools["ld"]), "-N", "-static", "-e", "_start", "-o", str(work / "native"),
         str(work / "native.o")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return work / "native"


def run_natively(body: str, state: CpuState) -> CpuState:
    """The body run by the host CPU from ``state``."""
    result = subprocess.run(
        [str(_native_program(body))], input=state.block(), capture_output=True, check=True
    )
    assert len(result.stdout) == AREA_SIZE
    return CpuState.from_block(result.stdout)


# ---- guest ----------------------------------------------------------------------------


@dataclass
class Guest:
    vm: Vm
    vcpu: Vcpu
    memory: GuestMemory
    symbols: dict[str, int]
    bits: int


def make_guest(kvm: Kvm, source: str, *, bits: int = 64) -> Guest:
    """A VM with 8 MiB of RAM running ``source`` (from its ``entry`` label, else its
    first byte) at CPL 0, flat, with an ExitSink on port 0xF4; 64-bit guests are
    identity-mapped with 2 MiB pages."""
    vm = kvm.create_vm()
    memory = vm.add_memory(0, RAM_SIZE)
    program = assemble_program(source + _AREA_ASM, bits=bits, origin=CODE_AT)
    vm.write(CODE_AT, program.code)
    vm.add_pio(EXIT_PORT, 1, ExitSink())
    vcpu = vm.create_vcpu(0)
    entry = program.symbols.get("entry", CODE_AT)
    if bits == 64:
        setup_long_mode(vm, vcpu, memory, entry=entry, stack=STACK_TOP)
    else:
        setup_protected_mode(vm, vcpu, memory, entry=entry, stack=STACK_TOP)
    # CR4.OSFXSR | OSXMMEXCPT | OSXSAVE, CR0.MP | NE: as a kernel that uses SSE sets them.
    sregs = vcpu.get_sregs()
    vcpu.set_sregs({"cr4": sregs["cr4"] | 0x40600, "cr0": (sregs["cr0"] | 0x22) & ~0xC})
    return Guest(vm=vm, vcpu=vcpu, memory=memory, symbols=program.symbols, bits=bits)


def load_state(guest: Guest, state: CpuState) -> None:
    guest.vcpu.set_regs({name: value for name, value in state.gprs.items() if name != "rsp"})
    regs = guest.vcpu.get_regs()
    guest.vcpu.set_regs({"rflags": (regs["rflags"] & ~FLAGS_COMPARED) | state.rflags | 2})
    # Through the XSAVE area: KVM_SET_FPU leaves MXCSR and the XMM registers to XSTATE_BV.
    area = bytearray(guest.vcpu.get_xsave())
    struct.pack_into("<I", area, XSAVE_MXCSR, state.mxcsr)
    for i, value in enumerate(state.xmm):
        area[XSAVE_XMM + 16 * i : XSAVE_XMM + 16 * (i + 1)] = value
    struct.pack_into("<Q", area, XSAVE_XSTATE_BV, struct.unpack_from("<Q", area, 512)[0] | 3)
    guest.vcpu.set_xsave(bytes(area))
    guest.vm.write(guest.symbols["buf"], state.buf)


def read_state(guest: Guest) -> CpuState:
    regs = guest.vcpu.get_regs()
    area = guest.vcpu.get_xsave()
    return CpuState(
        gprs={name: regs[name] for name in GPRS},
        rflags=regs["rflags"],
        xmm=[area[XSAVE_XMM + 16 * i : XSAVE_XMM + 16 * (i + 1)] for i in range(16)],
        mxcsr=struct.unpack_from("<I", area, XSAVE_MXCSR)[0],
        buf=guest.vm.read(guest.symbols["buf"], BUF_SIZE),
    )


def run_to_exit(guest: Guest) -> Exit:
    exit = guest.vcpu.run()
    assert exit.reason == "device_exit", exit
    return exit


def run_in_guest(kvm: Kvm, body: str, state: CpuState, *, bits: int = 64) -> tuple[CpuState, Guest]:
    """The body run at CPL 0 in a guest from ``state``; the guest is returned for its
    counters."""
    guest = make_guest(kvm, f".global entry\nentry:\n{body}\n    out {EXIT_PORT:#x}, al\n", bits=bits)
    load_state(guest, state)
    run_to_exit(guest)
    return read_state(guest), guest


def completions(guest: Guest) -> dict[str, int]:
    counters: dict[str, int] = guest.vcpu.counters()["completions"]
    return counters
