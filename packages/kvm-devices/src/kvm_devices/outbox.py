"""The devices' lock rule, in one place: no call out of a device under its own lock.

A device changes its state under its lock and *posts* what it must tell the outside
(an interrupt line level, an IOAPIC route or delivery, output bytes, a gate) to its
:class:`Outbox`; after releasing the lock it *flushes* the outbox. Calls leave in the
order they were posted, made by one thread at a time: a thread that finds another one
flushing leaves its calls to it, so an interrupt controller always ends at the level of
the last change. A call may re-enter the device (it holds no lock of the device then);
what that posts is made by the same flush loop. See docs/architecture.md, "Device locks".
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class Outbox:
    """Calls posted under a device's lock, made after it is released, in order."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._calls: deque[Callable[[], None]] = deque()
        self._flushing = False

    def post(self, call: Callable[[], None]) -> None:
        """Queue ``call``; the caller holds the device's lock."""
        self._calls.append(call)

    def flush(self) -> None:
        """Make the queued calls, unless another thread is already making them.

        The caller must not hold the device's lock.
        """
        with self._lock:
            if self._flushing:
                return
            self._flushing = True
        try:
            while True:
                with self._lock:
                    if not self._calls:
                        self._flushing = False
                        return
                    call = self._calls.popleft()
                call()
        except BaseException:
            with self._lock:
                self._flushing = False
            raise
