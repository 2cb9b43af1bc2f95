"""What every loader produces: bytes at guest-physical addresses and a CPU state."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from kvm_vmm.layout import Region, ram_regions
from kvm_vmm.loaders.errors import PlacementError

# "protected32": flat 4 GiB segments, paging off. "long64": the identity page
# tables of kvm_vmm.layout.BOOT_PAGE_TABLES, paging on.
EntryMode = Literal["protected32", "long64"]

RFLAGS_RESERVED_ONE = 0x2  # bit 1 always reads 1; IF clear: interrupts off


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


@dataclass
class LoadedImage:
    """A kernel ready to be written into guest RAM.

    ``segments`` are all the bytes to write, kernel and boot data alike, in
    no particular order; none overlaps another. ``reserved`` lists the
    ranges (start, size) of boot data the loader put into the VMM's own
    areas (zero page, Multiboot information, command line): they are the
    loader's legitimate use of those areas. ``notes`` are things the user
    should know that did not stop the load.
    """

    segments: list[tuple[int, bytes]]
    entry_state: EntryState
    reserved: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _describe(start: int, size: int) -> str:
    return f"0x{start:x}-0x{start + size - 1:x}" if size else f"0x{start:x} (empty)"


def check_fits(image: LoadedImage, ram_size: int, forbidden_ranges: Iterable[Region]) -> None:
    """Raise :class:`PlacementError` unless every segment can be written as it is.

    A segment must lie inside one RAM region, must not overlap another
    segment, and must not overlap any of ``forbidden_ranges`` except where it
    is the image's own boot data (inside ``image.reserved``).
    """
    regions = ram_regions(ram_size)
    ram = ", ".join(_describe(region.start, region.size) for region in regions)
    forbidden = list(forbidden_ranges)
    own = [Region("boot data", start, size) for start, size in image.reserved]
    for gpa, data in image.segments:
        size = len(data)
        if gpa < 0 or not any(region.contains(gpa, size) for region in regions):
            raise PlacementError(
                f"load address 0x{gpa:x} outside RAM: segment {_describe(gpa, size)} "
                f"does not fit in guest RAM ({ram})"
            )
        if any(region.contains(gpa, size) for region in own):
            continue
        for area in forbidden:
            if area.overlaps(gpa, size):
                raise PlacementError(
                    f"segment {_describe(gpa, size)} overlaps the VMM's {area.name} area "
                    f"({_describe(area.start, area.size)})"
                )
    ordered = sorted((gpa, len(data)) for gpa, data in image.segments if data)
    for (first, first_size), (second, second_size) in itertools.pairwise(ordered):
        if second < first + first_size:
            raise PlacementError(
                f"segments {_describe(first, first_size)} and {_describe(second, second_size)} "
                "overlap"
            )
