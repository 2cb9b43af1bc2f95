"""Port 61h: the PC's NMI status and control register (PIIX4 "NMISC", 61h).

Bit 0 drives the gate of 8254 counter 2, bit 1 enables the speaker data;
bits 2-3 (NMI source enables) are plain read/write latches. Read-only bits:
4 toggles with every DRAM refresh request (counter 1 at count 18 on a PC,
one every ~15.09 µs, computed here from the clock), 5 is counter 2's OUT,
6 and 7 report IOCHK#/SERR# NMI sources, of which this machine has none.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Annotated, Protocol

from kvm_devices.interfaces import Clock
from kvm_devices.outbox import Outbox
from kvm_devices.snapshot import Mask, Snapshotting, detached, state_from_data

CONTROL_BITS = 0x0F
GATE2 = 0x01
REFRESH_TOGGLE = 0x10
OUT2 = 0x20
# 18 cycles of the 1.193182 MHz PIT clock.
REFRESH_PERIOD_NS = 15_085


class Counter2Wiring(Protocol):
    """What port 61h reaches of the 8254 (see :class:`kvm_devices.pit.Pit`)."""

    def set_gate(self, channel: int, level: bool) -> None: ...

    def out(self, channel: int) -> bool: ...


@dataclass
class Port61State:
    """The written bits 0-3; the read-only bits are computed when read."""

    control: Annotated[int, Mask(CONTROL_BITS)] = 0


class Port61(Snapshotting[Port61State]):
    """The register at port 61h, one byte wide."""

    BASE = 0x61
    LENGTH = 1

    def __init__(self, clock: Clock, counters: Counter2Wiring) -> None:
        self._clock = clock
        self._counters = counters
        self._lock = threading.Lock()
        # Gate changes leave in write order, so racing writers leave gate and bit 0 equal.
        self._outbox = Outbox(self._lock)
        self._state = Port61State()

    def read(self, offset: int, size: int) -> int:
        all_ones = (1 << (8 * size)) - 1 if size > 0 else 0
        if offset != 0 or size <= 0:
            return all_ones
        with self._lock:
            value = self._state.control
        if (self._clock.now_ns() // REFRESH_PERIOD_NS) & 1:
            value |= REFRESH_TOGGLE
        if self._counters.out(2):
            value |= OUT2
        return (all_ones & ~0xFF) | value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size <= 0:
            return
        with self._lock:
            self._state.control = value & CONTROL_BITS
            self._outbox.post(functools.partial(self._counters.set_gate, 2, bool(value & GATE2)))
        self._outbox.flush()

    def save_state(self) -> Port61State:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> Port61State:
        return state_from_data(Port61State, data, "port 61h")

    def restore_state(self, state: Port61State) -> None:
        """Restore bits 0-3; the 8254's gate is part of the 8254's own state."""
        with self._lock:
            self._state = detached(state)
