"""A Linux guest reading a virtio-blk disk, next to the host reading the same file.

``python -m kvm_vmm.bench_disk [--size BYTES] [--random-reads N] [--seed S]
[--timeout SECONDS] [--no-cached]`` makes a raw image of random bytes, reads it on the
host, then boots the default guest's kernel (Debian's cloud kernel, fast boot,
``console=ttyS0``) with an initramfs of busybox, the virtio modules and a static reader
(kvm_vmm.bench_disk_reader). The image is attached twice, read-only: serial "direct"
(the VMM opens it O_DIRECT) and serial "cached" (through the host's page cache). In the
guest the reader reads each disk whole in 1 MiB O_DIRECT requests, then does N random
4 KiB O_DIRECT reads; busybox ``dd if=/dev/vda of=/dev/null bs=1M iflag=direct`` runs
once more on the direct disk as the issue states it (its time includes dd's own
fork and exec). Around each guest phase the host samples the device's counters, the
CPU time of the VMM's I/O thread ("kvmfast-ioevent") and of the vCPU's thread
(user, system, guest; schedstat), and the VM's exits: what a request costs us, and
what the guest (its driver code, emulated on a host like this one) costs. The host
reads the file before and after the boot with the same reader, O_DIRECT and
buffered; the report gives the guest's figures as ratios to the host's.

It prints one JSON object (``--output FILE`` writes it there too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvm_vmm.bench_disk_reader import (
    MARKER,
    ReaderUnavailable,
    ReadResult,
    build_reader,
    parse_result,
    random_args,
    run_reader,
    sequential_args,
)
from kvm_vmm.boot import DEFAULT_GUEST_CMDLINE, LinuxBoot
from kvm_vmm.debian import fetch_guest_assets
from kvm_vmm.hostcheck import host_report
from kvm_vmm.initramfs import (
    INIT_REACHED_MARKER,
    busybox_initramfs,
    load_modules,
    module_entries,
    regular_file,
)
from kvm_vmm.kernel_modules import driver_modules
from kvm_vmm.loaders import default_cache_dir
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.pci_virtio import VirtioPciDevice
from kvm_vmm.serial_console import ConsoleTimeout
from kvmfast.bench_host import threads_named

READER_IN_GUEST = "/bin/diskio"
IO_THREAD = "kvmfast-ioevent"  # kvmfast's EventLoop thread (ioevent_loop.rs)
VCPU_THREAD = "vcpu0"  # Machine.start()'s thread for vCPU 0
PAUSE_MS = 1000  # the guest idles this long around its reads while the host samples
DEFAULT_SIZE = 256 << 20
DEFAULT_RANDOM_READS = 2000
DEFAULT_SEED = 20261207
DEFAULT_TIMEOUT = 2400.0
# A whole line: expect() may see one half-written.
_LINE = re.compile(rb"DISKBENCH (READY|RESULT|DISK|DD|ERROR|END)[^\r\n]*[\r\n]")


# -- the guest's /init ----------------------------------------------------------------


def bench_init(
    modules: Sequence[str], needed: Mapping[int, Sequence[str]], random_reads: int, seed: int
) -> str:
    """The guest's /init (busybox sh): load the virtio modules, run the reader on each
    virtio disk (named by its serial), dd the direct one, power off."""
    seq = " ".join(sequential_args('"/dev/$name"', "LABEL", PAUSE_MS)).replace("LABEL", '"$label"')
    rand = " ".join(random_args('"/dev/$name"', "LABEL", random_reads, seed, PAUSE_MS)).replace(
        "LABEL", '"$label"'
    )
    return f"""#!/bin/sh
# kvm_vmm.bench_disk: read each virtio disk, one marker line per figure; power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{INIT_REACHED_MARKER}"
{load_modules(modules, needed)}for block in /sys/block/vd*; do
    [ -e "$block/size" ] || continue
    name=${{block##*/}}
    label=$(cat "$block/serial" 2>/dev/null)
    [ -n "$label" ] || label=$name
    echo "{MARKER} DISK $label $name $(cat "$block/size") \
$(cat "$block/queue/max_sectors_kb") $(cat "$block/queue/max_segments")"
    {READER_IN_GUEST} {seq}
    {READER_IN_GUEST} {rand}
    if [ "$label" = direct ]; then
        read -r before _ < /proc/uptime
        dd if="/dev/$name" of=/dev/null bs=1M iflag=direct 2>/dev/null
        status=$?
        read -r after _ < /proc/uptime
        echo "{MARKER} DD $label $status $before $after"
    fi
done
echo "{MARKER} END"
poweroff -f
"""


# -- what the host samples around a phase ---------------------------------------------


@dataclass(frozen=True)
class ThreadTimes:
    """A thread's CPU time so far (ns): user, system and guest time from proc(5)'s
    stat fields 14, 15 and 43 (clock ticks), and its time on a CPU from schedstat."""

    user_ns: int
    system_ns: int
    guest_ns: int
    run_ns: int

    def since(self, begin: ThreadTimes) -> ThreadTimes:
        """The CPU time between ``begin`` and this sample."""
        return ThreadTimes(
            self.user_ns - begin.user_ns,
            self.system_ns - begin.system_ns,
            self.guest_ns - begin.guest_ns,
            self.run_ns - begin.run_ns,
        )


def thread_times(tid: int) -> ThreadTimes:
    text = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    run_ns = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
    return ThreadTimes(
        int(fields[11]) * tick, int(fields[12]) * tick, int(fields[40]) * tick, run_ns
    )


@dataclass(frozen=True)
class Sample:
    io: ThreadTimes
    vcpu: ThreadTimes
    device: dict[str, int]
    exits: dict[str, int]  # the VM's exits to userspace by reason
    completions: dict[str, int]  # instructions kvmfast completed for KVM, by mnemonic


def phase_report(guest: ReadResult, begin: Sample, end: Sample) -> dict[str, object]:
    """A guest phase's figures, per device request (the device's own count, which
    need not be the reader's: the block layer may split or merge)."""
    requests = end.device["requests"] - begin.device["requests"]
    read_bytes = end.device["read_bytes"] - begin.device["read_bytes"]
    io, vcpu = end.io.since(begin.io), end.vcpu.since(begin.vcpu)
    exits = _counts(end.exits, begin.exits)
    completions = _counts(end.completions, begin.completions)
    wall_ns = guest.seconds * 1e9
    per = max(requests, 1)
    report: dict[str, object] = {
        "reads": guest.reads,
        "bytes": guest.bytes,
        "seconds": guest.seconds,
        "checksum": guest.checksum,
        "device_requests": requests,
        "device_read_bytes": read_bytes,
        "bytes_per_request": read_bytes / per,
        "ns_per_request": wall_ns / per,
        "io_thread_ns_per_request": io.run_ns / per,
        "io_thread_user_system_ns": [io.user_ns, io.system_ns],
        "vcpu_thread_ns_per_request": vcpu.run_ns / per,
        "vcpu_thread_user_system_guest_ns": [vcpu.user_ns, vcpu.system_ns, vcpu.guest_ns],
        "exits_per_request": sum(exits.values()) / per,
        "exits": exits,
        "completions": completions,
        # Of the guest's wall time: the vCPU's thread on a CPU (the guest, with its
        # kernel code emulated, and KVM), our I/O thread on a CPU, and the rest
        # (waiting for the host's disk, scheduling, the two overlapping).
        "share_vcpu_thread": vcpu.run_ns / wall_ns,
        "share_io_thread": io.run_ns / wall_ns,
        "share_other": 1 - (vcpu.run_ns + io.run_ns) / wall_ns,
    }
    if guest.mode == "seq":
        report["mb_per_s"] = guest.mb_per_s
    else:
        report["iops"] = guest.iops
    return report


def _counts(end: Mapping[str, int], begin: Mapping[str, int]) -> dict[str, int]:
    """What grew between two samples of a counter map, by key (none: left out)."""
    grown = {key: count - begin.get(key, 0) for key, count in end.items()}
    return {key: count for key, count in sorted(grown.items()) if count}


def host_ratios(guest: ReadResult, host: Sequence[ReadResult]) -> dict[str, object]:
    """The guest's throughput over the host's mean throughput, and whether both read
    the same bytes (their checksums agree)."""
    figure: dict[str, object]
    if guest.mode == "seq":
        host_rate = sum(run.mb_per_s for run in host) / len(host)
        figure = {"host_mb_per_s": host_rate, "ratio_to_host": guest.mb_per_s / host_rate}
    else:
        host_rate = sum(run.iops for run in host) / len(host)
        figure = {"host_iops": host_rate, "ratio_to_host": guest.iops / host_rate}
    figure["same_bytes_as_host"] = all(run.checksum == guest.checksum for run in host)
    return figure


def host_reference(
    host: Mapping[str, ReadResult], guest: ReadResult, direct: bool
) -> list[ReadResult]:
    """The host's runs a guest phase compares with: the same reads, O_DIRECT for the
    disk the VMM opens O_DIRECT, buffered for the one it reads through the page cache."""
    suffix = f"{guest.mode}_{'direct' if direct else 'buffered'}"
    return [run for key, run in host.items() if key.endswith(suffix)]


def parse_dd(line: str) -> dict[str, object] | None:
    """The DD line: dd's exit status and /proc/uptime before and after it."""
    fields = line.split()
    if len(fields) != 6 or fields[:2] != [MARKER, "DD"]:
        return None
    try:
        status, before, after = int(fields[3]), float(fields[4]), float(fields[5])
    except ValueError:
        return None
    return {"label": fields[2], "status": status, "seconds": round(after - before, 2)}


def parse_disk(line: str) -> dict[str, object] | None:
    """The DISK line: the guest's name for a disk, its size and queue limits."""
    fields = line.split()
    if (
        len(fields) != 7
        or fields[:2] != [MARKER, "DISK"]
        or not all(field.isdigit() for field in fields[4:])
    ):
        return None
    return {
        "label": fields[2],
        "name": fields[3],
        "bytes": int(fields[4]) * 512,
        "max_sectors_kb": int(fields[5]),
        "max_segments": int(fields[6]),
    }


# -- the run -----------------------------------------------------------------------


def make_image(path: Path, size: int) -> None:
    """``size`` random bytes, written through to the disk: the host's O_DIRECT reads
    then find no dirty page cache to flush first."""
    chunk = 1 << 20
    with path.open("wb") as image:
        for _ in range(size // chunk):
            image.write(os.urandom(chunk))
        image.write(os.urandom(size % chunk))
        image.flush()
        os.fsync(image.fileno())


def host_runs(reader: Path, image: Path, random_reads: int, seed: int) -> dict[str, ReadResult]:
    """The host's reads of the image: O_DIRECT as the guest does, and buffered (a
    warm page cache: the first buffered pass fills it)."""
    path = str(image)
    runs = {
        "seq_direct": run_reader(reader, sequential_args(path, "host", 0)),
        "rand_direct": run_reader(reader, random_args(path, "host", random_reads, seed, 0)),
    }
    run_reader(reader, sequential_args(path, "host", 0, buffered=True))
    runs["seq_buffered"] = run_reader(reader, sequential_args(path, "host", 0, buffered=True))
    runs["rand_buffered"] = run_reader(
        reader, random_args(path, "host", random_reads, seed, 0, buffered=True)
    )
    return runs


def _vcpu_tid() -> int:
    for thread in threading.enumerate():
        if thread.name == VCPU_THREAD and thread.native_id is not None:
            return thread.native_id
    raise RuntimeError(f"no thread named {VCPU_THREAD}: did Machine.start() rename it?")


def _sample(machine: Machine, device: VirtioPciDevice, io_tid: int, vcpu_tid: int) -> Sample:
    counters = machine.counters()
    return Sample(
        thread_times(io_tid),
        thread_times(vcpu_tid),
        device.counters(),
        dict(counters["exits"]),
        dict(counters["completions"]),
    )


@dataclass
class GuestRun:
    """What the guest printed and the host sampled; ``results`` are the reader's own
    figures behind ``phases`` (by "<label>_<mode>")."""

    boot_seconds: float = 0.0
    outcome: str = ""
    disks: list[dict[str, object]] = field(default_factory=list)
    phases: dict[str, dict[str, object]] = field(default_factory=dict)
    dd: list[dict[str, object]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    completions: int = 0
    results: dict[str, ReadResult] = field(default_factory=dict)


def run_guest(
    initrd: Path,
    kernel: Path,
    disks: dict[str, tuple[Path, bool]],
    timeout: float,
    console: Path | None = None,
) -> GuestRun:
    """Boot, follow the guest's marker lines, sample around each phase; the guest's
    console output goes to ``console`` at the end."""
    run = GuestRun()
    with Machine(MachineConfig(memory_size=512 << 20, cpus=1)) as machine:
        devices = {
            label: machine.add_disk(path, readonly=True, serial=label, direct=direct)
            for label, (path, direct) in disks.items()
        }
        machine.boot(
            LinuxBoot(kernel, initrd=initrd, cmdline=DEFAULT_GUEST_CMDLINE, fast_boot=True)
        )
        started = time.monotonic()
        machine.start()
        deadline = started + timeout
        try:
            machine.serial.expect(INIT_REACHED_MARKER.encode(), timeout=timeout)
            run.boot_seconds = round(time.monotonic() - started, 1)
            # The I/O thread starts with the first doorbell: the driver's probe, after /init.
            tids: tuple[int, int] | None = None
            begin: Sample | None = None
            while True:
                found = machine.serial.expect(_LINE, deadline - time.monotonic())
                line = found[0].decode(errors="replace").strip()
                kind, label = [*line.split(), ""][1:3]
                if kind == "END":
                    break
                if kind in ("READY", "RESULT") and label in devices and tids is None:
                    tids = (min(threads_named(IO_THREAD)), _vcpu_tid())
                if kind == "READY" and label in devices and tids is not None:
                    begin = _sample(machine, devices[label], *tids)
                elif kind == "RESULT" and label in devices and tids is not None:
                    end = _sample(machine, devices[label], *tids)
                    result = parse_result(line)
                    if result is None or begin is None:
                        run.errors.append(f"unreadable: {line}")
                        continue
                    run.results[f"{label}_{result.mode}"] = result
                    run.phases[f"{label}_{result.mode}"] = phase_report(result, begin, end)
                    begin = None
                elif kind == "DISK" and (disk := parse_disk(line)) is not None:
                    run.disks.append(disk)
                elif kind == "DD" and (dd := parse_dd(line)) is not None:
                    run.dd.append(dd)
                else:
                    run.errors.append(line)
        except ConsoleTimeout as error:
            run.errors.append(str(error)[-2000:])
        outcome = machine.wait(timeout=120)
        if outcome is None:
            outcome = machine.stop()
        run.outcome = outcome.reason
        if console is not None:
            console.write_bytes(machine.serial.transcript())
        run.completions = sum(machine.counters()["completions"].values())
    return run


def machine_facts(cache_dir: Path | None) -> dict[str, object]:
    report = host_report(cache_dir)
    return {
        "cpu_model": report.identity.get("cpu"),
        "host_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kvm_parameters": report.identity.get("kvm_parameters"),
        "python": platform.python_version(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "host_check": {check.key: f"{check.verdict}: {check.summary}" for check in report.checks},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvm_vmm.bench_disk", description=__doc__)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image bytes")
    parser.add_argument("--random-reads", type=int, default=DEFAULT_RANDOM_READS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="whole guest run")
    parser.add_argument("--no-cached", action="store_true", help="only the O_DIRECT disk")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--console", type=Path, help="write the guest's console output here")
    args = parser.parse_args(argv)
    if args.size < 1 << 20 or args.size % 4096:
        parser.error("--size: at least 1 MiB, a multiple of 4096")
    cache_dir = default_cache_dir(os.environ)
    if cache_dir is None:
        parser.error("no cache directory for the default guest: set $HOME or $XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir=os.environ.get("TMPDIR")) as tmp:
        scratch = Path(tmp)
        try:
            reader = build_reader(scratch)
        except ReaderUnavailable as error:
            print(f"bench_disk: skipped: {error}", file=sys.stderr)
            return 77
        image = scratch / "disk.img"
        make_image(image, args.size)
        assets = fetch_guest_assets(cache_dir)
        modules = [(path.stem, read_boot_file(path, "module")) for path in assets.modules]
        init = bench_init(
            [name for name, _ in modules], driver_modules(modules), args.random_reads, args.seed
        )
        initrd = scratch / "initramfs.cpio"
        initrd.write_bytes(
            busybox_initramfs(
                read_boot_file(assets.busybox, "busybox"),
                init,
                [*module_entries(modules), regular_file("bin/diskio", reader.read_bytes(), 0o755)],
            )
        )
        host_before = host_runs(reader, image, args.random_reads, args.seed)
        disks = {"direct": (image, True)}
        if not args.no_cached:
            disks["cached"] = (image, False)
        guest = run_guest(initrd, assets.kernel, disks, args.timeout, args.console)
        host_after = host_runs(reader, image, args.random_reads, args.seed)
        both = {f"before_{key}": run for key, run in host_before.items()}
        both.update({f"after_{key}": run for key, run in host_after.items()})
        for name, result in guest.results.items():
            label = name.rsplit("_", 1)[0]
            guest.phases[name].update(
                host_ratios(result, host_reference(both, result, disks[label][1]))
            )
    report = {
        "benchmark": "python -m kvm_vmm.bench_disk",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_facts(cache_dir),
        "guest_kernel": assets.kernel_package,
        "image_bytes": args.size,
        "random_reads": args.random_reads,
        "seed": args.seed,
        "reader": "bench_disk_io.c (gcc -static -O2): pread loop, O_DIRECT, CLOCK_MONOTONIC",
        "host": {key: {**asdict(run), **_rates(run)} for key, run in both.items()},
        "guest": {key: value for key, value in asdict(guest).items() if key != "results"},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0 if guest.phases and not guest.errors else 1


def _rates(run: ReadResult) -> dict[str, float]:
    return {"mb_per_s": run.mb_per_s} if run.mode == "seq" else {"iops": run.iops}


if __name__ == "__main__":
    sys.exit(main())
