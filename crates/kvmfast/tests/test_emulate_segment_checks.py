"""LAR, LSL, VERR and VERW against a GDT of our own (SDM Vol. 2A "LAR", 2B "LSL",
"VERR/VERW"): ZF = 1 and the limit / access rights for a descriptor visible at the
CPL and the selector's RPL, ZF = 0 and the destination untouched otherwise (null
selector, beyond the GDT limit, DPL below CPL or RPL, a system type the instruction
does not accept in IA-32e mode). Linux's paranoid entries run ``lsl`` on the per-CPU
GDT entry; this host's KVM cannot emulate it. Expected values are computed from the
descriptors by ``expected`` below, an independent reading of the SDM tables."""

from __future__ import annotations

import struct

import pytest
from emulation_support import GDT_AT, completions, make_guest, run_until_exit, setup_tss64

from kvmfast import Kvm

pytestmark = pytest.mark.kvm

UNTOUCHED = 0x5A5A_5A5A_5A5A_5A5A


def descriptor(*, base: int = 0, limit: int, access: int, flags: int) -> int:
    """access: P|DPL|S|type byte; flags: G|D/B|L|AVL nibble."""
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xFF) << 56)
    )


# GDT entries from index 8 on (setup_tss64 fills 0-7).
EXTRA = {
    8: descriptor(limit=0x1234, access=0xF3, flags=0x4),  # data DPL 3: Linux's CPUNODE
    9: descriptor(limit=0xFFFFF, access=0x9B, flags=0xA),  # code DPL 0, readable, G
    10: descriptor(limit=0x0FFF, access=0x91, flags=0x4),  # data DPL 0, read-only
    11: descriptor(limit=0x00FF, access=0x99, flags=0x2),  # code DPL 0, execute-only
    12: descriptor(limit=0x67, access=0x81, flags=0x0),  # 16-bit TSS: not in IA-32e mode
    13: descriptor(limit=0x500, access=0x93, flags=0x4),  # data DPL 0, writable
}
GDT_ENTRIES = 14
TSS_SELECTOR = 0x30  # setup_tss64's 64-bit TSS, limit 0x67

SELECTORS = [0x00, 0x43, 0x48, 0x50, 0x58, 0x60, 0x68, 0x6B, TSS_SELECTOR, 0x08, 0x78, 0x400]


def raw_descriptor(selector: int) -> int | None:
    index = selector >> 3
    if index in EXTRA:
        return EXTRA[index]
    if selector == TSS_SELECTOR:
        return descriptor(base=0x12000, limit=0x67, access=0x89, flags=0)
    if selector == 0x08:
        return 0x00AF_9B00_0000_FFFF
    return None


def expected(mnemonic: str, selector: int) -> tuple[bool, int]:
    """(ZF, destination) at CPL 0 in 64-bit mode."""
    raw = raw_descriptor(selector)
    if selector & ~3 == 0 or raw is None or (selector >> 3) >= GDT_ENTRIES:
        return False, UNTOUCHED
    access = (raw >> 40) & 0xFF
    dpl, system, kind = (access >> 5) & 3, not access & 0x10, access & 0xF
    code, conforming = bool(kind & 8) and not system, (kind & 0xC) == 0xC and not system
    if not conforming and dpl < (selector & 3):  # CPL 0: only RPL can exceed DPL
        return False, UNTOUCHED
    limit = ((raw >> 48) & 0xF) << 16 | raw & 0xFFFF
    if raw >> 55 & 1:
        limit = limit << 12 | 0xFFF
    if mnemonic == "lsl":
        ok = not system or kind in (2, 9, 11)
        return ok, limit if ok else UNTOUCHED
    if mnemonic == "lar":
        ok = not system or kind in (2, 9, 11, 12)
        return ok, (raw >> 32) & 0x00F0FF00 if ok else UNTOUCHED
    if mnemonic == "verr":
        return (not system and (not code or bool(kind & 2))), UNTOUCHED
    return (not system and not code and bool(kind & 2)), UNTOUCHED  # verw


def body(mnemonic: str) -> str:
    """For each selector: the destination and the flags, stored at buf + 16 * i."""
    lines = ["lea rdi, [rip + buf]"]
    for selector in SELECTORS:
        lines.append(f"mov rbx, {UNTOUCHED:#x}")
        lines.append(f"mov ax, {selector:#x}")
        lines.append(f"{mnemonic} rbx, ax" if mnemonic in ("lsl", "lar") else f"{mnemonic} ax")
        lines += ["pushfq", "pop rcx", "mov [rdi], rbx", "mov [rdi + 8], rcx", "add rdi, 16"]
    return "\n".join(lines)


@pytest.mark.parametrize("mnemonic", ["lsl", "lar", "verr", "verw"])
def test_segment_checks_answer_as_the_sdm_says(kvm: Kvm, mnemonic: str) -> None:
    guest = make_guest(kvm, f".global entry\nentry:\n{body(mnemonic)}\n out 0xf4, al\n")
    setup_tss64(guest)
    gdt = bytearray(guest.vm.read(GDT_AT, 8 * 8))
    for index in range(8, GDT_ENTRIES):
        gdt += struct.pack("<Q", EXTRA[index])
    guest.vm.write(GDT_AT, bytes(gdt))
    guest.vcpu.set_sregs({"gdt": {"base": GDT_AT, "limit": len(gdt) - 1}})
    run_until_exit(guest)
    buf = guest.symbols["buf"]
    for i, selector in enumerate(SELECTORS):
        destination, flags = struct.unpack("<QQ", guest.vm.read(buf + 16 * i, 16))
        zf, value = expected(mnemonic, selector)
        assert (bool(flags & 0x40), destination) == (zf, value), f"{mnemonic} {selector:#x}"
    done = completions(guest)
    assert done.get(mnemonic, 0) in (0, len(SELECTORS)), done  # 0: KVM emulated them


def test_lsl_of_a_memory_selector(kvm: Kvm) -> None:
    source = (
        ".global entry\nentry:\n lea rdi, [rip + buf]\n mov word ptr [rdi + 64], 0x43\n"
        " xor ebx, ebx\n lsl ebx, word ptr [rdi + 64]\n mov [rdi], rbx\n out 0xf4, al\n"
    )
    guest = make_guest(kvm, source)
    setup_tss64(guest)
    gdt = bytearray(guest.vm.read(GDT_AT, 8 * 8)) + struct.pack("<Q", EXTRA[8])
    guest.vm.write(GDT_AT, bytes(gdt))
    guest.vcpu.set_sregs({"gdt": {"base": GDT_AT, "limit": len(gdt) - 1}})
    run_until_exit(guest)
    assert struct.unpack("<Q", guest.vm.read(guest.symbols["buf"], 8))[0] == 0x1234
