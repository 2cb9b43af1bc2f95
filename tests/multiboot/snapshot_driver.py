"""One process's share of a snapshot_guest run, for test_multiboot_snapshot.py.

Boots the guest (``--kernel``) or restores a snapshot (``--restore``), gives each input
whose prompt is out and was not given before (``--fed``, ``--history``), and either runs
it to the end or pauses it at a point ``--stop`` names and writes a snapshot there
(``--snapshot``). Then it writes what happened as JSON to ``--report`` and exits: the
machine is never resumed in this process. Run with tests/ on PYTHONPATH (as pytest
has it), for guests.multiboot.

Stop points:
  ticks   once the guest's PIT tick counter reaches ``--ticks`` (mid tick counting),
          or a prompt is out: then as ``input``
  input   as soon as the prompt of ``--at`` (any: every one) is out; its input is given
          while the guest is paused, so the snapshot holds it pending (in the device,
          its interrupt in the LAPIC)
  prompt  as ``input``, but its input is left to the process that restores it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from guests.multiboot.snapshot_session import (
    DEVICES,
    INPUTS,
    MEMORY_SIZE,
    DriverReport,
    Feeder,
    StopRule,
    guest_symbols,
    read_counters,
    run_until,
)

from kvm_vmm.boot import MultibootBoot
from kvm_vmm.console import DiscardSink
from kvm_vmm.machine import Machine, MachineConfig

COUNTERS = ("pit_ticks", "lapic_ticks", "serial_length", "key_length")
RUN_TIMEOUT_SECONDS = 30


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--kernel", type=Path)
    source.add_argument("--restore", type=Path)
    parser.add_argument("--copy", action="store_true", help="restore reading RAM in eagerly")
    parser.add_argument("--cmdline", default="")
    parser.add_argument("--elf", type=Path, required=True, help="the kernel's symbols")
    parser.add_argument("--history", type=Path, help="console text of earlier processes")
    parser.add_argument("--fed", default="", help="inputs given earlier, comma-separated")
    parser.add_argument("--stop", choices=("ticks", "input", "prompt"))
    parser.add_argument("--ticks", type=int, default=0)
    parser.add_argument("--at", choices=[item.name for item in INPUTS])
    parser.add_argument("--snapshot", type=Path)
    parser.add_argument("--report", type=Path, required=True)
    return parser.parse_args(argv)


def held_inputs(arguments: argparse.Namespace) -> list[str]:
    """The inputs given only once the machine is paused (or never, for ``prompt``)."""
    if arguments.stop is None:
        return []
    if arguments.stop == "ticks" or arguments.at is None:
        return [item.name for item in INPUTS]
    return [arguments.at]


def stop_rule(arguments: argparse.Namespace, symbols: dict[str, int]) -> StopRule | None:
    if arguments.stop is None:
        return None
    held = held_inputs(arguments)
    ticks = {"pit_ticks": symbols["pit_ticks"]}

    def stop(feeder: Feeder, due: list[str], elapsed: float) -> bool:
        if any(name in held for name in due):
            return True
        if arguments.stop != "ticks":
            return False
        mark: int = arguments.ticks
        return read_counters(feeder.machine, ticks)["pit_ticks"] >= mark

    return stop


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    symbols = guest_symbols(arguments.elf, COUNTERS)
    started = time.monotonic()
    if arguments.restore is not None:
        machine = Machine.restore(arguments.restore, console=DiscardSink(), copy=arguments.copy)
    else:
        machine = Machine(MachineConfig(memory_size=MEMORY_SIZE))
        for spec in DEVICES:
            machine.add_device_option(spec)
        machine.boot(MultibootBoot(arguments.kernel, arguments.cmdline))
    setup_seconds = time.monotonic() - started
    history = arguments.history.read_bytes() if arguments.history else b""
    fed = [name for name in arguments.fed.split(",") if name]
    feeder = Feeder(machine, history, fed)
    given: list[str] = []
    snapshot_seconds = None
    with machine:
        started_at = time.time()
        machine.start()
        paused = run_until(
            feeder, stop_rule(arguments, symbols), RUN_TIMEOUT_SECONDS, held_inputs(arguments)
        )
        if paused and arguments.stop != "prompt":
            given = feeder.feed_due()
        counters = read_counters(machine, symbols)
        if paused and arguments.snapshot is not None:
            before = time.monotonic()
            machine.snapshot(arguments.snapshot)
            snapshot_seconds = time.monotonic() - before
        outcome = machine.outcome
        report = DriverReport(
            paused=paused,
            status=None if outcome is None else outcome.status,
            reason=None if outcome is None else outcome.reason,
            console=machine.serial.transcript().decode("latin-1"),
            fed=feeder.fed,
            given_while_paused=given,
            counters=counters,
            setup_seconds=setup_seconds,
            snapshot_seconds=snapshot_seconds,
            started_at=started_at,
            ended_at=time.time(),
        )
    arguments.report.write_text(json.dumps(dataclasses.asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
