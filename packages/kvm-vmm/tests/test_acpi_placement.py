"""Where the ACPI tables go (kvm_vmm.acpi_placement): 0xE0000-0xFFFFF, around a kernel
loaded there, the RSDP apart when no gap holds them all. Read back as an OS without
UEFI finds them: the legacy scan of 16-byte boundaries in 0xE0000-0xFFFFF (ACPI 6.5
section 5.2.5.1), then RSDP -> RSDT/XSDT -> FADT -> DSDT/FACS (sections 5.2.5-5.2.10).
Also a machine that moves its installed tables when a kernel loads over them."""

from __future__ import annotations

import struct

import pytest

from kvm_vmm import layout
from kvm_vmm.acpi import AcpiError, build_acpi_tables, build_acpi_tables_apart, checksum
from kvm_vmm.acpi_placement import OPTION_ROM_AREA, PlacedAcpiTables, place_acpi_tables
from kvm_vmm.e820 import E820Type, e820_map
from kvm_vmm.loaders import EntryState, LoadedImage, PlacementError
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.platform_table import pc_board
from kvmfast.testing import require_kvm

RAM = 64 * layout.MIB
SCAN = range(layout.ACPI_TABLES.start, layout.ACPI_TABLES.end, 16)


def scan_for_rsdp(memory: bytes | bytearray, start: int = 0) -> int | None:
    """The first RSDP the legacy scan finds; ``memory`` holds guest RAM from ``start``."""
    for address in SCAN:
        data = memory[address - start : address - start + 20]
        if data[:8] == b"RSD PTR " and not sum(data) & 0xFF:
            return address
    return None


def walk(memory: bytes | bytearray, rsdp: int) -> dict[bytes, tuple[int, int]]:
    """Signature -> (address, length) of every table reached from the RSDP, each
    checked: signature where it is named, checksum (the FACS has none)."""

    def table(address: int, signature: bytes) -> tuple[int, int]:
        assert memory[address : address + 4] == signature, hex(address)
        length = 64 if signature == b"FACS" else struct.unpack_from("<I", memory, address + 4)[0]
        if signature != b"FACS":
            assert checksum(memory[address : address + length]) == 0, signature
        return address, length

    assert not sum(memory[rsdp : rsdp + 36]) & 0xFF  # the extended checksum (5.2.5.3)
    rsdt, _, xsdt = struct.unpack_from("<IIQ", memory, rsdp + 16)
    found = {b"RSDT": table(rsdt, b"RSDT"), b"XSDT": table(xsdt, b"XSDT")}
    for (entry_size, fmt), (address, length) in zip(
        ((4, "<I"), (8, "<Q")), (found[b"RSDT"], found[b"XSDT"]), strict=True
    ):
        for offset in range(36, length, entry_size):
            (pointed,) = struct.unpack_from(fmt, memory, address + offset)
            signature = bytes(memory[pointed : pointed + 4])
            found[signature] = table(pointed, signature)
    fadt = found[b"FACP"][0]
    facs, dsdt = struct.unpack_from("<QQ", memory, fadt + 132)
    found[b"FACS"], found[b"DSDT"] = table(facs, b"FACS"), table(dsdt, b"DSDT")
    assert facs % 64 == 0  # section 5.2.10
    return found


def written(placed: PlacedAcpiTables) -> bytearray:
    memory = bytearray(layout.HIGH_MEMORY_START)
    for gpa, data in placed.pieces:
        memory[gpa : gpa + len(data)] = data
    return memory


def assert_found_clear_of(placed: PlacedAcpiTables, occupied: list[tuple[int, int]]) -> None:
    memory = written(placed)
    assert scan_for_rsdp(memory) == placed.rsdp
    tables = walk(memory, placed.rsdp)
    assert set(tables) == {b"RSDT", b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT", b"FACS"}
    reserved = [e for e in e820_map(RAM) if e.type == E820Type.RESERVED]
    for address, length in [(placed.rsdp, 36), *tables.values()]:
        assert not any(start < address + length and address < start + size
                       for start, size in occupied), hex(address)  # fmt: skip
        assert any(e.addr <= address and address + length <= e.end for e in reserved)


def test_tables_stay_at_0xe0000_when_the_kernel_leaves_it_free() -> None:
    placed = place_acpi_tables(pc_board(), 2, [(0x400000, 0x1000), (0x8000, 0x3000)])
    blob, rsdp = build_acpi_tables(pc_board(), 2)
    assert placed == PlacedAcpiTables([(0xE0000, blob)], rsdp)


@pytest.mark.parametrize(
    ("occupied", "base"),
    [
        ([(0xE0000, 0x1000)], 0xE1000),
        # A segment ending off a 64-byte boundary: the FACS needs one.
        ([(0xE0000, 0x1010)], 0xE1040),
        # A gap too small is skipped for the next one.
        ([(0xE0000, 0x100), (0xE0200, 0x1000)], 0xE1200),
    ],
)
def test_tables_go_whole_to_the_first_gap_of_the_scanned_range(
    occupied: list[tuple[int, int]], base: int
) -> None:
    placed = place_acpi_tables(pc_board(), 2, occupied)
    assert [gpa for gpa, _ in placed.pieces] == [base] and placed.rsdp == base
    assert_found_clear_of(placed, occupied)


def test_without_a_gap_for_all_of_them_the_rsdp_goes_apart() -> None:
    """The kernel leaves 0x40 bytes at 0xFFFC0 only: the RSDP there, the rest below
    0xE0000 in the option ROM area (reserved in the memory map too)."""
    occupied = [(0xD0000, 0x2FFC0)]
    placed = place_acpi_tables(pc_board(), 4, occupied)
    assert placed.rsdp == 0xFFFC0
    ((rsdp, rsdp_bytes), (rest, _)) = placed.pieces
    assert (rsdp, len(rsdp_bytes)) == (0xFFFC0, 36)
    assert rest == OPTION_ROM_AREA.start
    assert_found_clear_of(placed, occupied)


def test_no_slot_for_the_rsdp_is_refused_naming_both_sides() -> None:
    with pytest.raises(
        PlacementError,
        match=r"no room for the RSDP \(36 bytes\) in 0xe0000-0xfffff; "
        r"taken there: the kernel's segment 0xd0000-0xfffdf; .* legacy scan",
    ):
        place_acpi_tables(pc_board(), 1, [(0xD0000, 0x2FFE0), (0x100000, 0x1000)])


def test_no_room_for_the_rest_below_is_refused_naming_both_sides() -> None:
    with pytest.raises(
        PlacementError,
        match=r"no room for the ACPI tables \(\d+ bytes\) in 0xc0000-0xfffff; "
        r"taken there: the kernel's segment 0xc0000-0xfffbf, RSDP 0xfffc0-0xfffe3$",
    ):
        place_acpi_tables(pc_board(), 1, [(0xC0000, 0x3FFC0)])


def guest_low_memory(machine: Machine) -> bytes:
    return machine.read_memory(0, layout.HIGH_MEMORY_START)


@pytest.mark.parametrize(
    ("kernel_start", "kernel_size", "pieces"),
    [
        (0xE0000, 0x3000, [0xE3000]),
        # Over the FACS but not the RSDP: the old RSDP must not stay for the scan to find.
        (0xE0040, 0x100, [0xE0140]),
        # Room for the RSDP only: it goes apart, the rest to the option ROM area.
        (0xD0000, 0x2FFC0, [0xFFFC0, 0xC0000]),
    ],
)
def test_machine_moves_its_acpi_tables_when_a_kernel_loads_over_them(
    kernel_start: int, kernel_size: int, pieces: list[int]
) -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=RAM, cpus=2)) as machine:
        assert machine.install_acpi_tables() == 0xE0000
        kernel = b"\xf4" * kernel_size
        entry = EntryState("protected32", kernel_start)
        machine.load(LoadedImage([(kernel_start, kernel)], entry))
        memory = guest_low_memory(machine)
        assert scan_for_rsdp(memory) == pieces[0]
        assert [region.start for region in machine.acpi_tables] == pieces
        assert memory[kernel_start : kernel_start + kernel_size] == kernel
        tables = walk(memory, pieces[0])
        assert set(tables) == {b"RSDT", b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT", b"FACS"}
        for address, length in tables.values():
            assert not (kernel_start < address + length and address < kernel_start + kernel_size)


def test_machine_keeps_its_tables_under_a_kernel_that_leaves_them_alone() -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=RAM)) as machine:
        machine.install_acpi_tables()
        machine.load(LoadedImage([(0xFF000, bytes(0x2000))], EntryState("protected32", 0xFF000)))
        assert scan_for_rsdp(guest_low_memory(machine)) == 0xE0000


def test_machine_refuses_a_kernel_over_the_whole_scanned_range() -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=RAM)) as machine:
        machine.install_acpi_tables()
        image = LoadedImage([(0xE0000, bytes(0x20000))], EntryState("protected32", 0xE0000))
        with pytest.raises(PlacementError, match=r"no room for the RSDP .* 0xe0000-0xfffff;"):
            machine.load(image)


def test_tables_apart_need_an_aligned_rsdp_and_base() -> None:
    with pytest.raises(AcpiError, match="RSDP address 0xfff08 is not 16-byte aligned"):
        build_acpi_tables_apart(pc_board(), 1, 0xFFF08, 0xC0000)
    with pytest.raises(AcpiError, match="base 0xc0010 is not 64-byte aligned"):
        build_acpi_tables_apart(pc_board(), 1, 0xFFF00, 0xC0010)
