"""kvmfast.bench and kvmfast.bench_emulation measure what they say: every write of an
exit path exits, a doorbell write does not and is timed until the event loop has
handled it, and each ratio is ours over the floor run just before it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest
from emulation_support import emulated_cpl0

from kvmfast import Kvm, bench_emulation
from kvmfast.bench import doorbell_path, find_floor_source, run_benchmark
from kvmfast.bench_emulation import PATHS, Repeat, paired_completions


def _floor_source() -> Path:
    try:
        return find_floor_source(None)
    except FileNotFoundError as missing:
        pytest.skip(f"no floor benchmark source: {missing}")


@pytest.mark.kvm
def test_a_short_run_reports_every_path_with_the_exits_it_measured(kvm: Kvm) -> None:
    writes = 300
    report = run_benchmark(writes, rounds=30, repeat=2, floor_source=_floor_source())
    entries = cast(list[dict[str, Any]], report["paths"])
    paths = {path["path"]: path for path in entries}
    assert set(paths) == {
        "pio-exit-rust-sink",
        "pio-exit-python-handler",
        "mmio-exit-python-handler",
        "mmio-ioeventfd0-event-loop",
        "doorbell-irqfd-round-trip",
    }
    # One exit per write plus the write that ends the run...
    for name in ("pio-exit-rust-sink", "pio-exit-python-handler", "mmio-exit-python-handler"):
        assert paths[name]["guest_exits"] == writes + 1
        assert paths[name]["drain_ns"] == 0
    # ...and none for a doorbell: the ioeventfd takes it inside KVM.
    assert paths["mmio-ioeventfd0-event-loop"]["guest_exits"] == 1
    for path in paths.values():
        low, high = path["ratio_range"]
        assert 0 < low <= path["ratio"] <= high
        ratios = path["ratios"]
        assert len(ratios) == 2 and (min(ratios), max(ratios)) == (low, high)
        assert path["floor_ns_per_write"] > 0


@pytest.mark.kvm
def test_the_doorbell_figure_runs_until_the_last_ring_is_handled(kvm: Kvm) -> None:
    """A device that is still busy when the vCPU stops: its rings are part of the cost."""
    writes, busy = 300, 0.05

    def slow_device(count: int) -> None:
        time.sleep(busy)

    sample = doorbell_path(kvm, writes, "none", device=slow_device)
    assert sample.ns_per_write * writes >= busy * 1e9
    assert sample.drain_ns > 0


def _repeat(floor: float, **ns: float) -> Repeat:
    per_path = dict.fromkeys(PATHS, floor * 2)
    per_path.update(ns)
    return Repeat(floor, per_path, {path: 1 for path in PATHS})


def test_emulation_ratios_pair_each_repeat_with_its_own_floor() -> None:
    # The fastest CLAC (repeat 2) and the fastest floor (repeat 1) are from different
    # moments: paired, CLAC is 1.0x then 1.5x then 1.2x of its own floor.
    repeats = [
        _repeat(10_000.0, loop=100.0, pio=10_100.0, clac=10_100.0),
        _repeat(20_000.0, loop=100.0, pio=20_100.0, clac=30_100.0),
        _repeat(15_000.0, loop=100.0, pio=15_100.0, clac=18_100.0),
    ]
    clac = {c.path: c for c in paired_completions(repeats)}["clac"]
    assert clac.ratio_to_floor_pio == 1.2
    assert clac.ratio_range == (1.0, 1.5)
    assert clac.ratios == (1.0, 1.5, 1.2)
    assert clac.ns_per_completion == 18_000.0
    assert clac.ratio_to_kvmfast_pio == 1.2


def test_emulation_benchmark_without_a_floor_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "kvm_floor.c"
    assert bench_emulation.main(["--floor-src", str(missing), "--iterations", "10"]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.kvm
@emulated_cpl0
def test_a_short_emulation_run_pairs_every_completion(kvm: Kvm) -> None:
    iterations = 200
    report = bench_emulation.run_benchmark(iterations, repeat=2, floor_source=_floor_source())
    entries = cast(list[dict[str, Any]], report["completions"])
    assert {entry["path"] for entry in entries} == {
        path for path, (_, counted, _) in PATHS.items() if counted
    }
    for entry in entries:
        low, high = entry["ratio_range"]
        assert 0 < low <= entry["ratio_to_floor_pio"] <= high
        assert entry["completions"] == iterations * entry["instructions_per_exit"]
