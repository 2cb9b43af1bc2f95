"""A boot's milestones, timed as they pass on the serial console.

The console is the one output every guest has, so the milestones are read
from it: the first byte, the kernel's banner, "Run /init as init process", our
/init's first line. The sink passes every byte on unchanged; a pattern split
across writes is still found (the UART hands over one byte at a time).
Events that are not console text (the power-off) are marked by the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvm_devices.interfaces import ByteSink
from kvm_vmm.initramfs import INIT_REACHED_MARKER

FIRST_CONSOLE_BYTE = "first console byte"
POWER_OFF = "power-off"


@dataclass(frozen=True)
class ConsolePattern:
    name: str
    text: bytes


LINUX_MILESTONES = (
    ConsolePattern("kernel banner", b"Linux version "),
    # pr_info in init/main.c: not printed under "quiet"; our /init's line is.
    ConsolePattern("Run /init", b"Run /init as init process"),
    ConsolePattern("/init started", INIT_REACHED_MARKER.encode()),
    ConsolePattern("kernel panic", b"Kernel panic - not syncing"),
)


@dataclass(frozen=True)
class Milestone:
    name: str
    seconds: float  # since the run started


@dataclass
class MilestoneSink:
    """A ByteSink that times console milestones on their way to ``inner``."""

    inner: ByteSink
    patterns: tuple[ConsolePattern, ...] = LINUX_MILESTONES
    clock: Callable[[], float] = time.monotonic
    reached: dict[str, float] = field(default_factory=dict)
    _tail: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write_bytes(self, data: bytes) -> None:
        with self._lock:
            if data and FIRST_CONSOLE_BYTE not in self.reached:
                self.reached[FIRST_CONSOLE_BYTE] = self.clock()
            self._scan(data)
        self.inner.write_bytes(data)

    def _scan(self, data: bytes) -> None:
        longest = max((len(p.text) for p in self.patterns), default=0)
        self._tail += data
        for pattern in self.patterns:
            if pattern.name not in self.reached and pattern.text in self._tail:
                self.reached[pattern.name] = self.clock()
        # Keep just enough to find a pattern that the next write completes.
        del self._tail[: max(len(self._tail) - (longest - 1), 0)]

    def mark(self, name: str) -> None:
        """Record an event seen elsewhere (the first time only)."""
        with self._lock:
            self.reached.setdefault(name, self.clock())

    def milestones(self, started: float) -> list[Milestone]:
        """Every milestone reached, in time order, in seconds since ``started``."""
        with self._lock:
            ordered = sorted(self.reached.items(), key=lambda item: item[1])
        return [Milestone(name, round(when - started, 3)) for name, when in ordered]

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()
