"""kvmfast.bench measures what it says: every write of an exit path exits, a doorbell
write does not, and each ratio is ours over the floor run just before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from kvmfast import Kvm
from kvmfast.bench import find_floor_source, run_benchmark

pytestmark = pytest.mark.kvm


def _floor_source() -> Path:
    try:
        return find_floor_source(None)
    except FileNotFoundError as missing:
        pytest.skip(f"no floor benchmark source: {missing}")


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
    # ...and none for a doorbell: the ioeventfd takes it inside KVM.
    assert paths["mmio-ioeventfd0-event-loop"]["guest_exits"] == 1
    for path in paths.values():
        low, high = path["ratio_range"]
        assert 0 < low <= path["ratio"] <= high
        assert path["floor_ns_per_write"] > 0
