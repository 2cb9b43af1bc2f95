"""Tests of the MC146818A RTC/CMOS model.

Sections are those of the Motorola MC146818A datasheet: "Address Map" (Table 2 time and
calendar bytes, Table 3 data modes), "Register A" (UIP, DV2-DV0, RS3-RS0), "Register B"
(SET, PIE, AIE, UIE, DM, 24/12), "Register C" (IRQF, PF, AF, UF), "Register D" (VRT),
"Update Cycle" (UIP 244 us before the update) and "Interrupts" (Table 5 periodic rates).
PC conventions (index port 0x70 with NMI mask in bit 7, century byte 0x32) are the IBM
AT's; the polling loop replays Linux's ``mc146818_avoid_UIP``.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.rtc import Rtc
from kvm_devices.testing import RecordingLine, VirtualClock

S = 1_000_000_000
# Thursday 2024-02-29 23:59:58 UTC: a leap day, a month, a year... one second apart.
START = calendar.timegm((2024, 2, 29, 23, 59, 58)) * S
TIME_REGS = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)
B_24H = 0x02
B_BINARY = 0x04
B_UIE = 0x10
B_AIE = 0x20
B_PIE = 0x40
B_SET = 0x80


@dataclass
class Board:
    rtc: Rtc
    clock: VirtualClock
    irq8: RecordingLine

    def read(self, index: int) -> int:
        self.rtc.write(0, 1, index)
        return self.rtc.read(1, 1)

    def write(self, index: int, value: int) -> None:
        self.rtc.write(0, 1, index)
        self.rtc.write(1, 1, value)

    def time_bytes(self) -> list[int]:
        return [self.read(index) for index in TIME_REGS]


def make(start_ns: int = START, cmos: dict[int, int] | None = None) -> Board:
    clock = VirtualClock()
    irq8 = RecordingLine()
    rtc = Rtc(clock, clock, irq8, wall_time_ns=lambda: start_ns + clock.now_ns(), cmos=cmos)
    return Board(rtc, clock, irq8)


def quiet(board: Board) -> None:
    """Periodic rate off and flags cleared, so only the interrupt under test counts."""
    board.write(0x0A, 0x20)
    board.read(0x0C)


# ------------------------------------------------------------------ address map


def test_table2_time_and_calendar_bytes_bcd_24_hour() -> None:
    board = make()
    assert board.time_bytes() == [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_table3_binary_data_mode() -> None:
    board = make()
    board.write(0x0B, B_24H | B_BINARY)
    assert board.time_bytes() == [58, 59, 23, 5, 29, 2, 24, 20]


@pytest.mark.parametrize(
    ("register_b", "before", "after"),
    [(0x00, 0x91, 0x12), (B_BINARY, 0x8B, 0x0C)],
)
def test_table3_twelve_hour_mode_pm_bit(register_b: int, before: int, after: int) -> None:
    board = make()
    board.write(0x0B, register_b)
    assert board.read(0x04) == before  # 11 PM
    board.clock.advance(2 * S)
    assert board.read(0x04) == after  # 12 AM


def test_update_carries_through_leap_day_into_march() -> None:
    board = make()
    board.clock.advance(2 * S)
    assert board.time_bytes() == [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]


def test_century_byte_0x32_rolls_over() -> None:
    board = make(calendar.timegm((2099, 12, 31, 23, 59, 59)) * S)
    assert board.read(0x32) == 0x20 and board.read(0x09) == 0x99
    board.clock.advance(S)
    assert board.read(0x32) == 0x21 and board.read(0x09) == 0x00
    assert board.read(0x06) == 0x06  # 2100-01-01 is a Friday


def test_register_d_vrt_and_read_only_c_d() -> None:
    board = make()
    assert board.read(0x0D) == 0x80
    board.write(0x0D, 0x00)
    board.write(0x0C, 0xFF)
    assert board.read(0x0D) == 0x80
    assert board.read(0x0C) & 0x0F == 0


def test_register_a_uip_bit_is_read_only() -> None:
    board = make()
    board.write(0x0A, 0xA6)
    assert board.read(0x0A) == 0x26


def test_cmos_ram_bytes_0x0e_to_0x7f_are_storage() -> None:
    board = make(cmos={0x10: 0x40, 0x7F: 0x7F})
    assert board.read(0x10) == 0x40 and board.read(0x7F) == 0x7F
    for index in (0x0E, 0x31, 0x33, 0x7E):
        board.write(index, index ^ 0xA5)
        assert board.read(index) == index ^ 0xA5


@pytest.mark.parametrize("bad", [{0x0D: 1}, {0x32: 0x19}, {0x80: 1}, {0x20: 256}])
def test_constructor_cmos_must_be_general_ram_bytes(bad: dict[int, int]) -> None:
    with pytest.raises(ValueError):
        make(cmos=bad)


# --------------------------------------------------------------------- PC ports


def test_index_port_is_write_only_and_bit7_masks_nmi() -> None:
    board = make()
    assert board.rtc.read(0, 1) == 0xFF
    board.rtc.write(0, 1, 0x8D)
    assert board.rtc.nmi_disabled
    assert board.rtc.read(1, 1) == 0x80  # index 0x0D, bit 7 not part of it
    board.rtc.write(0, 1, 0x0D)
    assert not board.rtc.nmi_disabled
    assert (Rtc.BASE, Rtc.LENGTH) == (0x70, 2) and isinstance(board.rtc, Device)


def test_wide_accesses_split_into_byte_cycles() -> None:
    board = make()
    board.rtc.write(0, 2, 0x5A_40)  # index 0x40, then data 0x5A
    assert board.read(0x40) == 0x5A
    board.rtc.write(0, 1, 0x40)
    assert board.rtc.read(0, 2) == 0x5AFF
    assert board.rtc.read(0, 4) == 0xFFFF_5AFF
    board.rtc.write(2, 1, 0)  # past the device: ignored
    assert board.rtc.read(2, 2) == 0xFFFF


# ------------------------------------------------------------------ update cycle


def test_uip_is_set_for_the_244us_before_each_update() -> None:
    board = make()
    board.clock.advance(999_755_859)
    assert not board.read(0x0A) & 0x80
    board.clock.advance(1)
    assert board.read(0x0A) & 0x80
    assert board.read(0x00) == 0x58  # the bytes still show the old second
    board.clock.advance(244_140)
    assert not board.read(0x0A) & 0x80
    assert board.read(0x00) == 0x59


def test_linux_mc146818_avoid_uip_loop_ends_promptly() -> None:
    board = make()
    board.clock.advance(S - 200_000)  # inside the UIP window
    polls = 0
    while board.read(0x0A) & 0x80:
        polls += 1
        board.clock.advance(8_000)  # one exit to the VMM per port access
    assert 0 < polls <= 31


def test_set_freezes_time_clears_uip_and_uie() -> None:
    board = make()
    board.write(0x0B, B_24H | B_UIE)
    board.clock.advance(S - 100_000)
    board.write(0x0B, B_24H | B_UIE | B_SET)
    assert board.read(0x0B) == B_24H | B_SET
    assert not board.read(0x0A) & 0x80
    board.clock.advance(5 * S)
    assert board.read(0x00) == 0x58


def test_guest_sets_time_with_set_and_phase_is_kept() -> None:
    board = make()
    board.clock.advance(300_000_000)  # 0.3 s into the second
    board.write(0x0B, B_24H | B_SET)
    for index, value in zip(
        TIME_REGS, [0x00, 0x00, 0x12, 0x07, 0x01, 0x01, 0x00, 0x20], strict=True
    ):
        board.write(index, value)
    board.clock.advance(S)  # frozen meanwhile
    board.write(0x0B, B_24H)
    assert board.time_bytes() == [0x00, 0x00, 0x12, 0x07, 0x01, 0x01, 0x00, 0x20]
    assert board.rtc.now_seconds() == calendar.timegm((2000, 1, 1, 12, 0, 0))
    offset = board.rtc.save()["offset_ns"]
    assert isinstance(offset, int) and offset % S == 0
    board.clock.advance(699_999_999)
    assert board.read(0x00) == 0x00
    board.clock.advance(1)
    assert board.read(0x00) == 0x01


def test_writing_a_time_byte_while_running_sets_the_clock() -> None:
    board = make()
    board.write(0x02, 0x10)
    assert board.time_bytes()[:3] == [0x58, 0x10, 0x23]
    board.clock.advance(2 * S)
    assert board.time_bytes()[:3] == [0x00, 0x11, 0x23]


def test_day_of_week_sticks_only_while_frozen() -> None:
    board = make()
    board.write(0x0B, B_24H | B_SET)
    board.write(0x06, 0x01)
    assert board.read(0x06) == 0x01
    board.write(0x0B, B_24H)
    assert board.read(0x06) == 0x05


def test_out_of_range_bytes_are_normalised() -> None:
    board = make()
    board.write(0x0B, B_24H | B_SET)
    board.write(0x08, 0x13)  # month 13 of 2024: January 2025
    board.write(0x0B, B_24H)
    assert board.time_bytes()[4:] == [0x29, 0x01, 0x25, 0x20]


def test_divider_reset_holds_time_and_first_update_is_500ms_after_restart() -> None:
    board = make()
    board.clock.advance(100_000_000)
    board.write(0x0A, 0x76)  # DV = 111: chain held in reset
    board.clock.advance(3 * S)
    assert board.read(0x00) == 0x58 and not board.read(0x0A) & 0x80
    board.write(0x0A, 0x26)
    board.clock.advance(499_999_999)
    assert board.read(0x00) == 0x58
    board.clock.advance(1)
    assert board.read(0x00) == 0x59


def test_linux_mc146818_set_time_sequence() -> None:
    board = make()
    board.clock.advance(123_456_789)
    control, freq = board.read(0x0B), board.read(0x0A)
    board.write(0x0B, control | B_SET)
    board.write(0x0A, freq | 0x60)  # RTC_DIV_RESET2
    for index, value in zip(
        TIME_REGS, [0x30, 0x45, 0x06, 0x02, 0x15, 0x06, 0x26, 0x20], strict=True
    ):
        board.write(index, value)
    board.write(0x0B, control)
    board.write(0x0A, freq)
    assert board.rtc.now_seconds() == calendar.timegm((2026, 6, 15, 6, 45, 30))
    board.clock.advance(S // 2)
    assert board.read(0x00) == 0x31


# -------------------------------------------------------------------- interrupts


def test_register_c_flags_are_set_without_enables_and_cleared_by_reading() -> None:
    board = make()
    board.clock.advance(S)
    assert board.read(0x0C) == 0x50  # PF (1024 Hz tap) and UF; no IRQF
    assert board.read(0x0C) == 0x00
    assert board.clock.pending == 0
    assert board.irq8.history == []


@pytest.mark.parametrize("rate", range(1, 16))
def test_table5_periodic_rates(rate: int) -> None:
    ticks = {1: 128, 2: 256}.get(rate, 1 << (rate - 1))
    period = ticks * S / 32768
    board = make()
    quiet(board)
    board.write(0x0A, 0x20 | rate)
    board.write(0x0B, B_24H | B_PIE)
    assert board.clock.pending == 1
    board.clock.advance(int(period) - 1 if period == int(period) else int(period))
    assert not board.irq8.level
    board.clock.advance(1)
    assert board.irq8.level
    assert board.read(0x0C) == 0xC0
    assert not board.irq8.level


def test_periodic_interrupt_repeats_after_each_read_of_c() -> None:
    board = make()
    quiet(board)
    board.write(0x0A, 0x2F)  # 2 Hz
    board.write(0x0B, B_24H | B_PIE)
    rises = 0
    for _ in range(6):
        board.clock.advance(S // 2)
        rises += board.irq8.level
        board.read(0x0C)
    assert rises == 6
    assert board.irq8.history == [True, False] * 6


def test_no_timer_while_irq8_is_high_or_nothing_is_enabled() -> None:
    board = make()
    quiet(board)
    board.write(0x0B, B_24H | B_UIE)
    board.clock.advance(S)
    assert board.irq8.level and board.clock.pending == 0
    board.read(0x0C)
    assert board.clock.pending == 1
    board.write(0x0B, B_24H)
    assert board.clock.pending == 0


def test_update_ended_interrupt_at_each_second() -> None:
    board = make()
    quiet(board)
    board.clock.advance(S // 4)
    board.write(0x0B, B_24H | B_UIE)
    board.clock.advance(S * 3 // 4 - 1)
    assert not board.irq8.level
    board.clock.advance(1)
    assert board.irq8.level
    assert board.read(0x0C) == 0x90


def test_alarm_interrupt_when_time_matches_alarm_bytes() -> None:
    board = make()
    quiet(board)
    board.write(0x01, 0x03)
    board.write(0x03, 0x00)
    board.write(0x05, 0x00)
    board.write(0x0B, B_24H | B_AIE)
    board.clock.advance(5 * S - 1)  # 00:00:02.999...
    assert not board.irq8.level
    board.clock.advance(1)
    assert board.irq8.level
    assert board.read(0x0C) == 0xB0  # IRQF, AF, UF


def test_alarm_dont_care_codes_match_every_second() -> None:
    board = make()
    quiet(board)
    for index in (0x01, 0x03, 0x05):
        board.write(index, 0xC0)
    board.write(0x0B, B_24H | B_AIE)
    for _ in range(3):
        board.clock.advance(S)
        assert board.irq8.level
        assert board.read(0x0C) & 0xA0 == 0xA0


def test_alarm_compares_bytes_in_twelve_hour_mode() -> None:
    board = make()
    quiet(board)
    board.write(0x0B, B_AIE)  # 12-hour BCD
    board.write(0x01, 0x00)
    board.write(0x03, 0x00)
    board.write(0x05, 0x12)  # 12 AM = midnight
    board.clock.advance(2 * S)
    assert board.irq8.level


def test_alarm_flag_accrues_while_disabled() -> None:
    board = make()
    quiet(board)
    board.write(0x01, 0x58)
    board.write(0x03, 0x59)
    board.write(0x05, 0x23)
    board.write(0x0B, B_24H)
    board.clock.advance(3600 * S)
    assert board.read(0x0C) == 0x10  # 23:59:58 was the start, before the window
    board.write(0x05, 0xC0)
    board.clock.advance(3600 * S)
    assert board.read(0x0C) == 0x30  # 00:59:58 matched with hours don't-care


def test_irqf_is_combinational_enable_asserts_disable_deasserts() -> None:
    board = make()
    board.clock.advance(S)  # PF and UF set
    board.write(0x0B, B_24H | B_UIE)
    assert board.irq8.level
    board.write(0x0B, B_24H)
    assert not board.irq8.level
    assert board.read(0x0C) == 0x50


def test_host_clock_stepping_back_is_harmless() -> None:
    clock = VirtualClock()
    wall = [START]
    rtc = Rtc(clock, clock, RecordingLine(), wall_time_ns=lambda: wall[0])
    rtc.write(0, 1, 0x0C)
    wall[0] -= 3600 * S
    assert rtc.read(1, 1) == 0
    wall[0] += 3600 * S + S
    assert rtc.read(1, 1) & 0x10


def test_without_timer_flags_still_show_in_c() -> None:
    clock = VirtualClock()
    rtc = Rtc(clock, wall_time_ns=lambda: START + clock.now_ns())
    rtc.write(0, 2, (B_24H | B_PIE) << 8 | 0x0B)  # index 0x0B, then register B
    assert clock.pending == 0
    clock.advance(S)
    rtc.write(0, 1, 0x0C)
    assert rtc.read(1, 1) == 0xD0  # IRQF, PF, UF: found when C is read


# ---------------------------------------------------------------------- snapshot


def test_snapshot_round_trip_rearms_the_periodic_timer() -> None:
    board = make()
    quiet(board)
    board.write(0x0A, 0x2F)
    board.write(0x0B, B_24H | B_PIE)
    board.clock.advance(S // 4)
    saved = board.rtc.save()
    twin = Rtc(
        board.clock, board.clock, RecordingLine(), wall_time_ns=lambda: START + board.clock.now_ns()
    )
    twin.restore(saved)
    assert twin.save() == saved
    board.clock.advance(S // 4)
    assert board.irq8.level
    twin.write(0, 1, 0x0C)
    assert twin.read(1, 1) == 0xC0


@pytest.mark.parametrize(
    "bad",
    [
        {"index": 128},
        {"cmos": [0] * 127},
        {"cmos": [0] * 10 + [0x80] + [0] * 117},  # UIP stored in A
        {"flags": 0x80},
        {"irq_level": 1},
        {"offset_ns": 1.5},
        {"extra": 0},
    ],
)
def test_malformed_snapshot_raises(bad: dict[str, object]) -> None:
    board = make()
    saved = board.rtc.save()
    saved.update(bad)
    with pytest.raises(ValueError):
        board.rtc.restore(saved)


indices = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0A, 0x0B, 0x0C, 0x0D, 0x32, 0x40])
operations = st.one_of(
    st.tuples(st.just("advance"), st.integers(min_value=0, max_value=3 * S)),
    st.tuples(st.just("select"), indices),
    st.tuples(st.just("data"), st.integers(min_value=0, max_value=0xFF)),
    st.tuples(
        st.just("raw"),
        st.tuples(
            st.booleans(),
            st.integers(min_value=0, max_value=Rtc.LENGTH + 4),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(min_value=0, max_value=(1 << 64) - 1),
        ),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, max_size=40))
def test_fuzz_never_raises_line_matches_state_and_snapshot_replays(
    ops: list[tuple[str, object]],
) -> None:
    board = make()
    twin: Board | None = None
    for step, (kind, argument) in enumerate(ops):
        if step == len(ops) // 2:
            line = RecordingLine()
            rtc = Rtc(
                board.clock,
                board.clock,
                line,
                wall_time_ns=lambda: START + board.clock.now_ns(),
            )
            rtc.restore(board.rtc.save())
            twin = Board(rtc, board.clock, line)
        targets = [board] if twin is None else [board, twin]
        if kind == "advance":
            assert isinstance(argument, int)
            board.clock.advance(argument)
        results = []
        for target in targets:
            if kind == "select":
                assert isinstance(argument, int)
                target.rtc.write(0, 1, argument)
            elif kind == "data":
                assert isinstance(argument, int)
                target.rtc.write(1, 1, argument)
                results.append(target.rtc.read(1, 1))
            elif kind == "raw":
                assert isinstance(argument, tuple)
                is_write, offset, size, value = argument
                if is_write:
                    target.rtc.write(offset, size, value)
                else:
                    result = target.rtc.read(offset, size)
                    assert 0 <= result < 1 << (8 * size)
                    results.append(result)
        assert len(set(results)) <= 1
        for target in targets:
            saved = target.rtc.save()
            assert target.irq8.level == saved["irq_level"]
        if twin is not None:
            assert twin.rtc.save() == board.rtc.save()
    saved = board.rtc.save()
    board.rtc.restore(saved)
    assert board.rtc.save() == saved
