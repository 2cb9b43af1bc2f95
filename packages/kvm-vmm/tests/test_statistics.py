"""machine.stats(): the run's counters and milestones as data (what --stats prints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvm_vmm import layout
from kvm_vmm.boot import DemoBoot
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.milestones import FIRST_CONSOLE_BYTE, POWER_OFF, Milestone
from kvm_vmm.statistics import run_statistics
from kvmfast.testing import require_kvm


def test_accesses_are_counted_by_device_name_and_the_rest_passed_through() -> None:
    counters = {
        "exits": {"io": 5, "hlt": 1},
        "pio": {0x3F8: 3, 0x40: 1, 0x80: 1},
        "mmio": {0xFEC00000: 2},
        "completions": {"clac": 4},
    }
    names = {
        ("pio", 0x3F8): "com1",
        ("pio", 0x40): "pit",
        ("mmio", 0xFEC00000): "ioapic",
        ("pio", 0x70): "rtc",
    }
    stats = run_statistics(counters, names, "guest powered off", 1.23456, [Milestone("m", 0.5)])
    assert stats == {
        "seconds": 1.235,
        "outcome": "guest powered off",
        "exits": {"io": 5, "hlt": 1},
        "exits_by_device": {"com1": 3, "ioapic": 2, "pit": 1, "pio 0x80": 1, "rtc": 0},
        "completions": {"clac": 4},
        "milestones": [{"name": "m", "seconds": 0.5}],
    }


@pytest.mark.kvm
def test_the_tiny_demos_stats_name_its_devices_and_time_its_milestones(tmp_path: Path) -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=64 * layout.MIB)) as machine:
        machine.boot(DemoBoot(), cache_dir=tmp_path)
        machine.start()
        running = machine.stats()
        assert running["outcome"] is None
        outcome = machine.wait(60)
        stats = machine.stats()
    assert outcome is not None and stats["outcome"] == outcome.reason == "guest powered off"
    by_device = stats["exits_by_device"]
    exits = stats["exits"]
    assert isinstance(by_device, dict) and isinstance(exits, dict)
    # By device, not by window: the ACPI PM block's three windows are one "acpi-pm".
    assert by_device["com1"] > 0 and by_device["acpi-pm"] >= 1
    assert set(by_device) == set(machine.devices)  # each named, the untouched with 0
    assert sum(by_device.values()) == exits["io"] + exits.get("mmio", 0)
    milestones = stats["milestones"]
    assert isinstance(milestones, list)
    assert [m["name"] for m in milestones] == [FIRST_CONSOLE_BYTE, POWER_OFF]
    seconds = stats["seconds"]
    assert isinstance(seconds, float) and 0 < milestones[-1]["seconds"] <= seconds + 0.001
