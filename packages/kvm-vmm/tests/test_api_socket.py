"""The API socket (kvm_vmm.api_socket) against a real machine: a long-mode guest that
counts in memory while it polls PM1_STS and powers off (SLP_TYP S5) once the ACPI power
button's PWRBTN_STS is set (ACPI 6.5 §4.8.3.1.1, §4.8.3.2.1). Every endpoint, every kind
of malformed request, the wrong-state replies, and the socket file's permissions and
life. Each bad request is followed by a check that the guest still counts and the
server still answers."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvm_devices.acpi_pm import PWRBTN_STS, SLP_EN, SLP_TYP_SHIFT
from kvm_vmm import board, layout
from kvm_vmm.api_client import ApiReply, request
from kvm_vmm.api_socket import MAX_BODY, MAX_SOCKET_PATH, ApiServer, ApiSocketError, connect_unix
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import POWERED_OFF, STATUS_POWERED_OFF, Machine, MachineConfig
from kvmfast.testing import GuestProgram, assemble_program, require_kvm

pytestmark = pytest.mark.kvm

LOAD_ADDRESS = 0x100000
POWER_BUTTON_GUEST = f"""
.global start, count
start:
    mov dx, {board.PM1A_EVT_BLK}
poll:
    inc qword ptr [rip + count]
    in ax, dx
    test ax, {PWRBTN_STS}
    jz poll
    mov dx, {board.PM1A_CNT_BLK}
    mov ax, {board.SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN}
    out dx, ax
    hlt
    .balign 8
count: .quad 0
"""


@dataclass
class Served:
    machine: Machine
    server: ApiServer
    count_at: int

    @property
    def path(self) -> Path:
        return self.server.path

    def count(self) -> int:
        value: int = struct.unpack("<Q", self.machine.read_memory(self.count_at, 8))[0]
        return value

    def still_counting(self) -> bool:
        before = self.count()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.count() > before:
                return True
            time.sleep(0.01)
        return False


@pytest.fixture
def program() -> GuestProgram:
    require_kvm()
    return assemble_program(POWER_BUTTON_GUEST, origin=LOAD_ADDRESS)


def _machine(program: GuestProgram) -> Machine:
    machine = Machine(MachineConfig(memory_size=16 * layout.MIB))
    machine.write_memory(LOAD_ADDRESS, program.code)
    machine.enter(EntryState("long64", program.symbols["start"]))
    return machine


@pytest.fixture
def created(program: GuestProgram, tmp_path: Path) -> Iterator[Served]:
    """A served machine not started yet."""
    machine = _machine(program)
    server = ApiServer(machine, tmp_path / "api.sock", timeout=0.5)
    server.start()
    try:
        yield Served(machine, server, program.symbols["count"])
    finally:
        server.close()
        machine.close()


@pytest.fixture
def served(created: Served) -> Served:
    """A served machine whose guest is counting."""
    created.machine.start()
    assert created.still_counting()
    return created


def _ask(served: Served, method: str, endpoint: str, body: object = None) -> ApiReply:
    return request(served.path, method, endpoint, body)  # type: ignore[arg-type]


def _raw(path: Path, data: bytes, *, end_writing: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is; the reply's status, headers (lower-case names) and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        connect_unix(client, path)
        client.sendall(data)
        if end_writing:
            client.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("iso-8859-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, body


def test_every_endpoint_on_a_running_guest_and_the_power_button_powers_it_off(
    served: Served,
) -> None:
    machine = served.machine
    info = _ask(served, "GET", "vm.info")
    assert info.status == 200
    assert isinstance(info.body, dict)
    assert info.body["state"] == "running"
    assert info.body["config"] == {
        "memory_size": 16 * layout.MIB,
        "cpus": 1,
        "emulation_fallback": True,
    }
    devices = {device["name"]: device["model"] for device in info.body["devices"]}
    assert devices["acpi-pm"] == "AcpiPm" and devices["com1"] == "Uart16550"
    assert info.body["outcome"] is None

    counters = _ask(served, "GET", "vm.counters")
    assert counters.status == 200 and isinstance(counters.body, dict)
    assert counters.body["outcome"] is None
    assert counters.body["exits_by_device"]["acpi-pm"] > 0  # the guest's polling

    paused = _ask(served, "PUT", "vm.pause")
    assert (paused.status, paused.body) == (200, {"state": "paused"})
    held = served.count()
    time.sleep(0.1)
    assert served.count() == held, "the guest ran while paused"
    assert _ask(served, "GET", "vm.info").body["state"] == "paused"  # type: ignore[index]

    resumed = _ask(served, "PUT", "vm.resume")
    assert (resumed.status, resumed.body) == (200, {"state": "running"})
    assert served.still_counting()

    assert _ask(served, "PUT", "vm.shutdown").status == 200
    outcome = machine.wait(30)
    assert outcome is not None and outcome.reason == POWERED_OFF
    finished = _ask(served, "GET", "vm.info").body
    assert isinstance(finished, dict) and finished["state"] == "finished"
    assert finished["outcome"] == {"status": STATUS_POWERED_OFF, "reason": POWERED_OFF}
    # A stop after the guest ended the run gives its outcome, as Machine.stop() does.
    stopped = _ask(served, "PUT", "vm.stop")
    assert stopped.status == 200
    assert stopped.body == {
        "state": "finished",
        "outcome": {"status": STATUS_POWERED_OFF, "reason": POWERED_OFF},
    }


def test_shutdown_while_paused_powers_off_once_resumed(served: Served) -> None:
    assert _ask(served, "PUT", "vm.pause").status == 200
    assert _ask(served, "PUT", "vm.shutdown").body == {"state": "paused"}
    assert served.machine.wait(0.2) is None  # the guest has not seen it yet
    assert _ask(served, "PUT", "vm.resume").status == 200
    outcome = served.machine.wait(30)
    assert outcome is not None and outcome.reason == POWERED_OFF


def test_stop_ends_a_running_guest_and_says_how(served: Served) -> None:
    reply = _ask(served, "PUT", "vm.stop")
    assert reply.status == 200
    assert reply.body == {"state": "finished", "outcome": {"status": 0, "reason": "stopped"}}
    assert served.machine.wait(0) is not None


@pytest.mark.parametrize(
    ("method", "endpoint", "message"),
    [
        ("PUT", "vm.resume", r"resume() on a machine that is not paused (it is running)"),
        ("GET", "vm.info", None),
    ],
)
def test_wrong_state_while_running(
    served: Served, method: str, endpoint: str, message: str | None
) -> None:
    reply = _ask(served, method, endpoint)
    if message is None:
        assert reply.status == 200
    else:
        assert (reply.status, reply.error) == (409, message)
    assert served.machine.state.value == "running"
    assert served.still_counting()


def test_wrong_state_while_paused_then_created_then_finished(served: Served) -> None:
    assert _ask(served, "PUT", "vm.pause").status == 200
    again = _ask(served, "PUT", "vm.pause")
    assert again.status == 409
    assert again.error == "pause() on a machine that is not running (it is paused)"
    assert _ask(served, "PUT", "vm.resume").status == 200
    assert served.still_counting()
    assert _ask(served, "PUT", "vm.stop").status == 200
    for endpoint, call in (("vm.pause", "pause"), ("vm.resume", "resume")):
        reply = _ask(served, "PUT", endpoint)
        assert reply.status == 409 and reply.error.startswith(f"{call}() on a machine")
        assert reply.error.endswith("(it is finished)")
    shutdown = _ask(served, "PUT", "vm.shutdown")
    assert shutdown.status == 409 and "(it is finished)" in shutdown.error


def test_a_machine_not_started_answers_info_and_refuses_the_rest(created: Served) -> None:
    info = _ask(created, "GET", "vm.info")
    assert info.status == 200 and info.body["state"] == "created"  # type: ignore[index]
    for endpoint in ("vm.pause", "vm.resume", "vm.shutdown", "vm.stop"):
        reply = _ask(created, "PUT", endpoint)
        assert reply.status == 409, endpoint
        assert reply.error.endswith("(it is created)")
    created.machine.start()  # nothing the requests did keeps it from running
    assert created.still_counting()


BAD_REQUESTS = {
    "one word": (b"garbage\r\n\r\n", 400, "Bad request syntax"),
    "four words": (b"GET /api/v1/vm.info HTTP/1.1 extra\r\n\r\n", 400, "Bad request"),
    "no version": (b"GET /api/v1/vm.info\r\n\r\n", 400, "no HTTP version"),
    "bad version": (b"GET /api/v1/vm.info FTP/1.1\r\n\r\n", 400, "Bad request version"),
    "HTTP/2": (b"GET /api/v1/vm.info HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version"),
    "request line too long": (
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        414,
        "Request-URI Too Long",
    ),
    "header line too long": (
        b"GET /api/v1/vm.info HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        431,
        "Line too long",
    ),
    "too many headers": (
        b"GET /api/v1/vm.info HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
        431,
        "Too many headers",
    ),
    "unknown method": (b"BREW /api/v1/vm.info HTTP/1.1\r\n\r\n", 501, "Unsupported method"),
    "unknown endpoint": (b"GET /api/v1/vm.reboot HTTP/1.1\r\n\r\n", 404, "no endpoint"),
    "outside the API": (b"GET /index.html HTTP/1.1\r\n\r\n", 404, "no endpoint '/index.html'"),
    "no prefix": (b"GET /vm.info HTTP/1.1\r\n\r\n", 404, "no endpoint '/vm.info'"),
    "GET of a PUT": (b"GET /api/v1/vm.pause HTTP/1.1\r\n\r\n", 405, "takes PUT, not GET"),
    "PUT of a GET": (b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n", 405, "takes GET, not PUT"),
    "POST": (b"POST /api/v1/vm.stop HTTP/1.1\r\n\r\n", 405, "takes PUT, not POST"),
    "DELETE": (b"DELETE /api/v1/vm.stop HTTP/1.1\r\n\r\n", 405, "takes PUT, not DELETE"),
    "length not a number": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        400,
        "Content-Length 'ten' is not a size",
    ),
    "negative length": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        400,
        "is not a size",
    ),
    "two lengths": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "Content-Length '2, 3' is not a size",
    ),
    "huge length": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n",
        413,
        f"a body of 1000000000000 bytes: at most {MAX_BODY}",
    ),
    "just too long": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        + b" " * (MAX_BODY + 1),
        413,
        "at most",
    ),
    "chunked": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        411,
        "send Content-Length",
    ),
    "short body": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
        400,
        "the body ended after 2 of 10 bytes",
    ),
    "not JSON": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{oops",
        400,
        "the body is not JSON",
    ),
    "not UTF-8": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe",
        400,
        "the body is not JSON",
    ),
    "a JSON list": (
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]",
        400,
        "the body is a JSON list, not an object",
    ),
    "a field pause does not take": (
        b'PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 12\r\n\r\n{"force": 1}',
        400,
        "vm.pause takes no fields: 'force'",
    ),
    "a field info does not take": (
        b'GET /api/v1/vm.info HTTP/1.1\r\nContent-Length: 8\r\n\r\n{"x": 1}',
        400,
        "vm.info takes no fields: 'x'",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_malformed_request_gets_a_json_error_and_nothing_stops(served: Served, case: str) -> None:
    data, status, message = BAD_REQUESTS[case]
    got, headers, body = _raw(served.path, data)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert message in json.loads(body)["error"]
    if status == 405:
        assert headers["allow"] in ("GET", "PUT")
    assert served.machine.state.value == "running"
    assert served.still_counting()
    assert _ask(served, "GET", "vm.info").status == 200


def test_head_gets_the_headers_without_a_body(served: Served) -> None:
    status, headers, body = _raw(served.path, b"HEAD /api/v1/vm.info HTTP/1.1\r\n\r\n")
    assert (status, headers["allow"], body) == (405, "GET", b"")
    assert int(headers["content-length"]) > 0


def test_an_empty_body_and_a_query_are_accepted(served: Served) -> None:
    data = b"PUT /api/v1/vm.pause?now=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    status, _, body = _raw(served.path, data)
    assert (status, json.loads(body)) == (200, {"state": "paused"})
    data = b"PUT /api/v1/vm.resume HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    status, _, body = _raw(served.path, data)
    assert (status, json.loads(body)) == (200, {"state": "running"})


def test_a_body_that_never_comes_is_a_408_and_the_server_goes_on(served: Served) -> None:
    data = b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{"
    status, _, body = _raw(served.path, data, end_writing=False)  # the server's 0.5 s
    assert status == 408 and "did not come within 0.5 s" in json.loads(body)["error"]
    assert served.machine.state.value == "running"
    assert _ask(served, "GET", "vm.info").status == 200


def test_a_silent_client_holds_the_server_only_until_its_timeout(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        connect_unix(silent, served.path)
        started = time.monotonic()
        reply = request(served.path, "GET", "vm.info", timeout=5)  # after the silent one's 0.5 s
        assert reply.status == 200
        assert time.monotonic() - started < 5
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed without a reply


def test_close_with_a_client_mid_request_is_prompt(program: GuestProgram, tmp_path: Path) -> None:
    with _machine(program) as machine:
        server = ApiServer(machine, tmp_path / "api.sock")  # a 10 s timeout
        server.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            connect_unix(client, server.path)
            client.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\n")  # and no more
            time.sleep(0.2)
            started = time.monotonic()
            server.close()
            assert time.monotonic() - started < 2
        assert not server.path.exists()


def test_a_bug_is_a_500_and_the_machine_and_server_go_on(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("counters exploded")

    monkeypatch.setattr(served.machine, "stats", broken)
    reply = _ask(served, "GET", "vm.counters")
    assert reply.status == 500
    assert reply.error == "internal error: RuntimeError: counters exploded"
    assert served.still_counting()
    assert _ask(served, "GET", "vm.info").status == 200


def test_requests_from_several_threads_at_once_are_each_answered(served: Served) -> None:
    replies: list[int] = []

    def ask() -> None:
        for _ in range(5):
            replies.append(_ask(served, "GET", "vm.info").status)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert replies == [200] * 20


def test_the_socket_is_owner_only_whatever_the_umask(program: GuestProgram, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with _machine(program) as machine, ApiServer(machine, tmp_path / "api.sock") as server:
            mode = os.lstat(server.path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
            assert os.listdir(tmp_path) == ["api.sock"]  # the private directory is gone
    finally:
        os.umask(old)


def test_close_removes_the_socket_started_or_not(program: GuestProgram, tmp_path: Path) -> None:
    with _machine(program) as machine:
        for start in (False, True):
            server = ApiServer(machine, tmp_path / "api.sock")
            if start:
                server.start()
            assert server.path.exists()
            server.close()
            assert not server.path.exists()
            server.close()  # a second close does nothing


def test_close_leaves_a_socket_someone_else_put_at_the_path(
    program: GuestProgram, tmp_path: Path
) -> None:
    with _machine(program) as machine:
        server = ApiServer(machine, tmp_path / "api.sock")
        server.path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(str(server.path))
            server.close()
            assert server.path.exists()


def test_a_path_where_a_server_answers_is_refused(served: Served) -> None:
    with pytest.raises(ApiSocketError, match=r"api\.sock: a server already answers there"):
        ApiServer(served.machine, served.path)
    assert _ask(served, "GET", "vm.info").status == 200  # the first one is untouched


def test_a_stale_socket_file_is_replaced(program: GuestProgram, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking: a crashed VMM's
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with _machine(program) as machine, ApiServer(machine, path) as server:
        server.start()
        assert request(path, "GET", "vm.info").body["state"] == "created"  # type: ignore[index]


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(
    program: GuestProgram, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "api.sock"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "elsewhere")
    with (
        _machine(program) as machine,
        pytest.raises(ApiSocketError, match="the path exists and is not a socket"),
    ):
        ApiServer(machine, path)
    assert os.path.lexists(path)
    assert kind != "file" or path.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["api.sock"]


def test_a_missing_directory_is_one_clear_error(program: GuestProgram, tmp_path: Path) -> None:
    with (
        _machine(program) as machine,
        pytest.raises(ApiSocketError, match=r"api\.sock: No such file or directory"),
    ):
        ApiServer(machine, tmp_path / "no" / "api.sock")


def test_a_path_too_long_for_sockaddr_un_works(program: GuestProgram, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "api.sock"
    assert len(os.fsencode(path)) > MAX_SOCKET_PATH
    with _machine(program) as machine, ApiServer(machine, path) as server:
        server.start()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert request(path, "GET", "vm.info").status == 200
        with pytest.raises(ApiSocketError, match="a server already answers there"):
            ApiServer(machine, path)
    assert not path.exists()


def test_snapshot_while_running_is_a_409_and_the_guest_runs_on(
    served: Served, tmp_path: Path
) -> None:
    reply = _ask(served, "PUT", "vm.snapshot", {"destination": str(tmp_path / "snap")})
    assert reply.status == 409
    assert reply.error == "snapshot() on a machine that is not created or paused (it is running)"
    assert not (tmp_path / "snap").exists()
    assert served.still_counting()


def test_a_snapshot_of_the_paused_guest_restores_and_runs_on(
    served: Served, tmp_path: Path
) -> None:
    destination = tmp_path / "snap"
    assert _ask(served, "PUT", "vm.pause").status == 200
    held = served.count()
    reply = _ask(served, "PUT", "vm.snapshot", {"destination": str(destination)})
    assert (reply.status, reply.body) == (200, {"state": "paused", "destination": str(destination)})
    assert sorted(os.listdir(destination)) == ["memory.bin", "state.json"]
    assert _ask(served, "PUT", "vm.resume").status == 200
    assert served.still_counting()  # the snapshot left the machine as it was
    with Machine.restore(destination) as restored:
        copy = Served(restored, served.server, served.count_at)
        assert copy.count() == held  # the snapshot's memory
        restored.start()
        assert copy.still_counting()
        restored.press_power_button()
        outcome = restored.wait(30)
        assert outcome is not None and outcome.reason == POWERED_OFF


SNAPSHOT_BODIES = {
    "no destination": ({}, "vm.snapshot needs the field 'destination'"),
    "a number": ({"destination": 7}, "vm.snapshot: 'destination' is a JSON int, not a string"),
    "a list": ({"destination": ["/tmp/x"]}, "'destination' is a JSON list, not a string"),
    "null": ({"destination": None}, "'destination' is a JSON NoneType, not a string"),
    "an extra field": (
        {"destination": "/tmp/x", "compress": True},
        "vm.snapshot takes only 'destination', not 'compress'",
    ),
    "relative": ({"destination": "snap"}, "destination 'snap' is not an absolute path"),
    "empty": ({"destination": ""}, "destination '' is not an absolute path"),
    "a NUL": ({"destination": "/tmp/a\0b"}, "is not an absolute path"),
}


@pytest.mark.parametrize("case", SNAPSHOT_BODIES)
def test_a_bad_snapshot_request_is_a_400_and_nothing_is_written(
    served: Served, tmp_path: Path, case: str
) -> None:
    body, message = SNAPSHOT_BODIES[case]
    assert _ask(served, "PUT", "vm.pause").status == 200
    before = sorted(os.listdir(tmp_path))
    reply = _ask(served, "PUT", "vm.snapshot", body)
    assert reply.status == 400, reply.error
    assert message in reply.error
    assert sorted(os.listdir(tmp_path)) == before
    assert _ask(served, "PUT", "vm.resume").status == 200
    assert served.still_counting()


def test_a_destination_the_snapshot_refuses_is_a_400_naming_it(
    served: Served, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    precious.write_text("mine")
    assert _ask(served, "PUT", "vm.pause").status == 200
    reply = _ask(served, "PUT", "vm.snapshot", {"destination": str(precious)})
    assert reply.status == 400
    assert (
        reply.error == f"snapshot {precious}: exists and is not a snapshot: refusing to replace it"
    )
    assert precious.read_text() == "mine"
    missing = tmp_path / "no" / "snap"
    reply = _ask(served, "PUT", "vm.snapshot", {"destination": str(missing)})
    assert reply.status == 400 and f"snapshot {missing}:" in reply.error
    assert _ask(served, "PUT", "vm.resume").status == 200
    assert served.still_counting()


def test_a_machine_with_a_device_a_snapshot_cannot_rebuild_is_a_409(
    program: GuestProgram, tmp_path: Path
) -> None:
    class Scratch:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    with _machine(program) as machine:
        machine.add_device(Scratch(), name="scratch", pio=(0x710, 1))
        with ApiServer(machine, tmp_path / "api.sock") as server:
            server.start()
            reply = request(server.path, "PUT", "vm.snapshot", {"destination": str(tmp_path / "s")})
            assert reply.status == 409
            assert "'scratch'" in reply.error
            assert not (tmp_path / "s").exists()
