"""The kvm-vmm command: the demo guest end to end, clear errors for bad input, and the
console escape (Ctrl-A x, Ctrl-A Ctrl-A) typed on a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from kvm_vmm.cli import UsageError, parse_size
from kvm_vmm.console import FileSink, open_serial_sink
from kvmfast.testing import require_kvm


def kvm_vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.kvm
def test_demo_prints_on_the_serial_port_counts_pit_ticks_and_powers_off(tmp_path: Path) -> None:
    require_kvm()
    serial = tmp_path / "serial.txt"
    result = kvm_vmm("demo", "--tiny", "--serial", f"file:{serial}", "--stats")
    assert result.returncode == 0, result.stderr
    text = serial.read_text()
    assert "Hello from a split-irqchip guest" in text
    assert "10 PIT ticks arrived through our IOAPIC" in text
    assert '"outcome": "guest powered off"' in result.stderr


@pytest.mark.kvm
def test_isa_debug_exit_status_is_qemus(tmp_path: Path) -> None:
    """A Multiboot kernel writing 0x20 to isa-debug-exit ends kvm-vmm with (0x20 << 1) | 1."""
    require_kvm()
    result = _run_with_debug_exit(_multiboot_kernel(tmp_path, ""))
    assert result.returncode == (0x20 << 1) | 1, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--kernel", "/nonexistent/vmlinuz"], "/nonexistent/vmlinuz"),
        (["run", "--kernel", "/dev/null"], "kernel"),
        (["run", "--kernel", "/dev/null", "--memory", "lots"], "size 'lots'"),
        (["demo", "--tiny", "--serial", "tcp:1234"], "--serial"),
        (["demo", "--tiny", "--cmdline", "ip=10.0.2.15/24"], "--tiny guest has no kernel command"),
        (["demo", "--tiny", "--device", "virtio-net"], "unknown device 'virtio-net'"),
        (["demo", "--tiny", "--device", "isa-debug-exit,iobase=zz"], "iobase='zz'"),
        (
            ["demo", "--tiny", "--device", "isa-debug-exit,iobase=0x3f8,iosize=1"],
            "isa-debug-exit: pio [0x3f8, 0x3f9) overlaps com1",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_status_2(args: list[str], message: str) -> None:
    result = kvm_vmm(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_sizes_take_k_m_g_suffixes() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("65536k") == 64 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(UsageError):
        parse_size("-1M")


def _run_with_debug_exit(kernel: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``kvm-vmm run`` of a test kernel with QEMU's isa-debug-exit at 0xf4."""
    return kvm_vmm(
        "run",
        "--kernel",
        str(kernel),
        "--memory",
        "32M",
        "--serial",
        "null",
        "--device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
        *extra,
    )


def _multiboot_kernel(tmp_path: Path, body: str) -> Path:
    """A Multiboot ELF32 kernel: ``body`` (AT&T syntax), then isa-debug-exit 0x20."""
    source = tmp_path / "kernel.S"
    source.write_text(
        f"""
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -0x1BADB002
        .globl _start
_start:
{body}
        movl $0x20, %eax
        outl %eax, $0xf4
1:      hlt
        jmp 1b
"""
    )
    subprocess.run(["as", "--32", "-o", str(tmp_path / "kernel.o"), str(source)], check=True)
    kernel = tmp_path / "kernel.elf"
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_i386",
            "-N",
            "-Ttext=0x100000",
            "-o",
            str(kernel),
            str(tmp_path / "kernel.o"),
        ],
        check=True,
    )
    return kernel


@pytest.mark.kvm
def test_no_emulation_fallback_stops_where_kvm_cannot_emulate(tmp_path: Path) -> None:
    """CLAC runs only through kvmfast's completion on hosts that emulate guest code."""
    require_kvm()
    kernel = _multiboot_kernel(tmp_path, "        clac")
    completed = _run_with_debug_exit(kernel)
    assert completed.returncode == (0x20 << 1) | 1, completed.stderr
    stopped = _run_with_debug_exit(kernel, "--no-emulation-fallback")
    if stopped.returncode == (0x20 << 1) | 1:
        pytest.skip("this host's KVM runs CLAC itself: nothing to fall back from")
    assert stopped.returncode == 4, stopped.stderr  # a crash: no debug-exit write gives 4
    assert "clac" in stopped.stderr.lower()
    assert "Traceback" not in stopped.stderr


def test_a_missing_symbols_file_is_a_clear_error() -> None:
    result = kvm_vmm("demo", "--tiny", "--serial", "null", "--symbols", "/nonexistent/System.map")
    assert result.returncode == 2
    assert "--symbols /nonexistent/System.map" in result.stderr


def test_serial_file_starts_empty(tmp_path: Path) -> None:
    """--serial file:PATH truncates, as QEMU's -serial file: does: a log left by an
    earlier run must not pass for this run's output."""
    log = tmp_path / "console.log"
    log.write_bytes(b"an earlier run\n")
    sink = open_serial_sink(f"file:{log}")
    assert isinstance(sink, FileSink)
    sink.write_bytes(b"this run\n")
    sink.close()
    assert log.read_bytes() == b"this run\n"


# --- the console escape, typed on a terminal ------------------------------------------

# Polls COM1 and prints each received byte as two hex digits and a space, after "ready".
ECHO_HEX_BODY = """
        movl $0x90000, %esp
        movw $0x3f8, %dx
        movl $ready, %esi
print:  lodsb
        testb %al, %al
        jz poll
        outb %al, %dx
        jmp print
poll:   movw $0x3fd, %dx            # LSR: bit 0, data ready
        inb %dx, %al
        testb $1, %al
        jz poll
        movw $0x3f8, %dx
        inb %dx, %al
        movb %al, %bl
        shrb $4, %al
        call hex
        movb %bl, %al
        andb $0xf, %al
        call hex
        movb $0x20, %al
        outb %al, %dx
        jmp poll
hex:    addb $0x30, %al
        cmpb $0x3a, %al
        jb 1f
        addb $0x27, %al             # 'a' - '0' - 10
1:      outb %al, %dx
        ret
ready:  .asciz "ready\\n"
"""


class Terminal:
    """kvm-vmm on a pseudo-terminal, as a user runs it: stdin and stdout are the tty."""

    def __init__(self, kernel: Path) -> None:
        self.master, self.slave = pty.openpty()
        self.before = termios.tcgetattr(self.slave)
        options = ["--memory", "32M", "--serial", "stdio", "--stats", "--timeout", "60"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvm_vmm.cli", "run", "--kernel", str(kernel), *options],
            stdin=self.slave,
            stdout=self.slave,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output = bytearray()

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_for(self, text: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            assert left > 0 and self.process.poll() is None, (text, bytes(self.output))
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                self.output += os.read(self.master, 4096)

    def drain(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            self.output += os.read(self.master, 4096)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.kvm
def test_ctrl_a_x_quits_with_status_0_and_restores_the_terminal(tmp_path: Path) -> None:
    """QEMU's escape: Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A x ends the run."""
    require_kvm()
    terminal = Terminal(_multiboot_kernel(tmp_path, ECHO_HEX_BODY))
    try:
        terminal.wait_for(b"ready")
        # Raw mode while the guest owns the console: no line buffering, no echo.
        assert not termios.tcgetattr(terminal.slave)[3] & (termios.ICANON | termios.ECHO)
        terminal.type(b"a\x01\x01b\x01")
        terminal.wait_for(b"61 01 62 ")
        # The guest has had the b, so the reader holds the Ctrl-A: the c comes in a
        # later read, and an escape split across reads must still pair up.
        terminal.type(b"c")
        terminal.wait_for(b"61 01 62 01 63 ")
        terminal.type(b"\x01x")
        _, stderr = terminal.process.communicate(timeout=30)
        assert terminal.process.returncode == 0, stderr
        assert '"outcome": "quit from the console (Ctrl-A x)"' in stderr
        assert "Traceback" not in stderr
        assert termios.tcgetattr(terminal.slave) == terminal.before
        terminal.drain()
        assert bytes(terminal.output).endswith(b"61 01 62 01 63 "), bytes(terminal.output)
    finally:
        terminal.close()


def test_run_help_lists_every_exit_status() -> None:
    """A harness reads the status: each ending has its own, listed where users look."""
    result = kvm_vmm("run", "--help")
    assert result.returncode == 0
    epilog = result.stdout[result.stdout.index("exit status:") :]
    statuses = [line.split()[0] for line in epilog.splitlines()[1:] if line[:3].strip()]
    assert statuses == ["0", "(v<<1)|1", "2", "4", "124", "128+n"], epilog
    assert "triple fault" in epilog and "isa-debug-exit" in epilog
