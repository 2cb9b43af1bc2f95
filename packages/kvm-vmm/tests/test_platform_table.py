"""The platform table: the board's devices where guests expect them, conflicts refused."""

from __future__ import annotations

import pytest

from kvm_vmm import board, layout
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.platform_table import Description, PlatformTable, Window, pc_board, pio
from kvm_vmm.resources import ResourceConflict, ResourceExhausted
from kvmfast.testing import require_kvm

# Every window a guest of this VMM has found its devices at (space, base, length, name).
PC_WINDOWS = {
    ("pio", 0x20, 2, "pic-master"),
    ("pio", 0xA0, 2, "pic-slave"),
    ("pio", 0x4D0, 2, "elcr"),
    ("pio", 0x40, 4, "pit"),
    ("pio", 0x61, 1, "port61"),
    ("pio", 0x3F8, 8, "com1"),
    ("pio", 0x70, 2, "rtc"),
    ("pio", 0x60, 1, "i8042-data"),
    ("pio", 0x64, 1, "i8042-cmd"),
    ("pio", 0x600, 4, "pm1a-evt"),
    ("pio", 0x604, 2, "pm1a-cnt"),
    ("pio", 0x608, 4, "pm-tmr"),
    ("pio", 0xCF8, 8, "pci-conf"),
    ("pio", 0xCF9, 1, "reset"),  # inside pci-conf, as on PIIX/ICH
    ("mmio", 0xE000_0000, 0x1000_0000, "pci-ecam"),
    ("pio", 0x510, 2, "fw_cfg"),
    ("mmio", 0xFEC0_0000, 0x1000, "ioapic"),
}


def test_the_pc_board_keeps_every_device_where_guests_found_it() -> None:
    windows = pc_board().windows()
    assert {(w.space, w.base, w.length, w.name) for w in windows} == PC_WINDOWS
    assert len(windows) == len(PC_WINDOWS)


def test_the_pc_board_lines() -> None:
    table = pc_board()
    lines = {name: entry.irqs for name, entry in table.entries.items() if entry.irqs}
    assert lines == {
        "pic": (2,),
        "pit": (0,),
        "com1": (4,),
        "rtc": (8,),
        "i8042": (1, 12),
        "acpi-pm": (9,),
    }


def test_devices_added_later_get_the_free_isa_lines_then_pci_pins() -> None:
    table = pc_board()
    free = [table.irqs.allocate_isa(f"isa{n}") for n in range(6)]
    assert free == [3, 5, 6, 7, 10, 11]
    with pytest.raises(ResourceExhausted, match="no free ISA IRQ"):
        table.irqs.allocate_isa("one too many")
    assert [table.irqs.allocate_gsi(f"pci{n}") for n in range(8)] == list(board.PCI_INTX_GSIS)


def test_an_overlapping_window_is_refused_naming_the_device_there() -> None:
    table = pc_board()
    with pytest.raises(ResourceConflict, match=r"com2: pio \[0x3fc, 0x404\) overlaps com1"):
        table.add("com2", (pio(0x3FC, 8, "com2"),))
    with pytest.raises(ResourceConflict, match="overlaps ioapic"):
        table.add("x", (Window("mmio", board.IOAPIC_ADDRESS + 0xFFF, 2, "x"),))
    # The same numbers in the other address space are no conflict.
    table.add("ram-shadow", (Window("mmio", 0x3F8, 8, "ram-shadow"),))
    assert "com2" not in table.entries and "x" not in table.entries


def test_a_refused_device_takes_no_line() -> None:
    table = pc_board()
    with pytest.raises(ResourceConflict, match="IRQ 4 is already com1's"):
        table.add("com2", (pio(0x2F8, 8, "com2"),), (3, 4))
    assert 3 not in table.irqs.owners
    assert "com2" not in table.entries
    table.add("com2", (pio(0x2F8, 8, "com2"),), (3,))
    assert table.irqs.owners[3] == "com2"


def test_names_are_unique_and_unused_name_numbers_the_second() -> None:
    table = PlatformTable()
    table.add("doorbell", (Window("mmio", 0xD000_0000, 4, "doorbell"),))
    with pytest.raises(ResourceConflict, match="already on the platform"):
        table.add("doorbell", (Window("mmio", 0xD000_1000, 4, "doorbell"),))
    assert table.unused_name("doorbell") == "doorbell#2"
    assert table.unused_name("other") == "other"


def test_decoder_finds_the_window_holding_an_access() -> None:
    table = pc_board()
    assert table.decoder("pio", 0x3FD) == table.entry("com1").window("com1")
    assert table.decoder("pio", 0x607, 2) is None  # straddles pm1a-cnt's end... and a gap
    assert table.decoder("pio", 0x604, 2) == table.entry("acpi-pm").window("pm1a-cnt")
    assert table.decoder("mmio", 0x3F8) is None
    # The reset register is decoded by the PCI host's ports it sits among.
    assert table.decoder("pio", 0xCF9) == table.entry("pci").window("pci-conf")


def test_the_reset_register_is_described_inside_the_pci_configuration_ports() -> None:
    table = pc_board()
    reset = table.entry("reset").window("reset")
    assert (reset.base, reset.length, reset.within) == (board.RESET_PORT, 1, "pci-conf")
    assert reset in table.windows() and reset not in table.bus_windows()
    assert table.entry("pci").window("pci-conf") in table.bus_windows()


def test_a_window_inside_another_must_lie_within_a_mapped_one() -> None:
    table = pc_board()
    with pytest.raises(ValueError, match="not inside a mapped window 'pci-conf'"):
        table.add("x", (Window("pio", 0xCFE, 4, "x", within="pci-conf"),))
    with pytest.raises(ValueError, match="not inside a mapped window 'reset'"):
        table.add("x", (Window("pio", 0xCF9, 1, "x", within="reset"),))
    # Inside its enclosing window it still may not overlap another device's window.
    with pytest.raises(ResourceConflict, match=r"x: pio \[0xcf9, 0xcfa\) overlaps reset"):
        table.add("x", (Window("pio", 0xCF9, 1, "x", within="pci-conf"),))
    table.add("x", (Window("pio", 0xCFA, 1, "x", within="pci-conf"),))
    # And a device of its own on the bus may not take a port among them.
    with pytest.raises(ResourceConflict, match="overlaps pci-conf"):
        table.add("y", (pio(0xCFC, 4, "y"),))


def test_pci_windows_lie_in_the_hole_clear_of_ram_apics_and_board_ports() -> None:
    hole = layout.Region("hole", layout.PCI_HOLE_START, layout.FOUR_GIB - layout.PCI_HOLE_START)
    mmio = (board.PCI_MMIO_WINDOW, board.PCI_ECAM_WINDOW)
    for region in mmio:
        assert hole.contains(region.start, region.size)
        assert not region.overlaps(board.IOAPIC_ADDRESS, 0x1000)
        assert not region.overlaps(board.LAPIC_ADDRESS, 0x1000)
        for ram in layout.ram_regions(64 * layout.GIB):
            assert not ram.overlaps(region.start, region.size)
    assert not board.PCI_MMIO_WINDOW.overlaps(
        board.PCI_ECAM_WINDOW.start, board.PCI_ECAM_WINDOW.size
    )
    assert board.PCI_ECAM_WINDOW.size == 256 << 20  # 1 MiB of configuration space per bus
    io = board.PCI_IO_WINDOW
    assert io.end <= 0x10000
    for window in pc_board().windows():
        if window.space == "pio":
            assert not io.overlaps(window.base, window.length), window.name
    table = pc_board()
    assert table.bar_space.base == board.PCI_MMIO_WINDOW.start
    assert table.bar_space.length == board.PCI_MMIO_WINDOW.size


def test_every_board_device_says_how_the_guest_learns_of_it() -> None:
    described = {name: entry.description for name, entry in pc_board().entries.items()}
    assert described == {
        "pic": Description.LEGACY,
        "pit": Description.LEGACY,
        "port61": Description.LEGACY,
        "com1": Description.LEGACY,
        "rtc": Description.LEGACY,
        "i8042": Description.I8042,
        "acpi-pm": Description.FADT,
        "reset": Description.FADT,
        "pci": Description.PCI_HOST,
        "fw_cfg": Description.NONE,  # found by its signature, as QEMU guests probe it
        "ioapic": Description.MADT,
    }


def test_the_machine_refuses_a_device_on_a_board_port() -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=4 * layout.MIB)) as machine:
        with pytest.raises(ResourceConflict, match="overlaps com1"):
            machine.add_device_option("isa-debug-exit,iobase=0x3f8,iosize=1")
        machine.add_device_option("isa-debug-exit")
        assert machine.platform.table.entry("isa-debug-exit").windows == (
            pio(0xF4, 4, "isa-debug-exit"),
        )
        machine.add_device_option("isa-debug-exit,iobase=0x500,iosize=1")
        assert "isa-debug-exit#2" in machine.platform.table.entries
