"""The network boot test's helpers, on the host alone (seconds): the guest's /init
as sh parses it, with each step in order; the report read from console lines; and
the host's peer answering a stand-in guest on the loopback."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path

from network_guest import (
    BEGIN,
    END,
    SOCK_TOOL,
    HostPeer,
    NetPlan,
    network_steps,
    parse_report,
    sock_tool_entry,
)
from virtio_guest import GuestFiles, virtio_test_init, virtio_test_initramfs

from kvm_vmm.initramfs import read_newc
from kvm_vmm.testing import fake_module

PLAN = NetPlan()
NEEDED = {0x1041: ["virtio_net"], 0x1053: ["vsock", "vmw_vsock_virtio_transport"]}


FILES = GuestFiles("known.bin", "from-guest.txt", "written by the guest 1234")


def test_the_init_script_parses_and_does_each_step_in_order(tmp_path: Path) -> None:
    modules = ["virtio_net", "vsock", "vmw_vsock_virtio_transport"]
    script = virtio_test_init(modules, NEEDED, FILES, network_steps(PLAN))
    (tmp_path / "init").write_text(script)
    subprocess.run(["sh", "-n", str(tmp_path / "init")], check=True)
    order = [
        "insmod /lib/modules/$module.ko",
        "head -c 64 /dev/hwrng",
        BEGIN,
        f"ip addr add {PLAN.guest}/24 dev eth0",
        f"ping -c 3 -W 10 {PLAN.host}",
        f"connect tcp:{PLAN.host}:{PLAN.to_guest_port} pipe </dev/null >/tmp/in",
        "sha256sum /tmp/in",
        f"connect tcp:{PLAN.host}:{PLAN.from_guest_port} pipe </tmp/in",
        f"nc {PLAN.host} {PLAN.ping_port}",
        f"nc {PLAN.host} {PLAN.flap_port}",
        "PING-AFTER-FLAP",
        f"listen vsock:{PLAN.vsock_listen_port} stream 16 {PLAN.vsock_bytes}",
        f"listen vsock:{PLAN.vsock_echo_port} echo",
        f"connect vsock:2:{PLAN.vsock_host_port} stream 1",
        f"connect vsock:2:{PLAN.vsock_refused_port} ping 1",
        END,
        "/proc/interrupts",
        "poweroff -f",
    ]
    positions = [script.index(text) for text in order]
    assert positions == sorted(positions)


def test_the_initramfs_carries_the_tool_the_modules_and_the_script() -> None:
    net = fake_module("virtio_net")
    image = virtio_test_initramfs(
        b"bb", [("virtio_net", net)], FILES, network_steps(PLAN), [sock_tool_entry(b"tool")]
    )
    entries = {e.path: e for e in read_newc(image)}
    assert entries[SOCK_TOOL.lstrip("/")].data == b"tool"
    assert entries[SOCK_TOOL.lstrip("/")].mode & 0o111
    assert entries["lib/modules/virtio_net.ko"].data == net
    assert network_steps(PLAN) in entries["init"].data.decode()


CONSOLE = f"""KVM-VMM-INIT\r
{BEGIN}\r
NET-TEST MAC 52:54:00:12:34:56\r
NET-TEST PING-HOST ok\r
NET-TEST AT received 812.25\r
[   30.1] random: crng init done\r
NET-TEST RECEIVED 16777216 {"ab" * 32}\r
NET-TEST VSOCK-LISTEN BEGIN\r
SOCKTOOL LISTENING vsock:5000\r
SOCKTOOL CONN index=0 sent=4 sent_crc=00000001 received=4 received_crc=00000002 seconds=0.1\r
NET-TEST VSOCK-LISTEN END 0\r
NET-TEST VSOCK-REFUSED BEGIN\r
SOCKTOOL ERROR connect vsock:2:6001: errno=104 (Connection reset by peer)\r
NET-TEST VSOCK-REFUSED END 1\r
NET-TEST IRQ CPU0\r
NET-TEST IRQ 24:  5  PCI-MSI 16384-edge virtio0-input.0\r
{END}\r
"""


def test_the_report_is_read_from_the_console() -> None:
    report = parse_report(CONSOLE)
    assert report.complete and report.failed_modules == []
    assert report.values["MAC"] == "52:54:00:12:34:56"
    assert report.values["RECEIVED"] == f"16777216 {'ab' * 32}"
    assert report.values["VSOCK-LISTEN"] == "0" and report.values["VSOCK-REFUSED"] == "1"
    assert "SOCKTOOL CONN index=0" in report.sections["VSOCK-LISTEN"]
    assert "errno=104" in report.sections["VSOCK-REFUSED"]
    assert "virtio0-input.0" in report.values["IRQ"]
    assert report.times == {"received": 812.25}
    cut = parse_report(CONSOLE.split("NET-TEST VSOCK-LISTEN END")[0])
    assert not cut.complete and "VSOCK-LISTEN" not in cut.values


def test_the_host_peer_answers_each_step() -> None:
    ports = [free_port() for _ in range(4)]
    plan = NetPlan(
        host="127.0.0.1",
        tcp_bytes=300_000,
        to_guest_port=ports[0],
        from_guest_port=ports[1],
        ping_port=ports[2],
        flap_port=ports[3],
    )
    flaps: list[int] = []
    peer = HostPeer(plan, lambda: True, lambda: flaps.append(1), timeout=20)
    peer.listen()
    with socket.create_connection((plan.host, plan.to_guest_port)) as guest:
        received = b"".join(iter(lambda: guest.recv(65536), b""))
    sent = bytes(range(256)) * 1000
    with socket.create_connection((plan.host, plan.from_guest_port)) as guest:
        guest.sendall(sent)
        guest.shutdown(socket.SHUT_WR)
        assert guest.recv(1) == b""
    answers = []
    for port in (plan.ping_port, plan.flap_port):
        with socket.create_connection((plan.host, port)) as guest:
            answers.append(b"".join(iter(lambda g=guest: g.recv(64), b"")))
    peer.join(10)
    results = peer.results
    assert results.errors == []
    assert (len(received), hashlib.sha256(received).hexdigest()) == (
        results.sent_bytes,
        results.sent_sha256,
    )
    assert results.received_sha256 == hashlib.sha256(sent).hexdigest()
    assert answers == [b"ok\n", b"flapped\n"] and flaps == [1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
