"""The network boot test's two sides: the guest's network steps, and the host's peer.

The guest (the virtio test's busybox /init with these steps, plus sock_tool), its
virtio_net and vsock modules loaded, gives eth0 an address, pings the host, takes a
TCP stream from the host and sends it back (sha256 at both ends; sock_tool's
``pipe``, nc with 64 KiB calls where busybox nc makes 1 KiB ones: each call is
emulated kernel code here, and fresh bytes made in the guest would be too, so it
returns the host's random ones), asks the host
to ping it and to take its TAP down and up, and pings again; then, on vsock, it
listens for the host's 16 connections (CRC-32 at both ends), echoes a round trip of
the host's Python client (kvm_vmm.vsock_connect), connects once to a host listener at
CID 2, and once to a port nobody listens on. One marker line per check
(``NET-TEST <check> ...``).

The host's peer answers the guest's TCP connections, one port per step, inside the
test's network namespace: it is what makes each step's other end real.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvm_vmm.initramfs import MODULE_FAILED_MARKER, CpioEntry, regular_file

MARKER = "NET-TEST"
BEGIN = f"{MARKER} BEGIN"
END = f"{MARKER} END"
VSOCK_LISTEN_BEGIN = f"{MARKER} VSOCK-LISTEN BEGIN"
VSOCK_CONNECT_BEGIN = f"{MARKER} VSOCK-CONNECT BEGIN"
VSOCK_REFUSED_BEGIN = f"{MARKER} VSOCK-REFUSED BEGIN"
VSOCK_ECHO_BEGIN = f"{MARKER} VSOCK-ECHO BEGIN"
SOCK_TOOL = "/bin/sock_tool"


@dataclass(frozen=True)
class NetPlan:
    """Addresses, ports and sizes both sides agree on."""

    host: str = "10.77.0.1"
    guest: str = "10.77.0.2"
    prefix: int = 24
    to_guest_port: int = 5001  # the host sends its stream to the guest's connection
    from_guest_port: int = 5002  # the guest sends its stream
    ping_port: int = 5003  # the host pings the guest, answers "ok" or "failed"
    flap_port: int = 5004  # the host takes its TAP down and up, answers "flapped"
    # The sizes were 16 MiB of TCP and 16 x 4 MiB of vsock each way; here a
    # guest moves TCP at ~0.1 MB/s and vsock at ~0.2 MB/s (every copy and packet is
    # emulated kernel code: docs/networking.md has the runs), which would add ~20 min
    # to one CI boot. The full sizes ran by hand; python -m kvm_vmm.bench_net takes any.
    tcp_bytes: int = 4 << 20
    guest_cid: int = 3
    vsock_listen_port: int = 5000  # the guest listens; the host makes 16 connections
    vsock_echo_port: int = 5005  # the guest echoes; the host's Python client talks to it
    vsock_connections: int = 16
    vsock_bytes: int = 512 << 10
    vsock_host_port: int = 6000  # the host listens at PATH_6000; the guest connects
    vsock_host_bytes: int = 1 << 20
    vsock_refused_port: int = 6001  # nobody listens, on either side
    tool_seconds: int = 900


def network_steps(plan: NetPlan) -> str:
    """The guest's network and vsock steps (busybox sh), between its own BEGIN and END
    lines: a part of the virtio test's /init, run once the modules are loaded."""
    tool = f"{SOCK_TOOL} -t {plan.tool_seconds}"
    return f"""at() {{ echo "{MARKER} AT $1 $(cut -d ' ' -f 1 /proc/uptime)"; }}
echo "{BEGIN}"
at start
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    echo "{MARKER} MAC $(cat /sys/class/net/eth0/address)"
    ip addr add {plan.guest}/{plan.prefix} dev eth0 && ip link set eth0 up
    echo "{MARKER} LINK $(cat /sys/class/net/eth0/operstate)"
    if ping -c 3 -W 10 {plan.host} >/dev/null 2>&1; then r=ok; else r=failed; fi
    echo "{MARKER} PING-HOST $r"
    {tool} connect tcp:{plan.host}:{plan.to_guest_port} pipe </dev/null >/tmp/in
    # Read once: each pass over the file is emulated copying here.
    received="$(stat -c %s /tmp/in) $(sha256sum /tmp/in | cut -d ' ' -f 1)"
    echo "{MARKER} RECEIVED $received"
    at received
    echo "{MARKER} SENDING $received"
    {tool} connect tcp:{plan.host}:{plan.from_guest_port} pipe </tmp/in >/dev/null
    rm -f /tmp/in
    at sent
    echo "{MARKER} HOST-PING $(nc {plan.host} {plan.ping_port} </dev/null)"
    echo "{MARKER} FLAP $(nc {plan.host} {plan.flap_port} </dev/null)"
    if ping -c 3 -W 10 {plan.host} >/dev/null 2>&1; then r=ok; else r=failed; fi
    echo "{MARKER} PING-AFTER-FLAP $r"
    at net
else
    echo "{MARKER} NO-ETH0"
fi
if [ -e /dev/vsock ]; then
    echo "{VSOCK_LISTEN_BEGIN}"
    {tool} listen vsock:{plan.vsock_listen_port} stream {plan.vsock_connections} \
{plan.vsock_bytes}
    echo "{MARKER} VSOCK-LISTEN END $?"
    at vsock
    echo "{VSOCK_ECHO_BEGIN}"
    {tool} listen vsock:{plan.vsock_echo_port} echo
    echo "{MARKER} VSOCK-ECHO END $?"
    echo "{VSOCK_CONNECT_BEGIN}"
    {tool} connect vsock:2:{plan.vsock_host_port} stream 1 {plan.vsock_host_bytes}
    echo "{MARKER} VSOCK-CONNECT END $?"
    echo "{VSOCK_REFUSED_BEGIN}"
    {SOCK_TOOL} -t 60 connect vsock:2:{plan.vsock_refused_port} ping 1
    echo "{MARKER} VSOCK-REFUSED END $?"
else
    echo "{MARKER} NO-VSOCK"
fi
echo "{END}"
"""


def sock_tool_entry(sock_tool: bytes) -> CpioEntry:
    return regular_file(SOCK_TOOL.lstrip("/"), sock_tool, 0o755)


# -- what the guest printed ---------------------------------------------------------


@dataclass
class NetReport:
    """The guest's marker lines, parsed; ``complete`` when its END line came."""

    failed_modules: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # check -> the rest of its line
    sections: dict[str, str] = field(default_factory=dict)  # VSOCK-* -> its lines
    times: dict[str, float] = field(default_factory=dict)  # AT label -> guest uptime (s)
    complete: bool = False


def parse_report(console: str) -> NetReport:
    report = NetReport()
    if BEGIN not in console:
        return report
    section_name: str | None = None
    section_lines: list[str] = []
    for raw in console.split(BEGIN, 1)[1].replace("\r", "").splitlines():
        line = raw.strip()
        if line.startswith(MODULE_FAILED_MARKER):
            report.failed_modules.append(line.split()[1].rstrip(":"))
        if section_name is not None and not line.startswith(MARKER + " "):
            section_lines.append(line)
            continue
        if not line.startswith(MARKER + " "):
            continue
        check, _, rest = line[len(MARKER) + 1 :].partition(" ")
        if check == "END":
            report.complete = True
            break
        if check.startswith("VSOCK-") and rest == "BEGIN":
            section_name, section_lines = check, []
            continue
        if check.startswith("VSOCK-") and rest.startswith("END") and section_name == check:
            report.values[check] = rest.removeprefix("END").strip()
            report.sections[check] = "\n".join(section_lines)
            section_name = None
            continue
        if check == "AT":
            label, _, uptime = rest.partition(" ")
            report.times[label] = float(uptime) if uptime.replace(".", "").isdigit() else 0.0
        elif check == "IRQ":
            report.values["IRQ"] = report.values.get("IRQ", "") + rest + "\n"
        else:
            report.values[check] = rest
    return report


# -- the host's peer ----------------------------------------------------------------


@dataclass
class PeerResults:
    """What the host's side of each TCP step saw."""

    sent_sha256: str | None = None
    sent_bytes: int = 0
    received_sha256: str | None = None
    received_bytes: int = 0
    pinged_guest: bool | None = None
    flapped: bool = False
    errors: list[str] = field(default_factory=list)


@dataclass
class HostPeer:
    """One listening socket per step on the host's address, opened in the test's
    namespace by the caller; a thread answers each step's one connection."""

    plan: NetPlan
    ping_guest: Callable[[], bool]
    flap_tap: Callable[[], None]
    timeout: float
    results: PeerResults = field(default_factory=PeerResults)
    _threads: list[threading.Thread] = field(default_factory=list)

    def listen(self) -> None:
        """Open every port (call in the namespace) and start answering."""
        steps: dict[int, Callable[[socket.socket], None]] = {
            self.plan.to_guest_port: self._send_stream,
            self.plan.from_guest_port: self._receive_stream,
            self.plan.ping_port: self._ping,
            self.plan.flap_port: self._flap,
        }
        for port, step in steps.items():
            server = socket.create_server((self.plan.host, port))
            server.settimeout(self.timeout)
            thread = threading.Thread(target=self._answer, args=(server, step), daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _answer(self, server: socket.socket, step: Callable[[socket.socket], None]) -> None:
        with server:
            try:
                connection, _ = server.accept()
            except OSError as error:
                self.results.errors.append(f"{step.__name__}: accept: {error}")
                return
            with connection:
                connection.settimeout(self.timeout)
                try:
                    step(connection)
                except OSError as error:
                    self.results.errors.append(f"{step.__name__}: {error}")

    def _send_stream(self, connection: socket.socket) -> None:
        data = os.urandom(self.plan.tcp_bytes)
        self.results.sent_sha256 = hashlib.sha256(data).hexdigest()
        connection.sendall(data)
        self.results.sent_bytes = len(data)

    def _receive_stream(self, connection: socket.socket) -> None:
        digest = hashlib.sha256()
        while chunk := connection.recv(1 << 16):
            digest.update(chunk)
            self.results.received_bytes += len(chunk)
        self.results.received_sha256 = digest.hexdigest()

    def _ping(self, connection: socket.socket) -> None:
        self.results.pinged_guest = self.ping_guest()
        connection.sendall(b"ok\n" if self.results.pinged_guest else b"failed\n")

    def _flap(self, connection: socket.socket) -> None:
        self.flap_tap()
        self.results.flapped = True
        connection.sendall(b"flapped\n")


def wait_for_line(console: Path, text: str, timeout: float, alive: Callable[[], bool]) -> bool:
    """Whether ``text`` appears in the console file within ``timeout`` while the VMM
    runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and text in console.read_text(errors="replace"):
            return True
        if not alive():
            return False
        time.sleep(0.5)
    return False


def run_tool(tool: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), "-t", str(int(timeout)), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
