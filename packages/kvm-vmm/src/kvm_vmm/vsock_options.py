"""``--vsock cid=N,socket=PATH``, Cloud Hypervisor's spelling (one device at most).

``cid`` is the guest's context ID (3 to 2**32-1: 0-2 are the hypervisor, local and
host); ``socket`` is where the host side listens (Firecracker's protocol: a client
writes ``CONNECT <port>``; a guest connecting to the host's port P reaches
``PATH_P``). Only the words are checked here; a path in use is judged when kvmfast
binds it, with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The first CID a guest may have, and the last a driver takes (32 bits in Linux).
FIRST_GUEST_CID = 3
LAST_GUEST_CID = 2**32 - 1
# sun_path is 108 bytes with its NUL; PATH_<port> needs up to 11 more.
SOCKET_PATH_LENGTH = 107
_USAGE = "cid=N,socket=PATH"


class VsockSpecError(ValueError):
    """A --vsock value we do not understand, with what we do."""


@dataclass(frozen=True)
class VsockSpec:
    cid: int
    socket: str


def parse_vsock_spec(text: str) -> VsockSpec:
    cid: int | None = None
    socket: str | None = None
    for pair in text.split(",") if text else []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise VsockSpecError(f"--vsock {text!r}: {pair!r} is not KEY=VALUE ({_USAGE})")
        if key == "cid":
            if not value.isascii() or not value.isdigit():
                raise VsockSpecError(f"--vsock {text!r}: cid={value!r} is not a number")
            cid = int(value)
            if not FIRST_GUEST_CID <= cid <= LAST_GUEST_CID:
                raise VsockSpecError(
                    f"--vsock {text!r}: cid={cid} is reserved or too large"
                    f" ({FIRST_GUEST_CID} to {LAST_GUEST_CID}; 0-2 are the hypervisor,"
                    " local and host)"
                )
        elif key == "socket":
            if not value or "\0" in value or len(value.encode()) > SOCKET_PATH_LENGTH:
                raise VsockSpecError(
                    f"--vsock {text!r}: socket={value!r} is not a Unix socket path"
                    f" (1 to {SOCKET_PATH_LENGTH} bytes)"
                )
            socket = value
        else:
            raise VsockSpecError(f"--vsock {text!r}: unknown option {key!r} (cid, socket)")
    if cid is None or socket is None:
        missing = "cid" if cid is None else "socket"
        raise VsockSpecError(f"--vsock {text!r}: no {missing}= ({_USAGE})")
    return VsockSpec(cid=cid, socket=socket)
