"""Tests of a PCI function's configuration space (type 0 header).

References: PCI Local Bus Specification 3.0 §6.1 (figure 6-1), §6.2.2 command, §6.2.3
status, §6.2.4 interrupt line/pin, §6.2.5.1 BAR sizing, §6.7 capabilities list.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.pci.config_space import PciConfigSpace, PciConfigState
from kvm_devices.snapshot import StateError


def make(**overrides: int) -> PciConfigSpace:
    arguments = {
        "vendor_id": 0x1AF4,
        "device_id": 0x1042,
        "class_code": 0x010000,
        "revision": 1,
        "subsystem_vendor_id": 0x1AF4,
        "subsystem_id": 0x40,
        "interrupt_pin": 1,
    } | overrides
    return PciConfigSpace(**arguments)


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_identification_is_read_only() -> None:
    space = make()
    assert isinstance(space, Device)
    assert space.read(0, 4) == 0x1042_1AF4
    assert space.read(0x08, 4) == 0x0100_0001  # class 01 00 00, revision 1
    assert space.read(0x0E, 1) == 0x00  # header type 0, single function
    assert space.read(0x2C, 4) == 0x0040_1AF4
    assert space.read(0x3D, 1) == 1
    for offset in (0x00, 0x08, 0x2C, 0x30, 0x34):
        before = space.read(offset, 4)
        space.write(offset, 4, 0xFFFF_FFFF)
        assert space.read(offset, 4) == before, hex(offset)
    space.write(0x0C, 4, 0xFFFF_FFFF)
    assert space.read(0x0C, 4) == 0x0000_00FF  # cache line size only; header type 0
    space.write(0x3C, 4, 0xFFFF_FF0B)
    assert space.read(0x3C, 4) == 0x0000_010B  # line 11 (RW), pin INTA (RO), gnt/lat 0


def test_command_writable_bits_and_their_properties() -> None:
    space = make()
    space.write(0x04, 2, 0xFFFF)
    assert space.read(0x04, 2) == 0x0407  # I/O, memory, bus master, INTx disable
    assert space.memory_enabled and space.bus_master and space.intx_disabled
    space.write(0x04, 2, 0x0002)
    assert space.memory_enabled and not space.bus_master and not space.intx_disabled


def test_status_reports_capabilities_and_interrupt_and_ignores_writes() -> None:
    space = make()
    assert space.read(0x06, 2) == 0
    space.add_capability(0x09, bytes(2))
    assert space.read(0x06, 2) == 0x0010
    space.set_interrupt_status(True)
    assert space.read(0x06, 2) == 0x0018
    space.write(0x06, 2, 0xFFFF)  # RW1C error bits are never set; RO bits stay
    space.write(0x04, 4, 0xFFFF_0000)
    assert space.read(0x06, 2) == 0x0018
    space.set_interrupt_status(False)
    assert space.read(0x06, 2) == 0x0010


def test_32bit_bar_sizing_and_programming() -> None:
    space = make()
    space.add_memory_bar(1, 0x1000, is_64bit=False, prefetchable=True)
    assert space.read(0x14, 4) == 0x0000_0008
    space.write(0x14, 4, 0xFFFF_FFFF)
    assert space.read(0x14, 4) == 0xFFFF_F008  # ~(size - 1) | prefetchable
    space.write(0x14, 4, 0xC000_1234)
    assert space.read(0x14, 4) == 0xC000_1008
    assert space.bar_address(1) == 0xC000_1000
    assert space.bar_address(0) is None and space.bar_address(2) is None
    # Unimplemented BARs are hard-wired 0 (§6.2.5.1).
    space.write(0x10, 4, 0xFFFF_FFFF)
    assert space.read(0x10, 4) == 0


def test_64bit_bar_uses_two_slots_and_sizes_both() -> None:
    space = make()
    space.add_memory_bar(0, 0x8000)
    assert space.read(0x10, 4) == 0x4  # memory, 64-bit, not prefetchable
    space.write(0x10, 4, 0xFFFF_FFFF)
    space.write(0x14, 4, 0xFFFF_FFFF)
    assert space.read(0x10, 4) == 0xFFFF_8004
    assert space.read(0x14, 4) == 0xFFFF_FFFF
    space.write(0x10, 4, 0xE000_0000)
    space.write(0x14, 4, 0x0000_0001)
    assert space.bar_address(0) == 0x1_E000_0000
    assert space.bar_address(1) is None  # the upper half starts no BAR
    assert space.read(0x10, 8) == 0x1_E000_0004


def test_a_bar_larger_than_4gib_sizes_its_upper_half() -> None:
    space = make()
    space.add_memory_bar(2, 1 << 34, prefetchable=True)
    space.write(0x18, 4, 0xFFFF_FFFF)
    space.write(0x1C, 4, 0xFFFF_FFFF)
    assert space.read(0x18, 8) == ((1 << 64) - (1 << 34)) | 0xC


def test_io_bar_sizing_programming_and_decode() -> None:
    # §6.2.5.1: bit 0 set for I/O; sizing reads back ~(size - 1) | 1 within the 64 KiB
    # x86 port space (bits 31-16 hard-wired 0, as for a device decoding 64 KiB).
    space = make()
    space.add_io_bar(1, 0x100, address=0xC000)
    assert space.read(0x14, 4) == 0xC001
    assert space.bar_address(1) == 0xC000 and space.bar_is_io(1)
    space.write(0x14, 4, 0xFFFF_FFFF)
    assert space.read(0x14, 4) == 0xFF01
    space.write(0x14, 4, 0xC123)
    assert space.bar_address(1) == 0xC100
    assert not space.io_enabled
    changed = Recorder()
    space.on_bars_changed = changed
    space.write(0x04, 2, 0x0001)
    assert space.io_enabled and not space.memory_enabled and changed.calls == 1


@pytest.mark.parametrize(
    ("index", "size", "address"),
    [(6, 0x100, 0), (0, 2, 0), (0, 0x200, 0), (0, 0x100, 0xC010), (0, 0x100, 0x10000)],
)
def test_bad_io_bar_declarations_are_refused(index: int, size: int, address: int) -> None:
    with pytest.raises(ValueError):
        make().add_io_bar(index, size, address=address)


@pytest.mark.parametrize(
    ("index", "size", "is_64bit"),
    [(5, 0x1000, True), (6, 0x1000, False), (-1, 0x1000, False), (0, 8, False), (0, 0x1800, True)],
)
def test_bad_bar_declarations_are_refused(index: int, size: int, is_64bit: bool) -> None:
    with pytest.raises(ValueError):
        make().add_memory_bar(index, size, is_64bit=is_64bit)


def test_overlapping_bar_slots_are_refused() -> None:
    space = make()
    space.add_memory_bar(0, 0x1000)
    with pytest.raises(ValueError, match="slot 1"):
        space.add_memory_bar(1, 0x1000, is_64bit=False)


def test_bars_changed_is_posted_for_address_and_memory_decode_changes_only() -> None:
    space = make()
    space.add_memory_bar(0, 0x1000)
    changed = Recorder()
    space.on_bars_changed = changed
    space.write(0x10, 4, 0xC000_0000)
    assert changed.calls == 1
    space.write(0x10, 4, 0xC000_0000)  # the same value: no change
    space.write(0x3C, 1, 5)
    space.write(0x04, 2, 0x0004)  # bus master only
    assert changed.calls == 1
    space.write(0x04, 2, 0x0006)
    assert changed.calls == 2
    space.write(0x14, 4, 1)
    assert changed.calls == 3


def test_capability_chain_walk_from_0x34() -> None:
    space = make()
    first = space.add_capability(0x09, bytes([0x10, 1, 2]))
    second = space.add_capability(0x11, bytes(10))
    third = space.add_capability(0x09, bytes(14))
    assert (first, second, third) == (0x40, 0x48, 0x54)  # dword aligned, packed
    walked = []
    pointer = space.read(0x34, 1) & 0xFC
    while pointer:
        walked.append((pointer, space.read(pointer, 1)))
        pointer = space.read(pointer + 1, 1) & 0xFC
    assert walked == [(0x40, 0x09), (0x48, 0x11), (0x54, 0x09)]
    assert space.read(first + 2, 1) == 0x10


def test_capability_bits_are_read_only_unless_masked_writable() -> None:
    space = make()
    offset = space.add_capability(0x09, bytes([0xAA, 0x00, 0x00]), writable_mask=b"\x00\x0f\xff")
    space.write(offset, 4, 0xFFFF_FFFF)
    assert space.read(offset, 4) == 0x0FAA_0009  # ID and next read-only too
    with pytest.raises(ValueError, match="as long as"):
        space.add_capability(0x09, bytes(2), writable_mask=b"\xff")


def test_capabilities_that_do_not_fit_are_refused() -> None:
    space = make()
    space.add_capability(0x09, bytes(0xB0))
    with pytest.raises(ValueError, match="no room"):
        space.add_capability(0x09, bytes(0x10))


class Body:
    """A capability handler recording accesses to a 6-byte body."""

    def __init__(self) -> None:
        self.value = 0x6655_4433_2211
        self.accesses: list[tuple[str, int, int, int]] = []

    def read_capability(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size, 0))
        return (self.value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write_capability(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))


def test_a_handler_owns_its_capability_body() -> None:
    space = make()
    body = Body()
    offset = space.add_capability(0x11, bytes(6), handler=body)
    assert space.read(offset, 4) == 0x2211_0011
    assert space.read(offset + 4, 4) == 0x6655_4433
    space.write(offset, 4, 0xABCD_FFFF)
    assert body.accesses[-1] == ("w", 0, 2, 0xABCD)
    assert space.read(offset, 2) == 0x0011  # ID and next stay the space's
    assert body.accesses == [("r", 0, 2, 0), ("r", 2, 4, 0), ("w", 0, 2, 0xABCD)]


@given(offset=st.integers(-16, 300), size=st.integers(-1, 16), value=st.integers(0, (1 << 64) - 1))
def test_any_access_is_answered_and_never_raises(offset: int, size: int, value: int) -> None:
    space = make()
    space.add_memory_bar(0, 0x1000)
    space.add_capability(0x11, bytes(6), handler=Body())
    space.write(offset, size, value)
    result = space.read(offset, size)
    assert 0 <= result < 1 << (8 * max(size, 0))
    assert space.read(0, 2) == 0x1AF4


def test_bytes_beyond_the_space_read_all_ones() -> None:
    space = make()
    assert space.read(0x100, 4) == 0xFFFF_FFFF
    assert space.read(0xFE, 4) == 0xFFFF_0000  # max_lat, min_gnt, then nothing


def test_bad_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="0xFFFF"):
        make(vendor_id=0xFFFF)
    with pytest.raises(ValueError, match="interrupt pin"):
        make(interrupt_pin=5)
    with pytest.raises(ValueError, match="class_code"):
        make(class_code=1 << 24)


def busy() -> PciConfigSpace:
    space = make()
    space.add_memory_bar(0, 0x8000)
    space.add_capability(0x09, bytes(4), writable_mask=b"\x00\xff\x00\x00")
    space.write(0x10, 8, 0x1_C000_0000)
    space.write(0x04, 2, 0x0406)
    space.write(0x3C, 1, 11)
    space.write(0x43, 1, 0x5A)
    space.set_interrupt_status(True)
    return space


def fresh() -> PciConfigSpace:
    space = make()
    space.add_memory_bar(0, 0x8000)
    space.add_capability(0x09, bytes(4), writable_mask=b"\x00\xff\x00\x00")
    return space


def test_state_round_trips_through_json_and_re_maps_the_bars() -> None:
    source = busy()
    text = json.dumps(source.save())
    target = fresh()
    changed = Recorder()
    target.on_bars_changed = changed
    target.restore(json.loads(text))
    assert changed.calls == 1
    assert [target.read(at, 4) for at in range(0, 256, 4)] == [
        source.read(at, 4) for at in range(0, 256, 4)
    ]
    assert target.bar_address(0) == 0x1_C000_0000 and target.memory_enabled
    assert target.save_state() == source.save_state()


def test_state_with_configuration_bits_is_refused_and_changes_nothing() -> None:
    target = fresh()
    registers = bytearray(busy().save_state().registers)
    registers[0] = 0x34  # the vendor ID is configuration, not state
    before = target.save()
    with pytest.raises(StateError, match=r"registers: byte 0x0 is 0x34"):
        target.restore({"registers": bytes(registers).hex()})
    with pytest.raises(StateError, match="registers"):
        target.restore({"registers": "00" * 255})
    assert target.save() == before
    assert PciConfigState().registers == bytes(256)


class Sloppy(Body):
    """A handler answering more bits than asked for (here: -1)."""

    def read_capability(self, offset: int, size: int) -> int:
        return -1


def test_a_handlers_answer_is_cut_to_the_bytes_it_owns() -> None:
    space = make()
    offset = space.add_capability(0x11, bytes(2), handler=Sloppy())
    assert space.read(offset, 4) == 0xFFFF_0011
