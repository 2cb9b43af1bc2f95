"""One live status line on a terminal's stderr while the guest runs.

A Linux boot takes minutes on hosts where KVM emulates guest kernel code, and
its console stays silent for the first ~two of them: this line says the guest
is alive and where it is, e.g.
``kvm-vmm: 73 s  milestone: kernel banner  in: __orc_find  completions: 12,345``.

It is drawn only on a terminal (never into pipes or files) and only where it
cannot mix with the guest's own output: while the console has been quiet for a
moment and the guest's last byte ended a line. The console's sink erases it
before any guest byte reaches the terminal (:meth:`StatusLine.guard`), under the
same lock as the redraw, so the two never interleave mid-line.

"in:" comes from the profiler's machinery: each redraw asks every vCPU for one
RIP sample (``VcpuKicker.request_sample``) and names the function sampled most
since the previous redraw (``--profile``'s samples count too: they are samples
of the same guest).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvm_devices.interfaces import ByteSink
from kvm_vmm.profiler import summarize

if TYPE_CHECKING:
    from kvm_vmm.machine import Machine

ERASE = b"\r\x1b[K"  # to column 0, then clear to the end of the line (ECMA-48 EL)
REDRAW_SECONDS = 0.5
# The guest's output pauses between bursts: wait this long before drawing over a quiet console.
QUIET_SECONDS = 1.0
FALLBACK_WIDTH = 80


@dataclass(frozen=True)
class Status:
    seconds: float  # since the run started
    milestone: str | None  # the latest one reached
    where: str | None  # a function name or a RIP in hex
    completions: int  # instructions the host's KVM could not emulate, completed by kvmfast


def format_status(status: Status, width: int) -> str:
    """The line, cut to ``width - 1`` columns: a line that wrapped could not be erased."""
    text = (
        f"kvm-vmm: {int(status.seconds)} s"
        f"  milestone: {status.milestone or 'none yet'}"
        f"  in: {status.where or '?'}"
        f"  completions: {status.completions:,}"
    )
    return text[: max(width - 1, 0)]


class Sampler(Protocol):
    def request_sample(self) -> None: ...


class RecentFunction:
    """Where the guest was most often since the previous call, from RIP samples."""

    def __init__(
        self,
        kickers: Sequence[Sampler],
        samples: Callable[[], Mapping[int, int]],
        describe: Callable[[int], str | None],
    ) -> None:
        self._kickers = kickers
        self._samples = samples
        self._describe = describe
        self._seen: dict[int, int] = {}
        self._last: str | None = None

    def __call__(self) -> str | None:
        """The answer from the samples that arrived since the last call (the previous
        answer when none did, e.g. while the vCPUs are paused), then one more request
        per vCPU for the next call."""
        now = dict(self._samples())
        fresh = {rip: n - self._seen.get(rip, 0) for rip, n in now.items()}
        self._seen = now
        top = summarize({rip: n for rip, n in fresh.items() if n > 0}, self._describe, top=1)
        if top:
            self._last = top[0].where
        for kicker in self._kickers:
            kicker.request_sample()
        return self._last


def status_of(stats: Mapping[str, object], where: str | None) -> Status:
    """A Status from Machine.stats()'s dict."""
    seconds = stats.get("seconds", 0.0)
    completions = stats.get("completions", {})
    milestones = stats.get("milestones", [])
    latest = None
    if isinstance(milestones, list) and milestones and isinstance(milestones[-1], dict):
        latest = str(milestones[-1].get("name"))
    total = sum(completions.values()) if isinstance(completions, dict) else 0
    elapsed = float(seconds) if isinstance(seconds, (int, float)) else 0.0
    return Status(elapsed, latest, where, total)


def machine_status(machine: Machine) -> Callable[[], Status]:
    """The status of a machine's run, sampling its vCPUs once per call."""
    where = RecentFunction(machine.kickers, machine.vm.rip_samples, machine.vm.describe_address)
    return lambda: status_of(machine.stats(), where())


class StatusLine:
    """The line on ``fd`` (a terminal), redrawn by a thread between start() and stop()."""

    def __init__(
        self,
        fd: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] | None = None,
    ) -> None:
        self._fd = fd
        self._clock = clock
        self._width = width if width is not None else self._terminal_width
        self._lock = threading.Lock()
        self._shown = False
        self._at_line_start = True  # the guest's last byte on the terminal ended a line
        self._last_output = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _terminal_width(self) -> int:
        try:
            return os.get_terminal_size(self._fd).columns or FALLBACK_WIDTH
        except OSError:
            return FALLBACK_WIDTH

    def guard(self, sink: ByteSink) -> ByteSink:
        """``sink`` (writing to the same terminal) erasing the line before each write."""
        return _ErasingSink(sink, self)

    def output(self, data: bytes, write: Callable[[bytes], None]) -> None:
        """Guest output: erase the line, then ``write``, with no redraw in between."""
        with self._lock:
            self._erase_locked()
            write(data)
            if data:
                self._at_line_start = data.endswith(b"\n")
                self._last_output = self._clock()

    def draw(self, status: Callable[[], Status]) -> bool:
        """Draw the line if the console lets it (quiet, at a line start); True if drawn.
        ``status`` is called only then: it samples the guest."""
        with self._lock:
            if not self._at_line_start or self._clock() - self._last_output < QUIET_SECONDS:
                return False
            text = format_status(status(), self._width())
            self._write(b"\r" + text.encode(errors="replace") + b"\x1b[K")
            self._shown = True
            return True

    def erase(self) -> None:
        with self._lock:
            self._erase_locked()

    def _erase_locked(self) -> None:
        if self._shown:
            self._write(ERASE)
            self._shown = False

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a terminal gone (hung up) takes no status line
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def start(self, status: Callable[[], Status]) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._redraw, args=(status,), name="kvm-vmm-status", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """No more redraws, and the line erased."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.erase()

    def _redraw(self, status: Callable[[], Status]) -> None:
        while not self._stop.wait(REDRAW_SECONDS):
            self.draw(status)


@dataclass
class _ErasingSink:
    inner: ByteSink
    status: StatusLine

    def write_bytes(self, data: bytes) -> None:
        self.status.output(data, self.inner.write_bytes)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


def terminal_status_line(fd: int, enabled: bool) -> StatusLine | None:
    """A StatusLine on ``fd`` if enabled and ``fd`` is a terminal, else None."""
    return StatusLine(fd) if enabled and os.isatty(fd) else None


@contextlib.contextmanager
def showing(line: StatusLine | None, status: Callable[[], Status]) -> Iterator[None]:
    """The line redrawn while the block runs, erased however it ends."""
    if line is None:
        yield
        return
    line.start(status)
    try:
        yield
    finally:
        line.stop()
