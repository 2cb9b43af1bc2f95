"""Guest-physical space for the VMM's own boot data, found around what the kernel occupies.

A boot protocol whose data has no fixed address (Multiboot: the information
structure, the strings, the GDT) takes it here, as QEMU's Multiboot loader
places its data where the image is not: the kernel's segments are claimed
first, then each blob goes to the address it prefers if that is still free,
else to the lowest free address of the windows it may use. Data never goes
where the PC keeps something of its own (the real-mode IVT and BIOS data,
the EBDA, the VGA window and BIOS area), so the memory map can keep calling
it usable RAM the guest may reclaim once it has read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvm_vmm import layout
from kvm_vmm.layout import Region
from kvm_vmm.loaders.errors import PlacementError


def describe(start: int, size: int) -> str:
    return f"0x{start:x}-0x{start + size - 1:x}" if size else f"0x{start:x} (empty)"


def boot_data_windows(ram_size: int) -> tuple[Region, ...]:
    """Where boot data may go: usable RAM below the EBDA above the IVT and BIOS data,
    then usable RAM from 1 MiB to the PCI hole (32-bit pointers reach all of it)."""
    low_end = layout.low_ram_end(ram_size)
    windows = []
    low_start, low_top = layout.REAL_MODE_IVT.end, min(low_end, layout.LOW_MEMORY_END)
    if low_top > low_start:
        windows.append(Region("low RAM", low_start, low_top - low_start))
    if low_end > layout.HIGH_MEMORY_START:
        windows.append(
            Region("RAM above 1 MiB", layout.HIGH_MEMORY_START, low_end - layout.HIGH_MEMORY_START)
        )
    return tuple(windows)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class BootMemory:
    """What is taken in guest RAM while a boot is being laid out."""

    ram_size: int
    used: list[Region] = field(default_factory=list)

    def claim(self, region: Region) -> None:
        """Take ``region`` where it is (a kernel segment, a module): refuse only if
        something already taken overlaps it, naming both."""
        for other in self.used:
            if other.overlaps(region.start, region.size):
                raise PlacementError(
                    f"{region.name} {describe(region.start, region.size)} overlaps "
                    f"{other.name} {describe(other.start, other.size)}"
                )
        if region.size:
            self.used.append(region)

    def is_free(self, start: int, size: int) -> bool:
        return not any(other.overlaps(start, size) for other in self.used)

    def place(
        self,
        name: str,
        size: int,
        *,
        alignment: int = 16,
        prefer: int | None = None,
        windows: Sequence[Region] | None = None,
    ) -> Region:
        """Take ``size`` bytes for ``name``: at ``prefer`` if it is free and inside one of
        ``windows`` (default :func:`boot_data_windows`), else at the lowest free aligned
        address of the first window with room."""
        if windows is None:
            windows = boot_data_windows(self.ram_size)
        if size <= 0:
            raise ValueError(f"{name}: cannot place {size} bytes")
        if (
            prefer is not None
            and any(window.contains(prefer, size) for window in windows)
            and self.is_free(prefer, size)
        ):
            return self._take(name, prefer, size)
        for window in windows:
            start = self._first_fit(window, size, alignment)
            if start is not None:
                return self._take(name, start, size)
        taken = ", ".join(
            f"{region.name} {describe(region.start, region.size)}"
            for region in sorted(self.used, key=lambda region: region.start)
            if any(window.overlaps(region.start, region.size) for window in windows)
        )
        where = ", ".join(describe(window.start, window.size) for window in windows)
        raise PlacementError(
            f"no room for the {name} ({size} bytes) in {where or 'guest RAM'}; "
            f"taken there: {taken or 'nothing, RAM is too small'}"
        )

    def _first_fit(self, window: Region, size: int, alignment: int) -> int | None:
        cursor = _align_up(window.start, alignment)
        for other in sorted(self.used, key=lambda region: region.start):
            if other.end <= cursor:
                continue
            if other.start >= cursor + size:
                break
            cursor = _align_up(other.end, alignment)
        return cursor if window.contains(cursor, size) else None

    def _take(self, name: str, start: int, size: int) -> Region:
        region = Region(name, start, size)
        self.used.append(region)
        return region
