"""The ACPI tables against ACPI Specification 6.5 (section numbers in each test's name or
docstring), read back by a parser written here and, where installed, by ACPICA's iasl."""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aml_reader
import pytest

from kvm_vmm import acpi, board, layout
from kvm_vmm.e820 import E820Type, e820_map
from kvm_vmm.platform_table import pc_board

BASE = layout.ACPI_TABLES.start


@dataclass
class Table:
    address: int
    signature: bytes
    revision: int
    data: bytes


def read_table(blob: bytes, address: int) -> Table:
    offset = address - BASE
    signature, length, revision = struct.unpack_from("<4sIB", blob, offset)
    return Table(address, signature, revision, blob[offset : offset + length])


def parse(blob: bytes, rsdp_address: int) -> dict[bytes, Table]:
    """Follow RSDP -> XSDT -> FADT -> DSDT/FACS as an OS does."""
    rsdp = blob[rsdp_address - BASE : rsdp_address - BASE + 36]
    _, _, _, _, rsdt, length, xsdt = struct.unpack_from("<8sB6sBIIQ", rsdp)
    assert length == 36
    tables = {b"RSDT": read_table(blob, rsdt), b"XSDT": read_table(blob, xsdt)}
    xsdt_data = tables[b"XSDT"].data
    for offset in range(36, len(xsdt_data), 8):
        (address,) = struct.unpack_from("<Q", xsdt_data, offset)
        table = read_table(blob, address)
        tables[table.signature] = table
    fadt = tables[b"FACP"].data
    (facs_address,) = struct.unpack_from("<Q", fadt, 132)
    (dsdt_address,) = struct.unpack_from("<Q", fadt, 140)
    tables[b"DSDT"] = read_table(blob, dsdt_address)
    tables[b"FACS"] = Table(
        facs_address, b"FACS", 0, blob[facs_address - BASE : facs_address - BASE + 64]
    )
    return tables


@pytest.fixture
def two_cpu_tables() -> tuple[bytes, int, dict[bytes, Table]]:
    blob, rsdp = acpi.build_acpi_tables(pc_board(), 2)
    return blob, rsdp, parse(blob, rsdp)


def test_rsdp_5_2_5_3_is_revision_2_with_both_checksums_in_legacy_scan_window() -> None:
    blob, rsdp = acpi.build_acpi_tables(pc_board(), 1)
    assert rsdp == BASE
    assert rsdp % 16 == 0 and 0xE0000 <= rsdp < 0x100000  # section 5.2.5.1
    table = blob[:36]
    assert table[:8] == b"RSD PTR "
    assert table[15] == 2
    assert sum(table[:20]) % 256 == 0
    assert sum(table) % 256 == 0


def test_every_table_5_2_6_has_a_valid_checksum_and_length(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    blob, _, tables = two_cpu_tables
    assert set(tables) == {b"RSDT", b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT", b"FACS"}
    for signature, table in tables.items():
        if signature == b"FACS":
            continue  # the FACS has no checksum (section 5.2.10)
        assert sum(table.data) % 256 == 0, signature
        assert table.data[10:16] == acpi.OEM_ID
    assert len(blob) <= layout.ACPI_TABLES.size


def test_rsdt_lists_the_same_tables_as_the_xsdt(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    _, _, tables = two_cpu_tables
    rsdt = tables[b"RSDT"].data
    xsdt = tables[b"XSDT"].data
    rsdt_entries = [struct.unpack_from("<I", rsdt, o)[0] for o in range(36, len(rsdt), 4)]
    xsdt_entries = [struct.unpack_from("<Q", xsdt, o)[0] for o in range(36, len(xsdt), 8)]
    listed = [tables[signature].address for signature in (b"FACP", b"APIC", b"MCFG")]
    assert rsdt_entries == xsdt_entries == listed


def test_fadt_names_the_facs_once_table_5_9(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    """X_FIRMWARE_CTRL holds the FACS; FIRMWARE_CTRL must then be zero."""
    _, _, tables = two_cpu_tables
    fadt = tables[b"FACP"].data
    firmware_ctrl, dsdt = struct.unpack_from("<II", fadt, 36)
    (x_firmware_ctrl,) = struct.unpack_from("<Q", fadt, 132)
    assert firmware_ctrl == 0 and x_firmware_ctrl == tables[b"FACS"].address
    assert dsdt == tables[b"DSDT"].address


def test_facs_5_2_10_is_64_byte_aligned_version_2(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    _, _, tables = two_cpu_tables
    facs = tables[b"FACS"]
    assert facs.address % 64 == 0
    assert facs.data[:4] == b"FACS"
    assert struct.unpack_from("<I", facs.data, 4)[0] == 64
    assert facs.data[32] == 2


def test_fadt_5_2_9_power_management_blocks_reset_register_and_flags(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    _, _, tables = two_cpu_tables
    fadt = tables[b"FACP"]
    data = fadt.data
    assert fadt.revision == 6 and len(data) == 276 and data[131] == 5
    dsdt = struct.unpack_from("<I", data, 40)[0]
    assert struct.unpack_from("<QQ", data, 132) == (tables[b"FACS"].address, dsdt)
    assert struct.unpack_from("<H", data, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", data, 48)[0] == 0  # SMI_CMD: fixed ACPI mode
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", data, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr) == (0x600, 0x604, 0x608)
    assert tuple(data[88:92]) == (4, 2, 0, 4)
    flags = struct.unpack_from("<I", data, 112)[0]
    assert flags & 1 << 0  # WBINVD
    assert flags & 1 << 2  # PROC_C1
    assert not flags & 1 << 4  # fixed-feature power button
    assert flags & 1 << 5  # no fixed-feature sleep button
    assert not flags & 1 << 8  # 24-bit PM timer
    assert flags & 1 << 10  # RESET_REG_SUP
    assert not flags & 1 << 20  # not HW_REDUCED_ACPI
    # RESET_REG: System I/O, 8 bits at 0xCF9, value 6
    assert struct.unpack_from("<BBBBQ", data, 116) == (1, 8, 0, 1, 0xCF9)
    assert data[128] == 0x06
    # The extended blocks agree with the 32-bit ones (ACPICA warns otherwise).
    for offset, address, bits in ((148, 0x600, 32), (172, 0x604, 16), (208, 0x608, 32)):
        space, width, _, _, gas_address = struct.unpack_from("<BBBBQ", data, offset)
        assert (space, width, gas_address) == (1, bits, address)


def dsdt_namespace(tables: dict[bytes, Table]) -> dict[str, aml_reader.Value]:
    return aml_reader.namespace(tables[b"DSDT"].data[36:])


def test_dsdt_aml_20_declares_s5_with_the_documented_sleep_type(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    _, _, tables = two_cpu_tables
    aml_bytes = tables[b"DSDT"].data[36:]
    # NameOp "_S5_" PackageOp PkgLength NumElements=4 BytePrefix 5 BytePrefix 5 Zero Zero
    s5 = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0, 0])
    assert aml_bytes.startswith(s5)
    assert board.SLP_TYP_S5 == 5
    assert dsdt_namespace(tables)["\\_S5_"] == [5, 5, 0, 0]


PCI0 = "\\_SB_.PCI0"


def test_dsdt_pci0_is_the_root_bridge_of_segment_0_bus_0(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    """PCI Firmware Spec 3.2 §4.1.1 (PNP0A08 with PNP0A03 compatible); ACPI 6.5 §6.5.5
    _SEG, §6.5.5 _BBN; _HID and no _ADR (§6.1.1: never both)."""
    _, _, tables = two_cpu_tables
    names = dsdt_namespace(tables)
    assert names[PCI0] == aml_reader.DEVICE
    inside = PCI0 + "."
    pci0 = {path[len(inside) :]: value for path, value in names.items() if path.startswith(inside)}
    assert pci0.pop("_CRS") and pci0.pop("_PRT")
    assert pci0 == {"_HID": 0x080AD041, "_CID": 0x030AD041, "_UID": 0, "_SEG": 0, "_BBN": 0}


def pci0_resources(tables: dict[bytes, Table]) -> list[aml_reader.Resource]:
    crs = dsdt_namespace(tables)[PCI0 + "._CRS"]
    assert isinstance(crs, bytes)
    return aml_reader.resources(crs)


def test_pci0_crs_6_4_bus_numbers_all_io_but_config_ports_and_the_bar_window(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    _, _, tables = two_cpu_tables
    found = pci0_resources(tables)
    assert [r for r in found if r.kind == "bus"] == [
        aml_reader.Resource("bus", 0, 255, 256, producer=True)
    ]
    assert [r for r in found if r.kind == "io"] == [aml_reader.Resource("io", 0xCF8, 0xCFF, 8)]
    io_windows = sorted((r.minimum, r.maximum) for r in found if r.kind == "io-window")
    windows = [r for r in found if r.kind != "io"]
    assert all(r.producer and r.length == r.maximum - r.minimum + 1 for r in windows)
    # Every port but the configuration ports, each once: legacy devices sit below the bridge.
    covered = [port for low, high in io_windows for port in range(low, high + 1)]
    assert covered == [port for port in range(0x10000) if not 0xCF8 <= port <= 0xCFF]
    io_bars = board.PCI_IO_WINDOW
    assert (io_bars.start, io_bars.end - 1) in io_windows
    memory = [(r.minimum, r.maximum) for r in found if r.kind == "memory-window"]
    bars = board.PCI_MMIO_WINDOW
    assert memory == [(bars.start, bars.end - 1)]


def test_motherboard_resources_pnp0c02_claim_the_ecam_window(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    """PCI Firmware Spec 3.2 §4.1.2: the MCFG's window is reserved by a motherboard
    resource device, where Linux's is_acpi_reserved() looks for it."""
    _, _, tables = two_cpu_tables
    names = dsdt_namespace(tables)
    assert names["\\_SB_.MRES._HID"] == 0x020CD041  # EisaId("PNP0C02")
    crs = names["\\_SB_.MRES._CRS"]
    assert isinstance(crs, bytes)
    ecam = board.PCI_ECAM_WINDOW
    assert aml_reader.resources(crs) == [
        aml_reader.Resource("memory", ecam.start, ecam.end - 1, ecam.size)
    ]


def test_pci0_memory_window_clears_ram_ecam_and_the_apics() -> None:
    bars = board.PCI_MMIO_WINDOW
    assert bars.start >= layout.PCI_HOLE_START and bars.end <= layout.FOUR_GIB
    for other in (board.PCI_ECAM_WINDOW.start, board.IOAPIC_ADDRESS, board.LAPIC_ADDRESS):
        assert not bars.start <= other < bars.end


def test_pci0_prt_6_2_13_routes_every_pin_of_devices_1_to_31_to_its_gsi(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    """GSI form (Source 0): level-triggered, active low, on our IOAPIC above the ISA IRQs."""
    _, _, tables = two_cpu_tables
    prt = dsdt_namespace(tables)[PCI0 + "._PRT"]
    assert isinstance(prt, list)
    expected = [
        [slot << 16 | 0xFFFF, pin, 0, board.pci_intx_gsi(slot, pin)]
        for slot in range(1, 32)
        for pin in range(4)
    ]
    assert prt == expected
    gsis = {entry[3] for entry in expected}
    assert gsis == set(board.PCI_INTX_GSIS)
    assert all(board.ISA_IRQS <= gsi < board.IOAPIC_PINS for gsi in gsis)


def test_mcfg_pci_firmware_3_2_4_1_2_one_ecam_allocation_reserved_in_e820(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]],
) -> None:
    _, _, tables = two_cpu_tables
    mcfg = tables[b"MCFG"]
    assert mcfg.revision == 1 and len(mcfg.data) == 36 + 8 + 16
    assert mcfg.data[36:44] == bytes(8)
    base, segment, first_bus, last_bus, reserved = struct.unpack_from("<QHBBI", mcfg.data, 44)
    assert (base, segment, first_bus, last_bus, reserved) == (
        board.PCI_ECAM_WINDOW.start,
        0,
        0,
        255,
        0,
    )
    # 1 MiB of configuration space per bus (4 KiB per function, 8 functions, 32 devices).
    assert board.PCI_ECAM_WINDOW.size == (last_bus - first_bus + 1) * 32 * 8 * 4096
    assert base % (256 << 20) == 0  # naturally aligned, as the spec wants the window
    for ram_size in (64 * layout.MIB, 8 * layout.GIB):
        assert any(
            e.type == E820Type.RESERVED and e.addr <= base and base + (256 << 20) <= e.end
            for e in e820_map(ram_size)
        )


def test_madt_5_2_12_entries(two_cpu_tables: tuple[bytes, int, dict[bytes, Table]]) -> None:
    _, _, tables = two_cpu_tables
    data = tables[b"APIC"].data
    assert struct.unpack_from("<II", data, 36) == (0xFEE00000, 1)  # PCAT_COMPAT
    entries = []
    offset = 44
    while offset < len(data):
        kind, length = data[offset], data[offset + 1]
        entries.append((kind, data[offset : offset + length]))
        offset += length
    assert offset == len(data)
    local_apics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic_id, flags) for _, _, uid, apic_id, flags in local_apics] == [
        (0, 0, 1),
        (1, 1, 1),
    ]
    (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapic[2:] == (2, 0, 0xFEC00000, 0)  # id = ncpus, GSI base 0
    overrides = [struct.unpack("<BBBBIH", e)[2:] for k, e in entries if k == 2]
    # bus ISA, source, GSI, flags: IRQ0 edge on GSI2; SCI level, active high on GSI9
    assert overrides == [(0, 0, 2, 0b0100), (0, 9, 9, 0b1101)]
    (nmi,) = [struct.unpack("<BBBHB", e)[2:] for k, e in entries if k == 4]
    assert nmi == (0xFF, 0, 1)  # all processors, LINT1


@pytest.mark.parametrize("ncpus", [0, 255])
def test_vcpu_count_outside_the_xapic_range_is_refused(ncpus: int) -> None:
    with pytest.raises(acpi.AcpiError, match="vCPUs"):
        acpi.build_acpi_tables(pc_board(), ncpus)


def test_misaligned_base_is_refused() -> None:
    with pytest.raises(acpi.AcpiError, match="16-byte aligned"):
        acpi.build_acpi_tables(pc_board(), 1, base=0xE0008)


def test_madt_scales_to_many_vcpus() -> None:
    blob, rsdp = acpi.build_acpi_tables(pc_board(), board.MAX_CPUS)
    tables = parse(blob, rsdp)
    madt = tables[b"APIC"].data
    assert sum(madt) % 256 == 0
    assert len(madt) == 44 + 8 * board.MAX_CPUS + 12 + 10 + 10 + 6


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (Debian package acpica-tools)")
def test_iasl_disassembles_every_table_without_errors(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]], tmp_path: Path
) -> None:
    """ACPICA's own reading of each table: no errors, and the fields it decodes."""
    assert IASL is not None
    _, _, tables = two_cpu_tables
    disassembled = {}
    for signature, table in tables.items():
        name = signature.decode().lower()
        path = tmp_path / f"{name}.dat"
        path.write_bytes(table.data)
        result = subprocess.run(
            [IASL, "-d", str(path)], capture_output=True, text=True, check=False, cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        output = result.stdout + result.stderr
        assert "Error" not in output and "Warning" not in output, output
        disassembled[signature] = (tmp_path / f"{name}.dsl").read_text()
    madt = disassembled[b"APIC"]
    assert "[I/O APIC]" in madt and "Address : FEC00000" in madt
    assert madt.count("[Interrupt Source Override]") == 2
    assert "Local Apic Address : FEE00000" in madt
    fadt = disassembled[b"FACP"]
    assert "SCI Interrupt : 0009" in fadt
    assert "Reset Register Supported (V2) : 1" in fadt
    assert "Address : 0000000000000CF9" in fadt
    dsdt = disassembled[b"DSDT"]
    assert "Name (_S5, Package (0x04)" in dsdt
    assert 'Name (_HID, EisaId ("PNP0A08")' in dsdt
    assert "WordBusNumber (ResourceProducer" in dsdt
    assert dsdt.count("WordIO (ResourceProducer") == 3
    assert "DWordMemory (ResourceProducer" in dsdt
    assert "0x0001FFFF" in dsdt and "0x001FFFFF" in dsdt
    assert 'Name (_HID, EisaId ("PNP0C02")' in dsdt
    assert "Memory32Fixed (ReadWrite" in dsdt
    mcfg = disassembled[b"MCFG"]
    assert "Base Address : 00000000E0000000" in mcfg and "End Bus Number : FF" in mcfg


@pytest.mark.skipif(IASL is None, reason="iasl not installed (Debian package acpica-tools)")
def test_iasl_recompiles_the_disassembled_dsdt_to_the_same_aml_without_warnings(
    two_cpu_tables: tuple[bytes, int, dict[bytes, Table]], tmp_path: Path
) -> None:
    """ACPICA's compiler, which checks what its disassembler does not (e.g. _HID with
    _ADR), must accept the DSDT as ASL and, unoptimised (-oa), give back our AML."""
    assert IASL is not None
    _, _, tables = two_cpu_tables
    (tmp_path / "dsdt.dat").write_bytes(tables[b"DSDT"].data)
    run = [IASL, "-d", "dsdt.dat"]
    assert subprocess.run(run, capture_output=True, cwd=tmp_path, check=False).returncode == 0
    result = subprocess.run(
        [IASL, "-oa", "-p", "again", "dsdt.dsl"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 Errors, 0 Warnings, 0 Remarks" in result.stdout, result.stdout
    assert (tmp_path / "again.aml").read_bytes()[36:] == tables[b"DSDT"].data[36:]
