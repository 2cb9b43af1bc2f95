"""The README's first command, `kvm-vmm demo`: Debian's cloud kernel boots to a busybox
shell on our 16550A, the shell runs what is typed on stdin, and `exit` powers the
guest off (kvm-vmm then exits 0). Driven through pipes, as a user's terminal would."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
from conftest import BootFiles

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

SHELL_TIMEOUT = 900.0  # seconds to the prompt; about two and a half minutes on this host
PROMPT = b"/ # "


class Console:
    """kvm-vmm's stdout, read as it comes, and its stdin."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.seen = b""

    def wait_for(self, text: bytes, timeout: float) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout} s; console:\n{self.tail()}"
            ready, _, _ = select.select([self.process.stdout], [], [], min(left, 5))
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                assert chunk, f"kvm-vmm ended before {text!r}; console:\n{self.tail()}"
                self.seen += chunk

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def tail(self) -> str:
        return self.seen[-3000:].decode(errors="replace")


@pytest.mark.usefixtures("boots_to_init")
def test_demo_boots_to_a_shell_that_runs_commands_and_exit_powers_off(
    boot_files: BootFiles,  # the default guest's assets, fetched once for all boot tests
) -> None:
    if os.environ.get("KVM_VMM_TEST_KERNEL"):
        pytest.skip("the demo boots the default guest's own kernel, not $KVM_VMM_TEST_KERNEL")
    command = [sys.executable, "-m", "kvm_vmm.cli", "demo", "--timeout", str(SHELL_TIMEOUT + 120)]
    with subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        console = Console(process)
        try:
            console.wait_for(PROMPT, SHELL_TIMEOUT)
            console.type("echo answer=$((6*7)) cpus=$(nproc)")
            console.wait_for(b"answer=42 cpus=1", 120)
            console.type("exit")
            status = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    assert status == 0, (stderr[-3000:], console.tail())
    assert b"KVM-VMM-INIT: Linux" in console.seen
    assert "fast boot: adding" in stderr  # the demo says what it adds (never silently)
