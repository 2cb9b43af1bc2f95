"""Tests of PCI bus 0, configuration mechanism #1 (0xCF8/0xCFC) and ECAM.

References: PCI Local Bus Specification 3.0 §3.2.2.3.2 (mechanism #1); PCI Express Base
Specification 3.0 §7.2.2 (ECAM); Intel 82371AB PIIX4 datasheet (reset control at 0xCF9).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.pci.config_space import PciConfigSpace
from kvm_devices.pci.host_bridge import (
    ConfigMechanism1,
    Ecam,
    PciBus,
    PciConfigCounters,
    PciHost,
)
from kvm_devices.reset_port import ResetPort
from kvm_devices.snapshot import StateError

ENABLE = 1 << 31


@dataclass
class Function:
    config: PciConfigSpace


def virtio_function() -> Function:
    config = PciConfigSpace(
        vendor_id=0x1AF4, device_id=0x1042, class_code=0x010000, revision=1, interrupt_pin=1
    )
    config.add_memory_bar(0, 0x8000)
    return Function(config)


class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@dataclass
class Rig:
    host: PciHost
    resets: Resets
    function: Function

    @property
    def ports(self) -> ConfigMechanism1:
        return self.host.config_ports

    @property
    def ecam(self) -> Ecam:
        return self.host.ecam

    def bad(self) -> dict[str, int]:
        counters = dataclasses.asdict(self.host.bus.counters())
        return {k: v for k, v in counters.items() if v and k not in ("reads", "writes")}


def make() -> Rig:
    resets = Resets()
    host = PciHost(ResetPort(resets))
    function = virtio_function()
    host.bus.add(3, function)
    return Rig(host, resets, function)


def address(bus: int, device: int, function: int, register: int) -> int:
    return ENABLE | bus << 16 | device << 11 | function << 8 | register


def ecam_offset(bus: int, device: int, function: int, register: int) -> int:
    return bus << 20 | device << 15 | function << 12 | register


def test_the_host_bridge_is_slot_0_as_on_q35() -> None:
    rig = make()
    rig.ports.write(0, 4, address(0, 0, 0, 0))
    assert rig.ports.read(4, 4) == 0x29C0_8086
    rig.ports.write(0, 4, address(0, 0, 0, 0x08))
    assert rig.ports.read(4, 4) >> 8 == 0x060000
    assert rig.ecam.read(ecam_offset(0, 0, 0, 0x0E), 1) == 0x00  # single function


def test_mechanism_1_address_register() -> None:
    rig = make()
    assert isinstance(rig.ports, Device)
    assert (ConfigMechanism1.BASE, ConfigMechanism1.LENGTH) == (0xCF8, 8)
    rig.ports.write(0, 4, 0xFFFF_FFFF)
    assert rig.ports.read(0, 4) == 0x80FF_FFFF  # reserved bits 30:24 read 0; 1:0 kept
    # Linux's pci_check_type1: a byte to 0xCFB passes through, the dword sticks.
    rig.ports.write(3, 1, 0x01)
    rig.ports.write(0, 4, 0x8000_0000)
    assert rig.ports.read(0, 4) == 0x8000_0000


def test_mechanism_1_register_low_bits_select_bytes_as_in_qemu() -> None:
    # kvm-unit-tests' pci_config_readw(dev, PCI_DEVICE_ID): CONFIG_ADDRESS = ... | 2, then
    # a word at 0xCFC; QEMU (hw/pci/pci_host.c) reads register config_reg | (port & 3).
    rig = make()
    rig.ports.write(0, 4, address(0, 3, 0, 0x00) | 2)
    assert rig.ports.read(4, 2) == 0x1042
    rig.ports.write(0, 4, address(0, 3, 0, 0x00) | 3)
    assert rig.ports.read(4, 1) == 0x10
    assert rig.ports.read(6, 1) == 0x10  # 3 | 2: the same byte
    assert rig.bad() == {}


def test_mechanism_1_data_port_byte_word_dword_offsets() -> None:
    rig = make()
    rig.ports.write(0, 4, address(0, 3, 0, 0x00))
    assert rig.ports.read(4, 4) == 0x1042_1AF4
    assert rig.ports.read(4, 2) == 0x1AF4
    assert rig.ports.read(6, 2) == 0x1042
    assert rig.ports.read(7, 1) == 0x10
    rig.ports.write(0, 4, address(0, 3, 0, 0x3C))
    rig.ports.write(4, 1, 11)
    assert rig.ports.read(4, 4) == 0x0000_010B
    rig.ports.write(0, 4, address(0, 3, 0, 0x10))
    rig.ports.write(4, 4, 0xFFFF_FFFF)
    assert rig.ports.read(4, 4) == 0xFFFF_8004  # BAR sizing through the ports
    assert rig.bad() == {}
    counters = rig.host.bus.counters()
    assert (counters.reads, counters.writes) == (6, 2)


def test_ecam_decode() -> None:
    rig = make()
    assert rig.ecam.length == 256 << 20
    assert rig.ecam.read(ecam_offset(0, 3, 0, 0), 4) == 0x1042_1AF4
    assert rig.ecam.read(ecam_offset(0, 3, 0, 0x2), 2) == 0x1042
    rig.ecam.write(ecam_offset(0, 3, 0, 0x04), 2, 0x0006)
    assert rig.function.config.memory_enabled and rig.function.config.bus_master
    assert rig.ecam.read(ecam_offset(0, 3, 0, 0x3D), 1) == 1
    assert rig.bad() == {}


# Each bad access: (mechanism, how, the counter it lands in). Every one reads all ones.
MECHANISM_1_BAD = [
    ("enable bit clear", 0x0000_1800, 4, 4, "disabled"),
    ("absent bus", address(1, 3, 0, 0), 4, 4, "absent_bus"),
    ("empty slot", address(0, 5, 0, 0), 4, 4, "absent_device"),
    ("function 1", address(0, 3, 1, 0), 4, 4, "absent_function"),
    ("unaligned word", address(0, 3, 0, 0), 5, 2, "unaligned"),
    ("dword crossing", address(0, 3, 0, 0), 6, 4, "unaligned"),
    ("three bytes", address(0, 3, 0, 0), 4, 3, "bad_size"),
    ("word at 0xCF8", address(0, 3, 0, 0), 0, 2, "undecoded"),
    ("word at 0xCF9", address(0, 3, 0, 0), 1, 2, "undecoded"),
    ("byte at 0xCFA", address(0, 3, 0, 0), 2, 1, "undecoded"),
    ("beyond the ports", address(0, 3, 0, 0), 8, 1, "undecoded"),
]


@pytest.mark.parametrize(
    ("what", "config_address", "offset", "size", "counter"),
    MECHANISM_1_BAD,
    ids=[case[0] for case in MECHANISM_1_BAD],
)
def test_bad_mechanism_1_accesses_read_all_ones_and_are_counted(
    what: str, config_address: int, offset: int, size: int, counter: str
) -> None:
    rig = make()
    rig.ports.write(0, 4, config_address)
    before = rig.function.config.save()
    assert rig.ports.read(offset, size) == (1 << (8 * size)) - 1
    rig.ports.write(offset, size, 0)
    assert rig.function.config.save() == before
    assert rig.ports.read(0, 4) == config_address  # CONFIG_ADDRESS untouched
    assert rig.bad() == {counter: 2}
    assert rig.resets.count == 0


ECAM_BAD = [
    ("absent bus", ecam_offset(1, 3, 0, 0), 4, "absent_bus"),
    ("empty slot", ecam_offset(0, 31, 0, 0), 4, "absent_device"),
    ("function 7", ecam_offset(0, 3, 7, 0), 4, "absent_function"),
    ("extended space", ecam_offset(0, 3, 0, 0x100), 4, "beyond_space"),
    ("unaligned dword", ecam_offset(0, 3, 0, 0x2), 4, "unaligned"),
    ("odd word", ecam_offset(0, 3, 0, 0x3), 2, "unaligned"),
    ("qword", ecam_offset(0, 3, 0, 0x10), 8, "bad_size"),
    ("beyond the window", 256 << 20, 4, "absent_bus"),
]


@pytest.mark.parametrize(
    ("what", "offset", "size", "counter"), ECAM_BAD, ids=[case[0] for case in ECAM_BAD]
)
def test_bad_ecam_accesses_read_all_ones_and_are_counted(
    what: str, offset: int, size: int, counter: str
) -> None:
    rig = make()
    before = rig.function.config.save()
    assert rig.ecam.read(offset, size) == (1 << (8 * size)) - 1
    rig.ecam.write(offset, size, 0)
    assert rig.function.config.save() == before
    assert rig.bad() == {counter: 2}


def test_the_reset_register_is_reached_by_a_byte_at_0xcf9() -> None:
    rig = make()
    rig.ports.write(0, 4, address(0, 3, 0, 0))
    rig.ports.write(1, 1, 0x02)  # SYS_RST alone: no reset yet
    assert rig.resets.count == 0 and rig.ports.read(1, 1) == 0x02
    rig.ports.write(1, 1, ResetPort.RESET_VALUE)
    assert rig.resets.count == 1
    assert rig.ports.read(0, 4) == address(0, 3, 0, 0)  # CONFIG_ADDRESS untouched
    assert rig.bad() == {}


@given(
    offset=st.integers(-4, 12),
    size=st.integers(-1, 9),
    value=st.integers(0, (1 << 64) - 1),
    config_address=st.integers(0, (1 << 32) - 1),
)
def test_any_port_access_is_answered(
    offset: int, size: int, value: int, config_address: int
) -> None:
    host = PciHost(ResetPort(lambda: None))
    host.config_ports.write(0, 4, config_address)
    host.config_ports.write(offset, size, value)
    assert 0 <= host.config_ports.read(offset, size) < 1 << (8 * max(size, 0))


@given(offset=st.integers(-8, (257 << 20)), size=st.integers(-1, 9))
def test_any_ecam_access_is_answered(offset: int, size: int) -> None:
    host = PciHost(ResetPort(lambda: None))
    host.bus.add(1, virtio_function())
    host.ecam.write(offset, size, (1 << 64) - 1)
    assert 0 <= host.ecam.read(offset, size) < 1 << (8 * max(size, 0))


def test_slots_and_a_smaller_ecam_window() -> None:
    bus = PciBus()
    assert bus.function(0) is bus.host_bridge
    assert bus.free_slot() == 1
    with pytest.raises(ValueError, match="taken"):
        bus.add(0, virtio_function())
    with pytest.raises(ValueError, match="out of range"):
        bus.add(32, virtio_function())
    for slot in range(1, 32):
        bus.add(slot, virtio_function())
    with pytest.raises(ValueError, match="every PCI slot"):
        bus.free_slot()
    ecam = Ecam(bus, buses=1)
    assert ecam.length == 1 << 20
    assert ecam.read(1 << 20, 4) == 0xFFFF_FFFF
    assert bus.counters() == PciConfigCounters(absent_bus=1)


def test_host_state_round_trips() -> None:
    rig = make()
    rig.ports.write(0, 4, address(0, 0, 0, 0x04))
    rig.ports.write(4, 2, 0x0006)
    rig.ports.write(0, 4, address(0, 3, 0, 0x10))
    text = json.dumps(rig.host.save())
    target = PciHost(ResetPort(lambda: None))
    target.restore(json.loads(text))
    assert target.save_state() == rig.host.save_state()
    assert target.config_ports.read(0, 4) == address(0, 3, 0, 0x10)
    assert target.bus.host_bridge.config.read(4, 2) == 0x0006


def test_a_foreign_host_state_is_refused_by_path() -> None:
    host = PciHost(ResetPort(lambda: None))
    data = host.save()
    bridge = dict(data["host_bridge"])  # type: ignore[call-overload]
    bridge["registers"] = "ff" + bridge["registers"][2:]
    with pytest.raises(StateError, match=r"^PCI host state: host_bridge\.registers: byte 0x0"):
        host.restore({**data, "host_bridge": bridge})
    with pytest.raises(StateError, match=r"config_address\.address: 0x1000000 sets bits"):
        host.restore({**data, "config_address": {"address": 1 << 24}})  # reserved bit 24
    assert host.save() == data
