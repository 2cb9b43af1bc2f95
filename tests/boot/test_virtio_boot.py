"""Debian's cloud kernel on our virtio-pci devices (issue 16): the kernel's own modules
load, Linux finds a modern virtio-blk (1af4:1042, class 0x010000) and virtio-rng
(1af4:1044), reads a file the test put on an ext4 image (its sha256), writes a new
one, syncs, unmounts and powers off; the host reads that file back out of the image
with debugfs. 64 bytes come from /dev/hwrng. With MSI-X (Linux's choice) every vector
of the disk is MSI-X ("PCI-MSI" in 6.1's /proc/interrupts) and its request queue's
took interrupts; with ``pci=nomsi`` the disk's interrupt is an IO-APIC fasteoi
(level) line, and the same checks pass.

The VMM runs as a user would: ``kvm-vmm run --disk path=IMAGE`` (Cloud Hypervisor's
spelling; virtio-rng is on by default for Linux guests).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KERNEL_ENV, boot_timeout
from virtio_guest import (
    GuestFiles,
    PciFunction,
    VirtioReport,
    make_ext4_image,
    parse_report,
    read_from_image,
    virtio_test_initramfs,
)

from kvm_vmm.debian import AssetsUnavailable, GuestAssets, fetch_guest_assets
from kvm_vmm.loaders import default_cache_dir

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

VIRTIO_VENDOR = 0x1AF4
MODERN_BLOCK = 0x1042  # 0x1040 + device type 2 (virtio 1.2, 4.1.2.1)
MODERN_ENTROPY = 0x1044  # 0x1040 + device type 4
BLOCK_CLASS = 0x010000  # mass storage, SCSI (what QEMU and Cloud Hypervisor give virtio-blk)
BLOCK_TYPE, ENTROPY_TYPE = 2, 4
KNOWN_SIZE = 256 << 10


@pytest.fixture(scope="module")
def guest() -> GuestAssets:
    """The default guest's kernel with its own modules (they must match the kernel)."""
    if os.environ.get(KERNEL_ENV):
        pytest.skip(f"the virtio test loads the default guest's modules; ${KERNEL_ENV} has none")
    cache = default_cache_dir(os.environ)
    if cache is None:
        pytest.skip("no cache directory ($HOME) for the default guest's kernel and modules")
    try:
        return fetch_guest_assets(cache)
    except AssetsUnavailable as error:
        pytest.skip(f"no default guest to boot ({error})")


def run_guest(
    tmp_path: Path, guest: GuestAssets, image: Path, files: GuestFiles, cmdline: str
) -> tuple[int, str, str]:
    modules = [(path.stem, path.read_bytes()) for path in guest.modules]
    initrd = tmp_path / "virtio-initramfs.cpio"
    initrd.write_bytes(virtio_test_initramfs(guest.busybox.read_bytes(), modules, files))
    serial = tmp_path / "console.txt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvm_vmm.cli",
            "run",
            "--kernel",
            str(guest.kernel),
            "--initrd",
            str(initrd),
            "--cmdline",
            cmdline,
            "--fast-boot",
            "--disk",
            f"path={image}",
            "--serial",
            f"file:{serial}",
            "--stats",
            "--timeout",
            str(boot_timeout()),
        ],
        capture_output=True,
        text=True,
        timeout=boot_timeout() + 120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    console = serial.read_text(errors="replace") if serial.exists() else ""
    return result.returncode, result.stderr, console


def only(functions: list[PciFunction], device: int) -> PciFunction:
    found = [f for f in functions if f.vendor == VIRTIO_VENDOR and f.device == device]
    assert len(found) == 1, functions
    return found[0]


def bound(report: VirtioReport, device_type: int, driver: str) -> str:
    name = report.virtio_device(device_type)
    assert name is not None, report.virtio
    assert report.virtio[name][1] == driver, report.virtio
    return name


@pytest.mark.usefixtures("boots_to_init")
@pytest.mark.parametrize("interrupts", ["msix", "intx"])
def test_linux_reads_and_writes_a_virtio_disk_and_reads_virtio_rng(
    guest: GuestAssets, tmp_path: Path, interrupts: str
) -> None:
    files = GuestFiles("known.bin", "from-guest.txt", f"written by the guest {os.getpid()}")
    known = os.urandom(KNOWN_SIZE)
    image = tmp_path / "disk.img"
    make_ext4_image(image, {files.known: known})
    cmdline = "console=ttyS0 panic=-1" + (" pci=nomsi" if interrupts == "intx" else "")

    status, stderr, console = run_guest(tmp_path, guest, image, files, cmdline)
    report = parse_report(console)
    context = f"status {status}\n{stderr[-2000:]}\n{console[-4000:]}"
    assert status == 0, context
    assert report.complete, context
    assert report.failed_modules == [], context

    disk = only(report.pci, MODERN_BLOCK)
    assert (disk.class_code, disk.driver) == (BLOCK_CLASS, "virtio-pci")
    assert only(report.pci, MODERN_ENTROPY).driver == "virtio-pci"
    disk_name = bound(report, BLOCK_TYPE, "virtio_blk")
    rng_name = bound(report, ENTROPY_TYPE, "virtio_rng")

    assert report.mounted and report.sha256 == hashlib.sha256(known).hexdigest(), context
    assert report.written and report.unmounted, context
    assert read_from_image(image, f"/{files.written}") == f"{files.text}\n".encode()
    assert read_from_image(image, f"/{files.known}") == known

    assert report.rng_source is not None and report.rng_source.startswith("virtio_rng"), context
    assert report.hwrng is not None and len(report.hwrng) == 64, context
    assert len(set(report.hwrng)) > 1  # not one byte repeated: 64 random bytes almost never are
    assert sum(sum(line.counts) for line in report.interrupts_of(rng_name)) > 0

    disk_lines = report.interrupts_of(disk_name)
    assert disk_lines, context
    if interrupts == "msix":
        assert report.msi_modes.get(disk.address), context
        assert set(report.msi_modes[disk.address]) == {"msix"}
        assert all(line.chip.startswith("PCI-MSI") for line in disk_lines), disk_lines
        requests = [
            line for line in disk_lines if any(n.startswith(f"{disk_name}-req") for n in line.names)
        ]
        assert requests and sum(sum(line.counts) for line in requests) > 0, disk_lines
    else:
        assert disk.address not in report.msi_modes
        assert all(line.chip == "IO-APIC" for line in disk_lines), disk_lines
        assert all(line.flow.endswith("-fasteoi") for line in disk_lines), disk_lines
        assert sum(sum(line.counts) for line in disk_lines) > 0
