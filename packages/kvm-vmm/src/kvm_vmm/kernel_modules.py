"""Linux kernel modules for the default guest: which ones, in which order, as bytes insmod takes.

A Debian kernel package ships its modules without ``modules.dep``: depmod writes
that file when the package is installed. What depmod reads is in each module
already: modpost records the modules a module needs in its ``.modinfo`` section
as ``depends=a,b`` (NUL-separated ``key=value`` strings, scripts/mod/modpost.c),
and ``modules.builtin`` lists what is built into the kernel (nothing to load).
busybox's insmod loads one file as it is, so compressed modules (.ko.xz,
.ko.zst, .ko.gz: CONFIG_MODULE_COMPRESS_*) are decompressed on the host.
"""

from __future__ import annotations

import gzip
import lzma
import re
import struct
from collections.abc import Iterable, Mapping, Sequence

import zstandard

# The virtio transport and the drivers of issue 16 (block, entropy) and of issue 18
# (network, vsock); their dependencies come from the modules themselves.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
    "virtio_net",
    "vmw_vsock_virtio_transport",
)

_MODULE_FILE = re.compile(r"^(?P<stem>[^/]+)\.ko(?P<compression>\.xz|\.zst|\.gz)?$")

# ELF64 little-endian (System V ABI, "ELF Header" and "Sections").
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_E_SHOFF = 0x28
_E_SHENTSIZE = 0x3A  # then e_shnum, e_shstrndx
_SECTION_HEADER = struct.Struct(
    "<IIQQQQ"
)  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
_SHT_NOBITS = 8


class ModuleFormatError(ValueError):
    """A file that is not a kernel module this code can read (the message says why)."""


class ModuleSelectionError(ValueError):
    """A wanted module, or one it depends on, is neither in the package nor built in."""


def module_name(path: str) -> str | None:
    """The name the kernel knows a module file by ('virtio-rng.ko.xz' -> 'virtio_rng');
    None for a file that is not a module. The kernel treats '-' and '_' alike in
    module names and reports them with '_' (scripts/Makefile.lib, modname)."""
    match = _MODULE_FILE.match(path.rsplit("/", 1)[-1])
    return None if match is None else match.group("stem").replace("-", "_")


def decompress_module(path: str, data: bytes) -> bytes:
    """The ELF object a module file holds, decompressed by its suffix."""
    match = _MODULE_FILE.match(path.rsplit("/", 1)[-1])
    if match is None:
        raise ModuleFormatError(f"{path}: not a kernel module file (.ko, .ko.xz, .ko.zst, .ko.gz)")
    compression = match.group("compression")
    try:
        if compression == ".xz":
            data = lzma.decompress(data)
        elif compression == ".zst":
            # The kernel's zstd modules carry the frame's content size only sometimes:
            # a streaming decompress needs none.
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif compression == ".gz":
            data = gzip.decompress(data)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as error:
        raise ModuleFormatError(f"{path}: damaged {compression} data ({error})") from error
    if not data.startswith(_ELF_MAGIC):
        raise ModuleFormatError(f"{path}: not an ELF object after decompression")
    return data


def modinfo(elf: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` strings of a module's .modinfo section, in order."""
    if len(elf) < 0x40 or not elf.startswith(_ELF_MAGIC):
        raise ModuleFormatError("not an ELF object")
    if elf[4] != _ELFCLASS64 or elf[5] != _ELFDATA2LSB:
        raise ModuleFormatError("not a little-endian ELF64 object (an x86-64 module is)")
    (shoff,) = struct.unpack_from("<Q", elf, _E_SHOFF)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, _E_SHENTSIZE)
    if shentsize < _SECTION_HEADER.size or shstrndx >= shnum:
        raise ModuleFormatError("bad section header table")
    if shoff + shnum * shentsize > len(elf):
        raise ModuleFormatError("section header table runs past the end of the file")
    sections = [_SECTION_HEADER.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    names = _section_data(elf, sections[shstrndx])
    for header in sections:
        name_offset = header[0]
        end = names.find(b"\0", name_offset)
        if end >= 0 and names[name_offset:end] == b".modinfo":
            strings = _section_data(elf, header).split(b"\0")
            fields = [s.decode("utf-8", "replace").partition("=") for s in strings if s]
            return [(key, value) for key, _, value in fields]
    raise ModuleFormatError("no .modinfo section: not a kernel module")


def _section_data(elf: bytes, header: tuple[int, int, int, int, int, int]) -> bytes:
    _, kind, _, _, offset, size = header
    if kind == _SHT_NOBITS:
        return b""
    if offset + size > len(elf):
        raise ModuleFormatError("a section runs past the end of the file")
    return elf[offset : offset + size]


def module_depends(elf: bytes) -> tuple[str, ...]:
    """The modules this one needs loaded first (its ``depends=`` entry)."""
    for key, value in modinfo(elf):
        if key == "depends":
            return tuple(name.replace("-", "_") for name in value.split(",") if name)
    return ()


# The appended signature (scripts/sign-file.c): the signature, struct module_signature
# (12 bytes, its sig_len big-endian in the last 4), then this marker.
SIGNATURE_MARKER = b"~Module signature appended~\n"
_SIGNATURE_INFO = struct.Struct(">BBBBB3xI")

# The modern virtio-pci device ID (vendor 0x1af4) each driver module binds: 0x1040 + the
# virtio device type (virtio 1.2 §4.1.2.1, §5); every one also needs the transport.
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_TRANSPORT = "virtio_pci"
DRIVER_PCI_DEVICES = {
    "virtio_net": 0x1041,
    "virtio_blk": 0x1042,
    "virtio_rng": 0x1044,
    "vmw_vsock_virtio_transport": 0x1053,
}


def strip_signature(elf: bytes) -> bytes:
    """The module without its appended signature. A kernel that does not enforce
    signatures (module.sig_enforce off, as Debian's) loads it with a taint, and skips
    the SHA-256 and RSA work, which is seconds of emulated code per module here."""
    if not elf.endswith(SIGNATURE_MARKER):
        return elf
    info_end = len(elf) - len(SIGNATURE_MARKER)
    info_start = info_end - _SIGNATURE_INFO.size
    if info_start < 0:
        raise ModuleFormatError("a signature marker with no signature information")
    *_, signature_length = _SIGNATURE_INFO.unpack_from(elf, info_start)
    end = info_start - signature_length
    if end < len(_ELF_MAGIC) or not elf.startswith(_ELF_MAGIC):
        raise ModuleFormatError("the appended signature is longer than the module")
    return elf[:end]


def driver_modules(modules: Sequence[tuple[str, bytes]]) -> dict[int, list[str]]:
    """For each virtio-pci device ID a driver in ``modules`` (name, ELF, in load order)
    binds: that driver, the virtio-pci transport and what they need, in load order;
    what a guest with that device loads."""
    depends = {name: module_depends(elf) for name, elf in modules}
    order = [name for name, _ in modules]
    needed: dict[int, list[str]] = {}
    for driver, device in DRIVER_PCI_DEVICES.items():
        if driver not in depends:
            continue
        closure: set[str] = set()
        pending = [driver, VIRTIO_PCI_TRANSPORT]
        while pending:
            name = pending.pop()
            if name in closure or name not in depends:
                continue  # built in: nothing to load
            closure.add(name)
            pending.extend(depends[name])
        needed[device] = [name for name in order if name in closure]
    return needed


def builtin_modules(modules_builtin: str) -> frozenset[str]:
    """The names in a ``modules.builtin`` file (one path a line, as modules.order)."""
    names = (module_name(line.strip()) for line in modules_builtin.splitlines())
    return frozenset(name for name in names if name is not None)


def load_order(
    depends: Mapping[str, Sequence[str]],
    wanted: Iterable[str],
    builtin: frozenset[str] = frozenset(),
) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies and once.

    ``depends`` maps every loadable module to the modules it needs; a name that is
    built in needs no loading. The order among independent modules follows
    ``wanted`` and each module's own ``depends`` list, so it is the same every run.
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        if name in done or name in builtin:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ModuleSelectionError(f"modules depend on each other in a cycle: {cycle}")
        if name not in depends:
            by = "" if needed_by is None else f" (needed by {needed_by})"
            raise ModuleSelectionError(f"module {name}{by} is neither in the package nor built in")
        visiting.append(name)
        for dependency in depends[name]:
            visit(dependency, name)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), None)
    return order
