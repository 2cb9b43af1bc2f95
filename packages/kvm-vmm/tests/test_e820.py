"""The E820 map (ACPI 6.5 section 15, "System Address Map Interfaces") against the
guest memory layout."""

from __future__ import annotations

import itertools
import struct

import pytest

from kvm_vmm import board, layout
from kvm_vmm.e820 import E820Entry, E820Type, e820_map

MIB = layout.MIB
GIB = layout.GIB
ECAM = E820Entry(board.PCI_ECAM_WINDOW.start, board.PCI_ECAM_WINDOW.size, E820Type.RESERVED)


def ram_entries(ram_size: int) -> list[E820Entry]:
    """The map without the ECAM window, which is no RAM's."""
    return [entry for entry in e820_map(ram_size) if entry != ECAM]


def test_small_guest_map_follows_the_pc_layout() -> None:
    assert e820_map(256 * MIB) == [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820Type.RESERVED),
        E820Entry(0x100000, 256 * MIB - 0x100000, E820Type.RAM),
        ECAM,
    ]


@pytest.mark.parametrize("ram_size", [0x80000, 256 * MIB, 3 * GIB, 5 * GIB])
def test_the_pci_ecam_window_is_reserved_as_firmware_reserves_it(ram_size: int) -> None:
    """PCI Firmware Spec 3.2 §4.1.2: the MCFG's window must be reserved; Linux takes an
    E820 reserved entry covering it (arch/x86/pci/mmconfig-shared.c)."""
    entries = e820_map(ram_size)
    assert [e for e in entries if e.addr < ECAM.end and ECAM.addr < e.end] == [ECAM]


def test_ram_beyond_3_gib_moves_above_4_gib() -> None:
    entries = e820_map(5 * GIB)
    assert entries[-3] == E820Entry(0x100000, 3 * GIB - 0x100000, E820Type.RAM)
    assert entries[-2] == ECAM
    assert entries[-1] == E820Entry(4 * GIB, 2 * GIB, E820Type.RAM)
    assert not any(e.addr < 4 * GIB and e.end > 3 * GIB for e in ram_entries(5 * GIB))


def test_exactly_3_gib_has_no_high_entry() -> None:
    assert ram_entries(3 * GIB)[-1].end == 3 * GIB


def test_ram_smaller_than_1_mib_reports_only_what_exists() -> None:
    assert ram_entries(0x80000) == [E820Entry(0, 0x80000, E820Type.RAM)]
    assert ram_entries(0xC0000) == [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0xC0000 - 0x9FC00, E820Type.RESERVED),
    ]


def test_zero_ram_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        e820_map(0)


def test_entry_packs_as_linux_boot_e820_entry() -> None:
    packed = E820Entry(0x100000, 0x2000, E820Type.RESERVED).pack()
    assert packed == struct.pack("<QQI", 0x100000, 0x2000, 2)
    assert len(packed) == 20


@pytest.mark.parametrize(
    "ram_size",
    [
        1,
        0x9FBFF,
        0x9FC00,
        0x9FC01,
        0xFFFFF,
        0x100000,
        0x100001,
        16 * MIB + 0x123,
        3 * GIB - 1,
        3 * GIB,
        3 * GIB + 1,
        4 * GIB,
        64 * GIB,
    ],
)
def test_map_is_sorted_disjoint_and_covers_exactly_the_ram(ram_size: int) -> None:
    for first, second in itertools.pairwise(e820_map(ram_size)):
        assert first.end <= second.addr
    entries = ram_entries(ram_size)
    assert all(entry.size > 0 for entry in entries)
    assert sum(entry.size for entry in entries) == ram_size
    regions = layout.ram_regions(ram_size)
    for entry in entries:
        assert any(r.contains(entry.addr, entry.size) for r in regions)
    # The VMM's boot areas are usable RAM; the EBDA and BIOS hole are not.
    usable = [e for e in entries if e.type == E820Type.RAM]
    for area in (layout.ZERO_PAGE, layout.MULTIBOOT_INFO, layout.COMMAND_LINE):
        if area.end <= ram_size:
            assert any(e.addr <= area.start and area.end <= e.end for e in usable)
    assert not any(e.addr < 0x100000 and e.end > 0x9FC00 for e in usable)
