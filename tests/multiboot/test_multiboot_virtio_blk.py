"""A small guest drives a virtio-blk queue itself (virtio 1.2 §2.7, §4.1, §5.2): no Linux.

The kernel (tests/guests/multiboot/virtio_blk.S) finds the function through PCI
configuration mechanism #1, writes and reads sector 1, flushes, reads beyond the end
(VIRTIO_BLK_S_IOERR) and asks GET_ID, once with MSI-X (then with its vector masked:
pending bit, delivered on unmask) and once with INTx through the IOAPIC; then a
looping chain must set DEVICE_NEEDS_RESET and a reset must bring the device back.
The host then finds the guest's sector in the image.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guests.multiboot import KernelBuilder, KernelRunner

pytestmark = pytest.mark.kvm

SECTOR = 512
IMAGE_SECTORS = 2048


def written_pattern() -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(SECTOR))


def test_a_guest_driver_reads_writes_flushes_and_survives_a_looping_chain(
    kernels: KernelBuilder, runner: KernelRunner, tmp_path: Path
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_SECTORS * SECTOR))
    run = runner.run(kernels.build("virtio_blk"), "--disk", f"path={image},serial=KVMTEST")
    assert run.passed, run.describe()
    data = image.read_bytes()
    assert data[SECTOR : 2 * SECTOR] == written_pattern()
    assert data[:SECTOR] == bytes(SECTOR)  # nothing else was written
    assert data[2 * SECTOR :] == bytes(len(data) - 2 * SECTOR)


def test_without_the_disk_the_guest_finds_no_function(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    run = runner.run(kernels.build("virtio_blk"))
    assert run.status == (1 << 1) | 1, run.describe()
    assert "no virtio-blk function" in run.serial
