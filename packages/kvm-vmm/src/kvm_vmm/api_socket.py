"""The control API of a machine: HTTP/1.1 with JSON bodies on a Unix socket.

The shape of Cloud Hypervisor's and Firecracker's APIs, so that
``curl --unix-socket PATH -X PUT http://localhost/api/v1/vm.pause`` works; the endpoints
and replies are in docs/api-socket.md (:data:`ENDPOINTS`). One thread serves one
connection at a time, one request per connection (``Connection: close``): a client that
holds its connection open cannot shut the others out for longer than
:data:`CONNECTION_TIMEOUT`.

Nothing a client sends ends the machine or the server: a malformed request, a body too
large or not JSON, an unknown endpoint or method and a call the machine's state does not
allow each get a JSON reply ``{"error": "..."}`` with its status code (400, 404, 405,
409, 411, 413, 414, 431, 501); 500 means a bug of ours, and the machine runs on.

The socket is created owner-only (0600) without touching the process's umask (other
threads may be creating files): it is bound in a private directory beside ``path`` and
linked into place. A path where a server answers is refused; a stale socket file (no
server) is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvm_vmm.machine import Machine, MachineStateError, Outcome
from kvm_vmm.machine_state import NotSnapshottable
from kvm_vmm.snapshot import SnapshotError

API_PREFIX = "/api/v1/"
MAX_BODY = 64 * 1024
# Seconds a client may take over each read of its request.
CONNECTION_TIMEOUT = 10.0
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
_POLL_INTERVAL = 0.05  # how soon close() stops the serving loop
# What is read and discarded of a request after its reply, at most, before closing.
_LINGER_SECONDS = 0.5
_LINGER_BYTES = 4 * MAX_BODY


class ApiSocketError(OSError):
    """The API socket cannot be created at the path asked for (one line, the path in it)."""


class RequestError(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(
        self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


Fields = Mapping[str, object]


@dataclass(frozen=True)
class Endpoint:
    method: str
    action: Callable[[Machine, Fields], dict[str, object]]


def _no_fields(name: str, body: Fields) -> None:
    if body:
        unknown = ", ".join(map(repr, sorted(body)))
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} takes no fields: {unknown}")


def _string_field(name: str, body: Fields, field_name: str) -> str:
    """``body``'s one field ``field_name``, a string."""
    unknown = sorted(set(body) - {field_name})
    if unknown:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{name} takes only {field_name!r}, not {', '.join(map(repr, unknown))}",
        )
    if field_name not in body:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} needs the field {field_name!r}")
    value = body[field_name]
    if not isinstance(value, str):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{name}: {field_name!r} is a JSON {type(value).__name__}, not a string",
        )
    return value


def _outcome(outcome: Outcome | None) -> dict[str, object] | None:
    if outcome is None:
        return None
    return {"status": outcome.status, "reason": outcome.reason}


def _state(machine: Machine) -> dict[str, object]:
    return {"state": machine.state.value}


def _info(machine: Machine, body: Fields) -> dict[str, object]:
    _no_fields("vm.info", body)
    config = {
        item.name: value
        for item in fields(machine.config)
        # The console is an object of the host's, not a setting.
        if isinstance(value := getattr(machine.config, item.name), bool | int | float | str)
    }
    return {
        "state": machine.state.value,
        "config": config,
        "devices": [
            {"name": name, "model": type(model).__name__} for name, model in machine.devices.items()
        ],
        "outcome": _outcome(machine.outcome),
    }


def _counters(machine: Machine, body: Fields) -> dict[str, object]:
    _no_fields("vm.counters", body)
    return machine.stats()


def _pause(machine: Machine, body: Fields) -> dict[str, object]:
    _no_fields("vm.pause", body)
    machine.pause()
    return _state(machine)  # "finished" when the guest ended the run meanwhile


def _resume(machine: Machine, body: Fields) -> dict[str, object]:
    _no_fields("vm.resume", body)
    machine.resume()
    return _state(machine)


def _shutdown(machine: Machine, body: Fields) -> dict[str, object]:
    _no_fields("vm.shutdown", body)
    machine.press_power_button()
    return _state(machine)


def _snapshot(machine: Machine, body: Fields) -> dict[str, object]:
    destination = _string_field("vm.snapshot", body, "destination")
    # The server's working directory is not the client's: a relative path would land
    # where the client does not expect it.
    if not os.path.isabs(destination) or "\0" in destination:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"vm.snapshot: destination {destination!r} is not an absolute path",
        )
    try:
        machine.snapshot(destination)
    except SnapshotError as error:
        raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
    except NotSnapshottable as error:  # the machine's devices, not the request
        raise RequestError(HTTPStatus.CONFLICT, str(error)) from None
    except OSError as error:  # the destination cannot be written (EACCES, ENOSPC...)
        where = error.filename or destination
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"snapshot {destination}: {where}: {error.strerror}"
        ) from None
    return {**_state(machine), "destination": destination}


def _stop(machine: Machine, body: Fields) -> dict[str, object]:
    _no_fields("vm.stop", body)
    outcome = machine.stop()
    return {**_state(machine), "outcome": _outcome(outcome)}


ENDPOINTS: dict[str, Endpoint] = {
    "vm.info": Endpoint("GET", _info),
    "vm.counters": Endpoint("GET", _counters),
    "vm.pause": Endpoint("PUT", _pause),
    "vm.resume": Endpoint("PUT", _resume),
    "vm.snapshot": Endpoint("PUT", _snapshot),
    "vm.shutdown": Endpoint("PUT", _shutdown),
    "vm.stop": Endpoint("PUT", _stop),
}


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    body: Mapping[str, object]
    headers: Mapping[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An error found before the version is known still gets a status line and headers
    # (under "HTTP/0.9" BaseHTTPRequestHandler would send the bare body).
    default_request_version = "HTTP/1.0"
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def version_string(self) -> str:
        return "kvm-vmm"

    def address_string(self) -> str:
        return self.server.path  # a Unix socket's peer has no address

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the process's stderr is the VMM's and its stdout the guest's console."""

    # BaseHTTPRequestHandler calls do_<METHOD>; a method nobody defines is its 501.
    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """BaseHTTPRequestHandler's own errors (a malformed request line, a line too long,
        too many headers, an unknown method), as JSON like every other reply."""
        status = HTTPStatus(code)
        text = message or status.phrase
        if explain:
            text = f"{text}: {explain}"
        self.close_connection = True
        self._send(Reply(status, {"error": text}))

    def _dispatch(self) -> None:
        try:
            reply = Reply(HTTPStatus.OK, self._answer())
        except RequestError as error:
            reply = Reply(error.status, {"error": str(error)}, error.headers)
        except MachineStateError as error:
            reply = Reply(HTTPStatus.CONFLICT, {"error": str(error)})
        except Exception as error:  # a bug of ours: said, and the machine runs on
            reply = Reply(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"internal error: {type(error).__name__}: {error}"},
            )
        self._send(reply)

    def _answer(self) -> dict[str, object]:
        if len(self.requestline.split()) != 3:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request line has no HTTP version")
        path = urlsplit(self.path).path
        name = path.removeprefix(API_PREFIX) if path.startswith(API_PREFIX) else None
        endpoint = None if name is None else ENDPOINTS.get(name)
        if endpoint is None:
            known = ", ".join(API_PREFIX + name for name in ENDPOINTS)
            raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {path!r}; there are {known}")
        if self.command != endpoint.method:
            raise RequestError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{path} takes {endpoint.method}, not {self.command}",
                {"Allow": endpoint.method},
            )
        return endpoint.action(self.server.machine, self._body())

    def _body(self) -> Fields:
        """The request's JSON object ({} for no body)."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED,
                "a body in Transfer-Encoding is not accepted: send Content-Length",
            )
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return {}
        text = lengths[0].strip()
        if len(set(lengths)) > 1 or not (text.isascii() and text.isdigit()):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"Content-Length {', '.join(lengths)!r} is not a size"
            )
        length = int(text)
        if length > MAX_BODY:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"a body of {length} bytes: at most {MAX_BODY}",
            )
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            waited = self.server.request_timeout
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT, f"the body did not come within {waited:g} s"
            ) from None
        if len(data) < length:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"the body ended after {len(data)} of {length} bytes"
            )
        if not data.strip():
            return {}
        try:
            value = json.loads(data)
        except ValueError as error:  # UnicodeDecodeError included
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {error}") from None
        if not isinstance(value, dict):
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"the body is a JSON {type(value).__name__}, not an object"
            )
        return value

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.body, default=str).encode() + b"\n"
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _HttpServer(socketserver.BaseServer):
    """socketserver's loop over a listening socket bound elsewhere (see _listen_at)."""

    def __init__(
        self, listener: socket.socket, path: str, machine: Machine, timeout: float
    ) -> None:
        super().__init__(path, _Handler)
        self.socket = listener
        self.path = path
        self.machine = machine
        self.request_timeout = timeout  # each read of a request
        self._lock = threading.Lock()
        self._connection: socket.socket | None = None

    def fileno(self) -> int:
        return self.socket.fileno()

    def get_request(self) -> tuple[socket.socket, Any]:
        return self.socket.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connection = request
        try:
            super().process_request(request, client_address)
        finally:
            with self._lock:
                self._connection = None

    def stop_reading(self) -> None:
        """A handler waiting for a slow client's request gets end-of-file at once; one
        writing its reply finishes it."""
        with self._lock:
            if self._connection is not None:
                with contextlib.suppress(OSError):
                    self._connection.shutdown(socket.SHUT_RD)

    def shutdown_request(self, request: Any) -> None:
        """Close after a lingering read: a Unix socket closed with unread data (a body
        refused unread, a 413) resets its peer, which may then lose the reply."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            request.settimeout(_LINGER_SECONDS)
            deadline = time.monotonic() + _LINGER_SECONDS
            discarded = 0
            while discarded < _LINGER_BYTES and time.monotonic() < deadline:
                data = request.recv(65536)
                if not data:
                    break
                discarded += len(data)
        request.close()

    def server_close(self) -> None:
        self.socket.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # OSError: the client left before its reply
            print(f"kvm-vmm: api socket: {type(error).__name__}: {error}", file=sys.stderr)


class ApiServer:
    """``machine``'s control API on a Unix socket at ``path`` (docs/api-socket.md).

    The socket exists, owner-only, once the constructor returns; requests are served
    from :meth:`start` on, by one thread. ``timeout``: the seconds a client may take
    over each read of its request. :meth:`close` (before the machine's) stops
    serving, once a request being answered has its reply, and removes the socket file.
    """

    def __init__(
        self,
        machine: Machine,
        path: str | os.PathLike[str],
        *,
        timeout: float = CONNECTION_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        listener, self._identity = _listen_at(self.path)
        self._server = _HttpServer(listener, str(self.path), machine, timeout)
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self._closed or self._thread is not None:
            raise RuntimeError("ApiServer.start(): already started or closed")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_POLL_INTERVAL,),
            name="api-socket",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.stop_reading()
            self._server.shutdown()  # waits for the loop (only a started one ends)
            self._thread.join()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            found = os.lstat(self.path)
            if (found.st_dev, found.st_ino) == self._identity:  # not someone else's since
                self.path.unlink()

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listen_at(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A socket listening at ``path``, mode 0600, and its file's (device, inode)."""
    _refuse_live(path)
    try:
        directory = tempfile.mkdtemp(prefix=".kvm-vmm-api-", dir=path.parent)  # mode 0700
    except OSError as error:
        raise ApiSocketError(f"API socket {path}: {error.strerror} ({path.parent})") from None
    temporary = Path(directory) / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _bind(listener, directory)
        os.chmod(temporary, 0o600)  # no one else could reach it in the private directory
        listener.listen()
        found = os.lstat(temporary)
        _link(temporary, path)
        return listener, (found.st_dev, found.st_ino)
    except BaseException:
        listener.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        os.rmdir(directory)


def _bind(listener: socket.socket, directory: str) -> None:
    """Bind ``listener`` as ``directory``/s, through /proc/self/fd when that path is too
    long for a sockaddr_un (as systemd does)."""
    name = os.path.join(directory, "s")
    if len(os.fsencode(name)) <= MAX_SOCKET_PATH:
        listener.bind(name)
        return
    descriptor = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        listener.bind(f"/proc/self/fd/{descriptor}/s")
    finally:
        os.close(descriptor)


def _link(temporary: Path, path: Path) -> None:
    """Put the socket at ``path``: a stale socket file there is removed first; a file
    that appeared at a free path since _refuse_live() is not replaced (link() refuses)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise ApiSocketError(f"API socket {path}: created by someone else meanwhile") from None
    except OSError as error:
        raise ApiSocketError(f"API socket {path}: {error.strerror}") from None


def _refuse_live(path: Path) -> None:
    """Raise unless ``path`` is free or a socket nobody listens on (stale: replaced)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ApiSocketError(f"API socket {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(found.st_mode):
        raise ApiSocketError(f"API socket {path}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            connect_unix(probe, path)
        except ConnectionRefusedError:
            return  # stale: its server is gone
        except (TimeoutError, BlockingIOError):
            pass  # a server whose backlog is full is a live one
        except OSError as error:
            raise ApiSocketError(f"API socket {path}: {error.strerror}") from None
    raise ApiSocketError(f"API socket {path}: a server already answers there")


def connect_unix(sock: socket.socket, path: Path) -> None:
    """``sock.connect(path)``, through /proc/self/fd when ``path`` is too long for a
    sockaddr_un."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        sock.connect(os.fspath(path))
        return
    descriptor = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{descriptor}")
    finally:
        os.close(descriptor)
