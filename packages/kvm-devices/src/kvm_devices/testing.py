"""Fakes of the device interfaces, for tests on virtual time.

They are part of the package (not of its tests) so that kvm-vmm's tests and
users' own experiments can drive a device with no VMM around it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RecordingLine:
    """An interrupt line that remembers its level and every change."""

    level: bool = False
    history: list[bool] = field(default_factory=list)
    pulses: int = 0

    def set_level(self, level: bool) -> None:
        self.level = level
        self.history.append(level)

    def pulse(self) -> None:
        self.pulses += 1
        self.history.extend((True, False))


@dataclass(eq=False)
class _VirtualTimer:
    deadline_ns: int
    callback: Callable[[], None]
    cancelled: bool = False


class VirtualClock:
    """Clock and Timer on virtual time: time moves only when a test advances it."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        self._queue: list[tuple[int, int, _VirtualTimer]] = []
        self._order = itertools.count()

    def now_ns(self) -> int:
        return self._now

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> _VirtualTimer:
        timer = _VirtualTimer(deadline_ns, callback)
        heapq.heappush(self._queue, (deadline_ns, next(self._order), timer))
        return timer

    def cancel(self, handle: object) -> None:
        if isinstance(handle, _VirtualTimer):
            handle.cancelled = True

    @property
    def pending(self) -> int:
        """How many callbacks are scheduled and not cancelled."""
        return sum(1 for _, _, t in self._queue if not t.cancelled)

    def advance(self, delta_ns: int) -> None:
        """Move time forward, running every callback due on the way, in order."""
        self.advance_to(self._now + delta_ns)

    def advance_to(self, target_ns: int) -> None:
        while self._queue and self._queue[0][0] <= target_ns:
            deadline, _, timer = heapq.heappop(self._queue)
            if timer.cancelled:
                continue
            self._now = max(self._now, deadline)
            timer.callback()
        self._now = max(self._now, target_ns)


@dataclass
class MemorySink:
    """A ByteSink that keeps everything written to it."""

    data: bytearray = field(default_factory=bytearray)

    def write_bytes(self, data: bytes) -> None:
        self.data += data


@dataclass
class QueueSource:
    """A ByteSource fed by the test."""

    pending: deque[int] = field(default_factory=deque)

    def feed(self, data: bytes) -> None:
        self.pending.extend(data)

    def read_available(self, limit: int) -> bytes:
        count = min(limit, len(self.pending))
        return bytes(self.pending.popleft() for _ in range(count))


@dataclass
class RecordingIoapicSink:
    """An IoapicSink that records routes and deliveries."""

    routes: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    deliveries: list[int] = field(default_factory=list)

    def route_changed(self, pin: int, msi_address: int, msi_data: int, masked: bool) -> None:
        self.routes[pin] = (msi_address, msi_data, masked)

    def deliver(self, pin: int) -> None:
        self.deliveries.append(pin)


@dataclass
class FakeVirtioBackend:
    """A VirtioBackend that records the transport's calls; its configuration is bytes."""

    device_type: int = 2
    num_queues: int = 2
    max_queue_size: int = 256
    device_features: int = 1 << 32
    config: bytearray = field(default_factory=lambda: bytearray(range(1, 9)))
    needs_reset: bool = False
    # activate() raises ValueError (a ring outside guest RAM, says the real device).
    refuse_activation: bool = False
    # Called from inside activate(), before it answers: lets a test act mid-call.
    during_activate: Callable[[], None] | None = None
    calls: list[tuple[object, ...]] = field(default_factory=list)

    @property
    def config_size(self) -> int:
        return len(self.config)

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset >= 0 and offset + size <= len(self.config):
            self.config[offset : offset + size] = value.to_bytes(size, "little")

    def activate(self, driver_features: int, queues: list[tuple[int, int, int, int, bool]]) -> None:
        self.calls.append(("activate", driver_features, list(queues)))
        if self.during_activate is not None:
            self.during_activate()
        if self.refuse_activation:
            raise ValueError("queue 0's ring is outside guest RAM")

    def reset(self) -> None:
        self.calls.append(("reset",))

    def notify(self, queue: int) -> None:
        self.calls.append(("notify", queue))


@dataclass
class RecordingVirtioSink:
    """A VirtioInterruptSink that keeps the INTx level and every call."""

    intx_level: bool = False
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def intx(self, asserted: bool) -> None:
        self.intx_level = asserted
        self.calls.append(("intx", asserted))

    def msix_vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.calls.append(("vector", vector, address, data, masked))

    def msix_fire(self, vector: int) -> None:
        self.calls.append(("fire", vector))

    def bindings_changed(self) -> None:
        self.calls.append(("bindings",))
