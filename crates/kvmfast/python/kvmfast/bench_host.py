"""The host side of kvmfast.bench_virtio: what the host itself costs, measured beside
the VMM in the same run.

- eventfd_relay.c (package data), built with ``cc -O2`` at run time: the floor's relay
  (read a doorbell eventfd, write an irqfd) and a timed pread loop;
- the CPU time of one of our threads, from /proc/self/task/TID/stat (utime + stime,
  clock ticks as proc(5) gives them) and schedstat (time on a CPU, ns);
- the CPU time of reaped children (getrusage).
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvmfast._native import EventFd

RELAY_SOURCE = "eventfd_relay.c"


@dataclass(frozen=True)
class ThreadCpu:
    """A thread's CPU time so far: user + system (ns, in clock ticks' resolution) and
    its time on a CPU from schedstat (ns; None where the kernel has no schedstat)."""

    cpu_ns: int
    run_ns: int | None


def thread_cpu(tid: int) -> ThreadCpu:
    """One of this process's threads, from /proc/self/task/TID/{stat,schedstat}."""
    text = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is proc(5)'s field 3
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: proc(5) fields 14, 15
    try:
        run_ns: int | None = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        run_ns = None
    return ThreadCpu(ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK"), run_ns)


def threads_named(name: str) -> set[int]:
    """The ids of this process's threads called ``name`` (their comm)."""
    found = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                found.add(int(task.name))
        except OSError:
            continue  # the thread ended meanwhile
    return found


def new_thread_named(name: str, before: set[int], timeout: float = 5.0) -> int:
    """The thread that appeared since ``before`` with this name (it names itself)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        new = threads_named(name) - before
        if len(new) == 1:
            return new.pop()
        if len(new) > 1:
            raise RuntimeError(f"more than one new {name} thread: {sorted(new)}")
        time.sleep(0.001)
    raise RuntimeError(f"no {name} thread appeared within {timeout} s")


@contextmanager
def relay_process(binary: Path, doorbell: EventFd, irq: EventFd, requests: int) -> Iterator[None]:
    """eventfd_relay running and ready to read the doorbell; reaped on exit."""
    process = subprocess.Popen(
        [str(binary), "relay", str(doorbell.fd), str(irq.fd), str(requests)],
        pass_fds=(doorbell.fd, irq.fd),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        if not ready or process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{binary} relay did not start")
        yield
    finally:
        if process.poll() is None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
    if process.returncode != 0:
        raise RuntimeError(f"{binary} relay exited with {process.returncode}")


def children_cpu_ns() -> int:
    """User + system time of the children reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((usage.ru_utime + usage.ru_stime) * 1e9)


def relay_source() -> str:
    return resources.files("kvmfast").joinpath(RELAY_SOURCE).read_text()


def build_relay(scratch: Path) -> Path | None:
    """eventfd_relay built with ``cc -O2`` in ``scratch``; None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = scratch / RELAY_SOURCE
    source.write_text(relay_source())
    binary = scratch / "eventfd_relay"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def host_pread_ns(relay: Path | None, image: Path, data_bytes: int, count: int) -> float:
    """The host's own cost of the device's read: preads of the same bytes of the same
    image (page cache warm), in C when there is a compiler, else in Python."""
    if relay is not None:
        output = subprocess.run(
            [str(relay), "pread", str(image), str(data_bytes), str(count)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return float(json.loads(output)["ns_per_pread"])
    fd = os.open(image, os.O_RDONLY)
    try:
        os.pread(fd, data_bytes, 0)
        start = time.perf_counter_ns()
        for _ in range(count):
            os.pread(fd, data_bytes, 0)
        return (time.perf_counter_ns() - start) / count
    finally:
        os.close(fd)
