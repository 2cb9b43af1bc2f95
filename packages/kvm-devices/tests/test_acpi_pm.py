"""Tests of the ACPI fixed-hardware PM block (PM1a event/control blocks, PM timer).

Section and table numbers are those of the ACPI Specification 6.5: §4.8.3.1.1 PM1 Status
Registers (table 4.11), §4.8.3.1.2 PM1 Enable Registers (table 4.12), §4.8.3.2.1 PM1
Control Registers (table 4.13), §4.8.3.3 Power Management Timer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.acpi_pm import (
    PM1_EN_BITS,
    PM1_STS_BITS,
    PM_TIMER_HZ,
    PWRBTN_EN,
    PWRBTN_STS,
    SLP_EN,
    SLP_TYP_SHIFT,
    TMR_EN,
    TMR_STS,
    WAK_STS,
    AcpiPm,
    AcpiPmState,
)
from kvm_devices.interfaces import Device
from kvm_devices.testing import RecordingLine, VirtualClock

NS_PER_S = 1_000_000_000
MSB_PERIOD = 1 << 23
# The first change of bit 23 happens at the first ns where floor(ns * HZ / 1e9) >= 2**23.
FIRST_TOGGLE_NS = -(-MSB_PERIOD * NS_PER_S // PM_TIMER_HZ)
# The SLP_TYPx a DSDT's \\_S5 might announce; the device passes any value through.
SOFT_OFF = 5


@dataclass
class Rig:
    clock: VirtualClock
    sci: RecordingLine
    pm: AcpiPm
    sleeps: list[int] = field(default_factory=list)


def make(start_ns: int = 0, with_timer: bool = True) -> Rig:
    clock = VirtualClock(start_ns)
    sci = RecordingLine()
    sleeps: list[int] = []
    pm = AcpiPm(clock, clock if with_timer else None, sci, sleeps.append)
    return Rig(clock, sci, pm, sleeps)


def status(pm: AcpiPm) -> int:
    return pm.pm1_event_ports.read(0, 2)


def enable(pm: AcpiPm) -> int:
    return pm.pm1_event_ports.read(2, 2)


def control(pm: AcpiPm) -> int:
    return pm.pm1_control_ports.read(0, 2)


def timer(pm: AcpiPm) -> int:
    return pm.pm_timer_ports.read(0, 4)


def expected_ticks(elapsed_ns: int) -> int:
    return (elapsed_ns * PM_TIMER_HZ // NS_PER_S) & 0xFF_FFFF


# ------------------------------------------------------------------ layout


def test_blocks_are_devices_of_the_fadt_lengths() -> None:
    pm = make().pm
    for block in (pm.pm1_event_ports, pm.pm1_control_ports, pm.pm_timer_ports):
        assert isinstance(block, Device)
    assert (AcpiPm.PM1_EVT_LEN, AcpiPm.PM1_CNT_LEN, AcpiPm.PM_TMR_LEN) == (4, 2, 4)


def test_power_on_values_tables_4_11_to_4_13() -> None:
    rig = make()
    assert status(rig.pm) == 0
    assert enable(rig.pm) == 0
    # Always in ACPI mode (no SMI_CMD): SCI_EN reads 1.
    assert control(rig.pm) == 0x0001
    assert timer(rig.pm) == 0
    assert not rig.sci.level
    assert rig.clock.pending == 0


# ----------------------------------------------------------- PM1 event block


def test_pm1_status_4_8_3_1_1_is_write_one_to_clear() -> None:
    rig = make()
    rig.pm.press_power_button()
    rig.pm.wake()
    assert status(rig.pm) == PWRBTN_STS | WAK_STS
    rig.pm.pm1_event_ports.write(0, 2, 0)
    assert status(rig.pm) == PWRBTN_STS | WAK_STS
    rig.pm.pm1_event_ports.write(0, 2, PWRBTN_STS)
    assert status(rig.pm) == WAK_STS
    # Byte access to the high byte alone (ACPI allows byte access to PM1 registers).
    rig.pm.pm1_event_ports.write(1, 1, WAK_STS >> 8)
    assert status(rig.pm) == 0


def test_pm1_status_reserved_bits_read_zero_and_ignore_writes() -> None:
    rig = make()
    rig.pm.pm1_event_ports.write(0, 2, 0xFFFF)
    assert status(rig.pm) == 0
    rig.pm.press_power_button()
    assert status(rig.pm) & ~PM1_STS_BITS == 0


def test_pm1_enable_4_8_3_1_2_keeps_only_defined_bits_bytewise() -> None:
    rig = make(with_timer=False)
    rig.pm.pm1_event_ports.write(2, 2, 0xFFFF)
    assert enable(rig.pm) == PM1_EN_BITS == 0x0721
    rig.pm.pm1_event_ports.write(3, 1, 0x00)
    assert enable(rig.pm) == 0x0021
    rig.pm.pm1_event_ports.write(2, 1, 0x00)
    assert enable(rig.pm) == 0


def test_sci_is_level_of_status_and_enable_table_4_11_pwrbtn() -> None:
    rig = make()
    rig.pm.press_power_button()
    assert status(rig.pm) == PWRBTN_STS
    assert not rig.sci.level  # PWRBTN_EN clear: status only
    rig.pm.pm1_event_ports.write(2, 2, PWRBTN_EN)
    assert rig.sci.level
    rig.pm.pm1_event_ports.write(2, 2, 0)
    assert not rig.sci.level
    rig.pm.pm1_event_ports.write(2, 2, PWRBTN_EN)
    assert rig.sci.level
    rig.pm.pm1_event_ports.write(0, 2, PWRBTN_STS)
    assert not rig.sci.level
    rig.pm.press_power_button()
    assert rig.sci.level
    # The line changes only on edges of the level, never with a repeated value.
    assert rig.sci.history == [True, False, True, False, True]


def test_wake_status_has_no_enable_and_raises_no_sci() -> None:
    rig = make()
    rig.pm.pm1_event_ports.write(2, 2, 0xFFFF)
    rig.pm.wake()
    assert status(rig.pm) & WAK_STS
    assert not rig.sci.level


def test_four_byte_access_spans_status_and_enable() -> None:
    rig = make()
    rig.pm.press_power_button()
    rig.pm.pm1_event_ports.write(0, 4, (PWRBTN_EN << 16) | 0)
    assert rig.pm.pm1_event_ports.read(0, 4) == (PWRBTN_EN << 16) | PWRBTN_STS
    assert rig.sci.level
    # One access clears the status and drops the enable: the line falls once.
    rig.pm.pm1_event_ports.write(0, 4, PWRBTN_STS)
    assert rig.pm.pm1_event_ports.read(0, 4) == 0
    assert rig.sci.history == [True, False]


def test_bytes_past_a_block_read_all_ones() -> None:
    rig = make()
    assert rig.pm.pm1_event_ports.read(4, 1) == 0xFF
    assert rig.pm.pm1_event_ports.read(2, 4) == 0xFFFF_0000
    assert rig.pm.pm1_control_ports.read(1, 2) == 0xFF00
    assert rig.pm.pm_timer_ports.read(0, 8) == 0xFFFF_FFFF_0000_0000
    assert rig.pm.pm1_event_ports.read(-1, 2) == 0x00FF
    assert rig.pm.pm1_event_ports.read(1, 4) == 0xFF00_0000  # STS high, EN, then past the end
    assert rig.pm.pm1_event_ports.read(0, 0) == 0
    assert rig.pm.pm1_event_ports.read(0, 16) == (1 << 128) - 1
    rig.pm.pm1_event_ports.write(0, 16, -1)  # ignored, does not raise


# --------------------------------------------------------- PM1 control block


def test_pm1_control_4_8_3_2_1_bits() -> None:
    rig = make()
    rig.pm.pm1_control_ports.write(0, 2, 0)
    assert control(rig.pm) == 0x0001  # SCI_EN is owned by the hardware
    rig.pm.pm1_control_ports.write(0, 2, 0xFFFF & ~SLP_EN)
    # BM_RLD and SLP_TYPx read back; GBL_RLS and SLP_EN are write-only; reserved read 0.
    assert control(rig.pm) == 0x1C03
    assert rig.sleeps == []


def test_s5_sequence_of_linux_acpi_hw_legacy_sleep() -> None:
    rig = make()
    # Linux writes SLP_TYPx first, then SLP_TYPx | SLP_EN, as 16-bit accesses.
    rig.pm.pm1_control_ports.write(0, 2, 0x0001 | (SOFT_OFF << SLP_TYP_SHIFT))
    assert rig.sleeps == []
    rig.pm.pm1_control_ports.write(0, 2, 0x0001 | (SOFT_OFF << SLP_TYP_SHIFT) | SLP_EN)
    assert rig.sleeps == [SOFT_OFF]
    assert control(rig.pm) == 0x0001 | (SOFT_OFF << SLP_TYP_SHIFT)  # SLP_EN reads 0


@pytest.mark.parametrize("sleep_type", range(8))
def test_slp_en_reports_slp_typ_of_the_same_byte_write(sleep_type: int) -> None:
    rig = make()
    rig.pm.pm1_control_ports.write(0, 2, 0x0001 | (7 << SLP_TYP_SHIFT))
    rig.pm.pm1_control_ports.write(1, 1, (sleep_type << 2) | (SLP_EN >> 8))
    assert rig.sleeps == [sleep_type]


def test_low_byte_write_does_not_sleep() -> None:
    rig = make()
    rig.pm.pm1_control_ports.write(0, 1, 0xFF)
    assert rig.sleeps == []


def test_on_sleep_runs_without_the_lock_held() -> None:
    clock = VirtualClock()
    seen: list[int] = []
    pm: AcpiPm

    def on_sleep(sleep_type: int) -> None:
        # Another thread (a vCPU) must get through while the VMM handles the request.
        reader = threading.Thread(target=lambda: seen.append(control(pm)))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive()
        pm.wake()

    pm = AcpiPm(clock, clock, RecordingLine(), on_sleep)
    pm.pm1_control_ports.write(0, 2, (3 << SLP_TYP_SHIFT) | SLP_EN)
    assert seen == [0x0001 | (3 << SLP_TYP_SHIFT)]
    assert status(pm) == WAK_STS


# ---------------------------------------------------------------- PM timer


def test_pm_timer_4_8_3_3_counts_at_3_579545_mhz() -> None:
    rig = make(start_ns=123_456_789)
    rig.clock.advance(NS_PER_S)
    assert timer(rig.pm) == 3_579_545
    rig.clock.advance(279)  # just under one tick (279.365 ns)
    assert timer(rig.pm) == 3_579_545
    rig.clock.advance(1)
    assert timer(rig.pm) == 3_579_546


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3_000_000_000), max_size=20))
def test_pm_timer_is_exact_whatever_the_access_pattern(steps: list[int]) -> None:
    rig = make()
    elapsed = 0
    for step in steps:
        rig.clock.advance(step)
        elapsed += step
        assert timer(rig.pm) == expected_ticks(elapsed)


def test_pm_timer_is_24_bits_wraps_and_is_read_only() -> None:
    rig = make()
    wrap_ns = -(-(1 << 24) * NS_PER_S // PM_TIMER_HZ)
    rig.clock.advance_to(wrap_ns - 1)
    assert timer(rig.pm) == 0xFF_FFFF
    assert rig.pm.pm_timer_ports.read(3, 1) == 0  # TMR_VAL_EXT=0: bits 24-31 read 0
    rig.clock.advance_to(wrap_ns)
    assert timer(rig.pm) == 0
    rig.pm.pm_timer_ports.write(0, 4, 0x1234)
    assert timer(rig.pm) == 0
    rig.clock.advance(NS_PER_S)
    assert rig.pm.pm_timer_ports.read(1, 1) == (timer(rig.pm) >> 8) & 0xFF


def test_tmr_sts_set_on_bit_23_change_without_any_timer_when_tmr_en_clear() -> None:
    rig = make()
    rig.clock.advance_to(FIRST_TOGGLE_NS - 1)
    assert status(rig.pm) & TMR_STS == 0
    rig.clock.advance_to(FIRST_TOGGLE_NS)
    assert status(rig.pm) & TMR_STS
    assert rig.clock.pending == 0
    assert not rig.sci.level
    rig.pm.pm1_event_ports.write(0, 2, TMR_STS)
    assert status(rig.pm) & TMR_STS == 0
    # The next change of bit 23 is its 1 -> 0 transition at the wrap.
    rig.clock.advance_to(2 * FIRST_TOGGLE_NS)
    assert status(rig.pm) & TMR_STS
    assert rig.clock.pending == 0


def test_tmr_en_schedules_the_sci_at_the_exact_bit_23_change() -> None:
    rig = make()
    rig.pm.pm1_event_ports.write(2, 2, TMR_EN)
    assert rig.clock.pending == 1
    rig.clock.advance_to(FIRST_TOGGLE_NS - 1)
    assert not rig.sci.level
    rig.clock.advance_to(FIRST_TOGGLE_NS)
    assert rig.sci.level  # raised by the timer callback, with no guest access
    assert rig.clock.pending == 0  # nothing to do while TMR_STS stays set
    rig.clock.advance(10 * NS_PER_S)
    assert rig.clock.pending == 0
    rig.pm.pm1_event_ports.write(0, 2, TMR_STS)
    assert not rig.sci.level
    assert rig.clock.pending == 1
    # The clock is now past several changes of bit 23: the next one is due next.
    ticks_now = rig.clock.now_ns() * PM_TIMER_HZ // NS_PER_S
    toggle_ticks = (ticks_now // MSB_PERIOD + 1) * MSB_PERIOD
    next_toggle = -(-toggle_ticks * NS_PER_S // PM_TIMER_HZ)
    rig.clock.advance_to(next_toggle - 1)
    assert not rig.sci.level
    rig.clock.advance_to(next_toggle)
    assert rig.sci.level


def test_clearing_tmr_en_cancels_the_timer() -> None:
    rig = make()
    rig.pm.pm1_event_ports.write(2, 2, TMR_EN)
    assert rig.clock.pending == 1
    rig.pm.pm1_event_ports.write(2, 2, 0)
    assert rig.clock.pending == 0
    rig.clock.advance_to(FIRST_TOGGLE_NS)
    assert rig.sci.history == []
    assert status(rig.pm) & TMR_STS  # the status still latches


def test_without_a_timer_the_tmr_sci_rises_at_the_next_access() -> None:
    rig = make(with_timer=False)
    rig.pm.pm1_event_ports.write(2, 2, TMR_EN)
    rig.clock.advance_to(FIRST_TOGGLE_NS)
    assert not rig.sci.level
    timer(rig.pm)
    assert rig.sci.level


# ---------------------------------------------------------- reset, snapshot


def test_reset_returns_to_power_on_values() -> None:
    rig = make()
    rig.pm.pm1_event_ports.write(2, 2, 0xFFFF)
    rig.pm.press_power_button()
    rig.pm.pm1_control_ports.write(0, 2, 0x1C02)
    rig.clock.advance(NS_PER_S)
    assert rig.sci.level
    rig.pm.reset()
    assert not rig.sci.level
    assert rig.clock.pending == 0
    assert rig.pm.save() == {
        "pm1_status": 0,
        "pm1_enable": 0,
        "pm1_control": 0,
        "timer_ticks": 0,
        "timer_phase": 0,
    }


def test_save_restore_round_trip_and_rescheduling() -> None:
    rig = make(start_ns=5)
    rig.pm.pm1_event_ports.write(2, 2, TMR_EN | PWRBTN_EN)
    rig.pm.pm1_control_ports.write(0, 2, 0x1402)
    rig.clock.advance(1_234_567_891)
    saved = rig.pm.save()
    assert saved == rig.pm.save()

    twin = make(start_ns=777_000_000_000)  # another host clock entirely
    twin.pm.restore(saved)
    assert twin.pm.save() == saved
    assert twin.clock.pending == 1
    # Both reach the change of bit 23 after the same time, to the nanosecond.
    remaining = FIRST_TOGGLE_NS - rig.clock.now_ns() + 5
    for r in (rig, twin):
        r.clock.advance(remaining - 1)
        assert not r.sci.level
        r.clock.advance(1)
        assert r.sci.level
        assert timer(r.pm) == MSB_PERIOD
    assert rig.pm.save() == twin.pm.save()


def test_restore_drives_the_sci_line() -> None:
    rig = make()
    rig.pm.restore(
        {
            "pm1_status": PWRBTN_STS,
            "pm1_enable": PWRBTN_EN,
            "pm1_control": 0,
            "timer_ticks": 0,
            "timer_phase": 0,
        }
    )
    assert rig.sci.level
    rig.pm.restore(dict(AcpiPmState().__dict__))
    assert not rig.sci.level


@pytest.mark.parametrize(
    "change",
    [
        {"pm1_status": 0x0002},
        {"pm1_enable": 0x8000},
        {"pm1_control": 0x0001},
        {"pm1_control": SLP_EN},
        {"timer_ticks": 1 << 24},
        {"timer_ticks": -1},
        {"timer_phase": NS_PER_S},
        {"timer_phase": True},
        {"pm1_status": "0"},
        {"extra": 0},
    ],
)
def test_restore_rejects_malformed_snapshots(change: dict[str, object]) -> None:
    rig = make()
    snapshot = rig.pm.save() | change
    with pytest.raises(ValueError):
        rig.pm.restore(snapshot)
    missing = rig.pm.save()
    del missing["timer_phase"]
    with pytest.raises(ValueError):
        rig.pm.restore(missing)


def test_concurrent_accesses_keep_the_sci_consistent() -> None:
    rig = make()
    rig.pm.pm1_event_ports.write(2, 2, PWRBTN_EN)

    def hammer() -> None:
        for _ in range(2000):
            rig.pm.press_power_button()
            rig.pm.pm1_event_ports.write(0, 2, PWRBTN_STS)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rig.sci.level == bool(status(rig.pm) & PWRBTN_STS)
    assert all(a != b for a, b in zip(rig.sci.history, rig.sci.history[1:], strict=False))


# ------------------------------------------------------------ property tests

BLOCKS = ("event", "control", "timer")
BLOCK_LENGTHS = {"event": 4, "control": 2, "timer": 4}

operation = st.one_of(
    st.tuples(
        st.just("read"),
        st.sampled_from(BLOCKS),
        st.integers(0, 8),
        st.sampled_from([1, 2, 4, 8]),
        st.just(0),
    ),
    st.tuples(
        st.just("write"),
        st.sampled_from(BLOCKS),
        st.integers(0, 8),
        st.sampled_from([1, 2, 4, 8]),
        st.integers(0, (1 << 64) - 1),
    ),
    st.tuples(
        st.just("advance"), st.just(""), st.integers(0, 3_000_000_000), st.just(0), st.just(0)
    ),
    st.tuples(st.just("button"), st.just(""), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("wake"), st.just(""), st.just(0), st.just(0), st.just(0)),
)
Operation = tuple[str, str, int, int, int]


def block_of(pm: AcpiPm, name: str) -> Device:
    return {"event": pm.pm1_event_ports, "control": pm.pm1_control_ports}.get(
        name, pm.pm_timer_ports
    )


def apply(rig: Rig, op: Operation) -> int | None:
    kind, name, offset, size, value = op
    if kind == "read":
        return block_of(rig.pm, name).read(offset, size)
    if kind == "write":
        block_of(rig.pm, name).write(offset, size, value & ((1 << (8 * size)) - 1))
    elif kind == "advance":
        rig.clock.advance(offset)
    elif kind == "button":
        rig.pm.press_power_button()
    else:
        rig.pm.wake()
    return None


def check_invariants(rig: Rig) -> None:
    saved = rig.pm.save()
    sts, en = saved["pm1_status"], saved["pm1_enable"]
    assert isinstance(sts, int) and isinstance(en, int)
    assert rig.sci.level == bool(sts & en)
    timer_armed = bool(en & TMR_EN) and not sts & TMR_STS
    assert rig.clock.pending == (1 if timer_armed else 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(operation, max_size=40), st.lists(operation, max_size=15))
def test_fuzz_never_raises_and_snapshots_round_trip(
    ops: list[Operation], after: list[Operation]
) -> None:
    rig = make()
    for op in ops:
        result = apply(rig, op)
        if result is not None:
            assert 0 <= result < 1 << (8 * op[3])
            if op[0] == "read" and op[2] >= BLOCK_LENGTHS[op[1]]:
                assert result == (1 << (8 * op[3])) - 1
        check_invariants(rig)
    assert all(0 <= t <= 7 for t in rig.sleeps)

    saved = rig.pm.save()
    twin = make(start_ns=rig.clock.now_ns())
    twin.pm.restore(saved)
    assert twin.pm.save() == saved
    assert twin.sci.level == rig.sci.level
    rig.sleeps.clear()
    for op in after:
        assert apply(rig, op) == apply(twin, op)
        check_invariants(twin)
    assert rig.pm.save() == twin.pm.save()
    assert rig.sleeps == twin.sleeps
