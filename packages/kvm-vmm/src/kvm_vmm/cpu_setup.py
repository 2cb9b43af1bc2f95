"""Put a vCPU into the state a boot protocol promises its kernel.

Two entry states exist: 32-bit protected mode with paging off (Multiboot, the
Linux 32-bit protocol, flat test guests) and 64-bit long mode with identity
page tables (the Linux 64-bit protocol). Both use the GDT layout of Linux's
boot protocol (Documentation/arch/x86/boot.rst): __BOOT_CS = 0x10 and
__BOOT_DS = 0x18, 4 GiB flat.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

from kvm_vmm.loaders.image import EntryMode, EntryState

if TYPE_CHECKING:
    from kvmfast._native import Regs, Segment, Sregs

BOOT_CS = 0x10
BOOT_DS = 0x18

# Descriptor words: base 0, limit 0xFFFFF pages (4 GiB), present, DPL 0.
_CODE32 = 0x00CF9A000000FFFF
_CODE64 = 0x00AF9A000000FFFF
_DATA = 0x00CF92000000FFFF

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

PAGE_PRESENT_WRITABLE = 0x3
PAGE_HUGE = 0x80
IDENTITY_MAP_GIB = 4  # covers RAM below the PCI hole and the IOAPIC/LAPIC pages
PAGE_TABLES_SIZE = 0x1000 * (2 + IDENTITY_MAP_GIB)


class GuestMemoryWriter(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


class RegisterAccess(Protocol):
    def set_sregs(self, changes: Sregs) -> None: ...

    def set_regs(self, changes: Regs) -> None: ...


def gdt_bytes(mode: EntryMode) -> bytes:
    code = _CODE64 if mode == "long64" else _CODE32
    return struct.pack("<4Q", 0, _CODE32, code, _DATA)


def identity_page_tables(base: int) -> bytes:
    """PML4, PDPT and one page directory per GiB of 2 MiB pages, at ``base``."""
    pml4 = struct.pack("<Q", (base + 0x1000) | PAGE_PRESENT_WRITABLE).ljust(0x1000, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (base + 0x2000 + 0x1000 * gib) | PAGE_PRESENT_WRITABLE)
        for gib in range(IDENTITY_MAP_GIB)
    ).ljust(0x1000, b"\0")
    directories = b"".join(
        struct.pack("<Q", (index << 21) | PAGE_PRESENT_WRITABLE | PAGE_HUGE)
        for index in range(512 * IDENTITY_MAP_GIB)
    )
    return pml4 + pdpt + directories


def _segment(selector: int, code: bool, long_mode: bool) -> Segment:
    return {
        "base": 0,
        "limit": 0xFFFFFFFF,
        "selector": selector,
        "type": 0xB if code else 0x3,
        "present": 1,
        "dpl": 0,
        "db": 0 if (code and long_mode) else 1,
        "s": 1,
        "l": 1 if (code and long_mode) else 0,
        "g": 1,
        "avl": 0,
    }


def enter(
    vcpu: RegisterAccess,
    memory: GuestMemoryWriter,
    entry: EntryState,
    *,
    gdt_address: int,
    page_tables_address: int,
) -> None:
    """Write the GDT (and page tables for long mode) and load the entry state."""
    long_mode = entry.mode == "long64"
    gdt = gdt_bytes(entry.mode)
    memory.write(gdt_address, gdt)
    data = _segment(BOOT_DS, code=False, long_mode=long_mode)
    sregs: Sregs = {
        "cs": _segment(BOOT_CS, code=True, long_mode=long_mode),
        "ds": data,
        "es": data,
        "fs": data,
        "gs": data,
        "ss": data,
        "gdt": {"base": gdt_address, "limit": len(gdt) - 1},
        "idt": {"base": 0, "limit": 0},
        "cr0": CR0_PE | CR0_ET | CR0_NE,
        "cr4": 0,
        "efer": 0,
    }
    if long_mode:
        memory.write(page_tables_address, identity_page_tables(page_tables_address))
        sregs["cr0"] = CR0_PE | CR0_ET | CR0_NE | CR0_PG
        sregs["cr3"] = page_tables_address
        sregs["cr4"] = CR4_PAE
        sregs["efer"] = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs: Regs = {"rflags": entry.rflags, "rip": entry.rip}
    regs.update(entry.registers)
    vcpu.set_regs(regs)
