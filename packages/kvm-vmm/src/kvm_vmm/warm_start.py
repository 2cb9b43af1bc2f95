"""The demo's warm start: a snapshot taken when the shell's prompt first appears, kept in
the cache and restored on later runs instead of booting again.

A boot here is minutes of emulated kernel code; a restore maps the memory file and
continues at the prompt. The snapshot is keyed by everything that decides what the guest
is at its prompt: the kernel's and initramfs's identity, the command line, RAM, vCPUs,
the devices, the host's facts and kvm-vmm's version; any change picks another key (an
old entry is simply never used again). A snapshot that is refused at restore (another
host, a damaged file) is set aside with a one-line note and the demo boots cold and
takes a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvm_vmm.boot import LinuxBoot, describe_boot
from kvm_vmm.serial_console import ConsoleTimeout, SerialConsole

SHELL_PROMPT = b"/ # "  # busybox sh's prompt for root in / (the default guest's /init)
FOREVER = 10.0 * 365 * 24 * 3600  # Condition.wait cannot take an infinite timeout
CACHE_SUBDIRECTORY = "snapshots"
KEPT_SNAPSHOTS = 3  # demo snapshots kept (different options, or a kvm-vmm just upgraded)


def _identity(path: Path | None) -> list[object]:
    if path is None:
        return []
    status = path.stat()
    return [str(path.absolute()), status.st_size, status.st_mtime_ns]


def warm_start_key(
    boot: LinuxBoot,
    *,
    memory_size: int,
    cpus: int,
    devices: Sequence[str],
    emulation_fallback: bool,
    host: dict[str, object],
    version: str,
) -> str:
    """A name for the snapshot of this guest at its prompt on this host."""
    facts = {
        "boot": describe_boot(boot),
        "kernel": _identity(boot.kernel),
        "initrd": _identity(boot.initrd),
        "memory_size": memory_size,
        "cpus": cpus,
        "devices": list(devices),
        "emulation_fallback": emulation_fallback,
        "host": host,
        "kvm_vmm": version,
    }
    text = json.dumps(facts, sort_keys=True, default=str)
    return "demo-" + hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class WarmStartCache:
    """Where the demo's snapshots live: ``<cache>/snapshots/<key>``."""

    directory: Path

    def path(self, key: str) -> Path:
        return self.directory / CACHE_SUBDIRECTORY / key

    def usable(self, key: str) -> Path | None:
        path = self.path(key)
        return path if path.is_dir() else None

    def discard(self, key: str) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)

    def prepare(self, key: str) -> Path:
        """Where a new snapshot for ``key`` goes; the oldest others beyond
        :data:`KEPT_SNAPSHOTS` are removed (a snapshot holds the guest's used RAM,
        tens of MiB, and one whose key no run makes again would stay for ever)."""
        path = self.path(key)
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        others = sorted(
            (entry for entry in path.parent.glob("demo-*") if entry.name != key),
            key=lambda entry: entry.stat().st_mtime_ns,
            reverse=True,
        )
        for stale in others[KEPT_SNAPSHOTS - 1 :]:
            shutil.rmtree(stale, ignore_errors=True)
        return path


class PausableMachine(Protocol):
    """What snapshot_at_prompt needs of a machine (kvm_vmm.Machine has it)."""

    @property
    def serial(self) -> SerialConsole: ...

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def snapshot(self, path: Path | str) -> None: ...


def snapshot_at_prompt(
    machine: PausableMachine,
    destination: Path,
    report: Callable[[str], None],
    prompt: bytes = SHELL_PROMPT,
) -> threading.Thread:
    """A thread that waits for ``prompt`` on the console, then pauses the machine,
    writes its snapshot to ``destination`` and resumes it; ``report`` gets one line
    saying what happened. A run that ends first leaves no snapshot."""

    def take() -> None:
        try:
            machine.serial.expect(prompt, timeout=FOREVER)
        except ConsoleTimeout:
            return  # the run ended before the prompt
        try:
            machine.pause()
        except RuntimeError:
            return  # the run ended meanwhile
        try:
            machine.snapshot(destination)
        except (OSError, ValueError, RuntimeError) as error:
            report(f"no warm-start snapshot: {error}")
        else:
            report(f"snapshot of the booted guest kept for the next run: {destination}")
        with contextlib.suppress(RuntimeError):  # the run may have been stopped meanwhile
            machine.resume()

    thread = threading.Thread(target=take, name="warm-start", daemon=True)
    thread.start()
    return thread
