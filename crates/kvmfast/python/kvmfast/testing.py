"""Helpers shared by the KVM-backed tests of every package.

Small guests are written as assembly in the tests and assembled at test time with GNU
as and ld; :func:`setup_long_mode` and :func:`setup_protected_mode` put a vCPU straight
into a flat 64-bit or 32-bit environment, and :func:`require_kvm` skips (or, on CI
machines that have KVM, fails) a test when /dev/kvm is unusable.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmfast import x86
from kvmfast._native import GuestMemory, Vcpu, Vm

if TYPE_CHECKING:
    from kvmfast._native import Sregs

REQUIRE_KVM_ENV = "KVM_SPLIT_REQUIRE_KVM"

# The flat test GDT: null, code (64-bit or 32-bit), data (kvmfast.x86's descriptors).
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
# Present, DPL 0, 32/64-bit interrupt gate (type 0xE).
_GATE_INTERRUPT = 0x8E

# Local APIC register offsets (Intel SDM Vol. 3A, Table 11-1) and LVT encodings
# (Figure 11-8): delivery mode ExtINT = 0b111, NMI = 0b100, mask bit 16 clear.
LAPIC_SVR = 0xF0
LAPIC_LVT_LINT0 = 0x350
LAPIC_LVT_LINT1 = 0x360
LVT_EXTINT = 0x700
LVT_NMI = 0x400
SVR_ENABLED_SPURIOUS_FF = 0x1FF


class AssemblerMissing(RuntimeError):
    """GNU as or ld is not installed (Debian: apt-get install binutils)."""


class AssemblyError(ValueError):
    """The assembler or linker rejected the source; the message has their output."""


@dataclass(frozen=True)
class GuestProgram:
    """An assembled guest: its flat image and the addresses of its global labels."""

    code: bytes
    origin: int
    symbols: dict[str, int]


def assemble(source: str, *, bits: int = 64, origin: int = 0x1000) -> bytes:
    """Assemble ``source`` into a flat binary loaded at ``origin``.

    The source starts in Intel syntax without register prefixes and in ``bits``-bit
    mode; it may switch with ``.att_syntax`` or ``.code16``/``.code32``/``.code64``.
    Results are cached per (source, bits, origin) for the life of the process.
    """
    return assemble_program(source, bits=bits, origin=origin).code


def assemble_program(source: str, *, bits: int = 64, origin: int = 0x1000) -> GuestProgram:
    """Like :func:`assemble`, and also return the address of every label the source
    declares ``.global``."""
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    return _assemble_cached(source, bits, origin)


@functools.cache
def _assemble_cached(source: str, bits: int, origin: int) -> GuestProgram:
    tools = {name: shutil.which(name) for name in ("as", "ld", "nm")}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        raise AssemblerMissing(
            f"GNU binutils ({', '.join(missing)}) are needed to build test guests; install binutils"
        )
    prelude = f".intel_syntax noprefix\n.code{bits}\n.text\n"
    with tempfile.TemporaryDirectory(prefix="kvmfast-asm-") as scratch:
        work = Path(scratch)
        (work / "guest.s").write_text(prelude + source + "\n")
        _run_tool([str(tools["as"]), "--64", "-o", str(work / "guest.o"), str(work / "guest.s")])
        link = [str(tools["ld"]), "-m", "elf_x86_64", f"-Ttext={origin:#x}", "-e", f"{origin:#x}"]
        _run_tool(
            [*link, "--oformat", "binary", "-o", str(work / "guest.bin"), str(work / "guest.o")]
        )
        _run_tool([*link, "-o", str(work / "guest.elf"), str(work / "guest.o")])
        listing = _run_tool([str(tools["nm"]), "--defined-only", str(work / "guest.elf")])
        return GuestProgram(
            code=(work / "guest.bin").read_bytes(),
            origin=origin,
            symbols=_global_symbols(listing),
        )


def _global_symbols(nm_listing: str) -> dict[str, int]:
    symbols = {}
    for line in nm_listing.splitlines():
        fields = line.split()
        # Upper-case types are global symbols: "0000000000001000 T entry".
        if len(fields) == 3 and fields[1].isupper():
            symbols[fields[2]] = int(fields[0], 16)
    return symbols


def _run_tool(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tool = Path(command[0]).name
        raise AssemblyError(f"{tool} failed:\n{result.stderr.strip()}")
    return result.stdout


def _check_inside(memory: GuestMemory, address: int, what: str) -> None:
    if not memory.guest_phys_addr <= address < memory.guest_phys_addr + memory.size:
        raise ValueError(f"{what} {address:#x} is outside the guest memory slot")


def _flat_sregs(*, long_mode: bool, gdt_base: int, gdt_limit: int) -> Sregs:
    data = x86.flat_segment(DATA_SELECTOR, code=False, long_mode=long_mode)
    return {
        "cs": x86.flat_segment(CODE_SELECTOR, code=True, long_mode=long_mode),
        "ds": data,
        "es": data,
        "fs": data,
        "gs": data,
        "ss": data,
        "gdt": {"base": gdt_base, "limit": gdt_limit},
    }


def setup_long_mode(
    vm: Vm,
    vcpu: Vcpu,
    memory: GuestMemory,
    *,
    entry: int,
    stack: int,
    page_tables_at: int = 0x9000,
    mapped_gib: int = 4,
) -> None:
    """Put ``vcpu`` in 64-bit mode with the first ``mapped_gib`` GiB identity-mapped
    with 2 MiB pages (the default 4 reaches the LAPIC and IOAPIC pages).

    At ``page_tables_at`` it writes a PML4, a PDPT, one page directory per GiB and then
    a flat GDT (null, 64-bit code at 0x08, data at 0x10): 4 + ``mapped_gib`` pages.
    sregs and regs are set as ../shared/bench/kvm_floor.c sets them (CR0 = PG|ET|PE,
    CR4 = PAE, EFER = LMA|LME, RFLAGS = 2).
    """
    if not 1 <= mapped_gib <= 512:
        raise ValueError(f"mapped_gib must be 1..512, not {mapped_gib}")
    pml4 = page_tables_at
    tables = x86.identity_page_tables(pml4, mapped_gib)
    gdt = pml4 + len(tables)
    _check_inside(memory, entry, "entry")
    _check_inside(memory, pml4, "page tables")
    _check_inside(memory, gdt + 0xFFF, "page tables")
    vm.write(pml4, tables)
    descriptors = struct.pack("<3Q", x86.GDT_NULL, x86.GDT_CODE64, x86.GDT_DATA)
    vm.write(gdt, descriptors)
    sregs = _flat_sregs(long_mode=True, gdt_base=gdt, gdt_limit=len(descriptors) - 1)
    sregs["cr3"] = pml4
    sregs["cr4"] = x86.CR4_PAE
    sregs["cr0"] = x86.CR0_PG | x86.CR0_ET | x86.CR0_PE
    sregs["efer"] = x86.EFER_LMA | x86.EFER_LME
    vcpu.set_sregs(sregs)
    vcpu.set_regs({"rip": entry, "rsp": stack, "rflags": 2})


def setup_protected_mode(
    vm: Vm,
    vcpu: Vcpu,
    memory: GuestMemory,
    *,
    entry: int,
    stack: int,
    gdt_at: int = 0x8000,
) -> None:
    """Put ``vcpu`` in flat 32-bit protected mode, paging off (as Multiboot expects).

    Writes a GDT (null, 32-bit code at 0x08, data at 0x10) at ``gdt_at``.
    """
    for address, what in ((entry, "entry"), (gdt_at, "GDT")):
        _check_inside(memory, address, what)
    descriptors = struct.pack("<3Q", x86.GDT_NULL, x86.GDT_CODE32, x86.GDT_DATA)
    vm.write(gdt_at, descriptors)
    sregs = _flat_sregs(long_mode=False, gdt_base=gdt_at, gdt_limit=len(descriptors) - 1)
    sregs["cr0"] = x86.CR0_ET | x86.CR0_PE
    sregs["cr3"] = 0
    sregs["cr4"] = 0
    sregs["efer"] = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs({"rip": entry, "rsp": stack, "rflags": 2})


def install_idt(vm: Vm, vcpu: Vcpu, *, base: int, handlers: Mapping[int, int]) -> None:
    """Write an IDT at ``base`` with an interrupt gate (DPL 0, present) for each
    vector → handler address, empty gates elsewhere, and load IDTR with it.

    The gates are 16-byte long-mode gates when the vCPU is in long mode (EFER.LMA),
    8-byte protected-mode gates otherwise (Intel SDM Vol. 3A, 6.14.1 and 6.11).
    """
    long_mode = bool(vcpu.get_sregs()["efer"] & x86.EFER_LMA)
    gate_size = 16 if long_mode else 8
    table = bytearray(256 * gate_size)
    for vector, handler in handlers.items():
        if not 0 <= vector < 256:
            raise ValueError(f"vector {vector} is not 0..255")
        low, high = handler & 0xFFFF, (handler >> 16) & 0xFFFF
        if long_mode:
            gate = struct.pack(
                "<HHBBHII", low, CODE_SELECTOR, 0, _GATE_INTERRUPT, high, handler >> 32, 0
            )
        else:
            gate = struct.pack("<HHBBH", low, CODE_SELECTOR, 0, _GATE_INTERRUPT, high)
        table[vector * gate_size : (vector + 1) * gate_size] = gate
    vm.write(base, bytes(table))
    vcpu.set_sregs({"idt": {"base": base, "limit": len(table) - 1}})


def set_lint0_extint(vcpu: Vcpu) -> None:
    """Let the PIC's ExtINT through: LVT LINT0 = ExtINT, LINT1 = NMI, APIC enabled.

    A reset local APIC masks LINT0, and then KVM_INTERRUPT is accepted but never
    delivered (../shared/HOST-KVM.md).
    """
    page = bytearray(vcpu.get_lapic())
    struct.pack_into("<I", page, LAPIC_LVT_LINT0, LVT_EXTINT)
    struct.pack_into("<I", page, LAPIC_LVT_LINT1, LVT_NMI)
    struct.pack_into("<I", page, LAPIC_SVR, SVR_ENABLED_SPURIOUS_FF)
    vcpu.set_lapic(bytes(page))


def kvm_unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm (this host has no KVM)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no /dev/kvm (present but not readable and writable by this user)"
    return None


def require_kvm() -> None:
    """Skip the calling test when KVM is unusable; fail instead when the environment
    variable KVM_SPLIT_REQUIRE_KVM=1 says this machine must have it."""
    import pytest

    reason = kvm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_KVM_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_KVM_ENV}=1 requires KVM")
    pytest.skip(reason)
