"""The host's side of snapshot_guest.S: its input, given only once its prompt is out.

A run of the guest may be split over several processes (run, snapshot, restore in a
new process, ...): what has been typed so far travels with the snapshot as a list of
input names, and the console text of the earlier processes as ``history``, so that
each input is given exactly once, and only after its prompt appeared in some process.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvm_vmm.machine import Machine, MachineState

# Longer than the UART's 16-byte FIFO: given while the guest is paused, the rest waits
# in the UART's host backlog, which the snapshot must carry too.
SERIAL_LINE = b"snapshot, restore, repeat\r"
# "K" pressed and released, in scan code set 2 (what a PS/2 keyboard sends); with the
# 8042's translation the guest reads set 1: 0x25 and its break code 0xA5.
KEY_SET2 = (0x42, 0xF0, 0x42)
KEY_SET1 = (0x25, 0xA5)
POLL_SECONDS = 0.001
MEMORY_SIZE = 16 << 20
DEVICES = ("isa-debug-exit,iobase=0xf4,iosize=0x4",)


def type_serial(machine: Machine) -> None:
    machine.serial.write(SERIAL_LINE)


def press_key(machine: Machine) -> None:
    machine.platform.i8042.keyboard_input(KEY_SET2)


@dataclass(frozen=True)
class Input:
    name: str
    prompt: bytes
    give: Callable[[Machine], None]


INPUTS = (Input("serial", b"serial> ", type_serial), Input("key", b"key> ", press_key))


@dataclass
class Feeder:
    """Gives each input whose prompt is on the console (``history`` and this
    machine's transcript) and which was not given before (``fed``)."""

    machine: Machine
    history: bytes = b""
    fed: list[str] = field(default_factory=list)

    def console(self) -> bytes:
        return self.history + self.machine.serial.transcript()

    def feed_due(self, hold: Collection[str] = ()) -> list[str]:
        """The inputs due (their prompt is out, not given yet): each given unless named
        in ``hold``."""
        console = self.console()
        due = [item for item in INPUTS if item.name not in self.fed and item.prompt in console]
        for item in due:
            if item.name not in hold:
                item.give(self.machine)
                self.fed.append(item.name)
        return [item.name for item in due]


StopRule = Callable[[Feeder, list[str], float], bool]


def run_until(
    feeder: Feeder, stop: StopRule | None, timeout: float, hold: Collection[str] = ()
) -> bool:
    """Run the started machine, feeding it, until ``stop(feeder, due,
    seconds_since_start)`` says so (then pause it and return True) or the run ends
    (False). ``due``: the inputs whose prompts are out, given unless named in ``hold``."""
    machine = feeder.machine
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise TimeoutError(f"the guest did not finish in {timeout} s: {feeder.console()!r}")
        due = feeder.feed_due(hold=hold)
        if stop is not None and stop(feeder, due, elapsed):
            machine.pause()
            # The guest may have finished while it was being paused.
            return machine.state is MachineState.PAUSED
        if machine.wait(POLL_SECONDS) is not None:
            return False


@dataclass(frozen=True)
class DriverReport:
    """What one process of a run did (tests/multiboot/snapshot_driver.py), as JSON."""

    paused: bool  # False: the run ended
    status: int | None  # the outcome's exit status, None while paused
    reason: str | None
    console: str  # this process's COM1 output, as latin-1
    fed: list[str]  # every input given so far, in this process or before
    given_while_paused: list[str]  # of those, the ones given after the pause
    counters: dict[str, int]  # the guest's counters after the pause or the end
    setup_seconds: float  # building or restoring the machine
    snapshot_seconds: float | None
    started_at: float  # time.time() at start() and at the end
    ended_at: float


def guest_symbols(elf: Path, names: Sequence[str]) -> dict[str, int]:
    """Addresses of ``names`` in the linked kernel (nm from binutils, as the build)."""
    result = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True)
    found = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in names:
            found[parts[2]] = int(parts[0], 16)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{elf}: no symbols {missing}")
    return found


def read_counters(machine: Machine, symbols: dict[str, int]) -> dict[str, int]:
    """The guest's counters (little-endian dwords) at the symbols' addresses."""
    return {
        name: int.from_bytes(machine.read_memory(address, 4), "little")
        for name, address in symbols.items()
    }
