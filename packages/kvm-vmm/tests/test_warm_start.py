"""The demo's warm start: the snapshot's key, its cache, and the snapshot taken when a
prompt first appears (kvm_vmm.warm_start). The demo itself, cold then warm, is a boot
test (tests/boot/test_demo_warm_start.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvm_vmm.boot import DemoBoot, LinuxBoot
from kvm_vmm.cli import DemoSnapshot, _demo_snapshot, _warm_demo, build_parser
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.warm_start import WarmStartCache, snapshot_at_prompt, warm_start_key
from kvmfast.testing import require_kvm

HOST = {"cpu": "test CPU", "kernel": "6.1"}


def key(boot: LinuxBoot, **changes: object) -> str:
    options: dict[str, object] = {
        "memory_size": 512 << 20,
        "cpus": 1,
        "devices": ["rng=None"],
        "emulation_fallback": True,
        "host": HOST,
        "version": "0.1.0",
    }
    options.update(changes)
    return warm_start_key(boot, **options)  # type: ignore[arg-type]


def test_the_key_names_everything_that_makes_the_guest_at_its_prompt(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    boot = LinuxBoot(kernel, initrd=initrd, cmdline="console=ttyS0", fast_boot=True)
    first = key(boot)
    assert first == key(boot) and first.startswith("demo-")
    others = {
        key(boot, memory_size=256 << 20),
        key(boot, cpus=2),
        key(boot, devices=["rng=False"]),
        key(boot, emulation_fallback=False),
        key(boot, host={**HOST, "kernel": "6.12"}),
        key(boot, version="0.2.0"),
        key(LinuxBoot(kernel, initrd=initrd, cmdline="console=ttyS0 quiet", fast_boot=True)),
    }
    assert first not in others and len(others) == 7
    os.utime(initrd, ns=(0, 12345))  # an initramfs written again
    assert key(boot) != first


def test_the_demo_keys_its_snapshot_by_its_network_devices_and_command_line(
    tmp_path: Path,
) -> None:
    """A restore brings back the devices the snapshot was taken with: a demo with --net
    or --vsock, or another ip=, must not be given the snapshot of one without."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")

    def demo_key(*options: str) -> str:
        args = build_parser().parse_args(["demo", *options])
        boot = LinuxBoot(kernel, cmdline=f"console=ttyS0 {args.cmdline}".strip())
        snapshot = _demo_snapshot(args, boot, 512 << 20, tmp_path)
        assert snapshot is not None
        return snapshot.key

    plain = demo_key()
    assert plain == demo_key()
    others = {
        demo_key("--net", "tap=tap0"),
        demo_key("--net", "tap=tap1"),
        demo_key("--vsock", "cid=3,socket=/tmp/v.sock"),
        demo_key("--net", "tap=tap0", "--cmdline", "ip=10.0.2.15/24"),
    }
    assert plain not in others and len(others) == 4


def test_the_cache_keeps_discards_and_prepares_by_key(tmp_path: Path) -> None:
    cache = WarmStartCache(tmp_path)
    assert cache.usable("demo-x") is None
    path = cache.prepare("demo-x")
    assert path.parent.is_dir() and not path.exists()
    path.mkdir()
    assert cache.usable("demo-x") == path
    cache.discard("demo-x")
    assert cache.usable("demo-x") is None


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    cache = WarmStartCache(tmp_path)
    for age, name in enumerate(["demo-old", "demo-older", "demo-new"]):
        path = cache.prepare(name)
        path.mkdir()
        os.utime(path, ns=(0, 10**9 * (100 - age if name != "demo-new" else 200)))
    cache.prepare("demo-next")  # three kept: this one and the two newest others
    assert cache.usable("demo-new") is not None and cache.usable("demo-old") is not None
    assert cache.usable("demo-older") is None


@pytest.mark.kvm
def test_the_snapshot_is_taken_at_the_prompt_and_the_run_goes_on(tmp_path: Path) -> None:
    require_kvm()
    destination = tmp_path / "snap"
    lines: list[str] = []
    with Machine(MachineConfig(memory_size=16 << 20)) as machine:
        machine.boot(DemoBoot())  # prints a greeting, counts ten PIT ticks, powers off
        taker = snapshot_at_prompt(machine, destination, lines.append, prompt=b"LAPIC.")
        outcome = machine.run(timeout=60)
        taker.join(timeout=30)
        assert outcome.reason == "guest powered off"  # resumed after the snapshot
    assert lines == [f"snapshot of the booted guest kept for the next run: {destination}"]
    with Machine.restore(destination) as restored:
        outcome = restored.run(timeout=60)  # from the greeting on: the ticks, the power-off
        assert outcome.reason == "guest powered off"
        assert b"10 PIT ticks arrived" in restored.serial.transcript()
        assert b"Hello" not in restored.serial.transcript()


@pytest.mark.kvm
def test_a_run_that_ends_before_the_prompt_leaves_no_snapshot(tmp_path: Path) -> None:
    require_kvm()
    destination = tmp_path / "snap"
    with Machine(MachineConfig(memory_size=16 << 20)) as machine:
        machine.boot(DemoBoot())
        taker = snapshot_at_prompt(machine, destination, print, prompt=b"never printed")
        machine.run(timeout=60)
        taker.join(timeout=30)
        assert not taker.is_alive()
    assert not destination.exists()


def test_a_cached_snapshot_that_does_not_fit_is_set_aside_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_kvm()
    cache = WarmStartCache(tmp_path)
    damaged = cache.prepare("demo-damaged")
    damaged.mkdir()
    (damaged / "state.json").write_text('{"schema": "kvm-vmm-snapshot", "version": 99}')
    args = build_parser().parse_args(["demo", "--serial", "null", "--quiet"])
    assert _warm_demo(args, DemoSnapshot(cache, "demo-damaged"), None) is None
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "the demo's snapshot does not fit" in note
    assert "schema version 99 is newer" in note and "booting and taking a new one" in note
    assert cache.usable("demo-damaged") is None  # discarded: the cold run takes a new one
