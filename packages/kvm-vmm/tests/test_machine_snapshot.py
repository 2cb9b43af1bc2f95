"""Machine.snapshot() and Machine.restore() on small machines: the state round trip, the
memory file's sparseness and copy-on-write mapping, and each refusal at restore naming
what is wrong (issue 17). Whole guests continuing across a snapshot are in
tests/multiboot/test_multiboot_snapshot.py and tests/boot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvm_devices.debug_exit import DebugExit
from kvm_vmm import layout
from kvm_vmm.boot import DemoBoot
from kvm_vmm.machine import Machine, MachineConfig, MachineStateError
from kvm_vmm.machine_state import NotSnapshottable
from kvm_vmm.snapshot.errors import SnapshotError
from kvm_vmm.snapshot.memory_file import MEMORY_FILE
from kvm_vmm.snapshot.state_file import STATE_FILE
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

MEMORY = 16 * layout.MIB
MARK = 0x200000  # a page of RAM the tests write


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(64 * 512))
    return path


def machine_with_devices(image: Path, *, readonly: bool = False) -> Machine:
    require_kvm()
    machine = Machine(MachineConfig(memory_size=MEMORY))
    machine.add_disk(image, serial="SNAP", readonly=readonly)
    machine.add_rng()
    machine.add_device_option("isa-debug-exit,iobase=0xf4,iosize=0x4")
    machine.write_memory(MARK, b"before the snapshot")
    machine.vcpus[0].set_regs({"rax": 0x1234_5678, "rip": 0xFFF0})
    return machine


def untimed(state: object) -> object:
    """``state`` without the fields that are points on a device clock (the PIT's ticks,
    the PM timer's phase): a restore moves them onto its own clock, by design."""
    if isinstance(state, dict):
        return {
            key: untimed(value)
            for key, value in state.items()
            if not key.endswith(("_tick", "_ticks", "_phase"))
        }
    if isinstance(state, list):
        return [untimed(item) for item in state]
    return state


def edit(snapshot: Path, change: object) -> None:
    path = snapshot / STATE_FILE
    state = json.loads(path.read_text())
    change(state)  # type: ignore[operator]
    path.write_text(json.dumps(state))


def test_a_restored_machine_has_the_state_memory_and_devices_it_was_saved_with(
    tmp_path: Path, image: Path
) -> None:
    snapshot = tmp_path / "snap"
    with machine_with_devices(image) as original:
        original.snapshot(snapshot)
        saved = original.save_state()
        regs = original.vcpus[0].get_regs()
        sregs = original.vcpus[0].get_sregs()
        lapic = original.vcpus[0].get_lapic()
    with Machine.restore(snapshot) as restored:
        assert untimed(restored.save_state()) == untimed(saved)
        assert restored.vcpus[0].get_regs() == regs
        assert restored.vcpus[0].get_sregs() == sregs
        assert restored.vcpus[0].get_lapic() == lapic
        assert restored.read_memory(MARK, 19) == b"before the snapshot"
        assert restored.config.memory_size == MEMORY
        assert set(restored.devices) >= {"virtio-blk", "virtio-rng", "isa-debug-exit"}
        assert isinstance(restored.devices["isa-debug-exit"], DebugExit)


def test_the_memory_file_is_sparse_and_the_state_file_self_describing(
    tmp_path: Path, image: Path
) -> None:
    snapshot = tmp_path / "snap"
    with machine_with_devices(image) as machine:
        machine.snapshot(snapshot)
    memory = snapshot / MEMORY_FILE
    assert memory.stat().st_size == MEMORY
    assert memory.stat().st_blocks * 512 < MEMORY // 4  # zero pages are holes
    state = json.loads((snapshot / STATE_FILE).read_text())
    assert state["schema"] == "kvm-vmm-snapshot" and state["version"] == 1
    assert state["config"]["memory_size"] == MEMORY
    assert [device["kind"] for device in state["devices"]] == [
        "virtio-blk",
        "virtio-rng",
        "device-option",
    ]
    assert state["devices"][0]["identity"]["size"] == image.stat().st_size
    assert state["host"]["tsc_khz"] > 0


def test_two_restores_of_one_snapshot_do_not_see_each_other(tmp_path: Path, image: Path) -> None:
    snapshot = tmp_path / "snap"
    # Read-only: two VMMs may share an image only for reading (its lock is shared).
    with machine_with_devices(image, readonly=True) as machine:
        machine.snapshot(snapshot)
    before = (snapshot / MEMORY_FILE).read_bytes()
    with Machine.restore(snapshot) as first, Machine.restore(snapshot, copy=True) as second:
        first.write_memory(MARK, b"first")
        second.write_memory(MARK, b"other")
        assert first.read_memory(MARK, 5) == b"first"
        assert second.read_memory(MARK, 5) == b"other"
    assert (snapshot / MEMORY_FILE).read_bytes() == before  # copy-on-write: never written


def test_snapshot_is_refused_while_running_and_for_devices_it_cannot_rebuild(
    tmp_path: Path,
) -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=MEMORY)) as machine:
        machine.add_device(DebugExit(lambda status: None), name="mine", pio=(0x500, 1))
        with pytest.raises(NotSnapshottable, match="'mine' cannot be rebuilt"):
            machine.snapshot(tmp_path / "snap")
    with Machine(MachineConfig(memory_size=MEMORY)) as machine:
        machine.boot(DemoBoot())
        machine.start()
        with pytest.raises(MachineStateError, match=r"snapshot\(\) on a machine that is not"):
            machine.snapshot(tmp_path / "snap")
    assert not (tmp_path / "snap").exists()


def test_a_changed_disk_image_is_refused_unless_forced(tmp_path: Path, image: Path) -> None:
    snapshot = tmp_path / "snap"
    with machine_with_devices(image) as machine:
        machine.snapshot(snapshot)
    with image.open("r+b") as file:
        file.write(b"changed")
    with pytest.raises(SnapshotError, match="changed since the snapshot") as refused:
        Machine.restore(snapshot)
    assert refused.value.status == 2
    with Machine.restore(snapshot, force=True) as machine:
        assert machine.read_memory(MARK, 6) == b"before"


def claim_every_leaf7_feature(state: dict[str, Any]) -> None:
    """The guest's CPUID as a future CPU's: every feature bit of leaf 7 EDX set."""
    for entry in state["vcpus"][0]["cpuid"]:
        if entry[:2] == [0x7, 0]:
            entry[6] = 0xFFFF_FFFF


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s["vcpus"][0]["regs"].pop("rax"), r"vcpus\[0\]\.regs: fields missing"),
        (lambda s: s["vcpus"][0].update(lapic="00"), r"vcpus\[0\]\.lapic: 1 bytes"),
        (lambda s: s["vcpus"].append(s["vcpus"][0]), "not a list of 1 vCPUs"),
        (lambda s: s["platform"]["pit"].clear(), "PIT state: <top>: missing field"),
        (lambda s: s["platform"].pop("rtc"), "no state for device.s. rtc"),
        (lambda s: s["platform"]["virtio-blk"]["queues"].pop(), "virtio-blk"),
        (lambda s: s["host"].update(cpu_vendor="CyrixInstead"), "CyrixInstead"),
        (lambda s: s["clock"].update(clock=-1), "clock.clock"),
        (claim_every_leaf7_feature, r"CPU features this host lacks: .*leaf 0x7\.0 edx bit"),
        (lambda s: s["devices"].pop(0), r"state for unknown device.s. virtio-blk"),
    ],
)
def test_a_damaged_state_is_refused_by_name_with_nothing_changed(
    tmp_path: Path, image: Path, change: object, problem: str
) -> None:
    snapshot = tmp_path / "snap"
    with machine_with_devices(image) as machine:
        machine.snapshot(snapshot)
    edit(snapshot, change)
    files = {name: (snapshot / name).read_bytes() for name in os.listdir(snapshot)}
    with pytest.raises(SnapshotError, match=problem):
        Machine.restore(snapshot)
    assert {name: (snapshot / name).read_bytes() for name in os.listdir(snapshot)} == files
    # The image's lock went with the refused machine: it can be opened again.
    with Machine(MachineConfig(memory_size=MEMORY)) as again:
        again.add_disk(image)


def test_the_guest_functions_names_come_back_with_the_snapshot(tmp_path: Path) -> None:
    require_kvm()
    snapshot = tmp_path / "snap"
    with Machine(MachineConfig(memory_size=MEMORY)) as machine:
        machine.load_symbol_map("ffffffff81000000 T start_kernel\nffffffff81000100 T rest_init\n")
        machine.snapshot(snapshot)
    assert (snapshot / "symbols.map").is_file()
    with Machine.restore(snapshot) as restored:
        where = restored.vm.describe_address(0xFFFF_FFFF_8100_0010)
        assert where is not None and where.startswith("start_kernel")
