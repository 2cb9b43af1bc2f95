"""COM1 as an object for scripts: wait for output, type input, read the transcript.

The UART's output goes through :class:`SerialConsole` on its way to the
machine's console sink: it keeps a transcript, wakes scripts waiting in
:meth:`SerialConsole.expect`, and times the boot's milestones with
kvm_vmm.milestones' scanner. Input goes to the UART's receive path, as typed
keys would. The vCPU thread writes; any other thread may wait and read.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable

from kvm_vmm.milestones import Milestone, MilestoneSink

TAIL_BYTES = 512  # how much of the console a timeout shows
# The UART hands over one byte per guest OUT: a woken waiter lets a few gather before
# searching the transcript again, so waiting costs little more than the output itself.
GATHER_SECONDS = 0.002


class ConsoleTimeout(TimeoutError):
    """expect() found no match in time, or the run ended first. The message ends with
    the console's last bytes; ``tail`` holds them."""

    def __init__(self, message: str, tail: bytes) -> None:
        super().__init__(message)
        self.tail = tail


class SerialConsole:
    """The serial console of a machine: a ByteSink for the UART, and its input."""

    def __init__(self, milestones: MilestoneSink) -> None:
        self._milestones = milestones
        self._data = bytearray()
        self._cursor = 0  # where the next expect() starts looking
        self._ended: str | None = None
        self._cond = threading.Condition()
        self._receive: Callable[[bytes], None] | None = None

    def connect(self, receive: Callable[[bytes], None]) -> None:
        """The UART's receive path (the machine connects it once the UART exists)."""
        self._receive = receive

    # -- the UART's side -------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            self._cond.notify_all()
        self._milestones.write_bytes(data)

    def end(self, reason: str) -> None:
        """The run ended: a waiting expect() stops waiting for more output."""
        with self._cond:
            if self._ended is None:
                self._ended = reason
            self._cond.notify_all()

    # -- the script's side -----------------------------------------------------------

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 30.0) -> re.Match[bytes]:
        """The first match of ``pattern`` (bytes: literally; a compiled pattern: as a
        regular expression) in the output after the previous expect()'s match, waiting
        up to ``timeout`` seconds for it. Match positions are offsets in transcript().
        Raises ConsoleTimeout when none came in time or the run ended without one.
        The output is searched as it arrives: end a pattern with a delimiter (such as
        ``\\r?\\n``) where an open-ended repeat would otherwise match a partial word."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                match = regex.search(bytes(self._data), self._cursor)
                if match is not None:
                    self._cursor = match.end()
                    return match
                seen = len(self._data)
                why = None if self._ended is None else f"the run ended ({self._ended})"
                remaining = deadline - time.monotonic()
                if why is None and remaining <= 0:
                    why = f"{timeout} s passed"
                if why is not None:
                    raise self._timeout(regex, why)
                self._cond.wait_for(functools.partial(self._changed_since, seen), remaining)
            time.sleep(GATHER_SECONDS)

    def _changed_since(self, seen: int) -> bool:
        return len(self._data) != seen or self._ended is not None

    def _timeout(self, regex: re.Pattern[bytes], why: str) -> ConsoleTimeout:
        tail = bytes(self._data[-TAIL_BYTES:])
        shown = tail.decode("utf-8", "replace")
        return ConsoleTimeout(
            f"no match for {regex.pattern!r} on the console: {why}; "
            f"its last {len(tail)} bytes:\n{shown}",
            tail,
        )

    def write(self, data: bytes) -> None:
        """Input for the guest, on the UART's receive path (never blocks or drops)."""
        if self._receive is None:
            raise RuntimeError("the serial console is not connected to a UART")
        self._receive(data)

    def transcript(self) -> bytes:
        """Everything the guest has written to the port so far."""
        with self._cond:
            return bytes(self._data)

    # -- milestones --------------------------------------------------------------------

    def mark(self, name: str) -> None:
        """Record an event seen elsewhere (the power-off) among the milestones."""
        self._milestones.mark(name)

    def milestones(self, started: float) -> list[Milestone]:
        return self._milestones.milestones(started)
