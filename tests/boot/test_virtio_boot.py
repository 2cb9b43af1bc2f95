"""Debian's cloud kernel on our virtio-pci devices (issue 16) with ``pci=nomsi``: the
kernel's own modules load, Linux finds a modern virtio-blk (1af4:1042, class
0x010000) and virtio-rng (1af4:1044), reads a file the test put on an ext4 image
(its sha256), writes a new one, syncs, unmounts and powers off; the host reads that
file back out of the image with debugfs. 64 bytes come from /dev/hwrng. The disk's
interrupt is an IO-APIC fasteoi (level) line; the one vCPU's timer (the PIT's, kept
by hiding the TSC-deadline timer), ttyS0 and SCI lines come through our IOAPIC (edge,
edge, level).

The same checks with MSI-X (Linux's choice: every vector of the disk "PCI-MSI" in
6.1's /proc/interrupts, its request queue's taking interrupts) run in
test_network_boot's boot, which adds virtio-net and virtio-vsock to the same guest.

The VMM runs as a user would: ``kvm-vmm run --disk path=IMAGE`` (Cloud Hypervisor's
spelling; virtio-rng is on by default for Linux guests).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import boot_timeout
from virtio_guest import (
    KNOWN_SIZE,
    PIT_CMDLINE,
    GuestFiles,
    check_disk_rng_and_interrupts,
    make_ext4_image,
    parse_report,
    virtio_test_initramfs,
    vmm_command,
)

from kvm_vmm.debian import GuestAssets

pytestmark = [pytest.mark.kvm, pytest.mark.boot]


def run_guest(
    tmp_path: Path, guest: GuestAssets, image: Path, files: GuestFiles, cmdline: str
) -> tuple[int, str, str]:
    modules = [(path.stem, path.read_bytes()) for path in guest.modules]
    initrd = tmp_path / "virtio-initramfs.cpio"
    initrd.write_bytes(virtio_test_initramfs(guest.busybox.read_bytes(), modules, files))
    serial = tmp_path / "console.txt"
    result = subprocess.run(
        vmm_command(guest, initrd, cmdline, serial, ["--disk", f"path={image}"], boot_timeout()),
        capture_output=True,
        text=True,
        timeout=boot_timeout() + 120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    console = serial.read_text(errors="replace") if serial.exists() else ""
    return result.returncode, result.stderr, console


@pytest.mark.usefixtures("boots_to_init")
def test_linux_reads_and_writes_a_virtio_disk_and_reads_virtio_rng_over_intx(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    files = GuestFiles("known.bin", "from-guest.txt", f"written by the guest {os.getpid()}")
    known = os.urandom(KNOWN_SIZE)
    image = tmp_path / "disk.img"
    make_ext4_image(image, {files.known: known})

    status, stderr, console = run_guest(
        tmp_path, guest_assets, image, files, f"console=ttyS0 panic=-1 pci=nomsi {PIT_CMDLINE}"
    )
    report = parse_report(console)
    context = f"status {status}\n{stderr[-2000:]}\n{console[-4000:]}"
    assert status == 0, context
    assert report.complete, context
    assert report.failed_modules == [], context
    check_disk_rng_and_interrupts(report, image, files, known, "intx", context, pit_timer=True)
