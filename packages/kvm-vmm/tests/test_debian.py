"""The default guest's assets: .deb extraction (deb(5): an ar archive holding
data.tar.*), apt's machine-readable progress (apt.conf(5), APT::Status-Fd),
the cache, and the message for hosts without apt.

apt itself is replaced by small scripts on PATH that behave as apt-get and
apt-cache do; the real download is exercised by the boot tests (tests/boot).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from kvm_vmm.debian import (
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
    resolve_kernel_package,
)

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


KERNEL_FILES = {
    "./boot/config-6.1.0-9-cloud-amd64": b"CONFIG_X86_64=y\n",
    "./boot/vmlinuz-6.1.0-9-cloud-amd64": b"MZ kernel bytes",
    "./lib/modules/6.1.0-9-cloud-amd64/modules.dep": b"",
}


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
    download = fake_apt.read_text().splitlines()[-1].split()
    assert download[0] == "download"
    assert download[-2:] == ["linux-image-6.1.0-9-cloud-amd64", "busybox-static"]
    assert not list((cache / SUBDIRECTORY).glob("**/*.deb"))  # only the two files are kept

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
