"""A sampling profiler of guest code: where the vCPUs spend their time.

A thread asks every vCPU, ``hz`` times a second, to leave the guest once and
record its RIP (kvmfast's ``VcpuKicker.request_sample``); at the end the samples
are grouped by the function a symbol file names (``--symbols``), else by RIP.
On hosts where KVM emulates guest kernel code this is how one finds what a boot
spends its minutes on (docs/linux-boot.md). Each sample costs one exit.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kvmfast

DEFAULT_HZ = 200.0
MAX_PROFILE_HZ = 10_000.0  # each sample is an exit (~10 us here): beyond this, all exits


@dataclass(frozen=True)
class ProfileLine:
    where: str  # a function name, or a RIP in hex where no symbol names it
    samples: int
    share: float  # of all samples, 0..1


class GuestProfiler:
    """Samples every vCPU's RIP ``hz`` times a second while started."""

    def __init__(self, kickers: Sequence[kvmfast.VcpuKicker], hz: float = DEFAULT_HZ) -> None:
        if not 0 < hz <= MAX_PROFILE_HZ:
            raise ValueError(f"profile rate {hz} Hz: between 0 and {MAX_PROFILE_HZ:g}")
        self._kickers = list(kickers)
        self._period = 1.0 / hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="guest-profiler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _tick(self) -> None:
        while not self._stop.wait(self._period):
            for kicker in self._kickers:
                kicker.request_sample()


def function_of(description: str | None) -> str | None:
    """ "name+0xoff/0xsize" (kvmfast's describe_address) -> "name"."""
    if description is None:
        return None
    return description.split("+", 1)[0]


def summarize(
    samples: dict[int, int], describe: Callable[[int], str | None], top: int = 25
) -> list[ProfileLine]:
    """The ``top`` functions (or RIPs) by samples, most first."""
    by_function: Counter[str] = Counter()
    for rip, count in samples.items():
        by_function[function_of(describe(rip)) or f"{rip:#x}"] += count
    total = sum(by_function.values())
    return [
        ProfileLine(where, count, count / total) for where, count in by_function.most_common(top)
    ]
