"""The command-level half of ``python -m kvm_vmm.bench_snapshot``: new processes that
restore a snapshot, timed from spawn to exit, and the demo's warm start, timed from
spawn to its shell answering a command.

A process's time is mostly the interpreter starting and importing kvm-vmm; the floor
is a process that does only that (``import kvm_vmm.machine``), spawned in the same run.
The restoring child also prints CLOCK_MONOTONIC (system-wide: comparable with the
parent's ``time.monotonic()``) at each step, which splits its time into startup,
imports, restore and the run to the guest's debug exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvm_vmm.warm_start import CACHE_SUBDIRECTORY

# Machine.restore() and a run in a new process; argv[1] is the snapshot, argv[2] "copy"
# or "private". Timestamps go to stdout as one JSON line.
RESTORE_SCRIPT = """\
import json, sys, time
began = time.monotonic()
from kvm_vmm.machine import Machine
imported = time.monotonic()
machine = Machine.restore(sys.argv[1], copy=sys.argv[2] == "copy")
restored = time.monotonic()
outcome = machine.run(timeout=float(sys.argv[3]))
ran = time.monotonic()
machine.close()
print(json.dumps({"began": began, "imported": imported, "restored": restored, "ran": ran}))
sys.exit(outcome.status)
"""
FLOOR_SCRIPT = "import kvm_vmm.machine"
CHILD_TIMEOUT = 120.0  # a restore that needs longer has failed
NO_DEMO_SNAPSHOT = "no demo snapshot; run kvm-vmm demo once"  # under the key "skipped"
DEMO_COMMAND = "echo ok\n"
DEMO_ANSWER = re.compile(rb"(?m)^ok\r?$")  # the echo's output, not the echoed command line
QUIT = b"\x01x"  # Ctrl-A x: the console's quit (kvm_vmm.console)
RETYPE_SECONDS = 0.2  # the command is typed again until answered: early bytes may be lost


@dataclass(frozen=True)
class Spawned:
    """One child process: seconds from spawn to exit, its exit status, its output."""

    seconds: float
    status: int
    stdout: str
    stderr: str


def spawn_timed(argv: Sequence[str], timeout: float = CHILD_TIMEOUT) -> Spawned:
    """Run ``argv`` to its end; a child still running after ``timeout`` is killed
    (status -9)."""
    began = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        return Spawned(time.monotonic() - began, -signal.SIGKILL, "", _text(expired.stderr))
    return Spawned(time.monotonic() - began, done.returncode, done.stdout, done.stderr)


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def floor_command() -> list[str]:
    return [sys.executable, "-c", FLOOR_SCRIPT]


def script_command(snapshot: Path, copy: bool, run_timeout: float) -> list[str]:
    mode = "copy" if copy else "private"
    return [sys.executable, "-c", RESTORE_SCRIPT, str(snapshot), mode, str(run_timeout)]


def cli_command(snapshot: Path) -> list[str]:
    return [sys.executable, "-m", "kvm_vmm.cli", "restore", str(snapshot), "--serial", "null"]


def cli_has_restore() -> bool:
    """Whether this kvm-vmm has the ``restore`` command (its ``--help`` succeeds)."""
    help_run = spawn_timed([sys.executable, "-m", "kvm_vmm.cli", "restore", "--help"])
    return help_run.status == 0


def script_steps(spawned: Spawned, began: float) -> dict[str, float] | None:
    """The restoring child's steps in seconds, from its timestamps and the parent's
    ``began`` (just before the spawn): the interpreter's startup, the imports,
    Machine.restore(), the run to the debug exit, then closing and exiting (until the
    parent saw the exit); and spawn to the debug exit, the issue's "command start to
    the guest's first instruction"."""
    try:
        stamps = json.loads(spawned.stdout.strip().splitlines()[-1])
        stamped = [float(stamps[key]) for key in ("began", "imported", "restored", "ran")]
    except (IndexError, ValueError, KeyError, TypeError):
        return None
    points = [began, *stamped]
    names = ("startup", "import", "restore", "start_to_debug_exit")
    steps = {
        name: after - before
        for name, before, after in zip(names, points[:-1], points[1:], strict=True)
    }
    steps["close_and_exit"] = began + spawned.seconds - points[-1]
    steps["spawn_to_debug_exit"] = points[-1] - began
    return steps


# -- the demo's warm start -------------------------------------------------------------


def demo_snapshots(cache_dir: Path | None) -> list[Path]:
    """The demo's warm-start snapshots in the cache (kvm_vmm.warm_start's layout)."""
    if cache_dir is None:
        return []
    directory = cache_dir / CACHE_SUBDIRECTORY
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("demo-*") if path.is_dir())


@dataclass
class _Answer:
    """What the demo's reader thread saw: its output, and when the answer came."""

    output: bytearray = field(default_factory=bytearray)
    answered_at: float | None = None
    seen: threading.Event = field(default_factory=threading.Event)


def _read_output(fd: int, answer: _Answer) -> None:
    while chunk := os.read(fd, 65536):
        answer.output += chunk
        if answer.answered_at is None and DEMO_ANSWER.search(answer.output):
            answer.answered_at = time.monotonic()
            answer.seen.set()
    answer.seen.set()  # the demo ended


def demo_command() -> list[str]:
    return [sys.executable, "-m", "kvm_vmm.cli", "demo"]


def demo_warm_start(
    cache_dir: Path | None, timeout: float, argv: Sequence[str] | None = None
) -> dict[str, object]:
    """Spawn ``argv`` (``kvm-vmm demo``), type ``echo ok`` until its shell answers;
    seconds from spawn to the answer. Without a demo snapshot in the cache: skipped.
    The demo is then quit (Ctrl-A x; terminated if it does not go)."""
    snapshots = demo_snapshots(cache_dir)
    if not snapshots:
        return {"skipped": NO_DEMO_SNAPSHOT}
    argv = demo_command() if argv is None else list(argv)
    answer = _Answer()
    with tempfile.TemporaryFile() as errors:
        began = time.monotonic()
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
        ) as child:
            assert child.stdout is not None
            reader = threading.Thread(
                target=_read_output, args=(child.stdout.fileno(), answer), daemon=True
            )
            reader.start()
            try:
                while not answer.seen.wait(RETYPE_SECONDS) and time.monotonic() - began < timeout:
                    _type(child, DEMO_COMMAND.encode())
            finally:
                _quit(child)
                reader.join(timeout=10)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    report: dict[str, object] = {
        "command": ["python", *argv[1:]],
        "snapshots_in_cache": [path.name for path in snapshots],
        "typed": DEMO_COMMAND.strip(),
        "retyped_every_s": RETYPE_SECONDS,
        "stderr_tail": stderr.strip().splitlines()[-5:],
    }
    if answer.answered_at is None:
        report["error"] = (
            f"no answer within {timeout} s (did the demo boot cold? its snapshot may not"
            " fit this kvm-vmm or host)"
        )
    else:
        report["spawn_to_answer_s"] = round(answer.answered_at - began, 3)
    return report


def _type(child: subprocess.Popen[bytes], data: bytes) -> None:
    assert child.stdin is not None
    with contextlib.suppress(BrokenPipeError, ValueError):  # the demo ended: the loop sees it
        child.stdin.write(data)
        child.stdin.flush()


def _quit(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        _type(child, QUIT)
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if child.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            child.stdin.close()
