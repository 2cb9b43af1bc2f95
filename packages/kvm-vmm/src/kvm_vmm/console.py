"""Where the guest's serial port goes, and where its input comes from.

``--serial stdio|file:PATH|null``. Output never blocks a vCPU thread for
long: it is a plain write to a file descriptor. Input from stdin is read by
one daemon thread and pushed into the UART's host backlog, so nothing typed
is lost. A terminal in raw mode is restored on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO


class SerialSpecError(ValueError):
    """A --serial value that is not stdio, null or file:PATH."""


@dataclass
class FdSink:
    """A ByteSink writing to a file descriptor."""

    fd: int
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write_bytes(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]


@dataclass
class FileSink:
    """A ByteSink appending to a file (closed by close())."""

    handle: BinaryIO

    def write_bytes(self, data: bytes) -> None:
        self.handle.write(data)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


@dataclass
class DiscardSink:
    """A ByteSink that drops everything (``--serial null``)."""

    def write_bytes(self, data: bytes) -> None:
        """Nothing keeps the guest's output."""


@dataclass
class CaptureSink:
    """A ByteSink keeping the output in memory (tests, the demo's checks)."""

    data: bytearray = field(default_factory=bytearray)

    def write_bytes(self, data: bytes) -> None:
        self.data += data


def open_serial_sink(spec: str) -> FdSink | FileSink | DiscardSink:
    if spec == "stdio":
        return FdSink(sys.stdout.fileno())
    if spec == "null":
        return DiscardSink()
    if spec.startswith("file:") and len(spec) > len("file:"):
        path = spec[len("file:") :]
        try:
            # Truncated, as QEMU's -serial file: and Cloud Hypervisor's --serial file=.
            return FileSink(open(path, "wb"))
        except OSError as error:
            raise SerialSpecError(
                f"--serial {spec}: cannot open {path}: {error.strerror}"
            ) from error
    raise SerialSpecError(f"--serial {spec!r}: expected stdio, null or file:PATH")


ESCAPE = 0x01  # Ctrl-A, as in QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A


@dataclass
class EscapeFilter:
    """Takes QEMU's Ctrl-A x out of the guest's input stream."""

    on_quit: Callable[[], None]
    pending_escape: bool = False

    def feed(self, data: bytes) -> bytes:
        passed = bytearray()
        for byte in data:
            if self.pending_escape:
                self.pending_escape = False
                if byte in (ord("x"), ord("X")):
                    self.on_quit()
                    continue
                passed.append(ESCAPE)
                if byte == ESCAPE:
                    continue
            elif byte == ESCAPE:
                self.pending_escape = True
                continue
            passed.append(byte)
        return bytes(passed)


def start_stdin_reader(
    receive: Callable[[bytes], None], on_quit: Callable[[], None]
) -> threading.Thread:
    """Feed stdin to ``receive`` from a daemon thread until EOF; Ctrl-A x calls on_quit."""
    escapes = EscapeFilter(on_quit)

    def pump() -> None:
        fd = sys.stdin.fileno()
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            data = escapes.feed(data)
            if data:
                receive(data)

    thread = threading.Thread(target=pump, name="kvm-vmm-stdin", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Raw mode on stdin while the guest owns the console, restored however we leave."""
    fd = sys.stdin.fileno() if enabled else -1
    if not enabled or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
