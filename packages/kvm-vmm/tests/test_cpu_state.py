"""Boot entry state (boot.rst's GDT selectors, identity paging), LAPIC LVTs and CPUID."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from kvm_vmm import cpu_setup
from kvm_vmm.cpuid import HYPERVISOR_BIT, cpuid_for_vcpu
from kvm_vmm.lapic import LINT0_EXTINT, LINT1_NMI, with_lvt
from kvm_vmm.loaders import image
from kvm_vmm.loaders.image import EntryState
from kvmfast import x86


@dataclass
class FakeVcpu:
    sregs: dict[str, object] = field(default_factory=dict)
    regs: dict[str, int] = field(default_factory=dict)

    def get_sregs(self) -> dict[str, object]:
        return self.sregs

    def set_sregs(self, sregs: dict[str, object]) -> None:
        self.sregs = sregs

    def set_regs(self, regs: dict[str, int]) -> None:
        self.regs = regs


@dataclass
class FakeMemory:
    writes: dict[int, bytes] = field(default_factory=dict)

    def write(self, gpa: int, data: bytes) -> None:
        self.writes[gpa] = data


def test_protected_mode_entry_uses_boot_cs_and_ds_with_paging_off() -> None:
    vcpu, memory = FakeVcpu(), FakeMemory()
    entry = EntryState("protected32", 0x100000, {"rax": 0x2BADB002, "rbx": 0x8000})
    cpu_setup.enter(vcpu, memory, entry)
    cs = vcpu.sregs["cs"]
    assert isinstance(cs, dict)
    assert (x86.LINUX_BOOT_CS, x86.LINUX_BOOT_DS) == (0x10, 0x18)  # boot.rst's selectors
    assert cs["selector"] == x86.LINUX_BOOT_CS and cs["db"] == 1 and cs["l"] == 0
    assert vcpu.sregs["cr0"] == x86.CR0_PE | x86.CR0_ET | x86.CR0_NE
    assert vcpu.regs == {"rflags": 2, "rip": 0x100000, "rax": 0x2BADB002, "rbx": 0x8000}
    assert 0x9000 not in memory.writes
    gdt = memory.writes[0x500]
    assert struct.unpack_from("<Q", gdt, x86.LINUX_BOOT_CS)[0] == 0x00CF9B000000FFFF
    assert_gdt_matches_loaded_segments(gdt, vcpu.sregs)


def test_entry_state_says_where_the_gdt_and_page_tables_go() -> None:
    """A loader that moved the GDT (a kernel over 0x500) has it written there, and
    what is written is exactly what the entry state declares for check_fits."""
    vcpu, memory = FakeVcpu(), FakeMemory()
    entry = EntryState("long64", 0x8000, gdt_address=0x12340, page_tables_address=0x20000)
    cpu_setup.enter(vcpu, memory, entry)
    assert vcpu.sregs["gdt"] == {"base": 0x12340, "limit": image.GDT_SIZE - 1}
    assert vcpu.sregs["cr3"] == 0x20000
    assert {gpa: len(data) for gpa, data in memory.writes.items()} == {
        area.start: area.size for area in entry.written_at_entry()
    }


def assert_gdt_matches_loaded_segments(gdt: bytes, sregs: dict[str, object]) -> None:
    """What CS and DS hold is what a far jump and a MOV would load from the GDT
    (Intel SDM vol. 3A §3.4.5: type, S, DPL, P, L, D/B, G in the descriptor)."""
    for name, selector in (("cs", x86.LINUX_BOOT_CS), ("ds", x86.LINUX_BOOT_DS)):
        segment = sregs[name]
        assert isinstance(segment, dict)
        (descriptor,) = struct.unpack_from("<Q", gdt, selector)
        access, flags = descriptor >> 40 & 0xFF, descriptor >> 52 & 0xF
        assert segment["selector"] == selector
        assert segment["type"] == access & 0xF, name
        assert (segment["s"], segment["dpl"], segment["present"]) == (
            access >> 4 & 1,
            access >> 5 & 3,
            access >> 7,
        )
        assert (segment["l"], segment["db"], segment["g"]) == (
            flags >> 1 & 1,
            flags >> 2 & 1,
            flags >> 3,
        ), name


def test_long_mode_entry_identity_maps_four_gib_with_2mib_pages() -> None:
    vcpu, memory = FakeVcpu(), FakeMemory()
    cpu_setup.enter(vcpu, memory, EntryState("long64", 0x1000000, {"rsi": 0x7000}))
    assert vcpu.sregs["efer"] == x86.EFER_LME | x86.EFER_LMA
    assert_gdt_matches_loaded_segments(memory.writes[0x500], vcpu.sregs)
    tables = memory.writes[0x9000]
    assert len(tables) == image.PAGE_TABLES_SIZE
    assert struct.unpack_from("<Q", tables, 0)[0] == 0xA000 | 3
    # The LAPIC page (0xFEE00000) is mapped to itself.
    index = 0xFEE00000 >> 21
    entry = struct.unpack_from("<Q", tables, 0x2000 + 8 * index)[0]
    assert entry & ~0xFFF == 0xFEE00000 and entry & 0x83 == 0x83


def test_with_lvt_replaces_only_the_lint_registers_it_is_given() -> None:
    """SDM vol. 3A 11.5.1: LVT LINT0 at 0x350, LINT1 at 0x360; firmware sets ExtINT
    (0x700) and NMI (0x400) there, unmasked."""
    state = bytes(range(256)) * 4
    firmware = with_lvt(state, lint0=LINT0_EXTINT, lint1=LINT1_NMI)
    assert struct.unpack_from("<I", firmware, 0x350)[0] == 0x700
    assert struct.unpack_from("<I", firmware, 0x360)[0] == 0x400
    untouched = [i for i in range(1024) if not 0x350 <= i < 0x354 and not 0x360 <= i < 0x364]
    assert all(firmware[i] == state[i] for i in untouched)
    masked = with_lvt(firmware, lint1=LINT1_NMI | 0x10000)
    assert masked[0x350:0x354] == firmware[0x350:0x354]
    assert struct.unpack_from("<I", masked, 0x360)[0] == 0x10400
    with pytest.raises(ValueError, match="1024"):
        with_lvt(b"short", lint0=0)


def test_cpuid_carries_each_vcpus_apic_id() -> None:
    supported = [(1, 0, 0, 0x806F8, 0x00010800, 0, 0), (0xB, 0, 1, 0, 1, 0x100, 0)]
    second = cpuid_for_vcpu(supported, 1, 2)
    assert second[0][4] >> 24 == 1 and (second[0][4] >> 16) & 0xFF == 2
    assert second[0][5] & HYPERVISOR_BIT
    assert second[1][6] == 1
