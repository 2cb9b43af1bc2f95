"""The guest's ACPI tables (ACPI Specification 6.5), built as one blob.

The blob holds, in order: RSDP (first, so that a blob at a 64-byte aligned
base puts it on the 16-byte boundary the legacy scan of section 5.2.5.1
finds), FACS (64-byte aligned, section 5.2.10), DSDT, FADT, MADT, MCFG, XSDT
and RSDT. Where it goes (0xE0000, or around a kernel loaded there, the RSDP
apart if need be) is :mod:`kvm_vmm.acpi_placement`'s business.

Every address, port and line the tables name comes from the platform table
(:mod:`kvm_vmm.platform_table`), the same one the machine maps into its bus; the
numbers themselves are in :mod:`kvm_vmm.board`. What the tables promise the rest of
the VMM:

- The machine is always in ACPI mode: SMI_CMD is 0, so PM1a_CNT.SCI_EN
  (bit 0) must read 1 from reset.
- PM1a event block (4 bytes: PM1_STS, PM1_EN), PM1a control block (2 bytes)
  and the 24-bit PM timer (4 bytes; TMR_VAL_EXT clear): the acpi-pm device's
  three windows.
- The power button is a fixed feature (FADT PWR_BUTTON clear): the VMM asks
  the guest to power off by setting PM1_STS.PWRBTN_STS (bit 8) and raising
  the SCI if PM1_EN.PWRBTN_EN is set. There is no sleep button.
- Soft-off: the DSDT's \\_S5_ gives SLP_TYPa = ``board.SLP_TYP_S5``. The guest
  writes PM1a_CNT with that SLP_TYP (bits 10-12) and SLP_EN (bit 13).
- Reset: FADT RESET_REG is the reset device's I/O port, written with
  ``ResetPort.RESET_VALUE``.
- The SCI is the acpi-pm device's ISA IRQ, level-triggered active high (an
  interrupt source override says so), on the IOAPIC pin of the same number.
- MADT: one enabled local APIC per vCPU, APIC ID = ACPI processor UID = the
  vCPU index; one IOAPIC with ID ``board.ioapic_id(ncpus)`` at the ioapic
  device's window, GSI base ``board.IOAPIC_GSI_BASE``; each ISA IRQ wired to
  another pin (IRQ0 to GSI 2) has an override; LINT1 of every local APIC is
  the NMI input.
- FADT IAPC_BOOT_ARCH: LEGACY_DEVICES and 8042 are set exactly when the table
  holds devices described that way.
- PCI: segment 0, buses 0-255, reached through configuration mechanism #1 at
  ``board.PCI_CONFIG_PORTS`` and through ECAM at ``board.PCI_ECAM_WINDOW`` (the
  MCFG; the E820 map reserves the window). The DSDT's ``\\_SB.PCI0`` is the host
  bridge: its _CRS hands the guest the bus numbers, all I/O ports but the
  configuration ports (so legacy devices stay below the bridge, as QEMU's do) and
  the 32-bit BAR window ``board.PCI_MMIO_WINDOW``; its _PRT sends INTx pin p of
  device d to GSI ``board.pci_intx_gsi(d, p)``, level-triggered active low.
  ``\\_SB.MRES`` (PNP0C02, motherboard resources) claims the ECAM window.
  PCI0 has no _OSC: Linux then keeps the firmware-first defaults (no native PCIe
  hot-plug, AER or PME, ASPM off), none of which a bus without PCIe ports needs.
  It has no _ADR either: a device object carries _HID or _ADR, never both
  (section 6.1.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvm_devices.reset_port import ResetPort
from kvm_vmm import aml, board, layout
from kvm_vmm.interrupts import ISA_IRQ_TO_IOAPIC_PIN
from kvm_vmm.platform_table import Description, PlatformTable

OEM_ID = b"KVMVMM"
OEM_TABLE_ID = b"KVMVMM  "
OEM_REVISION = 1
CREATOR_ID = b"KVMV"
CREATOR_REVISION = 1

RTC_CENTURY_INDEX = 0x32
MCFG_REVISION = 1
# The FACS is 64-byte aligned within the blob, so the blob's base must be too.
BLOB_ALIGNMENT = 64
RSDP_ALIGNMENT = 16  # where the legacy scan looks (section 5.2.5.1)

HEADER_SIZE = 36
RSDP_SIZE = 36
FACS_SIZE = 64
FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 5

# FADT flags (table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags (table 5.11)
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2

GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3

MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
# MPS INTI flags (table 5.26): polarity bits 0-1, trigger mode bits 2-3
MPS_POLARITY_ACTIVE_HIGH = 0b01
MPS_TRIGGER_EDGE = 0b01 << 2
MPS_TRIGGER_LEVEL = 0b11 << 2
ALL_PROCESSORS = 0xFF


class AcpiError(ValueError):
    """The tables cannot be built as asked."""


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus itself sum to zero mod 256."""
    return -sum(data) & 0xFF


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# --- Tables -------------------------------------------------------------------


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (section 5.2.6), then ``body``."""
    length = HEADER_SIZE + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        length,
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(address_space: int, bit_width: int, access_size: int, address: int) -> bytes:
    """A Generic Address Structure (section 5.2.3.2)."""
    return struct.pack("<BBBBQ", address_space, bit_width, 0, access_size, address)


def build_rsdp(xsdt_address: int, rsdt_address: int) -> bytes:
    """RSDP revision 2 (section 5.2.5.3): checksum over 20 bytes, extended over 36."""
    rsdp = bytearray(
        struct.pack(
            "<8sB6sBIIQB3s",
            b"RSD PTR ",
            0,
            OEM_ID,
            2,
            rsdt_address,
            RSDP_SIZE,
            xsdt_address,
            0,
            b"",
        )
    )
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_facs() -> bytes:
    """FACS version 2 (section 5.2.10): no waking vector, no global lock owner."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, b"", 0, b"")


def build_dsdt() -> bytes:
    """DSDT revision 2 (64-bit integers): the \\_S5_ sleep package and the PCI host bridge."""
    sleep_types = aml.package(
        [
            aml.integer(board.SLP_TYP_S5),
            aml.integer(board.SLP_TYP_S5),
            aml.integer(0),
            aml.integer(0),
        ]
    )
    devices = [_pci_host_bridge(), _pci_motherboard_resources()]
    body = aml.name("_S5_", sleep_types) + aml.scope("\\_SB", devices)
    return sdt(b"DSDT", 2, body)


def _pci_host_bridge() -> bytes:
    """Device PCI0 (PCI Firmware Spec 3.2 §4.1.1; ACPI 6.5 §6.1, §6.2, §6.5.5)."""
    return aml.device(
        "PCI0",
        [
            aml.name("_HID", aml.dword(aml.eisa_id("PNP0A08"))),  # PCI Express root
            aml.name("_CID", aml.dword(aml.eisa_id("PNP0A03"))),  # PCI root
            aml.name("_UID", aml.integer(0)),
            aml.name("_SEG", aml.integer(board.PCI_SEGMENT)),
            aml.name("_BBN", aml.integer(0)),
            aml.name("_CRS", _pci_host_bridge_resources()),
            aml.name("_PRT", _pci_routing_table()),
        ],
    )


def _pci_motherboard_resources() -> bytes:
    """A PNP0C02 device claiming the ECAM window: where PCI Firmware Spec 3.2 §4.1.2 wants
    the MCFG's window reserved, and the first place Linux looks (is_acpi_reserved)
    before it falls back to the E820 map, which it trusts only once configuration
    mechanism #1 works."""
    ecam = board.PCI_ECAM_WINDOW
    return aml.device(
        "MRES",
        [
            aml.name("_HID", aml.dword(aml.eisa_id("PNP0C02"))),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", aml.resource_template([aml.memory32_fixed(ecam.start, ecam.size)])),
        ],
    )


def _pci_host_bridge_resources() -> bytes:
    config = board.PCI_CONFIG_PORTS
    io_window = board.PCI_IO_WINDOW
    memory = board.PCI_MMIO_WINDOW
    return aml.resource_template(
        [
            aml.word_bus_number(0, board.PCI_BUSES - 1),
            aml.io_port(config.start, config.size),
            aml.word_io(0, config.start - 1),
            # Below the BAR window: the legacy ports Linux's ISA-era drivers claim.
            aml.word_io(config.end, io_window.start - 1),
            aml.word_io(io_window.start, io_window.end - 1),
            aml.dword_memory(memory.start, memory.end - 1),
        ]
    )


# _PRT's Address for every function of a device (ACPI 6.5 §6.2.13: function 0xFFFF).
PRT_ALL_FUNCTIONS = 0xFFFF


def _pci_routing_table() -> bytes:
    """_PRT (ACPI 6.5 §6.2.13) in the GSI form: Source 0, Source Index the GSI, which by
    definition is level-triggered, active low."""
    entries = [
        aml.package(
            [
                aml.integer(slot << 16 | PRT_ALL_FUNCTIONS),
                aml.integer(pin),
                aml.integer(0),
                aml.integer(board.pci_intx_gsi(slot, pin)),
            ]
        )
        for slot in range(1, board.PCI_SLOTS)
        for pin in range(board.PCI_INTX_PINS)
    ]
    return aml.package(entries)


def build_mcfg() -> bytes:
    """MCFG revision 1 (PCI Firmware Spec 3.2 §4.1.2, table 4-2/4-3): one ECAM allocation,
    segment 0, buses 0..PCI_BUSES-1."""
    ecam = board.PCI_ECAM_WINDOW
    allocation = struct.pack("<QHBBI", ecam.start, board.PCI_SEGMENT, 0, board.PCI_BUSES - 1, 0)
    return sdt(b"MCFG", MCFG_REVISION, bytes(8) + allocation)


def _iapc_boot_arch(table: PlatformTable) -> int:
    flags = IAPC_VGA_NOT_PRESENT
    if table.described_by(Description.LEGACY):
        flags |= IAPC_LEGACY_DEVICES
    if table.described_by(Description.I8042):
        flags |= IAPC_8042
    return flags


def build_fadt(table: PlatformTable, facs_address: int, dsdt_address: int) -> bytes:
    """FADT revision 6.5 (section 5.2.9, table 5.9) for the table's acpi-pm and reset devices."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(fmt: str, offset: int, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    acpi_pm = table.entry("acpi-pm")
    (sci,) = acpi_pm.irqs
    event = acpi_pm.window("pm1a-evt")
    control = acpi_pm.window("pm1a-cnt")
    timer = acpi_pm.window("pm-tmr")
    reset = table.entry("reset").window("reset")
    # FIRMWARE_CTRL (36) stays 0: with X_FIRMWARE_CTRL set it must be (table 5.9), and
    # Linux lists a FACS named in both twice.
    put("<I", 40, dsdt_address)
    put("<H", 46, sci)  # SMI_CMD (48) stays 0: always in ACPI mode
    put("<IIII", 56, event.base, 0, control.base, 0)
    put("<I", 76, timer.base)
    put("<BBBB", 88, event.length, control.length, 0, timer.length)
    # C2/C3 latencies above 100/1000 µs say those states are not supported.
    put("<HH", 96, 101, 1001)
    put("<B", 108, RTC_CENTURY_INDEX)
    put("<H", 109, _iapc_boot_arch(table))
    put("<I", 112, FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP)
    put("<12s", 116, gas(GAS_SYSTEM_IO, 8 * reset.length, GAS_ACCESS_BYTE, reset.base))
    put("<B", 128, ResetPort.RESET_VALUE)
    put("<B", 131, FADT_MINOR_REVISION)
    put("<QQ", 132, facs_address, dsdt_address)
    put("<12s", 148, gas(GAS_SYSTEM_IO, 8 * event.length, GAS_ACCESS_WORD, event.base))
    put("<12s", 172, gas(GAS_SYSTEM_IO, 8 * control.length, GAS_ACCESS_WORD, control.base))
    put("<12s", 208, gas(GAS_SYSTEM_IO, 8 * timer.length, GAS_ACCESS_DWORD, timer.base))
    put("<8s", 268, b"KVMVMM\0\0")
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def _override(irq: int, gsi: int, flags: int) -> bytes:
    """An ISA interrupt source override (section 5.2.12.5)."""
    return struct.pack("<BBBBIH", MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq, gsi, flags)


def build_madt(table: PlatformTable, ncpus: int) -> bytes:
    """MADT revision 5 (section 5.2.12) for ``ncpus`` local APICs and the table's IOAPIC."""
    entries = [
        struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED)
        for cpu in range(ncpus)
    ]
    ioapic = table.entry("ioapic").window("ioapic")
    entries.append(
        struct.pack(
            "<BBBBII",
            MADT_IO_APIC,
            12,
            board.ioapic_id(ncpus),
            0,
            ioapic.base,
            board.IOAPIC_GSI_BASE,
        )
    )
    # ISA IRQs are edge-triggered, active high: the bus default, said only where moved.
    for irq, gsi in sorted(ISA_IRQ_TO_IOAPIC_PIN.items()):
        entries.append(_override(irq, gsi, MPS_TRIGGER_EDGE))
    (sci,) = table.entry("acpi-pm").irqs
    entries.append(_override(sci, sci, MPS_POLARITY_ACTIVE_HIGH | MPS_TRIGGER_LEVEL))
    entries.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1))
    body = struct.pack("<II", board.LAPIC_ADDRESS, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", 5, body)


def build_xsdt(addresses: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", address) for address in addresses))


def build_rsdt(addresses: list[int]) -> bytes:
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", address) for address in addresses))


@dataclass
class _Blob:
    base: int
    data: bytearray

    def place(self, table: bytes, alignment: int = 16) -> int:
        offset = _align(len(self.data), alignment)
        self.data += bytes(offset - len(self.data)) + table
        return self.base + offset


def _check_cpus(ncpus: int) -> None:
    if not 1 <= ncpus <= board.MAX_CPUS:
        raise AcpiError(f"{ncpus} vCPUs: the MADT's xAPIC entries describe 1 to {board.MAX_CPUS}")


def _add_tables(blob: _Blob, table: PlatformTable, ncpus: int) -> tuple[int, int]:
    """FACS, DSDT, FADT, MADT, MCFG, XSDT and RSDT appended to ``blob``; the XSDT's and
    RSDT's addresses, which the RSDP names."""
    facs = blob.place(build_facs(), alignment=64)
    dsdt = blob.place(build_dsdt())
    fadt = blob.place(build_fadt(table, facs, dsdt))
    madt = blob.place(build_madt(table, ncpus))
    mcfg = blob.place(build_mcfg())
    xsdt = blob.place(build_xsdt([fadt, madt, mcfg]))
    rsdt = blob.place(build_rsdt([fadt, madt, mcfg]))
    if blob.base + len(blob.data) > 1 << 32:
        raise AcpiError(f"ACPI tables at 0x{blob.base:x} would reach above 4 GiB (32-bit RSDT)")
    return xsdt, rsdt


def build_acpi_tables(
    table: PlatformTable, ncpus: int, base: int = layout.ACPI_TABLES.start
) -> tuple[bytes, int]:
    """All tables for ``ncpus`` vCPUs and the devices of ``table``, as one blob for ``base``.

    Returns the blob and the RSDP's address (``base`` itself).
    """
    _check_cpus(ncpus)
    if base % RSDP_ALIGNMENT:
        raise AcpiError(f"ACPI tables base 0x{base:x} is not 16-byte aligned (RSDP)")
    blob = _Blob(base, bytearray(RSDP_SIZE))
    xsdt, rsdt = _add_tables(blob, table, ncpus)
    blob.data[:RSDP_SIZE] = build_rsdp(xsdt, rsdt)
    return bytes(blob.data), base


def build_acpi_tables_apart(
    table: PlatformTable, ncpus: int, rsdp_address: int, base: int
) -> tuple[bytes, bytes]:
    """The RSDP for ``rsdp_address`` and, as one blob for ``base``, every other table:
    for when no gap near the legacy scan's range holds them all."""
    _check_cpus(ncpus)
    if rsdp_address % RSDP_ALIGNMENT:
        raise AcpiError(f"RSDP address 0x{rsdp_address:x} is not 16-byte aligned")
    if base % BLOB_ALIGNMENT:
        raise AcpiError(f"ACPI tables base 0x{base:x} is not 64-byte aligned (FACS)")
    blob = _Blob(base, bytearray())
    xsdt, rsdt = _add_tables(blob, table, ncpus)
    return build_rsdp(xsdt, rsdt), bytes(blob.data)
