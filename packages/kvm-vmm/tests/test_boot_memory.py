"""The allocator of the VMM's boot data: claims, preferred addresses, first fit, and
windows that stay in RAM the memory map calls usable."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_vmm import layout
from kvm_vmm.e820 import E820Type, e820_map
from kvm_vmm.layout import Region
from kvm_vmm.loaders import PlacementError
from kvm_vmm.loaders.boot_memory import BootMemory, boot_data_windows

RAM = 64 * layout.MIB


def test_windows_are_the_usable_ram_outside_the_pcs_own_areas() -> None:
    assert boot_data_windows(RAM) == (
        Region("low RAM", 0x500, 0x9FC00 - 0x500),
        Region("RAM above 1 MiB", 0x100000, RAM - 0x100000),
    )
    usable = [e for e in e820_map(RAM) if e.type == E820Type.RAM]
    for window in boot_data_windows(RAM):
        assert any(e.addr <= window.start and window.end <= e.end for e in usable)
    # RAM smaller than 1 MiB has only the low window, cut where RAM ends.
    assert boot_data_windows(0x80000) == (Region("low RAM", 0x500, 0x80000 - 0x500),)


def test_preferred_address_is_taken_when_free_else_the_first_fit() -> None:
    memory = BootMemory(RAM)
    assert memory.place("a", 0x100, prefer=0x8000) == Region("a", 0x8000, 0x100)
    # 0x8000 is taken now: the lowest aligned free address instead.
    assert memory.place("b", 0x100, prefer=0x8000) == Region("b", 0x500, 0x100)
    memory = BootMemory(RAM)
    memory.claim(Region("kernel", 0x500, 0x9F700))
    assert memory.place("c", 8, alignment=64) == Region("c", 0x100000, 8)
    # A preferred address outside the windows (the EBDA) is not honoured.
    assert memory.place("d", 8, prefer=0x9FC00).start == 0x100010


def test_claim_refuses_a_collision_naming_both_sides() -> None:
    memory = BootMemory(RAM)
    memory.claim(Region("the kernel's segment", 0x8000, 0x286C))
    with pytest.raises(PlacementError, match=r"module 0 0xa000-0xafff overlaps the kernel's "):
        memory.claim(Region("module 0", 0xA000, 0x1000))


def test_no_room_names_the_windows_and_what_fills_them() -> None:
    memory = BootMemory(0x80000)
    memory.claim(Region("the kernel's segment", 0x400, 0x7FC00))
    with pytest.raises(
        PlacementError,
        match=r"no room for the GDT \(32 bytes\) in 0x500-0x7ffff; "
        r"taken there: the kernel's segment 0x400-0x7ffff$",
    ):
        memory.place("GDT", 32)


@given(
    claims=st.lists(
        st.tuples(st.integers(0, 0x200000), st.integers(1, 0x40000)), max_size=8, unique=True
    ),
    size=st.integers(1, 0x20000),
    alignment=st.sampled_from([1, 8, 16, 64, 4096]),
    prefer=st.none() | st.integers(0, 0x200000),
)
def test_placed_data_is_aligned_free_and_inside_a_window(
    claims: list[tuple[int, int]], size: int, alignment: int, prefer: int | None
) -> None:
    ram = 0x300000
    memory = BootMemory(ram)
    for index, (start, length) in enumerate(claims):
        region = Region(f"segment {index}", start, length)
        if memory.is_free(start, length):
            memory.claim(region)
    taken = list(memory.used)
    try:
        placed = memory.place("blob", size, alignment=alignment, prefer=prefer)
    except PlacementError:
        return
    assert placed.start == prefer or placed.start % alignment == 0
    assert not any(other.overlaps(placed.start, placed.size) for other in taken)
    assert any(window.contains(placed.start, placed.size) for window in boot_data_windows(ram))
