"""Put a vCPU into the state a boot protocol promises its kernel.

Two entry states exist: 32-bit protected mode with paging off (Multiboot, the
Linux 32-bit protocol, flat test guests) and 64-bit long mode with identity
page tables (the Linux 64-bit protocol). Both use the GDT layout of Linux's
boot protocol (Documentation/arch/x86/boot.rst): kvmfast.x86's linux_boot_gdt,
__BOOT_CS = 0x10 and __BOOT_DS = 0x18, 4 GiB flat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from kvm_vmm.loaders.image import IDENTITY_MAP_GIB, EntryState
from kvmfast.x86 import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    LINUX_BOOT_CS,
    LINUX_BOOT_DS,
    flat_segment,
    identity_page_tables,
    linux_boot_gdt,
)

if TYPE_CHECKING:
    from kvmfast._native import Regs, Sregs


class GuestMemoryWriter(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


class RegisterAccess(Protocol):
    def set_sregs(self, changes: Sregs) -> None: ...

    def set_regs(self, changes: Regs) -> None: ...


def enter(
    vcpu: RegisterAccess,
    memory: GuestMemoryWriter,
    entry: EntryState,
) -> None:
    """Write the GDT (and page tables for long mode) where ``entry`` says and load it."""
    gdt_address, page_tables_address = entry.gdt_address, entry.page_tables_address
    long_mode = entry.mode == "long64"
    gdt = linux_boot_gdt(long_mode=long_mode)
    memory.write(gdt_address, gdt)
    data = flat_segment(LINUX_BOOT_DS, code=False, long_mode=long_mode)
    sregs: Sregs = {
        "cs": flat_segment(LINUX_BOOT_CS, code=True, long_mode=long_mode),
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
        memory.write(
            page_tables_address, identity_page_tables(page_tables_address, IDENTITY_MAP_GIB)
        )
        sregs["cr0"] = CR0_PE | CR0_ET | CR0_NE | CR0_PG
        sregs["cr3"] = page_tables_address
        sregs["cr4"] = CR4_PAE
        sregs["efer"] = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs: Regs = {"rflags": entry.rflags, "rip": entry.rip}
    regs.update(entry.registers)
    vcpu.set_regs(regs)
