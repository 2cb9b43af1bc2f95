"""Where the ACPI tables go: in 0xE0000-0xFFFFF, around a kernel loaded there.

An OS without UEFI finds the RSDP by scanning the 16-byte boundaries of
0xE0000-0xFFFFF (ACPI 6.5 section 5.2.5.1; Multiboot kernels such as
kvm-unit-tests do); the other tables may lie anywhere the memory map does not
call usable. So the whole blob goes to the first gap of 0xE0000-0xFFFFF that
the kernel leaves (0xE0000 itself when it leaves that free, as before). If no
gap is large enough, the RSDP alone takes a 16-byte slot there and the other
tables the first gap of 0xC0000-0xFFFFF: option ROM space, RAM in this
machine and reserved in the memory map like the BIOS area (the VGA window
below it is left alone). Only a kernel that leaves no slot for the RSDP is
refused, naming what takes the room.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvm_vmm import layout
from kvm_vmm.acpi import (
    BLOB_ALIGNMENT,
    RSDP_ALIGNMENT,
    RSDP_SIZE,
    build_acpi_tables,
    build_acpi_tables_apart,
)
from kvm_vmm.layout import Region
from kvm_vmm.loaders.boot_memory import BootMemory
from kvm_vmm.loaders.errors import PlacementError
from kvm_vmm.platform_table import PlatformTable

OPTION_ROM_AREA = Region("option ROM and BIOS area", 0xC0000, 0x40000)


@dataclass(frozen=True)
class PlacedAcpiTables:
    """What to write where (one piece, or the RSDP and the rest), and the RSDP's address."""

    pieces: list[tuple[int, bytes]]
    rsdp: int


def _memory(occupied: Sequence[tuple[int, int]]) -> BootMemory:
    memory = BootMemory(layout.HIGH_MEMORY_START)
    for start, length in occupied:
        if OPTION_ROM_AREA.overlaps(start, length):
            memory.claim(Region("the kernel's segment", start, length))
    return memory


def place_acpi_tables(
    table: PlatformTable, ncpus: int, occupied: Sequence[tuple[int, int]] = ()
) -> PlacedAcpiTables:
    """The tables for ``ncpus`` and ``table``, built where none of ``occupied``
    (start, size) lies."""
    blob, _ = build_acpi_tables(table, ncpus)
    memory = _memory(occupied)
    try:
        base = memory.place(
            "ACPI tables",
            len(blob),
            alignment=BLOB_ALIGNMENT,
            prefer=layout.ACPI_TABLES.start,
            windows=(layout.ACPI_TABLES,),
        ).start
    except PlacementError:
        return _place_apart(table, ncpus, memory, len(blob) - RSDP_SIZE)
    blob, rsdp = build_acpi_tables(table, ncpus, base)
    return PlacedAcpiTables([(base, blob)], rsdp)


def _place_apart(
    table: PlatformTable, ncpus: int, memory: BootMemory, tables_size: int
) -> PlacedAcpiTables:
    try:
        rsdp = memory.place(
            "RSDP", RSDP_SIZE, alignment=RSDP_ALIGNMENT, windows=(layout.ACPI_TABLES,)
        ).start
    except PlacementError as error:
        raise PlacementError(
            f"{error}; the RSDP cannot go elsewhere: the legacy scan "
            "(ACPI 6.5 section 5.2.5.1) looks only there"
        ) from None
    base = memory.place(
        "ACPI tables", tables_size, alignment=BLOB_ALIGNMENT, windows=(OPTION_ROM_AREA,)
    ).start
    rsdp_bytes, tables = build_acpi_tables_apart(table, ncpus, rsdp, base)
    return PlacedAcpiTables([(rsdp, rsdp_bytes), (base, tables)], rsdp)
