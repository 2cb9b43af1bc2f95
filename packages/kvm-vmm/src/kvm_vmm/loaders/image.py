"""What every loader produces: bytes at guest-physical addresses and a CPU state."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvm_vmm import board, layout
from kvm_vmm.layout import Region, ram_regions
from kvm_vmm.loaders.boot_memory import describe
from kvm_vmm.loaders.errors import PlacementError
from kvmfast.x86 import PAGE_TABLE_SIZE, linux_boot_gdt

# "protected32": flat 4 GiB segments, paging off. "long64": identity page
# tables (EntryState.page_tables_address), paging on.
EntryMode = Literal["protected32", "long64"]

RFLAGS_RESERVED_ONE = 0x2  # bit 1 always reads 1; IF clear: interrupts off

# What kvm_vmm.cpu_setup writes at entry besides the segments: kvmfast.x86's
# linux_boot_gdt (the same size in both modes) and, for long mode only, page tables
# identity-mapping 4 GiB (PML4, PDPT, one page directory per GiB).
GDT_SIZE = len(linux_boot_gdt(long_mode=True))
IDENTITY_MAP_GIB = 4  # covers RAM below the PCI hole and the IOAPIC/LAPIC pages
PAGE_TABLES_SIZE = PAGE_TABLE_SIZE * (2 + IDENTITY_MAP_GIB)

# Device windows no segment can reach: named when a segment runs into one. An xAPIC's
# registers take a 4 KiB page (Intel SDM vol. 3A §11.4.1); the IOAPIC is given one too.
MMIO_WINDOWS = (
    board.PCI_MMIO_WINDOW,
    board.PCI_ECAM_WINDOW,
    Region("IOAPIC window", board.IOAPIC_ADDRESS, layout.PAGE_SIZE),
    Region("local APIC window", board.LAPIC_ADDRESS, layout.PAGE_SIZE),
)


@dataclass(frozen=True)
class EntryState:
    """The vCPU state a boot protocol promises the kernel at its first instruction.

    ``registers`` holds general registers by their 64-bit name ("rax", "rbx",
    "rsi", ...); those not named are zero.
    """

    mode: EntryMode
    rip: int
    registers: dict[str, int] = field(default_factory=dict)
    rflags: int = RFLAGS_RESERVED_ONE
    gdt_address: int = layout.BOOT_GDT.start
    page_tables_address: int = layout.BOOT_PAGE_TABLES.start

    def written_at_entry(self) -> list[Region]:
        """The boot structures cpu_setup writes when it enters this state."""
        areas = [Region("boot GDT", self.gdt_address, GDT_SIZE)]
        if self.mode == "long64":
            areas.append(Region("boot page tables", self.page_tables_address, PAGE_TABLES_SIZE))
        return areas


@dataclass
class LoadedImage:
    """A kernel ready to be written into guest RAM.

    ``segments`` are all the bytes to write, kernel and boot data alike, in
    no particular order; none overlaps another, nor the structures the entry
    state writes. ``reserved`` lists the ranges (start, size) of the VMM's
    own boot data (zero page, Multiboot information, command line): they may
    lie in areas forbidden to the kernel. ``notes`` are things the user
    should know that did not stop the load.
    """

    segments: list[tuple[int, bytes]]
    entry_state: EntryState
    reserved: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _outside_ram(gpa: int, size: int, ram: str) -> PlacementError:
    for window in MMIO_WINDOWS:
        if window.overlaps(gpa, size):
            return PlacementError(
                f"segment {describe(gpa, size)} overlaps the {window.name} "
                f"({describe(window.start, window.size)}), which is not RAM"
            )
    return PlacementError(
        f"load address 0x{gpa:x} outside RAM: segment {describe(gpa, size)} "
        f"does not fit in guest RAM ({ram})"
    )


def check_segments(
    segments: Sequence[tuple[int, bytes]],
    ram_size: int,
    forbidden_ranges: Iterable[Region] = (),
    reserved: Iterable[tuple[int, int]] = (),
) -> None:
    """Raise :class:`PlacementError` unless every segment lies inside one RAM region,
    overlaps no other segment, and overlaps none of ``forbidden_ranges`` (a boot
    protocol's fixed areas) except where it lies inside one of ``reserved``."""
    regions = ram_regions(ram_size)
    ram = ", ".join(describe(region.start, region.size) for region in regions)
    forbidden = list(forbidden_ranges)
    own = [Region("boot data", start, size) for start, size in reserved]
    for gpa, data in segments:
        size = len(data)
        if gpa < 0 or not any(region.contains(gpa, size) for region in regions):
            raise _outside_ram(gpa, size, ram)
        if any(region.contains(gpa, size) for region in own):
            continue
        for area in forbidden:
            if area.overlaps(gpa, size):
                raise PlacementError(
                    f"segment {describe(gpa, size)} overlaps the VMM's {area.name} area "
                    f"({describe(area.start, area.size)})"
                )
    ordered = sorted((gpa, len(data)) for gpa, data in segments if data)
    for (first, first_size), (second, second_size) in itertools.pairwise(ordered):
        if second < first + first_size:
            raise PlacementError(
                f"segments {describe(first, first_size)} and {describe(second, second_size)} "
                "overlap"
            )


def check_fits(image: LoadedImage, ram_size: int, forbidden_ranges: Iterable[Region] = ()) -> None:
    """Raise :class:`PlacementError` unless every segment can be written as it is.

    The segments as :func:`check_segments` wants them (the image's own boot data,
    ``image.reserved``, may lie in ``forbidden_ranges``), and what the entry state
    writes (its GDT, its page tables) inside RAM and under no segment.
    """
    check_segments(image.segments, ram_size, forbidden_ranges, image.reserved)
    regions = ram_regions(ram_size)
    ram = ", ".join(describe(region.start, region.size) for region in regions)
    for area in image.entry_state.written_at_entry():
        if not any(region.contains(area.start, area.size) for region in regions):
            raise PlacementError(
                f"the {area.name} at {describe(area.start, area.size)} is outside guest RAM ({ram})"
            )
        for gpa, data in image.segments:
            if area.overlaps(gpa, len(data)):
                raise PlacementError(
                    f"segment {describe(gpa, len(data))} overlaps the {area.name} "
                    f"({describe(area.start, area.size)}) written at entry"
                )
