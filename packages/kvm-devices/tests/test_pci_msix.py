"""Tests of MSI-X (PCI Local Bus Specification 3.0 §6.8.2, §6.8.3.4).

A recording sink stands for the VMM: it sees every message or effective-mask change and
every vector fired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvm_devices.pci.config_space import PciConfigSpace
from kvm_devices.pci.msix import CAPABILITY_ID, MsixCounters, MsixTable
from kvm_devices.snapshot import StateError

TABLE_OFFSET = 0x4000
PBA_OFFSET = 0x5000
ENABLE = 1 << 15
FUNCTION_MASK = 1 << 14


@dataclass
class RecordingSink:
    events: list[tuple[object, ...]] = field(default_factory=list)

    def vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.events.append(("changed", vector, address, data, masked))

    def fire(self, vector: int) -> None:
        self.events.append(("fire", vector))

    def take(self) -> list[tuple[object, ...]]:
        events, self.events = self.events, []
        return events


@dataclass
class Function:
    config: PciConfigSpace
    msix: MsixTable
    sink: RecordingSink
    cap: int

    def control(self) -> int:
        return self.config.read(self.cap + 2, 2)

    def set_control(self, bits: int) -> None:
        self.config.write(self.cap + 2, 2, bits)

    def program(self, vector: int, address: int, data: int, masked: bool) -> None:
        base = vector * 16
        self.msix.table_write(base, 8, address)
        self.msix.table_write(base + 8, 4, data)
        self.msix.table_write(base + 12, 4, int(masked))


def make(vectors: int = 3) -> Function:
    sink = RecordingSink()
    config = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1042, class_code=0x010000)
    config.add_memory_bar(0, 0x8000)
    msix = MsixTable(vectors, 0, TABLE_OFFSET, 0, PBA_OFFSET, sink)
    cap = msix.add_to(config)
    return Function(config, msix, sink, cap)


def test_capability_layout() -> None:
    f = make(vectors=3)
    assert f.config.read(f.cap, 1) == CAPABILITY_ID == 0x11
    assert f.config.read(f.cap + 2, 2) == 2  # table size N - 1, disabled, unmasked
    assert f.config.read(f.cap + 4, 4) == TABLE_OFFSET | 0  # BIR 0
    assert f.config.read(f.cap + 8, 4) == PBA_OFFSET | 0
    assert f.config.read(6, 2) & 0x10  # capabilities list
    f.config.write(f.cap + 2, 2, 0x3FFF)  # table size is read-only
    f.config.write(f.cap + 4, 4, 0xFFFF_FFFF)
    assert f.control() == 2 and f.config.read(f.cap + 4, 4) == TABLE_OFFSET
    f.config.write(f.cap, 4, 0xC000_0000)  # a dword write at the capability's start
    assert f.control() == 2 | ENABLE | FUNCTION_MASK
    assert f.msix.enabled and f.msix.function_masked


def test_entries_reset_masked_and_read_back_what_was_written() -> None:
    f = make()
    assert [f.msix.table_read(v * 16 + 12, 4) for v in range(3)] == [1, 1, 1]
    f.program(1, 0xFEE0_100F, 0x4041, masked=False)
    assert f.msix.table_read(16, 8) == 0xFEE0_100C  # address bits 1:0 read 0
    assert f.msix.table_read(24, 8) == 0x4041  # data, then vector control 0
    f.msix.table_write(28, 4, 0xFFFF_FFFF)
    assert f.msix.table_read(28, 4) == 1  # reserved bits read 0
    f.msix.table_write(20, 4, 0x1)
    assert f.msix.message(1) == (0x1_FEE0_100C, 0x4041, True)  # disabled: masked


def test_vector_changed_follows_message_and_effective_mask() -> None:
    f = make()
    f.program(0, 0xFEE0_0000, 0x30, masked=False)
    # Still disabled: the message changed, the effective mask did not.
    assert f.sink.take() == [
        ("changed", 0, 0xFEE0_0000, 0, True),
        ("changed", 0, 0xFEE0_0000, 0x30, True),
    ]
    f.set_control(ENABLE)
    assert f.sink.take() == [("changed", 0, 0xFEE0_0000, 0x30, False)]
    f.set_control(ENABLE | FUNCTION_MASK)
    assert f.sink.take() == [("changed", 0, 0xFEE0_0000, 0x30, True)]
    f.set_control(ENABLE)
    f.msix.table_write(12, 4, 1)
    assert f.sink.take() == [
        ("changed", 0, 0xFEE0_0000, 0x30, False),
        ("changed", 0, 0xFEE0_0000, 0x30, True),
    ]
    f.msix.table_write(12, 4, 1)  # no change, no report
    assert f.sink.take() == []


def test_signal_fires_an_unmasked_vector() -> None:
    f = make()
    f.program(2, 0xFEE0_0000, 0x31, masked=False)
    f.set_control(ENABLE)
    f.sink.take()
    f.msix.signal(2)
    assert f.sink.take() == [("fire", 2)]
    assert f.msix.pba_read(0, 8) == 0


def test_a_vector_masked_by_its_entry_is_held_pending_then_fired_on_unmask() -> None:
    f = make()
    f.program(1, 0xFEE0_0000, 0x32, masked=True)
    f.set_control(ENABLE)
    f.sink.take()
    f.msix.signal(1)
    f.msix.signal(1)  # still one pending bit
    assert f.sink.take() == []
    assert f.msix.pba_read(0, 4) == 0b010 and f.msix.pba_read(0, 8) == 0b010
    f.msix.table_write(16 + 12, 4, 0)
    assert f.sink.take() == [("changed", 1, 0xFEE0_0000, 0x32, False), ("fire", 1)]
    assert f.msix.pba_read(0, 8) == 0


def test_function_mask_holds_every_vector_and_releases_the_pending_ones() -> None:
    f = make()
    for vector in range(3):
        f.program(vector, 0xFEE0_0000, 0x40 + vector, masked=vector == 2)
    f.set_control(ENABLE | FUNCTION_MASK)
    f.sink.take()
    for vector in range(3):
        f.msix.signal(vector)
    assert f.sink.take() == [] and f.msix.pba_read(0, 8) == 0b111
    f.set_control(ENABLE)
    assert f.sink.take() == [
        ("changed", 0, 0xFEE0_0000, 0x40, False),
        ("fire", 0),
        ("changed", 1, 0xFEE0_0000, 0x41, False),
        ("fire", 1),
    ]
    assert f.msix.pba_read(0, 8) == 0b100  # vector 2's own mask still holds it


def test_a_signal_while_disabled_is_dropped_and_counted() -> None:
    f = make()
    f.program(0, 0xFEE0_0000, 0x30, masked=False)
    f.sink.take()
    f.msix.signal(0)
    f.msix.signal(7)  # beyond the table
    assert f.msix.pba_read(0, 8) == 0 and f.sink.take() == []
    assert f.msix.counters() == MsixCounters(bad_accesses=0, dropped_signals=2)
    f.set_control(ENABLE)  # nothing was held
    assert f.sink.take() == [("changed", 0, 0xFEE0_0000, 0x30, False)]


def test_pending_bits_survive_a_disable_and_fire_when_enabled_again() -> None:
    f = make()
    f.program(0, 0xFEE0_0000, 0x30, masked=True)
    f.set_control(ENABLE)
    f.msix.signal(0)
    f.set_control(0)
    f.msix.table_write(12, 4, 0)
    assert f.msix.pba_read(0, 8) == 1
    f.sink.take()
    f.set_control(ENABLE)
    assert f.sink.take() == [("changed", 0, 0xFEE0_0000, 0x30, False), ("fire", 0)]


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 1), (0, 2), (2, 4), (4, 8), (48, 4), (44, 8), (-4, 4), (0, 16)],
)
def test_bad_table_accesses_read_all_ones_and_are_counted(offset: int, size: int) -> None:
    f = make()  # a 48-byte table
    f.program(0, 0x1234_5678, 0x9ABC, masked=False)
    before = [f.msix.table_read(at, 4) for at in range(0, 48, 4)]
    assert f.msix.table_read(offset, size) == (1 << (8 * size)) - 1
    f.msix.table_write(offset, size, 0)
    assert [f.msix.table_read(at, 4) for at in range(0, 48, 4)] == before
    assert f.msix.counters().bad_accesses == 2


def test_pba_is_read_only_and_checked() -> None:
    f = make(vectors=70)
    assert f.msix.pba_size == 16
    f.program(65, 0xFEE0_0000, 0x50, masked=True)
    f.set_control(ENABLE)
    f.msix.signal(65)
    assert f.msix.pba_read(8, 8) == 0b10 and f.msix.pba_read(12, 4) == 0
    f.msix.pba_write(8, 8, 0)
    assert f.msix.pba_read(8, 4) == 0b10
    assert f.msix.pba_read(16, 4) == 0xFFFF_FFFF and f.msix.pba_read(2, 4) == 0xFFFF_FFFF
    assert f.msix.counters().bad_accesses == 2


@given(offset=st.integers(-8, 64), size=st.integers(-1, 9), value=st.integers(0, (1 << 64) - 1))
def test_any_table_access_is_answered(offset: int, size: int, value: int) -> None:
    f = make()
    f.msix.table_write(offset, size, value)
    f.msix.pba_write(offset, size, value)
    limit = 1 << (8 * max(size, 0))
    assert 0 <= f.msix.table_read(offset, size) < limit
    assert 0 <= f.msix.pba_read(offset, size) < limit


def test_bad_configurations_are_refused() -> None:
    sink = RecordingSink()
    with pytest.raises(ValueError, match="vectors"):
        MsixTable(0, 0, 0, 0, 0x800, sink)
    with pytest.raises(ValueError, match="BAR"):
        MsixTable(1, 6, 0, 0, 0x800, sink)
    with pytest.raises(ValueError, match="offset"):
        MsixTable(1, 0, 4, 0, 0x800, sink)
    with pytest.raises(ValueError, match="out of range"):
        MsixTable(1, 0, 0, 0, 0x800, sink).message(1)


def busy() -> Function:
    f = make()
    f.program(0, 0xFEE0_1000, 0x41, masked=False)
    f.program(1, 0xFEE0_2000, 0x42, masked=True)
    f.set_control(ENABLE)
    f.msix.signal(1)
    return f


def test_state_round_trips_and_reports_every_vector() -> None:
    source = busy()
    text = json.dumps(source.msix.save())
    target = make()
    target.msix.restore(json.loads(text))
    assert target.msix.save_state() == source.msix.save_state()
    assert target.control() == 2 | ENABLE
    assert target.msix.pba_read(0, 8) == 0b10
    assert target.sink.take() == [
        ("changed", 0, 0xFEE0_1000, 0x41, False),
        ("changed", 1, 0xFEE0_2000, 0x42, True),
        ("changed", 2, 0, 0, True),
    ]
    target.msix.table_write(16 + 12, 4, 0)
    assert target.sink.take()[-1] == ("fire", 1)


def test_inconsistent_states_are_refused() -> None:
    data = busy().msix.save()
    target = make()
    before = target.msix.save()
    with pytest.raises(StateError, match="addresses: has 2 vectors, not 3"):
        two = json.loads(json.dumps(data))
        for name in ("addresses", "data", "masked", "pending"):
            two[name] = two[name][:2]
        target.msix.restore(two)
    with pytest.raises(StateError, match=r"pending\[0\]: pending on an unmasked vector"):
        target.msix.restore({**data, "pending": [True, True, False]})
    with pytest.raises(StateError, match="masked: must have one item per vector"):
        target.msix.restore({**data, "masked": [True]})
    with pytest.raises(StateError, match=r"addresses\[0\]"):
        target.msix.restore({**data, "addresses": [3, 0, 0]})
    assert target.msix.save() == before
