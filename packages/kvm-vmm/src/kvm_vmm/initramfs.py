"""Initramfs images in the "newc" cpio format, written in pure Python.

The format is the kernel's (Documentation/driver-api/early-userspace/buffer-format.rst):
each entry is the ASCII magic "070701", thirteen 8-digit hexadecimal fields,
the NUL-terminated name padded to a multiple of four bytes (counting the
110-byte header), then the data padded the same way; "TRAILER!!!" ends the
archive. Images are left uncompressed: where guest kernel code is emulated, an
in-guest gunzip costs far more than the extra bytes copied into guest RAM.

:func:`busybox_initramfs` builds the two images the VMM boots: the demo's
(the virtio modules loaded, a disk mounted, a busybox shell on the console) and
the boot tests' (print what the tests check, then power off).
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvm_vmm.init_network import network_setup, vsock_note
from kvm_vmm.kernel_modules import VIRTIO_PCI_VENDOR, strip_signature

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110  # magic + 13 fields of 8 hex digits
FIELD_COUNT = 13
TRAILER_NAME = "TRAILER!!!"
# The kernel refuses names longer than PATH_MAX (init/initramfs.c, N_ALIGN/name_len).
PATH_MAX = 4096
MAX_FIELD = 0xFFFF_FFFF

# Linux's device numbers for the console (Documentation/admin-guide/devices.txt).
TTY_MAJOR = 5
CONSOLE_MINOR = 1
MEM_MAJOR = 1
NULL_MINOR = 3


class CpioFormatError(ValueError):
    """An entry that cannot be written, or an archive that cannot be read back."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``path`` is relative ("bin/busybox"), as the kernel expects."""

    path: str
    mode: int  # file type bits and permissions, as in st_mode
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


def directory(path: str, permissions: int = 0o755) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | permissions)


def regular_file(path: str, data: bytes, permissions: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | permissions, data)


def symlink(path: str, target: str) -> CpioEntry:
    """A symbolic link: cpio stores the target as the entry's data."""
    return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, permissions: int = 0o600) -> CpioEntry:
    return CpioEntry(path, stat.S_IFCHR | permissions, rdev_major=major, rdev_minor=minor)


def _pad4(length: int) -> int:
    return -length % 4


def _check_entry(entry: CpioEntry) -> bytes:
    name = entry.path.encode()
    if not name or b"\0" in name:
        raise CpioFormatError(f"cpio entry name {entry.path!r} is empty or contains NUL")
    if entry.path.startswith("/"):
        raise CpioFormatError(f"cpio entry name {entry.path!r} must be relative")
    if len(name) + 1 > PATH_MAX:
        raise CpioFormatError(f"cpio entry name is {len(name)} bytes; the kernel takes {PATH_MAX}")
    if entry.data and entry.kind not in (stat.S_IFREG, stat.S_IFLNK):
        raise CpioFormatError(f"cpio entry {entry.path!r}: only files and symlinks carry data")
    for field_name in ("uid", "gid", "mtime", "rdev_major", "rdev_minor"):
        value: int = getattr(entry, field_name)
        if not 0 <= value <= MAX_FIELD:
            raise CpioFormatError(f"cpio entry {entry.path!r}: {field_name} {value} out of range")
    if len(entry.data) > MAX_FIELD:
        raise CpioFormatError(f"cpio entry {entry.path!r}: newc holds files below 4 GiB")
    return name


def _header(entry: CpioEntry, inode: int, name_size: int) -> bytes:
    nlink = 2 if entry.kind == stat.S_IFDIR else 1
    fields = (
        inode,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor/devminor of the file's own filesystem: meaningless here
        0,
        entry.rdev_major,
        entry.rdev_minor,
        name_size,
        0,  # check: only the "070702" (crc) variant uses it
    )
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The archive holding ``entries`` in order, then the trailer.

    Each entry gets its own inode number: the kernel links entries that share
    one (with nlink > 1) into hard links, which none of ours are.
    """
    chunks: list[bytes] = []
    seen: set[str] = set()
    for inode, entry in enumerate(entries, start=1):
        name = _check_entry(entry)
        if entry.path in seen:
            raise CpioFormatError(f"cpio entry {entry.path!r} appears twice")
        seen.add(entry.path)
        chunks.append(_entry_bytes(entry, name, inode))
    chunks.append(_entry_bytes(CpioEntry(TRAILER_NAME, 0), TRAILER_NAME.encode(), 0))
    return b"".join(chunks)


def _entry_bytes(entry: CpioEntry, name: bytes, inode: int) -> bytes:
    name_size = len(name) + 1
    header = _header(entry, inode, name_size)
    name_part = name + b"\0" + b"\0" * _pad4(HEADER_SIZE + name_size)
    return header + name_part + entry.data + b"\0" * _pad4(len(entry.data))


def read_newc(archive: bytes) -> list[CpioEntry]:
    """The entries of a newc archive up to its trailer (the trailer not included)."""
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        header = archive[offset : offset + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            raise CpioFormatError(f"cpio archive ends inside a header at offset {offset}")
        if header[:6] != NEWC_MAGIC:
            raise CpioFormatError(f"no newc magic at offset {offset}: {header[:6]!r}")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(FIELD_COUNT)]
        except ValueError as error:
            raise CpioFormatError(f"bad hex field in the header at offset {offset}") from error
        _, mode, uid, gid, _, mtime, file_size, _, _, rmajor, rminor, name_size, _ = fields
        name_start = offset + HEADER_SIZE
        data_start = name_start + name_size + _pad4(HEADER_SIZE + name_size)
        data_end = data_start + file_size
        if name_size == 0 or data_end > len(archive):
            raise CpioFormatError(f"cpio entry at offset {offset} runs past the archive's end")
        name = archive[name_start : name_start + name_size].rstrip(b"\0").decode()
        if name == TRAILER_NAME:
            return entries
        data = archive[data_start:data_end]
        entries.append(CpioEntry(name, mode, data, uid, gid, mtime, rmajor, rminor))
        offset = data_end + _pad4(file_size)


# -- the VMM's own images ----------------------------------------------------------

BUSYBOX_PATH = "bin/busybox"
# Debian's busybox-static runs any applet by name from its shell (standalone
# shell), so only the names the kernel or our scripts call by path need links.
BUSYBOX_LINKS = ("bin/sh", "sbin/poweroff", "sbin/reboot", "bin/mount", "bin/cat")

TEST_BEGIN_MARKER = "KVM-VMM-BOOT-TEST BEGIN"
TEST_END_MARKER = "KVM-VMM-BOOT-TEST END"
INIT_REACHED_MARKER = "KVM-VMM-INIT"
# What the kernel logged about the firmware tables and the initrd the VMM gave it
# (read back with dmesg: a quiet boot does not print them on the console).
TEST_FIRMWARE_MARKER = "KVM-VMM-BOOT-TEST FIRMWARE"
TEST_FIRMWARE_PATTERN = r"BIOS-e820|ACPI: [A-Z]{4} 0x|RAMDISK|ACPI \(MADT\)|IOAPIC\[0\]"

_MOUNT_PSEUDO_FILESYSTEMS = """\
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
"""

MODULES_PATH = "lib/modules"  # one <name>.ko each; the init script loads them in order
MODULE_FAILED_MARKER = "KVM-VMM-MODULE-FAILED"
DISK_DEVICE = "/dev/vda"  # the first virtio-blk disk
DISK_MOUNT_POINT = "/mnt"
# The hw_random core is built into Debian's kernel: /dev/hwrng is there with no
# device behind it (reads fail with ENODEV) and this file says "none" until a
# driver such as virtio_rng registers (drivers/char/hw_random/core.c).
HW_RANDOM_CURRENT = "/sys/class/misc/hw_random/rng_current"
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _checked_module_name(name: str) -> str:
    # The names go into a shell script and into paths: module names are C identifiers.
    if not _MODULE_NAME.match(name):
        raise CpioFormatError(f"module name {name!r}: expected letters, digits and '_'")
    return name


def module_entries(modules: Sequence[tuple[str, bytes]]) -> list[CpioEntry]:
    """/lib/modules/<name>.ko for each (name, ELF object), signature stripped: what
    :func:`load_modules` loads."""
    return [
        directory("lib"),
        directory(MODULES_PATH),
        *(
            regular_file(f"{MODULES_PATH}/{_checked_module_name(name)}.ko", strip_signature(data))
            for name, data in modules
        ),
    ]


# Where the guest's kernel lists the PCI functions it found (scanned before /init).
PCI_DEVICES = "/sys/bus/pci/devices"


def load_modules(
    names: Sequence[str],
    needed: Mapping[int, Sequence[str]],
    pci_devices: str = PCI_DEVICES,
) -> str:
    """Shell lines that insmod, in ``names``' order (dependencies first), the modules
    ``needed`` lists for each virtio-pci device ID the guest has (in ``pci_devices``;
    :func:`kvm_vmm.kernel_modules.driver_modules` makes the map), and print one line
    for each that fails, then go on: a driver missing is reported, and what does not
    need it still runs. A guest with no virtio device loads nothing (each module costs
    seconds of emulated code here)."""
    if not names:
        return ""
    listed = " ".join(_checked_module_name(name) for name in names)
    cases = "".join(
        f'        {device:#06x}) wanted="$wanted '
        f'{" ".join(_checked_module_name(name) for name in modules)}" ;;\n'
        for device, modules in needed.items()
    )
    insmod = f"insmod /{MODULES_PATH}/$module.ko 2>&1"
    return f"""wanted=""
for function in {pci_devices}/*; do
    [ "$(cat "$function/vendor" 2>/dev/null)" = {VIRTIO_PCI_VENDOR:#06x} ] || continue
    case "$(cat "$function/device")" in
{cases}    esac
done
for module in {listed}; do
    case " $wanted " in
        *" $module "*) error=$({insmod}) || echo "{MODULE_FAILED_MARKER} $module: $error" ;;
    esac
done
"""


def demo_init(modules: Sequence[str], needed: Mapping[int, Sequence[str]]) -> str:
    """The demo's /init: load the ``modules`` its devices need (:func:`load_modules`),
    mount the first virtio disk (ext4) at /mnt when there is one, bring the network up
    (:func:`kvm_vmm.init_network.network_setup`: eth0 from the command line's ``ip=``),
    say what the guest got (the disk, an entropy source behind /dev/hwrng, eth0,
    virtio-vsock), then a shell; leaving it unmounts the disk (its dirty blocks reach
    the image) and powers off."""
    return f"""#!/bin/sh
# kvm-vmm demo: a busybox shell on the console; leaving it powers the guest off.
{_MOUNT_PSEUDO_FILESYSTEMS}echo "{INIT_REACHED_MARKER}: $(uname -sr), $(nproc) CPU(s)"
{load_modules(modules, needed)}if [ -b {DISK_DEVICE} ]; then
    mkdir -p {DISK_MOUNT_POINT}
    if mount -t ext4 {DISK_DEVICE} {DISK_MOUNT_POINT}; then
        mode=$(grep " {DISK_MOUNT_POINT} " /proc/mounts | cut -d " " -f 4 | cut -d , -f 1)
        echo "{DISK_DEVICE} (ext4) is mounted at {DISK_MOUNT_POINT}, $mode"
    else
        echo "{DISK_DEVICE} is not mounted: no ext4 file system on it?"
    fi
else
    echo "no virtio disk ({DISK_DEVICE}): kvm-vmm demo --disk path=FILE gives one"
fi
rng=$(cat {HW_RANDOM_CURRENT} 2>/dev/null)
if [ -n "$rng" ] && [ "$rng" != none ]; then
    echo "/dev/hwrng gives the host's entropy ($rng)"
fi
{network_setup()}{vsock_note()}echo "A busybox shell on ttyS0 (the VMM's 16550A).\
 'exit' powers off; Ctrl-A x quits the VMM."
setsid cttyhack sh
umount {DISK_MOUNT_POINT} 2>/dev/null
poweroff -f
"""


TEST_INIT = f"""#!/bin/sh
# kvm-vmm boot test: report the interrupt routing and the CPUs, then power off.
{_MOUNT_PSEUDO_FILESYSTEMS}echo "{INIT_REACHED_MARKER}"
echo "{TEST_BEGIN_MARKER}"
echo "nproc=$(nproc)"
cat /proc/interrupts
echo "{TEST_FIRMWARE_MARKER}"
dmesg | grep -E '{TEST_FIRMWARE_PATTERN}'
echo "{TEST_END_MARKER}"
poweroff -f
"""


def busybox_initramfs(busybox: bytes, init_script: str, extra: Sequence[CpioEntry] = ()) -> bytes:
    """A newc image: busybox, the links above, /dev/console, and ``init_script`` as /init.

    /dev/console must exist in the image itself: the kernel opens it for
    init's standard streams before any devtmpfs is mounted.
    """
    entries = [
        directory("bin"),
        directory("sbin"),
        directory("dev"),
        directory("proc", 0o555),
        directory("sys", 0o555),
        directory("tmp", 0o1777),
        directory("root", 0o700),
        char_device("dev/console", TTY_MAJOR, CONSOLE_MINOR),
        char_device("dev/null", MEM_MAJOR, NULL_MINOR, 0o666),
        regular_file(BUSYBOX_PATH, busybox, 0o755),
        *(symlink(link, "/" + BUSYBOX_PATH) for link in BUSYBOX_LINKS),
        regular_file("init", init_script.encode(), 0o755),
        *extra,
    ]
    return write_newc(entries)
