"""SIGINT, SIGTERM and SIGHUP end a VMM process cleanly, in every phase.

Exit status 128 + the signal's number, as a shell reports a process a signal
ended (130, 143, 129), with the terminal restored and no traceback:

- before the guest runs (loading a kernel, building the machine), SIGTERM and
  SIGHUP raise :class:`Terminated` in the main thread, as SIGINT raises
  KeyboardInterrupt: the ``finally`` blocks that close the machine and restore
  the terminal run;
- while a machine runs or is paused, :func:`ending_run` turns SIGINT, SIGTERM
  and SIGHUP into ``machine.finish()``, as a timeout ends it (statistics, the
  vCPUs' positions); without it ``Machine.run()`` does the same for a
  KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

from kvm_vmm.machine import INTERRUPTED, STATUS_INTERRUPTED, Outcome

if TYPE_CHECKING:
    from kvm_vmm.machine import Machine

ENDING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived before a machine was running."""

    def __init__(self, number: int) -> None:
        super().__init__(f"terminated by {signal.Signals(number).name}")
        self.number = number


def status_of_signal(number: int) -> int:
    """The exit status of a process a signal ended: 128 + its number."""
    return 128 + number


def _raise_terminated(number: int, _frame: FrameType | None) -> None:
    raise Terminated(number)


@contextlib.contextmanager
def _handling(
    handler: Callable[[int, FrameType | None], None],
    numbers: tuple[signal.Signals, ...] = ENDING,
) -> Iterator[None]:
    previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def raising_terminated() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated in the main thread while the block runs."""
    with _handling(_raise_terminated):
        yield


def _outcome_of(number: int) -> Outcome:
    if number == signal.SIGINT:
        return Outcome(STATUS_INTERRUPTED, INTERRUPTED, stopped_from_outside=True)
    name = signal.Signals(number).name
    return Outcome(status_of_signal(number), f"terminated by {name}", stopped_from_outside=True)


@contextlib.contextmanager
def ending_run(machine: Machine) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end ``machine``'s run (running or paused) as a
    timeout does, with status 128 + n ("interrupted" for SIGINT, as ``run()`` says of
    a KeyboardInterrupt), while the block runs.

    The handler only writes the signal's number to a pipe; a thread of this block's
    reads it and calls ``machine.finish()``. Python runs a handler between two
    bytecodes of the main thread, which may hold any lock then (inside Event.wait() on
    the machine's finished event, or between taking a lock and entering the block that
    releases it): a handler that took one itself, or raised there, could wait forever
    with the vCPUs never kicked (seen under load).
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)

    def handler(number: int, _frame: FrameType | None) -> None:
        os.write(write_end, bytes([number]))

    def watch() -> None:
        while (data := os.read(read_end, 1)) and data[0] != 0:
            machine.finish(_outcome_of(data[0]))

    watcher = threading.Thread(target=watch, name="signal-watcher", daemon=True)
    watcher.start()
    try:
        with _handling(handler, (signal.SIGINT, *ENDING)):
            yield
    finally:
        os.write(write_end, b"\0")
        watcher.join()
        os.close(read_end)
        os.close(write_end)
