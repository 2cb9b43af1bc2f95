"""Port 61h: the PC's NMI status and control register (PIIX4 "NMISC", 61h).

Bit 0 drives the gate of 8254 counter 2, bit 1 enables the speaker data;
bits 2-3 (NMI source enables) are plain read/write latches. Read-only bits:
4 toggles with every DRAM refresh request (counter 1 at count 18 on a PC,
one every ~15.09 µs, computed here from the clock), 5 is counter 2's OUT,
6 and 7 report IOCHK#/SERR# NMI sources, of which this machine has none.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Protocol

from kvm_devices.interfaces import Clock

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

    control: int = 0


class Port61:
    """The register at port 61h, one byte wide."""

    BASE = 0x61
    LENGTH = 1

    def __init__(self, clock: Clock, counters: Counter2Wiring) -> None:
        self._clock = clock
        self._counters = counters
        # Held while driving the gate so that racing writers leave gate and bit 0 equal;
        # the 8254 never calls back into this register.
        self._lock = threading.Lock()
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
            self._counters.set_gate(2, bool(value & GATE2))

    def save(self) -> dict[str, object]:
        with self._lock:
            return asdict(self._state)

    def restore(self, state: Mapping[str, object]) -> None:
        """Restore bit 0-3; the 8254's gate is part of the 8254's own snapshot."""
        parsed = parse_port61_state(state)
        with self._lock:
            self._state = parsed


def parse_port61_state(state: object) -> Port61State:
    """Validate a snapshot made by :meth:`Port61.save`; ValueError if malformed."""
    if not isinstance(state, Mapping):
        raise ValueError("Port61State snapshot must be a mapping")
    expected = {f.name for f in fields(Port61State)}
    if set(state) != expected:
        raise ValueError(f"Port61State snapshot fields {sorted(state)} != {sorted(expected)}")
    control = state["control"]
    if not isinstance(control, int) or isinstance(control, bool) or control & ~CONTROL_BITS:
        raise ValueError(f"control must be an int in [0, 15], not {control!r}")
    return Port61State(control=control)
