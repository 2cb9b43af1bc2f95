"""kvmfast.VirtioDevice from Python: a split virtqueue (virtio 1.2 section 2.7) written
into a VM's RAM, served by the event loop's native VirtioQueueHandler when its doorbell
eventfd rings, completions signalled on the queue's interrupt eventfd; virtio-blk
(section 5.2) on a temporary image, virtio-rng (5.4); malformed rings put the device in
NEEDS_RESET without harming it; bad images are VirtioError naming the path."""

from __future__ import annotations

import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmfast_guest_support import wait_until

from kvmfast import EventFd, EventLoop, Kvm, VirtioDevice, VirtioError, Vm

RAM_SIZE = 0x20000
SIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HEADERS, STATUS, DATA = 0x4000, 0x4800, 0x8000
NEXT, WRITE, INDIRECT = 1, 2, 4
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


def wait_readable(eventfd: EventFd, timeout: float = 10.0) -> int:
    """The eventfd's count once it is signalled (0 if it is not within `timeout`)."""
    ready, _, _ = select.select([eventfd.fileno()], [], [], timeout)
    return eventfd.read() if ready else 0


@dataclass
class Ring:
    """The driver's side of queue 0 of `device`, in `vm`'s RAM."""

    vm: Vm
    device: VirtioDevice
    loop: EventLoop
    avail_idx: int = 0
    queue: tuple[int, int, int, int, bool] = field(
        default_factory=lambda: (SIZE, DESC, AVAIL, USED, True)
    )

    def activate(self, features: int = VERSION_1) -> None:
        self.device.activate(self.vm, features, [self.queue])

    def descriptor(self, index: int, address: int, length: int, flags: int, next_: int = 0) -> None:
        self.vm.write(DESC + 16 * index, struct.pack("<QIHH", address, length, flags, next_))

    def offer(self, head: int) -> None:
        self.vm.write(AVAIL + 4 + 2 * (self.avail_idx % SIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.vm.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def ring_doorbell(self) -> None:
        self.device.queue_notifier(0).write(1)

    def used_idx(self) -> int:
        (value,) = struct.unpack("<H", self.vm.read(USED + 2, 2))
        return int(value)

    def used(self, n: int) -> tuple[int, int]:
        entry = struct.unpack("<II", self.vm.read(USED + 4 + 8 * (n % SIZE), 8))
        return int(entry[0]), int(entry[1])

    def blk(self, head: int, kind: int, sector: int, data: list[tuple[int, int, bool]]) -> int:
        """Writes a request at descriptors head.. and offers it; the status address."""
        header, status = HEADERS + 16 * head, STATUS + head
        self.vm.write(header, struct.pack("<IIQ", kind, 0, sector))
        self.vm.write(status, b"\xff")
        index = head
        self.descriptor(index, header, 16, NEXT, index + 1)
        for address, length, writable in data:
            index += 1
            self.descriptor(index, address, length, NEXT | (WRITE if writable else 0), index + 1)
        self.descriptor(index + 1, status, 1, WRITE)
        self.offer(head)
        return status

    def complete(self, timeout: float = 10.0) -> None:
        """Rings the doorbell and waits for the completion interrupt."""
        self.ring_doorbell()
        assert wait_readable(self.device.queue_interrupt(0), timeout) > 0, self.device.counters()

    def status(self, address: int) -> int:
        return self.vm.read(address, 1)[0]


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm() as vm:
        vm.add_memory(0, RAM_SIZE)
        yield vm


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 512))
    return path


def serve(vm: Vm, device: VirtioDevice) -> Iterator[Ring]:
    loop = EventLoop(coalesce_us=0)
    loop.add(device.queue_notifier(0), device.queue_handler(0))
    loop.start()
    try:
        yield Ring(vm, device, loop)
    finally:
        device.reset()
        loop.stop()


@pytest.fixture
def blk(vm: Vm, image: Path) -> Iterator[Ring]:
    yield from serve(vm, VirtioDevice.block(str(image), serial="test-disk"))


@pytest.mark.kvm
def test_blk_writes_and_reads_through_the_event_loop(blk: Ring, image: Path) -> None:
    blk.activate()
    pattern = bytes((i * 13 + 5) & 0xFF for i in range(1024))
    blk.vm.write(DATA, pattern)
    written = blk.blk(0, T_OUT, 3, [(DATA, 1024, False)])
    blk.complete()
    assert blk.status(written) == S_OK
    assert image.read_bytes()[3 * 512 : 5 * 512] == pattern
    read = blk.blk(4, T_IN, 3, [(DATA + 0x1000, 1024, True)])
    blk.complete()
    assert blk.status(read) == S_OK
    assert blk.vm.read(DATA + 0x1000, 1024) == pattern
    assert blk.used_idx() == 2 and blk.used(1) == (4, 1025)
    identify = blk.blk(8, T_GET_ID, 0, [(DATA + 0x2000, 20, True)])
    flush = blk.blk(11, T_FLUSH, 0, [])
    blk.complete()
    assert (blk.status(identify), blk.status(flush)) == (S_OK, S_OK)
    assert blk.vm.read(DATA + 0x2000, 20) == b"test-disk".ljust(20, b"\0")
    counters = blk.device.counters()
    assert counters["requests"] == 4 and counters["flushes"] == 1
    assert counters["read_bytes"] == counters["written_bytes"] == 1024
    assert blk.loop.counters()[blk.device.queue_notifier(0).fd] >= 3


def test_blk_device_identity_and_config(image: Path) -> None:
    device = VirtioDevice.block(image, readonly=True)
    assert (device.device_type, device.num_queues, device.max_queue_size) == (2, 1, 256)
    assert device.device_features & (VERSION_1 | EVENT_IDX | 1 << 28 | 1 << 5) == (
        VERSION_1 | EVENT_IDX | 1 << 28 | 1 << 5
    )
    assert device.device_features & (1 << 13 | 1 << 14) == 0, "no discard on a read-only disk"
    assert device.read_config(0, 8) == 64
    assert device.read_config(20, 4) == 512
    assert device.read_config(device.config_size, 4) == 0
    device.write_config(0, 8, 5)
    assert device.read_config(0, 8) == 64


@pytest.mark.kvm
def test_chains_offered_before_activation_are_served_by_it(blk: Ring) -> None:
    status = blk.blk(0, T_FLUSH, 0, [])
    blk.ring_doorbell()  # before activate(): nothing to serve yet
    blk.activate()
    assert wait_readable(blk.device.queue_interrupt(0)) > 0
    assert blk.status(status) == S_OK


@pytest.mark.kvm
def test_out_of_range_and_unknown_requests_fail_with_their_status(blk: Ring) -> None:
    blk.activate()
    beyond = blk.blk(0, T_IN, 64, [(DATA, 512, True)])
    unknown = blk.blk(3, 77, 0, [])
    blk.complete()
    assert (blk.status(beyond), blk.status(unknown)) == (S_IOERR, S_UNSUPP)
    assert not blk.device.needs_reset


@pytest.mark.kvm
def test_a_malformed_chain_needs_reset_and_the_device_recovers(blk: Ring) -> None:
    blk.activate()
    blk.descriptor(0, HEADERS, 16, NEXT, 1)
    blk.descriptor(1, STATUS, 1, WRITE | NEXT, 0)  # loops back to 0
    blk.offer(0)
    blk.ring_doorbell()
    assert wait_readable(blk.device.config_interrupt()) == 1
    assert blk.device.needs_reset
    assert blk.used_idx() == 0
    assert blk.device.counters()["malformed_chains"] == 1
    # What the transport does on the driver's reset and re-initialisation.
    blk.device.reset()
    assert not blk.device.needs_reset
    blk.vm.write(AVAIL, bytes(USED + 0x100 - AVAIL))  # fresh rings
    blk.avail_idx = 0
    blk.activate()
    status = blk.blk(0, T_FLUSH, 0, [])
    blk.complete()
    assert blk.status(status) == S_OK


@pytest.mark.kvm
def test_nothing_is_served_after_reset(blk: Ring) -> None:
    blk.activate()
    blk.device.reset()
    status = blk.blk(0, T_FLUSH, 0, [])
    blk.ring_doorbell()
    assert wait_readable(blk.device.queue_interrupt(0), timeout=0.3) == 0
    assert blk.status(status) == 0xFF and blk.used_idx() == 0


@pytest.mark.kvm
def test_a_paused_device_leaves_the_rings_alone_and_serves_them_on_resume(blk: Ring) -> None:
    blk.activate()
    blk.device.pause()
    status = blk.blk(0, T_FLUSH, 0, [])
    blk.ring_doorbell()
    assert wait_readable(blk.device.queue_interrupt(0), timeout=0.3) == 0
    assert blk.status(status) == 0xFF and blk.used_idx() == 0
    blk.device.resume()  # the ring taken while paused is not lost
    assert wait_readable(blk.device.queue_interrupt(0)) > 0
    assert blk.status(status) == 0 and blk.used_idx() == 1


@pytest.mark.kvm
def test_rng_fills_a_buffer(vm: Vm) -> None:
    for ring in serve(vm, VirtioDevice.rng()):
        assert (ring.device.device_type, ring.device.config_size) == (4, 0)
        ring.activate()
        ring.descriptor(0, DATA, 256, WRITE)
        ring.offer(0)
        ring.complete()
        assert ring.used(0) == (0, 256)
        assert ring.vm.read(DATA, 256) != bytes(256)


@pytest.mark.kvm
def test_activation_refuses_bad_queues(blk: Ring) -> None:
    bad = [
        ((12, DESC, AVAIL, USED, True), "power of two"),
        ((SIZE, DESC + 8, AVAIL, USED, True), "misaligned"),
        ((SIZE, DESC, AVAIL, RAM_SIZE - 8, True), "not all guest RAM"),
    ]
    for queue, message in bad:
        with pytest.raises(VirtioError, match=message):
            blk.device.activate(blk.vm, VERSION_1, [queue])
    with pytest.raises(VirtioError, match="does not offer"):
        blk.device.activate(blk.vm, 1 << 63, [blk.queue])
    with pytest.raises(VirtioError, match="1 queue"):
        blk.device.queue_interrupt(1)


def test_missing_empty_and_locked_images_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(VirtioError, match=str(missing)):
        VirtioDevice.block(missing)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(VirtioError, match=f"{empty} is empty"):
        VirtioDevice.block(empty)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    first = VirtioDevice.block(image)
    with pytest.raises(VirtioError, match=f"{image} is in use by another process"):
        VirtioDevice.block(image)
    with pytest.raises(VirtioError, match="in use"):
        VirtioDevice.block(image, readonly=True)
    del first
    VirtioDevice.block(image, readonly=True, serial="x" * 20)
    with pytest.raises(VirtioError, match="longer than the 20 bytes"):
        VirtioDevice.block(image, serial="x" * 21)


@pytest.mark.kvm
def test_direct_io_round_trips_unaligned_guest_buffers(vm: Vm, tmp_path: Path) -> None:
    image = tmp_path / "direct.img"
    image.write_bytes(bytes(8 * 512))
    for ring in serve(vm, VirtioDevice.block(image, direct=True)):
        ring.activate()
        pattern = bytes(range(256)) * 2
        ring.vm.write(DATA + 3, pattern)  # O_DIRECT would refuse this address itself
        written = ring.blk(0, T_OUT, 1, [(DATA + 3, 512, False)])
        ring.complete()
        read = ring.blk(4, T_IN, 1, [(DATA + 0x1001, 512, True)])
        ring.complete()
        assert (ring.status(written), ring.status(read)) == (S_OK, S_OK)
        assert ring.vm.read(DATA + 0x1001, 512) == pattern
    assert image.read_bytes()[512:1024] == pattern


DESCRIPTOR = st.tuples(
    st.one_of(st.integers(0, RAM_SIZE + 0x2000), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 0x3000), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),
    st.integers(0, SIZE + 4),
)


@pytest.mark.kvm
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=st.lists(DESCRIPTOR, min_size=SIZE, max_size=SIZE),
    heads=st.lists(st.integers(0, SIZE + 4), max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF),
    event_idx=st.booleans(),
)
def test_random_rings_leave_the_device_alive_and_ram_outside_buffers_alone(
    blk: Ring,
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    event_idx: bool,
) -> None:
    blk.device.reset()
    blk.vm.write(0, bytes(RAM_SIZE))
    for index, (address, length, flags, next_) in enumerate(table):
        blk.descriptor(index, address, length, flags, next_)
    for slot, head in enumerate(heads):
        blk.vm.write(AVAIL + 4 + 2 * slot, struct.pack("<H", head))
    blk.vm.write(AVAIL + 2, struct.pack("<H", avail_idx))
    before = blk.vm.read(0, RAM_SIZE)
    blk.activate(VERSION_1 | (EVENT_IDX if event_idx else 0))
    blk.device.queue_interrupt(0).read()
    blk.ring_doorbell()
    # The loop has handled both doorbells (activation's and ours) once its count moves on.
    served = blk.device.counters()["notifications"]
    blk.ring_doorbell()
    assert wait_until(lambda: blk.device.counters()["notifications"] >= served + 1)
    blk.device.reset()
    after = blk.vm.read(0, RAM_SIZE)
    allowed = [(USED, 6 + 8 * SIZE)] + [
        (address, length)
        for address, length, flags, _ in table
        if flags & WRITE and not flags & INDIRECT
    ]
    for at in (i for i in range(RAM_SIZE) if before[i] != after[i]):
        assert any(start <= at < start + length for start, length in allowed), hex(at)
    # Alive: a fresh ring is served.
    blk.vm.write(0, bytes(RAM_SIZE))
    blk.avail_idx = 0
    blk.activate()
    status = blk.blk(0, T_FLUSH, 0, [])
    blk.complete()
    assert blk.status(status) == S_OK
    blk.device.reset()
