"""The live status line: its text, when it is drawn and erased (with fakes), and
``kvm-vmm run`` on a pseudo-terminal: shown while the guest is quiet, erased before the
guest's output, absent with --quiet and when stderr is a pipe."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from test_cli import _multiboot_kernel

from kvm_vmm import layout
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.status_line import (
    ERASE,
    QUIET_SECONDS,
    RecentFunction,
    Status,
    StatusLine,
    format_status,
    machine_status,
    status_of,
)
from kvmfast.testing import assemble_program, require_kvm

# --- the text ------------------------------------------------------------------------------


def test_the_line_says_time_milestone_function_and_completions() -> None:
    status = Status(73.9, "first console byte", "__orc_find", 12345)
    assert format_status(status, 200) == (
        "kvm-vmm: 73 s  milestone: first console byte  in: __orc_find  completions: 12,345"
    )
    assert format_status(Status(0.2, None, None, 0), 200) == (
        "kvm-vmm: 0 s  milestone: none yet  in: ?  completions: 0"
    )


def test_the_line_is_cut_short_of_the_terminal_width_so_it_never_wraps() -> None:
    status = Status(5, "kernel banner", "a_very_long_function_name_indeed", 3)
    assert len(format_status(status, 40)) == 39
    assert format_status(status, 40) == format_status(status, 200)[:39]
    assert format_status(status, 0) == ""


def test_status_from_stats_takes_the_latest_milestone_and_sums_completions() -> None:
    stats: dict[str, object] = {
        "seconds": 12.5,
        "completions": {"clac": 40, "popcnt": 2},
        "milestones": [
            {"name": "first console byte", "seconds": 1.0},
            {"name": "kernel banner", "seconds": 1.2},
        ],
    }
    assert status_of(stats, "f") == Status(12.5, "kernel banner", "f", 42)
    assert status_of({"seconds": 0.0, "milestones": []}, None) == Status(0.0, None, None, 0)


class FakeKicker:
    def __init__(self) -> None:
        self.requests = 0

    def request_sample(self) -> None:
        self.requests += 1


def test_recent_function_names_what_was_sampled_since_the_last_call() -> None:
    samples: dict[int, int] = {}
    names = {0x1000: "memcpy+0x0/0x40", 0x1010: "memcpy+0x10/0x40", 0x2000: "idle+0x4/0x8"}
    kickers = [FakeKicker(), FakeKicker()]
    recent = RecentFunction(kickers, lambda: samples, names.get)
    assert recent() is None
    assert [k.requests for k in kickers] == [1, 1]
    samples.update({0x1000: 1, 0x1010: 1, 0x2000: 1})
    assert recent() == "memcpy"  # two samples in memcpy at two RIPs
    samples[0x2000] += 3  # since then: idle only, though memcpy leads in all
    assert recent() == "idle"
    assert recent() == "idle"  # no new samples (a paused guest): the last answer stays
    samples[0x3000] = 1
    assert recent() == "0x3000"  # no symbol: the RIP
    assert [k.requests for k in kickers] == [5, 5]


@pytest.mark.kvm
def test_machine_status_reads_a_running_machine(tmp_path: Path) -> None:
    """The real stats() keys and sampling: two CLACs (completed by kvmfast where the
    host's KVM cannot emulate them), then a loop the symbol file names."""
    require_kvm()
    program = assemble_program(
        ".global start, spin\nstart:\n clac\n clac\nspin:\n jmp spin\n", origin=0x100000
    )
    symbols = tmp_path / "System.map"
    symbols.write_text("".join(f"{a:016x} T {n}\n" for n, a in program.symbols.items()))
    with Machine(MachineConfig(memory_size=4 * layout.MIB)) as machine:
        machine.write_memory(0x100000, program.code)
        machine.enter(EntryState("long64", program.symbols["start"]))
        machine.load_symbols(symbols)
        status = machine_status(machine)
        machine.start()
        deadline = time.monotonic() + 20
        while (now := status()).where != "spin":
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        completions = machine.counters()["completions"]
        assert isinstance(completions, dict)
        assert now.completions == sum(completions.values())
        assert now.completions in (0, 2)  # 0 where the host's KVM runs CLAC itself
        assert now.milestone is None and now.seconds > 0


# --- drawing and erasing -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _line() -> tuple[StatusLine, int, Clock]:
    read_end, write_end = os.pipe()
    clock = Clock()
    return StatusLine(write_end, clock=clock, width=lambda: 60), read_end, clock


def _read(fd: int) -> bytes:
    data = b""
    while select.select([fd], [], [], 0)[0]:
        data += os.read(fd, 4096)
    return data


def test_the_line_is_drawn_over_itself_and_erased_before_guest_output() -> None:
    line, out, _ = _line()
    status = Status(3, None, "spin", 0)
    written: list[bytes] = []
    assert line.draw(lambda: status)
    assert line.draw(lambda: status)
    text = format_status(status, 60).encode()
    assert _read(out) == (b"\r" + text + b"\x1b[K") * 2
    line.output(b"hello\n", lambda data: written.append(_read(out) + data))
    # The erase reached the terminal before the guest's bytes were written.
    assert written == [ERASE + b"hello\n"]
    line.erase()
    assert _read(out) == b""  # nothing shown, nothing to erase


def test_the_line_waits_for_a_quiet_console_at_a_line_start() -> None:
    line, out, clock = _line()
    drawn: list[int] = []

    def status() -> Status:
        drawn.append(1)  # sampling the guest happens only for a line drawn
        return Status(1, None, None, 0)

    line.output(b"partial line", lambda data: None)
    clock.now += QUIET_SECONDS * 10
    assert not line.draw(status)  # it would overwrite "partial line"
    line.output(b" ends\n", lambda data: None)
    clock.now += QUIET_SECONDS / 2
    assert not line.draw(status)  # the guest is still talking
    clock.now += QUIET_SECONDS
    assert line.draw(status)
    assert drawn == [1]
    line.stop()  # never started: stop() still erases
    assert _read(out).endswith(ERASE)


def test_stop_ends_the_redraws_and_leaves_no_line() -> None:
    line, out, _ = _line()
    line.start(lambda: Status(1, None, None, 0))
    deadline = time.monotonic() + 10
    while b"kvm-vmm: 1 s" not in (seen := _read(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    line.stop()
    assert (seen + _read(out)).endswith(ERASE)
    time.sleep(0.7)
    assert _read(out) == b""  # the thread is gone


# --- kvm-vmm on a pseudo-terminal ----------------------------------------------------------

# Says hello, polls COM1 quietly until a byte arrives, says done, leaves through
# isa-debug-exit (status 0x20 << 1 | 1).
WAIT_FOR_KEY = """
        movl $0x90000, %esp
        movl $hello, %esi
        call print
poll:   movw $0x3fd, %dx            # LSR bit 0: data ready
        inb %dx, %al
        testb $1, %al
        jz poll
        movl $done, %esi
        call print
        jmp finish
print:  movw $0x3f8, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      ret
hello:  .asciz "hello\\n"
done:   .asciz "done\\n"
finish:
"""
STATUS = re.compile(
    rb"\rkvm-vmm: (\d+) s  milestone: first console byte  in: poll  completions: 0\x1b\[K"
)
EXIT_STATUS = 0x20 << 1 | 1


def _kernel_and_symbols(tmp_path: Path) -> tuple[Path, Path]:
    kernel = _multiboot_kernel(tmp_path, WAIT_FOR_KEY)
    symbols = tmp_path / "System.map"
    nm = subprocess.run(["nm", str(kernel)], capture_output=True, text=True, check=True)
    symbols.write_text(nm.stdout)
    return kernel, symbols


def _run_on_pty(
    tmp_path: Path, *extra: str, stderr_on_pty: bool = True
) -> tuple[bytes, str, int, bool]:
    """kvm-vmm run with stdin and stdout (and stderr unless told) on a pty: waits for the
    status line (up to 20 s) or, where none is expected, 3 s; types a key. Returns the
    pty's bytes, stderr when piped, the exit status and whether the terminal's
    attributes came back as they were."""
    kernel, symbols = _kernel_and_symbols(tmp_path)
    extra = ("--device", "isa-debug-exit,iobase=0xf4,iosize=0x4", *extra)
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    options = ["--memory", "32M", "--symbols", str(symbols), "--timeout", "60", *extra]
    process = subprocess.Popen(
        [sys.executable, "-m", "kvm_vmm.cli", "run", "--kernel", str(kernel), *options],
        stdin=slave,
        stdout=slave,
        stderr=slave if stderr_on_pty else subprocess.PIPE,
    )
    output = bytearray()
    try:
        expect_line = stderr_on_pty and "--quiet" not in extra
        deadline = time.monotonic() + (20 if expect_line else 3)
        while time.monotonic() < deadline and not (expect_line and STATUS.search(output)):
            if select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 4096)
        os.write(master, b"g")
        _, stderr = process.communicate(timeout=30)
        while select.select([master], [], [], 0.2)[0]:
            output += os.read(master, 4096)
        restored = termios.tcgetattr(slave) == before
        return bytes(output), (stderr or b"").decode(), process.returncode, restored
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)


@pytest.mark.kvm
@pytest.mark.parametrize("extra", [(), ("--profile", "100")])
def test_the_status_line_shows_while_the_guest_is_quiet_and_goes_before_its_output(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """Also beside --profile: both sample through the same kicks and counters."""
    require_kvm()
    output, _, status, restored = _run_on_pty(tmp_path, *extra)
    assert status == EXIT_STATUS, output
    assert restored
    shown = STATUS.search(output)
    assert shown is not None, output
    # Not before "hello" was written: the console was quiet for a second first.
    assert output.index(b"hello") < shown.start()
    # The guest's next output: the line erased right before it, none drawn after it.
    assert b"\r\x1b[Kdone\n" in output, output
    after = output.split(b"done\n", 1)[1]
    assert b"milestone" not in after, output
    assert b"Traceback" not in output
    if extra:
        assert re.search(rb"kvm-vmm: profile: [1-9]\d* samples", after), output
        assert b"poll" in after


@pytest.mark.kvm
def test_no_status_line_with_quiet(tmp_path: Path) -> None:
    require_kvm()
    output, _, status, _ = _run_on_pty(tmp_path, "--quiet")
    assert status == EXIT_STATUS, output
    assert b"hello\n" in output and b"done\n" in output
    assert b"milestone" not in output and b"\x1b[K" not in output, output


@pytest.mark.kvm
def test_no_status_line_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    require_kvm()
    output, stderr, status, _ = _run_on_pty(tmp_path, stderr_on_pty=False)
    assert status == EXIT_STATUS, (output, stderr)
    assert b"hello\n" in output and b"done\n" in output
    assert "milestone" not in stderr and "\x1b[K" not in stderr, stderr
    assert b"milestone" not in output and b"\x1b[K" not in output, output
