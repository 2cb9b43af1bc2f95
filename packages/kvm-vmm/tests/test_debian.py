"""The default guest's assets: .deb extraction (deb(5): an ar archive holding
data.tar.*), the kernel's modules chosen from the package, apt's machine-readable
progress (apt.conf(5), APT::Status-Fd), the cache and its older formats, and the
message for hosts without apt.

apt itself is replaced by small scripts on PATH that behave as apt-get and
apt-cache do; the real download is exercised by the boot tests (tests/boot).
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from test_kernel_modules import DEBIAN_DEPENDS, fake_module

from kvm_vmm.debian import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SUBDIRECTORY,
    AssetsUnavailable,
    DebFormatError,
    ProgressBar,
    apt_download,
    ar_members,
    cached_guest_assets,
    extract_from_deb,
    fetch_guest_assets,
    kernel_from_deb,
    resolve_kernel_package,
)
from kvm_vmm.kernel_modules import GUEST_MODULES, ModuleSelectionError, load_order

KERNEL_MEMBER = re.compile(r"^(\./)?boot/vmlinuz-[^/]+$")


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ar archive in the common format dpkg-deb writes (deb(5))."""
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode() + b"`\n"
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def data_tar(files: dict[str, bytes], compression: str = "xz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    suffix = {"xz": ".xz", "gz": ".gz", "bz2": ".bz2"}[compression]
    return ar_archive(
        [
            ("debian-binary", b"2.0\n"),
            ("control.tar" + suffix, data_tar({"./control": b"Package: x\n"}, compression)),
            ("data.tar" + suffix, data_tar(files, compression)),
        ]
    )


MODULES = "./lib/modules/6.1.0-9-cloud-amd64/"
# Where Debian's package has them; virtio-rng's file name has a dash, its module
# name does not. Two compressed (the kernel's CONFIG_MODULE_COMPRESS_*), ext4 built in.
VSOCK = "kernel/net/vmw_vsock/"
MODULE_FILES = {
    "virtio_ring": "kernel/drivers/virtio/virtio_ring.ko",
    "virtio": "kernel/drivers/virtio/virtio.ko.xz",
    "virtio_pci_legacy_dev": "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "virtio_pci_modern_dev": "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "virtio_pci": "kernel/drivers/virtio/virtio_pci.ko",
    "virtio_blk": "kernel/drivers/block/virtio_blk.ko.zst",
    "virtio_rng": "kernel/drivers/char/hw_random/virtio-rng.ko",
    "failover": "kernel/net/core/failover.ko",
    "net_failover": "kernel/drivers/net/net_failover.ko",
    "virtio_net": "kernel/drivers/net/virtio_net.ko",
    "vsock": VSOCK + "vsock.ko",
    "vmw_vsock_virtio_transport_common": VSOCK + "vmw_vsock_virtio_transport_common.ko",
    "vmw_vsock_virtio_transport": VSOCK + "vmw_vsock_virtio_transport.ko",
    "virtio_console": "kernel/drivers/char/virtio_console.ko",  # not wanted
}
MODULE_OBJECTS = {
    name: fake_module(name, ",".join(DEBIAN_DEPENDS.get(name, ("virtio",))))
    for name in MODULE_FILES
}


def _packed(path: str, data: bytes) -> bytes:
    if path.endswith(".xz"):
        return lzma.compress(data)
    if path.endswith(".zst"):
        return zstandard.compress(data)
    return data


KERNEL_FILES = {
    "./boot/config-6.1.0-9-cloud-amd64": b"CONFIG_X86_64=y\n",
    "./boot/vmlinuz-6.1.0-9-cloud-amd64": b"MZ kernel bytes",
    **{MODULES + path: _packed(path, MODULE_OBJECTS[name]) for name, path in MODULE_FILES.items()},
    MODULES + "modules.builtin": b"kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n",
    MODULES + "modules.order": b"",
}
GUEST_ORDER = load_order(DEBIAN_DEPENDS, GUEST_MODULES)


def test_ar_members_in_order_with_odd_sizes_padded() -> None:
    archive = ar_archive([("a", b"odd"), ("b", b"even"), ("c", b"")])
    assert list(ar_members(archive)) == [("a", b"odd"), ("b", b"even"), ("c", b"")]


def test_gnu_ar_names_end_with_a_slash_that_is_not_part_of_the_name(tmp_path: Path) -> None:
    if shutil.which("ar") is None:
        pytest.skip("GNU ar (binutils) is not installed")
    (tmp_path / "debian-binary").write_bytes(b"2.0\n")
    (tmp_path / "data.tar.xz").write_bytes(data_tar(KERNEL_FILES))
    subprocess.run(["ar", "rc", "x.deb", "debian-binary", "data.tar.xz"], cwd=tmp_path, check=True)
    names = [name for name, _ in ar_members((tmp_path / "x.deb").read_bytes())]
    assert names == ["debian-binary", "data.tar.xz"]


def test_damaged_ar_archives_are_refused() -> None:
    with pytest.raises(DebFormatError, match="not an ar archive"):
        list(ar_members(b"PK\x03\x04"))
    archive = ar_archive([("data.tar.xz", b"x" * 100)])
    with pytest.raises(DebFormatError, match="runs past the end"):
        list(ar_members(archive[:-10]))
    with pytest.raises(DebFormatError, match="header"):
        list(ar_members(archive[:8] + b"garbage" * 10))


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2"])
def test_the_kernel_is_found_in_data_tar(compression: str) -> None:
    name, data = extract_from_deb(deb(KERNEL_FILES, compression), KERNEL_MEMBER)
    assert name == "./boot/vmlinuz-6.1.0-9-cloud-amd64"
    assert data == b"MZ kernel bytes"


def test_zstd_data_tar_as_newer_dpkg_writes_it() -> None:
    raw = data_tar(KERNEL_FILES, "")
    package = ar_archive([("debian-binary", b"2.0\n"), ("data.tar.zst", zstandard.compress(raw))])
    assert extract_from_deb(package, KERNEL_MEMBER)[1] == b"MZ kernel bytes"


def test_dpkg_deb_built_packages_are_read(tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: busybox-static\nVersion: 1\nArchitecture: amd64\n"
        "Maintainer: t <t@t>\nDescription: t\n"
    )
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF busybox")
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(tmp_path / "b.deb")],
        check=True,
        capture_output=True,
    )
    member = re.compile(r"^(\./)?(usr/)?bin/busybox$")
    assert extract_from_deb((tmp_path / "b.deb").read_bytes(), member)[1] == b"\x7fELF busybox"


def test_a_package_without_the_file_says_so() -> None:
    with pytest.raises(DebFormatError, match="no file matching"):
        extract_from_deb(deb({"./usr/share/doc/x": b""}), KERNEL_MEMBER)
    with pytest.raises(DebFormatError, match=r"no data\.tar"):
        extract_from_deb(ar_archive([("debian-binary", b"2.0\n")]), KERNEL_MEMBER)


def test_the_kernel_package_gives_the_kernel_and_the_guest_modules_decompressed() -> None:
    package = kernel_from_deb(deb(KERNEL_FILES))
    assert package.kernel_member == "./boot/vmlinuz-6.1.0-9-cloud-amd64"
    assert package.kernel == b"MZ kernel bytes"
    assert list(package.modules) == GUEST_ORDER
    for name, data in package.modules.items():
        assert data == MODULE_OBJECTS[name]  # .xz and .zst ones decompressed
    assert "virtio_console" not in package.modules


def test_built_in_modules_come_from_modules_builtin() -> None:
    files = {
        "./boot/vmlinuz-6.1.0-9-cloud-amd64": b"MZ",
        MODULES + "kernel/fs/ext4/ext4.ko": fake_module("ext4", "mbcache,jbd2,crc16"),
        MODULES + "kernel/fs/jbd2/jbd2.ko": fake_module("jbd2"),
        MODULES + "modules.builtin": b"kernel/fs/mbcache.ko\nkernel/lib/crc16.ko\n",
    }
    assert list(kernel_from_deb(deb(files), ["ext4"]).modules) == ["jbd2", "ext4"]
    del files[MODULES + "modules.builtin"]
    with pytest.raises(ModuleSelectionError, match=r"mbcache \(needed by ext4\)"):
        kernel_from_deb(deb(files), ["ext4"])


# -- apt, replaced by scripts that answer as it does ---------------------------------------


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """apt-cache and apt-get that know linux-image-cloud-amd64 and busybox-static."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    debs = tmp_path / "debs"
    debs.mkdir()
    (debs / "linux-image-6.1.0-9-cloud-amd64_6.1.1-1_amd64.deb").write_bytes(deb(KERNEL_FILES))
    (debs / "busybox-static_1%3a1.35.0-4_amd64.deb").write_bytes(
        deb({"./bin/busybox": b"\x7fELF busybox"})
    )
    fake_tool(
        bin_dir,
        "apt-cache",
        'echo "$@" >> "$CALLS"\n'
        'echo "linux-image-cloud-amd64"\n'
        'echo "  Depends: linux-image-6.1.0-9-cloud-amd64"\n',
    )
    # As apt-get does with -o APT::Status-Fd=N: dlstatus lines on fd N, files in the cwd.
    fake_tool(
        bin_dir,
        "apt-get",
        'echo "$@" >> "$CALLS"\n'
        'fd=$(echo "$@" | sed -n "s/.*APT::Status-Fd=\\([0-9]*\\).*/\\1/p")\n'
        "echo dlstatus:1:0.0000:Retrieving file 1 of 2 > /dev/fd/$fd\n"
        "echo dlstatus:1:50.0000:Retrieving file 2 of 2 > /dev/fd/$fd\n"
        "echo dlstatus:1:100.0000:Retrieving file 2 of 2 > /dev/fd/$fd\n"
        f"cp {debs}/*.deb .\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    return tmp_path / "calls"


def test_the_metapackage_resolves_to_its_concrete_kernel(fake_apt: Path) -> None:
    assert resolve_kernel_package() == "linux-image-6.1.0-9-cloud-amd64"
    assert resolve_kernel_package("linux-image-6.1.0-9-cloud-amd64").endswith("cloud-amd64")


def test_download_reports_apt_progress(fake_apt: Path, tmp_path: Path) -> None:
    seen: list[tuple[float, str]] = []
    target = tmp_path / "target"
    target.mkdir()
    debs = apt_download(
        ["busybox-static"], target, lambda fraction, what: seen.append((fraction, what))
    )
    assert [fraction for fraction, _ in seen] == [0.0, 0.5, 1.0]
    assert seen[-1][1] == "Retrieving file 2 of 2"
    assert {path.name for path in debs} >= {"busybox-static_1%3a1.35.0-4_amd64.deb"}


def test_first_fetch_extracts_and_caches_then_apt_is_not_asked_again(
    fake_apt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assets = fetch_guest_assets(cache)
    assert assets.kernel.read_bytes() == b"MZ kernel bytes"
    assert assets.kernel.name == "vmlinuz-6.1.0-9-cloud-amd64"
    assert assets.busybox.read_bytes() == b"\x7fELF busybox"
    assert assets.busybox.stat().st_mode & 0o111
    assert assets.busybox_package == "busybox-static_1:1.35.0-4_amd64"
    assert [path.name for path in assets.modules] == [f"{name}.ko" for name in GUEST_ORDER]
    for path in assets.modules:
        assert path.read_bytes() == MODULE_OBJECTS[path.stem]
    download = fake_apt.read_text().splitlines()[-1].split()
    assert download[0] == "download"
    assert download[-2:] == ["linux-image-6.1.0-9-cloud-amd64", "busybox-static"]
    assert not list((cache / SUBDIRECTORY).glob("**/*.deb"))  # only what the guest uses is kept

    fake_apt.write_text("")
    assert fetch_guest_assets(cache) == assets
    assert cached_guest_assets(cache) == assets
    assert fake_apt.read_text() == ""


def test_a_damaged_manifest_means_fetching_again(fake_apt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / SUBDIRECTORY).mkdir(parents=True)
    (cache / SUBDIRECTORY / MANIFEST_NAME).write_text(json.dumps({"kernel": 3}))
    assert cached_guest_assets(cache) is None
    assert fetch_guest_assets(cache).kernel.is_file()


def _format_1_cache(cache: Path) -> Path:
    """A cache as kvm-vmm left it before it kept modules: kernel and busybox only."""
    directory = cache / SUBDIRECTORY
    (directory / "linux-old").mkdir(parents=True)
    (directory / "linux-old/vmlinuz-6.1.0-8-cloud-amd64").write_bytes(b"MZ old kernel")
    (directory / "busybox-static_1%3a1.35.0-4_amd64").mkdir()
    (directory / "busybox-static_1%3a1.35.0-4_amd64/busybox").write_bytes(b"\x7fELF kept")
    manifest = {
        "kernel": "linux-old/vmlinuz-6.1.0-8-cloud-amd64",
        "busybox": "busybox-static_1%3a1.35.0-4_amd64/busybox",
        "kernel_package": "linux-image-6.1.0-8-cloud-amd64_6.1.0-1_amd64",
        "busybox_package": "busybox-static_1:1.35.0-4_amd64",
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def test_a_cache_without_modules_fetches_only_the_kernel_again_and_says_why(
    fake_apt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    directory = _format_1_cache(cache)
    assert cached_guest_assets(cache) is None
    seen: list[str] = []
    assets = fetch_guest_assets(cache, lambda _, what: seen.append(what))
    assert "has no kernel modules" in seen[0] and str(directory / MANIFEST_NAME) in seen[0]
    download = fake_apt.read_text().splitlines()[-1].split()
    assert download[0] == "download" and download[-1] == "linux-image-6.1.0-9-cloud-amd64"
    assert "busybox-static" not in download
    assert assets.busybox.read_bytes() == b"\x7fELF kept"
    assert assets.busybox_package == "busybox-static_1:1.35.0-4_amd64"
    assert assets.kernel.read_bytes() == b"MZ kernel bytes"
    assert [path.stem for path in assets.modules] == GUEST_ORDER
    assert json.loads((directory / MANIFEST_NAME).read_text())["format"] == MANIFEST_FORMAT
    assert cached_guest_assets(cache) == assets


def test_a_manifest_of_another_format_is_not_read_as_this_one(
    fake_apt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    fetch_guest_assets(cache)
    manifest = cache / SUBDIRECTORY / MANIFEST_NAME
    fields = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**fields, "format": MANIFEST_FORMAT + 1}))
    assert cached_guest_assets(cache) is None


def test_a_module_file_gone_from_the_cache_means_fetching_again(
    fake_apt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assets = fetch_guest_assets(cache)
    assets.modules[0].unlink()
    assert cached_guest_assets(cache) is None
    seen: list[str] = []
    assert fetch_guest_assets(cache, lambda _, what: seen.append(what)) == assets
    assert "missing files" in seen[0]


def test_a_kernel_package_without_the_virtio_modules_says_what_to_pass(
    fake_apt: Path, tmp_path: Path
) -> None:
    debs = fake_apt.parent / "debs"
    files = {name: data for name, data in KERNEL_FILES.items() if "virtio_blk" not in name}
    (debs / "linux-image-6.1.0-9-cloud-amd64_6.1.1-1_amd64.deb").write_bytes(deb(files))
    with pytest.raises(AssetsUnavailable, match=r"virtio_blk is neither.*--kernel PATH"):
        fetch_guest_assets(tmp_path / "cache")


def test_without_apt_the_message_says_to_pass_a_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AssetsUnavailable, match="--kernel PATH"):
        fetch_guest_assets(tmp_path / "cache")


def test_a_failing_download_says_what_apt_said(fake_apt: Path, tmp_path: Path) -> None:
    bin_dir = fake_apt.parent / "bin"
    fake_tool(
        bin_dir, "apt-get", "echo 'E: Unable to locate package busybox-static' >&2\nexit 100\n"
    )
    with pytest.raises(AssetsUnavailable, match=r"Unable to locate package.*--kernel PATH"):
        fetch_guest_assets(tmp_path / "cache")


def test_progress_bar_on_a_pipe_says_what_it_does_once() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(0.0, "Retrieving file 1 of 2")
    bar(0.5, "Retrieving file 2 of 2")
    bar.finish()
    assert stream.getvalue() == "Retrieving file 1 of 2\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_the_first_message_whole_then_the_bar() -> None:
    stream = Terminal()
    bar = ProgressBar(stream, width=4)
    why = "the cached default guest has no kernel modules: fetching its kernel package again"
    bar(0.0, why)
    bar(0.5, "Retrieving file 2 of 2")
    bar.finish()
    lines = stream.getvalue().split("\n")
    assert lines[0] == why
    assert lines[1].endswith("\r[##--]  50.0% " + f"{'Retrieving file 2 of 2':<40}")
