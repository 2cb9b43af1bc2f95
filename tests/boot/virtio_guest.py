"""The virtio boot test's two sides: the guest's /init, and the host's ext4 image.

The guest (a busybox /init) loads the kernel's virtio modules, lists the PCI
functions from sysfs as lspci would (vendor, device, class, bound driver, the
MSI/MSI-X mode of each vector: /sys/bus/pci/devices/*/msi_irqs/*, see
Documentation/ABI/testing/sysfs-bus-pci), mounts /dev/vda, prints the sha256 of a
file the host put there, writes a file, syncs and unmounts, names the current
hw_random source and reads 64 bytes from /dev/hwrng when there is one, and
prints the virtio, timer, ttyS0 and acpi lines of /proc/interrupts; one marker line per check
(``VIRTIO-TEST <check> ...``), then it powers off. The host makes the ext4 image
with ``mkfs.ext4 -d DIR`` and reads the guest's file back with ``debugfs``
(e2fsprogs): no mount, no root needed.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvm_vmm.debian import GuestAssets
from kvm_vmm.initramfs import (
    HW_RANDOM_CURRENT,
    INIT_REACHED_MARKER,
    MODULE_FAILED_MARKER,
    CpioEntry,
    busybox_initramfs,
    load_modules,
    module_entries,
)
from kvm_vmm.kernel_modules import driver_modules

MARKER = "VIRTIO-TEST"
BEGIN = f"{MARKER} BEGIN"
END = f"{MARKER} END"
HWRNG_BYTES = 64
_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_FLOW = re.compile(r"^\d+-(edge|level|fasteoi)$")


class E2fsprogsError(RuntimeError):
    """mkfs.ext4 or debugfs is missing or failed; the message says what it printed."""


@dataclass(frozen=True)
class GuestFiles:
    """What the guest reads (``known``, whose sha256 the host knows) and writes
    (``written`` with ``text``) at the root of the disk's ext4 file system."""

    known: str
    written: str
    text: str

    def __post_init__(self) -> None:
        # Both go into the shell script: plain names and one line of plain text only.
        for name in (self.known, self.written):
            if not _FILE_NAME.match(name):
                raise ValueError(f"file name {name!r}: letters, digits, '.', '_', '-' only")
        if not re.match(r"^[A-Za-z0-9 .,:_-]*$", self.text):
            raise ValueError(f"text {self.text!r}: one line of letters, digits and punctuation")


def virtio_test_init(
    modules: list[str], needed: Mapping[int, Sequence[str]], files: GuestFiles, more: str = ""
) -> str:
    """The test's /init (busybox sh); ``more`` (shell lines: other devices' checks)
    runs after the disk's and entropy's, before the interrupts are listed."""
    return f"""#!/bin/sh
# kvm-vmm virtio boot test: what the guest found and did, one marker line each; power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{INIT_REACHED_MARKER}"
echo "{BEGIN}"
{load_modules(modules, needed)}for function in /sys/bus/pci/devices/*; do
    [ -e "$function/vendor" ] || continue
    driver=none
    [ -e "$function/driver" ] && driver=$(basename "$(readlink "$function/driver")")
    echo "{MARKER} PCI ${{function##*/}} $(cat "$function/vendor") $(cat "$function/device") \
$(cat "$function/class") $driver"
    for vector in "$function"/msi_irqs/*; do
        [ -e "$vector" ] && echo "{MARKER} MSI ${{function##*/}} ${{vector##*/}} $(cat "$vector")"
    done
done
for device in /sys/bus/virtio/devices/*; do
    [ -e "$device/device" ] || continue
    driver=none
    [ -e "$device/driver" ] && driver=$(basename "$(readlink "$device/driver")")
    echo "{MARKER} VIRTIO ${{device##*/}} $(cat "$device/device") $driver"
done
mkdir -p /mnt
if [ -b /dev/vda ] && mount -t ext4 /dev/vda /mnt; then
    echo "{MARKER} MOUNT ok"
    echo "{MARKER} SHA256 $(sha256sum /mnt/{files.known} | cut -d ' ' -f 1)"
    if echo "{files.text}" > /mnt/{files.written} && sync; then
        echo "{MARKER} WRITE ok"
    else
        echo "{MARKER} WRITE failed"
    fi
    if umount /mnt; then echo "{MARKER} UMOUNT ok"; else echo "{MARKER} UMOUNT failed"; fi
else
    echo "{MARKER} MOUNT failed"
fi
rng=$(cat {HW_RANDOM_CURRENT} 2>/dev/null)
echo "{MARKER} RNG ${{rng:-missing}}"
if [ -n "$rng" ] && [ "$rng" != none ]; then
    echo "{MARKER} HWRNG $(head -c {HWRNG_BYTES} /dev/hwrng | od -An -v -tx1 | tr -d ' \\n')"
else
    echo "{MARKER} HWRNG none"
fi
{more}grep -E 'CPU0|virtio|timer|ttyS0|acpi' /proc/interrupts | while read -r line; do
    echo "{MARKER} IRQ $line"
done
echo "{END}"
poweroff -f
"""


def virtio_test_initramfs(
    busybox: bytes,
    modules: list[tuple[str, bytes]],
    files: GuestFiles,
    more: str = "",
    extra: Sequence[CpioEntry] = (),
) -> bytes:
    """The test's initramfs: busybox, the modules (name, ELF object) in load order, /init
    (with ``more``), and ``extra`` files."""
    names = [name for name, _ in modules]
    init = virtio_test_init(names, driver_modules(modules), files, more)
    return busybox_initramfs(busybox, init, [*module_entries(modules), *extra])


# -- what the guest printed ---------------------------------------------------------


@dataclass(frozen=True)
class PciFunction:
    address: str  # 0000:00:03.0
    vendor: int
    device: int
    class_code: int
    driver: str  # "none" when no driver bound


@dataclass(frozen=True)
class InterruptLine:
    irq: str
    counts: list[int]
    chip: str  # "PCI-MSI" (6.1 names MSI and MSI-X so), "IO-APIC", ...
    flow: str  # "<hwirq>-edge" / "-fasteoi"
    names: list[str]  # "virtio0-req.0", or "virtio0" on a shared INTx line


@dataclass
class VirtioReport:
    """The guest's marker lines, parsed; ``complete`` when its END line came."""

    failed_modules: list[str] = field(default_factory=list)
    pci: list[PciFunction] = field(default_factory=list)
    msi_modes: dict[str, list[str]] = field(default_factory=dict)  # address -> per vector
    virtio: dict[str, tuple[int, str]] = field(default_factory=dict)  # virtioN -> (id, driver)
    mounted: bool = False
    sha256: str | None = None
    written: bool = False
    unmounted: bool = False
    rng_source: str | None = None  # "virtio_rng.0"; "none" with no driver registered
    hwrng: bytes | None = None
    interrupts: list[InterruptLine] = field(default_factory=list)
    complete: bool = False

    def virtio_device(self, device_id: int) -> str | None:
        """The virtioN name of the first device of a type (2 block, 4 entropy)."""
        for name, (found, _) in sorted(self.virtio.items()):
            if found == device_id:
                return name
        return None

    def interrupts_of(self, virtio_name: str) -> list[InterruptLine]:
        """The /proc/interrupts lines naming ``virtio_name`` ("virtio0" or "virtio0-...")."""
        return [
            line
            for line in self.interrupts
            if any(name == virtio_name or name.startswith(virtio_name + "-") for name in line.names)
        ]


def parse_report(console: str) -> VirtioReport:
    """The report the test /init printed between its BEGIN and END lines."""
    report = VirtioReport()
    if BEGIN not in console:
        return report
    section = console.split(BEGIN, 1)[1]
    cpus = 1
    for raw in section.replace("\r", "").splitlines():
        line = raw.strip()
        if line.startswith(MODULE_FAILED_MARKER):
            report.failed_modules.append(line.split()[1].rstrip(":"))
        if not line.startswith(MARKER + " "):
            continue
        check, _, rest = line[len(MARKER) + 1 :].partition(" ")
        fields = rest.split()
        if check == "END":
            report.complete = True
            break
        if check == "PCI" and len(fields) == 5:
            address, vendor, device, class_code, driver = fields
            report.pci.append(
                PciFunction(address, int(vendor, 16), int(device, 16), int(class_code, 16), driver)
            )
        elif check == "MSI" and len(fields) == 3:
            report.msi_modes.setdefault(fields[0], []).append(fields[2])
        elif check == "VIRTIO" and len(fields) == 3:
            report.virtio[fields[0]] = (int(fields[1], 16), fields[2])
        elif check == "MOUNT":
            report.mounted = fields == ["ok"]
        elif check == "SHA256" and fields:
            report.sha256 = fields[0]
        elif check == "WRITE":
            report.written = fields == ["ok"]
        elif check == "UMOUNT":
            report.unmounted = fields == ["ok"]
        elif check == "RNG" and fields:
            report.rng_source = fields[0]
        elif check == "HWRNG" and fields and fields[0] != "none":
            report.hwrng = bytes.fromhex(fields[0])
        elif check == "IRQ" and fields:
            if fields[0] == "CPU0":
                cpus = len(fields)
            else:
                parsed = _interrupt_line(fields, cpus)
                if parsed is not None:
                    report.interrupts.append(parsed)
    return report


def _interrupt_line(fields: list[str], cpus: int) -> InterruptLine | None:
    # kernel/irq/proc.c: "IRQ:", one count per CPU, the chip, "<hwirq>-<flow>", the names.
    if not fields[0].endswith(":") or len(fields) < cpus + 2:
        return None
    counts = [int(value) for value in fields[1 : cpus + 1] if value.isdigit()]
    chip, rest = fields[cpus + 1], fields[cpus + 2 :]
    flow = rest[0] if rest and _FLOW.match(rest[0]) else ""
    names = " ".join(rest[1:] if flow else rest).replace(",", " ").split()
    return InterruptLine(fields[0].rstrip(":"), counts, chip, flow, names)


# -- the host's ext4 image ----------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise E2fsprogsError(f"{name} is not installed (Debian: apt-get install e2fsprogs)")
    return path


def make_ext4_image(image: Path, files: dict[str, bytes], size: int = 8 << 20) -> None:
    """A raw ``size``-byte ext4 image at ``image`` holding ``files`` at its root."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, data in files.items():
            if not _FILE_NAME.match(name):
                raise ValueError(f"file name {name!r}: letters, digits, '.', '_', '-' only")
            (root / name).write_bytes(data)
        image.unlink(missing_ok=True)
        with image.open("wb") as out:
            out.truncate(size)
        result = subprocess.run(
            [_tool("mkfs.ext4"), "-q", "-F", "-E", "root_owner=0:0", "-d", str(root), str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise E2fsprogsError(f"mkfs.ext4 -d failed: {result.stderr.strip()}")


def read_from_image(image: Path, path: str) -> bytes:
    """A file's contents out of an ext4 image (``debugfs -R 'cat PATH'``); a file that is
    not there is an error, not empty contents."""
    debugfs = _tool("debugfs")
    # debugfs prints its banner on stderr and reports a missing file there, status 0.
    found = subprocess.run(
        [debugfs, "-R", f"stat {path}", str(image)], capture_output=True, check=False
    )
    if found.returncode != 0 or b"Inode:" not in found.stdout:
        message = found.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise E2fsprogsError(f"{path} is not in {image}: {' '.join(message)}")
    result = subprocess.run(
        [debugfs, "-R", f"cat {path}", str(image)], capture_output=True, check=False
    )
    if result.returncode != 0:
        raise E2fsprogsError(f"debugfs cat {path} failed: {result.stderr.decode().strip()}")
    return result.stdout


def vmm_command(
    guest: GuestAssets,
    initrd: Path,
    cmdline: str,
    serial: Path,
    devices: Sequence[str],
    timeout: float,
) -> list[str]:
    """``kvm-vmm run`` of the default guest's kernel with ``initrd`` and ``devices``,
    as a user runs it."""
    return [
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
        *devices,
        "--serial",
        f"file:{serial}",
        "--stats",
        "--timeout",
        str(timeout),
    ]


# -- the checks both virtio boots make ----------------------------------------------

VIRTIO_VENDOR = 0x1AF4
MODERN_BLOCK = 0x1042  # 0x1040 + device type 2 (virtio 1.2, 4.1.2.1)
MODERN_ENTROPY = 0x1044  # 0x1040 + device type 4
BLOCK_CLASS = 0x010000  # mass storage, SCSI (what QEMU and Cloud Hypervisor give virtio-blk)
BLOCK_TYPE, ENTROPY_TYPE = 2, 4
KNOWN_SIZE = 256 << 10
# Without the TSC-deadline timer Linux calibrates its LAPIC timer against the PIT and
# keeps IRQ 0 ("timer" in /proc/interrupts); with it, no line is listed for IRQ 0.
PIT_CMDLINE = "clearcpuid=tsc_deadline_timer"


def only(functions: list[PciFunction], device: int) -> PciFunction:
    found = [f for f in functions if f.vendor == VIRTIO_VENDOR and f.device == device]
    assert len(found) == 1, functions
    return found[0]


def bound(report: VirtioReport, device_type: int, driver: str) -> str:
    name = report.virtio_device(device_type)
    assert name is not None, report.virtio
    assert report.virtio[name][1] == driver, report.virtio
    return name


def check_disk_rng_and_interrupts(
    report: VirtioReport,
    image: Path,
    files: GuestFiles,
    known: bytes,
    interrupts: str,
    context: str,
    *,
    pit_timer: bool = False,
) -> None:
    """What a virtio boot with a disk (``image``, holding ``known`` as files.known)
    and virtio-rng must show, ``interrupts`` being "msix" or "intx" (pci=nomsi);
    ``pit_timer``: Linux kept the PIT's IRQ 0 (PIT_CMDLINE), so its line is checked."""
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

    # One vCPU: the ISA lines reach it through our IOAPIC either way (the 2-vCPU boot
    # of test_linux_boot checks the same with the firmware's tables).
    isa = [("ttyS0", "4-edge"), ("acpi", "9-fasteoi")] + ([("timer", "2-edge")] * pit_timer)
    for name, flow in isa:
        [line] = [line for line in report.interrupts if line.names == [name]]
        assert (line.chip, line.flow) == ("IO-APIC", flow), line
    if pit_timer:
        [timer] = [line for line in report.interrupts if line.names == ["timer"]]
        assert sum(timer.counts) > 0  # our PIT ticked through our IOAPIC

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
