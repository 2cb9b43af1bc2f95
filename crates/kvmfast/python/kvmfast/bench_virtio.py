"""Per-request cost of a virtio-blk queue served by kvmfast, as a ratio to a C floor
measured in the same run.

``python -m kvmfast.bench_virtio [--requests N] [--repeat R] [--data-bytes 512|4096]
[--cpu N]`` runs, R times over, the floor and then ours, each in a fresh VM with the same
small long-mode guest: per request it publishes head 0 of a prebuilt 3-descriptor chain
(16-byte header IN sector 0, a writable data buffer, a status byte) in the avail ring,
bumps the avail index, stores to the doorbell and waits (``sti; hlt``) for the MSI,
whose handler EOIs.

- ours: doorbell store -> zero-length MMIO ioeventfd -> the EventLoop's native
  VirtioQueueHandler pops the chain, preads the sector from a temporary raw image,
  fills the used ring -> queue_interrupt eventfd, a KVM irqfd on a GSI with an MSI
  route -> the guest's handler. The benchmark activates the device itself
  (VirtioDevice.activate, no PCI transport).
- floor: the same guest and KVM setup, but the doorbell eventfd is read by
  eventfd_relay.c (built with ``cc -O2`` at run time), which writes the irqfd at once:
  no VMM logic, no I/O, no ring touched.

It prints one JSON object: ns per request of both, the median of the R paired ratios
(target <= 1.2x, and whether this run met it), the host CPU time per request of the
VMM's I/O thread ("kvmfast-ioevent", /proc/self/task/*/stat) and of the relay, the
host's own pread of the same bytes from the same image, and the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmfast._native import EventFd, EventLoop, Kvm, Vcpu, VirtioDevice, Vm
from kvmfast.bench import (
    DOORBELL_VECTOR,
    EOI_HANDLER,
    EXIT_PORT,
    LAPIC_BASE,
    MMIO_ADDR,
    TimedRun,
    new_guest,
    timed_run,
)
from kvmfast.bench_host import (
    build_relay,
    children_cpu_ns,
    host_pread_ns,
    new_thread_named,
    relay_process,
    thread_cpu,
    threads_named,
)

# linux/kvm.h; kvmfast does not depend on kvm_abi.
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
VIRTIO_F_VERSION_1 = 1 << 32
TARGET_RATIO = 1.2
IO_THREAD_NAME = "kvmfast-ioevent"  # the EventLoop's thread (ioevent_loop.rs)

# The queue, in the guest's 4 MiB of RAM above its stack (bench.py's shape).
QUEUE_SIZE = 16
DESC_AT = 0x30_0000
AVAIL_AT = 0x30_1000
USED_AT = 0x30_2000
HEADER_AT = 0x30_3000
STATUS_AT = 0x30_3100
DATA_AT = 0x30_4000
# virtio 1.2, 2.7.5 (descriptor flags) and 5.2.6 (virtio-blk requests).
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
VIRTIO_BLK_T_IN = 0
IMAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One run of one path.

    ``host_cpu_ns_per_request``: user + system time of the host side (ours: the
    I/O thread, from /proc's clock ticks; the floor: the relay process, getrusage).
    ``host_run_ns_per_request``: the I/O thread's time on a CPU from
    /proc/self/task/TID/schedstat (ns resolution; None for the floor).
    ``used_ring_advanced``: how far the used index moved (the floor must leave it).
    """

    ns_per_request: float
    host_cpu_ns_per_request: float
    host_run_ns_per_request: float | None
    guest_exits: int
    used_ring_advanced: int
    device_requests: int


@dataclass(frozen=True)
class PathReport:
    path: str
    what: str
    ns_per_request: float
    ns_per_request_runs: tuple[float, ...]
    host_cpu_ns_per_request: float
    host_cpu_measured: str
    host_run_ns_per_request: float | None
    guest_exits: int
    used_ring_advanced: int
    device_requests: int


def request_loop_source() -> str:
    """rdi requests: publish head 0, ring, wait for the MSI; then a write to EXIT_PORT."""
    svr = LAPIC_BASE + 0xF0
    return f"""
    .global entry, handler
    entry:
        mov rsi, {svr:#x}
        mov dword ptr [rsi], 0x1ff
        mov ecx, edi
        mov ebx, {MMIO_ADDR:#x}
        mov ebp, {AVAIL_AT:#x}
        xor edx, edx                        # the driver's avail index
    again:
        cli                                 # so that the MSI waits for the hlt
        mov eax, edx
        and eax, {QUEUE_SIZE - 1}
        mov word ptr [rbp + 4 + rax * 2], 0 # ring[idx % size] = head 0
        inc edx
        mov word ptr [rbp + 2], dx          # idx: the request is published
        mov [rbx], eax                      # doorbell
        sti
        hlt
        dec ecx
        jnz again
        out {EXIT_PORT:#x}, al
    {EOI_HANDLER}"""


def write_chain(vm: Vm, data_bytes: int) -> None:
    """Descriptors 0-2: header (IN, sector 0), data (device-writable), status."""
    descriptors = [
        (HEADER_AT, 16, VIRTQ_DESC_F_NEXT, 1),
        (DATA_AT, data_bytes, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        (STATUS_AT, 1, VIRTQ_DESC_F_WRITE, 0),
    ]
    for index, (address, length, flags, next_) in enumerate(descriptors):
        vm.write(DESC_AT + 16 * index, struct.pack("<QIHH", address, length, flags, next_))
    vm.write(HEADER_AT, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    vm.write(STATUS_AT, b"\xff")
    vm.write(DATA_AT, bytes(data_bytes))


def used_index(vm: Vm) -> int:
    (value,) = struct.unpack("<H", vm.read(USED_AT + 2, 2))
    return int(value)


def doorbell_length(vm: Vm) -> int:
    """0 (any store) where KVM has KVM_CAP_IOEVENTFD_ANY_LENGTH, else the guest's 4."""
    return 0 if vm.check_extension(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0 else 4


@dataclass(frozen=True)
class Guest:
    vm: Vm
    vcpu: Vcpu
    gsi: int


def new_request_guest(kvm: Kvm, requests: int, data_bytes: int) -> Guest:
    """The guest both paths run, its chain written, an MSI route to its handler on the
    first GSI above the IOAPIC's (as kvm-vmm routes MSI-X vectors)."""
    vm, vcpu = new_guest(kvm, request_loop_source(), requests)
    write_chain(vm, data_bytes)
    gsi = vm.ioapic_routes
    vm.set_msi_route(gsi, LAPIC_BASE, DOORBELL_VECTOR)
    return Guest(vm, vcpu, gsi)


def run_guest(vcpu: Vcpu, requests: int) -> TimedRun:
    """timed_run, stopped (and failed) if the guest has not finished by a generous
    deadline: a lost MSI would otherwise leave it in hlt for ever."""
    deadline = 60.0 + requests * 0.001
    watchdog = threading.Timer(deadline, vcpu.kicker().stop)
    watchdog.start()
    try:
        return timed_run(vcpu)
    except RuntimeError as stopped:
        raise RuntimeError(f"the guest did not finish {requests} requests: {stopped}") from None
    finally:
        watchdog.cancel()


def ours(kvm: Kvm, image: Path, requests: int, data_bytes: int) -> Sample:
    """The virtio-blk request path: kvmfast's device on the EventLoop."""
    guest = new_request_guest(kvm, requests, data_bytes)
    vm = guest.vm
    device = VirtioDevice.block(str(image))
    try:
        device.activate(vm, VIRTIO_F_VERSION_1, [(QUEUE_SIZE, DESC_AT, AVAIL_AT, USED_AT, True)])
        vm.register_irqfd(device.queue_interrupt(0).fd, guest.gsi)
        vm.register_ioeventfd(device.queue_notifier(0).fd, MMIO_ADDR, doorbell_length(vm))
        before = threads_named(IO_THREAD_NAME)
        with EventLoop() as loop:
            loop.add(device.queue_notifier(0), device.queue_handler(0))
            loop.start()
            thread = new_thread_named(IO_THREAD_NAME, before)
            before_run = thread_cpu(thread)
            run = run_guest(guest.vcpu, requests)
            after_run = thread_cpu(thread)
            device.reset()
        served = device.counters()["requests"]
        check_completed(vm, image, data_bytes)
        advanced = used_index(vm)
    finally:
        device.close()
        vm.close()
    if served != requests or advanced != requests & 0xFFFF:
        raise RuntimeError(
            f"{requests} requests made, the device served {served}, used index at {advanced}"
        )
    run_ns = (
        None
        if before_run.run_ns is None or after_run.run_ns is None
        else after_run.run_ns - before_run.run_ns
    )
    return Sample(
        ns_per_request=(run.stop - run.start) / requests * 1e9,
        host_cpu_ns_per_request=(after_run.cpu_ns - before_run.cpu_ns) / requests,
        host_run_ns_per_request=None if run_ns is None else run_ns / requests,
        guest_exits=run.guest_exits,
        used_ring_advanced=advanced,
        device_requests=served,
    )


def check_completed(vm: Vm, image: Path, data_bytes: int) -> None:
    """The last request really read sector 0 into the guest's buffer, with status OK."""
    status = vm.read(STATUS_AT, 1)[0]
    with image.open("rb") as source:
        expected = source.read(data_bytes)
    if status != 0 or vm.read(DATA_AT, data_bytes) != expected:
        raise RuntimeError(f"the last request did not read sector 0 (status {status:#x})")


def floor(kvm: Kvm, relay: Path, requests: int, data_bytes: int) -> Sample:
    """The same guest with eventfd_relay.c between its doorbell and its irqfd."""
    guest = new_request_guest(kvm, requests, data_bytes)
    vm = guest.vm
    # Blocking: the relay sleeps in read() as the event loop sleeps in epoll_wait().
    doorbell, irq = EventFd(nonblocking=False), EventFd()
    try:
        vm.register_irqfd(irq.fd, guest.gsi)
        vm.register_ioeventfd(doorbell.fd, MMIO_ADDR, doorbell_length(vm))
        cpu_before = children_cpu_ns()
        with relay_process(relay, doorbell, irq, requests):
            run = run_guest(guest.vcpu, requests)
        relay_cpu = children_cpu_ns() - cpu_before
        advanced = used_index(vm)
    finally:
        vm.close()
        doorbell.close()
        irq.close()
    return Sample(
        ns_per_request=(run.stop - run.start) / requests * 1e9,
        host_cpu_ns_per_request=relay_cpu / requests,
        host_run_ns_per_request=None,
        guest_exits=run.guest_exits,
        used_ring_advanced=advanced,
        device_requests=0,
    )


def make_image(path: Path) -> None:
    """A raw image whose sectors differ, so that the check sees a real read."""
    path.write_bytes(bytes(index * 7 % 251 for index in range(IMAGE_BYTES)))


def machine_facts(kvm: Kvm) -> dict[str, object]:
    model = None
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with kvm.create_vm() as vm:
        any_length = vm.check_extension(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0
    return {
        "cpu_model": model,
        "host_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ioeventfd_any_length": any_length,
        "doorbell": "zero-length MMIO ioeventfd" if any_length else "4-byte MMIO ioeventfd",
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


OURS_WHAT = (
    "doorbell store -> zero-length MMIO ioeventfd -> EventLoop thread, native "
    "VirtioQueueHandler: pop the chain, pread the sector from the image, used ring -> "
    "queue_interrupt irqfd -> MSI -> guest handler EOI"
)
FLOOR_WHAT = (
    "the same guest and KVM setup; a C process (eventfd_relay.c) reads the doorbell "
    "eventfd and writes the irqfd: no VMM logic, no I/O, no ring touched"
)


def path_report(path: str, what: str, samples: Sequence[Sample], cpu_measured: str) -> PathReport:
    runs = [s.host_run_ns_per_request for s in samples if s.host_run_ns_per_request is not None]
    return PathReport(
        path=path,
        what=what,
        ns_per_request=round(statistics.median(s.ns_per_request for s in samples), 1),
        ns_per_request_runs=tuple(round(s.ns_per_request, 1) for s in samples),
        host_cpu_ns_per_request=round(
            statistics.median(s.host_cpu_ns_per_request for s in samples), 1
        ),
        host_cpu_measured=cpu_measured,
        host_run_ns_per_request=round(statistics.median(runs), 1) if runs else None,
        guest_exits=samples[-1].guest_exits,
        used_ring_advanced=samples[-1].used_ring_advanced,
        device_requests=samples[-1].device_requests,
    )


def run_benchmark(
    requests: int,
    repeat: int,
    data_bytes: int = 512,
    *,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict[str, object]:
    """R pairs of (floor, ours) runs, and the host's pread after each pair.

    Each of our runs is divided by the floor run just before it and the figure is the
    median of those ratios (as kvmfast.bench pairs them: the host drifts over minutes)."""
    kvm = Kvm()
    facts = machine_facts(kvm)
    with tempfile.TemporaryDirectory(prefix="kvmfast-bench-virtio-") as scratch_name:
        scratch = Path(scratch_name)
        image = scratch / "disk.img"
        make_image(image)
        relay = build_relay(scratch)
        if relay is None:
            warn("kvmfast.bench_virtio: no C compiler (cc): the floor is skipped, no ratio")
        floors: list[Sample] = []
        our_samples: list[Sample] = []
        preads: list[float] = []
        for _ in range(repeat):
            if relay is not None:
                floors.append(floor(kvm, relay, requests, data_bytes))
            our_samples.append(ours(kvm, image, requests, data_bytes))
            preads.append(host_pread_ns(relay, image, data_bytes, requests))
    ours_report = path_report(
        "virtio-blk-request",
        OURS_WHAT,
        our_samples,
        f"utime+stime of the {IO_THREAD_NAME} thread (/proc/self/task/*/stat, clock ticks)",
    )
    pread_ns = round(statistics.median(preads), 1)
    report: dict[str, object] = {
        "benchmark": "virtio-blk request round trip vs an eventfd relay floor",
        "requests": requests,
        "repeat": repeat,
        "data_bytes": data_bytes,
        "queue_size": QUEUE_SIZE,
        "statistic": "median of ratios to the floor run just before (lowest, highest)",
        "machine": facts,
        "ours": asdict(ours_report),
        "host_pread": {
            "ns_per_pread": pread_ns,
            "bytes": data_bytes,
            "count": requests,
            "measured_with": "C (eventfd_relay pread)" if relay else "Python os.pread",
            "share_of_request": round(pread_ns / ours_report.ns_per_request, 4),
            "share_of_io_thread_cpu": (
                round(pread_ns / ours_report.host_run_ns_per_request, 3)
                if ours_report.host_run_ns_per_request
                else None
            ),
        },
    }
    if not floors:
        report["floor"] = None
        report["ratio"] = {"skipped": "no C compiler (cc) to build eventfd_relay.c"}
        return report
    floor_report = path_report(
        "eventfd-relay-floor", FLOOR_WHAT, floors, "utime+stime of the relay (getrusage)"
    )
    ratios = [o.ns_per_request / f.ns_per_request for f, o in zip(floors, our_samples, strict=True)]
    median = round(statistics.median(ratios), 3)
    report["floor"] = asdict(floor_report)
    report["ratio"] = {
        "ours_to_floor": median,
        "range": (round(min(ratios), 3), round(max(ratios), 3)),
        "ratios": tuple(round(ratio, 3) for ratio in ratios),
        "target": TARGET_RATIO,
        "target_met": median <= TARGET_RATIO,
        "ours_minus_floor_ns": round(ours_report.ns_per_request - floor_report.ns_per_request, 1),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmfast.bench_virtio", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=7,
        help="floor-then-ours pairs; the median of their ratios is reported",
    )
    parser.add_argument(
        "--data-bytes", type=int, choices=(512, 4096), default=512, help="bytes read per request"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="run everything (the vCPU, the event loop, the relay) on this host CPU",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.repeat < 1:
        parser.error("--requests and --repeat must be at least 1")
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})  # threads and the relay inherit it
        except OSError as error:
            parser.error(f"--cpu {args.cpu}: {error.strerror}")
    report = run_benchmark(args.requests, args.repeat, args.data_bytes)
    report["cpu"] = args.cpu
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
