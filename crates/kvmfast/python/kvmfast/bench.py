"""Exit-path costs of kvmfast, as ratios to the host's floor measured in the same run.

``python -m kvmfast.bench [--writes N] [--floor-src PATH] [--repeat R] [--irqchip I]
[--cpu N]`` builds ../shared/bench/kvm_floor.c with ``cc -O2``, runs it with the same
write count, runs the same guest shape through kvmfast right after it, R times over,
and prints one JSON object: per path the median of the R ratios of our run to the floor
run just before it, with the lowest and highest:

- pio exit → NullSink (Rust), vs the floor's pio-exit (target ≤ 1.03×)
- pio exit → Python handler, vs pio-exit (target ≤ 1.15×)
- mmio exit → Python handler, vs mmio-exit (target ≤ 1.15×)
- zero-length MMIO ioeventfd doorbell handled by the EventLoop, vs mmio-ioeventfd0
  (target ≤ 1.10×); timed to the loop's handling of the last ring, and ``drain_ns``
  says how much of that came after the vCPU had stopped
- doorbell → IrqfdTrigger → MSI → guest handler EOI → next doorbell, per round trip,
  vs pio-exit (reported, no target)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmfast._native import EventFd, EventLoop, ExitSink, IrqfdTrigger, Kvm, NullSink, Vcpu, Vm
from kvmfast.assembler import assemble_program
from kvmfast.flat_guest import install_idt, setup_long_mode

FLOOR_RELATIVE = Path("..") / "shared" / "bench" / "kvm_floor.c"
# The floor's guest shape: 4 MiB of RAM, code at 0x1000, stack at 2 MiB, port 0x80,
# MMIO at 256 MiB.
RAM_SIZE = 0x40_0000
CODE_AT = 0x1000
STACK_TOP = 0x20_0000
PORT = 0x80
MMIO_ADDR = 0x1000_0000
EXIT_PORT = 0xF4
IDT_AT = 0x10_0000
DOORBELL_GSI = 10
DOORBELL_VECTOR = 0x42
LAPIC_BASE = 0xFEE0_0000


@dataclass(frozen=True)
class PathResult:
    path: str
    ns_per_write: float
    floor_path: str
    floor_ns_per_write: float
    ratio: float
    ratio_range: tuple[float, float]
    ratios: tuple[float, ...]  # every pair's, in the order run
    target: float | None
    user_ns_per_write: float
    guest_exits: int
    drain_ns: float


class DiscardingDevice:
    """A Python device that does nothing: the cost measured is the call itself."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        return None


def find_floor_source(explicit: Path | None) -> Path:
    """--floor-src, else ../shared/bench/kvm_floor.c above the CWD or above this file."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"--floor-src {explicit} does not exist")
        return explicit
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for directory in (start, *start.parents):
            candidate = directory / FLOOR_RELATIVE
            if candidate.is_file():
                return candidate.resolve()
    raise FileNotFoundError(
        f"{FLOOR_RELATIVE} not found above {Path.cwd()} or {Path(__file__).parent}; "
        "pass --floor-src"
    )


def measure_floor(source: Path, writes: int) -> dict[str, float]:
    """Builds and runs kvm_floor: {path: ns_per_write}."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) to build the floor benchmark")
    with tempfile.TemporaryDirectory(prefix="kvmfast-floor-") as scratch:
        binary = Path(scratch) / "kvm_floor"
        subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
        output = subprocess.run(
            [str(binary), str(writes)], check=True, capture_output=True, text=True
        ).stdout
    return {
        record["path"]: float(record["ns_per_write"])
        for record in map(json.loads, filter(None, output.splitlines()))
    }


def write_loop_source(store: str) -> str:
    """The floor's guest: ``writes`` stores, then a write to the exit port."""
    return f"""
    .global entry
    entry:
        mov ecx, edi
        mov ebx, {MMIO_ADDR:#x}
    again:
        {store}
        dec ecx
        jnz again
        out {EXIT_PORT:#x}, al
    """


def new_guest(kvm: Kvm, source: str, writes: int, irqchip: str = "split") -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm(irqchip)
    memory = vm.add_memory(0, RAM_SIZE)
    program = assemble_program(source, origin=CODE_AT)
    vm.write(CODE_AT, program.code)
    vm.add_pio(EXIT_PORT, 1, ExitSink())
    vcpu = vm.create_vcpu(0)
    setup_long_mode(vm, vcpu, memory, entry=program.symbols["entry"], stack=STACK_TOP)
    vcpu.set_regs({"rdi": writes})
    if "handler" in program.symbols:
        install_idt(vm, vcpu, base=IDT_AT, handlers={DOORBELL_VECTOR: program.symbols["handler"]})
    return vm, vcpu


@dataclass(frozen=True)
class Sample:
    """One run of one path: wall-clock ns per write, and the user-mode CPU time of the
    vCPU thread per write (our loop's own cost: KVM and the guest count as system time).
    ``drain_ns`` is, for a doorbell, how long after the vCPU stopped the event loop
    handled the last ring (0 when it had handled it by then; ns_per_write includes it)."""

    ns_per_write: float
    user_ns_per_write: float
    guest_exits: int
    drain_ns: float


@dataclass(frozen=True)
class TimedRun:
    """KVM_RUN of a benchmark guest: when it started and stopped (perf_counter), the
    vCPU thread's user time over it, and the exits it took."""

    start: float
    stop: float
    user_seconds: float
    guest_exits: int


def timed_run(vcpu: Vcpu) -> TimedRun:
    user_before = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
    start = time.perf_counter()
    exit = vcpu.run()
    stop = time.perf_counter()
    user = resource.getrusage(resource.RUSAGE_THREAD).ru_utime - user_before
    if exit.reason != "device_exit":
        raise RuntimeError(f"benchmark guest stopped with {exit}")
    return TimedRun(start, stop, user, sum(vcpu.counters()["exits"].values()))


def sample_of(run: TimedRun, writes: int, finished: float | None = None) -> Sample:
    """Per-write figures of a run whose work ended at ``finished`` (default: when the
    vCPU stopped; later when work it queued was still being handled)."""
    end = run.stop if finished is None else max(run.stop, finished)
    return Sample(
        ns_per_write=(end - run.start) / writes * 1e9,
        user_ns_per_write=run.user_seconds / writes * 1e9,
        guest_exits=run.guest_exits,
        drain_ns=(end - run.stop) * 1e9,
    )


def exit_path(
    kvm: Kvm, store: str, writes: int, attach: Callable[[Vm], None], irqchip: str
) -> Sample:
    """A guest whose writes all exit to the handler ``attach`` installs."""
    vm, vcpu = new_guest(kvm, write_loop_source(store), writes, irqchip)
    attach(vm)
    sample = sample_of(timed_run(vcpu), writes)
    vm.close()
    return sample


def ignore_rings(count: int) -> None:
    """The doorbell's device work: none, so that the cost measured is the loop's."""


def doorbell_path(
    kvm: Kvm, writes: int, irqchip: str, device: Callable[[int], None] = ignore_rings
) -> Sample:
    """Zero-length MMIO ioeventfd writes drained by the EventLoop (a Python handler that
    calls ``device`` with each batch of rings), timed from the first write to the
    handling of the last ring: the vCPU may stop while the loop still holds rings, and
    those are part of the path's cost."""
    vm, vcpu = new_guest(kvm, write_loop_source("mov [rbx], eax"), writes, irqchip)
    doorbell = EventFd()
    vm.register_ioeventfd(doorbell.fd, MMIO_ADDR, 0)
    rung = [0]
    last_handled = [0.0]
    drained = threading.Event()

    def on_doorbell(count: int) -> None:
        device(count)
        rung[0] += count
        if rung[0] >= writes:
            last_handled[0] = time.perf_counter()
            drained.set()

    with EventLoop() as loop:
        loop.add(doorbell, on_doorbell)
        loop.start()
        run = timed_run(vcpu)
        drained.wait(10)
    if rung[0] != writes:
        raise RuntimeError(f"the event loop saw {rung[0]} of {writes} doorbells")
    vm.close()
    return sample_of(run, writes, finished=last_handled[0])


# The round-trip guests' interrupt handler: EOI to the LAPIC, return.
EOI_HANDLER = f"""
    handler:
        push rsi
        mov rsi, {LAPIC_BASE + 0xB0:#x}
        mov dword ptr [rsi], 0
        pop rsi
        iretq
"""


def round_trip_source() -> str:
    svr = LAPIC_BASE + 0xF0
    return f"""
    .global entry, handler
    entry:
        mov rsi, {svr:#x}
        mov dword ptr [rsi], 0x1ff
        mov ecx, edi
        mov ebx, {MMIO_ADDR:#x}
    again:
        cli
        mov [rbx], eax          # doorbell
        sti
        hlt                     # until the MSI the event loop triggers
        dec ecx
        jnz again
        out {EXIT_PORT:#x}, al
    {EOI_HANDLER}"""


def round_trip_path(kvm: Kvm, rounds: int) -> Sample:
    """Doorbell → IrqfdTrigger → irqfd → MSI → guest handler EOI, per round trip."""
    vm, vcpu = new_guest(kvm, round_trip_source(), rounds)
    doorbell, irq = EventFd(), EventFd()
    vm.set_msi_route(DOORBELL_GSI, LAPIC_BASE, DOORBELL_VECTOR)
    vm.register_irqfd(irq.fd, DOORBELL_GSI)
    vm.register_ioeventfd(doorbell.fd, MMIO_ADDR, 0)
    with EventLoop() as loop:
        loop.add(doorbell, IrqfdTrigger(irq))
        loop.start()
        sample = sample_of(timed_run(vcpu), rounds)
    vm.close()
    return sample


@dataclass(frozen=True)
class Measurement:
    """One path of ours: how to measure it once, which floor path it compares to."""

    path: str
    floor_path: str
    target: float | None
    measure: Callable[[], Sample]


def measurements(kvm: Kvm, writes: int, rounds: int, irqchip: str) -> list[Measurement]:
    pio, mmio = f"out {PORT:#x}, al", "mov [rbx], eax"

    def rust_sink(vm: Vm) -> None:
        vm.add_pio(PORT, 1, NullSink())

    def python_port(vm: Vm) -> None:
        vm.add_pio(PORT, 1, DiscardingDevice())

    def python_mmio(vm: Vm) -> None:
        vm.add_mmio(MMIO_ADDR, 4, DiscardingDevice())

    return [
        Measurement(
            "pio-exit-rust-sink",
            "pio-exit",
            1.03,
            lambda: exit_path(kvm, pio, writes, rust_sink, irqchip),
        ),
        Measurement(
            "pio-exit-python-handler",
            "pio-exit",
            1.15,
            lambda: exit_path(kvm, pio, writes, python_port, irqchip),
        ),
        Measurement(
            "mmio-exit-python-handler",
            "mmio-exit",
            1.15,
            lambda: exit_path(kvm, mmio, writes, python_mmio, irqchip),
        ),
        Measurement(
            "mmio-ioeventfd0-event-loop",
            "mmio-ioeventfd0",
            1.10,
            lambda: doorbell_path(kvm, writes, irqchip),
        ),
        Measurement(
            "doorbell-irqfd-round-trip", "pio-exit", None, lambda: round_trip_path(kvm, rounds)
        ),
    ]


def run_benchmark(
    writes: int, rounds: int, repeat: int, floor_source: Path, irqchip: str = "none"
) -> dict[str, object]:
    """Runs the floor and then each of our paths, ``repeat`` times over.

    Each of our runs is divided by the floor run just before it (seconds apart), and the
    median of those paired ratios is the figure: the exit cost of this host drifts by a
    few percent over minutes, and a pair shares its moment of that drift while the
    fastest or slowest run of a path may not share its floor's. The lowest and highest
    paired ratios show the spread."""
    kvm = Kvm()
    paths = measurements(kvm, writes, rounds, irqchip)
    floor_samples: dict[str, list[float]] = {}
    our_samples: dict[str, list[Sample]] = {m.path: [] for m in paths}
    paired: dict[str, list[float]] = {m.path: [] for m in paths}
    for _ in range(repeat):
        floor_run = measure_floor(floor_source, writes)
        for floor_path, ns in floor_run.items():
            floor_samples.setdefault(floor_path, []).append(ns)
        for measurement in paths:
            sample = measurement.measure()
            our_samples[measurement.path].append(sample)
            paired[measurement.path].append(sample.ns_per_write / floor_run[measurement.floor_path])
    results = []
    for measurement in paths:
        samples = our_samples[measurement.path]
        ratios = paired[measurement.path]
        results.append(
            PathResult(
                path=measurement.path,
                ns_per_write=round(statistics.median(s.ns_per_write for s in samples), 1),
                floor_path=measurement.floor_path,
                floor_ns_per_write=statistics.median(floor_samples[measurement.floor_path]),
                ratio=round(statistics.median(ratios), 3),
                ratio_range=(round(min(ratios), 3), round(max(ratios), 3)),
                ratios=tuple(round(ratio, 3) for ratio in ratios),
                target=measurement.target,
                user_ns_per_write=round(statistics.median(s.user_ns_per_write for s in samples), 1),
                guest_exits=samples[0].guest_exits,
                drain_ns=round(statistics.median(s.drain_ns for s in samples), 1),
            )
        )
    return {
        "irqchip": irqchip,
        "writes": writes,
        "round_trips": rounds,
        "repeat": repeat,
        "statistic": "median of ratios to the floor run just before (lowest, highest)",
        "floor_source": str(floor_source),
        "floor_ns_per_write": {
            path: statistics.median(samples) for path, samples in floor_samples.items()
        },
        "paths": [asdict(r) for r in results],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmfast.bench", description=__doc__)
    parser.add_argument("--writes", type=int, default=100_000, help="guest writes per path")
    parser.add_argument(
        "--round-trips", type=int, default=None, help="doorbell round trips (default writes/10)"
    )
    parser.add_argument("--floor-src", type=Path, default=None, help="kvm_floor.c to build")
    parser.add_argument(
        "--repeat",
        type=int,
        default=7,
        help="floor-then-ours pairs; the median of their ratios is reported",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="run everything (the floor, the vCPU, the event loop) on this host CPU: the "
        "exit cost differs between CPUs by a few percent, more than the targets' margins",
    )
    parser.add_argument(
        "--irqchip",
        choices=("none", "split"),
        default="none",
        help="the exit paths' VM: none, as the floor's VM (what the loop adds), or split, "
        "as kvm-vmm runs guests (adds the in-kernel LAPIC's own work per exit); the round "
        "trip always needs split",
    )
    args = parser.parse_args(argv)
    if args.writes < 1 or args.repeat < 1:
        parser.error("--writes and --repeat must be at least 1")
    rounds = args.round_trips if args.round_trips is not None else max(1, args.writes // 10)
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})  # threads and the floor's process inherit it
        except OSError as error:
            parser.error(f"--cpu {args.cpu}: {error.strerror}")
    try:
        floor_source = find_floor_source(args.floor_src)
    except FileNotFoundError as missing:
        print(f"kvmfast.bench: {missing}", file=sys.stderr)
        return 2
    report = run_benchmark(args.writes, rounds, args.repeat, floor_source, args.irqchip)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
