"""machine.serial: expect() on the guest's output, write() to its input, the transcript;
first on its own (bytes fed from another thread, as the vCPU thread does), then with a
guest that echoes what it reads from COM1."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest

from kvm_vmm import layout
from kvm_vmm.console import CaptureSink
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.milestones import FIRST_CONSOLE_BYTE, MilestoneSink
from kvm_vmm.serial_console import ConsoleTimeout, SerialConsole
from kvmfast.testing import assemble_program, require_kvm


def _console() -> tuple[SerialConsole, CaptureSink]:
    inner = CaptureSink()
    return SerialConsole(MilestoneSink(inner)), inner


def _feed_slowly(console: SerialConsole, text: bytes) -> threading.Thread:
    """One byte at a time from another thread, as a guest's OUTs arrive."""

    def feed() -> None:
        for byte in text:
            console.write_bytes(bytes([byte]))
            time.sleep(0.0005)

    thread = threading.Thread(target=feed)
    thread.start()
    return thread


def test_expect_waits_for_text_written_a_byte_at_a_time_and_passes_it_on() -> None:
    console, inner = _console()
    text = b"booting...\nlogin: root\n# n=42\n# "
    feeder = _feed_slowly(console, text)
    assert console.expect(b"login: ", timeout=10).group() == b"login: "
    # Up to the newline: a byte at a time, "n=4" alone would match n=(\d+) too.
    match = console.expect(re.compile(rb"n=(\d+)\n"), timeout=10)
    assert match.group(1) == b"42"
    assert text[match.start() : match.end()] == b"n=42\n"  # offsets in the transcript
    feeder.join()
    assert console.transcript() == text
    assert bytes(inner.data) == text
    assert [m.name for m in console.milestones(0.0)] == [FIRST_CONSOLE_BYTE]


def test_each_expect_starts_after_the_previous_match() -> None:
    console, _ = _console()
    console.write_bytes(b"# one\n# two\n")
    first = console.expect(b"# ", timeout=1)
    second = console.expect(b"# ", timeout=1)
    assert (first.start(), second.start()) == (0, 6)
    with pytest.raises(ConsoleTimeout):
        console.expect(b"# ", timeout=0.05)


def test_a_timeout_says_what_was_awaited_and_shows_the_console_tail() -> None:
    console, _ = _console()
    console.write_bytes(b"x" * 1000 + b"Kernel panic - not syncing: VFS\n")
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout, match=r"b'login:'.*0\.2 s passed") as raised:
        console.expect(b"login:", timeout=0.2)
    assert time.monotonic() - started >= 0.2
    assert str(raised.value).endswith("Kernel panic - not syncing: VFS\n")
    assert raised.value.tail.endswith(b"VFS\n") and len(raised.value.tail) == 512


def test_the_end_of_the_run_ends_a_wait_at_once() -> None:
    console, _ = _console()
    console.write_bytes(b"reboot: Power down\n")
    threading.Timer(0.1, console.end, ("guest powered off",)).start()
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout, match=r"the run ended \(guest powered off\)"):
        console.expect(b"login:", timeout=30)
    assert time.monotonic() - started < 10
    # What came before the end is still found.
    assert console.expect(b"Power down", timeout=0).group() == b"Power down"


def test_write_needs_a_uart() -> None:
    console, _ = _console()
    with pytest.raises(RuntimeError, match="not connected"):
        console.write(b"x")
    received: list[bytes] = []
    console.connect(received.append)
    console.write(b"ls\n")
    assert received == [b"ls\n"]


LOAD_ADDRESS = 0x100000
# Prints "> ", then echoes each byte received on COM1 (polling LSR.DR) until a 'q',
# then leaves through isa-debug-exit with 0x21.
ECHO = """
.global entry
entry:
    mov dx, 0x3f8
    mov al, '>'
    out dx, al
    mov al, ' '
    out dx, al
wait:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jz wait
    mov dx, 0x3f8
    in al, dx
    out dx, al
    cmp al, 'q'
    jne wait
    mov al, 0x21
    out 0xf4, al
    hlt
"""


@pytest.fixture
def echo_machine() -> Iterator[Machine]:
    require_kvm()
    program = assemble_program(ECHO, origin=LOAD_ADDRESS)
    with Machine(MachineConfig(memory_size=16 * layout.MIB)) as machine:
        machine.add_device_option("isa-debug-exit,iobase=0xf4,iosize=0x4")
        machine.write_memory(LOAD_ADDRESS, program.code)
        machine.enter(EntryState("long64", program.symbols["entry"]))
        yield machine


@pytest.mark.kvm
def test_a_script_talks_to_a_guest_on_com1(echo_machine: Machine) -> None:
    serial = echo_machine.serial
    echo_machine.start()
    serial.expect(b"> ", timeout=30)
    serial.write(b"hello\n")
    assert serial.expect(re.compile(rb"h\w+\n"), timeout=30).group() == b"hello\n"
    serial.write(b"q")
    outcome = echo_machine.wait(30)
    assert outcome is not None and outcome.status == 0x21 << 1 | 1, outcome
    assert serial.transcript() == b"> hello\nq"
    with pytest.raises(ConsoleTimeout, match="the run ended"):
        serial.expect(b"more", timeout=30)
