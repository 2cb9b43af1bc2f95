"""``--net tap=NAME[,mac=52:54:00:12:34:56][,queues=2]``, Cloud Hypervisor's spelling.

Without ``tap=`` the kernel makes a TAP and names it (the CLI says which). ``queues``
counts receive and transmit queues together, as Cloud Hypervisor's does; only one pair
(2) exists until multi-queue does.

Only the words are checked here; the TAP itself (no permission, no /dev/net/tun, a TUN of
that name) is judged when kvmfast attaches it, with a message naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Linux's IFNAMSIZ is 16 with the NUL.
TAP_NAME_LENGTH = 15
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_SUPPORTED_QUEUES = 2
_USAGE = "tap=NAME[,mac=52:54:00:12:34:56][,queues=2]"


class NetSpecError(ValueError):
    """A --net value we do not understand, with what we do."""


@dataclass(frozen=True)
class NetSpec:
    tap: str | None = None
    mac: str | None = None


def parse_net_spec(text: str) -> NetSpec:
    tap: str | None = None
    mac: str | None = None
    for pair in text.split(",") if text else []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise NetSpecError(f"--net {text!r}: {pair!r} is not KEY=VALUE ({_USAGE})")
        if key == "tap":
            encoded = value.encode()
            if not value or len(encoded) > TAP_NAME_LENGTH or "/" in value or value.isspace():
                raise NetSpecError(
                    f"--net {text!r}: tap={value!r} is not an interface name"
                    f" (1 to {TAP_NAME_LENGTH} bytes)"
                )
            tap = value
        elif key == "mac":
            if not _MAC.fullmatch(value):
                raise NetSpecError(
                    f"--net {text!r}: mac={value!r} is not six hex pairs (52:54:00:12:34:56)"
                )
            if int(value[:2], 16) & 1:
                raise NetSpecError(f"--net {text!r}: mac={value} is a multicast address")
            mac = value.lower()
        elif key == "queues":
            if value != str(_SUPPORTED_QUEUES):
                raise NetSpecError(
                    f"--net {text!r}: queues={value!r}: only {_SUPPORTED_QUEUES}"
                    " (one receive and one transmit queue; no multi-queue yet)"
                )
        else:
            raise NetSpecError(f"--net {text!r}: unknown option {key!r} (tap, mac, queues)")
    return NetSpec(tap=tap, mac=mac)
