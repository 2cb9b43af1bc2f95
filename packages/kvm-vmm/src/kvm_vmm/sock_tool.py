"""sock_tool.c, the stream-socket tool both ends of the virtio-net and vsock checks
run (AF_VSOCK, TCP, Unix sockets, and Firecracker's vsock host side), built static at
run time, and the lines it prints.

Each ``stream`` connection sends a pseudo-random stream of its own and reports the
CRC-32 (zlib's) of what it sent and received, so the other end, C or Python, checks
both directions: a connection's ``sent_crc`` is the peer's ``received_crc``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvm_vmm.static_tool import build_static_tool

SOURCE = "sock_tool.c"
MARKER = "SOCKTOOL"

_CONN = re.compile(
    MARKER + r" CONN index=(?P<index>\d+) sent=(?P<sent>\d+) sent_crc=(?P<sent_crc>[0-9a-f]{8}) "
    r"received=(?P<received>\d+) received_crc=(?P<received_crc>[0-9a-f]{8}) "
    r"seconds=(?P<seconds>[0-9.]+)"
)
_PING = re.compile(MARKER + r" PING count=(?P<count>\d+) seconds=(?P<seconds>[0-9.]+)")
_ERROR = re.compile(MARKER + r" ERROR (?P<what>[^\r\n]*)")


@dataclass(frozen=True)
class StreamEnd:
    """What one end of a stream connection sent and received (CRC-32s as ints)."""

    sent: int
    sent_crc: int
    received: int
    received_crc: int
    seconds: float = 0.0

    def mirrors(self, other: StreamEnd) -> bool:
        """The two ends of one connection: each received exactly what the other sent."""
        return (self.sent, self.sent_crc, self.received, self.received_crc) == (
            other.received,
            other.received_crc,
            other.sent,
            other.sent_crc,
        )


@dataclass(frozen=True)
class PingResult:
    count: int
    seconds: float

    @property
    def microseconds_per_round_trip(self) -> float:
        return self.seconds * 1e6 / self.count


def build_sock_tool(scratch: Path) -> Path:
    """The tool as a static executable (ToolUnavailable without gcc or a static libc)."""
    return build_static_tool(SOURCE, scratch, "sock_tool")


def stream_ends(output: str) -> list[StreamEnd]:
    """Every CONN line of ``output``, in the order printed."""
    return [
        StreamEnd(
            int(m["sent"]),
            int(m["sent_crc"], 16),
            int(m["received"]),
            int(m["received_crc"], 16),
            float(m["seconds"]),
        )
        for m in _CONN.finditer(output)
    ]


def ping_result(output: str) -> PingResult | None:
    match = _PING.search(output)
    if match is None or int(match["count"]) == 0:
        return None
    return PingResult(int(match["count"]), float(match["seconds"]))


def errors(output: str) -> list[str]:
    """What each ERROR line says."""
    return [m["what"] for m in _ERROR.finditer(output)]


def unmatched(ours: Iterable[StreamEnd], theirs: Iterable[StreamEnd]) -> list[StreamEnd]:
    """Our ends with no mirror among theirs (connections pair up in any order); an end
    of theirs is used once."""
    left = list(theirs)
    missing = []
    for end in ours:
        match = next((other for other in left if end.mirrors(other)), None)
        if match is None:
            missing.append(end)
        else:
            left.remove(match)
    return missing
