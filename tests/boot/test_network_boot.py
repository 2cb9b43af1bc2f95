"""Debian's cloud kernel on all our virtio devices in one boot (issues 16 and 18):
virtio-blk and virtio-rng as test_virtio_boot checks them, here on MSI-X vectors,
with virtio-net and virtio-vsock, inside a network namespace the test makes (the TAP
and every address live there; nothing leaves it):

- virtio-net on a TAP: the guest pings the host and the host the guest; a TCP stream
  each way with its sha256 checked at both ends; the host takes the TAP down and up
  and the link still carries pings.
- virtio-vsock with Firecracker's host side: the host makes 16 connections at once
  through the VMM's Unix socket (``CONNECT 5000``) to a guest listener, CRC-32s
  checked at both ends; ``kvm_vmm.vsock_connect`` (the README's example) makes a
  round trip through a guest echo; the guest connects to CID 2 and reaches a host
  listener at ``PATH_6000``; a port nobody listens on is refused on both sides.

The sizes are smaller than the issue's (network_guest.NetPlan says why). The VMM runs
as a user would: ``kvm-vmm run --disk path=IMAGE --net tap=NAME,mac=MAC --vsock
cid=3,socket=PATH``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import boot_timeout
from network_guest import (
    HostPeer,
    NetPlan,
    network_steps,
    parse_report,
    run_tool,
    sock_tool_entry,
    wait_for_line,
)
from virtio_guest import (
    KNOWN_SIZE,
    GuestFiles,
    bound,
    check_disk_rng_and_interrupts,
    make_ext4_image,
    virtio_test_initramfs,
    vmm_command,
)
from virtio_guest import parse_report as parse_virtio_report

from kvm_vmm.debian import GuestAssets
from kvm_vmm.sock_tool import build_sock_tool, errors, stream_ends, unmatched
from kvm_vmm.static_tool import ToolUnavailable
from kvm_vmm.vsock_client import VsockRefused, vsock_connect
from kvmfast.netns import Namespace, netns_unavailable_reason, private_netns

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

TAP = "nettest0"
# The namespace's TCP sends a slow guest whole 64 KiB TSO frames: Linux sizes a TSO
# frame to 1 ms of its pacing rate, and a guest whose emulated kernel takes tens of
# ms a packet makes that rate tiny, so by default it got one 1448-byte segment a
# frame and paid its per-packet cost for each (tcp_tso_autosize). Reno: no pacing of
# its own (BBR, this host's default, paces), and every kernel has it.
HOST_TCP_SETTINGS = {"tcp_congestion_control": "reno", "tcp_min_tso_segs": "44"}
ECHO_PAYLOAD = b"a round trip through the guest's vsock echo"
GUEST_MAC = "52:54:00:12:34:56"
CMDLINE = "console=ttyS0 panic=-1"
NET_TYPE, VSOCK_TYPE = 1, 19  # virtio device IDs (virtio 1.2, 5)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    reason = netns_unavailable_reason()
    if reason is None and shutil.which("ping") is None:
        reason = "no ping(8) to ping the guest (Debian: apt-get install iputils-ping)"
    if reason is not None:
        pytest.fail(f"CI runs as root with iproute2, iputils-ping and /dev/net/tun: {reason}")
    with private_netns("kvm-vmm-net-boot") as ns:
        yield ns


@pytest.fixture(scope="module")
def sock_tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_sock_tool(tmp_path_factory.mktemp("sock-tool"))
    except ToolUnavailable as error:
        pytest.fail(f"CI installs gcc and libc6-dev: {error}")


def ns_run(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns.name, *args], capture_output=True, text=True, check=False
    )


@dataclass
class NetworkRun:
    """What one boot of the network guest left: the VMM's status and stderr, the
    console, the host peer's results and the host ends of the vsock steps."""

    status: int
    stderr: str
    console: str
    peer: HostPeer
    listening: bool
    host_streams: subprocess.CompletedProcess[str] | None
    echoed: bytes | None  # what the guest's echo sent back to kvm_vmm.vsock_connect
    refused: str | None  # VsockRefused's message for a port nobody listens on
    host_listener_out: str


def run_network_guest(
    guest: GuestAssets,
    namespace: Namespace,
    sock_tool: Path,
    tmp_path: Path,
    plan: NetPlan,
    disk: tuple[Path, GuestFiles],
    vmm_args: Sequence[str] = (),
) -> NetworkRun:
    """Boots the virtio guest with its disk, a NIC on a TAP in ``namespace`` and a
    vsock device, and plays the host's side of the network steps."""
    image, files = disk
    namespace.ip("link", "set", "lo", "up")
    for setting, value in HOST_TCP_SETTINGS.items():
        written = ns_run(namespace, "sh", "-c", f"echo {value} > /proc/sys/net/ipv4/{setting}")
        assert written.returncode == 0, written.stderr
    namespace.ip("tuntap", "add", "dev", TAP, "mode", "tap")
    namespace.ip("addr", "add", f"{plan.host}/{plan.prefix}", "dev", TAP)
    namespace.ip("link", "set", TAP, "up")

    def ping_guest() -> bool:
        return ns_run(namespace, "ping", "-c", "3", "-W", "10", plan.guest).returncode == 0

    def flap_tap() -> None:
        namespace.ip("link", "set", TAP, "down")
        ns_run(namespace, "sleep", "1")
        namespace.ip("link", "set", TAP, "up")

    # A boot, then minutes of emulated network work: twice a boot's bound.
    timeout = 2 * boot_timeout()
    peer = HostPeer(plan, ping_guest, flap_tap, timeout)
    with namespace.inside():
        peer.listen()
    vsock_path = tmp_path / "vsock.sock"
    host_listener = subprocess.Popen(
        [
            str(sock_tool),
            "-t",
            str(int(timeout)),
            "listen",
            f"unix:{vsock_path}_{plan.vsock_host_port}",
            "stream",
            "1",
            str(plan.vsock_host_bytes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert host_listener.stdout is not None
    assert host_listener.stdout.readline().startswith("SOCKTOOL LISTENING")

    modules = [(path.stem, path.read_bytes()) for path in guest.modules]
    initrd = tmp_path / "virtio-initramfs.cpio"
    initrd.write_bytes(
        virtio_test_initramfs(
            guest.busybox.read_bytes(),
            modules,
            files,
            network_steps(plan),
            [sock_tool_entry(sock_tool.read_bytes())],
        )
    )
    console = tmp_path / "console.txt"
    devices = [
        "--disk",
        f"path={image}",
        "--net",
        f"tap={TAP},mac={GUEST_MAC}",
        "--vsock",
        f"cid={plan.guest_cid},socket={vsock_path}",
    ]
    vmm = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            namespace.name,
            *vmm_command(guest, initrd, CMDLINE, console, devices, timeout),
            *vmm_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        listening = wait_for_line(
            console,
            f"SOCKTOOL LISTENING vsock:{plan.vsock_listen_port}",
            timeout,
            lambda: vmm.poll() is None,
        )
        host_streams = (
            run_tool(
                sock_tool,
                "connect",
                f"fc:{vsock_path}:{plan.vsock_listen_port}",
                "stream",
                str(plan.vsock_connections),
                str(plan.vsock_bytes),
                timeout=plan.tool_seconds,
            )
            if listening
            else None
        )
        echoed, refused = host_python_client(console, vsock_path, plan, alive=vmm.poll)
        _, stderr = vmm.communicate(timeout=timeout + 120)
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.communicate()
        host_listener.kill()
    host_out, _ = host_listener.communicate()
    peer.join(10)

    return NetworkRun(
        vmm.returncode,
        stderr,
        console.read_text(errors="replace") if console.exists() else "",
        peer,
        listening,
        host_streams,
        echoed,
        refused,
        host_out,
    )


def host_python_client(
    console: Path, vsock_path: Path, plan: NetPlan, alive: Callable[[], int | None]
) -> tuple[bytes | None, str | None]:
    """kvm_vmm.vsock_connect as a user's script calls it: a round trip through the
    guest's echo once it listens, then a port nobody listens on."""
    echoed = None
    listening = f"SOCKTOOL LISTENING vsock:{plan.vsock_echo_port}"
    if wait_for_line(console, listening, plan.tool_seconds, lambda: alive() is None):
        with vsock_connect(vsock_path, plan.vsock_echo_port) as stream:
            stream.sendall(ECHO_PAYLOAD)
            stream.shutdown(socket.SHUT_WR)
            echoed = b"".join(iter(lambda: stream.recv(4096), b""))
    try:
        vsock_connect(vsock_path, plan.vsock_refused_port).close()
    except VsockRefused as refusal:
        return echoed, str(refusal)
    return echoed, None


@pytest.mark.usefixtures("boots_to_init")
def test_linux_on_virtio_blk_rng_net_and_vsock(
    guest_assets: GuestAssets, namespace: Namespace, sock_tool: Path, tmp_path: Path
) -> None:
    plan = NetPlan()
    files = GuestFiles("known.bin", "from-guest.txt", f"written by the guest {os.getpid()}")
    known = os.urandom(KNOWN_SIZE)
    image = tmp_path / "disk.img"
    make_ext4_image(image, {files.known: known})
    run = run_network_guest(guest_assets, namespace, sock_tool, tmp_path, plan, (image, files))
    disk_report, report = parse_virtio_report(run.console), parse_report(run.console)
    context = f"status {run.status}\n{run.stderr[-2000:]}\n{run.console[-4000:]}"
    assert run.status == 0, context
    assert disk_report.complete and disk_report.failed_modules == [], context
    assert report.complete, context

    # virtio-blk and virtio-rng on MSI-X, Linux's choice (test_virtio_boot: on INTx).
    check_disk_rng_and_interrupts(disk_report, image, files, known, "msix", context)
    net = bound(disk_report, NET_TYPE, "virtio_net")
    assert any(
        line.chip.startswith("PCI-MSI") and sum(line.counts) > 0
        for line in disk_report.interrupts_of(net)
    ), disk_report.interrupts
    bound(disk_report, VSOCK_TYPE, "vmw_vsock_virtio_transport")

    values, peer = report.values, run.peer.results

    # virtio-net: the MAC we gave, pings both ways, 16 MiB each way intact.
    assert values.get("MAC") == GUEST_MAC, context
    assert values.get("PING-HOST") == "ok", context
    assert peer.errors == [], peer
    assert peer.sent_bytes == plan.tcp_bytes
    assert values.get("RECEIVED") == f"{plan.tcp_bytes} {peer.sent_sha256}", context
    assert values.get("SENDING") == f"{plan.tcp_bytes} {peer.received_sha256}", (context, peer)
    assert values.get("HOST-PING") == "ok" and peer.pinged_guest, context
    assert values.get("FLAP") == "flapped" and peer.flapped, context
    assert values.get("PING-AFTER-FLAP") == "ok", context

    # virtio-vsock: the host's connections, each mirrored by a guest end.
    assert run.listening and run.host_streams is not None, context
    host_streams = run.host_streams
    assert host_streams.returncode == 0, (host_streams.stdout, host_streams.stderr, context)
    host_ends = stream_ends(host_streams.stdout)
    guest_ends = stream_ends(report.sections.get("VSOCK-LISTEN", ""))
    assert len(host_ends) == len(guest_ends) == plan.vsock_connections, context
    assert {end.sent for end in host_ends} == {plan.vsock_bytes}
    assert unmatched(host_ends, guest_ends) == [], (host_ends, guest_ends)
    assert values.get("VSOCK-LISTEN") == "0", context
    # The Python client's round trip through the guest's echo (the README's example).
    assert run.echoed == ECHO_PAYLOAD, (run.echoed, context)
    assert values.get("VSOCK-ECHO") == "0", context
    assert f"SOCKTOOL ECHO bytes={len(ECHO_PAYLOAD)}" in report.sections["VSOCK-ECHO"]
    # The guest reached the host's PATH_6000 listener.
    assert values.get("VSOCK-CONNECT") == "0", context
    host_listener_ends = stream_ends(run.host_listener_out)
    assert len(host_listener_ends) == 1, run.host_listener_out
    assert unmatched(stream_ends(report.sections["VSOCK-CONNECT"]), host_listener_ends) == []
    # Nobody listens on 6001: refused to the host (no OK) and to the guest (a reset).
    assert run.refused is not None and "refused" in run.refused, (run.refused, context)
    assert values.get("VSOCK-REFUSED") == "1", context
    guest_refusal = errors(report.sections["VSOCK-REFUSED"])
    assert len(guest_refusal) == 1 and guest_refusal[0].startswith("connect vsock:2:"), context
    assert "errno=104" in guest_refusal[0], guest_refusal  # ECONNRESET: the device's RST
