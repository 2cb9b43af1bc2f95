"""The real-time implementation of kvm-devices' Clock and Timer interfaces.

One thread serves every timer of a machine: it sleeps on a condition variable
until the earliest deadline, so an idle machine costs nothing. The clock is
CLOCK_MONOTONIC less the time spent paused: while a machine is paused its
devices' time stands still and no timer fires, so a resumed device continues
where it was (a PIT's count, a deadline 5 ms away stays 5 ms away).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Scheduled:
    deadline_ns: int
    callback: Callable[[], None]
    cancelled: bool = False


@dataclass
class TimerThread:
    """Clock (``now_ns``) and Timer (``schedule``/``cancel``) on CLOCK_MONOTONIC.

    Callbacks run on the timer thread, one at a time. An exception raised by a
    callback is kept in ``errors`` (and the thread goes on): a device bug must
    not silently stop every other timer of the machine.
    """

    name: str = "kvm-vmm-timers"
    errors: list[BaseException] = field(default_factory=list)
    _queue: list[tuple[int, int, _Scheduled]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _stopping: bool = False
    _paused_at_ns: int | None = None  # CLOCK_MONOTONIC when pause() froze the clock
    _paused_total_ns: int = 0
    _in_callback: bool = False

    def now_ns(self) -> int:
        with self._cond:
            return self._now_locked()

    def _now_locked(self) -> int:
        host = time.monotonic_ns() if self._paused_at_ns is None else self._paused_at_ns
        return host - self._paused_total_ns

    def pause(self) -> None:
        """Freeze the clock; returns once no callback is running (none starts until
        resume()). From a callback itself it does not wait for that callback."""
        with self._cond:
            if self._paused_at_ns is None:
                self._paused_at_ns = time.monotonic_ns()
            if self._thread is threading.current_thread():
                return
            while self._in_callback:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            if self._paused_at_ns is not None:
                self._paused_total_ns += time.monotonic_ns() - self._paused_at_ns
                self._paused_at_ns = None
                self._cond.notify_all()

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused_at_ns is not None

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> _Scheduled:
        entry = _Scheduled(deadline_ns, callback)
        with self._cond:
            heapq.heappush(self._queue, (deadline_ns, next(self._order), entry))
            if self._queue[0][2] is entry:
                self._cond.notify_all()
        return entry

    def cancel(self, handle: object) -> None:
        if isinstance(handle, _Scheduled):
            handle.cancelled = True

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _next_due(self) -> _Scheduled | None:
        """Wait until the earliest callback is due (and the clock runs); None when
        stopping. The callback returned counts as running until _done()."""
        with self._cond:
            self._in_callback = False
            self._cond.notify_all()
            while not self._stopping:
                while self._queue and self._queue[0][2].cancelled:
                    heapq.heappop(self._queue)
                if not self._queue or self._paused_at_ns is not None:
                    self._cond.wait()
                    continue
                wait_ns = self._queue[0][0] - self._now_locked()
                if wait_ns <= 0:
                    self._in_callback = True
                    return heapq.heappop(self._queue)[2]
                self._cond.wait(wait_ns / 1e9)
            return None

    def _serve(self) -> None:
        while (entry := self._next_due()) is not None:
            if entry.cancelled:
                continue
            try:
                entry.callback()
            except Exception as error:
                self.errors.append(error)
