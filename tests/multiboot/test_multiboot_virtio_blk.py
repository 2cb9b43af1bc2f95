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

from kvm_vmm.boot import MultibootBoot
from kvm_vmm.console import CaptureSink
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.pci_virtio import DOORBELL_KINDS, DoorbellKind
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

SECTOR = 512
IMAGE_SECTORS = 2048


def written_pattern() -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(SECTOR))


@pytest.mark.parametrize("cache", ["", ",direct=on"], ids=["buffered", "direct"])
def test_a_guest_driver_reads_writes_flushes_and_survives_a_looping_chain(
    kernels: KernelBuilder, runner: KernelRunner, tmp_path: Path, cache: str
) -> None:
    """Through the page cache and with O_DIRECT (sectors through an aligned buffer)."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_SECTORS * SECTOR))
    disk = f"path={image},serial=KVMTEST{cache}"
    run = runner.run(kernels.build("virtio_blk"), "--disk", disk)
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


@pytest.mark.parametrize("doorbell", DOORBELL_KINDS)
def test_every_doorbell_kind_serves_the_same_driver(
    kernels: KernelBuilder, tmp_path: Path, doorbell: DoorbellKind
) -> None:
    """Where the host lacks KVM_CAP_IOEVENTFD_ANY_LENGTH the doorbell is a 2-byte
    datamatch ioeventfd on the queue's index, and with no ioeventfd at all an MMIO exit
    to the transport: the same guest passes on each, and only the last one exits."""
    require_kvm()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_SECTORS * SECTOR))
    console = CaptureSink()
    with Machine(MachineConfig(console=console)) as machine:
        machine.pci.doorbell = doorbell
        disk = machine.add_disk(image, serial="KVMTEST")
        for spec in ("pc-testdev", "isa-debug-exit,iobase=0xf4,iosize=0x4"):
            machine.add_device_option(spec)
        machine.boot(MultibootBoot(kernels.build("virtio_blk")))
        outcome = machine.run(timeout=60)
        serial = console.data.decode(errors="replace")
        assert outcome.status == 1 and "PASS" in serial, (outcome, serial)
        assert disk.doorbells.kind == doorbell
        # The guest's MSI-X vector got a GSI of its own above the IOAPIC pins' routes.
        gsis = disk.wiring.vector_gsis
        assert gsis and min(gsis.values()) >= machine.vm.ioapic_routes
        requests = disk.counters()["requests"]
        assert requests >= 12  # 5 + 1 masked-vector flush, 5 over INTx, 1 after the reset
        # The stores that reached the transport's notify register (an exit each).
        notified = disk.transport.counters["notify_register_writes"]
        # Every kind of doorbell is served by the device, which counts each serving
        # (one may take several requests), and the machine's view keeps that count
        # beside the transport's (which once hid it under the same name).
        served = disk.device.counters()["notifications"]
        assert served > 0
        assert disk.counters()["notifications"] == served
        assert disk.counters()["notify_register_writes"] == notified
        if doorbell == "mmio exit":
            assert notified >= requests
        else:
            assert notified == 0
