"""kvm_vmm.vsock_client against a stand-in VMM socket: the CONNECT line it writes,
an OK that hands over the stream with the bytes after it kept, and each way the
handshake fails (closed, a wrong answer, silence, nobody listening)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvm_vmm.vsock_client import VsockRefused, vsock_connect

Answer = Callable[[socket.socket], None]


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[Callable[[Answer], Path]]:
    threads: list[threading.Thread] = []
    path = tmp_path / "v.sock"

    def serve(answer: Answer) -> Path:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen(1)

        def run() -> None:
            with server:
                connection, _ = server.accept()
                with connection:
                    answer(connection)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield serve
    for thread in threads:
        thread.join(5)


def test_ok_hands_over_the_stream(vmm: Callable[[Answer], Path]) -> None:
    lines: list[bytes] = []

    def answer(connection: socket.socket) -> None:
        lines.append(connection.recv(64))
        connection.sendall(b"OK 1073741824\nfirst bytes")  # the guest's, right after OK
        connection.sendall(connection.recv(4))

    with vsock_connect(vmm(answer), 5000) as stream:
        assert stream.recv(11) == b"first bytes"
        stream.sendall(b"ping")
        assert stream.recv(4) == b"ping"
    assert lines == [b"CONNECT 5000\n"]


@pytest.mark.parametrize(
    ("reply", "message"),
    [(b"", "refused"), (b"NO\n", "unexpected answer"), (b"OK x\n", "unexpected answer")],
)
def test_a_refusal_is_vsock_refused(
    vmm: Callable[[Answer], Path], reply: bytes, message: str
) -> None:
    def answer(connection: socket.socket) -> None:
        connection.recv(64)
        connection.sendall(reply)

    with pytest.raises(VsockRefused, match=message):
        vsock_connect(vmm(answer), 7)


def test_silence_is_refused_after_the_timeout(vmm: Callable[[Answer], Path]) -> None:
    done = threading.Event()
    with pytest.raises(VsockRefused, match="no answer"):
        vsock_connect(vmm(lambda connection: done.wait(5)), 7, timeout=0.2)
    done.set()


def test_no_vmm_and_bad_ports_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        vsock_connect(tmp_path / "nothing", 5000)
    for port in (-1, 1 << 32):
        with pytest.raises(ValueError, match="vsock port"):
            vsock_connect(tmp_path / "nothing", port)
