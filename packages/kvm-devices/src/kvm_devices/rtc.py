"""Motorola MC146818A real-time clock and CMOS RAM, as wired in a PC (ports 0x70/0x71).

Reference: Motorola MC146818A datasheet, "Address Map" (Table 2: time, calendar and
alarm bytes; Table 3: data modes), "Register A" to "Register D", "Update Cycle" (UIP
and the 244 us before each update), "Interrupts" (Table 5: periodic rates) and
"Divider Stages" (DV2-DV0). PC conventions: IBM AT Technical Reference ("CMOS RAM
address map": century byte at 0x32, NMI mask in bit 7 of port 0x70).

Ports (one :class:`~kvm_devices.interfaces.Device`, base :attr:`Rtc.BASE`, 2 bytes):

* Offset 0 (0x70), write-only index register: bits 6-0 select a CMOS byte, bit 7 masks
  NMI (readable by the VMM as :attr:`Rtc.nmi_disabled`). Port 0x70 is write-only on PC
  chipsets (Intel's "Accessing the Real Time Clock Registers and the NMI Enable Bit",
  321088: it reads back only in Alt-Access mode): reads return 0xFF, as on QEMU.
* Offset 1 (0x71): the selected byte. The index does not auto-increment.
* Wider accesses are split into byte accesses at consecutive ports, as the ISA bus
  does; bytes past 0x71 are not this device's (reads 0xFF, writes dropped).

Clock model:

* The clock shows ``wall_time_ns() + offset``. The guest setting the time changes only
  the offset (by whole seconds, so the divider's sub-second phase is kept); the host
  clock is never touched. ``Clock``/``Timer`` only time the interrupts.
* Updates happen at each whole second while DV2-DV0 = 010 (the only divider setting
  that keeps time) and SET = 0. UIP reads 1 during the 244 us before each update, so a
  guest that waits for it to clear (Linux's ``mc146818_avoid_UIP``) waits at most that.
  SET = 1 freezes the time bytes for the guest to write (and clears UIE, datasheet
  "Register B"); clearing SET starts the clock from them. Leaving any other divider
  setting for 010 starts the chain so the first update comes 500 ms later.
* Writing a time byte while the clock runs sets the clock from all the time bytes at
  once (as QEMU does); the day-of-week byte is derived from the date, and writes to it
  only stick while the clock is frozen. Out-of-range values (BCD digits above 9, month
  13, day 0...) are read as the arithmetic they spell and normalised (month 13 is
  January of the next year), as QEMU's ``mktimegm`` does; the real chip would count
  through them unpredictably.
* Data mode (DM) and 12/24 h apply when bytes are read or written; switching them does
  not convert bytes already frozen, as on the chip. The century byte 0x32 follows the
  data mode like the others (BCD by default), as Linux's ``mc146818_get_time`` and QEMU
  read it.
* Daylight-saving (DSE) and the square-wave pin (SQWE) are stored only.
* Register C: PF is set at each periodic edge (rate from RS3-RS0, Table 5, whenever the
  divider runs, SET or not), UF at each update, AF at each update whose second, minute
  and hour match the alarm bytes (11xxxxxx = don't care). IRQF = PF.PIE + AF.AIE +
  UF.UIE drives IRQ8 (high = asserted); reading C returns and clears all flags and so
  drops IRQ8. Flags are worked out from the time when C is read, so nothing runs while
  no interrupt is enabled; a timer is armed only for the next event an enabled
  interrupt needs, and none while IRQ8 is already high.
* Register D reads 0x80 (VRT: RAM and time valid). C and D ignore writes; A's UIP bit is
  read-only.

Thread-safety: one lock guards the state. IRQ8 is driven after it is released, in the
order the state changed (:mod:`kvm_devices.outbox`), so the line always ends at the level
of the last change and may call back into the RTC. Timers are armed and cancelled with
the lock held: ``Timer.schedule`` must not run the callback before returning.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.interfaces import Clock, InterruptLine, Timer, TimerHandle
from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import (
    Length,
    Mask,
    Range,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

NS_PER_SECOND = 1_000_000_000
SECONDS_PER_DAY = 86_400
TIME_BASE_HZ = 32_768
UIP_TICKS = 8
"""UIP rises 244.140625 us (8 periods of the 32.768 kHz time base) before an update."""

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
TIME_REGISTERS = (
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY_OF_MONTH,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
)
CMOS_BYTES = 128
FIRST_RAM_BYTE = 0x0E

A_UIP = 0x80
A_DIVIDER = 0x70
A_RATE = 0x0F
DIVIDER_32768_HZ = 0x20
"""DV2-DV0 = 010: the 32.768 kHz time base, the only setting that keeps time."""
A_AT_RESET = DIVIDER_32768_HZ | 0x06
"""32.768 kHz, 1024 Hz periodic rate: what a PC BIOS programs."""

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_BINARY = 0x04
B_24_HOUR = 0x02
B_DSE = 0x01
B_AT_RESET = B_24_HOUR
"""24-hour BCD, no interrupts: what a PC BIOS programs (Linux refuses 12-hour mode)."""

C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
ENABLE_TO_FLAG_MASK = C_PF | C_AF | C_UF
"""PIE/AIE/UIE sit at the bit positions of PF/AF/UF."""

D_VRT = 0x80
HOUR_PM = 0x80
ALARM_DONT_CARE = 0xC0


def _rate_ticks(register_a: int) -> int:
    """Periodic interrupt period in 32.768 kHz ticks (Table 5), 0 when off."""
    rate = register_a & A_RATE
    if rate == 0:
        return 0
    if rate <= 2:
        rate += 7  # RS = 1, 2 repeat the 256 Hz and 128 Hz taps at this time base
    return 1 << (rate - 1)


# ---------------------------------------------------------------- calendar arithmetic


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (month 1..12, any day)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    days += 719_468
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + (3 if shifted_month < 10 else -9)
    return year_of_era + era * 400 + (month <= 2), month, day


def _encode(value: int, register_b: int) -> int:
    if register_b & B_BINARY:
        return value
    return ((value // 10) << 4) | (value % 10)


def _decode(byte: int, register_b: int) -> int:
    if register_b & B_BINARY:
        return byte
    return (byte >> 4) * 10 + (byte & 0x0F)


def _encode_hour(hour: int, register_b: int) -> int:
    if register_b & B_24_HOUR:
        return _encode(hour, register_b)
    return _encode(hour % 12 or 12, register_b) | (HOUR_PM if hour >= 12 else 0)


def _decode_hour(byte: int, register_b: int) -> int:
    if register_b & B_24_HOUR:
        return _decode(byte, register_b)
    return _decode(byte & ~HOUR_PM, register_b) % 12 + (12 if byte & HOUR_PM else 0)


def _time_bytes(seconds: int, register_b: int) -> dict[int, int]:
    """The time and calendar bytes showing ``seconds`` since the epoch."""
    days, second_of_day = divmod(seconds, SECONDS_PER_DAY)
    year, month, day = _civil_from_days(days)
    return {
        REG_SECONDS: _encode(second_of_day % 60, register_b),
        REG_MINUTES: _encode(second_of_day // 60 % 60, register_b),
        REG_HOURS: _encode_hour(second_of_day // 3600, register_b),
        REG_DAY_OF_WEEK: _encode((days + 4) % 7 + 1, register_b),  # 1970-01-01: Thursday
        REG_DAY_OF_MONTH: _encode(day, register_b),
        REG_MONTH: _encode(month, register_b),
        REG_YEAR: _encode(year % 100, register_b),
        REG_CENTURY: _encode(year // 100 % 100, register_b),
    }


def _seconds_from_bytes(cmos: Mapping[int, int], register_b: int) -> int:
    """Seconds since the epoch spelled by the time and calendar bytes (normalised)."""
    year = _decode(cmos[REG_YEAR], register_b) + 100 * _decode(cmos[REG_CENTURY], register_b)
    month_index = _decode(cmos[REG_MONTH], register_b) - 1
    year += month_index // 12
    days = _days_from_civil(year, month_index % 12 + 1, 1)
    days += _decode(cmos[REG_DAY_OF_MONTH], register_b) - 1
    return (
        days * SECONDS_PER_DAY
        + _decode_hour(cmos[REG_HOURS], register_b) * 3600
        + _decode(cmos[REG_MINUTES], register_b) * 60
        + _decode(cmos[REG_SECONDS], register_b)
    )


def _next_alarm(after: int, cmos: list[int]) -> int:
    """The first whole second after ``after`` whose time bytes match the alarm, or -1."""
    register_b = cmos[REG_B]

    def matching(alarm: int, values: range, encode: Callable[[int, int], int]) -> list[int]:
        if alarm & ALARM_DONT_CARE == ALARM_DONT_CARE:
            return list(values)
        return [v for v in values if encode(v, register_b) == alarm]

    seconds = matching(cmos[REG_SECONDS_ALARM], range(60), _encode)
    minutes = matching(cmos[REG_MINUTES_ALARM], range(60), _encode)
    hours = matching(cmos[REG_HOURS_ALARM], range(24), _encode_hour)
    if not (seconds and minutes and hours):
        return -1
    today = after - after % SECONDS_PER_DAY
    for day in (today, today + SECONDS_PER_DAY):
        for hour in hours:
            hour_start = day + hour * 3600
            if hour_start + 3599 <= after:
                continue
            for minute in minutes:
                minute_start = hour_start + minute * 60
                if minute_start + 59 <= after:
                    continue
                for second in seconds:
                    if minute_start + second > after:
                        return minute_start + second
    return -1  # unreachable: every day holds a match once all three lists are non-empty


# ------------------------------------------------------------------------- device


def _initial_cmos() -> list[int]:
    cmos = [0] * CMOS_BYTES
    cmos[REG_A] = A_AT_RESET
    cmos[REG_B] = B_AT_RESET
    return cmos


@dataclass
class RtcState:
    """Guest-visible RTC state; times are nanoseconds of the RTC's own clock."""

    index: Annotated[int, Range(0, CMOS_BYTES - 1)] = 0
    nmi_disabled: bool = False
    cmos: Annotated[list[Annotated[int, bits(8)]], Length(CMOS_BYTES)] = field(
        default_factory=_initial_cmos
    )
    """All 128 bytes. Time bytes here are only meaningful while the clock is frozen;
    register C and D slots are unused (0)."""
    offset_ns: int = 0
    """RTC time minus ``wall_time_ns()``."""
    flags: Annotated[int, Mask(ENABLE_TO_FLAG_MASK)] = 0
    """PF/AF/UF accrued up to ``accrued_to_ns``."""
    accrued_to_ns: int = 0
    irq_level: bool = False
    """IRQ8 as last driven (= IRQF)."""

    def check_invariants(self) -> None:
        if self.cmos[REG_A] & A_UIP:
            raise StateError(f"cmos[{REG_A}]", "register A holds UIP, which the chip computes")
        if self.cmos[REG_B] & B_SET and self.cmos[REG_B] & B_UIE:
            raise StateError(f"cmos[{REG_B}]", "register B holds SET and UIE together")
        for register in (REG_C, REG_D):
            if self.cmos[register]:
                raise StateError(f"cmos[{register}]", "register C/D slots must be 0")


class Rtc(Snapshotting[RtcState]):
    """The MC146818A RTC and CMOS RAM behind ports 0x70/0x71."""

    BASE = 0x70
    LENGTH = 2
    INDEX_OFFSET = 0
    DATA_OFFSET = 1

    def __init__(
        self,
        clock: Clock,
        timer: Timer | None = None,
        irq8: InterruptLine | None = None,
        wall_time_ns: Callable[[], int] = time.time_ns,
        cmos: Mapping[int, int] | None = None,
    ) -> None:
        self._clock = clock
        self._timer = timer
        self._irq8 = irq8
        self._wall_time_ns = wall_time_ns
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._handle: TimerHandle | None = None
        self._generation = 0
        state = RtcState()
        for index, value in (cmos or {}).items():
            if not FIRST_RAM_BYTE <= index < CMOS_BYTES or index == REG_CENTURY:
                raise ValueError(f"RTC: CMOS byte {index:#x} is not general RAM")
            if not 0 <= value <= 0xFF:
                raise ValueError(f"RTC: CMOS byte {index:#x} = {value} is not a byte")
            state.cmos[index] = value
        state.accrued_to_ns = wall_time_ns()
        self._state = state

    # ------------------------------------------------------------------ ports

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(max(size, 0)):
            byte = self._read_data() if offset + i == self.DATA_OFFSET else 0xFF
            value |= byte << (8 * i)
        self._outbox.flush()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(max(size, 0)):
            byte = (value >> (8 * i)) & 0xFF
            if offset + i == self.INDEX_OFFSET:
                with self._lock:
                    self._state.index = byte & 0x7F
                    self._state.nmi_disabled = bool(byte & 0x80)
            elif offset + i == self.DATA_OFFSET:
                self._write_data(byte)
        self._outbox.flush()

    @property
    def nmi_disabled(self) -> bool:
        """Bit 7 of the last byte written to port 0x70 (NMI masked when set)."""
        with self._lock:
            return self._state.nmi_disabled

    def now_seconds(self) -> int:
        """The RTC's current time, in whole seconds since 1970-01-01 (frozen or not)."""
        with self._lock:
            state = self._state
            if self._updating_locked():
                return self._rtc_now_locked() // NS_PER_SECOND
            return _seconds_from_bytes(dict(enumerate(state.cmos)), state.cmos[REG_B])

    # ----------------------------------------------------------- time and flags

    def _rtc_now_locked(self) -> int:
        return self._wall_time_ns() + self._state.offset_ns

    def _divider_running_locked(self) -> bool:
        return self._state.cmos[REG_A] & A_DIVIDER == DIVIDER_32768_HZ

    def _updating_locked(self) -> bool:
        return self._divider_running_locked() and not self._state.cmos[REG_B] & B_SET

    def _accrue_locked(self, now: int) -> None:
        """Set the flags of every event in (accrued_to_ns, now] under current settings."""
        state = self._state
        since = state.accrued_to_ns
        state.accrued_to_ns = now
        if now <= since:
            return  # the clock moved back (host clock stepped): nothing happened
        period = _rate_ticks(state.cmos[REG_A]) * NS_PER_SECOND
        edges_now = now * TIME_BASE_HZ // period if period else 0
        edges_since = since * TIME_BASE_HZ // period if period else 0
        if self._divider_running_locked() and edges_now > edges_since:
            state.flags |= C_PF
        if self._updating_locked():
            last_second = since // NS_PER_SECOND
            if now // NS_PER_SECOND > last_second:
                state.flags |= C_UF
                alarm = _next_alarm(last_second, state.cmos)
                if alarm >= 0 and alarm * NS_PER_SECOND <= now:
                    state.flags |= C_AF

    def _visible_time_bytes_locked(self, now: int) -> dict[int, int]:
        """The time bytes the guest sees at ``now``."""
        state = self._state
        if self._updating_locked():
            return _time_bytes(now // NS_PER_SECOND, state.cmos[REG_B])
        return {reg: state.cmos[reg] for reg in TIME_REGISTERS}

    def _set_clock_locked(self, now: int, time_bytes: Mapping[int, int]) -> int:
        """Restart the clock from ``time_bytes``, keeping the divider's phase.

        Returns the RTC time that ``now`` has become; events are counted from there.
        """
        state = self._state
        seconds = _seconds_from_bytes(time_bytes, state.cmos[REG_B])
        shift = (seconds - now // NS_PER_SECOND) * NS_PER_SECOND
        state.offset_ns += shift
        state.accrued_to_ns = now + shift
        return now + shift

    # --------------------------------------------------------------- registers

    def _read_data(self) -> int:
        with self._lock:
            state = self._state
            index = state.index
            now = self._rtc_now_locked()
            if index in TIME_REGISTERS:
                return self._visible_time_bytes_locked(now)[index]
            if index == REG_A:
                value = state.cmos[REG_A]
                phase_ticks = now % NS_PER_SECOND * TIME_BASE_HZ
                if self._updating_locked() and phase_ticks >= (
                    (TIME_BASE_HZ - UIP_TICKS) * NS_PER_SECOND
                ):
                    value |= A_UIP
                return value
            if index == REG_C:
                self._accrue_locked(now)
                value = state.flags
                if state.flags & state.cmos[REG_B] & ENABLE_TO_FLAG_MASK:
                    value |= C_IRQF
                state.flags = 0
                self._settle_locked(now)
                return value
            if index == REG_D:
                return D_VRT
            return state.cmos[index]

    def _write_data(self, value: int) -> None:
        with self._lock:
            state = self._state
            index = state.index
            now = self._rtc_now_locked()
            self._accrue_locked(now)
            if index in TIME_REGISTERS:
                if self._updating_locked():
                    time_bytes = self._visible_time_bytes_locked(now)
                    time_bytes[index] = value
                    self._set_clock_locked(now, time_bytes)
                else:
                    state.cmos[index] = value
            elif index in (REG_A, REG_B):
                self._write_control_locked(index, value, now)
            elif index in (REG_C, REG_D):
                return
            else:
                state.cmos[index] = value
            self._settle_locked(self._rtc_now_locked())

    def _write_control_locked(self, index: int, value: int, now: int) -> None:
        state = self._state
        was_updating = self._updating_locked()
        was_dividing = self._divider_running_locked()
        if was_updating:
            for reg, byte in _time_bytes(now // NS_PER_SECOND, state.cmos[REG_B]).items():
                state.cmos[reg] = byte
        if index == REG_A:
            state.cmos[REG_A] = value & ~A_UIP
        else:
            if value & B_SET:
                value &= ~B_UIE
            state.cmos[REG_B] = value
        if not was_dividing and self._divider_running_locked():
            # The chain starts from reset: the first update comes half a second later.
            shift = NS_PER_SECOND // 2 - now % NS_PER_SECOND
            state.offset_ns += shift
            now += shift
        if not was_updating and self._updating_locked():
            now = self._set_clock_locked(now, {reg: state.cmos[reg] for reg in TIME_REGISTERS})
        state.accrued_to_ns = now

    # ------------------------------------------------------- interrupt and timer

    def _settle_locked(self, now: int) -> None:
        """Drive IRQ8 to IRQF and arm the timer for the next event that could raise it."""
        state = self._state
        level = bool(state.flags & state.cmos[REG_B] & ENABLE_TO_FLAG_MASK)
        if level != state.irq_level:
            state.irq_level = level
            if self._irq8 is not None:
                self._outbox.post(functools.partial(self._irq8.set_level, level))
        self._arm_locked(now)

    def _next_event_locked(self, now: int) -> int | None:
        state = self._state
        enabled = state.cmos[REG_B]
        candidates: list[int] = []
        period = _rate_ticks(state.cmos[REG_A]) * NS_PER_SECOND
        if enabled & B_PIE and period and self._divider_running_locked():
            edge = now * TIME_BASE_HZ // period + 1
            candidates.append(-(-edge * period // TIME_BASE_HZ))
        if self._updating_locked():
            if enabled & B_UIE:
                candidates.append((now // NS_PER_SECOND + 1) * NS_PER_SECOND)
            if enabled & B_AIE:
                alarm = _next_alarm(now // NS_PER_SECOND, state.cmos)
                if alarm >= 0:
                    candidates.append(alarm * NS_PER_SECOND)
        return min(candidates) if candidates else None

    def _arm_locked(self, now: int) -> None:
        if self._handle is not None and self._timer is not None:
            self._timer.cancel(self._handle)
        self._handle = None
        self._generation += 1
        if self._timer is None or self._irq8 is None or self._state.irq_level:
            return
        event = self._next_event_locked(now)
        if event is None:
            return
        generation = self._generation
        deadline = self._clock.now_ns() + max(event - now, 0)
        self._handle = self._timer.schedule(deadline, lambda: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._handle = None
            now = self._rtc_now_locked()
            self._accrue_locked(now)
            self._settle_locked(now)
        self._outbox.flush()

    # ---------------------------------------------------------------- snapshot

    def save_state(self) -> RtcState:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> RtcState:
        return state_from_data(RtcState, data, "RTC")

    def restore_state(self, state: RtcState) -> None:
        with self._lock:
            self._state = detached(state)
            if self._irq8 is not None:
                # The line's own snapshot may differ; drive it to ours.
                self._outbox.post(functools.partial(self._irq8.set_level, state.irq_level))
            self._arm_locked(self._rtc_now_locked())
        self._outbox.flush()
