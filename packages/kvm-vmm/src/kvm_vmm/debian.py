"""The default guest's files: Debian's cloud kernel, its virtio modules and a static
busybox, fetched once.

``apt-get download`` fetches the packages (no root needed, nothing installed);
the files are taken out of the .deb archives in pure Python: a .deb is an
``ar`` archive (deb(5)) whose ``data.tar.{xz,gz,bz2,zst}`` member holds the
package's files. Only the kernel (``/boot/vmlinuz-*``), the modules the guest
loads for its virtio devices (kvm_vmm.kernel_modules: GUEST_MODULES and what
they depend on, decompressed) and ``busybox`` are kept, under the user's cache
directory, with a manifest naming them: later runs read the manifest and never
call apt again. A manifest of an older format (no modules) means fetching the
kernel package again.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from kvm_vmm.kernel_modules import (
    GUEST_MODULES,
    ModuleFormatError,
    ModuleSelectionError,
    builtin_modules,
    decompress_module,
    load_order,
    module_depends,
    module_name,
)

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MANIFEST_NAME = "assets.json"
# 1: kernel and busybox (no "format" key); 2: and the kernel's modules.
MANIFEST_FORMAT = 2
SUBDIRECTORY = "debian"
MODULES_DIRECTORY = "modules"  # beside the kernel, one <name>.ko each

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60
AR_FILE_MAGIC = b"`\n"

_KERNEL_MEMBER = re.compile(r"^(\./)?boot/vmlinuz-[^/]+$")
_BUSYBOX_MEMBER = re.compile(r"^(\./)?(usr/)?bin/busybox$")
_MODULES_ROOT = r"^(\./)?(usr/)?lib/modules/[^/]+/"
_MODULE_MEMBER = re.compile(_MODULES_ROOT + r"kernel/.+\.ko(\.xz|\.zst|\.gz)?$")
_BUILTIN_MEMBER = re.compile(_MODULES_ROOT + r"modules\.builtin$")
_CONCRETE_KERNEL = re.compile(r"^linux-image-\d[^ ]*-cloud-amd64$")
_DEPENDS_LINE = re.compile(r"^\s*\|?Depends:\s*(\S+)\s*$")
# apt's machine-readable progress: "dlstatus:<item>:<percent>:<description>".
_DLSTATUS = re.compile(r"^dlstatus:[^:]*:([0-9.]+):(.*)$")

ProgressCallback = Callable[[float, str], None]  # fraction done 0..1, what is happening


class AssetsUnavailable(RuntimeError):
    """The default guest's files cannot be had here; the message says what to do instead."""


class DebFormatError(ValueError):
    """A .deb that is not an ar archive with a data.tar member holding the wanted file."""


@dataclass(frozen=True)
class GuestAssets:
    """Where the default guest's kernel, its modules and busybox are, and which packages
    they came from. ``modules``: each after the modules it needs (insmod's order)."""

    kernel: Path
    busybox: Path
    kernel_package: str
    busybox_package: str
    modules: tuple[Path, ...]


@dataclass(frozen=True)
class KernelPackage:
    """What the guest takes from a kernel package: the kernel, and its modules by name
    in load order (decompressed ELF objects)."""

    kernel_member: str
    kernel: bytes
    modules: dict[str, bytes]


# -- .deb archives ------------------------------------------------------------------


def ar_members(archive: bytes) -> Iterator[tuple[str, bytes]]:
    """The (name, data) members of a common-format ``ar`` archive, in order."""
    if not archive.startswith(AR_MAGIC):
        raise DebFormatError("not an ar archive (a .deb starts with '!<arch>\\n')")
    offset = len(AR_MAGIC)
    while offset < len(archive):
        header = archive[offset : offset + AR_HEADER_SIZE]
        if len(header) < AR_HEADER_SIZE or header[58:60] != AR_FILE_MAGIC:
            raise DebFormatError(f"ar archive: bad member header at offset {offset}")
        name = header[:16].decode("ascii", "replace").rstrip()
        # GNU ar ends names with '/'; dpkg writes them without.
        name = name.removesuffix("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as error:
            raise DebFormatError(f"ar archive: bad size of member {name!r}") from error
        start = offset + AR_HEADER_SIZE
        if start + size > len(archive):
            raise DebFormatError(f"ar archive: member {name!r} runs past the end")
        yield name, archive[start : start + size]
        offset = start + size + (size & 1)  # members are 2-byte aligned


def _open_data_tar(name: str, data: bytes) -> tarfile.TarFile:
    stream: IO[bytes] = io.BytesIO(data)
    if name.endswith(".zst"):
        reader = zstandard.ZstdDecompressor().stream_reader(stream)
        return tarfile.open(fileobj=reader, mode="r|")
    modes = {".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2", ".tar": "r|"}
    suffix = name[name.rfind(".") :]
    if suffix not in modes:
        raise DebFormatError(f"data member {name!r}: unknown compression")
    return tarfile.open(fileobj=stream, mode=modes[suffix])  # type: ignore[call-overload,no-any-return]


def _data_members(deb: bytes) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    """The members of the package's data.tar in archive order, with a reader for
    regular files. The tar is a stream: a reader is good until the next member."""
    for name, data in ar_members(deb):
        if not name.startswith("data.tar"):
            continue
        with _open_data_tar(name, data) as tar:
            for info in tar:
                yield info, tar.extractfile(info) if info.isfile() else None
        return
    raise DebFormatError("the package has no data.tar member")


def extract_from_deb(deb: bytes, member: re.Pattern[str]) -> tuple[str, bytes]:
    """The first regular file in the package's data whose path matches ``member``.

    The tar is read as a stream and left at the first match: the kernel sits
    in /boot, near the start, so the package's modules are never decompressed.
    """
    for info, reader in _data_members(deb):
        if member.match(info.name):
            if reader is None:
                raise DebFormatError(f"{info.name} in the package is not a regular file")
            return info.name, reader.read()
    raise DebFormatError(f"no file matching {member.pattern!r} in the package")


def kernel_from_deb(deb: bytes, wanted: Sequence[str] = GUEST_MODULES) -> KernelPackage:
    """The kernel of a linux-image package and the modules ``wanted`` needs loaded.

    Two passes over the stream: the first reads every module's dependencies (the
    package has no modules.dep: depmod writes it at installation) and which are
    built in; the second keeps only the modules chosen, so memory holds those.
    """
    kernel: tuple[str, bytes] | None = None
    builtin: frozenset[str] = frozenset()
    members: dict[str, str] = {}
    depends: dict[str, tuple[str, ...]] = {}
    for info, reader in _data_members(deb):
        if reader is None:
            continue
        if kernel is None and _KERNEL_MEMBER.match(info.name):
            kernel = info.name, reader.read()
        elif _BUILTIN_MEMBER.match(info.name):
            builtin = builtin_modules(reader.read().decode("utf-8", "replace"))
        elif _MODULE_MEMBER.match(info.name):
            name = module_name(info.name)
            if name is not None and name not in members:
                members[name] = info.name
                depends[name] = module_depends(decompress_module(info.name, reader.read()))
    if kernel is None:
        raise DebFormatError(f"no file matching {_KERNEL_MEMBER.pattern!r} in the package")
    order = load_order(depends, wanted, builtin)
    chosen = {members[name]: name for name in order}
    found: dict[str, bytes] = {}
    for info, reader in _data_members(deb):
        if reader is not None and info.name in chosen:
            found[chosen[info.name]] = decompress_module(info.name, reader.read())
    return KernelPackage(kernel[0], kernel[1], {name: found[name] for name in order})


# -- apt ----------------------------------------------------------------------------


def _apt_sandbox_options() -> list[str]:
    # apt downloads as the unprivileged _apt user, which cannot write into
    # root's cache directory: it warns and downloads as root anyway.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """The concrete linux-image-<abi>-cloud-amd64 package the metapackage depends on."""
    if _CONCRETE_KERNEL.match(metapackage):
        return metapackage
    result = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", metapackage],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssetsUnavailable(
            f"apt-cache does not know {metapackage} ({result.stderr.strip()}); "
            "run 'apt-get update', or pass --kernel PATH"
        )
    for line in result.stdout.splitlines():
        match = _DEPENDS_LINE.match(line)
        if match and _CONCRETE_KERNEL.match(match.group(1)):
            return match.group(1)
    raise AssetsUnavailable(
        f"{metapackage} depends on no linux-image-*-cloud-amd64 package here; pass --kernel PATH"
    )


def apt_download(
    packages: list[str], directory: Path, progress: ProgressCallback | None = None
) -> list[Path]:
    """``apt-get download`` the packages into ``directory``; the .deb files it wrote."""
    status_read, status_write = os.pipe()
    command = [
        "apt-get",
        "download",
        "-o",
        f"APT::Status-Fd={status_write}",
        *_apt_sandbox_options(),
        *packages,
    ]
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(
                command,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=(status_write,),
            )
        finally:
            os.close(status_write)
        with open(status_read, encoding="utf-8", errors="replace") as status:
            for line in status:
                match = _DLSTATUS.match(line.strip())
                if match and progress is not None:
                    progress(min(float(match.group(1)) / 100, 1.0), match.group(2))
        returncode = process.wait()
        errors.seek(0)
        message = errors.read().decode(errors="replace").strip()
    if returncode != 0:
        raise AssetsUnavailable(
            f"apt-get download {' '.join(packages)} failed: {message or f'status {returncode}'}; "
            "pass --kernel PATH (and --initrd PATH) to boot files of your own"
        )
    return sorted(directory.glob("*.deb"))


# -- the cache ----------------------------------------------------------------------


def _manifest_fields(directory: Path) -> dict[str, object] | None:
    try:
        fields = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return fields if isinstance(fields, dict) else None


def _read_manifest(directory: Path) -> GuestAssets | None:
    fields = _manifest_fields(directory)
    if fields is None or fields.get("format") != MANIFEST_FORMAT:
        return None
    try:
        modules = fields["modules"]
        if not isinstance(modules, list):
            return None
        assets = GuestAssets(
            kernel=directory / str(fields["kernel"]),
            busybox=directory / str(fields["busybox"]),
            kernel_package=str(fields["kernel_package"]),
            busybox_package=str(fields["busybox_package"]),
            modules=tuple(directory / str(module) for module in modules),
        )
    except KeyError:
        return None
    files = (assets.kernel, assets.busybox, *assets.modules)
    return assets if all(path.is_file() for path in files) else None


def _cached_busybox(directory: Path) -> tuple[Path, str] | None:
    """The busybox an older or partial cache already holds, and its package."""
    fields = _manifest_fields(directory)
    if fields is None or "busybox" not in fields or "busybox_package" not in fields:
        return None
    busybox = directory / str(fields["busybox"])
    return (busybox, str(fields["busybox_package"])) if busybox.is_file() else None


def _why_fetch(directory: Path) -> str:
    """What a fetch says first: a first download, or why the cache is fetched again."""
    fields = _manifest_fields(directory)
    if fields is None:
        return "fetching the default guest's kernel and busybox"
    if fields.get("format", 1) != MANIFEST_FORMAT:
        return (
            f"the cached default guest ({directory / MANIFEST_NAME}) has no kernel modules: "
            "fetching its kernel package again for its virtio modules"
        )
    return f"the cached default guest ({directory}) is missing files: fetching them again"


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _package_of(debs: list[Path], name: str) -> Path:
    for deb in debs:
        if deb.name.startswith(name + "_"):
            return deb
    raise AssetsUnavailable(f"apt-get download did not produce {name}_*.deb")


def cached_guest_assets(cache_dir: Path) -> GuestAssets | None:
    """The assets fetched by an earlier run, if they are all still there."""
    return _read_manifest(cache_dir / SUBDIRECTORY)


def fetch_guest_assets(cache_dir: Path, progress: ProgressCallback | None = None) -> GuestAssets:
    """The default guest's kernel, modules and busybox: from the cache, else fetched
    with apt. The first progress report says why a fetch happens (an older cache)."""
    directory = cache_dir / SUBDIRECTORY
    cached = _read_manifest(directory)
    if cached is not None:
        return cached
    if shutil.which("apt-get") is None or shutil.which("apt-cache") is None:
        raise AssetsUnavailable(
            "the default guest is Debian's cloud kernel, fetched with apt-get, and this host "
            "has no apt: pass --kernel PATH (a bzImage or vmlinux) and --initrd PATH"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # Two runs fetching at once (parallel boot tests, two demos): one downloads, the
    # other waits for it and reads its manifest.
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_manifest(directory)
        if cached is not None:
            return cached
        if progress is not None:
            progress(0.0, _why_fetch(directory))
        return _download_assets(directory, progress)


def _download_assets(directory: Path, progress: ProgressCallback | None) -> GuestAssets:
    kernel_package = resolve_kernel_package()
    busybox = _cached_busybox(directory)  # an older cache's busybox is still good
    packages = [kernel_package] if busybox is not None else [kernel_package, BUSYBOX_PACKAGE]
    with tempfile.TemporaryDirectory(dir=directory, prefix="download-") as scratch:
        debs = apt_download(packages, Path(scratch), progress)
        kernel_deb = _package_of(debs, kernel_package)
        try:
            kernel = kernel_from_deb(kernel_deb.read_bytes())
        except (ModuleFormatError, ModuleSelectionError) as error:
            raise AssetsUnavailable(
                f"{kernel_deb.name} cannot give the default guest its virtio modules "
                f"({error}); pass --kernel PATH and --initrd PATH"
            ) from error
        if busybox is None:
            busybox_deb = _package_of(debs, BUSYBOX_PACKAGE)
            _, busybox_bytes = extract_from_deb(busybox_deb.read_bytes(), _BUSYBOX_MEMBER)
            busybox_file = Path(busybox_deb.stem) / "busybox"
            _write_atomically(directory / busybox_file, busybox_bytes, 0o755)
            # apt names files name_version_arch.deb with the epoch's ':' as '%3a'.
            busybox = directory / busybox_file, urllib.parse.unquote(busybox_deb.stem)
    kernel_file = Path(kernel_deb.stem) / Path(kernel.kernel_member).name
    _write_atomically(directory / kernel_file, kernel.kernel)
    module_files = [
        Path(kernel_deb.stem) / MODULES_DIRECTORY / f"{name}.ko" for name in kernel.modules
    ]
    for module_file, data in zip(module_files, kernel.modules.values(), strict=True):
        _write_atomically(directory / module_file, data)
    manifest = {
        "format": MANIFEST_FORMAT,
        "kernel": str(kernel_file),
        "busybox": str(busybox[0].relative_to(directory)),
        "kernel_package": urllib.parse.unquote(kernel_deb.stem),
        "busybox_package": busybox[1],
        "modules": [str(path) for path in module_files],
    }
    _write_atomically(directory / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return GuestAssets(
        directory / kernel_file,
        busybox[0],
        urllib.parse.unquote(kernel_deb.stem),
        busybox[1],
        tuple(directory / path for path in module_files),
    )


# -- progress on a terminal ---------------------------------------------------------


@dataclass
class ProgressBar:
    """The first message whole on its own line (it says what is fetched, and why),
    then on a terminal a one-line bar; on anything else nothing more."""

    stream: IO[str]
    width: int = 30
    _shown: bool = False

    def __call__(self, fraction: float, description: str) -> None:
        if not self._shown:
            self.stream.write(f"{description}\n")
        if self.stream.isatty():
            filled = round(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {description[:40]:<40}")
            self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def default_progress() -> ProgressBar:
    return ProgressBar(sys.stderr)
