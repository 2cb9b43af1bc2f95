"""What kvm_vmm.bench_net measures, as sock_tool command lines: the guest's phases
(the guest listens, the host connects), the same actions on the host alone (the
floors: loopback TCP, a Unix socket), and the guest's /init that runs its side.

Every measurement is one sock_tool connection or ping run: ``stream 1 BYTES`` on the
sending end and ``stream 1 0`` on the receiving end (whose CONN line times the
transfer, from accept or connect to the sender's end of stream), or ``ping COUNT``
against ``echo``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kvm_vmm.initramfs import INIT_REACHED_MARKER, load_modules

Transport = Literal["tcp", "vsock"]
Kind = Literal["host_to_guest", "guest_to_host", "ping"]

MARKER = "NETBENCH"
TOOL_IN_GUEST = "/bin/sock_tool"
GUEST_IP, HOST_IP, PREFIX = "10.78.0.2", "10.78.0.1", 24
GUEST_MAC = "52:54:00:4e:42:02"
GUEST_CID = 3
GUEST_INTERFACE = "eth0"
# The guest sleeps this long after each phase, so that the host's sample at its end
# does not catch the next phase's fork and exec (emulated kernel code, ~0.6 s).
PAUSE_SECONDS = 2
_NAME = re.compile(r"^[a-z_]+$")


@dataclass(frozen=True)
class Phase:
    """One measurement in the guest: the guest listens on ``port`` of ``transport``."""

    transport: Transport
    kind: Kind
    port: int

    @property
    def name(self) -> str:
        return f"{self.transport}_{self.kind}"

    @property
    def floor_name(self) -> str:
        """The host-only measurement it is compared with: vsock's host side is a Unix
        socket, so its floor is one; TCP's is the host's loopback."""
        transport = "tcp" if self.transport == "tcp" else "unix"
        return f"{transport}_{'ping' if self.kind == 'ping' else 'stream'}"


PHASES: tuple[Phase, ...] = (
    Phase("tcp", "host_to_guest", 5001),
    Phase("tcp", "guest_to_host", 5002),
    Phase("tcp", "ping", 5003),
    Phase("vsock", "host_to_guest", 5101),
    Phase("vsock", "guest_to_host", 5102),
    Phase("vsock", "ping", 5103),
)


def actions(kind: Kind, stream_bytes: int, count: int) -> tuple[list[str], list[str]]:
    """sock_tool's action words for the listening end and the connecting end."""
    if kind == "host_to_guest":  # the connecting end (the host) sends
        return ["stream", "1", "0"], ["stream", "1", str(stream_bytes)]
    if kind == "guest_to_host":
        return ["stream", "1", str(stream_bytes)], ["stream", "1", "0"]
    return ["echo"], ["ping", str(count)]


def receiver_listens(kind: Kind) -> bool:
    """Whether the listening end receives the stream (its CONN line times it)."""
    return kind == "host_to_guest"


def guest_address(phase: Phase) -> str:
    return f"{phase.transport}:{phase.port}"


def host_address(phase: Phase, vsock_socket: str) -> str:
    """Where the host connects: the guest's IP over the TAP, or the VMM's vsock socket
    (Firecracker's CONNECT)."""
    if phase.transport == "tcp":
        return f"tcp:{GUEST_IP}:{phase.port}"
    return f"fc:{vsock_socket}:{phase.port}"


def floor_addresses(floor_name: str, port: int, unix_path: str) -> tuple[str, str]:
    """(listen, connect) addresses of a host-only run."""
    if floor_name.startswith("tcp"):
        return f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"
    return f"unix:{unix_path}", f"unix:{unix_path}"


# -- the guest's /init ----------------------------------------------------------------


def bench_init(
    modules: Sequence[str],
    needed: Mapping[int, Sequence[str]],
    phases: Sequence[Phase],
    stream_bytes: int,
    count: int,
    tool_seconds: int,
    tool: str = TOOL_IN_GUEST,
) -> str:
    """The guest's /init (busybox sh): load the virtio modules, give eth0 its address,
    run the guest's side of each phase in order (one marker line before and after),
    power off."""
    runs = []
    for phase in phases:
        if not _NAME.match(phase.name):
            raise ValueError(f"phase name {phase.name!r}: lower-case letters and '_' only")
        listen_action, _ = actions(phase.kind, stream_bytes, count)
        runs.append(f"phase {phase.name} {guest_address(phase)} {' '.join(listen_action)}\n")
    return f"""#!/bin/sh
# kvm_vmm.bench_net: the guest's end of each phase (it listens, the host connects).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{INIT_REACHED_MARKER}"
{load_modules(modules, needed)}ip addr add {GUEST_IP}/{PREFIX} dev {GUEST_INTERFACE} \
&& ip link set {GUEST_INTERFACE} up \
|| echo "{MARKER} ERROR {GUEST_INTERFACE} could not be configured"
echo "{MARKER} NET $(cat /sys/class/net/{GUEST_INTERFACE}/address 2>/dev/null) \
$(cat /sys/class/net/{GUEST_INTERFACE}/mtu 2>/dev/null)"
for device in /sys/bus/virtio/devices/*; do
    [ -e "$device/features" ] || continue
    echo "{MARKER} VIRTIO $(cat "$device/device") $(cat "$device/features")"
done
phase() {{
    name=$1
    shift
    echo "{MARKER} PHASE $name"
    {tool} -t {tool_seconds} listen "$@"
    echo "{MARKER} PHASE-END $name $?"
    sleep {PAUSE_SECONDS}
}}
{"".join(runs)}echo "{MARKER} END"
poweroff -f
"""


# Whole lines only: expect() may see one half-written.
GUEST_LINE = re.compile(
    rb"(?:NETBENCH (?:NET|VIRTIO|PHASE|PHASE-END|ERROR|END)|SOCKTOOL (?:LISTENING|ERROR))"
    rb"[^\r\n]*[\r\n]"
)


@dataclass(frozen=True)
class GuestLine:
    kind: str  # NET, VIRTIO, PHASE, PHASE-END, ERROR, END, LISTENING, TOOL-ERROR
    words: tuple[str, ...]


def parse_guest_line(line: str) -> GuestLine:
    words = line.split()
    if words[:2] == ["SOCKTOOL", "LISTENING"]:
        return GuestLine("LISTENING", tuple(words[2:]))
    if words[:2] == ["SOCKTOOL", "ERROR"]:
        return GuestLine("TOOL-ERROR", tuple(words[2:]))
    return GuestLine(words[1], tuple(words[2:]))
