"""The IRQ and BAR-window allocators: conflicts, exhaustion, alignment."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_vmm.resources import (
    IrqAllocator,
    ResourceConflict,
    ResourceError,
    ResourceExhausted,
    WindowAllocator,
)


def test_a_claimed_line_is_refused_to_the_next_owner_by_name() -> None:
    irqs = IrqAllocator(pins=24, isa_irqs=16)
    assert irqs.claim(4, "com1") == 4
    with pytest.raises(ResourceConflict, match="com2: IRQ 4 is already com1's"):
        irqs.claim(4, "com2")
    assert irqs.owners == {4: "com1"}


@pytest.mark.parametrize("line", [-1, 24])
def test_a_line_outside_the_ioapic_is_refused(line: int) -> None:
    with pytest.raises(ResourceError, match=r"outside the IOAPIC's 0\.\.23"):
        IrqAllocator(pins=24, isa_irqs=16).claim(line, "x")


def test_isa_allocation_skips_taken_lines_and_stays_below_16() -> None:
    irqs = IrqAllocator(pins=24, isa_irqs=16)
    for line in (0, 1, 2, 4):
        irqs.claim(line, f"board{line}")
    assert [irqs.allocate_isa(f"dev{n}") for n in range(3)] == [3, 5, 6]
    for line in range(7, 16):
        irqs.claim(line, "taken")
    with pytest.raises(ResourceExhausted, match=r"late: no free ISA IRQ left \(all of 0\.\.15"):
        irqs.allocate_isa("late")
    assert 16 not in irqs.owners  # exhaustion of ISA lines never spills onto PCI pins


def test_gsi_allocation_hands_out_pins_16_to_23_then_refuses() -> None:
    irqs = IrqAllocator(pins=24, isa_irqs=16)
    assert [irqs.allocate_gsi(f"pci{n}") for n in range(8)] == list(range(16, 24))
    with pytest.raises(ResourceExhausted, match="pci8: no free IOAPIC pin above ISA"):
        irqs.allocate_gsi("pci8")
    assert all(line not in irqs.owners for line in range(16))


def test_bars_are_naturally_aligned_and_do_not_overlap() -> None:
    window = WindowAllocator("test", 0x1000_0000, 0x100_0000)
    small = window.allocate(0x1000, "a")
    big = window.allocate(0x10_0000, "b")
    after = window.allocate(0x1000, "c")
    assert small == 0x1000_0000
    assert big == 0x1010_0000  # rounded up to its own size, past a
    assert after == 0x1020_0000
    assert window.owners == [(small, 0x1000, "a"), (big, 0x10_0000, "b"), (after, 0x1000, "c")]


def test_a_larger_alignment_is_honoured() -> None:
    window = WindowAllocator("test", 0x1000, 0x10_0000)
    assert window.allocate(0x10, "a", alignment=0x1000) == 0x1000
    assert window.allocate(0x10, "b", alignment=0x1000) == 0x2000


def test_exhaustion_is_refused_with_the_window_named_and_nothing_taken() -> None:
    window = WindowAllocator("PCI memory BARs", 0xC000_0000, 0x2000)
    window.allocate(0x1000, "a")
    window.allocate(0x1000, "b")
    with pytest.raises(ResourceExhausted, match=r"c: 0x1000 bytes do not fit in the PCI memory"):
        window.allocate(0x1000, "c")
    assert [owner for _, _, owner in window.owners] == ["a", "b"]
    # An unaligned base does not let a block straddle the end either.
    odd = WindowAllocator("odd", 0x1800, 0x1800)
    with pytest.raises(ResourceExhausted):
        odd.allocate(0x2000, "x")
    assert odd.allocate(0x800, "y") == 0x1800


@pytest.mark.parametrize(("size", "alignment"), [(0, 1), (0x3000, 1), (-0x1000, 1), (0x1000, 3)])
def test_sizes_and_alignments_that_are_not_powers_of_two_are_refused(
    size: int, alignment: int
) -> None:
    with pytest.raises(ResourceError, match="power of two"):
        WindowAllocator("w", 0, 1 << 20).allocate(size, "x", alignment)


@given(st.lists(st.tuples(st.integers(4, 20), st.integers(0, 16)), max_size=30))
def test_every_block_is_inside_aligned_and_disjoint(requests: list[tuple[int, int]]) -> None:
    base, length = 0xC000_0000, 0x40_0000
    window = WindowAllocator("w", base, length)
    for size_log, align_log in requests:
        with contextlib.suppress(ResourceExhausted):
            window.allocate(1 << size_log, "x", 1 << align_log)
    blocks = sorted((start, size) for start, size, _ in window.owners)
    for start, size in blocks:
        assert base <= start and start + size <= base + length
        assert start % size == 0
    for (first, first_size), (second, _) in itertools.pairwise(blocks):
        assert first + first_size <= second
