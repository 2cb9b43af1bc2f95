"""Virtio devices on a Machine: where they land on bus 0, and every bad image refused by name."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

import kvmfast
from kvm_devices.virtio.constants import BAR0_SIZE
from kvm_vmm import board
from kvm_vmm.cli import main
from kvm_vmm.machine import Machine, MachineConfig
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm


@pytest.fixture
def machine() -> Machine:
    require_kvm()
    return Machine(MachineConfig())


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(64 * 512))
    return path


def ids(machine: Machine, slot: int) -> tuple[int, int]:
    vendor_device = machine.platform.pci_bus.config_read(0, slot, 0, 0, 4)
    return vendor_device & 0xFFFF, vendor_device >> 16


def test_a_disk_and_an_rng_are_modern_virtio_functions_with_bars_in_the_pci_window(
    machine: Machine, image: Path
) -> None:
    with machine:
        disk = machine.add_disk(image, serial="ABC")
        rng = machine.add_rng()
        assert ids(machine, disk.slot) == (0x1AF4, 0x1042)
        assert ids(machine, rng.slot) == (0x1AF4, 0x1044)
        assert disk.slot != rng.slot and 0 not in (disk.slot, rng.slot)  # 0: host bridge
        assert machine.devices["virtio-blk"] is disk.transport
        assert machine.devices["virtio-rng"] is rng.transport
        window = board.PCI_MMIO_WINDOW
        for attached in (disk, rng):
            address = attached.transport.config.bar_address(0)
            assert address is not None
            assert window.start <= address and address + BAR0_SIZE <= window.end
            assert attached.bar0 is None  # decoded only once the guest turns memory on
        # capacity: 64 sectors (virtio 1.2 §5.2.4)
        assert disk.transport.bar_read(0x2000, 8) == 64


def test_memory_decode_maps_bar0_and_moving_the_bar_moves_it(machine: Machine, image: Path) -> None:
    with machine:
        disk = machine.add_disk(image)
        bus, slot = machine.platform.pci_bus, disk.slot
        bus.config_write(0, slot, 0, 0x04, 2, 0x6)  # memory decode, bus master
        address = disk.transport.config.bar_address(0)
        assert disk.bar0 == address
        moved = board.PCI_MMIO_WINDOW.start + 0x100_0000
        bus.config_write(0, slot, 0, 0x10, 4, moved | 0x4)
        assert disk.bar0 == moved
        bus.config_write(0, slot, 0, 0x04, 2, 0)
        assert disk.bar0 is None


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot open disk image"), (b"", "is empty")],
)
def test_a_missing_or_empty_image_is_refused_by_name(
    machine: Machine, tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "bad.raw"
    if content is not None:
        path.write_bytes(content)
    with machine, pytest.raises(kvmfast.VirtioError, match=message) as raised:
        machine.add_disk(path)
    assert str(path) in str(raised.value)


def test_a_writable_image_has_one_user_until_its_machine_is_closed(image: Path) -> None:
    require_kvm()
    first = Machine(MachineConfig())
    first.add_disk(image)
    with Machine(MachineConfig()) as second:
        with pytest.raises(kvmfast.VirtioError, match="in use by another process"):
            second.add_disk(image)
        with pytest.raises(kvmfast.VirtioError, match="in use"):
            second.add_disk(image, readonly=True)
    first.close()
    with Machine(MachineConfig()) as third:
        third.add_disk(image)


def test_read_only_images_may_be_shared(image: Path) -> None:
    require_kvm()
    with Machine(MachineConfig()) as first, Machine(MachineConfig()) as second:
        first.add_disk(image, readonly=True)
        second.add_disk(image, readonly=True)


def test_stats_count_each_virtio_devices_work_by_name(machine: Machine, image: Path) -> None:
    with machine:
        assert "virtio" not in machine.stats()
        machine.add_disk(image)
        machine.add_rng()
        virtio = machine.stats()["virtio"]
        assert isinstance(virtio, dict)
        assert set(virtio) == {"virtio-blk", "virtio-rng"}
        assert virtio["virtio-blk"]["requests"] == 0
        assert "malformed_chains" in virtio["virtio-blk"]


def test_the_cli_names_a_bad_disk_and_exits_2(tmp_path: Path) -> None:
    require_kvm()
    stderr = io.StringIO()
    missing = tmp_path / "missing.raw"
    with contextlib.redirect_stderr(stderr):
        status = main(["demo", "--tiny", "--disk", f"path={missing}", "--serial", "null"])
    assert status == 2
    assert f"cannot open disk image {missing}" in stderr.getvalue()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["demo", "--tiny", "--disk", "path=x,cache=none", "--serial", "null"])
    assert status == 2
    assert "unknown option 'cache'" in stderr.getvalue()
