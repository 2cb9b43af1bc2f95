"""Intel 8254 programmable interval timer: three 16-bit counters at ports 40h-43h.

Time: the 1.193182 MHz CLK input has its rising edges at fixed instants of the
injected clock (edge k at ``ceil(k * 1e9 / 1193182)`` ns), shared by the three
counters. A count written between edges k and k+1 is loaded into the counting
element at edge k+1, and each later edge counts, so in mode 0 OUT rises N+1
edges after the write, as the datasheet says. Counts and OUT levels are
computed from the clock when asked; nothing runs while time passes.

IRQ0 (counter 0's OUT, wired to PIC IR0 and IOAPIC pin 2, both edge
triggered): one interrupt per rising edge of OUT.

* Modes 0 and 1, where OUT stays high after its rising edge, drive the line as
  a level that follows OUT (``set_level``); a mode 1 trigger lowers it at the
  trigger rather than one CLK later.
* Modes 2-5 ``pulse()`` the line at each rising edge of OUT and keep it low in
  between, so the periodic modes cost one timer callback per period: mode 2
  at the reload, mode 3 at the start of each high half.
* Exactly one Timer callback is pending while counter 0 has a rising edge
  ahead, none otherwise (idle, halted by its gate, one-shot done).
* Lateness is coalesced: a callback delivers at most one interrupt however
  many edges it missed, then re-phases to the next edge of the waveform.
* Interrupts from the timer are at least ``min_irq0_interval_ns`` apart
  (100 µs by default): periodic edges closer than that (counts below ~120)
  merge; a one-shot edge inside the interval is delivered at its end.
* An edge that a guest write overtakes is delivered before the write acts.

The 8254 datasheet calls counts of 1 illegal in modes 2 and 3; here they
leave OUT high.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, NamedTuple

from kvm_devices.interfaces import Clock, InterruptLine, Timer, TimerHandle
from kvm_devices.outbox import Outbox
from kvm_devices.port61 import Port61, Port61State
from kvm_devices.snapshot import (
    Length,
    Range,
    Snapshotting,
    StateError,
    bits,
    detached,
    state_from_data,
)

INPUT_HZ = 1_193_182
NS_PER_S = 1_000_000_000
MIN_IRQ0_INTERVAL_NS = 100_000
CHANNELS = 3
CONTROL_PORT = 3
READ_BACK = 3
NO_STATUS = -1
LEVEL_OUTPUT_MODES = (0, 1)
GATE_HOLDS_MODES = (0, 2, 3, 4)


def tick_at(ns: int) -> int:
    """The index of the last CLK edge at or before ``ns``."""
    return ns * INPUT_HZ // NS_PER_S


def ns_of_tick(tick: int) -> int:
    """The instant of CLK edge ``tick``."""
    return -((-tick * NS_PER_S) // INPUT_HZ)


def _to_bcd(value: int) -> int:
    return int(str(value), 16)


def _from_bcd(raw: int) -> int:
    # Nibbles above 9 are not BCD; they keep their weight so the count stays finite.
    return sum(((raw >> (4 * i)) & 0xF) * 10**i for i in range(4))


@dataclass
class PitCounterState:
    """One counter. Ticks are CLK edge indices (see :func:`tick_at`)."""

    mode_bits: Annotated[int, bits(3)] = 0
    access: Annotated[int, Range(1, 3)] = 3
    bcd: bool = False
    count_register: Annotated[int, bits(16)] = 0
    count_written: bool = False
    write_high_next: bool = False
    read_high_next: bool = False
    output_latch: Annotated[list[Annotated[int, bits(8)]], Length(most=2)] = field(
        default_factory=list
    )
    status_latch: Annotated[int, Range(NO_STATUS, 0xFF)] = NO_STATUS
    gate: bool = True
    # The counting element: loaded with `count` at `load_tick`, minus ticks its gate held it.
    armed: bool = False
    load_tick: int = 0
    count: Annotated[int, Range(0, 0x10000)] = 0
    held: bool = False
    hold_start_tick: int = 0
    held_ticks: Annotated[int, Range(0)] = 0
    # What it shows while not armed and before load_tick.
    value_idle: Annotated[int, bits(16)] = 0
    out_idle: bool = False
    # Modes 2/3: a count written while counting, taken at the end of the (half) cycle.
    next_count: Annotated[int, Range(0, 0x10000)] = 0
    next_switch_tick: int = 0
    next_load_tick: int = 0
    null_count: bool = True
    cr_transfer_scheduled: bool = False
    cr_transfer_tick: int = 0

    def check_invariants(self) -> None:
        if self.armed and self.count == 0:
            raise StateError("count", "an armed counter needs a count of at least 1")


@dataclass
class PitState:
    """The three counters, the IRQ0 line, and port 61h's latch."""

    counters: Annotated[list[PitCounterState], Length(CHANNELS)]
    port61: Port61State
    irq0_level: bool
    irq0_done_tick: int
    irq0_quiet_until_tick: int
    clock_tick: int


class _Regime(NamedTuple):
    load_tick: int
    initial: int
    held_ticks: int
    held: bool


class _Counter:
    """The logic of one 8254 counter over its state, on CLK ticks; no locking."""

    def __init__(self, state: PitCounterState) -> None:
        self.s = state

    @property
    def mode(self) -> int:
        bits = self.s.mode_bits
        return bits & 3 if bits & 2 else bits

    def decoded_count(self) -> int:
        if self.s.bcd:
            return _from_bcd(self.s.count_register) or 10_000
        return self.s.count_register or 0x10000

    def encode(self, value: int) -> int:
        if self.s.bcd:
            return _to_bcd(value % 10_000)
        return value % 0x10000

    def regime(self, g: int) -> _Regime:
        s = self.s
        if s.next_count and g >= s.next_switch_tick:
            return _Regime(s.next_load_tick, s.next_count, 0, False)
        return _Regime(s.load_tick, s.count, s.held_ticks, s.held)

    def settle(self, g: int) -> None:
        s = self.s
        if s.next_count and g >= s.next_switch_tick:
            s.load_tick, s.count, s.held_ticks, s.held = self.regime(g)
            s.next_count = 0

    def elapsed(self, g: int) -> tuple[_Regime, int] | None:
        """Counted edges since the load at tick ``g``; None while nothing is loaded."""
        if not self.s.armed:
            return None
        r = self.regime(g)
        if g < r.load_tick:
            return None
        end = max(self.s.hold_start_tick, r.load_tick) if r.held else g
        return r, end - r.load_tick - r.held_ticks

    def value(self, g: int) -> int:
        """The counting element as the read logic sees it (binary or BCD digits)."""
        progress = self.elapsed(g)
        if progress is None:
            return self.s.value_idle
        r, done = progress
        n = r.initial
        mode = self.mode
        if mode == 2:
            return self.encode(n - done % n)
        if mode == 3:
            # Mode 3 loads the even part of the count and decrements by two per edge.
            high = (n + 1) // 2
            phase = done % n
            return self.encode((n & ~1) - 2 * (phase if phase < high else phase - high))
        return self.encode(n - done)

    def out(self, g: int) -> bool:
        progress = self.elapsed(g)
        if progress is None:
            return self.s.out_idle
        r, done = progress
        n = r.initial
        mode = self.mode
        if mode in (0, 1):
            return done >= n
        if mode == 2:
            return r.held or n < 2 or done % n != n - 1
        if mode == 3:
            return r.held or done % n < (n + 1) // 2
        return done != n

    def null_count(self, g: int) -> bool:
        s = self.s
        return s.null_count and not (s.cr_transfer_scheduled and g >= s.cr_transfer_tick)

    def status(self, g: int) -> int:
        s = self.s
        return (
            (self.out(g) << 7)
            | (self.null_count(g) << 6)
            | (s.access << 4)
            | (s.mode_bits << 1)
            | int(s.bcd)
        )

    def next_rising_tick(self, after: int) -> int | None:
        """The first tick after ``after`` at which OUT rises, from the current program."""
        s = self.s
        if not s.armed:
            return None
        current = _Regime(s.load_tick, s.count, s.held_ticks, s.held)
        if not s.next_count:
            return self._rising_after(current, after)
        switched = _Regime(s.next_load_tick, s.next_count, 0, False)
        if after >= s.next_switch_tick:
            return self._rising_after(switched, after)
        edge = self._rising_after(current, after)
        if edge is not None and edge <= s.next_switch_tick:
            return edge
        return self._rising_after(switched, s.next_switch_tick)

    def _rising_after(self, r: _Regime, after: int) -> int | None:
        if r.held:
            return None
        start = r.load_tick + r.held_ticks
        n = r.initial
        mode = self.mode
        if mode in (0, 1):
            edge = start + n
        elif mode in (4, 5):
            edge = start + n + 1
        elif n < 2:
            return None
        else:
            edge = start + max(1, (after - start) // n + 1) * n
        return edge if edge > after else None

    # -- guest writes --------------------------------------------------------------

    def write_control(self, value: int, g: int) -> None:
        s = self.s
        s.value_idle = self.value(g)
        s.mode_bits = (value >> 1) & 7
        s.access = (value >> 4) & 3
        s.bcd = bool(value & 1)
        s.out_idle = self.mode != 0
        s.armed = False
        s.held = False
        s.next_count = 0
        s.count_written = False
        s.null_count = True
        s.cr_transfer_scheduled = False
        s.write_high_next = False
        s.read_high_next = False
        s.output_latch = []
        s.status_latch = NO_STATUS

    def write_data(self, byte: int, g: int) -> None:
        s = self.s
        if s.access == 1:
            s.count_register = byte
        elif s.access == 2:
            s.count_register = byte << 8
        elif not s.write_high_next:
            s.count_register = (s.count_register & 0xFF00) | byte
            s.write_high_next = True
            s.null_count = True
            s.cr_transfer_scheduled = False
            if self.mode == 0:
                # Mode 0: the first byte of a new count stops counting and drops OUT.
                s.value_idle = self.value(g)
                s.out_idle = False
                s.armed = False
            return
        else:
            s.count_register = (s.count_register & 0xFF) | (byte << 8)
            s.write_high_next = False
        self._count_complete(g)

    def _count_complete(self, g: int) -> None:
        s = self.s
        s.count_written = True
        s.null_count = True
        s.cr_transfer_scheduled = False
        mode = self.mode
        if mode == 0:
            self._load(g, out_before=False)
        elif mode == 4:
            self._load(g, out_before=self.out(g))
        elif mode in (2, 3):
            r = self.regime(g)
            if not s.armed or g < r.load_tick:
                self._load(g, out_before=True)
            elif not r.held:
                self._reload_at_cycle_end(g)
            # Held by a low gate: the new count waits for the gate's rising edge.
        # Modes 1 and 5: the new count waits for the next trigger.

    def _load(self, g: int, out_before: bool) -> None:
        """Load the count register into the counting element at the next CLK edge."""
        s = self.s
        s.value_idle = self.value(g)
        s.out_idle = out_before
        s.armed = True
        s.load_tick = g + 1
        s.count = self.decoded_count()
        s.held_ticks = 0
        s.held = not s.gate and self.mode in GATE_HOLDS_MODES
        s.hold_start_tick = g
        s.next_count = 0
        s.cr_transfer_scheduled = True
        s.cr_transfer_tick = g + 1

    def _reload_at_cycle_end(self, g: int) -> None:
        """Modes 2/3: a new count waits for the end of the period (mode 3: half-period)."""
        self.settle(g)
        s = self.s
        n = s.count
        start = s.load_tick + s.held_ticks
        done = g - start
        new = self.decoded_count()
        if self.mode == 3 and done % n < (n + 1) // 2:
            switch = start + (done // n) * n + (n + 1) // 2
            # The new count starts with its low half.
            load = switch - (new + 1) // 2
        else:
            switch = start + (done // n + 1) * n
            load = switch
        s.next_count = new
        s.next_switch_tick = switch
        s.next_load_tick = load
        s.cr_transfer_scheduled = True
        s.cr_transfer_tick = switch

    def set_gate(self, level: bool, g: int) -> None:
        s = self.s
        if level == s.gate:
            return
        self.settle(g)
        s.gate = level
        mode = self.mode
        if mode in (1, 5):
            if level and s.count_written:
                self._load(g, out_before=self.out(g))
            return
        if not s.armed:
            return
        if level and mode in (2, 3):
            self._load(g, out_before=True)
        elif level:
            s.held_ticks += max(0, g - max(s.hold_start_tick, s.load_tick))
            s.held = False
        else:
            s.held = True
            s.hold_start_tick = g
            if s.next_count:
                s.next_count = 0
                s.cr_transfer_scheduled = False

    def latch_count(self, g: int) -> None:
        s = self.s
        if s.output_latch:
            return
        raw = self.value(g)
        low, high = raw & 0xFF, raw >> 8
        s.output_latch = [low] if s.access == 1 else [high] if s.access == 2 else [low, high]

    def latch_status(self, g: int) -> None:
        if self.s.status_latch == NO_STATUS:
            self.s.status_latch = self.status(g)

    def read_data(self, g: int) -> int:
        s = self.s
        if s.status_latch != NO_STATUS:
            status, s.status_latch = s.status_latch, NO_STATUS
            return status
        if s.output_latch:
            return s.output_latch.pop(0)
        raw = self.value(g)
        if s.access == 1:
            return raw & 0xFF
        if s.access == 2:
            return raw >> 8
        high, s.read_high_next = s.read_high_next, not s.read_high_next
        return raw >> 8 if high else raw & 0xFF


class Pit(Snapshotting[PitState]):
    """The 8254 at ports 40h-43h (this object) with counter 2's gate on port 61h.

    ``irq0`` is counter 0's OUT (see the module docstring for how it is
    driven). Counters 0 and 1 have their gates tied high on a PC;
    :meth:`set_gate` still works on them. Calls to ``irq0`` are made outside
    the lock, in order, by whichever thread is not already making them.
    """

    BASE = 0x40
    LENGTH = 4
    PORT61 = Port61.BASE
    INPUT_HZ = INPUT_HZ

    def __init__(
        self,
        clock: Clock,
        timer: Timer,
        irq0: InterruptLine,
        *,
        min_irq0_interval_ns: int = MIN_IRQ0_INTERVAL_NS,
    ) -> None:
        self._clock = clock
        self._timer = timer
        self._irq0 = irq0
        self._min_irq0_interval_ns = min_irq0_interval_ns
        self._lock = threading.Lock()
        self._counters = [_Counter(PitCounterState(gate=channel != 2)) for channel in range(3)]
        self._irq0_level = False
        # Rising edges up to this tick are delivered (or merged into a delivery).
        self._irq0_done_tick = tick_at(clock.now_ns())
        # The timer delivers nothing before this tick (the minimum interval).
        self._irq0_quiet_until_tick = self._irq0_done_tick
        self._irq0_handle: TimerHandle | None = None
        self._irq0_generation = 0
        self._outbox = Outbox(self._lock)
        self.port61 = Port61(clock, self)

    # -- the Device at 40h-43h -----------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        all_ones = (1 << (8 * size)) - 1 if size > 0 else 0
        if not 0 <= offset < CONTROL_PORT or size <= 0:
            return all_ones
        with self._lock:
            value = self._counters[offset].read_data(tick_at(self._clock.now_ns()))
        return (all_ones & ~0xFF) | value

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < self.LENGTH or size <= 0:
            return
        byte = value & 0xFF
        with self._lock:
            now = self._clock.now_ns()
            g = tick_at(now)
            if offset == CONTROL_PORT:
                self._write_control(byte, now, g)
            else:
                counter = self._counters[offset]
                self._change(offset, now, lambda: counter.write_data(byte, g))
        self._outbox.flush()

    def _write_control(self, byte: int, now: int, g: int) -> None:
        select = byte >> 6
        if select == READ_BACK:
            for channel, counter in enumerate(self._counters):
                if byte & (2 << channel):
                    # Both latch bits are active low.
                    if not byte & 0x20:
                        counter.latch_count(g)
                    if not byte & 0x10:
                        counter.latch_status(g)
            return
        counter = self._counters[select]
        if (byte >> 4) & 3 == 0:
            counter.latch_count(g)
        else:
            self._change(select, now, lambda: counter.write_control(byte, g))

    # -- gates and outputs ---------------------------------------------------------

    def set_gate(self, channel: int, level: bool) -> None:
        """Drive counter ``channel``'s GATE input (port 61h bit 0 drives counter 2's)."""
        counter = self._counters[self._channel_index(channel)]
        with self._lock:
            now = self._clock.now_ns()
            g = tick_at(now)
            self._change(channel, now, lambda: counter.set_gate(level, g))
        self._outbox.flush()

    def out(self, channel: int) -> bool:
        """Counter ``channel``'s OUT level now."""
        counter = self._counters[self._channel_index(channel)]
        with self._lock:
            return counter.out(tick_at(self._clock.now_ns()))

    @staticmethod
    def _channel_index(channel: int) -> int:
        if not 0 <= channel < CHANNELS:
            raise ValueError(f"the 8254 has counters 0-2, not {channel}")
        return channel

    # -- IRQ0 ----------------------------------------------------------------------

    def _change(self, channel: int, now: int, action: Callable[[], None]) -> None:
        if channel != 0:
            action()
            return
        g = tick_at(now)
        edge = self._counters[0].next_rising_tick(self._irq0_done_tick)
        if edge is not None and edge <= g:
            self._irq0_deliver()
        self._irq0_done_tick = max(self._irq0_done_tick, g)
        action()
        counter = self._counters[0]
        if counter.mode in LEVEL_OUTPUT_MODES:
            # OUT as it will be after a pending load: mode 1 falls on the CLK edge after
            # its trigger, and no timer watches that edge.
            settled = max(g, counter.s.load_tick) if counter.s.armed else g
            self._irq0_drive(counter.out(settled))
        else:
            self._irq0_drive(False)
        self._irq0_schedule()

    def _irq0_drive(self, level: bool) -> None:
        if level != self._irq0_level:
            self._irq0_level = level
            self._outbox.post(functools.partial(self._irq0.set_level, level))

    def _irq0_deliver(self) -> None:
        if self._counters[0].mode in LEVEL_OUTPUT_MODES:
            self._irq0_drive(True)
        else:
            self._irq0_drive(False)
            self._outbox.post(self._irq0.pulse)

    def _irq0_schedule(self) -> None:
        if self._irq0_handle is not None:
            self._timer.cancel(self._irq0_handle)
            self._irq0_handle = None
        self._irq0_generation += 1
        edge = self._counters[0].next_rising_tick(self._irq0_done_tick)
        if edge is not None:
            deadline = ns_of_tick(max(edge, self._irq0_quiet_until_tick))
            callback = functools.partial(self._irq0_due, self._irq0_generation)
            self._irq0_handle = self._timer.schedule(deadline, callback)

    def _irq0_due(self, generation: int) -> None:
        with self._lock:
            if generation != self._irq0_generation:
                return
            self._irq0_handle = None
            now = self._clock.now_ns()
            g = tick_at(now)
            edge = self._counters[0].next_rising_tick(self._irq0_done_tick)
            if edge is not None and edge <= g:
                self._irq0_deliver()
                self._irq0_done_tick = max(self._irq0_done_tick, g)
                self._irq0_quiet_until_tick = tick_at(now + self._min_irq0_interval_ns)
            self._irq0_schedule()
        self._outbox.flush()

    # -- snapshots -----------------------------------------------------------------

    def save_state(self) -> PitState:
        """The state; ticks are absolute, with the tick of the save in ``clock_tick``."""
        port61 = self.port61.save_state()
        with self._lock:
            return detached(
                PitState(
                    counters=[counter.s for counter in self._counters],
                    port61=port61,
                    irq0_level=self._irq0_level,
                    irq0_done_tick=self._irq0_done_tick,
                    irq0_quiet_until_tick=self._irq0_quiet_until_tick,
                    clock_tick=tick_at(self._clock.now_ns()),
                )
            )

    def check_state(self, data: object) -> PitState:
        return state_from_data(PitState, data, "PIT")

    def restore_state(self, state: PitState) -> None:
        """Restore a snapshot as a paused machine: time between save and restore does not count.

        Does not drive ``irq0``: the interrupt controllers restore their own view of
        the line.
        """
        state = detached(state)
        self.port61.restore_state(state.port61)
        with self._lock:
            shift = tick_at(self._clock.now_ns()) - state.clock_tick
            for counter in state.counters:
                _shift_ticks(counter, shift)
            self._counters = [_Counter(counter) for counter in state.counters]
            self._irq0_level = state.irq0_level
            self._irq0_done_tick = state.irq0_done_tick + shift
            self._irq0_quiet_until_tick = state.irq0_quiet_until_tick + shift
            self._irq0_schedule()
        self._outbox.flush()


_TICK_FIELDS = (
    "load_tick",
    "hold_start_tick",
    "next_switch_tick",
    "next_load_tick",
    "cr_transfer_tick",
)


def _shift_ticks(state: PitCounterState, shift: int) -> None:
    for name in _TICK_FIELDS:
        setattr(state, name, getattr(state, name) + shift)
