"""Flat guests: a vCPU put straight into 64-bit or 32-bit mode with a flat GDT.

The benchmarks and the tests run small guests this way, without a firmware or a boot
protocol: :func:`setup_long_mode` and :func:`setup_protected_mode` write a GDT (the
flat layout of :mod:`kvmfast.x86`) and page tables and load the registers;
:func:`install_idt` adds an IDT whose gates use that GDT's code selector.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kvmfast import x86
from kvmfast._native import GuestMemory, Vcpu, Vm

if TYPE_CHECKING:
    from kvmfast._native import Sregs

# Present, DPL 0, 32/64-bit interrupt gate (type 0xE).
_GATE_INTERRUPT = 0x8E


def _check_inside(memory: GuestMemory, address: int, what: str) -> None:
    if not memory.guest_phys_addr <= address < memory.guest_phys_addr + memory.size:
        raise ValueError(f"{what} {address:#x} is outside the guest memory slot")


def _flat_sregs(*, long_mode: bool, gdt_base: int, gdt_limit: int) -> Sregs:
    data = x86.flat_segment(x86.FLAT_GUEST_DS, code=False, long_mode=long_mode)
    return {
        "cs": x86.flat_segment(x86.FLAT_GUEST_CS, code=True, long_mode=long_mode),
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
    the flat guests' GDT (x86.flat_guest_gdt: 64-bit code at 0x08, data at 0x10):
    4 + ``mapped_gib`` pages.
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
    descriptors = x86.flat_guest_gdt(long_mode=True)
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

    Writes the flat guests' GDT (x86.flat_guest_gdt: 32-bit code at 0x08, data at 0x10)
    at ``gdt_at``.
    """
    for address, what in ((entry, "entry"), (gdt_at, "GDT")):
        _check_inside(memory, address, what)
    descriptors = x86.flat_guest_gdt(long_mode=False)
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
                "<HHBBHII", low, x86.FLAT_GUEST_CS, 0, _GATE_INTERRUPT, high, handler >> 32, 0
            )
        else:
            gate = struct.pack("<HHBBH", low, x86.FLAT_GUEST_CS, 0, _GATE_INTERRUPT, high)
        table[vector * gate_size : (vector + 1) * gate_size] = gate
    vm.write(base, bytes(table))
    vcpu.set_sregs({"idt": {"base": base, "limit": len(table) - 1}})
