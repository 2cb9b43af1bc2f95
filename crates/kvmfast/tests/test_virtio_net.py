"""kvmfast.VirtioDevice.net on a real TAP, without a guest: the test plays the driver
(virtio 1.2 section 5.1), writing split rings into a VM's RAM, and the host side of the
link from a network namespace of its own (the TAP, its address and the test's sockets
all live there; nothing reaches the host's network). The device runs on the event
loop: the TX doorbell and the TAP's readability (EventLoop.add_readable)."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kvmfast_guest_support import wait_until
from split_rings import SplitRings

from kvmfast import EventFd, EventLoop, Kvm, VirtioDevice, VirtioError, Vm
from kvmfast.netns import Namespace, netns_unavailable_reason, private_netns

RAM_SIZE = 0x40000
SIZE = 16
RX, TX = 0, 1
RINGS = {RX: 0x1000, TX: 0x4000}  # descriptors; avail at +0x1000, used at +0x2000
RX_BUFFERS, TX_DATA = 0x10000, 0x30000
BUFFER = 2048
NEXT, WRITE = 1, 2
VERSION_1 = 1 << 32
F_MRG_RXBUF = 1 << 15
HEADER = 12
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP, HOST_IP = "10.77.0.2", "10.77.0.1"
TAP = "kvmt0"
ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800


@pytest.fixture
def netns() -> Iterator[Namespace]:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with private_netns("kvmfast-net") as namespace:
        yield namespace


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as vm:
        vm.add_memory(0, RAM_SIZE)
        yield vm


def wait_readable(eventfd: EventFd, timeout: float = 5.0) -> int:
    ready, _, _ = select.select([eventfd.fileno()], [], [], timeout)
    return eventfd.read() if ready else 0


@dataclass
class Driver:
    """The guest's side of the device's two queues, in `vm`'s RAM."""

    vm: Vm
    device: VirtioDevice
    rings: SplitRings = field(init=False)
    seen: dict[int, int] = field(default_factory=lambda: {RX: 0, TX: 0})
    next_rx: int = 0

    def activate(self, features: int) -> None:
        self.device.activate(self.vm, features, self.rings.queues())

    def __post_init__(self) -> None:
        self.rings = SplitRings(self.vm, RINGS, SIZE)

    def descriptor(self, queue: int, index: int, address: int, length: int, flags: int) -> None:
        self.rings.descriptor(queue, index, address, length, flags, index + 1)

    def offer(self, queue: int, head: int) -> None:
        self.rings.offer(queue, head)

    def used_idx(self, queue: int) -> int:
        return self.rings.used_idx(queue)

    def used(self, queue: int, n: int) -> tuple[int, int]:
        return self.rings.used(queue, n)

    def add_rx_buffers(self, count: int) -> None:
        for _ in range(count):
            index = self.next_rx % SIZE
            self.descriptor(RX, index, RX_BUFFERS + BUFFER * index, BUFFER, WRITE)
            self.offer(RX, index)
            self.next_rx += 1
        self.device.queue_notifier(RX).write(1)

    def transmit(self, header: bytes, frame: bytes) -> None:
        """One TX chain: the header and the frame in two descriptors."""
        self.vm.write(TX_DATA, header)
        self.vm.write(TX_DATA + 0x100, frame)
        self.descriptor(TX, 0, TX_DATA, len(header), NEXT)
        self.descriptor(TX, 1, TX_DATA + 0x100, len(frame), 0)
        self.offer(TX, 0)
        self.device.queue_notifier(TX).write(1)

    def received(self, timeout: float = 5.0) -> bytes:
        """The next frame in the RX ring (header included), waiting for it; frames
        the kernel sends on its own (IPv6 router solicitations...) come too."""
        if self.used_idx(RX) == self.seen[RX]:
            wait_readable(self.device.queue_interrupt(RX), timeout)
        assert wait_until(lambda: self.used_idx(RX) != self.seen[RX], timeout)
        head, length = self.used(RX, self.seen[RX])
        self.seen[RX] += 1
        return self.vm.read(RX_BUFFERS + BUFFER * head, length)


@dataclass
class Link:
    ns: Namespace
    device: VirtioDevice
    loop: EventLoop
    driver: Driver
    packet: socket.socket


def _serve(device: VirtioDevice) -> EventLoop:
    loop = EventLoop(coalesce_us=0)
    for queue in (RX, TX):
        loop.add(device.queue_notifier(queue), device.queue_handler(queue))
    handler = device.readable_handler()
    assert handler is not None
    loop.add_readable(handler)
    loop.start()
    return loop


@pytest.fixture
def link(netns: Namespace, vm: Vm) -> Iterator[Link]:
    with netns.inside():
        device = VirtioDevice.net(tap=TAP, mac=GUEST_MAC.hex(":"))
        packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    netns.ip("link", "set", TAP, "up")
    netns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
    # The guest's address known without ARP, and no IPv6 chatter on the link.
    netns.ip("neigh", "add", GUEST_IP, "lladdr", GUEST_MAC.hex(":"), "dev", TAP)
    packet.bind((TAP, ETH_P_ALL))
    packet.settimeout(5.0)
    loop = _serve(device)
    try:
        yield Link(netns, device, loop, Driver(vm, device), packet)
    finally:
        device.reset()
        loop.stop()
        packet.close()
        device.close()


def tap_mac(ns: Namespace) -> bytes:
    return ns.link_mac(TAP)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def echo_request(destination_mac: bytes, ident: int, payload: bytes) -> bytes:
    """An Ethernet frame: ICMP echo request from the guest to the TAP's address."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        ident,
        0,
        64,
        socket.IPPROTO_ICMP,
        0,
        socket.inet_aton(GUEST_IP),
        socket.inet_aton(HOST_IP),
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return destination_mac + GUEST_MAC + struct.pack("!H", ETH_P_IP) + ip + icmp


def is_echo_reply(frame: bytes, ident: int) -> bool:
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype != ETH_P_IP or frame[14 + 9] != socket.IPPROTO_ICMP:
        return False
    icmp = frame[14 + 20 :]
    return icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident


def no_offload_header() -> bytes:
    return bytes(HEADER)


@pytest.mark.kvm
def test_a_frame_sent_out_of_the_tap_arrives_in_an_rx_buffer(link: Link) -> None:
    link.driver.activate(VERSION_1 | F_MRG_RXBUF)
    link.driver.add_rx_buffers(8)
    frame = GUEST_MAC + tap_mac(link.ns) + struct.pack("!H", 0x88B5) + bytes(range(100))
    link.packet.send(frame)
    for _ in range(10):
        got = link.driver.received()
        if got[HEADER:] == frame:
            break
    else:
        raise AssertionError("the frame sent out of the TAP never arrived")
    flags, gso, _, _, _, _, num_buffers = struct.unpack("<BBHHHHH", got[:HEADER])
    assert (flags, gso, num_buffers) == (0, 0, 1)
    counters = link.device.counters()
    assert counters["rx_packets"] >= 1 and counters["rx_dropped"] == 0


@pytest.mark.kvm
def test_a_tx_chain_appears_on_the_tap(link: Link) -> None:
    link.driver.activate(VERSION_1)
    frame = tap_mac(link.ns) + GUEST_MAC + struct.pack("!H", 0x88B5) + b"from the guest" * 8
    link.driver.transmit(no_offload_header(), frame)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = link.packet.recv(4096)
        if seen == frame:
            break
    else:
        raise AssertionError("the transmitted frame never appeared on the TAP")
    assert wait_until(lambda: link.driver.used_idx(TX) == 1)
    assert link.driver.used(TX, 0) == (0, 0)
    assert link.device.counters()["tx_packets"] == 1


@pytest.mark.kvm
def test_an_echo_request_from_the_guest_gets_its_reply_through_rx(link: Link) -> None:
    link.driver.activate(VERSION_1 | F_MRG_RXBUF)
    link.driver.add_rx_buffers(8)
    link.driver.transmit(no_offload_header(), echo_request(tap_mac(link.ns), 0x4B56, b"ping" * 14))
    for _ in range(10):
        got = link.driver.received()
        if is_echo_reply(got[HEADER:], 0x4B56):
            break
    else:
        raise AssertionError("no echo reply came back")
    assert got[HEADER : HEADER + 6] == GUEST_MAC
    assert got[HEADER + 14 + 12 : HEADER + 14 + 20] == (
        socket.inet_aton(HOST_IP) + socket.inet_aton(GUEST_IP)
    )


@pytest.mark.kvm
def test_without_rx_buffers_frames_wait_in_the_tap_until_the_rx_doorbell(link: Link) -> None:
    link.driver.activate(VERSION_1 | F_MRG_RXBUF)
    frame = GUEST_MAC + tap_mac(link.ns) + struct.pack("!H", 0x88B5) + b"waiting" * 10
    link.packet.send(frame)
    assert wait_until(lambda: link.device.counters()["rx_deferred"] >= 1)
    assert link.device.counters()["rx_packets"] == 0
    link.driver.add_rx_buffers(8)
    for _ in range(10):
        if link.driver.received()[HEADER:] == frame:
            break
    else:
        raise AssertionError("the deferred frame was lost")
    assert link.device.counters()["rx_dropped"] == 0


@pytest.mark.kvm
def test_a_malformed_tx_chain_is_dropped_and_the_queue_goes_on(link: Link) -> None:
    link.driver.activate(VERSION_1)
    link.driver.transmit(bytes(8), b"")  # a header of 8 bytes and nothing else
    assert wait_until(lambda: link.driver.used_idx(TX) == 1)
    assert link.device.counters()["tx_dropped"] == 1
    assert not link.device.needs_reset
    frame = tap_mac(link.ns) + GUEST_MAC + struct.pack("!H", 0x88B5) + b"after" * 20
    link.driver.transmit(no_offload_header(), frame)
    assert wait_until(lambda: link.device.counters()["tx_packets"] == 1)


@pytest.mark.kvm
def test_deleting_the_tap_takes_the_link_down(link: Link) -> None:
    link.driver.activate(VERSION_1 | F_MRG_RXBUF)
    link.driver.add_rx_buffers(8)
    assert link.device.read_config(6, 2) == 1
    link.ns.ip("link", "del", TAP)
    assert wait_readable(link.device.config_interrupt()) == 1, link.device.counters()
    assert link.device.read_config(6, 2) == 0
    link.driver.transmit(no_offload_header(), bytes(60))
    assert wait_until(lambda: link.driver.used_idx(TX) == 1)
    assert not link.device.needs_reset


def test_a_new_tap_gets_a_kernel_name_and_bad_taps_and_macs_are_refused(
    netns: Namespace,
) -> None:
    netns.ip("tuntap", "add", "dev", "kvmtun0", "mode", "tun")
    with netns.inside():
        device = VirtioDevice.net()
        with pytest.raises(VirtioError, match="kvmtun0"):
            VirtioDevice.net(tap="kvmtun0")
        with pytest.raises(VirtioError, match=r"x{20}"):
            VirtioDevice.net(tap="x" * 20)
        for bad in ("52:54:00:12:34", "53:54:00:12:34:56", "zz:54:00:12:34:56"):
            with pytest.raises(VirtioError, match="MAC"):
                VirtioDevice.net(tap="kvmt1", mac=bad)
    assert device.tap_name is not None
    assert f" {device.tap_name}:" in netns.links()
    assert device.device_type == 1 and device.num_queues == 2
    mac = device.read_config(0, 6).to_bytes(6, "little")
    assert mac[:3] == GUEST_MAC[:3] and device.mac == mac.hex(":")
    device.close()


@pytest.mark.kvm
def test_a_tap_deleted_while_rx_waits_for_buffers_is_found_by_the_next_transmission(
    link: Link,
) -> None:
    # No RX buffers: a TAP parked with frames waiting is not watched, and a guest
    # that is not receiving finds the TAP gone when it transmits.
    link.driver.activate(VERSION_1)
    link.ns.ip("link", "del", TAP)
    link.driver.transmit(no_offload_header(), bytes(60))
    assert wait_readable(link.device.config_interrupt()) == 1, link.device.counters()
    assert link.device.read_config(6, 2) == 0
    assert link.device.counters()["tx_errors"] == 1
    assert not link.device.needs_reset


F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6 = (
    1 << bit for bit in (0, 1, 7, 8, 11, 12)
)
F_MAC, F_STATUS = 1 << 5, 1 << 16
NEEDS_CSUM, GSO_TCPV4 = 1, 1


def tcp_segment(destination_mac: bytes, payload: bytes) -> bytes:
    """An Ethernet frame: one TCP segment from the guest to the TAP's address, its
    checksum left to the device (NEEDS_CSUM: only the pseudo-header sum is in it)."""
    tcp_length = 20 + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + tcp_length,
        1,
        0x4000,
        64,
        socket.IPPROTO_TCP,
        0,
        socket.inet_aton(GUEST_IP),
        socket.inet_aton(HOST_IP),
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    pseudo = socket.inet_aton(GUEST_IP) + socket.inet_aton(HOST_IP)
    pseudo_sum = ~checksum(pseudo + struct.pack("!BBH", 0, socket.IPPROTO_TCP, tcp_length))
    tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 0, 5 << 4, 0x18, 65535, pseudo_sum & 0xFFFF, 0)
    return destination_mac + GUEST_MAC + struct.pack("!H", ETH_P_IP) + ip + tcp + payload


@pytest.mark.kvm
def test_a_real_tap_offers_the_offloads_and_takes_a_tso_packet(link: Link) -> None:
    features = link.device.device_features
    wanted = F_MAC | F_STATUS | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6
    assert features & wanted == wanted
    # This kernel's TAP takes TUNSETOFFLOAD: the guest offloads are offered too.
    assert features & (F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6) == (
        F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
    )
    link.driver.activate(VERSION_1 | F_CSUM | F_HOST_TSO4 | F_GUEST_CSUM | F_GUEST_TSO4)
    segment = tcp_segment(tap_mac(link.ns), bytes(range(256)) * 16)  # 4 KiB: 3 segments
    # hdr_len, gso_size, csum_start, csum_offset (virtio 1.2 section 5.1.6.2)
    header = struct.pack("<BBHHHHH", NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
    link.driver.transmit(header, segment)
    assert wait_until(lambda: link.driver.used_idx(TX) == 1)
    counters = link.device.counters()
    assert (counters["tx_packets"], counters["tx_errors"], counters["tx_dropped"]) == (1, 0, 0)
    # The kernel took it as one GSO packet of the whole length (a packet socket sees
    # it before segmentation).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len(link.packet.recv(65536)) == len(segment):
            break
    else:
        raise AssertionError("the TSO packet never appeared on the TAP")


@pytest.mark.kvm
def test_a_paused_device_leaves_frames_in_the_tap_and_resume_delivers_them(link: Link) -> None:
    link.driver.activate(VERSION_1 | F_MRG_RXBUF)
    link.driver.add_rx_buffers(8)
    link.device.pause()
    used = link.driver.used_idx(RX)
    frame = GUEST_MAC + tap_mac(link.ns) + struct.pack("!H", 0x88B5) + b"paused" * 10
    link.packet.send(frame)
    time.sleep(0.2)
    assert link.driver.used_idx(RX) == used  # guest RAM stands still while paused
    link.device.resume()
    for _ in range(10):
        if link.driver.received()[HEADER:] == frame:
            break
    else:
        raise AssertionError("the frame that came while paused was lost")


def test_without_cap_net_admin_the_error_names_the_tap_and_the_permission(
    netns: Namespace,
) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv(1) (util-linux) to drop CAP_NET_ADMIN")
    code = (
        "import kvmfast\n"
        "try:\n"
        "    kvmfast.VirtioDevice.net(tap='kvmt9')\n"
        "except kvmfast.VirtioError as error:\n"
        "    print(error)\n"
    )
    dropped = ["--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    result = subprocess.run(
        ["ip", "netns", "exec", netns.name, setpriv, *dropped, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "TAP kvmt9: no permission" in result.stdout
    assert " kvmt9:" not in netns.links()


def test_without_dev_net_tun_the_error_names_the_tap() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding /dev/net/tun needs root and unshare(1) for a mount namespace")
    code = (
        "import kvmfast\n"
        "try:\n"
        "    kvmfast.VirtioDevice.net(tap='kvmt9')\n"
        "except kvmfast.VirtioError as error:\n"
        "    print(error)\n"
    )
    # An empty /dev/net in a mount namespace of the child's own (the host's is untouched).
    script = f'mount -t tmpfs none /dev/net && exec {sys.executable} -c "$0"'
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "TAP kvmt9: /dev/net/tun: No such file or directory" in result.stdout
    assert Path("/dev/net/tun").exists()
