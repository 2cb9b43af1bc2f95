"""The newc cpio writer, checked against the kernel's buffer format
(Documentation/driver-api/early-userspace/buffer-format.rst) and, where it is
installed, against GNU cpio reading our archives."""

from __future__ import annotations

import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from kvm_vmm.initramfs import (
    BUSYBOX_PATH,
    HEADER_SIZE,
    HW_RANDOM_CURRENT,
    MODULE_FAILED_MARKER,
    TEST_BEGIN_MARKER,
    TEST_END_MARKER,
    TEST_INIT,
    TRAILER_NAME,
    CpioEntry,
    CpioFormatError,
    busybox_initramfs,
    char_device,
    demo_init,
    directory,
    load_modules,
    module_entries,
    read_newc,
    regular_file,
    symlink,
    write_newc,
)
from kvm_vmm.kernel_modules import SIGNATURE_MARKER

ENTRIES = [
    directory("bin"),
    regular_file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
    regular_file("empty", b""),
    regular_file("odd", b"abc"),  # data needing padding
    symlink("bin/sh", "/bin/busybox"),
    char_device("console", 5, 1),
    regular_file("a/name-of-several-lengths", b"x" * 4097),
]


def _fields(archive: bytes, offset: int) -> list[int]:
    header = archive[offset : offset + HEADER_SIZE]
    return [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]


def test_buffer_format_header_fields_and_four_byte_alignment() -> None:
    """buffer-format.rst: "070701", 13 hex fields, name then data each padded to 4 bytes."""
    archive = write_newc([regular_file("odd", b"abc", 0o640)])
    assert archive[:6] == b"070701"
    fields = _fields(archive, 0)
    assert fields[1] == stat.S_IFREG | 0o640  # c_mode
    assert fields[4] == 1  # c_nlink
    assert fields[6] == 3  # c_filesize
    assert fields[11] == len(b"odd\0")  # c_namesize counts the NUL
    name_end = HEADER_SIZE + fields[11]
    data_start = name_end + (-name_end % 4)
    assert data_start % 4 == 0
    assert archive[HEADER_SIZE:name_end] == b"odd\0"
    assert archive[data_start : data_start + 3] == b"abc"
    trailer = data_start + 4  # 3 data bytes + 1 pad
    assert archive[trailer : trailer + 6] == b"070701"
    assert TRAILER_NAME.encode() in archive[trailer:]
    assert len(archive) % 4 == 0


def test_every_entry_reads_back_unchanged() -> None:
    assert read_newc(write_newc(ENTRIES)) == ENTRIES


def test_entries_get_distinct_inodes_so_none_become_hard_links() -> None:
    """buffer-format.rst: entries sharing c_ino (and c_nlink > 1) are hard links."""
    archive = write_newc([regular_file("a", b"1"), regular_file("b", b"2")])
    second = HEADER_SIZE + 2 + 4  # "a\0" ends aligned at 112; one data byte padded to 4
    assert _fields(archive, 0)[0] != _fields(archive, second)[0]


def test_device_numbers_are_in_rdev_fields() -> None:
    archive = write_newc([char_device("dev/console", 5, 1)])
    fields = _fields(archive, 0)
    assert stat.S_ISCHR(fields[1])
    assert (fields[9], fields[10]) == (5, 1)  # c_rdevmajor, c_rdevminor


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([regular_file("/init", b"")], "relative"),
        ([regular_file("", b"")], "empty"),
        ([regular_file("a\0b", b"")], "NUL"),
        ([regular_file("x", b""), regular_file("x", b"")], "twice"),
        ([CpioEntry("d", stat.S_IFDIR | 0o755, b"data")], "carry data"),
        ([CpioEntry("f", stat.S_IFREG | 0o644, uid=-1)], "uid"),
    ],
)
def test_entries_the_kernel_would_misread_are_refused(
    entries: list[CpioEntry], message: str
) -> None:
    with pytest.raises(CpioFormatError, match=message):
        write_newc(entries)


def test_damaged_archives_are_reported_not_misread() -> None:
    archive = write_newc(ENTRIES)
    with pytest.raises(CpioFormatError, match="magic"):
        read_newc(b"070707" + archive[6:])
    with pytest.raises(CpioFormatError):
        read_newc(archive[: len(archive) // 2])
    with pytest.raises(CpioFormatError, match="hex"):
        read_newc(archive[:6] + b"zzzzzzzz" + archive[14:])


def test_busybox_image_has_init_console_and_links() -> None:
    busybox = b"\x7fELF fake busybox"
    entries = {entry.path: entry for entry in read_newc(busybox_initramfs(busybox, TEST_INIT))}
    init = entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    assert init.data.decode() == TEST_INIT
    assert entries[BUSYBOX_PATH].data == busybox
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert entries["bin/sh"].data == b"/bin/busybox"
    # Directories come before what they hold: the kernel creates entries in order.
    order = list(entries)
    assert order.index("bin") < order.index(BUSYBOX_PATH)


def test_init_scripts_do_what_the_boot_tests_and_demo_need() -> None:
    needed = {0x1042: ["virtio_ring", "virtio"]}
    for script in (TEST_INIT, demo_init([], {}), demo_init(["virtio_ring", "virtio"], needed)):
        assert script.startswith("#!/bin/sh\n")
        assert "mount -t proc proc /proc" in script
        assert script.rstrip().endswith("poweroff -f")
    begin, end = TEST_INIT.index(TEST_BEGIN_MARKER), TEST_INIT.index(TEST_END_MARKER)
    assert begin < TEST_INIT.index("cat /proc/interrupts") < end
    assert "nproc" in TEST_INIT[begin:end]


def test_modules_go_to_lib_modules_under_their_names_without_their_signatures() -> None:
    signature = b"RSA" * 10 + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 30) + SIGNATURE_MARKER
    entries = module_entries(
        [("virtio_ring", b"\x7fELF ring" + signature), ("virtio", b"\x7fELF virtio")]
    )
    image = {e.path: e for e in read_newc(busybox_initramfs(b"bb", demo_init([], {}), entries))}
    assert image["lib/modules/virtio_ring.ko"].data == b"\x7fELF ring"
    assert image["lib/modules/virtio.ko"].data == b"\x7fELF virtio"
    assert stat.S_ISDIR(image["lib/modules"].mode)
    with pytest.raises(CpioFormatError, match="module name"):
        module_entries([("a;reboot", b"")])
    with pytest.raises(CpioFormatError, match="module name"):
        load_modules(["$(reboot)"], {})
    with pytest.raises(CpioFormatError, match="module name"):
        load_modules(["virtio"], {0x1042: ["$(reboot)"]})


def test_modules_load_in_order_and_each_failure_is_one_line(tmp_path: Path) -> None:
    """The script's loop run by the host's sh over a fake sysfs with a virtio-blk
    function, insmod replaced by one that fails for virtio_pci as busybox's does (its
    message on stderr, status 1): what the disk needs loads, in order; the network
    driver, whose device is absent, does not."""
    calls = tmp_path / "calls"
    insmod = tmp_path / "insmod"
    insmod.write_text(
        f'#!/bin/sh\necho "$1" >> {calls}\n'
        'case "$1" in *virtio_pci.ko) echo "insmod: can\'t insert \'$1\': No such device" >&2; '
        "exit 1;; esac\n"
    )
    insmod.chmod(0o755)
    devices = tmp_path / "devices"
    for name, vendor, device in (
        ("0000:00:01.0", "0x8086", "0x1042"),
        ("0000:00:02.0", "0x1af4", "0x1042"),
    ):
        (devices / name).mkdir(parents=True)
        (devices / name / "vendor").write_text(vendor + "\n")
        (devices / name / "device").write_text(device + "\n")
    names = ["virtio_ring", "virtio", "virtio_pci", "virtio_blk", "failover", "virtio_net"]
    needed = {
        0x1042: ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"],
        0x1041: ["virtio_ring", "virtio", "virtio_pci", "failover", "virtio_net"],
    }
    result = subprocess.run(
        ["sh", "-c", load_modules(names, needed, str(devices))],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert calls.read_text().split() == [f"/lib/modules/{name}.ko" for name in names[:4]]
    assert result.stdout.splitlines() == [
        f"{MODULE_FAILED_MARKER} virtio_pci: insmod: can't insert "
        "'/lib/modules/virtio_pci.ko': No such device"
    ]
    assert result.stderr == ""
    assert load_modules([], {}) == ""


def test_a_guest_without_virtio_devices_loads_no_module(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    insmod = tmp_path / "insmod"
    insmod.write_text(f'#!/bin/sh\necho "$1" >> {calls}\n')
    insmod.chmod(0o755)
    script = load_modules(["virtio_ring"], {0x1042: ["virtio_ring"]}, str(tmp_path / "none"))
    subprocess.run(["sh", "-c", script], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, check=True)
    assert not calls.exists()


def test_the_demo_loads_modules_before_it_mounts_the_disk_and_unmounts_before_power_off() -> None:
    script = demo_init(["virtio_ring", "virtio_blk"], {0x1042: ["virtio_ring", "virtio_blk"]})
    assert "for module in virtio_ring virtio_blk; do" in script
    load, mount = script.index("insmod"), script.index("mount -t ext4 /dev/vda /mnt")
    assert script.index("[ -b /dev/vda ]") < mount and load < mount
    assert mount < script.index("setsid cttyhack sh") < script.index("umount /mnt")
    assert script.index("umount /mnt") < script.index("poweroff -f")
    # /dev/hwrng exists without virtio-rng (the hw_random core is built in): the
    # demo names it only when a driver is current.
    assert "[ -c /dev/hwrng ]" not in script
    assert f"rng=$(cat {HW_RANDOM_CURRENT} 2>/dev/null)" in script
    assert '[ "$rng" != none ]' in script


cpio_tool = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")


@cpio_tool
def test_gnu_cpio_lists_our_archive(tmp_path: Path) -> None:
    archive = tmp_path / "image.cpio"
    archive.write_bytes(write_newc(ENTRIES))
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"],
        stdin=archive.open("rb"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout.split() == [entry.path for entry in ENTRIES]


@cpio_tool
def test_gnu_cpio_extracts_contents_modes_and_link_targets(tmp_path: Path) -> None:
    archive = tmp_path / "image.cpio"
    archive.write_bytes(write_newc([e for e in ENTRIES if not stat.S_ISCHR(e.mode)]))
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        stdin=archive.open("rb"),
        cwd=root,
        check=True,
    )
    assert (root / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (root / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (root / "odd").read_bytes() == b"abc"
    assert (root / "a/name-of-several-lengths").stat().st_size == 4097
    assert (root / "bin/sh").readlink() == Path("/bin/busybox")


@cpio_tool
def test_we_read_what_gnu_cpio_writes(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/file").write_bytes(b"12345")
    (tmp_path / "link").symlink_to("dir/file")
    written = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=b"dir\ndir/file\nlink\n",
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    entries = {entry.path: entry for entry in read_newc(written.stdout)}
    assert entries["dir/file"].data == b"12345"
    assert stat.S_ISDIR(entries["dir"].mode)
    assert stat.S_ISLNK(entries["link"].mode) and entries["link"].data == b"dir/file"
