"""Guest RAM as a file of its own: each RAM slot at its offset, zero pages left as holes.

The file is as long as the guest's RAM; a page never written by the guest (or written
back to zeros) is a hole, so a freshly booted 512 MiB guest takes what it used on disk.
A restore maps it MAP_PRIVATE (pages load when first touched, guest writes are
copy-on-write and never reach the file) or, asked to copy, reads it in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import kvmfast

MEMORY_FILE = "memory.bin"


@dataclass(frozen=True)
class RamSlot:
    """One RAM slot in the memory file."""

    guest_phys_addr: int
    size: int
    file_offset: int


def slots_for(regions: Sequence[tuple[int, int]]) -> list[RamSlot]:
    """The file's layout for RAM ``regions`` (guest address, size): one after another."""
    slots, offset = [], 0
    for start, size in regions:
        slots.append(RamSlot(start, size, offset))
        offset += size
    return slots


def write_memory_file(path: Path, ram: Sequence[kvmfast.GuestMemory]) -> int:
    """Write every slot of ``ram`` to ``path`` (created), sparse; the bytes written."""
    slots = slots_for([(memory.guest_phys_addr, memory.size) for memory in ram])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, sum(slot.size for slot in slots))  # the holes: zero pages
        pairs = zip(ram, slots, strict=True)
        written = sum(memory.save_to(fd, slot.file_offset) for memory, slot in pairs)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def memory_file_problem(path: Path, expected_size: int) -> str | None:
    """Why ``path`` cannot be this snapshot's memory file, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"its memory file {path.name} is missing"
    except OSError as error:
        return f"its memory file {path.name} cannot be read: {error.strerror}"
    if size < expected_size:
        return f"its memory file {path.name} is truncated: {size} bytes of {expected_size}"
    if size > expected_size:
        return f"its memory file {path.name} is {size} bytes, not the {expected_size} of its RAM"
    if not os.access(path, os.R_OK):
        return f"its memory file {path.name} is not readable"
    return None


@dataclass(frozen=True)
class RamBacking:
    """Guest RAM to come from a snapshot's memory file: mapped copy-on-write, or read in."""

    path: Path
    slots: tuple[RamSlot, ...]
    copy: bool = False

    def slot_for(self, guest_phys_addr: int, size: int) -> RamSlot:
        for slot in self.slots:
            if (slot.guest_phys_addr, slot.size) == (guest_phys_addr, size):
                return slot
        raise ValueError(
            f"{self.path}: no RAM slot at {guest_phys_addr:#x} of {size} bytes in the memory file"
        )
