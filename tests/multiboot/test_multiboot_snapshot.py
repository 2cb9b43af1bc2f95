"""Snapshot and restore of a whole machine (issue 17's first test), with a guest whose
output depends on everything a snapshot must carry and on nothing else.

tests/guests/multiboot/snapshot_guest.S counts PIT ticks through our IOAPIC and LAPIC
TSC-deadline ticks, folding each into checksums it holds only in YMM registers (XMM
with SSE2 only), then takes a COM1 line and a key, each given only after its prompt,
and prints a summary; snapshot_model.py computes that summary on the host. Each
snapshot is taken in one process (tests/multiboot/snapshot_driver.py, run with this
interpreter) and restored in another, new one: mid tick counting, with input pending
in a device and its interrupt in the LAPIC, at a prompt whose input only the restoring
process gives, twenty times in a row, and twice at once from one memory file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from guests.multiboot import KernelBuilder
from guests.multiboot.snapshot_model import FIRST_PIT_TICKS, LAPIC_TICKS, SECOND_PIT_TICKS
from guests.multiboot.snapshot_model import summary_line as model_summary
from guests.multiboot.snapshot_session import (
    DEVICES,
    KEY_SET1,
    MEMORY_SIZE,
    SERIAL_LINE,
    DriverReport,
    Feeder,
    guest_symbols,
    read_counters,
    run_until,
)

from kvm_vmm.boot import MultibootBoot
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.snapshot import STATE_FILE
from kvm_vmm.snapshot.memory_file import MEMORY_FILE
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

DRIVER = Path(__file__).with_name("snapshot_driver.py")
TESTS_DIR = Path(__file__).resolve().parents[1]
GUEST = "snapshot_guest"
SSE2_ONLY = "sse2-only"
RUN_TIMEOUT_SECONDS = 60
PROCESS_TIMEOUT_SECONDS = 120
CYCLES = 20
TOTAL_PIT_TICKS = FIRST_PIT_TICKS + SECOND_PIT_TICKS
PASSED = 1  # main returned 0: isa-debug-exit status (0 << 1) | 1


def host_has_avx2() -> bool:
    """The guest sees this CPU's CPUID here (docs: HOST-KVM.md), so it uses AVX2 where
    the host has it, with XSAVE and AVX."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "avx", "xsave"} <= flags
    return False


def expected_summary(cmdline: str) -> str:
    return model_summary(host_has_avx2() and cmdline != SSE2_ONLY, SERIAL_LINE, KEY_SET1)


def summary_of(console: str) -> str:
    lines = [line for line in console.splitlines() if line.startswith("summary:")]
    assert len(lines) == 1, console
    return lines[0]


@dataclass(frozen=True)
class Guest:
    kernel: Path
    elf: Path

    @classmethod
    def build(cls, kernels: KernelBuilder) -> Guest:
        kernel = kernels.build(GUEST)
        return cls(kernel, kernel.with_suffix(".elf"))


@pytest.fixture(scope="module")
def guest(kernels: KernelBuilder) -> Guest:
    return Guest.build(kernels)


def run_in_process(
    guest: Guest, cmdline: str = "", pause_at: Sequence[int] = ()
) -> tuple[str, list[dict[str, int]]]:
    """One uninterrupted run here (paused and resumed in place once the PIT count
    reaches each of ``pause_at``): its console, and the counters at each pause."""
    require_kvm()
    symbols = guest_symbols(guest.elf, ["pit_ticks", "lapic_ticks"])
    seen = []
    with Machine(MachineConfig(memory_size=MEMORY_SIZE)) as machine:
        for spec in DEVICES:
            machine.add_device_option(spec)
        machine.boot(MultibootBoot(guest.kernel, cmdline))
        machine.start()
        feeder = Feeder(machine)
        for ticks in pause_at:

            def reached(feeder: Feeder, due: list[str], elapsed: float, ticks: int = ticks) -> bool:
                return read_counters(feeder.machine, symbols)["pit_ticks"] >= ticks

            assert run_until(feeder, reached, RUN_TIMEOUT_SECONDS)
            seen.append(read_counters(machine, symbols))
            machine.resume()
        assert not run_until(feeder, None, RUN_TIMEOUT_SECONDS)
        outcome = machine.wait()
        console = machine.serial.transcript().decode("latin-1")
    assert outcome is not None and outcome.status == PASSED, (outcome, console)
    return console, seen


@pytest.fixture(scope="module")
def reference(guest: Guest) -> Callable[[str], str]:
    """The console of an uninterrupted run (output A), per command line, run once."""
    return functools.cache(lambda cmdline: run_in_process(guest, cmdline)[0])


@dataclass
class Session:
    """One guest run carried from process to process: the console so far and the
    inputs given so far go to each next driver."""

    guest: Guest
    work: Path
    cmdline: str = ""
    history: str = ""
    fed: list[str] = field(default_factory=list)
    reports: list[DriverReport] = field(default_factory=list)

    def arguments(
        self, source: Sequence[str], stop: Sequence[str], snapshot: Path | None
    ) -> list[str]:
        index = len(self.reports)
        history = self.work / f"history-{index}.txt"
        history.write_bytes(self.history.encode("latin-1"))
        arguments = [*source, "--elf", str(self.guest.elf), "--cmdline", self.cmdline]
        arguments += ["--history", str(history), "--fed", ",".join(self.fed), *stop]
        arguments += ["--report", str(self.work / f"report-{index}.json")]
        if snapshot is not None:
            arguments += ["--snapshot", str(snapshot)]
        return arguments

    def step(
        self, source: Sequence[str], stop: Sequence[str] = (), snapshot: Path | None = None
    ) -> DriverReport:
        """Run the driver in a new process; it pauses and snapshots, or runs to the end."""
        arguments = self.arguments(source, stop, snapshot)
        wait_for(start_driver(arguments))
        return self.absorb(arguments)

    def absorb(self, arguments: list[str]) -> DriverReport:
        """Take in the report of the driver run with ``arguments``."""
        path = Path(arguments[arguments.index("--report") + 1])
        report = DriverReport(**json.loads(path.read_text()))
        self.reports.append(report)
        self.history += report.console
        self.fed = list(report.fed)
        return report

    def boot(self, stop: Sequence[str], snapshot: Path) -> DriverReport:
        return self.step(["--kernel", str(self.guest.kernel)], stop, snapshot)

    def restore(
        self, directory: Path, stop: Sequence[str] = (), snapshot: Path | None = None
    ) -> DriverReport:
        return self.step(["--restore", str(directory)], stop, snapshot)


def start_driver(arguments: list[str]) -> subprocess.Popen[str]:
    require_kvm()
    path = os.environ.get("PYTHONPATH")
    environment = {
        **os.environ,
        "PYTHONPATH": str(TESTS_DIR) if not path else f"{TESTS_DIR}{os.pathsep}{path}",
    }
    return subprocess.Popen(
        [sys.executable, str(DRIVER), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=environment,
    )


def wait_for(process: subprocess.Popen[str]) -> None:
    output, _ = process.communicate(timeout=PROCESS_TIMEOUT_SECONDS)
    assert process.returncode == 0, output


def assert_finished_as(session: Session, expected: str) -> None:
    last = session.reports[-1]
    assert not last.paused and last.status == PASSED, last
    assert session.history == expected


# ------------------------------------------------------------------ uninterrupted


@pytest.mark.parametrize("cmdline", ["", SSE2_ONLY], ids=["best-vector-state", "sse2-only"])
def test_an_uninterrupted_run_prints_the_checksums_the_host_model_computes(
    reference: Callable[[str], str], cmdline: str
) -> None:
    console = reference(cmdline)
    assert summary_of(console) == expected_summary(cmdline), console
    assert console.endswith("PASS\n"), console


def test_pauses_and_resumes_in_one_process_change_nothing(
    guest: Guest, reference: Callable[[str], str]
) -> None:
    """Ten pauses across both counting phases, each resumed at once: the same output."""
    marks = range(20, TOTAL_PIT_TICKS, 48)
    console, seen = run_in_process(guest, pause_at=marks)
    assert console == reference("")
    assert all(c["pit_ticks"] >= mark for c, mark in zip(seen, marks, strict=True)), seen
    assert any(0 < counters["lapic_ticks"] < LAPIC_TICKS for counters in seen), seen


# ------------------------------------------------------------- restore elsewhere


SCENARIOS = {
    # Both timers running, the LAPIC's TSC deadline armed, the PIT a third of the way.
    "mid-count": ["--stop", "ticks", "--ticks", str(FIRST_PIT_TICKS // 3)],
    # The COM1 line in the UART (FIFO and host backlog), its interrupt in the LAPIC's
    # IRR, not yet taken.
    "serial-pending": ["--stop", "input", "--at", "serial"],
    # The key in the 8042's output buffer and queue, IRQ1 pending, not yet taken.
    "key-pending": ["--stop", "input", "--at", "key"],
    # The guest halted at its prompt; only the restoring process types the key.
    "at-key-prompt": ["--stop", "prompt", "--at", "key"],
}


@pytest.mark.parametrize(
    ("scenario", "cmdline"),
    [(scenario, "") for scenario in SCENARIOS] + [("mid-count", SSE2_ONLY)],
    ids=[*SCENARIOS, "mid-count-sse2-only"],
)
def test_a_snapshot_restored_in_a_new_process_ends_as_an_uninterrupted_run(
    guest: Guest,
    reference: Callable[[str], str],
    tmp_path: Path,
    scenario: str,
    cmdline: str,
) -> None:
    session = Session(guest, tmp_path, cmdline)
    snapshot = tmp_path / "snapshot"
    paused = session.boot(SCENARIOS[scenario], snapshot)
    assert paused.paused, paused
    counters = paused.counters
    if scenario == "mid-count":
        assert FIRST_PIT_TICKS // 3 <= counters["pit_ticks"] < FIRST_PIT_TICKS, counters
        assert 0 < counters["lapic_ticks"] < LAPIC_TICKS, counters
    elif scenario == "serial-pending":
        assert paused.given_while_paused == ["serial"]
        assert counters["serial_length"] == 0, counters
        # The line fills the UART's FIFO; the rest waits in its host backlog.
        uart = json.loads((snapshot / STATE_FILE).read_text())["platform"]["com1"]
        assert bytes(uart["rx_fifo"]) + bytes.fromhex(uart["host_backlog"]) == SERIAL_LINE
        assert uart["host_backlog"], uart
    elif scenario == "key-pending":
        assert paused.given_while_paused == ["key"]
        assert counters["key_length"] == 0, counters
    else:
        assert "key" not in session.fed and session.history.endswith("key> ")
    session.restore(snapshot)
    assert_finished_as(session, reference(cmdline))
    assert session.fed == ["serial", "key"]


def test_twenty_snapshot_restore_cycles_in_a_row_end_as_an_uninterrupted_run(
    guest: Guest, reference: Callable[[str], str], tmp_path: Path
) -> None:
    """Each cycle is a new process restoring the last snapshot, running until the PIT
    count reaches its next mark (or a prompt: then its input is given while paused)
    and snapshotting into the same directory, replacing the snapshot whose memory file
    it still maps. The marks spread the twenty snapshots over both counting phases;
    restores alternate between mapping the memory file and reading it in."""
    session = Session(guest, tmp_path)
    directory = tmp_path / "snapshot"
    marks = [TOTAL_PIT_TICKS * (cycle + 1) // (CYCLES + 1) for cycle in range(CYCLES)]
    for cycle, mark in enumerate(marks):
        stop = ["--stop", "ticks", "--ticks", str(mark)]
        if cycle == 0:
            report = session.boot(stop, directory)
        else:
            copy = ["--copy"] if cycle % 2 else []
            report = session.restore(directory, [*stop, *copy], directory)
        assert report.paused, (cycle, report)
    session.restore(directory)
    assert_finished_as(session, reference(""))
    ticks = [report.counters["pit_ticks"] for report in session.reports[:CYCLES]]
    assert any(0 < tick < FIRST_PIT_TICKS for tick in ticks), ticks
    assert any(FIRST_PIT_TICKS < tick < TOTAL_PIT_TICKS for tick in ticks), ticks
    given = [report.given_while_paused for report in session.reports[:CYCLES]]
    assert ["serial"] in given and ["key"] in given, given


def test_one_snapshot_restored_twice_at_once_runs_two_independent_guests(
    guest: Guest, reference: Callable[[str], str], tmp_path: Path
) -> None:
    """Both processes map the same memory file copy-on-write: each guest's tick
    counters and stack live in that RAM, so a guest seeing the other's writes would
    count wrong. Both end as the uninterrupted run, and the file is unchanged."""
    first = Session(guest, tmp_path / "first")
    first.work.mkdir()
    snapshot = tmp_path / "snapshot"
    first.boot(SCENARIOS["mid-count"], snapshot)
    memory = snapshot / MEMORY_FILE
    digest = hashlib.sha256(memory.read_bytes()).hexdigest()
    second = Session(guest, tmp_path / "second", history=first.history, fed=list(first.fed))
    second.work.mkdir()
    runs = [
        (session, session.arguments(["--restore", str(snapshot)], (), None))
        for session in (first, second)
    ]
    processes = [start_driver(arguments) for _, arguments in runs]
    for process in processes:
        wait_for(process)
    reports = [session.absorb(arguments) for session, arguments in runs]
    for session in (first, second):
        assert_finished_as(session, reference(""))
    # They ran at the same time: each started before the other ended.
    first_run, second_run = reports
    assert first_run.started_at < second_run.ended_at, reports
    assert second_run.started_at < first_run.ended_at, reports
    assert hashlib.sha256(memory.read_bytes()).hexdigest() == digest
