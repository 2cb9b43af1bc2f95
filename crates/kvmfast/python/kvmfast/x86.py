"""The x86 processor-state encodings every guest entry is built from, in one place.

Control-register and EFER bits (Intel SDM vol. 3A §2.5 and §2.2.1), flat segment
descriptors (§3.4.5) and the segment-register state they load, and 4-level paging
entries with 2 MiB pages (§4.5), and the two GDT layouts in use, each named for
what it is: the flat-guest GDT of kvmfast's own small guests and Linux's boot GDT.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmfast._native import Segment

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_OSXSAVE = 1 << 18
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Flat descriptors: base 0, limit 0xFFFFF in 4 KiB units (4 GiB), present, DPL 0, the
# accessed bit already set, as the segment registers loaded from them say (type 11/3).
GDT_NULL = 0
GDT_CODE64 = 0x00AF_9B00_0000_FFFF
GDT_CODE32 = 0x00CF_9B00_0000_FFFF
GDT_DATA = 0x00CF_9300_0000_FFFF
CODE_TYPE = 11  # execute/read, accessed
DATA_TYPE = 3  # read/write, accessed

# Two layouts of those descriptors, kept apart on purpose: Linux's boot protocol fixes
# code at 0x10 and data at 0x18, while the flat guests' assembly, IRET frames, STAR
# values and tests are written for code at 0x08 and data at 0x10.
#
# Flat guests (kvmfast.flat_guest's test and benchmark guests, kvm-vmm's host-check
# probes, which add user and TSS descriptors after these): null, code at 0x08 (64-bit
# in long mode, else 32-bit), data at 0x10. Kernel data right after kernel code is
# the pair SYSCALL loads from IA32_STAR (SDM vol. 2B, SYSCALL).
FLAT_GUEST_CS = 0x08
FLAT_GUEST_DS = 0x10
# Linux's boot protocol (Documentation/arch/x86/boot.rst), which kvm_vmm.cpu_setup
# gives every boot protocol's entry: null, a 32-bit code descriptor at 0x08 that no
# entry loads, __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
LINUX_BOOT_CS = 0x10
LINUX_BOOT_DS = 0x18

PAGE_PRESENT_WRITABLE = 0x3
PAGE_SIZE_2M = 0x80  # PS in a page-directory entry
PAGE_TABLE_SIZE = 0x1000


def flat_guest_gdt(*, long_mode: bool) -> bytes:
    """The flat guests' GDT: null, code at FLAT_GUEST_CS, data at FLAT_GUEST_DS."""
    code = GDT_CODE64 if long_mode else GDT_CODE32
    return struct.pack("<3Q", GDT_NULL, code, GDT_DATA)


def linux_boot_gdt(*, long_mode: bool) -> bytes:
    """boot.rst's GDT: null, unused 32-bit code, LINUX_BOOT_CS, LINUX_BOOT_DS."""
    code = GDT_CODE64 if long_mode else GDT_CODE32
    return struct.pack("<4Q", GDT_NULL, GDT_CODE32, code, GDT_DATA)


def flat_segment(selector: int, *, code: bool, long_mode: bool, dpl: int = 0) -> Segment:
    """The segment-register state of ``selector`` loaded from a flat descriptor above
    (with ``dpl`` in its DPL field: 3 for a user-mode copy of it)."""
    return {
        "base": 0,
        "limit": 0xFFFF_FFFF,
        "selector": selector,
        "type": CODE_TYPE if code else DATA_TYPE,
        "present": 1,
        "dpl": dpl,
        "db": 0 if (code and long_mode) else 1,
        "s": 1,
        "l": 1 if (code and long_mode) else 0,
        "g": 1,
        "avl": 0,
        "unusable": 0,
    }


def identity_page_tables(base: int, gib: int) -> bytes:
    """PML4, PDPT, then one page directory of 2 MiB pages per GiB, to be written at ``base``.

    The first ``gib`` GiB map to themselves, writable, supervisor.
    """
    if not 1 <= gib <= 512:
        raise ValueError(f"an identity map of 1..512 GiB (one PDPT), not {gib}")
    pdpt = base + PAGE_TABLE_SIZE
    pml4 = struct.pack("<Q", pdpt | PAGE_PRESENT_WRITABLE).ljust(PAGE_TABLE_SIZE, b"\0")
    directories = [pdpt + PAGE_TABLE_SIZE * (1 + index) for index in range(gib)]
    pdpt_entries = b"".join(struct.pack("<Q", d | PAGE_PRESENT_WRITABLE) for d in directories)
    large_pages = b"".join(
        struct.pack("<Q", (index << 21) | PAGE_SIZE_2M | PAGE_PRESENT_WRITABLE)
        for index in range(512 * gib)
    )
    return pml4 + pdpt_entries.ljust(PAGE_TABLE_SIZE, b"\0") + large_pages
