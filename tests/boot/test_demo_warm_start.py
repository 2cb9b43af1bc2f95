"""`kvm-vmm demo` as a person runs it, twice: the first run boots the default guest and
keeps a snapshot of it at its shell's prompt; the second restores that snapshot and its
shell answers at once (issue 17). The first run also serves the control API socket,
through which `kvm-vmm remote` pauses the guest, snapshots it, resumes and stops it;
`kvm-vmm restore` then continues that snapshot in a new process.

One boot; everything after it is restored."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import KERNEL_ENV, boot_timeout

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

ANSWER_SECONDS = 60.0  # a command answers in seconds here; a boot takes minutes
PROMPT = re.compile(rb"/ # ")
KVM_VMM = [sys.executable, "-m", "kvm_vmm.cli"]


class ConsoleProcess:
    """A kvm-vmm command whose guest console is its stdin and stdout (pipes)."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [*KVM_VMM, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.output = bytearray()
        self.errors = bytearray()
        self._cursor = 0
        self._changed = threading.Condition()
        for stream, into in (
            (self.process.stdout, self.output),
            (self.process.stderr, self.errors),
        ):
            threading.Thread(target=self._pump, args=(stream, into), daemon=True).start()

    def _pump(self, stream: object, into: bytearray) -> None:
        while chunk := os.read(stream.fileno(), 4096):  # type: ignore[attr-defined]
            with self._changed:
                into.extend(chunk)
                self._changed.notify_all()

    def expect(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = pattern.search(bytes(self.output), self._cursor)
                if match is not None:
                    self._cursor = match.end()
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(
                        f"no {pattern.pattern!r} in {timeout} s; stderr:"
                        f" {bytes(self.errors[-2000:])!r}; console: {bytes(self.output[-3000:])!r}"
                    )
                self._changed.wait(min(remaining, 1.0))

    def stderr_has(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (match := re.search(pattern, self.errors.decode(errors="replace"))) is None:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(f"no {pattern!r} on stderr: {bytes(self.errors)!r}")
                self._changed.wait(1.0)
            return match

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def ask(self, command: str, answer: str) -> re.Match[bytes]:
        self.type(command)
        return self.expect(re.compile(answer.encode()), ANSWER_SECONDS)

    def clock(self) -> tuple[int, int]:
        """The guest's date (s) and its local APIC timer interrupts so far."""
        found = self.ask(
            "echo date=$(date +%s) ticks=$(grep LOC: /proc/interrupts)",
            r"date=(\d+) ticks=LOC: (\d+)[^\r\n]*\r?\n",
        )
        return int(found.group(1)), int(found.group(2))

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def remote(socket: Path, *command: str) -> dict[str, object]:
    result = subprocess.run(
        [*KVM_VMM, "remote", "--api-socket", str(socket), *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    reply = json.loads(result.stdout) if result.stdout.strip() else {}
    assert isinstance(reply, dict)
    return reply


@pytest.mark.usefixtures("boots_to_init")
def test_the_demo_boots_once_and_then_starts_at_its_prompt(tmp_path: Path) -> None:
    if os.environ.get(KERNEL_ENV):
        pytest.skip("the demo boots the default guest's own kernel, not $KVM_VMM_TEST_KERNEL")
    socket, taken = tmp_path / "api.sock", tmp_path / "taken-through-the-api"

    # The first run: a boot (--cold, whatever an earlier run left in the cache), and a
    # snapshot at the first prompt.
    cold = ConsoleProcess(["demo", "--cold", "--quiet", "--verbose", "--api-socket", str(socket)])
    cold.expect(PROMPT, boot_timeout())
    cold.stderr_has(r"snapshot of the booted guest kept for the next run: \S+", 120)
    before, ticks_before = cold.clock()
    assert remote(socket, "info")["state"] == "running"
    assert remote(socket, "pause")["state"] == "paused"
    remote(socket, "snapshot", str(taken))
    assert remote(socket, "info")["state"] == "paused"
    assert remote(socket, "resume")["state"] == "running"
    counters = remote(socket, "counters")
    assert isinstance(counters["exits"], dict) and counters["exits"]
    cold.ask("echo still=$((6*7))", r"still=42")  # the guest ran on after the snapshot
    remote(socket, "stop")
    assert cold.finish(60) == 0
    assert not socket.exists()

    # The second run: restored, its prompt back at once; its clock and timer run on.
    started = time.monotonic()
    warm = ConsoleProcess(["demo", "--quiet"])
    warm.ask("echo warm=$((6*7))", r"warm=42")
    answered = time.monotonic() - started
    restored = warm.stderr_has(r"restored from its snapshot in (\d+) ms", 10)
    after, ticks_after = warm.clock()
    time.sleep(2)
    later, ticks_later = warm.clock()
    assert before <= after <= later and later > before, (before, after, later)
    assert ticks_before < ticks_later and ticks_after < ticks_later
    warm.type("exit")  # the demo's /init powers off when its shell exits
    assert warm.finish(60) == 0
    print(
        f"warm demo: answered {answered:.2f} s after the command started (restore {restored[1]} ms)"
    )
    assert answered < ANSWER_SECONDS  # a boot takes minutes on a host like this

    # The API's snapshot, in a new process: the shell answers (a newline: a new prompt).
    again = ConsoleProcess(["restore", str(taken), "--quiet"])
    again.ask("", PROMPT.pattern.decode())
    again.ask("echo restored=$((6*7))", r"restored=42")
    again.type("exit")
    assert again.finish(60) == 0
