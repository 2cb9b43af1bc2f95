"""SIGINT, SIGTERM and SIGHUP end a VMM process cleanly, in every phase.

Exit status 128 + the signal's number, as a shell reports a process a signal
ended (130, 143, 129), with the terminal restored and no traceback:

- before the guest runs (loading a kernel, building the machine), SIGTERM and
  SIGHUP raise :class:`Terminated` in the main thread, as SIGINT raises
  KeyboardInterrupt: the ``finally`` blocks that close the machine and restore
  the terminal run;
- while a machine runs or is paused, :func:`ending_run` turns SIGTERM and
  SIGHUP into ``machine.finish()``, as a timeout ends it (statistics, the vCPUs'
  positions), and ``Machine.run()`` does the same for Ctrl-C (SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

from kvm_vmm.machine import Outcome

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
def _handling(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {number: signal.signal(number, handler) for number in ENDING}
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


@contextlib.contextmanager
def ending_run(machine: Machine) -> Iterator[None]:
    """SIGTERM and SIGHUP end ``machine``'s run (running or paused) as a timeout
    does, with status 128 + n, while the block runs."""

    def stop(number: int, _frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        machine.finish(
            Outcome(status_of_signal(number), f"terminated by {name}", stopped_from_outside=True)
        )

    with _handling(stop):
        yield
