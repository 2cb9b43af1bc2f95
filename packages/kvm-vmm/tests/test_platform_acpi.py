"""The ACPI tables and the bus agree: one platform table, read back from both sides.

The tables are parsed back from their bytes (ACPI 6.5 §5.2: FADT table 5.9, MADT
§5.2.12, DSDT AML §20) and each resource they name is looked up among the windows the
machine maps into kvmfast's bus; the device found there is then driven the way the
tables tell an OS to (S5 through PM1a_CNT, RESET_VALUE to RESET_REG, the SCI on its
GSI). The other way round, every window on the bus belongs to a device the tables
describe, or to one a guest finds without them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import aml_reader
import pytest

from kvm_devices.acpi_pm import PWRBTN_EN
from kvm_devices.interfaces import Device
from kvm_devices.ioapic import RTE_POLARITY, RTE_TRIGGER_LEVEL, Ioapic
from kvm_vmm import acpi, board, layout
from kvm_vmm.clock import TimerThread
from kvm_vmm.console import DiscardSink
from kvm_vmm.interrupts import PciIntxWires
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.platform import Mapping, Platform, PlatformEvents, build_platform
from kvm_vmm.platform_table import AddressSpace, Description, PlatformTable, Window, pio
from kvmfast.testing import require_kvm

GAS_SYSTEM_IO = 1
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1


@dataclass
class Fadt:
    sci: int
    pm1a_event: tuple[int, int]  # address, length in bytes
    pm1a_control: tuple[int, int]
    pm_timer: tuple[int, int]
    reset_register: tuple[int, int, int]  # address space, address, bit width
    reset_value: int
    iapc_boot_arch: int
    dsdt: int


@dataclass
class Madt:
    lapic_address: int
    ioapics: list[tuple[int, int, int]] = field(default_factory=list)  # id, address, GSI base
    overrides: list[tuple[int, int, int]] = field(default_factory=list)  # IRQ, GSI, flags
    lapic_ids: list[int] = field(default_factory=list)


def _table(blob: bytes, address: int, signature: bytes) -> bytes:
    offset = address - layout.ACPI_TABLES.start
    found, length = struct.unpack_from("<4sI", blob, offset)
    assert found == signature
    data = blob[offset : offset + length]
    assert sum(data) % 256 == 0
    return data


def _rsdt_tables(blob: bytes, rsdp: int) -> dict[bytes, bytes]:
    (rsdt,) = struct.unpack_from("<I", blob, rsdp - layout.ACPI_TABLES.start + 16)
    data = _table(blob, rsdt, b"RSDT")
    tables = {}
    for offset in range(36, len(data), 4):
        (address,) = struct.unpack_from("<I", data, offset)
        signature = blob[address - layout.ACPI_TABLES.start :][:4]
        tables[signature] = _table(blob, address, signature)
    return tables


def parse_fadt(data: bytes) -> Fadt:
    (dsdt,) = struct.unpack_from("<I", data, 40)
    (sci,) = struct.unpack_from("<H", data, 46)
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", data, 56)
    evt_len, cnt_len, _, tmr_len = data[88:92]
    (iapc,) = struct.unpack_from("<H", data, 109)
    space, width, _, _, reset_address = struct.unpack_from("<BBBBQ", data, 116)
    for offset, address, length in ((148, evt, evt_len), (172, cnt, cnt_len), (208, tmr, tmr_len)):
        x_space, x_width, _, _, x_address = struct.unpack_from("<BBBBQ", data, offset)
        assert (x_space, x_width, x_address) == (GAS_SYSTEM_IO, 8 * length, address)
    return Fadt(
        sci,
        (evt, evt_len),
        (cnt, cnt_len),
        (tmr, tmr_len),
        (space, reset_address, width),
        data[128],
        iapc,
        dsdt,
    )


def parse_madt(data: bytes) -> Madt:
    lapic_address, _ = struct.unpack_from("<II", data, 36)
    madt = Madt(lapic_address)
    offset = 44
    while offset < len(data):
        kind, length = data[offset], data[offset + 1]
        entry = data[offset : offset + length]
        if kind == 0:
            madt.lapic_ids.append(entry[3])
        elif kind == 1:
            _, _, ioapic_id, _, address, gsi_base = struct.unpack("<BBBBII", entry)
            madt.ioapics.append((ioapic_id, address, gsi_base))
        elif kind == 2:
            _, _, bus, irq, gsi, flags = struct.unpack("<BBBBIH", entry)
            assert bus == 0  # ISA
            madt.overrides.append((irq, gsi, flags))
        offset += length
    return madt


def s5_sleep_type(dsdt: bytes) -> int:
    """SLP_TYPa of the DSDT's Name(_S5_, Package(){a, b, ...}) (AML §20.2.5)."""
    aml = dsdt[36:]
    at = aml.index(b"\x08_S5_\x12")
    package = aml[at + 6 :]
    lead = package[0]
    elements = package[1 + (lead >> 6) :]
    assert elements[0] >= 2
    if elements[1] == 0x0A:  # BytePrefix
        return elements[2]
    assert elements[1] in (0x00, 0x01)  # ZeroOp, OneOp
    return elements[1]


@dataclass
class Rig:
    platform: Platform
    fadt: Fadt
    madt: Madt
    dsdt: bytes
    events: list[str]
    routed: list[tuple[int, bool]]

    def decode(self, space: AddressSpace, address: int, size: int) -> Mapping:
        """The one window of the bus that decodes every byte of the access."""
        hits = [
            m
            for m in self.platform.mappings
            if m.space == space and m.base <= address and address + size <= m.base + m.length
        ]
        assert len(hits) == 1, f"{space} {address:#x}+{size}: decoded by {hits}"
        return hits[0]

    def read(self, space: AddressSpace, address: int, size: int) -> int:
        mapping = self.decode(space, address, size)
        return mapping.device.read(address - mapping.base, size)

    def write(self, space: AddressSpace, address: int, size: int, value: int) -> None:
        mapping = self.decode(space, address, size)
        mapping.device.write(address - mapping.base, size, value)


@dataclass
class RecordingVm:
    lines: list[tuple[int, bool]]

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        pass

    def irq_line(self, gsi: int, level: bool) -> int:
        self.lines.append((gsi, level))
        return 1


def make_rig(cpus: int) -> Rig:
    events: list[str] = []
    routed: list[tuple[int, bool]] = []
    platform = build_platform(
        RecordingVm(routed),
        TimerThread(),
        DiscardSink(),
        PlatformEvents(
            power_off=lambda: events.append("power off"),
            reset=lambda: events.append("reset"),
            extint=lambda level: None,
        ),
        ram_size=64 * layout.MIB,
        cpus=cpus,
    )
    blob, rsdp = acpi.build_acpi_tables(platform.table, cpus)
    tables = _rsdt_tables(blob, rsdp)
    fadt = parse_fadt(tables[b"FACP"])
    return Rig(
        platform,
        fadt,
        parse_madt(tables[b"APIC"]),
        _table(blob, fadt.dsdt, b"DSDT"),
        events,
        routed,
    )


@pytest.fixture(params=[1, 3])
def rig(request: pytest.FixtureRequest) -> Rig:
    cpus: int = request.param
    return make_rig(cpus)


def test_fadt_pm_blocks_are_the_acpi_pm_device_on_the_bus(rig: Rig) -> None:
    pm = rig.platform.acpi_pm
    blocks = (rig.fadt.pm1a_event, rig.fadt.pm1a_control, rig.fadt.pm_timer)
    expected: tuple[Device, ...] = (pm.pm1_event_ports, pm.pm1_control_ports, pm.pm_timer_ports)
    for (address, length), device in zip(blocks, expected, strict=True):
        mapping = rig.decode("pio", address, length)
        assert mapping.device is device and mapping.base == address
    # SMI_CMD is 0, so the OS expects SCI_EN already set (ACPI 6.5 §4.8.2.1).
    assert rig.read("pio", rig.fadt.pm1a_control[0], 2) & 1


def test_the_s5_of_the_dsdt_written_where_the_fadt_says_powers_off(rig: Rig) -> None:
    """Linux's acpi_hw_legacy_sleep: SLP_TYPa from \\_S5, then SLP_EN, to PM1a_CNT."""
    sleep_type = s5_sleep_type(rig.dsdt)
    control = rig.fadt.pm1a_control[0]
    rig.write("pio", control, 2, 1 | sleep_type << 10)
    assert rig.events == []
    rig.write("pio", control, 2, 1 | sleep_type << 10 | 1 << 13)
    assert rig.events == ["power off"]


def test_the_reset_register_of_the_fadt_resets(rig: Rig) -> None:
    """RESET_REG lies among the PCI host's configuration ports (0xCF8-0xCFF), as on
    PIIX/ICH: a byte there reaches the reset register, a dword at 0xCF8 does not."""
    space, address, width = rig.fadt.reset_register
    assert space == GAS_SYSTEM_IO and width == 8
    mapping = rig.decode("pio", address, 1)
    assert mapping.device is rig.platform.pci.config_ports
    rig.write("pio", mapping.base, 4, rig.fadt.reset_value << 8 * (address - mapping.base))
    assert rig.events == []
    rig.write("pio", address, 1, rig.fadt.reset_value)
    assert rig.events == ["reset"]


def test_the_sci_arrives_on_the_gsi_the_fadt_and_madt_name(rig: Rig) -> None:
    """SCI_INT is an ISA IRQ; an override (level, active high) maps it to its GSI.

    The guest programs the IOAPIC pin with the override's polarity, as Linux does
    (mp_override_legacy_irq): the idle line must read deasserted under it.
    """
    sci = rig.fadt.sci
    ((gsi, flags),) = [(g, f) for irq, g, f in rig.madt.overrides if irq == sci]
    assert flags == 0b1101  # level-triggered, active high (MPS INTI flags)
    ioapic = rig.platform.ioapic
    _unmask(rig, gsi, vector=0x41, mps_flags=flags)
    assert not asserted_pins(ioapic)[gsi] and (gsi, True) not in rig.routed
    event_block = rig.fadt.pm1a_event[0]
    rig.write("pio", event_block + 2, 2, PWRBTN_EN)
    rig.platform.acpi_pm.press_power_button()
    assert (gsi, True) in rig.routed
    assert asserted_pins(ioapic) == [pin == gsi for pin in range(board.IOAPIC_PINS)]


def test_isa_irq0_reaches_the_gsi_the_madt_override_names(rig: Rig) -> None:
    ((gsi, flags),) = [(g, f) for irq, g, f in rig.madt.overrides if irq == 0]
    assert flags == 0b0100  # edge
    rig.platform.isa_line(0).set_level(True)
    assert asserted_pins(rig.platform.ioapic)[gsi]


def isa_pin_and_flags(madt: Madt, irq: int) -> tuple[int, int]:
    """The GSI and MPS INTI flags of ISA ``irq``: its override's, else identity-mapped
    with flags 0 (conforming to the ISA bus: edge, active high)."""
    for source, gsi, flags in madt.overrides:
        if source == irq:
            return gsi, flags
    return irq, 0


def test_every_isa_line_reads_as_the_madt_says_on_the_pin_the_guest_programs(rig: Rig) -> None:
    """The guest sets each pin's polarity from the MADT; the wiring drives ISA lines
    active high: an idle line must read deasserted and a raised one asserted."""
    ioapic = rig.platform.ioapic
    isa_irqs = sorted(
        irq
        for entry in rig.platform.table.entries.values()
        for irq in entry.irqs
        if irq < board.ISA_IRQS and irq != board.CASCADE_IRQ
    )
    assert board.SCI_IRQ in isa_irqs and board.PIT_IRQ in isa_irqs
    for irq in isa_irqs:
        gsi, flags = isa_pin_and_flags(rig.madt, irq)
        _unmask(rig, gsi, vector=0x40 + gsi, mps_flags=flags)
        line = rig.platform.isa_line(irq)
        line.set_level(False)
        assert not asserted_pins(ioapic)[gsi], irq
        line.set_level(True)
        assert asserted_pins(ioapic)[gsi], irq
        line.set_level(False)


def test_the_prt_gsis_are_pci_intx_wires_on_pins_of_the_madt_ioapic(rig: Rig) -> None:
    """Each _PRT GSI (level, active low by definition, ACPI 6.5 §6.2.13) is a pin of the
    MADT's IOAPIC that no ISA override targets; programmed so, an idle pulled-up wire
    delivers nothing and an asserted one reaches the guest."""
    prt = aml_reader.namespace(rig.dsdt[36:])["\\_SB_.PCI0._PRT"]
    assert isinstance(prt, list)
    ((_, _, gsi_base),) = rig.madt.ioapics
    overridden = {gsi for _, gsi, _ in rig.madt.overrides}
    wires = PciIntxWires(rig.platform.ioapic)
    for entry in prt:
        assert isinstance(entry, list)
        address, pin, source, gsi = entry
        assert isinstance(address, int) and isinstance(pin, int) and isinstance(gsi, int)
        assert source == 0
        assert gsi_base + board.ISA_IRQS <= gsi < gsi_base + board.IOAPIC_PINS
        assert gsi not in overridden
        assert wires.line(address >> 16, pin).gsi == gsi
        _unmask(rig, gsi, vector=0x60 + gsi, mps_flags=0b1111)  # level, active low
    assert not any(routed_gsi >= board.ISA_IRQS for routed_gsi, _ in rig.routed)
    line = wires.line(5, 1)
    line.set_asserted(True)
    assert rig.routed[-1] == (line.gsi, True)
    assert asserted_pins(rig.platform.ioapic)[line.gsi]


def test_the_pci_config_access_the_tables_name_is_decoded_on_the_bus(rig: Rig) -> None:
    """The MCFG's ECAM window and PCI0's configuration ports are one device's each."""
    ecam, ports = board.PCI_ECAM_WINDOW, board.PCI_CONFIG_PORTS
    decoded = [
        m
        for m in rig.platform.mappings
        if (m.space, m.base) in (("mmio", ecam.start), ("pio", ports.start))
    ]
    assert len(decoded) == 2
    assert rig.decode("mmio", ecam.start, 4).length == ecam.size
    assert rig.decode("pio", ports.start, 4).base == ports.start


def asserted_pins(ioapic: Ioapic) -> list[bool]:
    """Each pin's input level as its redirection entry's polarity reads it."""
    state = ioapic.save()
    line_high, entries = state["line_high"], state["redirection"]
    assert isinstance(line_high, list) and isinstance(entries, list)
    pairs = zip(line_high, entries, strict=True)
    return [bool(high) != bool(entry & RTE_POLARITY) for high, entry in pairs]


def _unmask(rig: Rig, pin: int, vector: int, mps_flags: int) -> None:
    """Program ``pin`` as the MPS INTI flags say (ACPI 6.5 table 5.26; 0 = the ISA
    default: edge, active high) into the redirection entry (82093AA §3.2.4)."""
    polarity, trigger = mps_flags & 0b11, mps_flags >> 2 & 0b11
    entry = vector
    if polarity == 0b11:
        entry |= RTE_POLARITY
    if trigger == 0b11:
        entry |= RTE_TRIGGER_LEVEL
    (_, address, _) = rig.madt.ioapics[0]
    rig.write("mmio", address + Ioapic.IOREGSEL, 4, 0x10 + 2 * pin)
    rig.write("mmio", address + Ioapic.IOWIN, 4, entry)


def test_madt_ioapic_is_the_ioapic_on_the_bus_with_every_gsi_it_claims(rig: Rig) -> None:
    ((ioapic_id, address, gsi_base),) = rig.madt.ioapics
    mapping = rig.decode("mmio", address, Ioapic.SIZE)
    assert mapping.device is rig.platform.ioapic and mapping.base == address
    rig.write("mmio", address + Ioapic.IOREGSEL, 4, 0x01)  # IOAPICVER
    version = rig.read("mmio", address + Ioapic.IOWIN, 4)
    pins = (version >> 16 & 0xFF) + 1
    assert gsi_base == board.IOAPIC_GSI_BASE
    for _, gsi, _ in rig.madt.overrides:
        assert gsi_base <= gsi < gsi_base + pins
    assert ioapic_id not in rig.madt.lapic_ids


def test_the_lapic_page_is_left_to_the_kernel(rig: Rig) -> None:
    """The split irqchip's LAPICs are KVM's: none of our windows may shadow them."""
    assert rig.madt.lapic_address == board.LAPIC_ADDRESS
    for mapping in rig.platform.mappings:
        if mapping.space == "mmio":
            end = mapping.base + mapping.length
            assert end <= rig.madt.lapic_address or mapping.base >= rig.madt.lapic_address + 0x1000


def test_every_window_on_the_bus_is_described_or_found_without_tables(rig: Rig) -> None:
    fadt, madt = rig.fadt, rig.madt
    described: set[tuple[AddressSpace, int]] = {
        ("pio", fadt.pm1a_event[0]),
        ("pio", fadt.pm1a_control[0]),
        ("pio", fadt.pm_timer[0]),
        ("pio", fadt.reset_register[1]),
        *(("mmio", address) for _, address, _ in madt.ioapics),
    }
    table = rig.platform.table
    for mapping in rig.platform.mappings:
        window = table.decoder(mapping.space, mapping.base, mapping.length)
        assert window is not None and (window.base, window.length) == (
            mapping.base,
            mapping.length,
        ), f"{mapping.name} is on the bus but not in the platform table"
        (entry,) = [e for e in table.entries.values() if window in e.windows]
        if entry.description in (Description.FADT, Description.MADT):
            assert (mapping.space, mapping.base) in described, mapping.name
        elif entry.description is Description.LEGACY:
            assert fadt.iapc_boot_arch & IAPC_LEGACY_DEVICES, mapping.name
        elif entry.description is Description.I8042:
            assert fadt.iapc_boot_arch & IAPC_8042, mapping.name
        elif mapping.name == "pci-conf":
            # Found by probing, as Linux's pci_check_type1 does: CONFIG_ADDRESS keeps a
            # dword, and the host bridge answers at bus 0, device 0.
            rig.write("pio", mapping.base, 4, 0x8000_0000)
            assert rig.read("pio", mapping.base, 4) == 0x8000_0000
            assert rig.read("pio", mapping.base + 4, 2) == 0x8086
        elif mapping.name == "pci-ecam":
            # The window the MCFG names (kvm_vmm.acpi builds it from the board's).
            assert (mapping.base, mapping.length) == (
                board.PCI_ECAM_WINDOW.start,
                board.PCI_ECAM_WINDOW.size,
            )
        else:
            assert entry.name == "fw_cfg", f"{entry.name}: nothing tells the guest of it"
    # And nothing the tables name is missing from the bus.
    for space, address in described:
        rig.decode(space, address, 1)


def test_the_tables_follow_the_platform_table_not_fixed_numbers() -> None:
    """Move the PM block, SCI, reset port and IOAPIC in a table: FADT and MADT follow."""
    table = PlatformTable()
    table.add(
        "acpi-pm",
        (pio(0xB000, 4, "pm1a-evt"), pio(0xB004, 2, "pm1a-cnt"), pio(0xB008, 4, "pm-tmr")),
        (10,),
        Description.FADT,
    )
    table.add("reset", (pio(0x92, 1, "reset"),), (), Description.FADT)
    ioapic = Window("mmio", 0xFEC1_0000, 0x1000, "ioapic")
    table.add("ioapic", (ioapic,), (), Description.MADT)
    blob, rsdp = acpi.build_acpi_tables(table, 1)
    tables = _rsdt_tables(blob, rsdp)
    fadt, madt = parse_fadt(tables[b"FACP"]), parse_madt(tables[b"APIC"])
    assert (fadt.pm1a_event, fadt.pm1a_control, fadt.pm_timer) == (
        (0xB000, 4),
        (0xB004, 2),
        (0xB008, 4),
    )
    assert fadt.sci == 10 and fadt.reset_register == (GAS_SYSTEM_IO, 0x92, 8)
    assert madt.ioapics == [(board.ioapic_id(1), ioapic.base, board.IOAPIC_GSI_BASE)]
    assert (10, 10, 0b1101) in madt.overrides
    # No legacy device and no 8042 in this table: the boot architecture flags say so.
    assert fadt.iapc_boot_arch & (IAPC_LEGACY_DEVICES | IAPC_8042) == 0


class Probe:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_kvmfast_bus_of_a_machine_decodes_what_its_installed_tables_name() -> None:
    """The tables as the guest reads them from RAM, against kvmfast's own address map:
    a probe range over any byte a table names is refused as overlapping that window."""
    require_kvm()
    with Machine(MachineConfig(memory_size=4 * layout.MIB, cpus=2)) as machine:
        rsdp = machine.install_acpi_tables()
        blob = machine.read_memory(layout.ACPI_TABLES.start, layout.ACPI_TABLES.size)
        tables = _rsdt_tables(blob, rsdp)
        fadt, madt = parse_fadt(tables[b"FACP"]), parse_madt(tables[b"APIC"])
        ((_, ioapic_address, _),) = madt.ioapics
        named: list[tuple[AddressSpace, int, int]] = [
            ("pio", *fadt.pm1a_event),
            ("pio", *fadt.pm1a_control),
            ("pio", *fadt.pm_timer),
            ("pio", fadt.reset_register[1], fadt.reset_register[2] // 8),
            ("mmio", ioapic_address, Ioapic.SIZE),
        ]
        for space, address, length in named:
            add = machine.vm.add_pio if space == "pio" else machine.vm.add_mmio
            # The range mapped there: the reset register's is the PCI host's ports.
            window = machine.platform.table.decoder(space, address, length)
            assert window is not None
            for byte in (0, length - 1):
                with pytest.raises(
                    ValueError, match=rf"overlaps {window.base:#x}\+{window.length:#x}"
                ):
                    add(address + byte, 1, Probe())
