"""Tests of the 82093AA IOAPIC model.

Section numbers are those of the Intel 82093AA datasheet (290566-001); the EOI register
is the one of version-0x20 IOAPICs (Intel ICH datasheets, "EOI Register").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.ioapic import (
    RTE_DELIVERY_STATUS,
    RTE_MASKED,
    RTE_POLARITY,
    RTE_REMOTE_IRR,
    RTE_TRIGGER_LEVEL,
    Ioapic,
    IoapicState,
)
from kvm_devices.testing import RecordingIoapicSink, VirtualClock

LEVEL = RTE_TRIGGER_LEVEL
MASKED = RTE_MASKED
LOW_ACTIVE = RTE_POLARITY


@dataclass
class CountingSink(RecordingIoapicSink):
    """Also keeps every route report, in order."""

    route_calls: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def route_changed(self, pin: int, msi_address: int, msi_data: int, masked: bool) -> None:
        super().route_changed(pin, msi_address, msi_data, masked)
        self.route_calls.append((pin, msi_address, msi_data, masked))


def write_reg(ioapic: Ioapic, register: int, value: int) -> None:
    ioapic.write(Ioapic.IOREGSEL, 4, register)
    ioapic.write(Ioapic.IOWIN, 4, value)


def read_reg(ioapic: Ioapic, register: int) -> int:
    ioapic.write(Ioapic.IOREGSEL, 4, register)
    return ioapic.read(Ioapic.IOWIN, 4)


def set_entry(ioapic: Ioapic, pin: int, low: int, dest: int = 0) -> None:
    # Linux's __ioapic_write_entry writes the high half first.
    write_reg(ioapic, 0x11 + 2 * pin, dest << 24)
    write_reg(ioapic, 0x10 + 2 * pin, low)


def entry_low(ioapic: Ioapic, pin: int) -> int:
    return read_reg(ioapic, 0x10 + 2 * pin)


def make(pins: int = 24) -> tuple[Ioapic, CountingSink]:
    sink = CountingSink()
    return Ioapic(sink, pins=pins), sink


# ------------------------------------------------------------------ registers


def test_version_register_3_2_2_reports_max_entry_and_version_0x20() -> None:
    ioapic, _ = make()
    assert read_reg(ioapic, 0x01) == 0x0017_0020
    small, _ = make(pins=8)
    assert read_reg(small, 0x01) == 0x0007_0020
    write_reg(ioapic, 0x01, 0)
    assert read_reg(ioapic, 0x01) == 0x0017_0020


def test_id_register_3_2_1_bits_24_27_writable_and_arbitration_3_2_3_follows() -> None:
    ioapic, _ = make()
    assert read_reg(ioapic, 0x00) == 0
    write_reg(ioapic, 0x00, 0xFFFF_FFFF)
    assert read_reg(ioapic, 0x00) == 0x0F00_0000
    assert read_reg(ioapic, 0x02) == 0x0F00_0000
    write_reg(ioapic, 0x02, 0)
    assert read_reg(ioapic, 0x02) == 0x0F00_0000


def test_ioregsel_3_1_1_keeps_8_bits_and_reads_back() -> None:
    ioapic, _ = make()
    ioapic.write(Ioapic.IOREGSEL, 4, 0x1234_5611)
    assert ioapic.read(Ioapic.IOREGSEL, 4) == 0x11
    ioapic.write(Ioapic.IOREGSEL, 1, 0x12)
    assert ioapic.read(Ioapic.IOREGSEL, 1) == 0x12


def test_reset_3_2_4_all_entries_masked_and_reported() -> None:
    ioapic, sink = make()
    for pin in range(24):
        assert entry_low(ioapic, pin) == MASKED
        assert read_reg(ioapic, 0x11 + 2 * pin) == 0
    assert [call[0] for call in sink.route_calls] == list(range(24))
    assert all(call[3] for call in sink.route_calls)


def test_unknown_indirect_registers_read_all_ones_like_kvm() -> None:
    ioapic, _ = make()
    for register in (0x03, 0x0F, 0x10 + 2 * 24, 0x11 + 2 * 24, 0xFF):
        assert read_reg(ioapic, register) == 0xFFFF_FFFF
        write_reg(ioapic, register, 0)  # ignored, must not raise


def test_read_only_bits_3_2_4_delivery_status_and_remote_irr_ignore_writes() -> None:
    ioapic, _ = make()
    set_entry(ioapic, 5, 0x40 | RTE_DELIVERY_STATUS | RTE_REMOTE_IRR | LEVEL)
    assert entry_low(ioapic, 5) == 0x40 | LEVEL
    # Reserved bits 17-31 and 32-55 read back as 0.
    set_entry(ioapic, 5, 0xFFFE_0000 | 0x40)
    write_reg(ioapic, 0x11 + 2 * 5, 0xFFFF_FFFF)
    assert entry_low(ioapic, 5) == 0x40
    assert read_reg(ioapic, 0x11 + 2 * 5) == 0xFF00_0000


def test_iowin_accepts_only_4_byte_accesses_like_qemu() -> None:
    ioapic, _ = make()
    ioapic.write(Ioapic.IOREGSEL, 4, 0x10)
    ioapic.write(Ioapic.IOWIN, 2, 0x0040)
    assert ioapic.read(Ioapic.IOWIN, 4) == MASKED
    assert ioapic.read(Ioapic.IOWIN, 1) == 0
    assert ioapic.read(Ioapic.IOWIN, 2) == 0


def test_undecoded_offsets_read_all_ones_and_8_byte_access_splits() -> None:
    ioapic, _ = make()
    assert ioapic.read(0x20, 4) == 0xFFFF_FFFF
    assert ioapic.read(0x04, 2) == 0xFFFF
    ioapic.write(Ioapic.IOREGSEL, 4, 0x01)
    assert ioapic.read(0x00, 8) == 0xFFFF_FFFF_0000_0001
    assert ioapic.read(0x10, 8) == 0xFFFF_FFFF_0017_0020
    assert ioapic.read(Ioapic.EOI, 4) == 0
    assert ioapic.read(0x10, 3) == 0xFF_FFFF


# --------------------------------------------------------------------- routes


def test_route_report_carries_dest_dest_mode_vector_delivery_mode_and_level_bit() -> None:
    ioapic, sink = make()
    # Vector 0x31, lowest priority (1), logical destination, level, destination 0x0F.
    set_entry(ioapic, 3, 0x31 | (1 << 8) | (1 << 11) | LEVEL, dest=0x0F)
    assert sink.routes[3] == (0xFEE0_F004, 0x31 | 0x100 | 0x8000, False)
    # Edge, physical destination 2, fixed delivery: no bit 15.
    set_entry(ioapic, 4, 0x41, dest=2)
    assert sink.routes[4] == (0xFEE0_2000, 0x41, False)
    set_entry(ioapic, 4, 0x41 | MASKED, dest=2)
    assert sink.routes[4] == (0xFEE0_2000, 0x41, True)


def test_route_reported_only_when_message_or_mask_changes() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 1, 0x51 | LEVEL, dest=1)
    before = len(sink.route_calls)
    set_entry(ioapic, 1, 0x51 | LEVEL, dest=1)  # identical
    set_entry(ioapic, 1, 0x51 | LEVEL | (1 << 13), dest=1)  # polarity only
    assert len(sink.route_calls) == before
    set_entry(ioapic, 1, 0x52 | LEVEL, dest=1)
    assert sink.route_calls[-1] == (1, 0xFEE0_1000, 0x52 | 0x8000, False)
    ioapic.report_all_routes()
    assert len(sink.route_calls) == before + 1 + 24


# ------------------------------------------------------------------- delivery


def test_edge_pin_delivers_on_each_rising_edge_only() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 2, 0x30)
    ioapic.set_irq(2, True)
    ioapic.set_irq(2, True)
    assert sink.deliveries == [2]
    ioapic.set_irq(2, False)
    ioapic.set_irq(2, True)
    assert sink.deliveries == [2, 2]
    assert entry_low(ioapic, 2) & RTE_REMOTE_IRR == 0


def test_masked_edge_is_lost_3_2_4_interrupt_mask() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 2, 0x30 | MASKED)
    ioapic.set_irq(2, True)
    ioapic.set_irq(2, False)
    set_entry(ioapic, 2, 0x30)
    assert sink.deliveries == []


def test_level_pin_sets_remote_irr_and_redelivers_on_eoi_while_asserted() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 9, 0x39 | LEVEL)
    ioapic.set_irq(9, True)
    assert sink.deliveries == [9]
    assert entry_low(ioapic, 9) & RTE_REMOTE_IRR
    ioapic.eoi(0x39)
    assert sink.deliveries == [9, 9]
    assert entry_low(ioapic, 9) & RTE_REMOTE_IRR
    ioapic.set_irq(9, False)
    assert entry_low(ioapic, 9) & RTE_REMOTE_IRR  # only an EOI clears it
    ioapic.eoi(0x39)
    assert entry_low(ioapic, 9) & RTE_REMOTE_IRR == 0
    assert sink.deliveries == [9, 9]


def test_level_pin_coalesces_while_remote_irr_set() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 9, 0x39 | LEVEL)
    ioapic.set_irq(9, True)
    ioapic.set_irq(9, False)
    ioapic.set_irq(9, True)
    assert sink.deliveries == [9]


def test_masked_level_pin_delivers_when_unmasked() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 11, 0x3B | LEVEL | MASKED)
    ioapic.set_irq(11, True)
    assert sink.deliveries == []
    set_entry(ioapic, 11, 0x3B | LEVEL)
    assert sink.deliveries == [11]
    assert entry_low(ioapic, 11) & RTE_REMOTE_IRR


def test_masked_level_pin_eoi_clears_remote_irr_without_delivery() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 11, 0x3B | LEVEL)
    ioapic.set_irq(11, True)
    set_entry(ioapic, 11, 0x3B | LEVEL | MASKED)
    ioapic.eoi(0x3B)
    assert sink.deliveries == [11]
    assert entry_low(ioapic, 11) & RTE_REMOTE_IRR == 0


def test_two_level_pins_sharing_a_vector_are_both_cleared_by_one_eoi() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 16, 0x60 | LEVEL)
    set_entry(ioapic, 17, 0x60 | LEVEL)
    ioapic.set_irq(16, True)
    ioapic.set_irq(17, True)
    assert sink.deliveries == [16, 17]
    ioapic.set_irq(16, False)
    ioapic.set_irq(17, False)
    ioapic.eoi(0x60)
    assert entry_low(ioapic, 16) & RTE_REMOTE_IRR == 0
    assert entry_low(ioapic, 17) & RTE_REMOTE_IRR == 0


def test_eoi_register_at_0x40_broadcasts_eoi() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 20, 0x70 | LEVEL)
    ioapic.set_irq(20, True)
    ioapic.write(Ioapic.EOI, 1, 0x70)  # not a 4-byte access: ignored
    assert sink.deliveries == [20]
    ioapic.write(Ioapic.EOI, 4, 0x70)
    assert sink.deliveries == [20, 20]
    ioapic.set_irq(20, False)
    ioapic.write(Ioapic.EOI, 4, 0xFFFF_FF70)
    assert entry_low(ioapic, 20) & RTE_REMOTE_IRR == 0


def test_eoi_of_a_foreign_vector_is_harmless() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 20, 0x70 | LEVEL)
    set_entry(ioapic, 21, 0x71)
    ioapic.set_irq(20, True)
    ioapic.eoi(0x71)  # edge entry's vector
    ioapic.eoi(0xEF)  # e.g. the LAPIC timer
    assert sink.deliveries == [20]
    assert entry_low(ioapic, 20) & RTE_REMOTE_IRR


def test_switching_to_edge_clears_remote_irr() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 6, 0x36 | LEVEL)
    ioapic.set_irq(6, True)
    set_entry(ioapic, 6, 0x36 | MASKED)
    assert entry_low(ioapic, 6) & RTE_REMOTE_IRR == 0
    # Back to level while still asserted: delivered again once unmasked.
    set_entry(ioapic, 6, 0x36 | LEVEL)
    assert sink.deliveries == [6, 6]


# ------------------------------------------------------------------- polarity


def test_low_active_level_pin_3_2_4_asserts_while_the_line_is_low() -> None:
    """Bit 13 = 1: the pin is asserted while its input is low (a PCI INTx# line)."""
    ioapic, sink = make()
    ioapic.set_irq(16, True)  # the pull-up, before the guest programs the pin
    set_entry(ioapic, 16, 0x60 | LEVEL | LOW_ACTIVE)
    assert sink.deliveries == []
    ioapic.set_irq(16, False)
    assert sink.deliveries == [16]
    ioapic.eoi(0x60)  # still low: still asserted
    assert sink.deliveries == [16, 16]
    ioapic.set_irq(16, True)
    ioapic.eoi(0x60)
    assert sink.deliveries == [16, 16]
    assert entry_low(ioapic, 16) & RTE_REMOTE_IRR == 0


def test_low_active_edge_pin_delivers_on_the_falling_edge() -> None:
    ioapic, sink = make()
    ioapic.set_irq(3, True)
    set_entry(ioapic, 3, 0x33 | LOW_ACTIVE)
    ioapic.set_irq(3, True)
    assert sink.deliveries == []
    ioapic.set_irq(3, False)
    assert sink.deliveries == [3]
    ioapic.set_irq(3, True)  # the rising edge deasserts
    assert sink.deliveries == [3]


def test_an_undriven_low_line_asserts_a_low_active_level_pin_once_unmasked() -> None:
    """Inputs start low: a low-active level pin nobody pulls up is asserted."""
    ioapic, sink = make()
    set_entry(ioapic, 17, 0x61 | LEVEL | LOW_ACTIVE | MASKED)
    assert sink.deliveries == []
    set_entry(ioapic, 17, 0x61 | LEVEL | LOW_ACTIVE)
    assert sink.deliveries == [17]


def test_polarity_rewrite_takes_effect_at_once_on_a_level_pin() -> None:
    ioapic, sink = make()
    ioapic.set_irq(9, True)
    set_entry(ioapic, 9, 0x39 | LEVEL | LOW_ACTIVE)  # high line, low active: idle
    assert sink.deliveries == []
    set_entry(ioapic, 9, 0x39 | LEVEL)  # now high active: asserted
    assert sink.deliveries == [9]
    set_entry(ioapic, 9, 0x39 | LEVEL | LOW_ACTIVE)
    ioapic.eoi(0x39)
    assert sink.deliveries == [9]
    assert entry_low(ioapic, 9) & RTE_REMOTE_IRR == 0


def test_polarity_rewrite_of_an_edge_pin_with_a_still_line_is_no_edge() -> None:
    ioapic, sink = make()
    set_entry(ioapic, 4, 0x34)
    set_entry(ioapic, 4, 0x34 | LOW_ACTIVE)  # low line now reads asserted
    assert sink.deliveries == []
    ioapic.set_irq(4, True)  # deasserting edge
    ioapic.set_irq(4, False)  # asserting edge
    assert sink.deliveries == [4]


def test_save_restore_keeps_the_electrical_levels() -> None:
    ioapic, _ = make()
    ioapic.set_irq(16, True)
    set_entry(ioapic, 16, 0x60 | LEVEL | LOW_ACTIVE)
    snapshot = ioapic.save()
    line_high = snapshot["line_high"]
    assert isinstance(line_high, list) and line_high[16] and not line_high[15]

    copy, copy_sink = make()
    copy.restore(snapshot)
    assert copy_sink.deliveries == []  # high and low active: idle
    copy.set_irq(16, False)
    assert copy_sink.deliveries == [16]


def test_set_irq_rejects_absent_pins() -> None:
    ioapic, _ = make(pins=4)
    with pytest.raises(ValueError):
        ioapic.set_irq(4, True)
    with pytest.raises(ValueError):
        Ioapic(CountingSink(), pins=0)


# ---------------------------------------------------------------- storm guard


def storm_setup(with_timer: bool) -> tuple[Ioapic, CountingSink, VirtualClock]:
    clock = VirtualClock()
    sink = CountingSink()
    ioapic = Ioapic(sink, clock if with_timer else None, clock if with_timer else None)
    set_entry(ioapic, 10, 0x3A | LEVEL)
    ioapic.set_irq(10, True)
    return ioapic, sink, clock


def test_storm_guard_delays_redelivery_on_the_timer() -> None:
    ioapic, sink, clock = storm_setup(with_timer=True)
    for _ in range(Ioapic.STORM_LIMIT - 1):
        ioapic.eoi(0x3A)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT
    ioapic.eoi(0x3A)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT
    assert entry_low(ioapic, 10) & RTE_REMOTE_IRR == 0
    assert clock.pending == 1
    clock.advance(Ioapic.STORM_RETRY_DELAY_NS - 1)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT
    clock.advance(1)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT + 1
    assert entry_low(ioapic, 10) & RTE_REMOTE_IRR
    ioapic.eoi(0x3A)  # the counter started again: immediate
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT + 2


def test_storm_guard_without_timer_holds_remote_irr_until_the_line_moves() -> None:
    ioapic, sink, _ = storm_setup(with_timer=False)
    for _ in range(Ioapic.STORM_LIMIT):
        ioapic.eoi(0x3A)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT
    assert entry_low(ioapic, 10) & RTE_REMOTE_IRR
    ioapic.eoi(0x3A)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT
    ioapic.set_irq(10, False)
    assert entry_low(ioapic, 10) & RTE_REMOTE_IRR == 0
    ioapic.set_irq(10, True)
    assert len(sink.deliveries) == Ioapic.STORM_LIMIT + 1


def test_storm_counter_resets_when_the_line_is_deasserted() -> None:
    ioapic, sink, clock = storm_setup(with_timer=True)
    for _ in range(Ioapic.STORM_LIMIT - 1):
        ioapic.eoi(0x3A)
    ioapic.set_irq(10, False)
    ioapic.eoi(0x3A)
    ioapic.set_irq(10, True)
    for _ in range(Ioapic.STORM_LIMIT - 1):
        ioapic.eoi(0x3A)
    assert len(sink.deliveries) == 2 * Ioapic.STORM_LIMIT
    assert clock.pending == 0


# --------------------------------------------------------------- save/restore


def test_save_restore_round_trips_and_behaves_the_same() -> None:
    ioapic, _ = make()
    write_reg(ioapic, 0x00, 0x0300_0000)
    set_entry(ioapic, 9, 0x39 | LEVEL, dest=1)
    set_entry(ioapic, 4, 0x34 | MASKED)
    ioapic.set_irq(9, True)
    snapshot = ioapic.save()

    copy, copy_sink = make()
    copy.restore(snapshot)
    assert copy.save() == snapshot
    assert copy_sink.routes[9] == (0xFEE0_1000, 0x39 | 0x8000, False)
    copy.eoi(0x39)
    assert copy_sink.deliveries == [9]
    assert read_reg(copy, 0x00) == 0x0300_0000


def test_restore_reschedules_a_pending_storm_retry() -> None:
    ioapic, _, _ = storm_setup(with_timer=True)
    for _ in range(Ioapic.STORM_LIMIT):
        ioapic.eoi(0x3A)
    snapshot = ioapic.save()
    assert snapshot["retry_deadline_ns"] == Ioapic.STORM_RETRY_DELAY_NS

    clock = VirtualClock()
    sink = CountingSink()
    copy = Ioapic(sink, clock, clock)
    copy.restore(snapshot)
    assert copy.save() == snapshot
    clock.advance(Ioapic.STORM_RETRY_DELAY_NS)
    assert sink.deliveries == [10]


@dataclass
class OrderSink:
    """Routes and deliveries in the one order the IOAPIC made them."""

    events: list[tuple[str, int]] = field(default_factory=list)

    def route_changed(self, pin: int, msi_address: int, msi_data: int, masked: bool) -> None:
        self.events.append(("route", pin))

    def deliver(self, pin: int) -> None:
        self.events.append(("deliver", pin))


def test_restore_sends_the_routes_before_a_retry_delivers() -> None:
    """A delivery fires the pin's route in KVM: after a restore it must be the restored
    route, so the routes go out before the timerless storm retry delivers."""
    ioapic, _ = make()
    set_entry(ioapic, 6, LEVEL | 0x36)
    ioapic.set_irq(6, True)
    ioapic.eoi(0x36)
    snapshot = {**ioapic.save(), "retry_deadline_ns": 5}
    entries = snapshot["redirection"]
    assert isinstance(entries, list)
    entries[6] &= ~RTE_REMOTE_IRR

    sink = OrderSink()
    copy = Ioapic(sink)
    sink.events.clear()
    copy.restore(snapshot)
    assert ("deliver", 6) in sink.events
    assert sink.events.index(("route", 6)) < sink.events.index(("deliver", 6))


@pytest.mark.parametrize(
    "change",
    [
        {"ioregsel": 0x100},
        {"apic_id": 16},
        {"redirection": [MASKED] * 23},
        {"redirection": [1 << 20] * 24},
        {"redirection": [RTE_REMOTE_IRR] * 24},
        {"line_high": [0] * 24},
        {"storm_counts": [Ioapic.STORM_LIMIT] * 24},
        {"retry_deadline_ns": "soon"},
        {"extra": 1},
    ],
)
def test_restore_rejects_malformed_snapshots(change: dict[str, object]) -> None:
    ioapic, _ = make()
    snapshot = {**ioapic.save(), **change}
    with pytest.raises(ValueError):
        ioapic.restore(snapshot)
    assert ioapic.save() == make()[0].save()


def test_state_dataclass_fields_match_snapshot_keys() -> None:
    ioapic, _ = make()
    assert set(ioapic.save()) == set(IoapicState.__dataclass_fields__)


# ------------------------------------------------------------------ property


class CheckingSink(CountingSink):
    """Asserts, at the moment of delivery, that the pin is unmasked."""

    def __init__(self) -> None:
        super().__init__()
        self.ioapic: Ioapic | None = None
        self.delivered_level: set[int] = set()

    def deliver(self, pin: int) -> None:
        super().deliver(pin)
        assert self.ioapic is not None
        entry = self.ioapic.save()["redirection"]
        assert isinstance(entry, list)
        assert not entry[pin] & MASKED
        if entry[pin] & LEVEL:
            self.delivered_level.add(pin)


offsets = st.one_of(
    st.sampled_from([Ioapic.IOREGSEL, Ioapic.IOWIN, Ioapic.EOI]),
    st.integers(0, Ioapic.SIZE + 4),
)
sizes = st.sampled_from([1, 2, 4, 8])
values = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0x10, 0x11, 0x12, 0x13, 0x00, 0x01, 0x02]),
    st.builds(
        lambda v, lvl, m, low: (
            v | (LEVEL if lvl else 0) | (MASKED if m else 0) | (LOW_ACTIVE if low else 0)
        ),
        st.sampled_from([0x30, 0x31]),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
)
operations = st.one_of(
    st.tuples(st.just("read"), offsets, sizes, st.just(0)),
    st.tuples(st.just("write"), offsets, sizes, values),
    st.tuples(st.just("irq"), st.integers(0, 3), st.booleans(), st.just(0)),
    st.tuples(st.just("eoi"), st.sampled_from([0x30, 0x31, 0x32]), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, max_size=60))
def test_fuzz_never_raises_and_remote_irr_only_on_delivered_level_pins(
    ops: list[tuple[str, int, int | bool, int]],
) -> None:
    sink = CheckingSink()
    clock = VirtualClock()
    ioapic = Ioapic(sink, clock, clock, pins=4)
    sink.ioapic = ioapic
    for kind, a, b, c in ops:
        if kind == "read":
            value = ioapic.read(a, int(b))
            assert 0 <= value < 1 << (8 * int(b))
        elif kind == "write":
            ioapic.write(a, int(b), c & ((1 << (8 * int(b))) - 1))
        elif kind == "irq":
            ioapic.set_irq(a, bool(b))
        else:
            ioapic.eoi(a)
        entries = ioapic.save()["redirection"]
        assert isinstance(entries, list)
        for pin, entry in enumerate(entries):
            if entry & RTE_REMOTE_IRR:
                assert entry & LEVEL
                assert pin in sink.delivered_level
            assert not entry & RTE_DELIVERY_STATUS
    snapshot = ioapic.save()
    copy = Ioapic(CountingSink(), clock, clock, pins=4)
    copy.restore(snapshot)
    assert copy.save() == snapshot
