"""The client of the API socket (kvm_vmm.api_socket) and ``kvm-vmm remote``, its command
(the shape of Cloud Hypervisor's ch-remote).

    kvm-vmm remote --api-socket PATH info|pause|resume|snapshot DIR|counters|shutdown|stop

It prints the reply's JSON on stdout and exits 0 on a 2xx reply; 1 on an error reply
(its message on stderr); 2 on a usage error or when no server answers.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kvm_vmm.api_socket import API_PREFIX, connect_unix

REPLY_TIMEOUT = 120.0  # seconds: a snapshot of a large guest takes a while
REMOTE_OK = 0
REMOTE_ERROR_REPLY = 1
REMOTE_USAGE = 2


class ApiUnavailable(OSError):
    """No server answered at the socket's path, or it closed without a whole reply."""


@dataclass(frozen=True)
class Command:
    method: str
    endpoint: str
    # The request's body from the command's argument (None: it takes no argument).
    body: Callable[[str], dict[str, object]] | None = None


COMMANDS = {
    "info": Command("GET", "vm.info"),
    "pause": Command("PUT", "vm.pause"),
    "resume": Command("PUT", "vm.resume"),
    # The server's working directory is not ours: the path goes absolute.
    "snapshot": Command("PUT", "vm.snapshot", lambda path: {"destination": os.path.abspath(path)}),
    "counters": Command("GET", "vm.counters"),
    "shutdown": Command("PUT", "vm.shutdown"),
    "stop": Command("PUT", "vm.stop"),
}


@dataclass(frozen=True)
class ApiReply:
    status: int
    body: object  # the reply's JSON (None when it had none or it was not JSON)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> str:
        """The server's message of an error reply."""
        message = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(message, str):
            return message
        return f"HTTP {self.status} without an error message"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            connect_unix(sock, self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(
    path: str | os.PathLike[str],
    method: str,
    endpoint: str,
    body: dict[str, object] | None = None,
    *,
    timeout: float = REPLY_TIMEOUT,
) -> ApiReply:
    """Send one request to the API socket at ``path``; its reply, whatever its status.
    Raises :class:`ApiUnavailable` when no server answers (its message names the path)."""
    where = Path(path)
    connection = _UnixConnection(where, timeout)
    data = None if body is None else json.dumps(body).encode()
    headers = {} if data is None else {"Content-Type": "application/json"}
    try:
        connection.request(method, API_PREFIX + endpoint, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except TimeoutError:
        raise ApiUnavailable(f"{where}: no reply within {timeout:g} s") from None
    except http.client.HTTPException as error:
        raise ApiUnavailable(f"{where}: the server sent no whole reply ({error!r})") from None
    except OSError as error:
        raise ApiUnavailable(f"{where}: no API server answers ({error.strerror})") from None
    finally:
        connection.close()
    try:
        parsed: object = json.loads(raw) if raw.strip() else None
    except ValueError:
        parsed = None
    return ApiReply(response.status, parsed)


def remote(
    path: str | os.PathLike[str],
    name: str,
    argument: str | None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``kvm-vmm remote``: run ``name`` (a key of COMMANDS) against the socket at
    ``path``; print the reply; return the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    command = COMMANDS.get(name)
    if command is None:
        print(f"kvm-vmm remote: unknown command {name!r} ({', '.join(COMMANDS)})", file=err)
        return REMOTE_USAGE
    if (command.body is None) != (argument is None):
        wanted = "no argument" if command.body is None else "an argument"
        print(f"kvm-vmm remote: {name} takes {wanted}", file=err)
        return REMOTE_USAGE
    body = None if command.body is None or argument is None else command.body(argument)
    try:
        reply = request(path, command.method, command.endpoint, body)
    except ApiUnavailable as error:
        print(f"kvm-vmm remote: {error}", file=err)
        return REMOTE_USAGE
    if not reply.ok:
        print(f"kvm-vmm remote: {name}: {reply.error} (HTTP {reply.status})", file=err)
        return REMOTE_ERROR_REPLY
    print(json.dumps(reply.body, indent=2), file=out)
    return REMOTE_OK
