"""Cost of completing in userspace an instruction KVM cannot emulate, as a ratio to
the pio-exit floor measured in the same run.

``python -m kvmfast.bench_emulation [--iterations N] [--repeat R] [--floor-src PATH]``
runs, in 64-bit guests at CPL 0, loops of N iterations of CLAC, POPCNT, XSAVE, an
SSE instruction (PXOR) and an AVX one (VPADDD), each of which ends KVM_RUN with an
emulation failure on hosts whose KVM emulates kernel code, a straight run of 16 PXOR
(completed on one exit: the per-instruction cost of vector code as kernels run it), and
the same loop around ``out 0x80, al`` to a Rust NullSink. The loop's own cost (the
loop around a NOP) is subtracted from each. It
prints one JSON object: ns per completion, the pio exit through kvmfast, the C floor's
pio-exit (../shared/bench/kvm_floor.c, when found), and the ratios (target ≤ 1.5× the
floor). The fastest of R alternating runs is kept for every path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmfast._native import ExitSink, Kvm, NullSink, Vcpu, Vm
from kvmfast.bench import find_floor_source, measure_floor
from kvmfast.testing import assemble_program, setup_long_mode

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
    ratio_to_kvmfast_pio: float
    ratio_to_floor_pio: float | None
    target: float
    completions: int


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


def run_benchmark(iterations: int, repeat: int, floor_source: Path | None) -> dict[str, object]:
    kvm = Kvm()
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    floor: dict[str, float] = {}
    for _ in range(repeat):
        if floor_source is not None:
            measured = measure_floor(floor_source, iterations)
            floor = {k: min(v, floor.get(k, v)) for k, v in measured.items()}
        for path in PATHS:
            ns, done = timed(kvm, path, iterations)
            best[path] = min(ns, best.get(path, ns))
            counts[path] = done
    loop = best["loop"]
    pio = best["pio"] - loop
    floor_pio = floor.get("pio-exit")
    results = []
    for path, (_, counted, per_iteration) in PATHS.items():
        if counted is None:
            continue
        cost = (best[path] - loop) / per_iteration
        results.append(
            Completion(
                path=path,
                instructions_per_exit=per_iteration,
                ns_per_completion=round(cost, 1),
                ratio_to_kvmfast_pio=round(cost / pio, 3),
                ratio_to_floor_pio=round(cost / floor_pio, 3) if floor_pio else None,
                target=TARGET_RATIO,
                completions=counts[path],
            )
        )
    return {
        "iterations": iterations,
        "repeat": repeat,
        "loop_ns_per_iteration": round(loop, 1),
        "kvmfast_pio_ns": round(pio, 1),
        "floor_pio_exit_ns": floor_pio,
        # What reading the guest's vector state costs by itself here: XSAVE and SSE
        # completions need it once per exit, so one exit plus this bounds them below.
        "kvm_get_xsave_ns": round(get_xsave_ns(kvm), 1),
        "completions": [asdict(result) for result in results],
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
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs; fastest kept")
    parser.add_argument("--floor-src", type=Path, default=None, help="kvm_floor.c to build")
    parser.add_argument("--no-floor", action="store_true", help="skip the C floor")
    args = parser.parse_args(argv)
    floor_source = None
    if not args.no_floor:
        try:
            floor_source = find_floor_source(args.floor_src)
        except FileNotFoundError as error:
            print(f"no floor: {error}", file=sys.stderr)
    print(json.dumps(run_benchmark(args.iterations, args.repeat, floor_source), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
