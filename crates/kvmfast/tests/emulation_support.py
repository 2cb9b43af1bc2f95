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
1 KiB that crosses the page boundary at buf + 64; bodies reach it with
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
from typing import TYPE_CHECKING

import pytest

from kvmfast import Exit, ExitSink, GuestMemory, Kvm, KvmError, Vcpu, Vm
from kvmfast.testing import (
    assemble_program,
    set_lint0_extint,
    setup_long_mode,
    setup_protected_mode,
)

if TYPE_CHECKING:
    from kvmfast._native import Segment

RAM_SIZE = 8 << 20
CODE_AT = 0x1000
STACK_TOP = 0x8000
IDT_AT = 0x10000
EXIT_PORT = 0xF4
AREA_SIZE = 8192
BUF_OFFSET = 4096 - 64
BUF_SIZE = 1024

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
    # KVM checks XCR0 and CR4 against the CPUID it was given (none yet: x87 only).
    vcpu.set_cpuid(kvm.supported_cpuid())
    entry = program.symbols.get("entry", CODE_AT)
    if bits == 64:
        setup_long_mode(vm, vcpu, memory, entry=entry, stack=STACK_TOP)
    else:
        setup_protected_mode(vm, vcpu, memory, entry=entry, stack=STACK_TOP)
    # CR4.OSFXSR | OSXMMEXCPT | OSXSAVE, CR0.MP | NE: as a kernel that uses SSE sets them.
    sregs = vcpu.get_sregs()
    vcpu.set_sregs({"cr4": sregs["cr4"] | 0x40600, "cr0": (sregs["cr0"] | 0x22) & ~0xC})
    try:
        vcpu.set_xcrs({0: 0xE7})  # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
    except KvmError:
        vcpu.set_xcrs({0: 0x7})  # a host without AVX-512
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
    guest = make_guest(
        kvm, f".global entry\nentry:\n{body}\n    out {EXIT_PORT:#x}, al\n", bits=bits
    )
    load_state(guest, state)
    run_to_exit(guest)
    return read_state(guest), guest


def completions(guest: Guest) -> dict[str, int]:
    counters: dict[str, int] = guest.vcpu.counters()["completions"]
    return counters


# ---- which host this is ---------------------------------------------------------------

# Tests of what kvmfast completes at CPL 0 (the completion counters, the exceptions the
# fallback raises) hold only where KVM runs guest kernel code through its instruction
# emulator, as kvm_pvm does: under VMX/SVM the processor runs that code and nothing
# exits. conftest.py skips tests marked so elsewhere, with the probe's finding.
emulated_cpl0 = pytest.mark.emulated_cpl0
EMULATED_CPL0_DOC = (
    "needs a host whose KVM runs guest CPL-0 code through its instruction emulator "
    "(skipped elsewhere, with what the session's probe saw)"
)
# CLAC and POPCNT are in no KVM emulator, and run on any processor with SMAP/POPCNT:
# completed here only if KVM was emulating them.
_PROBE_BODY = "clac\n    mov ebx, 0xF0F0\n    popcnt eax, ebx"


@dataclass(frozen=True)
class HostEmulation:
    """What the probe saw: whether kvmfast completed CPL-0 instructions, and how the
    probe guest ended (the vector it reported: 0 for none)."""

    emulates_cpl0: bool
    completions: dict[str, int]
    vector: int

    @property
    def skip_reason(self) -> str:
        ended = f"vector {self.vector}" if self.vector else "no exception"
        return (
            "this host's KVM runs guest CPL-0 code on the processor (VMX/SVM), not in its "
            f"instruction emulator: the probe's CLAC and POPCNT at CPL 0 ran with {ended} "
            "and nothing for kvmfast to complete"
        )


def probe_host_emulation(kvm: Kvm) -> HostEmulation:
    """Runs CLAC and POPCNT at CPL 0 in a guest with exception handlers: on a host whose
    KVM emulates kernel code both end KVM_RUN with an emulation failure and kvmfast
    completes them (counted); under VMX/SVM they run, or fault, in the processor."""
    guest = make_guest(
        kvm,
        f".global entry\nentry:\n    {_PROBE_BODY}\n    xor eax, eax\n"
        f"    out {EXIT_PORT:#x}, al\n{exception_handlers_asm()}",
    )
    install_exception_handlers(guest)
    vector = run_until_exit(guest)
    done = completions(guest)
    guest.vm.close()
    return HostEmulation(emulates_cpl0=bool(done), completions=done, vector=vector)


# ---- interrupts, exceptions and privilege levels ---------------------------------------

KERNEL_CS64 = 0x08
KERNEL_DS = 0x10
USER_DS = 0x23
USER_CS64 = 0x2B
TSS_SELECTOR_64 = 0x30
USER_CS32 = 0x1B
TSS_SELECTOR_32 = 0x28
GDT_AT = 0x11000
TSS_AT = 0x12000
KERNEL_STACK = 0x7000
IST1_STACK = 0x6000
USER_CODE_AT = 0x200000
USER_STACK = 0x3FF000
PD0_AT = 0xB000  # setup_long_mode's first page directory (PML4 0x9000, PDPT 0xA000)

# Flat descriptors (SDM Vol. 3A 3.4.5): code 64/32-bit and data, DPL 0 and 3.
_KCODE64 = 0x00AF_9B00_0000_FFFF
_KDATA = 0x00CF_9300_0000_FFFF
_UCODE32 = 0x00CF_FB00_0000_FFFF
_UDATA = 0x00CF_F300_0000_FFFF
_UCODE64 = 0x00AF_FB00_0000_FFFF
_KCODE32 = 0x00CF_9B00_0000_FFFF


def gate64(handler: int, *, dpl: int = 0, ist: int = 0, trap: bool = False) -> bytes:
    """A 16-byte IA-32e interrupt or trap gate (SDM Vol. 3A 6.14.1)."""
    kind = 0x8F if trap else 0x8E
    return struct.pack(
        "<HHBBHII",
        handler & 0xFFFF,
        KERNEL_CS64,
        ist,
        kind | (dpl << 5),
        (handler >> 16) & 0xFFFF,
        handler >> 32,
        0,
    )


def gate32(handler: int, *, dpl: int = 0, trap: bool = False) -> bytes:
    """An 8-byte 32-bit interrupt or trap gate (SDM Vol. 3A 6.11)."""
    kind = 0x8F if trap else 0x8E
    return struct.pack("<HHBBH", handler & 0xFFFF, 0x08, 0, kind | (dpl << 5), handler >> 16)


def install_gates(guest: Guest, gates: dict[int, bytes]) -> None:
    size = 16 if guest.bits == 64 else 8
    table = bytearray(256 * size)
    for vector, gate in gates.items():
        table[vector * size : (vector + 1) * size] = gate
    guest.vm.write(IDT_AT, bytes(table))
    guest.vcpu.set_sregs({"idt": {"base": IDT_AT, "limit": len(table) - 1}})


def exception_handlers_asm(bits: int = 64) -> str:
    """One handler per vector of EXCEPTION_VECTORS, labelled ``vector_N``: it leaves
    the error code in RBX (0xEEEE when there is none), CR2 in RCX, the saved RIP in
    RDX, and exits with AL = N."""
    word = "r" if bits == 64 else "e"
    parts = []
    for vector in sorted(set(EXCEPTION_VECTORS.values())):
        take_code = f"pop {word}bx" if vector in VECTORS_WITH_ERROR_CODE else "mov ebx, 0xeeee"
        parts.append(
            f"""
.global vector_{vector}
vector_{vector}:
    {take_code}
    mov {word}cx, cr2
    pop {word}dx
    mov al, {vector}
    out {EXIT_PORT:#x}, al
"""
        )
    return "".join(parts)


def install_exception_handlers(guest: Guest, extra: dict[int, bytes] | None = None) -> None:
    make = gate64 if guest.bits == 64 else gate32
    gates = {
        vector: make(guest.symbols[f"vector_{vector}"])
        for vector in set(EXCEPTION_VECTORS.values())
    }
    gates.update(extra or {})
    install_gates(guest, gates)


def setup_tss64(guest: Guest) -> None:
    """GDT: null, kernel code/data (0x08, 0x10), user code32/data/code64 (0x1b, 0x23,
    0x2b), a 64-bit TSS at 0x30 with RSP0 = KERNEL_STACK and IST1 = IST1_STACK; TR
    loaded. The second 2 MiB of RAM (USER_CODE_AT..) becomes user-accessible."""
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, KERNEL_STACK)
    struct.pack_into("<Q", tss, 0x24, IST1_STACK)
    guest.vm.write(TSS_AT, bytes(tss))
    base = TSS_AT
    low = (0x67 & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40) | (((base >> 24) & 0xFF) << 56)
    gdt = struct.pack("<6Q", 0, _KCODE64, _KDATA, _UCODE32, _UDATA, _UCODE64)
    gdt += struct.pack("<QQ", low, base >> 32)
    guest.vm.write(GDT_AT, gdt)
    guest.vcpu.set_sregs(
        {
            "gdt": {"base": GDT_AT, "limit": len(gdt) - 1},
            "tr": {"base": TSS_AT, "limit": 0x67, "selector": TSS_SELECTOR_64, "type": 11,
                   "present": 1, "s": 0, "dpl": 0, "db": 0, "l": 0, "g": 0, "unusable": 0},
        }
    )  # fmt: skip
    # U/S on the walk to USER_CODE_AT's 2 MiB page (PML4[0], PDPT[0], PD[1]).
    for address in (0x9000, 0xA000, PD0_AT + 8):
        entry = struct.unpack("<Q", guest.vm.read(address, 8))[0]
        guest.vm.write(address, struct.pack("<Q", entry | 4))


def user_segment(selector: int, *, code: bool, bits: int = 64) -> Segment:
    return {
        "base": 0, "limit": 0xFFFFFFFF, "selector": selector, "type": 11 if code else 3,
        "present": 1, "dpl": 3, "db": 0 if (code and bits == 64) else 1, "s": 1,
        "l": 1 if (code and bits == 64) else 0, "g": 1, "avl": 0, "unusable": 0,
    }  # fmt: skip


def enter_user_mode64(guest: Guest, user_source: str) -> dict[str, int]:
    """Assembles ``user_source`` at USER_CODE_AT and starts the vCPU there at CPL 3
    (IOPL 3, so that the user code may end the test with OUT). Returns its labels."""
    program = assemble_program(user_source, origin=USER_CODE_AT)
    guest.vm.write(USER_CODE_AT, program.code)
    data = user_segment(USER_DS, code=False)
    guest.vcpu.set_sregs(
        {"cs": user_segment(USER_CS64, code=True), "ss": data, "ds": data, "es": data}
    )
    guest.vcpu.set_regs(
        {"rip": program.symbols.get("user_entry", USER_CODE_AT), "rsp": USER_STACK,
         "rflags": 0x3002}
    )  # fmt: skip
    return program.symbols


def setup_tss32(guest: Guest) -> None:
    """32-bit flat GDT: null, kernel code/data (0x08, 0x10), user code/data (0x1b,
    0x23), a 32-bit TSS at 0x28 with SS0:ESP0 = 0x10:KERNEL_STACK; TR loaded."""
    tss = bytearray(0x68)
    struct.pack_into("<II", tss, 4, KERNEL_STACK, KERNEL_DS)
    guest.vm.write(TSS_AT, bytes(tss))
    base = TSS_AT
    descriptor = 0x67 | ((base & 0xFFFFFF) << 16) | (0x89 << 40) | (((base >> 24) & 0xFF) << 56)
    gdt = struct.pack("<6Q", 0, _KCODE32, _KDATA, _UCODE32, _UDATA, descriptor)
    guest.vm.write(GDT_AT, gdt)
    guest.vcpu.set_sregs(
        {
            "gdt": {"base": GDT_AT, "limit": len(gdt) - 1},
            "tr": {"base": TSS_AT, "limit": 0x67, "selector": TSS_SELECTOR_32, "type": 11,
                   "present": 1, "s": 0, "dpl": 0, "db": 0, "l": 0, "g": 0, "unusable": 0},
        }
    )  # fmt: skip


def run_until_exit(guest: Guest) -> int:
    """Runs to the next OUT to port 0xF4 and returns AL."""
    return run_to_exit(guest).value


def exceptions_raised(guest: Guest) -> dict[str, int]:
    raised: dict[str, int] = guest.vcpu.counters()["emulation_exceptions"]
    return raised


PAGE_TABLE_AT = 0x20000


def split_second_2m_page(guest: Guest, *, not_present: tuple[int, ...] = ()) -> None:
    """Maps 0x200000..0x3FFFFF with 4 KiB pages (a page table at PAGE_TABLE_AT),
    leaving the pages at the given addresses not present."""
    entries = []
    for index in range(512):
        address = 0x200000 + index * 0x1000
        flags = 0 if address in not_present else 0x3
        entries.append(struct.pack("<Q", address | flags))
    guest.vm.write(PAGE_TABLE_AT, b"".join(entries))
    guest.vm.write(PD0_AT + 8, struct.pack("<Q", PAGE_TABLE_AT | 0x3))


@dataclass
class InterruptInFlightAtAnExit:
    """Makes, once, the state a kick leaves when it ends KVM_RUN in the middle of an
    interrupt's injection: an exit with ``vector`` in flight (KVM_GET_VCPU_EVENTS
    ``interrupt.injected``). A kick does that at random; this does it once.

    The only Python code the run loop calls between clearing ``immediate_exit`` and the
    next KVM_RUN is the ExtINT controller's acknowledge(): so a trace hook raises the
    ExtINT line at the first completed CLAC from the ``after_exits``-th emulation exit on
    with the interrupt window open (the guest must run one with IF set), and
    acknowledge() lowers it, marks ``vector`` as in
    flight with KVM_SET_VCPU_EVENTS and kicks (``immediate_exit``), so that KVM_RUN
    returns EINTR at once with the interrupt still in flight. It returns ``vector`` as
    the PIC's answer, which KVM delivers later as an ordinary ExtINT (LVT LINT0 is set
    to ExtINT). The guest sees ``vector`` twice, both times with IF set."""

    vcpu: Vcpu
    vector: int
    after_exits: int
    exits: int = 0
    clacs: int = 0
    fired: bool = False

    def install(self) -> None:
        set_lint0_extint(self.vcpu)
        self.vcpu.set_extint_controller(self)
        self.vcpu.set_trace(self.trace)

    def trace(self, name: str, address: int, size: int, is_write: bool, value: int) -> None:
        if name != "internal_error" or self.fired:
            return
        self.exits += 1
        if self.exits < self.after_exits:
            return
        # A CLAC leaves IF and the window as the exit reported them (a completed INT3
        # or SYSCALL repair does not: an interrupt in flight after it would be this
        # helper's doing). And with the window open at the exit, the run loop
        # acknowledges before its next KVM_RUN; later, on an IRQ-window exit, the
        # kick's immediate_exit would be cleared before the KVM_RUN it is meant for.
        clacs = self.vcpu.counters()["completions"].get("clac", 0)
        after_clac, self.clacs = clacs > self.clacs, clacs
        window_open = self.vcpu.if_flag and self.vcpu.ready_for_interrupt_injection
        if after_clac and window_open:
            self.vcpu.kicker().set_extint(True)

    def acknowledge(self) -> int:
        kicker = self.vcpu.kicker()
        kicker.set_extint(False)
        self.vcpu.set_vcpu_events({"interrupt": {"injected": 1, "nr": self.vector}})
        kicker.kick()
        self.fired = True
        return self.vector
