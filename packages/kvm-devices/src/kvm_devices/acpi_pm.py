"""ACPI fixed-hardware power management: PM1a event and control blocks, and the PM timer.

Reference: ACPI Specification 6.5, §4.8.3 "Fixed Hardware Registers":
§4.8.3.1.1 PM1 Status Registers (table 4.11), §4.8.3.1.2 PM1 Enable Registers
(table 4.12), §4.8.3.2.1 PM1 Control Registers (table 4.13), §4.8.3.3 Power Management
Timer (PM_TMR). The FADT that describes this block must say PM1_EVT_LEN=4, PM1_CNT_LEN=2,
PM_TMR_LEN=4, TMR_VAL_EXT=0 (24-bit timer) and SMI_CMD=0. Where the three blocks sit and
which line the SCI is are the platform's: the device sees offsets within each block and
drives the ``sci`` line it is given.

Choices where the specification leaves them to the platform:

* There is no SMM and no SMI_CMD port, so the platform is always in ACPI mode: SCI_EN
  reads 1 and writes to it are ignored (table 4.13: the hardware owns SCI_EN; OSPM
  preserves it). The SCI is therefore the OR of every status bit with its enable bit.
* GBL_RLS (write-only) would raise an SMI to a BIOS that does not exist: it reads 0
  and has no effect. BM_RLD is stored and read back; there are no C3 states for it to
  affect. The status bits without a source here (BM_STS, GBL_STS, SLPBTN_STS, RTC_STS)
  read 0 unless a snapshot restored them; the guest can still clear them.
* Each register is reached a byte at a time (ACPI allows byte access to PM1 registers):
  an access of ``size`` bytes at ``offset`` acts on the bytes ``offset .. offset+size-1``
  of the block, bytes past the block read 0xFF and ignore writes. Reserved bits read 0.
  The SCI level is updated once, after the whole access. PM_TMR is read-only.
* Writing SLP_EN=1 calls ``on_sleep(SLP_TYPx)`` with the SLP_TYPx value of the same
  write, whatever that value is: its meaning comes from the DSDT's ``\\_Sx`` packages,
  which the VMM owns. Linux waits for
  WAK_STS after entering S1-S4, so a VMM that resumes the guest calls :meth:`AcpiPm.wake`.
* The PM timer is ``floor(elapsed_ns * 3579545 / 10**9) mod 2**24`` of the Clock,
  counted exactly (the sub-tick phase is kept as an integer). It starts at 0 when the
  device is created or reset. TMR_STS is set whenever counter bit 23 changes; it is found
  lazily at each access, and a Timer callback is scheduled at the next change only while
  TMR_EN is set and TMR_STS is clear, so the SCI rises on time. Without a Timer the SCI
  from the PM timer rises at the guest's next access to any of the three blocks.

Thread-safety: one lock guards the state. The SCI line and ``on_sleep`` are called after
it is released, in the order the state changed (:mod:`kvm_devices.outbox`), so the line
sees levels in order, and either may call back into this device or do anything else,
including tearing the VM down or calling :meth:`AcpiPm.wake`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Protocol, TypeVar

from kvm_devices.interfaces import Clock, InterruptLine, Timer, TimerHandle
from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import Mask, Range, Snapshotting, detached, state_from_data

PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4

PM_TIMER_HZ = 3_579_545
PM_TIMER_BITS = 24
PM_TIMER_MASK = (1 << PM_TIMER_BITS) - 1
_TIMER_MSB_PERIOD = 1 << (PM_TIMER_BITS - 1)  # ticks between changes of bit 23
_NS_PER_S = 1_000_000_000

# PM1_STS (table 4.11); each status bit sits at the position of its enable bit in PM1_EN.
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15
PM1_STS_BITS = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | WAK_STS

# PM1_EN (table 4.12).
TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PM1_EN_BITS = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN

# PM1_CNT (table 4.13).
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
PM1_CNT_STORED_BITS = BM_RLD | SLP_TYP_MASK

_EVENT_ENABLE_OFFSET = 2  # PM1_STS is bytes 0-1 of PM1a_EVT_BLK, PM1_EN bytes 2-3

_Result = TypeVar("_Result")


class _LockedAccess(Protocol):
    def __call__(self, operation: Callable[[], _Result]) -> _Result: ...


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


@dataclass
class AcpiPmState:
    """Everything the guest can observe.

    ``timer_ticks`` is the 24-bit PM timer and ``timer_phase`` its progress towards the
    next tick, in units of 1/10**9 tick, both as of the moment the state was last brought
    up to date with the clock (every access, and every save).
    """

    pm1_status: Annotated[int, Mask(PM1_STS_BITS)] = 0
    pm1_enable: Annotated[int, Mask(PM1_EN_BITS)] = 0
    # The stored read/write bits only (BM_RLD, SLP_TYPx): SCI_EN always reads 1.
    pm1_control: Annotated[int, Mask(PM1_CNT_STORED_BITS)] = 0
    timer_ticks: Annotated[int, Range(0, PM_TIMER_MASK)] = 0
    timer_phase: Annotated[int, Range(0, _NS_PER_S - 1)] = 0


class _RegisterBlock:
    """One of the three port ranges, as a :class:`~kvm_devices.interfaces.Device`."""

    def __init__(
        self,
        length: int,
        read_byte: Callable[[int], int],
        write_byte: Callable[[int, int], None],
        access: _LockedAccess,
    ) -> None:
        self._length = length
        self._read_byte = read_byte
        self._write_byte = write_byte
        self._access = access

    def read(self, offset: int, size: int) -> int:
        if not 1 <= size <= 8:
            return _all_ones(size)

        def read_bytes() -> int:
            value = 0
            for index in range(size):
                byte_offset = offset + index
                in_block = 0 <= byte_offset < self._length
                byte = self._read_byte(byte_offset) if in_block else 0xFF
                value |= byte << (8 * index)
            return value

        return self._access(read_bytes)

    def write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= 8:
            return

        def write_bytes() -> None:
            for index in range(size):
                byte_offset = offset + index
                if 0 <= byte_offset < self._length:
                    self._write_byte(byte_offset, (value >> (8 * index)) & 0xFF)

        self._access(write_bytes)


class AcpiPm(Snapshotting[AcpiPmState]):
    """PM1a_EVT_BLK, PM1a_CNT_BLK and PM_TMR_BLK of an ACPI (non-reduced) PC platform."""

    PM1_EVT_LEN = PM1_EVT_LEN
    PM1_CNT_LEN = PM1_CNT_LEN
    PM_TMR_LEN = PM_TMR_LEN

    def __init__(
        self,
        clock: Clock,
        timer: Timer | None,
        sci: InterruptLine,
        on_sleep: Callable[[int], None],
    ) -> None:
        self._clock = clock
        self._timer = timer
        self._sci = sci
        self._on_sleep = on_sleep
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._state = AcpiPmState()
        # Host clock reading at which timer_ticks/timer_phase were exact.
        self._timer_base_ns = clock.now_ns()
        self._sci_level = False
        self._timer_handle: TimerHandle | None = None
        self._timer_deadline_ns: int | None = None
        # Identifies the live timer, so that a callback already past cancel() does nothing.
        self._timer_generation = 0
        # SLP_TYPx of a SLP_EN write, handed to on_sleep after the SCI is settled.
        self._sleep_request: int | None = None
        self.pm1_event_ports = _RegisterBlock(
            PM1_EVT_LEN, self._read_event_byte, self._write_event_byte, self._access
        )
        self.pm1_control_ports = _RegisterBlock(
            PM1_CNT_LEN, self._read_control_byte, self._write_control_byte, self._access
        )
        self.pm_timer_ports = _RegisterBlock(
            PM_TMR_LEN, self._read_timer_byte, _ignore_write, self._access
        )

    # ----------------------------------------------------------- host events

    def press_power_button(self) -> None:
        """The power button was pressed: set PWRBTN_STS (an SCI if PWRBTN_EN is set)."""
        self._access(lambda: self._set_status(PWRBTN_STS))

    def wake(self) -> None:
        """The platform returned to the working state from a sleep state: set WAK_STS."""
        self._access(lambda: self._set_status(WAK_STS))

    def reset(self) -> None:
        """Platform reset: every register to its power-on value, PM timer from 0."""
        with self._lock:
            self._state = AcpiPmState()
            self._timer_base_ns = self._clock.now_ns()
            self._sleep_request = None
            self._settle()
        self._outbox.flush()

    def _set_status(self, bits: int) -> None:
        self._state.pm1_status |= bits

    # ------------------------------------------------------------ registers

    def _access(self, operation: Callable[[], _Result]) -> _Result:
        """Run one guest access or host event on a clock-synchronised state, then settle."""
        with self._lock:
            self._sync_timer()
            result = operation()
            self._settle()
            sleep_type, self._sleep_request = self._sleep_request, None
            if sleep_type is not None:
                self._outbox.post(functools.partial(self._on_sleep, sleep_type))
        self._outbox.flush()
        return result

    def _read_event_byte(self, offset: int) -> int:
        state = self._state
        register = state.pm1_status if offset < _EVENT_ENABLE_OFFSET else state.pm1_enable
        return (register >> (8 * (offset & 1))) & 0xFF

    def _write_event_byte(self, offset: int, byte: int) -> None:
        shift = 8 * (offset & 1)
        state = self._state
        if offset < _EVENT_ENABLE_OFFSET:
            # Write-1-to-clear (§4.8.3.1.1); writing 0 leaves a bit alone.
            state.pm1_status &= ~((byte << shift) & PM1_STS_BITS)
        else:
            kept = state.pm1_enable & ~(0xFF << shift)
            state.pm1_enable = (kept | (byte << shift)) & PM1_EN_BITS

    def _read_control_byte(self, offset: int) -> int:
        return ((SCI_EN | self._state.pm1_control) >> (8 * offset)) & 0xFF

    def _write_control_byte(self, offset: int, byte: int) -> None:
        shift = 8 * offset
        written = byte << shift
        state = self._state
        kept = state.pm1_control & ~(0xFF << shift)
        state.pm1_control = (kept | written) & PM1_CNT_STORED_BITS
        if written & SLP_EN:
            self._sleep_request = (written & SLP_TYP_MASK) >> SLP_TYP_SHIFT

    def _read_timer_byte(self, offset: int) -> int:
        # TMR_VAL_EXT=0: bits 24-31 of the 32-bit register read as 0 (§4.8.3.3).
        return (self._state.timer_ticks >> (8 * offset)) & 0xFF

    # ------------------------------------------------------------- PM timer

    def _sync_timer(self) -> None:
        now = self._clock.now_ns()
        elapsed = now - self._timer_base_ns
        if elapsed <= 0:
            return
        state = self._state
        progress = state.timer_phase + elapsed * PM_TIMER_HZ
        ticks = state.timer_ticks + progress // _NS_PER_S
        state.timer_phase = progress % _NS_PER_S
        if ticks // _TIMER_MSB_PERIOD != state.timer_ticks // _TIMER_MSB_PERIOD:
            state.pm1_status |= TMR_STS
        state.timer_ticks = ticks & PM_TIMER_MASK
        self._timer_base_ns = now

    def _settle(self) -> None:
        """Arm or disarm the PM timer callback and drive the SCI to match the state."""
        self._rearm_timer()
        state = self._state
        level = bool(state.pm1_status & state.pm1_enable)
        if level != self._sci_level:
            self._sci_level = level
            self._outbox.post(functools.partial(self._sci.set_level, level))

    def _rearm_timer(self) -> None:
        state = self._state
        wanted = (
            self._timer is not None
            and bool(state.pm1_enable & TMR_EN)
            and not state.pm1_status & TMR_STS
        )
        if not wanted:
            self._cancel_timer()
            return
        assert self._timer is not None
        ticks_to_change = _TIMER_MSB_PERIOD - state.timer_ticks % _TIMER_MSB_PERIOD
        progress_needed = ticks_to_change * _NS_PER_S - state.timer_phase
        deadline = self._timer_base_ns - (-progress_needed // PM_TIMER_HZ)
        if self._timer_handle is not None and self._timer_deadline_ns == deadline:
            return
        self._cancel_timer()
        self._timer_generation += 1
        generation = self._timer_generation
        self._timer_deadline_ns = deadline
        self._timer_handle = self._timer.schedule(deadline, lambda: self._timer_due(generation))

    def _cancel_timer(self) -> None:
        if self._timer_handle is not None and self._timer is not None:
            self._timer.cancel(self._timer_handle)
        self._timer_handle = None
        self._timer_deadline_ns = None
        self._timer_generation += 1

    def _timer_due(self, generation: int) -> None:
        with self._lock:
            if generation != self._timer_generation:
                return
            self._timer_handle = None
            self._timer_deadline_ns = None
            self._sync_timer()
            self._settle()
        self._outbox.flush()

    # -------------------------------------------------------------- snapshot

    def save_state(self) -> AcpiPmState:
        with self._lock:
            self._sync_timer()
            self._settle()
            state = detached(self._state)
        self._outbox.flush()
        return state

    def check_state(self, data: object) -> AcpiPmState:
        return state_from_data(AcpiPmState, data, "ACPI PM")

    def restore_state(self, state: AcpiPmState) -> None:
        with self._lock:
            self._cancel_timer()
            self._state = detached(state)
            self._timer_base_ns = self._clock.now_ns()
            self._sleep_request = None
            # The line may be anywhere after a restore: drive it whatever we last drove.
            self._sci_level = bool(state.pm1_status & state.pm1_enable)
            self._outbox.post(functools.partial(self._sci.set_level, self._sci_level))
            self._settle()
        self._outbox.flush()


def _ignore_write(offset: int, byte: int) -> None:
    """PM_TMR is read-only (§4.8.3.3)."""
