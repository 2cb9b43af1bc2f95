"""sock_tool.c on the host: the same binary the virtio-net/vsock boot test and
benchmark put in the guest. Its CRC-32s are zlib's (a Python peer checks them), both
directions of many connections at once mirror each other, and a peer that is absent
or refuses is an ERROR line and status 1, never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import zlib
from pathlib import Path

import pytest

from kvm_vmm.sock_tool import (
    StreamEnd,
    build_sock_tool,
    errors,
    ping_result,
    stream_ends,
    unmatched,
)
from kvm_vmm.static_tool import ToolUnavailable


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_sock_tool(tmp_path_factory.mktemp("sock-tool"))
    except ToolUnavailable as error:
        pytest.fail(f"CI installs gcc and libc6-dev: {error}")


def start(tool: Path, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [str(tool), "-t", "20", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # LISTENING: the socket is bound before we go on
    assert line.startswith("SOCKTOOL LISTENING"), (line, process.stderr)
    return process


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, (out, err)
    return out


def run(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), "-t", "20", *args], capture_output=True, text=True, timeout=30, check=False
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_many_connections_mirror_each_other_both_ways(tool: Path) -> None:
    port = free_port()
    listener = start(tool, "listen", f"tcp:127.0.0.1:{port}", "stream", "8", "300000")
    client = run(tool, "connect", f"tcp:127.0.0.1:{port}", "stream", "8", "1000003")
    assert client.returncode == 0, client
    ours, theirs = stream_ends(client.stdout), stream_ends(finish(listener))
    assert len(ours) == len(theirs) == 8
    assert {end.sent for end in ours} == {1000003} and {end.received for end in ours} == {300000}
    assert unmatched(ours, theirs) == []
    # Each connection's stream is its own: eight different CRCs each way.
    assert len({end.sent_crc for end in ours}) == 8


def test_its_crc_is_zlibs_and_a_python_peer_checks_it(tool: Path, tmp_path: Path) -> None:
    path = tmp_path / "s"
    listener = start(tool, "listen", f"unix:{path}", "stream", "1", "65537")
    payload = os.urandom(200_000)
    with socket.socket(socket.AF_UNIX) as peer:
        peer.connect(str(path))
        sender = threading.Thread(target=lambda: (peer.sendall(payload), peer.shutdown(1)))
        sender.start()
        received = b"".join(iter(lambda: peer.recv(65536), b""))
        sender.join()
    [end] = stream_ends(finish(listener))
    python_end = StreamEnd(len(payload), zlib.crc32(payload), len(received), zlib.crc32(received))
    assert end.mirrors(python_end), (end, python_end)
    assert not end.mirrors(StreamEnd(len(payload), zlib.crc32(payload[1:]), 65537, end.sent_crc))


def test_ping_round_trips_through_echo(tool: Path, tmp_path: Path) -> None:
    path = tmp_path / "e"
    echo = start(tool, "listen", f"unix:{path}", "echo")
    pinged = run(tool, "connect", f"unix:{path}", "ping", "500")
    result = ping_result(pinged.stdout)
    assert pinged.returncode == 0 and result is not None and result.count == 500, pinged
    assert result.microseconds_per_round_trip > 0
    assert "SOCKTOOL ECHO bytes=500" in finish(echo)


def test_pipe_carries_standard_input_and_output_as_nc_does(tool: Path, tmp_path: Path) -> None:
    path, data = tmp_path / "p", os.urandom(300_001)
    (tmp_path / "in").write_bytes(data)
    with (tmp_path / "got").open("wb") as got:
        listener = subprocess.Popen(
            [str(tool), "-t", "20", "listen", f"unix:{path}", "pipe"],
            stdin=subprocess.DEVNULL,
            stdout=got,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert listener.stderr is not None
        assert listener.stderr.readline().startswith("SOCKTOOL LISTENING")  # not in the data
        with (tmp_path / "in").open("rb") as source:
            sender = subprocess.run(
                [str(tool), "-t", "20", "connect", f"unix:{path}", "pipe"],
                stdin=source,
                capture_output=True,
                timeout=30,
                check=False,
            )
        _, notes = listener.communicate(timeout=30)
    # Each side ends when both halves are done: the listener's empty input did not
    # end the sender's stream.
    assert sender.returncode == 0 and sender.stdout == b"", sender
    assert (tmp_path / "got").read_bytes() == data
    assert f"SOCKTOOL PIPE sent=0 received={len(data)} " in notes
    assert f"SOCKTOOL PIPE sent={len(data)} received=0 " in sender.stderr.decode()


def test_firecracker_host_side_writes_connect_and_needs_ok(tool: Path, tmp_path: Path) -> None:
    path = tmp_path / "fc"
    lines: list[bytes] = []

    def serve(answer: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            server.listen(1)
            connection, _ = server.accept()
            with connection:
                lines.append(connection.recv(64))
                connection.sendall(answer)
                if answer.startswith(b"OK"):
                    connection.sendall(connection.recv(1))  # echo the ping's one byte

    for answer, status in ((b"OK 1073741824\n", 0), (b"", 1)):
        path.unlink(missing_ok=True)
        server = threading.Thread(target=serve, args=(answer,))
        server.start()
        while not path.exists():
            pass
        pinged = run(tool, "connect", f"fc:{path}:5000", "ping", "1")
        server.join()
        assert pinged.returncode == status, pinged
        assert lines.pop() == b"CONNECT 5000\n"
    assert errors(pinged.stdout) == [f"refused fc:{path}:5000: the socket closed before OK"]


def test_refused_absent_and_malformed_peers_end_with_a_status(tool: Path) -> None:
    refused = run(tool, "connect", f"tcp:127.0.0.1:{free_port()}", "ping", "1")
    assert refused.returncode == 1 and "errno=111" in errors(refused.stdout)[0], refused
    absent = subprocess.run(
        [str(tool), "-t", "1", "listen", f"tcp:127.0.0.1:{free_port()}", "echo"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert absent.returncode == 1 and errors(absent.stdout)[0].startswith("timeout accept")
    for args in (["connect", "vsock:5", "echo"], ["listen", "tcp:1:2:3", "echo"], ["nope"]):
        assert run(tool, *args).returncode == 2, args
