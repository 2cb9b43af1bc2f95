"""kvmfast.VirtioDevice.vsock without a guest kernel: the test plays the driver (virtio
1.2 section 5.10), writing split rings into a VM's RAM and answering the device's
packets, and the host through the device's Unix sockets (Firecracker's protocol:
``CONNECT <port>`` on PATH, listeners at PATH_<port>). The device runs on the event
loop: its doorbells and its own epoll set of host sockets (EventLoop.add_readable)."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from split_rings import SplitRings

from kvmfast import EventLoop, Kvm, VirtioDevice, VirtioError, Vm

RAM_SIZE = 0x800000
SIZE = 64
RX, TX, EVENT = 0, 1, 2
RINGS = {RX: 0x1000, TX: 0x4000, EVENT: 0x7000}  # descriptors; avail +0x1000, used +0x2000
RX_BUFFERS, RX_BUFFER = 0x10000, 0x1000
TX_BUFFERS, TX_BUFFER = 0x100000, 0x10000
WRITE = 2
VERSION_1 = 1 << 32
CID, HOST_CID = 3, 2
HEADER = struct.Struct("<QQIIIHHIII")
STREAM = 1
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
SHUT_RECEIVE, SHUT_SEND = 1, 2
DEVICE_BUF_ALLOC = 256 * 1024
GUEST_BUF_ALLOC = 256 * 1024
CHUNK = 32 * 1024


@dataclass
class Packet:
    src_port: int
    dst_port: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes


@dataclass
class Stream:
    """One stream as the guest's side sees it (guest port, host port)."""

    received: bytearray = field(default_factory=bytearray)
    established: bool = False
    reset: bool = False
    host_shutdown: int = 0
    # The device's credit, from its last packet; what we sent it.
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    # Our side: bytes taken from the device, and as last told to it.
    fwd_cnt: int = 0
    fwd_told: int = 0

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))


@dataclass
class Guest:
    """The driver's side of the device's three queues, in `vm`'s RAM."""

    vm: Vm
    device: VirtioDevice
    rings: SplitRings = field(init=False)
    rx_seen: int = 0
    tx_seen: int = 0
    tx_free: list[int] = field(default_factory=lambda: list(range(SIZE)))
    streams: dict[tuple[int, int], Stream] = field(default_factory=dict)
    listening: set[int] = field(default_factory=set)
    resets_to_no_stream: list[Packet] = field(default_factory=list)
    packets: int = 0

    def activate(self) -> None:
        self.device.activate(self.vm, VERSION_1, self.rings.queues())
        for index in range(SIZE):
            address = RX_BUFFERS + RX_BUFFER * index
            self.descriptor(RX, index, address, RX_BUFFER, WRITE)
            self.offer(RX, index)
        self.device.queue_notifier(RX).write(1)

    def __post_init__(self) -> None:
        self.rings = SplitRings(self.vm, RINGS, SIZE)

    def descriptor(self, queue: int, index: int, address: int, length: int, flags: int) -> None:
        self.rings.descriptor(queue, index, address, length, flags, 0)

    def offer(self, queue: int, head: int) -> None:
        self.rings.offer(queue, head)

    def used_idx(self, queue: int) -> int:
        return self.rings.used_idx(queue)

    def used(self, queue: int, n: int) -> tuple[int, int]:
        return self.rings.used(queue, n)

    def send(
        self, op: int, src_port: int, dst_port: int, data: bytes = b"", flags: int = 0
    ) -> None:
        """One tx packet (header and payload in one buffer), within the queue's room."""
        deadline = time.monotonic() + 10
        while not self.tx_free:
            self.reclaim_tx()
            assert time.monotonic() < deadline, "the device does not complete tx chains"
        stream = self.streams.get((src_port, dst_port))
        fwd_cnt = 0
        if stream is not None:
            fwd_cnt = stream.fwd_cnt
            stream.fwd_told = stream.fwd_cnt
            if op == RW:
                stream.tx_cnt += len(data)
        header = HEADER.pack(
            CID,
            HOST_CID,
            src_port,
            dst_port,
            len(data),
            STREAM,
            op,
            flags,
            GUEST_BUF_ALLOC,
            fwd_cnt,
        )
        head = self.tx_free.pop()
        address = TX_BUFFERS + TX_BUFFER * head
        self.vm.write(address, header + data)
        self.descriptor(TX, head, address, len(header) + len(data), 0)
        self.offer(TX, head)
        self.device.queue_notifier(TX).write(1)

    def reclaim_tx(self) -> None:
        used = self.used_idx(TX)
        while self.tx_seen != used:
            head, _ = self.used(TX, self.tx_seen)
            self.tx_free.append(head)
            self.tx_seen = (self.tx_seen + 1) & 0xFFFF

    def poll(self, timeout: float = 0.01) -> int:
        """Takes the packets the device put in the rx ring (answering as a driver
        does: RESPONSE on a listening port, RST otherwise, credit updates), gives the
        buffers back; how many there were."""
        interrupt = self.device.queue_interrupt(RX)
        ready, _, _ = select.select([interrupt.fileno()], [], [], timeout)
        if ready:
            interrupt.read()
        self.reclaim_tx()
        used = self.used_idx(RX)
        count = 0
        while self.rx_seen != used:
            head, length = self.used(RX, self.rx_seen)
            raw = self.vm.read(RX_BUFFERS + RX_BUFFER * head, length)
            self.handle(raw)
            self.offer(RX, head)
            self.rx_seen = (self.rx_seen + 1) & 0xFFFF
            count += 1
        if count:
            self.device.queue_notifier(RX).write(1)
        self.packets += count
        return count

    def handle(self, raw: bytes) -> None:
        fields = HEADER.unpack(raw[: HEADER.size])
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = fields
        assert (src_cid, dst_cid, kind) == (HOST_CID, CID, STREAM)
        assert length == len(raw) - HEADER.size
        packet = Packet(src_port, dst_port, op, flags, buf_alloc, fwd_cnt, raw[HEADER.size :])
        key = (dst_port, src_port)
        if op == REQUEST:
            if dst_port in self.listening and key not in self.streams:
                accepted = self.streams[key] = Stream(established=True)
                accepted.peer_buf_alloc, accepted.peer_fwd_cnt = buf_alloc, fwd_cnt
                self.send(RESPONSE, dst_port, src_port)
            else:
                self.send(RST, dst_port, src_port)
            return
        stream = self.streams.get(key)
        if stream is None:
            if op == RST:
                self.resets_to_no_stream.append(packet)
            return
        stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == RESPONSE:
            stream.established = True
        elif op == RST:
            stream.reset = True
        elif op == SHUTDOWN:
            stream.host_shutdown |= flags
        elif op == RW:
            in_flight = len(stream.received) + len(packet.data) - stream.fwd_told
            assert in_flight <= GUEST_BUF_ALLOC, "the device sent beyond our credit"
            stream.received += packet.data
            stream.fwd_cnt += len(packet.data)
            # As Linux: tell the device once a good part of our buffer was freed.
            if stream.fwd_cnt - stream.fwd_told >= GUEST_BUF_ALLOC // 4:
                self.send(CREDIT_UPDATE, dst_port, src_port)

    def pump(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.poll()

    def write_stream(self, key: tuple[int, int], data: bytes) -> None:
        """Sends `data` as the device's credit allows (answering packets meanwhile)."""
        stream = self.streams[key]
        sent = 0
        while sent < len(data):
            self.pump(lambda: stream.credit() > 0 or stream.reset)
            assert not stream.reset
            take = min(CHUNK, stream.credit(), len(data) - sent)
            self.send(RW, key[0], key[1], data[sent : sent + take])
            sent += take


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as vm:
        vm.add_memory(0, RAM_SIZE)
        yield vm


@pytest.fixture
def uds(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds 107 bytes: pytest's tmp_path may be longer.
    directory = Path(f"/tmp/kvmfast-vsock-{os.getpid()}-{id(tmp_path)}")
    directory.mkdir()
    yield directory / "v.sock"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


@dataclass
class Rig:
    device: VirtioDevice
    loop: EventLoop
    guest: Guest
    path: Path

    def connect(self, port: int) -> socket.socket:
        """A host client that has written CONNECT to guest port `port`."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(str(self.path))
        client.sendall(f"CONNECT {port}\n".encode())
        return client

    def read_ok(self, client: socket.socket) -> int:
        line = b""
        while not line.endswith(b"\n"):
            byte = client.recv(1)
            assert byte, f"the client was closed after {line!r}"
            line += byte
        assert line.startswith(b"OK ")
        return int(line[3:-1])


@pytest.fixture
def rig(vm: Vm, uds: Path) -> Iterator[Rig]:
    device = VirtioDevice.vsock(CID, str(uds))
    loop = EventLoop(coalesce_us=0)
    for queue in (RX, TX, EVENT):
        loop.add(device.queue_notifier(queue), device.queue_handler(queue))
    handler = device.readable_handler()
    assert handler is not None
    loop.add_readable(handler)
    loop.start()
    guest = Guest(vm, device)
    guest.activate()
    try:
        yield Rig(device, loop, guest, uds)
    finally:
        device.reset()
        loop.stop()
        device.close()


def accept_host(rig: Rig, port: int) -> tuple[socket.socket, tuple[int, int]]:
    """The guest listens on `port`; a host client connects to it: (client, stream key)."""
    rig.guest.listening.add(port)
    client = rig.connect(port)
    before = set(rig.guest.streams)
    rig.guest.pump(lambda: set(rig.guest.streams) - before != set())
    (key,) = set(rig.guest.streams) - before
    # The guest's RESPONSE is all the device needed to write the OK line.
    assert key == (port, rig.read_ok(client))
    return client, key


def test_the_device_and_its_socket(vm: Vm, uds: Path) -> None:
    device = VirtioDevice.vsock(CID, str(uds))
    assert (device.device_type, device.num_queues, device.guest_cid) == (19, 3, CID)
    assert device.uds_path == uds
    assert device.read_config(0, 8) == CID
    assert device.device_features & VERSION_1
    assert uds.stat().st_mode & 0o777 == 0o600
    with pytest.raises(VirtioError, match="in use"):
        VirtioDevice.vsock(CID + 1, str(uds))
    for cid in (0, 2, 1 << 32):
        with pytest.raises(VirtioError, match="CID"):
            VirtioDevice.vsock(cid, str(uds.with_name("other.sock")))
    device.close()
    assert not uds.exists()


def test_host_connects_and_16_streams_carry_checksummed_bytes_both_ways(rig: Rig) -> None:
    size = 48 * 1024
    streams = [accept_host(rig, 1000 + n) for n in range(16)]
    payloads = {key: os.urandom(size) for _, key in streams}
    host_got: dict[tuple[int, int], str] = {}

    def host_side(client: socket.socket, key: tuple[int, int]) -> None:
        client.sendall(hashlib.sha256(payloads[key]).digest() + payloads[key])
        data = b""
        while len(data) < size:
            chunk = client.recv(65536)
            assert chunk
            data += chunk
        host_got[key] = hashlib.sha256(data).hexdigest()

    threads = [threading.Thread(target=host_side, args=s) for s in streams]
    for thread in threads:
        thread.start()
    guest_data = {key: os.urandom(size) for _, key in streams}
    for _, key in streams:
        rig.guest.write_stream(key, guest_data[key])
    rig.guest.pump(lambda: all(len(rig.guest.streams[k].received) >= 32 + size for k in payloads))
    for thread in threads:
        thread.join(10)
    for key, payload in payloads.items():
        received = bytes(rig.guest.streams[key].received)
        assert received[:32] == hashlib.sha256(payload).digest()
        assert hashlib.sha256(received[32:]).digest() == received[:32]
        assert host_got[key] == hashlib.sha256(guest_data[key]).hexdigest()
    assert rig.device.counters()["vsock_connections"] == 16


def test_a_large_stream_with_credit_updates(rig: Rig) -> None:
    size = 768 * 1024  # three times either side's buffer: credit must flow back
    client, key = accept_host(rig, 2000)
    data = os.urandom(size)
    got = bytearray()

    def host_side() -> None:
        client.sendall(data)
        while len(got) < size:
            got.extend(client.recv(65536))

    thread = threading.Thread(target=host_side)
    thread.start()
    rig.guest.write_stream(key, data[::-1])
    rig.guest.pump(lambda: len(rig.guest.streams[key].received) >= size)
    thread.join(10)
    assert hashlib.sha256(rig.guest.streams[key].received).digest() == hashlib.sha256(data).digest()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data[::-1]).digest()


def test_ports_nobody_listens_on_are_refused_both_ways(rig: Rig) -> None:
    # Guest to a host port with no PATH_<port>: RST.
    rig.guest.send(REQUEST, 5000, 99)
    rig.guest.pump(lambda: len(rig.guest.resets_to_no_stream) == 1)
    rst = rig.guest.resets_to_no_stream[0]
    assert (rst.src_port, rst.dst_port) == (99, 5000)
    # Host to a guest port nobody listens on: the guest's RST closes the client.
    client = rig.connect(4444)
    closed: list[bytes] = []
    reader = threading.Thread(target=lambda: closed.append(client.recv(100)))
    reader.start()
    rig.guest.pump(lambda: not reader.is_alive())
    assert closed == [b""]


def test_a_guest_reaches_a_listener_at_path_port(rig: Rig) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{rig.path}_77")
    listener.listen()
    listener.settimeout(10)
    key = (6000, 77)
    rig.guest.streams[key] = Stream()
    rig.guest.send(REQUEST, *key)
    rig.guest.pump(lambda: rig.guest.streams[key].established)
    server, _ = listener.accept()
    server.settimeout(10)
    rig.guest.write_stream(key, b"guest to host")
    assert server.recv(100) == b"guest to host"
    server.sendall(b"host to guest")
    rig.guest.pump(lambda: bytes(rig.guest.streams[key].received) == b"host to guest")
    server.close()
    listener.close()


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_host_that_does_not_read_holds_the_guest_back_not_the_vmm_or_others(rig: Rig) -> None:
    _slow, slow = accept_host(rig, 3000)
    fast_client, fast = accept_host(rig, 3001)
    stream = rig.guest.streams[slow]
    before = rss_bytes()
    blob = os.urandom(CHUNK)
    offered = 0
    # The guest writes 8 MiB as credit allows, for a second; the host never reads.
    deadline = time.monotonic() + 1
    while offered < 8 << 20 and time.monotonic() < deadline:
        rig.guest.poll(0.001)
        take = min(CHUNK, stream.credit())
        if take:
            rig.guest.send(RW, *slow, blob[:take])
            offered += take
    assert not stream.reset
    assert offered < 2 << 20, f"the guest got {offered} bytes through a host that never reads"
    # Held back by credit: none comes back while the host does not read.
    rig.guest.pump(lambda: stream.credit() == 0, timeout=5)
    time.sleep(0.2)
    rig.guest.poll()
    assert stream.credit() == 0
    grown = rss_bytes() - before
    assert grown < DEVICE_BUF_ALLOC + (4 << 20), f"the VMM grew {grown} bytes"
    # The other stream flows both ways meanwhile.
    rig.guest.write_stream(fast, b"ping")
    assert fast_client.recv(4) == b"ping"
    fast_client.sendall(b"pong")
    rig.guest.pump(lambda: bytes(rig.guest.streams[fast].received) == b"pong")


def test_shutdown_both_ways(rig: Rig) -> None:
    client, key = accept_host(rig, 4000)
    stream = rig.guest.streams[key]
    rig.guest.write_stream(key, b"last words")
    rig.guest.send(SHUTDOWN, *key, flags=SHUT_SEND)
    assert read_to_end(client) == b"last words"
    client.sendall(b"reply")
    client.shutdown(socket.SHUT_WR)
    rig.guest.pump(lambda: stream.host_shutdown & SHUT_SEND != 0)
    assert stream.received == b"reply"
    rig.guest.send(SHUTDOWN, *key, flags=SHUT_SEND | SHUT_RECEIVE)
    rig.guest.pump(lambda: stream.reset)


def read_to_end(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    return data


def test_a_restored_device_tells_the_driver_transport_reset(rig: Rig, vm: Vm, uds: Path) -> None:
    """Streams are not in a snapshot: the device continuing the rings tells the driver
    (5.10.6.6) in the first event buffer, once."""
    rig.device.pause()
    states = rig.device.queue_states()
    restored = VirtioDevice.vsock(CID, str(uds.with_name("restored.sock")))
    loop = EventLoop(coalesce_us=0)
    for queue in (RX, TX, EVENT):
        loop.add(restored.queue_notifier(queue), restored.queue_handler(queue))
    loop.start()
    try:
        restored.pause()
        queues = [(SIZE, base, base + 0x1000, base + 0x2000, True) for base in RINGS.values()]
        restored.activate(vm, VERSION_1, queues)
        restored.restore_queue_states(states)
        guest = Guest(vm, restored)
        event_buffer = 0xA000
        vm.write(event_buffer, b"\xff" * 4)
        guest.descriptor(EVENT, 0, event_buffer, 4, WRITE)
        guest.offer(EVENT, 0)
        restored.resume()
        deadline = time.monotonic() + 5
        while guest.used_idx(EVENT) == 0:
            assert time.monotonic() < deadline, "no TRANSPORT_RESET"
            time.sleep(0.005)
        assert guest.used(EVENT, 0) == (0, 4)
        assert vm.read(event_buffer, 4) == struct.pack("<I", 0)  # TRANSPORT_RESET
        guest.descriptor(EVENT, 1, event_buffer, 4, WRITE)
        guest.offer(EVENT, 1)
        restored.queue_notifier(EVENT).write(1)
        time.sleep(0.1)
        assert guest.used_idx(EVENT) == 1, "once only"
    finally:
        restored.reset()
        loop.stop()
        restored.close()


_OUT_OF_FDS_CHILD = """
import os, resource, sys, time
from kvmfast import EventLoop, VirtioDevice

device = VirtioDevice.vsock(3, sys.argv[1])
loop = EventLoop(coalesce_us=0)
loop.add_readable(device.readable_handler())
loop.start()
open_fds = len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd is closed again
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 2, hard))
print("ready", flush=True)

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

for line in sys.stdin:
    if line == "cpu\\n":
        start = cpu()
        time.sleep(0.5)
        print(cpu() - start, flush=True)
    else:
        time.sleep(0.2)
        print(device.counters()["vsock_connections"], flush=True)
"""


def test_a_listener_out_of_fds_waits_for_a_stream_to_close_rather_than_spin(uds: Path) -> None:
    """Clients beyond the process's fd limit wait in the backlog: the loop does not
    spin on the listener, and they are taken once a stream closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", _OUT_OF_FDS_CHILD, str(uds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        # The first client writes nothing yet (a stream it can end by closing).
        clients = []
        for n in range(5):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(uds))
            if n:
                client.sendall(b"CONNECT 80\n")
            clients.append(client)
        child.stdin.write("count\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) == 1  # two fds: the silent client and one
        child.stdin.write("cpu\n")
        child.stdin.flush()
        assert float(child.stdout.readline()) < 0.25, "the loop spins on the listener"
        clients[0].close()
        child.stdin.write("count\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) == 2, "the next client waiting was taken"
    finally:
        child.kill()
        child.wait()
