"""The snapshot directory's format: every malformed part refused by name, and the
atomic write that leaves the old snapshot or the new one, never a mixture."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from kvm_vmm.snapshot.disks import disk_identity, identity_problem, rebuild_records
from kvm_vmm.snapshot.errors import SnapshotError
from kvm_vmm.snapshot.host_facts import host_problem, missing_features
from kvm_vmm.snapshot.memory_file import MEMORY_FILE
from kvm_vmm.snapshot.shape import ShapeError, check_like, hex_bytes, int_pairs
from kvm_vmm.snapshot.state_file import (
    SCHEMA_VERSION,
    STATE_FILE,
    read_snapshot,
    snapshot_directory,
    write_state,
)

RAM = 4 << 20


def state(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "kvm_vmm": "0.1.0",
        "created": "2026-12-07T00:00:00+00:00",
        "host": {"cpu_vendor": "AuthenticAMD", "tsc_khz": 2_000_000},
        "config": {"memory_size": RAM, "cpus": 1, "emulation_fallback": True},
        "boot": None,
        "memory": {
            "file": MEMORY_FILE,
            "size": RAM,
            "slots": [{"guest_phys_addr": 0, "size": RAM, "file_offset": 0}],
        },
        "devices": [],
        "clock": {"clock": 1, "flags": 0},
        "vcpus": [],
        "platform": {},
    }
    base.update(changes)
    return base


def make_snapshot(directory: Path, memory_size: int = RAM, **changes: object) -> Path:
    directory.mkdir()
    write_state(directory, state(**changes))
    with (directory / MEMORY_FILE).open("wb") as memory:
        memory.truncate(memory_size)
    return directory


def edit_state(directory: Path, edit: dict[str, object]) -> None:
    path = directory / STATE_FILE
    data = json.loads(path.read_text())
    data.update(edit)
    path.write_text(json.dumps(data))


def test_a_complete_snapshot_reads_back_with_its_shape_and_slots(tmp_path: Path) -> None:
    snapshot = read_snapshot(make_snapshot(tmp_path / "s"))
    assert (snapshot.shape.memory_size, snapshot.shape.cpus) == (RAM, 1)
    assert snapshot.slots[0].size == RAM and snapshot.memory_path.name == MEMORY_FILE


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"schema": "something-else"}, "is not a kvm-vmm snapshot's"),
        ({"version": SCHEMA_VERSION + 1}, "is newer than this kvm-vmm's"),
        ({"version": 0}, "is not one this kvm-vmm reads"),
        ({"version": "1"}, "is not a number"),
        ({"extra": 1}, "unknown ['extra']"),
        ({"config": {"memory_size": RAM, "cpus": 0, "emulation_fallback": True}}, "config"),
        ({"config": [1]}, "config is not a mapping"),
        ({"memory": {"file": "other.bin", "size": RAM, "slots": []}}, "memory is not"),
        ({"memory": {"file": MEMORY_FILE, "size": RAM * 2, "slots": []}}, "is not the config's"),
        (
            {"memory": {"file": MEMORY_FILE, "size": RAM, "slots": [{"guest_phys_addr": 0}]}},
            "memory.slots[0] is not a RAM slot",
        ),
        (
            {
                "memory": {
                    "file": MEMORY_FILE,
                    "size": RAM,
                    "slots": [{"guest_phys_addr": 0, "size": RAM // 2, "file_offset": 0}],
                }
            },
            "cover 2097152 bytes",
        ),
    ],
)
def test_a_malformed_state_file_is_refused_by_name(
    tmp_path: Path, edit: dict[str, object], problem: str
) -> None:
    directory = make_snapshot(tmp_path / "s")
    edit_state(directory, edit)
    with pytest.raises(SnapshotError) as refused:
        read_snapshot(directory)
    assert problem in str(refused.value) and refused.value.status == 2


def test_a_field_left_out_is_named(tmp_path: Path) -> None:
    directory = make_snapshot(tmp_path / "s")
    data = json.loads((directory / STATE_FILE).read_text())
    del data["clock"]
    (directory / STATE_FILE).write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match=r"fields missing \['clock'\]"):
        read_snapshot(directory)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is not JSON"),
        (b'{"schema": ', "is not JSON"),
        (b"\xff\xfe garbage", "is not JSON"),
        (b"[1, 2]", "is not a kvm-vmm snapshot's"),
    ],
)
def test_a_corrupt_or_foreign_state_file_is_refused(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    directory = make_snapshot(tmp_path / "s")
    (directory / STATE_FILE).write_bytes(content)
    with pytest.raises(SnapshotError, match=problem):
        read_snapshot(directory)


def test_no_directory_or_no_state_file_is_not_a_snapshot(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no such snapshot directory"):
        read_snapshot(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match=r"no state\.json: not a snapshot"):
        read_snapshot(tmp_path / "empty")


@pytest.mark.parametrize(
    ("size", "problem"),
    [
        (RAM - 4096, "is truncated: 4190208 bytes of 4194304"),
        (RAM + 4096, "is 4198400 bytes, not the 4194304 of its RAM"),
    ],
)
def test_a_memory_file_of_the_wrong_size_is_refused(
    tmp_path: Path, size: int, problem: str
) -> None:
    directory = make_snapshot(tmp_path / "s", memory_size=size)
    with pytest.raises(SnapshotError, match=problem):
        read_snapshot(directory)


def test_a_missing_memory_file_is_refused(tmp_path: Path) -> None:
    directory = make_snapshot(tmp_path / "s")
    (directory / MEMORY_FILE).unlink()
    with pytest.raises(SnapshotError, match=r"memory file memory\.bin is missing"):
        read_snapshot(directory)


def test_a_snapshot_is_renamed_into_place_only_when_complete(tmp_path: Path) -> None:
    destination = tmp_path / "snap"
    with snapshot_directory(destination) as directory:
        (directory / "part").write_text("new")
        assert not destination.exists()
    assert (destination / "part").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["snap"]  # no temporary left beside it


def test_a_failed_write_leaves_the_old_snapshot_and_no_temporary(tmp_path: Path) -> None:
    destination = make_snapshot(tmp_path / "snap")
    before = (destination / STATE_FILE).read_bytes()
    with pytest.raises(RuntimeError), snapshot_directory(destination) as directory:
        (directory / "part").write_text("half")
        raise RuntimeError("disk full")
    assert (destination / STATE_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["snap"]


def test_an_existing_snapshot_is_replaced_whole(tmp_path: Path) -> None:
    destination = make_snapshot(tmp_path / "snap")
    with snapshot_directory(destination) as directory:
        (directory / "part").write_text("new")
    assert os.listdir(destination) == ["part"]
    assert sorted(os.listdir(tmp_path)) == ["snap"]


def test_a_directory_that_is_not_a_snapshot_is_never_replaced(tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    with (
        pytest.raises(SnapshotError, match="exists and is not a snapshot"),
        snapshot_directory(mine),
    ):
        pass
    assert (mine / "cat.jpg").read_bytes() == b"meow"
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with (
        pytest.raises(SnapshotError, match="exists and is not a snapshot"),
        snapshot_directory(file),
    ):
        pass
    assert file.read_text() == "mine"


def _write_then_die(destination: str) -> None:
    with snapshot_directory(Path(destination)) as directory:
        (directory / STATE_FILE).write_text("half")
        os._exit(9)  # killed mid-write: no cleanup runs


def test_a_kill_during_a_snapshot_leaves_the_old_one(tmp_path: Path) -> None:
    destination = make_snapshot(tmp_path / "snap")
    before = (destination / STATE_FILE).read_bytes()
    child = multiprocessing.get_context("fork").Process(
        target=_write_then_die, args=(str(destination),)
    )
    child.start()
    child.join()
    assert child.exitcode == 9
    assert (destination / STATE_FILE).read_bytes() == before
    assert read_snapshot(destination).shape.memory_size == RAM


LEAF1 = 0x1


def entry(function: int, ecx: int = 0, edx: int = 0) -> tuple[int, int, int, int, int, int, int]:
    return (function, 0, 0, 0, 0, ecx, edx)


def test_a_feature_the_guest_used_and_this_host_lacks_is_named() -> None:
    guest = [entry(LEAF1, ecx=1 << 28 | 1 << 0), entry(0x80000001, edx=1 << 29)]
    host = [entry(LEAF1, ecx=1 << 0), entry(0x80000001, edx=1 << 29)]
    assert missing_features(guest, host) == ["leaf 0x1.0 ecx bit 28"]
    assert missing_features(host, guest) == []


def test_bits_kvm_updates_as_the_guest_runs_are_not_host_features() -> None:
    guest = [entry(LEAF1, ecx=1 << 27, edx=1 << 9)]  # OSXSAVE, APIC: follow CR4, APIC_BASE
    assert missing_features(guest, [entry(LEAF1)]) == []


def test_another_vendor_or_tsc_rate_is_refused() -> None:
    here = {"cpu_vendor": "AuthenticAMD", "tsc_khz": 2_000_000}
    assert host_problem(dict(here), here) is None
    assert host_problem({**here, "tsc_khz": 2_000_100}, here) is None  # 50 ppm
    vendor = host_problem({**here, "cpu_vendor": "GenuineIntel"}, here)
    assert vendor is not None and "GenuineIntel" in vendor
    rate = host_problem({**here, "tsc_khz": 2_100_000}, here)
    assert rate is not None and "2100000 kHz" in rate
    assert host_problem({**here, "tsc_khz": "fast"}, here) is not None


def test_a_changed_or_missing_disk_image_is_named(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    saved = disk_identity(image)
    assert identity_problem(image, saved) is None
    image.write_bytes(bytes(8192))
    problem = identity_problem(image, saved)
    assert problem is not None and "size" in problem and "--force" in problem
    image.unlink()
    assert "is missing" in str(identity_problem(image, saved))


def test_device_records_are_checked_and_disks_identified(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    disk = {
        "name": "virtio-blk",
        "kind": "virtio-blk",
        "path": str(image),
        "readonly": False,
        "serial": None,
        "direct": False,
        "identity": disk_identity(image),
    }
    rng = {"name": "virtio-rng", "kind": "virtio-rng"}
    assert rebuild_records(tmp_path, [disk, rng], force=False) == [disk, rng]
    for bad, problem in [
        ("devices", "devices is not a list"),
        ([{"name": "x", "kind": "floppy"}], r"devices\[0\] is not a device"),
        ([{**rng, "extra": 1}], "not the fields of a virtio-rng"),
        ([{**disk, "readonly": "no"}], r"devices\[0\].readonly"),
        ([{**disk, "direct": 1}], r"devices\[0\].direct"),
    ]:
        with pytest.raises(SnapshotError, match=problem):
            rebuild_records(tmp_path, bad, force=False)
    image.write_bytes(bytes(8192))
    with pytest.raises(SnapshotError, match="changed since the snapshot"):
        rebuild_records(tmp_path, [disk], force=False)
    assert rebuild_records(tmp_path, [disk], force=True) == [disk]


def test_saved_registers_must_have_the_live_shape() -> None:
    template = {"rax": 0, "seg": {"base": 0, "limit": 0}, "bitmap": [0, 0]}
    check_like({"rax": 5, "seg": {"base": 1, "limit": 2}, "bitmap": [1, 2]}, template, "regs")
    for bad, where in [
        ({"rax": 5, "seg": {"base": 1}, "bitmap": [1, 2]}, "regs.seg"),
        ({"rax": -1, "seg": {"base": 1, "limit": 2}, "bitmap": [1, 2]}, "regs.rax"),
        ({"rax": True, "seg": {"base": 1, "limit": 2}, "bitmap": [1, 2]}, "regs.rax"),
        ({"rax": 1 << 64, "seg": {"base": 1, "limit": 2}, "bitmap": [1, 2]}, "regs.rax"),
        ({"rax": 5, "seg": {"base": 1, "limit": 2}, "bitmap": [1]}, "regs.bitmap"),
        ([], "regs"),
    ]:
        with pytest.raises(ShapeError) as refused:
            check_like(bad, template, "regs")
        assert refused.value.path == where
    assert hex_bytes("00ff", 2, "lapic") == b"\x00\xff"
    with pytest.raises(ShapeError, match="3 bytes, expected 2"):
        hex_bytes("00ff11", 2, "lapic")
    with pytest.raises(ShapeError, match="not hex"):
        hex_bytes("zz", 1, "lapic")
    assert int_pairs([[0x10, 5]], "msrs") == {0x10: 5}
    with pytest.raises(ShapeError, match="given twice"):
        int_pairs([[0x10, 5], [0x10, 6]], "msrs")
