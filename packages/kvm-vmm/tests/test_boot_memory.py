"""Where the VMM's boot data and ACPI tables go around a kernel: the allocator, the
ACPI tables' place in 0xE0000-0xFFFFF (ACPI 6.5 section 5.2.5.1, the legacy RSDP
scan), and a machine that moves its installed tables when a kernel loads over them."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_vmm import layout
from kvm_vmm.acpi import acpi_tables_base, build_acpi_tables, checksum
from kvm_vmm.e820 import E820Type, e820_map
from kvm_vmm.layout import Region
from kvm_vmm.loaders import EntryState, LoadedImage, PlacementError
from kvm_vmm.loaders.boot_memory import BootMemory, boot_data_windows
from kvm_vmm.machine import Machine, MachineConfig
from kvmfast.testing import require_kvm

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


def test_acpi_tables_go_around_a_kernel_in_0xe0000_to_0xfffff() -> None:
    assert acpi_tables_base(0x800) == 0xE0000
    assert acpi_tables_base(0x800, [(0x400000, 0x1000)]) == 0xE0000
    # A kernel segment ending off a 64-byte boundary: the FACS needs one.
    assert acpi_tables_base(0x800, [(0xE0000, 0x1010)]) == 0xE1040
    # A gap too small is skipped for the next one.
    assert acpi_tables_base(0x800, [(0xE0000, 0x100), (0xE0400, 0x1000)]) == 0xE1400


def test_acpi_tables_with_no_gap_in_the_scanned_range_are_refused_naming_both() -> None:
    with pytest.raises(
        PlacementError,
        match=r"no room for the ACPI tables \(2048 bytes\) in 0xe0000-0xfffff; "
        r"taken there: the kernel's segment 0xd0000-0xfffbf; .* legacy RSDP scan",
    ):
        acpi_tables_base(0x800, [(0xD0000, 0x2FFC0), (0x100000, 0x1000)])


def legacy_scan(machine: Machine) -> int | None:
    """The first RSDP on a 16-byte boundary of 0xE0000-0xFFFFF with a good checksum."""
    area = machine.read_memory(layout.ACPI_TABLES.start, layout.ACPI_TABLES.size)
    for offset in range(0, len(area), 16):
        if area[offset : offset + 8] == b"RSD PTR " and not sum(area[offset : offset + 20]) & 0xFF:
            return layout.ACPI_TABLES.start + offset
    return None


@pytest.mark.parametrize(
    ("kernel_start", "kernel_size", "moved_to"),
    [
        (0xE0000, 0x3000, 0xE3000),
        # Over the FACS but not the RSDP: the old RSDP must not stay for the scan to find.
        (0xE0040, 0x100, 0xE0140),
    ],
)
def test_machine_moves_its_acpi_tables_when_a_kernel_loads_over_them(
    kernel_start: int, kernel_size: int, moved_to: int
) -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=RAM, cpus=2)) as machine:
        assert machine.install_acpi_tables() == 0xE0000
        kernel = b"\xf4" * kernel_size
        entry = EntryState("protected32", kernel_start)
        machine.load(LoadedImage([(kernel_start, kernel)], entry))
        rsdp = legacy_scan(machine)
        assert rsdp == moved_to
        assert machine.acpi_tables is not None and machine.acpi_tables.start == rsdp
        assert machine.read_memory(kernel_start, len(kernel)) == kernel
        expected, _ = build_acpi_tables(machine.platform.table, 2, rsdp)
        assert machine.read_memory(rsdp, len(expected)) == expected
        (rsdt,) = struct.unpack("<I", machine.read_memory(rsdp + 16, 4))
        header = machine.read_memory(rsdt, 36)
        (length,) = struct.unpack_from("<I", header, 4)
        assert header[:4] == b"RSDT" and checksum(machine.read_memory(rsdt, length)) == 0


def test_machine_keeps_its_tables_under_a_kernel_that_leaves_them_alone() -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=RAM)) as machine:
        machine.install_acpi_tables()
        machine.load(LoadedImage([(0xFF000, bytes(0x2000))], EntryState("protected32", 0xFF000)))
        assert legacy_scan(machine) == 0xE0000


def test_machine_refuses_a_kernel_over_the_whole_scanned_range() -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=RAM)) as machine:
        machine.install_acpi_tables()
        image = LoadedImage([(0xE0000, bytes(0x20000))], EntryState("protected32", 0xE0000))
        with pytest.raises(PlacementError, match=r"ACPI tables.* segment 0xe0000-0xfffff"):
            machine.load(image)
