"""The virtio boot test's helpers, on the host alone (seconds): the ext4 image made
with mkfs.ext4 -d and read back with debugfs, the guest's /init as busybox sh
parses it, and the report read from console lines in the formats Linux prints
(sysfs-bus-pci's vendor/device/class/msi_irqs, kernel/irq/proc.c's
/proc/interrupts: "PCI-MSI" is 6.1's chip name for MSI and MSI-X vectors)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from virtio_guest import (
    BEGIN,
    END,
    E2fsprogsError,
    GuestFiles,
    make_ext4_image,
    parse_report,
    read_from_image,
    virtio_test_init,
    virtio_test_initramfs,
)

from kvm_vmm.initramfs import read_newc
from kvm_vmm.testing import fake_module

FILES = GuestFiles("known.bin", "from-guest.txt", "written by the guest 1234")


def test_an_image_made_with_files_gives_them_back(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    image = tmp_path / "disk.img"
    make_ext4_image(image, {"known.bin": data, "empty": b""})
    assert image.stat().st_size == 8 << 20
    assert read_from_image(image, "/known.bin") == data
    assert read_from_image(image, "/empty") == b""
    with pytest.raises(E2fsprogsError, match="not in"):
        read_from_image(image, "/from-guest.txt")


def test_a_damaged_image_or_bad_name_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes(1 << 20))
    with pytest.raises(E2fsprogsError):
        read_from_image(image, "/known.bin")
    with pytest.raises(ValueError, match="file name"):
        make_ext4_image(tmp_path / "x.img", {"../escape": b""})
    with pytest.raises(ValueError, match="file name"):
        GuestFiles("known.bin", "a b", "text")
    with pytest.raises(ValueError, match="text"):
        GuestFiles("known.bin", "out", 'quote"; reboot')


def test_the_init_script_parses_and_does_each_check_in_order(tmp_path: Path) -> None:
    script = virtio_test_init(
        ["virtio_ring", "virtio_blk"], {0x1042: ["virtio_ring", "virtio_blk"]}, FILES
    )
    (tmp_path / "init").write_text(script)
    subprocess.run(["sh", "-n", str(tmp_path / "init")], check=True)
    order = [
        BEGIN,
        "insmod /lib/modules/$module.ko",
        "/sys/bus/virtio/devices/*",
        "mount -t ext4 /dev/vda /mnt",
        "sha256sum /mnt/known.bin",
        "> /mnt/from-guest.txt && sync",
        "umount /mnt",
        "rng_current",
        "head -c 64 /dev/hwrng",
        "/proc/interrupts",
        END,
        "poweroff -f",
    ]
    positions = [script.index(text) for text in order]
    assert positions == sorted(positions)


def test_the_initramfs_carries_the_modules_and_the_script() -> None:
    ring, blk = fake_module("virtio_ring"), fake_module("virtio_blk", "virtio_ring")
    modules = [("virtio_ring", ring), ("virtio_blk", blk)]
    entries = {e.path: e for e in read_newc(virtio_test_initramfs(b"bb", modules, FILES))}
    assert entries["lib/modules/virtio_blk.ko"].data == blk
    needed = {0x1042: ["virtio_ring", "virtio_blk"]}
    assert entries["init"].data.decode() == virtio_test_init(
        ["virtio_ring", "virtio_blk"], needed, FILES
    )


KNOWN_SHA = hashlib.sha256(b"known").hexdigest()
CONSOLE = f"""[    5.1] Run /init as init process\r
KVM-VMM-INIT\r
{BEGIN}\r
KVM-VMM-MODULE-FAILED vsock: insmod: can't insert '/lib/modules/vsock.ko': Invalid argument\r
VIRTIO-TEST PCI 0000:00:00.0 0x8086 0x1237 0x060000 none\r
VIRTIO-TEST PCI 0000:00:02.0 0x1af4 0x1042 0x010000 virtio-pci\r
VIRTIO-TEST MSI 0000:00:02.0 24 msix\r
VIRTIO-TEST MSI 0000:00:02.0 25 msix\r
VIRTIO-TEST PCI 0000:00:03.0 0x1af4 0x1044 0x00ff00 virtio-pci\r
VIRTIO-TEST VIRTIO virtio0 0x0002 virtio_blk\r
VIRTIO-TEST VIRTIO virtio1 0x0004 virtio_rng\r
VIRTIO-TEST MOUNT ok\r
VIRTIO-TEST SHA256 {KNOWN_SHA}\r
VIRTIO-TEST WRITE ok\r
VIRTIO-TEST UMOUNT ok\r
VIRTIO-TEST RNG virtio_rng.0\r
VIRTIO-TEST HWRNG {"a5" * 64}\r
VIRTIO-TEST IRQ CPU0       CPU1\r
VIRTIO-TEST IRQ 24:          0          0   PCI-MSI 16384-edge      virtio0-config\r
VIRTIO-TEST IRQ 25:        113          7   PCI-MSI 16385-edge      virtio0-req.0\r
VIRTIO-TEST IRQ 11:          3          0   IO-APIC   11-fasteoi   virtio1, virtio2\r
VIRTIO-TEST IRQ  0:        120          0   IO-APIC    2-edge      timer\r
VIRTIO-TEST IRQ  4:         31          0   IO-APIC    4-edge      ttyS0\r
VIRTIO-TEST IRQ  9:          0          0   IO-APIC    9-fasteoi   acpi\r
{END}\r
"""


def test_the_report_is_read_from_the_console() -> None:
    report = parse_report(CONSOLE)
    assert report.complete
    assert report.failed_modules == ["vsock"]
    blk = next(f for f in report.pci if f.device == 0x1042)
    assert (blk.address, blk.vendor, blk.class_code, blk.driver) == (
        "0000:00:02.0",
        0x1AF4,
        0x010000,
        "virtio-pci",
    )
    assert report.msi_modes == {"0000:00:02.0": ["msix", "msix"]}
    assert report.virtio_device(2) == "virtio0" and report.virtio_device(4) == "virtio1"
    assert report.virtio_device(1) is None
    assert report.mounted and report.written and report.unmounted
    assert report.sha256 == KNOWN_SHA
    assert report.rng_source == "virtio_rng.0"
    assert report.hwrng == b"\xa5" * 64
    lines = report.interrupts_of("virtio0")
    assert [(line.irq, line.chip, line.flow, line.counts) for line in lines] == [
        ("24", "PCI-MSI", "16384-edge", [0, 0]),
        ("25", "PCI-MSI", "16385-edge", [113, 7]),
    ]
    shared = report.interrupts_of("virtio2")
    assert [(line.chip, line.flow, line.names) for line in shared] == [
        ("IO-APIC", "11-fasteoi", ["virtio1", "virtio2"])
    ]
    isa = [(line.names, line.chip, line.flow) for line in report.interrupts if line.irq in "049"]
    assert isa == [
        (["timer"], "IO-APIC", "2-edge"),
        (["ttyS0"], "IO-APIC", "4-edge"),
        (["acpi"], "IO-APIC", "9-fasteoi"),
    ]


def test_a_report_cut_short_or_failing_says_so() -> None:
    cut = parse_report(CONSOLE.split("VIRTIO-TEST MOUNT")[0])
    assert not cut.complete and not cut.mounted and cut.sha256 is None
    assert not parse_report("Kernel panic - not syncing").complete
    failed = parse_report(
        f"{BEGIN}\nVIRTIO-TEST MOUNT failed\nVIRTIO-TEST RNG none\nVIRTIO-TEST HWRNG none\n{END}\n"
    )
    assert failed.complete and not failed.mounted
    assert failed.rng_source == "none" and failed.hwrng is None
