"""The host's side of a guest's vsock port: Firecracker's protocol on the Unix socket
that ``--vsock cid=N,socket=PATH`` (``Machine.add_vsock``) listens on.

Connect to PATH, write ``CONNECT <port>\\n``; the VMM answers ``OK <host port>\\n``
once the guest's listener accepted, and from then on the socket is the stream. No
listener on that port (or no answer within the VMM's deadline) closes the socket
without an OK.
"""

from __future__ import annotations

import socket
from pathlib import Path

MAX_PORT = 0xFFFF_FFFF
_LONGEST_ANSWER = len(f"OK {MAX_PORT}\n")


class VsockRefused(ConnectionError):
    """The VMM closed the socket or answered something else than OK: nobody listens
    on that guest port, or the guest did not answer in time."""


def vsock_connect(socket_path: str | Path, port: int, timeout: float = 10.0) -> socket.socket:
    """A stream to the guest's listener on ``port``, through the VMM's vsock socket.

    The socket returned is connected and blocking (``timeout`` applies to the
    handshake only); close it (or use it as a context manager) when done.
    FileNotFoundError/ConnectionRefusedError when no VMM listens at
    ``socket_path``; :class:`VsockRefused` when the guest's port does not answer.
    """
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"vsock port {port}: 0 to {MAX_PORT}")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stream.settimeout(timeout)
        stream.connect(str(socket_path))
        stream.sendall(f"CONNECT {port}\n".encode())
        answer = _read_line(stream)
        if not answer.startswith(b"OK ") or not answer[3:-1].isdigit():
            raise VsockRefused(_refusal(socket_path, port, answer))
        stream.settimeout(None)
        return stream
    except TimeoutError as error:
        stream.close()
        raise VsockRefused(f"{socket_path}: no answer to CONNECT {port} in {timeout} s") from error
    except BaseException:
        stream.close()
        raise


def _read_line(stream: socket.socket) -> bytes:
    # A byte at a time: what follows the line is the guest's, and must stay queued.
    line = b""
    while not line.endswith(b"\n") and len(line) < _LONGEST_ANSWER:
        byte = stream.recv(1)
        if not byte:
            break
        line += byte
    return line


def _refusal(socket_path: str | Path, port: int, answer: bytes) -> str:
    if not answer:
        return f"{socket_path}: guest port {port} refused (the VMM closed the connection)"
    return f"{socket_path}: guest port {port}: unexpected answer {answer!r}"
