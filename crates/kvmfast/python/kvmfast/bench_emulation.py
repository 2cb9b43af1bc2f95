"""Cost of completing in userspace an instruction KVM cannot emulate, as a ratio to
the pio-exit floor measured in the same run.

``python -m kvmfast.bench_emulation [--iterations N] [--repeat R] [--floor-src PATH]``
runs, in 64-bit guests at CPL 0, loops of N iterations of CLAC, POPCNT, XSAVE, an
SSE instruction (PXOR) and an AVX one (VPADDD), each of which ends KVM_RUN with an
emulation failure on hosts whose KVM emulates kernel code, a straight run of 16 PXOR
(completed on one exit: the per-instruction cost of vector code as kernels run it), and
the same loop around ``out 0x80, al`` to a Rust NullSink. The loop's own cost (the
loop around a NOP) is subtracted from each. Each of the R repeats runs the C floor
(../shared/bench/kvm_floor.c, as ``kvmfast.bench`` finds and builds it; without it
the command fails) and then every path; a completion's figure is the median of its R
ratios to the floor's pio-exit of the same repeat, with the lowest and highest (target
≤ 1.5×), as kvmfast.bench pairs its runs. It prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmfast._native import ExitSink, Kvm, NullSink, Vcpu, Vm
from kvmfast.assembler import assemble_program
from kvmfast.bench import find_floor_source, measure_floor
from kvmfast.flat_guest import setup_long_mode

RAM_SIZE = 0x40_0000
CODE_AT = 0x1000
STACK_TOP = 0x20_0000
DATA_AT = 0x30_0000
EXIT_PORT = 0xF4
TARGET_RATIO = 1.5

RUN_LENGTH = 16

# name -> (loop body, completion counted under, instructions completed per iteration)
PATHS: dict[str, tuple[str, str | None, int]] = {
    "loop": ("nop", None, 0),
    "pio": ("out 0x80, al", None, 0),
    "clac": ("clac", "clac", 1),
    "popcnt": ("popcnt rax, rbx", "popcnt", 1),
    "xsave": ("xsave [rsi]", "xsave", 1),
    "sse_pxor": ("pxor xmm0, xmm1", "pxor", 1),
    "avx_vpaddd": ("vpaddd ymm0, ymm1, ymm2", "vpaddd", 1),
    # Straight vector code, as in a kernel's crypto: completed as one run per exit.
    f"sse_pxor_run{RUN_LENGTH}": ("\n".join(["pxor xmm0, xmm1"] * RUN_LENGTH), "pxor", RUN_LENGTH),
}


@dataclass(frozen=True)
class Completion:
    path: str
    instructions_per_exit: int
    ns_per_completion: float
    ratio_to_floor_pio: float
    ratio_range: tuple[float, float]
    ratios: tuple[float, ...]  # every repeat's, in the order run
    ratio_to_kvmfast_pio: float
    target: float
    completions: int


@dataclass(frozen=True)
class Repeat:
    """One repeat: the floor's pio-exit ns per write, then ns per iteration of every
    path of PATHS and the completions each counted, measured right after it."""

    floor_pio_ns: float
    ns_per_iteration: dict[str, float]
    completions: dict[str, int]


def paired_completions(repeats: Sequence[Repeat]) -> list[Completion]:
    """Each completion path's cost (its loop minus the NOP loop of the same repeat) over
    the floor of that repeat: the median of the ratios, with the lowest and highest."""
    results = []
    for path, (_, counted, per_iteration) in PATHS.items():
        if counted is None:
            continue
        costs, to_floor, to_pio = [], [], []
        for repeat in repeats:
            loop = repeat.ns_per_iteration["loop"]
            cost = (repeat.ns_per_iteration[path] - loop) / per_iteration
            costs.append(cost)
            to_floor.append(cost / repeat.floor_pio_ns)
            to_pio.append(cost / (repeat.ns_per_iteration["pio"] - loop))
        results.append(
            Completion(
                path=path,
                instructions_per_exit=per_iteration,
                ns_per_completion=round(statistics.median(costs), 1),
                ratio_to_floor_pio=round(statistics.median(to_floor), 3),
                ratio_range=(round(min(to_floor), 3), round(max(to_floor), 3)),
                ratios=tuple(round(ratio, 3) for ratio in to_floor),
                ratio_to_kvmfast_pio=round(statistics.median(to_pio), 3),
                target=TARGET_RATIO,
                completions=repeats[-1].completions[path],
            )
        )
    return results


def new_guest(kvm: Kvm, body: str, iterations: int) -> tuple[Vm, Vcpu]:
    source = f"""
    .global entry
    entry:
        mov ecx, {iterations}
        mov rsi, {DATA_AT:#x}
        mov eax, 3
        xor edx, edx
    again:
        {body}
        dec ecx
        jnz again
        out {EXIT_PORT:#x}, al
    """
    vm = kvm.create_vm()
    memory = vm.add_memory(0, RAM_SIZE)
    program = assemble_program(source, origin=CODE_AT)
    vm.write(CODE_AT, program.code)
    vm.add_pio(EXIT_PORT, 1, ExitSink())
    vm.add_pio(0x80, 1, NullSink())
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(kvm.supported_cpuid())
    setup_long_mode(vm, vcpu, memory, entry=program.symbols["entry"], stack=STACK_TOP)
    sregs = vcpu.get_sregs()
    # CR4.OSFXSR | OSXMMEXCPT | OSXSAVE and XCR0 = x87|SSE|AVX, as a kernel sets them.
    vcpu.set_sregs({"cr4": sregs["cr4"] | 0x40600, "cr0": (sregs["cr0"] | 0x22) & ~0xC})
    vcpu.set_xcrs({0: 0x7})
    return vm, vcpu


def timed(kvm: Kvm, path: str, iterations: int) -> tuple[float, int]:
    body, counted, per_iteration = PATHS[path]
    vm, vcpu = new_guest(kvm, body, iterations)
    start = time.perf_counter()
    exit = vcpu.run()
    elapsed = time.perf_counter() - start
    if exit.reason != "device_exit":
        raise RuntimeError(f"{path}: the guest stopped with {exit}")
    done = vcpu.counters()["completions"].get(counted, 0) if counted else 0
    if counted and done != iterations * per_iteration:
        raise RuntimeError(f"{path}: {done} completions for {iterations} iterations")
    vm.close()
    return elapsed / iterations * 1e9, done


def run_benchmark(iterations: int, repeat: int, floor_source: Path) -> dict[str, object]:
    kvm = Kvm()
    repeats = []
    for _ in range(repeat):
        floor_pio = measure_floor(floor_source, iterations)["pio-exit"]
        ns: dict[str, float] = {}
        counts: dict[str, int] = {}
        for path in PATHS:
            ns[path], counts[path] = timed(kvm, path, iterations)
        repeats.append(Repeat(floor_pio, ns, counts))
    median = statistics.median
    return {
        "iterations": iterations,
        "repeat": repeat,
        "statistic": "median of ratios to the floor run just before (lowest, highest)",
        "floor_source": str(floor_source),
        "loop_ns_per_iteration": round(median(r.ns_per_iteration["loop"] for r in repeats), 1),
        "kvmfast_pio_ns": round(
            median(r.ns_per_iteration["pio"] - r.ns_per_iteration["loop"] for r in repeats), 1
        ),
        "floor_pio_exit_ns": median(r.floor_pio_ns for r in repeats),
        # What reading the guest's vector state costs by itself here: XSAVE and SSE
        # completions need it once per exit, so one exit plus this bounds them below.
        "kvm_get_xsave_ns": round(get_xsave_ns(kvm), 1),
        "completions": [asdict(result) for result in paired_completions(repeats)],
    }


def get_xsave_ns(kvm: Kvm, calls: int = 2000) -> float:
    """One KVM_GET_XSAVE (through the Python binding, ~0.3 us of it Python's)."""
    vm, vcpu = new_guest(kvm, "nop", 1)
    vcpu.get_xsave()
    start = time.perf_counter()
    for _ in range(calls):
        vcpu.get_xsave()
    elapsed = time.perf_counter() - start
    vm.close()
    return elapsed / calls * 1e9


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmfast.bench_emulation", description=__doc__)
    parser.add_argument("--iterations", type=int, default=20_000, help="loop iterations per path")
    parser.add_argument(
        "--repeat", type=int, default=3, help="floor-then-ours repeats; median of the ratios"
    )
    parser.add_argument("--floor-src", type=Path, default=None, help="kvm_floor.c to build")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.repeat < 1:
        parser.error("--iterations and --repeat must be at least 1")
    try:
        floor_source = find_floor_source(args.floor_src)
    except FileNotFoundError as missing:
        print(f"kvmfast.bench_emulation: {missing}", file=sys.stderr)
        return 2
    print(json.dumps(run_benchmark(args.iterations, args.repeat, floor_source), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
