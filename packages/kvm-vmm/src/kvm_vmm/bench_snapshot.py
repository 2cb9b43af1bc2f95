"""Snapshot and restore of a guest with a quarter of its RAM written, against a fresh
machine started in the same run.

``python -m kvm_vmm.bench_snapshot [--sizes 256M,2G] [--runs N] [--seed S] [--no-demo]
[--demo-timeout SECONDS] [--output FILE] [--note TEXT]`` does, for each size:

- the guest: two instructions at 1 MiB in 64-bit mode, ``spin: jmp spin`` and
  ``out 0xf4, al`` (isa-debug-exit, status 85). Before it starts, one page in each
  aligned group of four from 2 MiB up (which one by splitmix64 of the group and the
  seed) is filled with non-zero data: a quarter of the RAM, scattered page by page (a
  hole between most of them: the sparse memory file's hard case).
- snapshot: the guest spins; pause() to snapshot written (fsync included), N times
  on the same machine. While paused its RIP is moved from the loop to the ``out``:
  the first instruction a restored guest runs is the debug exit. Beside it the memory
  file's length and what it takes on disk (st_blocks * 512).
- restore in this process: Machine.restore(snapshot) (RAM mapped MAP_PRIVATE, or read
  in with ``copy``), start(), to the debug-exit outcome; both again after
  posix_fadvise(DONTNEED) has dropped the memory file from the host's page cache.
  The floor, run just before each: a fresh Machine of the same size, the debug-exit
  device added, the same code written and entered at the ``out``, start(), to the
  same outcome. Ratios are each run over the floor run just before it.
- restore in a new process: spawn to exit of a ``python -c`` that imports kvm-vmm,
  restores and runs (its own timestamps split the time), and of ``kvm-vmm restore
  SNAPSHOT --serial null`` when this kvm-vmm has that command; the floor is spawn to
  exit of ``python -c "import kvm_vmm.machine"``.

Last, unless ``--no-demo``: when the demo's warm-start snapshot is in the cache, the
time from spawning ``kvm-vmm demo`` to its shell answering ``echo ok``. Targets (issue
17: restore to a running vCPU <= 50 ms, the demo's answer <= 1 s) are printed beside
the figures, never asserted. It prints one JSON object (``--output FILE`` writes it
there too); the exit status is 1 when a guest did not end with its debug exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvm_vmm import layout
from kvm_vmm.bench_disk import machine_facts
from kvm_vmm.bench_snapshot_process import (
    RESTORE_SCRIPT,
    Spawned,
    cli_command,
    cli_has_restore,
    demo_warm_start,
    floor_command,
    script_command,
    script_steps,
    spawn_timed,
)
from kvm_vmm.cli import UsageError, parse_size
from kvm_vmm.loaders import default_cache_dir
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.snapshot.memory_file import MEMORY_FILE
from kvmfast.assembler import assemble_program

DEFAULT_SIZES = "256M,2G"
DEFAULT_RUNS = 10
DEFAULT_SEED = 20261207
DEFAULT_DEMO_TIMEOUT = 60.0
TARGET_RESTORE_MS = 50.0  # issue 17: restore to a running vCPU
TARGET_DEMO_S = 1.0  # issue 17: the demo's second run to an answering prompt
DEBUG_EXIT = "isa-debug-exit,iobase=0xf4,iosize=0x4"
EXIT_VALUE = 0x2A
EXIT_STATUS = (EXIT_VALUE << 1) | 1  # what isa-debug-exit makes of it (kvm_devices.debug_exit)
CODE_ADDRESS = 0x10_0000  # where kvm-vmm's own demo guest loads (boot.DEMO_LOAD_ADDRESS)
DIRTY_FROM = 2 * layout.MIB  # above the code, the boot GDT and page tables
PAGE = 4096
GROUP = 4  # one page written in each group of this many: a quarter of the RAM
SPIN_SECONDS = 0.02  # the guest runs this long before each pause()
RUN_TIMEOUT = 30.0  # a guest that has not reached its debug exit by then has failed
GUEST_SOURCE = """\
    .global spin, exit
spin:
    jmp spin                # the original runs here until the host pauses it
exit:
    out 0xf4, al            # isa-debug-exit: a restored guest's first instruction
    hlt
"""


@dataclass(frozen=True)
class Guest:
    code: bytes
    spin: int  # the loop's address
    exit: int  # the debug exit's


def tiny_guest() -> Guest:
    program = assemble_program(GUEST_SOURCE, bits=64, origin=CODE_ADDRESS)
    return Guest(program.code, program.symbols["spin"], program.symbols["exit"])


def load_guest(machine: Machine, guest: Guest, rip: int) -> None:
    """The debug-exit device, the code, the vCPU in 64-bit mode at ``rip``."""
    machine.add_device_option(DEBUG_EXIT)
    machine.write_memory(CODE_ADDRESS, guest.code)
    machine.enter(EntryState("long64", rip, registers={"rax": EXIT_VALUE}))


def splitmix64(value: int) -> int:
    """One step of splitmix64 (Steele, Lea, Flood: "Fast splittable pseudorandom
    number generators", 2014) as a hash of ``value``."""
    z = (value + 0x9E37_79B9_7F4A_7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & (2**64 - 1)
    return z ^ (z >> 31)


def dirty_pages(memory_size: int, seed: int) -> Iterator[int]:
    """Guest-physical addresses of the pages to write: in each aligned group of GROUP
    pages of RAM from DIRTY_FROM up, the one splitmix64 of (seed, group) picks."""
    for region in layout.ram_regions(memory_size):
        first = -(-max(region.start, DIRTY_FROM) // (GROUP * PAGE))
        for group in range(first, region.end // (GROUP * PAGE)):
            yield (group * GROUP + splitmix64(seed ^ group) % GROUP) * PAGE


def page_data(address: int, seed: int) -> bytes:
    """A page's contents: a 64-bit value of its own, never zero, repeated."""
    return struct.pack("<Q", splitmix64(seed + address) | 1) * (PAGE // 8)


def write_dirty_pages(machine: Machine, seed: int) -> int:
    """Fill the pages dirty_pages() names; their count."""
    count = 0
    for address in dirty_pages(machine.config.memory_size, seed):
        machine.write_memory(address, page_data(address, seed))
        count += 1
    return count


# -- snapshots ------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotRuns:
    snapshot: Path  # the last one taken, what the restores use
    pause_s: list[float]  # pause() alone
    snapshot_s: list[float]  # pause() to snapshot() returned
    dirtied_pages: int
    write_s: float  # filling the pages from the host, once


def take_snapshots(
    memory_size: int, guest: Guest, seed: int, runs: int, where: Path
) -> SnapshotRuns:
    """A guest spinning with its pages written, paused and snapshotted ``runs`` times;
    each snapshot but the last is removed once the next is written."""
    pause_s, snapshot_s = [], []
    last: Path | None = None
    with Machine(MachineConfig(memory_size=memory_size)) as machine:
        load_guest(machine, guest, guest.spin)
        began = time.monotonic()
        dirtied = write_dirty_pages(machine, seed)
        write_s = time.monotonic() - began
        machine.start()
        vcpu = machine.vcpus[0]
        for index in range(runs):
            if index:
                vcpu.set_regs({"rip": guest.spin})
                machine.resume()
            time.sleep(SPIN_SECONDS)
            began = time.monotonic()
            machine.pause()
            paused = time.monotonic()
            rip = vcpu.get_regs()["rip"]
            if rip != guest.spin:
                raise RuntimeError(f"the guest paused at RIP {rip:#x}, not in its loop")
            vcpu.set_regs({"rip": guest.exit})
            path = where / f"snapshot-{index}"
            machine.snapshot(path)
            snapshot_s.append(time.monotonic() - began)
            pause_s.append(paused - began)
            if last is not None:
                shutil.rmtree(last)
            last = path
    assert last is not None
    return SnapshotRuns(last, pause_s, snapshot_s, dirtied, write_s)


def memory_file_report(snapshot: Path, dirtied_pages: int) -> dict[str, object]:
    status = (snapshot / MEMORY_FILE).stat()
    allocated = status.st_blocks * 512
    return {
        "length_bytes": status.st_size,
        "allocated_bytes": allocated,
        "allocated_share_of_length": round(allocated / status.st_size, 4),
        "dirtied_bytes": dirtied_pages * PAGE,
        "allocated_over_dirtied": round(allocated / (dirtied_pages * PAGE), 4),
    }


# -- restores in this process -----------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One guest run to its debug exit: ``build_s`` is Machine.restore() (or, for the
    floor, Machine() and loading the code), ``run_s`` start() to the outcome."""

    build_s: float
    run_s: float
    status: int

    @property
    def total_s(self) -> float:
        return self.build_s + self.run_s


def _run_to_exit(began: float, machine: Machine) -> Run:
    built = time.monotonic()
    machine.start()
    outcome = machine.wait(timeout=RUN_TIMEOUT)
    ended = time.monotonic()
    return Run(built - began, ended - built, -1 if outcome is None else outcome.status)


def restore_run(snapshot: Path, copy: bool) -> Run:
    began = time.monotonic()
    with Machine.restore(snapshot, copy=copy) as machine:
        return _run_to_exit(began, machine)


def floor_run(memory_size: int, guest: Guest) -> Run:
    began = time.monotonic()
    with Machine(MachineConfig(memory_size=memory_size)) as machine:
        load_guest(machine, guest, guest.exit)
        return _run_to_exit(began, machine)


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the host's page cache (clean pages: it was fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Mode:
    name: str
    copy: bool
    cold: bool  # the memory file dropped from the page cache first


MODES = (
    Mode("private", copy=False, cold=False),
    Mode("copy", copy=True, cold=False),
    Mode("private_cold_cache", copy=False, cold=True),
    Mode("copy_cold_cache", copy=True, cold=True),
)


def in_process_restores(
    snapshot: Path, memory_size: int, guest: Guest, runs: int
) -> dict[str, list[tuple[Run, Run]]]:
    """Per mode, ``runs`` (floor, restore) pairs, the floor run just before. The warm
    modes go first: a cold restore leaves part of the file in the page cache."""
    pairs: dict[str, list[tuple[Run, Run]]] = {mode.name: [] for mode in MODES}
    for cold in (False, True):
        for _ in range(runs):
            for mode in (mode for mode in MODES if mode.cold == cold):
                floor = floor_run(memory_size, guest)
                if mode.cold:
                    evict(snapshot / MEMORY_FILE)
                pairs[mode.name].append((floor, restore_run(snapshot, mode.copy)))
    return pairs


# -- figures ---------------------------------------------------------------------------


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Median, lowest and highest of ``values`` times ``scale``."""
    scaled = [value * scale for value in values]
    return {
        "median": round(statistics.median(scaled), 3),
        "min": round(min(scaled), 3),
        "max": round(max(scaled), 3),
    }


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    return summary(seconds, 1000.0)


def each_ms(seconds: Sequence[float]) -> list[float]:
    """Every run in order, in milliseconds: where an outlier fell."""
    return [round(value * 1000, 3) for value in seconds]


def _bad_statuses(what: str, statuses: Sequence[int]) -> list[str]:
    bad = [status for status in statuses if status != EXIT_STATUS]
    if not bad:
        return []
    return [
        f"{what}: {len(bad)} run(s) ended with status {bad[0]}, not the debug exit's {EXIT_STATUS}"
    ]


def in_process_report(
    pairs: dict[str, list[tuple[Run, Run]]], errors: list[str]
) -> dict[str, object]:
    floors = [floor for mode_pairs in pairs.values() for floor, _ in mode_pairs]
    errors += _bad_statuses("in-process floor", [run.status for run in floors])
    report: dict[str, object] = {
        "floor": {
            "what": "Machine() of the same size, isa-debug-exit, the same code: start() to the"
            " debug exit",
            "total_ms": summary_ms([run.total_s for run in floors]),
            "build_ms": summary_ms([run.build_s for run in floors]),
            "start_to_exit_ms": summary_ms([run.run_s for run in floors]),
        }
    }
    for name, mode_pairs in pairs.items():
        restores = [restore for _, restore in mode_pairs]
        errors += _bad_statuses(f"in-process restore, {name}", [run.status for run in restores])
        median_ms = statistics.median(run.total_s for run in restores) * 1000
        report[name] = {
            "total_ms": summary_ms([run.total_s for run in restores]),
            "each_total_ms": each_ms([run.total_s for run in restores]),
            "each_floor_total_ms": each_ms([floor.total_s for floor, _ in mode_pairs]),
            "restore_ms": summary_ms([run.build_s for run in restores]),
            "start_to_exit_ms": summary_ms([run.run_s for run in restores]),
            "ratio_to_floor": summary(
                [restore.total_s / floor.total_s for floor, restore in mode_pairs]
            ),
            "exit_statuses": sorted({run.status for run in restores}),
            "target_ms": TARGET_RESTORE_MS,
            "median_within_target": median_ms <= TARGET_RESTORE_MS,
        }
    return report


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    shown: list[str]  # argv as the report shows it: no interpreter path, no script body


def restore_commands(snapshot: Path, use_cli: bool) -> list[Command]:
    script = script_command(snapshot, False, RUN_TIMEOUT)
    commands = [
        Command(
            "python_c_restore",
            script,
            ["python", "-c", "RESTORE_SCRIPT", "SNAPSHOT", *script[4:]],
        )
    ]
    if use_cli:
        cli = cli_command(snapshot)
        commands.append(
            Command("kvm_vmm_restore", cli, ["python", *cli[1:4], "SNAPSHOT", *cli[5:]])
        )
    return commands


def command_report(
    snapshot: Path, runs: int, use_cli: bool, errors: list[str]
) -> dict[str, object]:
    """Spawn to exit of new processes restoring ``snapshot``, each after a floor process."""
    commands = restore_commands(snapshot, use_cli)
    # (floor, restore, when the restore was spawned) per command
    results: dict[str, list[tuple[Spawned, Spawned, float]]] = {c.name: [] for c in commands}
    for _ in range(runs):
        for command in commands:
            floor = spawn_timed(floor_command())
            began = time.monotonic()
            results[command.name].append((floor, spawn_timed(command.argv), began))
    floors = [floor for spawned in results.values() for floor, _, _ in spawned]
    failed = [floor for floor in floors if floor.status != 0]
    if failed:
        errors.append(f"floor process: status {failed[0].status}: {failed[0].stderr[-500:]}")
    report: dict[str, object] = {
        "floor": {
            "command": ["python", *floor_command()[1:]],
            "spawn_to_exit_ms": summary_ms([floor.seconds for floor in floors]),
        },
        "python_c_restore_script": RESTORE_SCRIPT.splitlines(),
    }
    if not use_cli:
        report["kvm_vmm_restore"] = {"skipped": "this kvm-vmm has no restore command"}
    for command in commands:
        spawned = results[command.name]
        children = [child for _, child, _ in spawned]
        statuses = [child.status for child in children]
        errors += _bad_statuses(f"restore command {command.name}", statuses)
        errors += [
            f"{command.name} said: {child.stderr.strip()[-500:]}"
            for child in children
            if child.status != EXIT_STATUS and child.stderr.strip()
        ][:1]
        median_ms = statistics.median(child.seconds for child in children) * 1000
        floor_ms = statistics.median(floor.seconds for floor, _, _ in spawned) * 1000
        entry: dict[str, object] = {
            "command": command.shown,
            "spawn_to_exit_ms": summary_ms([child.seconds for child in children]),
            "each_spawn_to_exit_ms": each_ms([child.seconds for child in children]),
            "median_beyond_floor_ms": round(median_ms - floor_ms, 3),
            "ratio_to_floor": summary(
                [child.seconds / floor.seconds for floor, child, _ in spawned]
            ),
            "exit_statuses": sorted(set(statuses)),
        }
        steps = [script_steps(child, began) for _, child, began in spawned]
        known = [step for step in steps if step is not None]
        if known:
            entry["steps_ms"] = {key: summary_ms([step[key] for step in known]) for key in known[0]}
            # The figure: the command's start to the guest's first instruction.
            median_ms = statistics.median(step["spawn_to_debug_exit"] for step in known) * 1000
            entry["target_compared"] = "steps_ms.spawn_to_debug_exit"
        else:
            entry["target_compared"] = "spawn_to_exit_ms (the command gives no timestamps)"
        entry["target_ms"] = TARGET_RESTORE_MS
        entry["median_within_target"] = median_ms <= TARGET_RESTORE_MS
        report[command.name] = entry
    return report


def measure_size(
    memory_size: int, guest: Guest, seed: int, runs: int, use_cli: bool, where: Path
) -> tuple[dict[str, object], list[str]]:
    """Every figure for one size; the problems seen (a guest that did not end with its
    debug exit, a failed child)."""
    errors: list[str] = []
    taken = take_snapshots(memory_size, guest, seed, runs, where)
    report: dict[str, object] = {
        "memory_bytes": memory_size,
        "dirtied_pages": taken.dirtied_pages,
        "host_write_of_dirtied_pages_ms": round(taken.write_s * 1000, 3),
        "snapshot": {
            "pause_to_written_ms": summary_ms(taken.snapshot_s),
            "each_pause_to_written_ms": each_ms(taken.snapshot_s),
            "pause_ms": summary_ms(taken.pause_s),
        },
        "memory_file": memory_file_report(taken.snapshot, taken.dirtied_pages),
        "restore_in_process": in_process_report(
            in_process_restores(taken.snapshot, memory_size, guest, runs), errors
        ),
        "restore_command": command_report(taken.snapshot, runs, use_cli, errors),
        "load_average_after": [round(load, 2) for load in os.getloadavg()],
    }
    shutil.rmtree(taken.snapshot)
    return report, errors


def demo_warm_starts(
    cache_dir: Path | None, timeout: float, runs: int, argv: Sequence[str] | None = None
) -> dict[str, object]:
    """The demo's warm start ``runs`` times (kvm_vmm.bench_snapshot_process): the first
    run's report with every run's seconds to the answer and their summary."""
    first = demo_warm_start(cache_dir, timeout, argv)
    if "skipped" in first:
        return first
    reports = [first] + [demo_warm_start(cache_dir, timeout, argv) for _ in range(runs - 1)]
    seconds = [r["spawn_to_answer_s"] for r in reports if "spawn_to_answer_s" in r]
    result = {
        key: value for key, value in first.items() if key not in ("spawn_to_answer_s", "error")
    }
    result["each_spawn_to_answer_s"] = seconds
    if seconds:
        result["spawn_to_answer_s"] = summary([float(value) for value in seconds])  # type: ignore[arg-type]
    errors = [str(r["error"]) for r in reports if "error" in r]
    if errors:
        result["errors"] = errors
    return result


def parse_sizes(text: str) -> list[int]:
    """--sizes: comma-separated sizes (parse_size's spelling), each with room above
    DIRTY_FROM and whole 2 MiB."""
    sizes = []
    for part in text.split(","):
        try:
            size = parse_size(part.strip())
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if size < 2 * DIRTY_FROM or size % (2 * layout.MIB):
            raise argparse.ArgumentTypeError(
                f"{part}: at least {2 * DIRTY_FROM >> 20} MiB, a multiple of 2 MiB"
            )
        sizes.append(size)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvm_vmm.bench_snapshot", description=__doc__)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes(DEFAULT_SIZES),
        help="guest RAM sizes, e.g. 256M,2G",
    )
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs of each figure")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="which pages are written")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's warm start")
    parser.add_argument("--demo-timeout", type=float, default=DEFAULT_DEMO_TIMEOUT)
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--note", default="", help="the conditions of the run, kept in the JSON (e.g. the load)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    cache_dir = default_cache_dir(os.environ)
    guest = tiny_guest()
    use_cli = cli_has_restore()
    before = [round(load, 2) for load in os.getloadavg()]
    sizes: list[dict[str, object]] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-", dir=os.environ.get("TMPDIR")) as tmp:
        for size in args.sizes:
            report, problems = measure_size(size, guest, args.seed, args.runs, use_cli, Path(tmp))
            sizes.append(report)
            errors += problems
    demo: dict[str, object] = {"skipped": "--no-demo"}
    if not args.no_demo:
        demo = demo_warm_starts(cache_dir, args.demo_timeout, args.runs)
        demo["target_s"] = TARGET_DEMO_S
    report = {
        "benchmark": "python -m kvm_vmm.bench_snapshot",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_facts(cache_dir), "load_average_before": before},
        "note": args.note,
        "runs": args.runs,
        "guest": {
            "code": GUEST_SOURCE.splitlines(),
            "code_address": CODE_ADDRESS,
            "exit_status": EXIT_STATUS,
            "dirtied": f"one page in each aligned group of {GROUP} from {DIRTY_FROM >> 20} MiB up, "
            "picked by splitmix64(seed ^ group); each page a non-zero 64-bit value repeated",
            "seed": args.seed,
        },
        "targets": {
            "restore_to_running_vcpu_ms": TARGET_RESTORE_MS,
            "demo_answer_s": TARGET_DEMO_S,
        },
        "sizes": sizes,
        "demo_warm_start": demo,
        "errors": errors,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
