"""A run's counters and milestones as data: what ``kvm-vmm --stats`` prints.

kvmfast counts exits by reason and accesses by base address; here the bases
get the names the platform gave its devices, and the console's milestones are
added, so that one dict describes the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kvm_vmm.milestones import Milestone


def run_statistics(
    counters: Mapping[str, object],
    device_names: Mapping[tuple[str, int], str],
    outcome: str | None,
    seconds: float,
    milestones: Iterable[Milestone],
) -> dict[str, object]:
    """Exits by reason and by device (``device_names`` maps (space, base) to a name;
    every named device is listed, 0 when the guest never reached it, and an unnamed
    range is "pio 0x..."), the other kvmfast counters as they are, the milestones in
    seconds since the start."""
    rest = dict(counters)
    by_device = dict.fromkeys(device_names.values(), 0)
    for space in ("pio", "mmio"):
        per_base = rest.pop(space, {})
        assert isinstance(per_base, dict)
        for base, count in per_base.items():
            name = device_names.get((space, base), f"{space} {base:#x}")
            by_device[name] = by_device.get(name, 0) + count
    return {
        "seconds": round(seconds, 3),
        "outcome": outcome,
        "exits": rest.pop("exits", {}),
        "exits_by_device": dict(sorted(by_device.items(), key=lambda item: -item[1])),
        **rest,
        "milestones": [{"name": m.name, "seconds": m.seconds} for m in milestones],
    }
