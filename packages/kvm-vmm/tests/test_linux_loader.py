"""The Linux loader against Documentation/arch/x86/boot.rst (setup header, "64-bit Boot
Protocol", "Details of Header Fields") and zero-page.rst, with bzImages and vmlinux ELFs
built here. Distribution kernels are loaded too: the default guest's Debian cloud kernel
(from the kvm-vmm cache, fetched with apt-get the first time) or the file named by
$KVM_VMM_TEST_KERNEL, and any /boot/vmlinuz-*."""

from __future__ import annotations

import bz2
import gzip
import importlib
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from kvm_vmm import layout
from kvm_vmm.debian import AssetsUnavailable, fetch_guest_assets
from kvm_vmm.e820 import e820_map
from kvm_vmm.loaders import (
    BootFileError,
    CommandLineError,
    DecompressionError,
    ImageFormatError,
    LoadedImage,
    MissingDecompressorError,
    PlacementError,
    TruncatedImageError,
    UnsupportedImageError,
    default_cache_dir,
    kernel_cache,
    load_kernel,
    load_linux,
    load_linux_image,
)
from kvm_vmm.loaders.decompress import decompress_payload, identify_compression
from kvm_vmm.loaders.linux_header import parse_setup_header
from kvmfast.testing import REQUIRE_KVM_ENV

RAM = 256 * layout.MIB
PHYS = 0x1000000
VIRT = 0xFFFFFFFF81000000
ZERO_PAGE = layout.ZERO_PAGE.start


def elf64(segments: list[tuple[int, int, bytes, int]], entry: int, *, elf_class: int = 2) -> bytes:
    """An x86-64 ET_EXEC ELF; each segment is (paddr, vaddr, file bytes, memsz)."""
    phoff = 64
    data_offset = phoff + 56 * len(segments)
    headers = b""
    contents = b""
    for paddr, vaddr, data, memsz in segments:
        offset = data_offset + len(contents)
        headers += struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(data), memsz, 0x1000)
        contents += data
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, len(segments), 64, 0, 0
    )
    return ehdr + headers + contents


TEXT = bytes(range(256)) * 16
DATA = b"D" * 0x800
# Shaped like a real vmlinux: text at 16 MiB linked at the kernel map, a per-CPU
# segment linked at virtual 0, and e_entry the physical address of startup_64.
VMLINUX = elf64(
    [
        (PHYS, VIRT, TEXT, len(TEXT)),
        (PHYS + 0x100000, 0, DATA, len(DATA) + 0x1000),
    ],
    entry=PHYS,
)


def with_size(stream: bytes, size: int) -> bytes:
    """The kernel Makefile's *_with_size: the stream, then the size as 4 LE bytes."""
    return stream + struct.pack("<I", size)


def bzimage(
    payload: bytes,
    *,
    version: int = 0x020F,
    xloadflags: int = 0x7F,
    setup_sects: int = 2,
    init_size: int = 0x800000,
    pref_address: int = PHYS,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    relocatable: int = 1,
    header_end: int = 0x26C,
) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    head = b"\xe8" * 0x200 + b"\x48\x31\xc0"  # 0x200: the 64-bit entry
    protected = head + payload
    protected += bytes(-len(protected) % 16)

    def put(fmt: str, offset: int, *values: int) -> None:
        struct.pack_into(fmt, setup, offset, *values)

    put("<B", 0x1F1, setup_sects)
    put("<I", 0x1F4, len(protected) // 16)
    put("<H", 0x1FA, 0xFFFF)
    put("<H", 0x1FE, 0xAA55)
    put("<BB", 0x200, 0xEB, header_end - 0x202)
    setup[0x202:0x206] = b"HdrS"
    put("<H", 0x206, version)
    put("<B", 0x211, 0x01)  # LOADED_HIGH
    put("<I", 0x214, 0x100000)
    put("<I", 0x22C, initrd_addr_max)
    put("<IBBH", 0x230, 0x200000, relocatable, 21, xloadflags)
    put("<I", 0x238, cmdline_size)
    put("<II", 0x248, len(head), len(payload))
    put("<Q", 0x258, pref_address)
    put("<I", 0x260, init_size)
    return bytes(setup) + protected


GZIP_BZIMAGE = bzimage(gzip.compress(VMLINUX))


def segment_at(image: LoadedImage, gpa: int) -> bytes:
    for start, data in image.segments:
        if start == gpa:
            return data
    raise AssertionError(f"no segment at 0x{gpa:x}")


def zero_page(image: LoadedImage) -> bytes:
    return segment_at(image, ZERO_PAGE)


def u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


# --- the setup header -------------------------------------------------------------


def test_setup_header_fields_are_read_at_their_boot_rst_offsets() -> None:
    header = parse_setup_header(bzimage(b"\x1f\x8b", setup_sects=3, init_size=0x123000))
    assert header.version == 0x020F and header.version_text == "2.15"
    assert header.setup_sects == 3 and header.setup_size == 4 * 512
    assert header.xloadflags == 0x7F and header.relocatable_kernel
    assert header.kernel_alignment == 0x200000
    assert (header.cmdline_size, header.initrd_addr_max) == (2047, 0x7FFFFFFF)
    assert (header.pref_address, header.init_size) == (PHYS, 0x123000)
    assert header.payload_offset == 0x203 and header.payload_length == 2
    assert len(header.raw) == 0x26C - 0x1F1


def test_setup_sects_zero_means_four() -> None:
    image = bytearray(bzimage(b"\x1f\x8b", setup_sects=4))
    image[0x1F1] = 0
    assert parse_setup_header(bytes(image)).setup_sects == 4


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (b"MZ" + bytes(0x400), ImageFormatError, "no 'HdrS' magic at offset 0x202"),
        (b"\0" * 0x100, TruncatedImageError, "too short"),
        (bzimage(b"x", version=0x020A), UnsupportedImageError, "2.10 is older than 2.12"),
        (bzimage(b"x", header_end=0x264), TruncatedImageError, "ends at 0x264"),
        (bzimage(b"x" * 64)[:-32], TruncatedImageError, "syssize"),
    ],
)
def test_bad_setup_headers_are_refused(image: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_setup_header(image)


def test_boot_flag_must_be_aa55() -> None:
    image = bytearray(GZIP_BZIMAGE)
    image[0x1FE:0x200] = b"\0\0"
    with pytest.raises(ImageFormatError, match="boot_flag is 0x0000"):
        parse_setup_header(bytes(image))


# --- the two boot paths -----------------------------------------------------------


def test_bzimage_path_loads_the_protected_mode_kernel_and_enters_at_0x200() -> None:
    image = load_linux_image(GZIP_BZIMAGE, RAM, boot_path="bzimage")
    header = parse_setup_header(GZIP_BZIMAGE)
    assert segment_at(image, PHYS) == GZIP_BZIMAGE[header.setup_size :]
    assert image.entry_state.mode == "long64"
    assert image.entry_state.rip == PHYS + 0x200
    assert image.entry_state.registers == {"rsi": ZERO_PAGE}
    assert image.entry_state.rflags == 0x2


def test_bzimage_path_needs_xlf_kernel_64() -> None:
    with pytest.raises(UnsupportedImageError, match="XLF_KERNEL_64"):
        load_linux_image(bzimage(b"x", xloadflags=0x7E), RAM, boot_path="bzimage")


def test_bzimage_path_needs_init_size_bytes_of_ram_from_pref_address() -> None:
    image = bzimage(b"x", init_size=RAM, relocatable=0)
    with pytest.raises(PlacementError, match=r"not relocatable\) needs 0x10000000 bytes"):
        load_linux_image(image, RAM, boot_path="bzimage")


def test_vmlinux_path_loads_pt_load_segments_at_their_physical_addresses() -> None:
    image = load_linux_image(GZIP_BZIMAGE, RAM, boot_path="vmlinux")
    assert segment_at(image, PHYS) == TEXT
    assert segment_at(image, PHYS + 0x100000) == DATA + bytes(0x1000)
    assert image.entry_state.rip == PHYS  # e_entry is physical (ENTRY(phys_startup_64))
    assert image.entry_state.registers == {"rsi": ZERO_PAGE}


def test_vmlinux_entry_given_virtually_is_translated() -> None:
    vmlinux = elf64([(PHYS, VIRT, TEXT, len(TEXT))], entry=VIRT + 0x40)
    image = load_linux_image(bzimage(gzip.compress(vmlinux)), RAM)
    assert image.entry_state.rip == PHYS + 0x40


def test_vmlinux_entry_outside_every_segment_is_refused() -> None:
    vmlinux = elf64([(PHYS, VIRT, TEXT, len(TEXT))], entry=0x5000000)
    with pytest.raises(PlacementError, match="entry point 0x5000000 is outside"):
        load_linux_image(bzimage(gzip.compress(vmlinux)), RAM)


def test_32_bit_payload_is_refused() -> None:
    vmlinux = bytearray(VMLINUX)
    vmlinux[4] = 1
    with pytest.raises(UnsupportedImageError, match="is ELF32, expected ELF64"):
        load_linux_image(bzimage(gzip.compress(bytes(vmlinux))), RAM)


def test_vmlinux_segment_over_the_vmm_area_is_refused() -> None:
    vmlinux = elf64([(0x8000, 0x8000, TEXT, len(TEXT))], entry=0x8000)
    with pytest.raises(PlacementError, match="overlaps the VMM's Multiboot information area"):
        load_linux_image(vmlinux, RAM)


def test_bare_vmlinux_boots_with_a_made_up_header(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(VMLINUX)
    image = load_kernel(path, RAM, "console=ttyS0")
    page = zero_page(image)
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x020F
    assert u32(page, 0x238) == 2047
    assert image.entry_state.rip == PHYS
    with pytest.raises(CommandLineError, match="at most 2047"):
        load_linux(path, RAM, "x" * 2048)


def test_neither_bzimage_nor_elf_is_refused() -> None:
    with pytest.raises(ImageFormatError, match=r"neither a bzImage .* nor an ELF vmlinux"):
        load_linux_image(b"\x00" * 0x1000, RAM)


def test_payload_running_past_the_kernel_is_truncated() -> None:
    image = bytearray(GZIP_BZIMAGE)
    struct.pack_into("<I", image, 0x24C, len(GZIP_BZIMAGE))
    with pytest.raises(TruncatedImageError, match=r"payload .* runs past its end"):
        load_linux_image(bytes(image), RAM)


def test_empty_payload_is_refused() -> None:
    image = bytearray(GZIP_BZIMAGE)
    struct.pack_into("<I", image, 0x24C, 0)
    with pytest.raises(ImageFormatError, match="payload_length is 0"):
        load_linux_image(bytes(image), RAM)


# --- the zero page ----------------------------------------------------------------


@pytest.mark.parametrize("boot_path", ["bzimage", "vmlinux"])
def test_zero_page_carries_the_header_and_the_loader_fields(boot_path: str) -> None:
    image = load_linux_image(
        GZIP_BZIMAGE,
        RAM,
        "console=ttyS0 root=/dev/vda",
        initrd=b"\x07" * 5000,
        boot_path="bzimage" if boot_path == "bzimage" else "vmlinux",
        acpi_rsdp_address=0xE0000,
    )
    page = zero_page(image)
    assert len(page) == 4096
    header_end = 0x202 + GZIP_BZIMAGE[0x201]
    expected = bytearray(GZIP_BZIMAGE[0x1F1:header_end])
    for offset, size in ((0x210, 2), (0x214, 4), (0x218, 8), (0x224, 2), (0x228, 4)):
        expected[offset - 0x1F1 : offset - 0x1F1 + size] = page[offset : offset + size]
    assert page[0x1F1:header_end] == bytes(expected)  # the rest is the kernel's header
    assert page[0x1EF] == 0  # sentinel
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] == 0x01 | 0x80  # LOADED_HIGH kept, CAN_USE_HEAP set
    assert struct.unpack_from("<H", page, 0x224)[0] == 0xFE00 - 0x200
    assert u32(page, 0x228) == layout.COMMAND_LINE.start
    assert segment_at(image, u32(page, 0x228)) == b"console=ttyS0 root=/dev/vda\0"
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xE0000
    entries = page[0x1E8]
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(entries)]
    assert table == [(e.addr, e.size, int(e.type)) for e in e820_map(RAM)]
    # The initrd: page aligned, as high as RAM allows, after the kernel.
    ramdisk, ramdisk_size = u32(page, 0x218), u32(page, 0x21C)
    assert ramdisk_size == 5000 and ramdisk % 0x1000 == 0
    assert ramdisk + ramdisk_size <= RAM < ramdisk + ramdisk_size + 0x1000
    assert segment_at(image, ramdisk) == b"\x07" * 5000
    assert (u32(page, 0x0C0), u32(page, 0x0C4), u32(page, 0x0C8)) == (0, 0, 0)
    assert (ZERO_PAGE, 4096) in image.reserved


def test_acpi_rsdp_addr_is_left_zero_before_protocol_2_14() -> None:
    image = load_linux_image(
        bzimage(gzip.compress(VMLINUX), version=0x020C), RAM, acpi_rsdp_address=0xE0000
    )
    assert struct.unpack_from("<Q", zero_page(image), 0x070)[0] == 0


def test_initrd_stays_below_initrd_addr_max() -> None:
    image = load_linux_image(
        bzimage(gzip.compress(VMLINUX), initrd_addr_max=0x37FFFFFF),
        2 * layout.GIB,
        initrd=b"i" * 0x1800,
    )
    page = zero_page(image)
    assert u32(page, 0x218) + u32(page, 0x21C) - 1 <= 0x37FFFFFF
    assert u32(page, 0x218) == 0x38000000 - 0x2000


def test_initrd_that_does_not_fit_above_the_kernel_is_refused() -> None:
    with pytest.raises(PlacementError, match=r"initrd .* does not fit"):
        load_linux_image(GZIP_BZIMAGE, 32 * layout.MIB, initrd=bytes(15 * layout.MIB))


def test_command_line_longer_than_cmdline_size_is_refused() -> None:
    load_linux_image(bzimage(gzip.compress(VMLINUX), cmdline_size=10), RAM, "x" * 10)
    with pytest.raises(CommandLineError, match="11 bytes; this kernel accepts at most 10"):
        load_linux_image(bzimage(gzip.compress(VMLINUX), cmdline_size=10), RAM, "x" * 11)


def test_missing_initrd_file_is_named(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(GZIP_BZIMAGE)
    with pytest.raises(BootFileError, match=r"initrd file .*nope.* does not exist"):
        load_linux(kernel, RAM, initrd_path=tmp_path / "nope")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"cpio")
    image = load_kernel(kernel, RAM, initrd_path=initrd)
    assert u32(zero_page(image), 0x21C) == 4


# --- payload decompression (arch/x86/boot/compressed/Makefile, lib/decompress.c) ---


def lz4_legacy(data: bytes, lz4_block: ModuleType) -> bytes:
    """lz4 -l: magic, then 8 MiB blocks each with its compressed length."""
    out = struct.pack("<I", 0x184C2102)
    for start in range(0, len(data), 8 << 20):
        block = lz4_block.compress(data[start : start + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def lzop(data: bytes, lzo: ModuleType, block_size: int = 256 * 1024) -> bytes:
    """An lzop file (version 0x1030) with adler32 of the decompressed blocks."""
    header = struct.pack(">HHHBBIIIIB", 0x1030, 0x2080, 0x0940, 1, 5, 1, 0o100644, 0, 0, 0)
    out = b"\x89LZO\x00\r\n\x1a\n" + header + struct.pack(">I", zlib.adler32(header))
    for start in range(0, len(data), block_size):
        block = data[start : start + block_size]
        compressed = lzo.compress(block, 1, False)
        stored = len(compressed) >= len(block)
        body = block if stored else compressed
        out += struct.pack(">III", len(block), len(body), zlib.adler32(block)) + body
    return out + struct.pack(">I", 0)


def compress_as_the_kernel_does(name: str, data: bytes) -> bytes:
    if name == "gzip":
        return gzip.compress(data)
    if name == "bzip2":
        return with_size(bz2.compress(data), len(data))
    if name == "lzma":
        return with_size(lzma.compress(data, format=lzma.FORMAT_ALONE), len(data))
    if name == "xz":
        filters: list[dict[str, int]] = [
            {"id": lzma.FILTER_X86},
            {"id": lzma.FILTER_LZMA2, "preset": 9},
        ]
        stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
        return with_size(stream, len(data))
    if name == "lz4":
        return with_size(lz4_legacy(data, pytest.importorskip("lz4.block")), len(data))
    if name == "zstd":
        zstandard = pytest.importorskip("zstandard")
        stream = zstandard.ZstdCompressor(level=19).compress(data)
        return with_size(stream, len(data))
    if name == "lzo":
        return with_size(lzop(data, pytest.importorskip("lzo")), len(data))
    if name == "none":
        return data
    raise AssertionError(name)


ALL_COMPRESSIONS = ["gzip", "bzip2", "lzma", "xz", "lz4", "zstd", "lzo", "none"]


@pytest.mark.parametrize("name", ALL_COMPRESSIONS)
def test_every_kernel_compression_round_trips(name: str) -> None:
    data = VMLINUX + bytes(range(256)) * 4000  # several lzo blocks
    payload = compress_as_the_kernel_does(name, data)
    assert identify_compression(payload).name == name
    assert decompress_payload(payload, RAM) == data


@pytest.mark.parametrize("name", ALL_COMPRESSIONS)
def test_every_compression_boots_the_vmlinux_path(name: str) -> None:
    image = load_linux_image(bzimage(compress_as_the_kernel_does(name, VMLINUX)), RAM)
    assert segment_at(image, PHYS) == TEXT


def test_lz4_blocks_larger_than_8_mib_of_output_are_concatenated() -> None:
    block = pytest.importorskip("lz4.block")
    data = bytes(range(251)) * ((9 << 20) // 251)
    assert decompress_payload(with_size(lz4_legacy(data, block), len(data)), RAM) == data


@pytest.mark.skipif(shutil.which("lzop") is None, reason="the lzop program is not installed")
def test_lzop_program_output_decompresses(tmp_path: Path) -> None:
    pytest.importorskip("lzo")
    data = VMLINUX * 50
    result = subprocess.run(["lzop", "-9", "-c"], input=data, capture_output=True, check=True)
    assert decompress_payload(with_size(result.stdout, len(data)), RAM) == data


@pytest.mark.parametrize(
    ("module", "package"), [("zstandard", "zstandard"), ("lz4.block", "lz4"), ("lzo", "python-lzo")]
)
def test_missing_decompressor_names_the_pypi_package(
    module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = importlib.import_module

    def without(name: str, package_: str | None = None) -> ModuleType:
        if name == module:
            raise ImportError(name)
        return real_import(name, package_)

    monkeypatch.setattr(importlib, "import_module", without)
    magic = {"zstandard": b"\x28\xb5\x2f\xfd", "lz4.block": b"\x02\x21\x4c\x18"}
    payload = magic.get(module, b"\x89LZO\x00\r\n\x1a\n") + bytes(32)
    with pytest.raises(MissingDecompressorError, match=f"pip install {package}"):
        decompress_payload(payload, RAM)


def test_unknown_compression_names_the_magic_bytes() -> None:
    with pytest.raises(DecompressionError, match="starts with 12 34 56 78"):
        load_linux_image(bzimage(b"\x12\x34\x56\x78" + bytes(16)), RAM)


def test_corrupt_and_truncated_streams_are_told_apart() -> None:
    payload = gzip.compress(VMLINUX)
    with pytest.raises(TruncatedImageError, match="gzip kernel payload ends"):
        decompress_payload(payload[: len(payload) // 2], RAM)
    corrupt = payload[:10] + b"\xff" * 40 + payload[50:]
    with pytest.raises(DecompressionError, match="gzip kernel payload is corrupt"):
        decompress_payload(corrupt, RAM)
    xz = compress_as_the_kernel_does("xz", VMLINUX)
    with pytest.raises(TruncatedImageError, match="xz"):
        decompress_payload(xz[:40], RAM)


def test_decompressed_kernel_larger_than_ram_is_refused() -> None:
    payload = gzip.compress(bytes(2 * layout.MIB))
    with pytest.raises(PlacementError, match="larger than guest RAM"):
        decompress_payload(payload, layout.MIB)


# --- the decompressed-kernel cache ------------------------------------------------


def test_cache_stores_by_content_hash_and_serves_later_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_linux_image(GZIP_BZIMAGE, RAM, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith("vmlinux-") and entry.read_bytes() == VMLINUX
    assert not first.notes

    def refuse(payload: bytes, max_size: int) -> bytes:
        raise AssertionError("decompressed again despite the cache")

    monkeypatch.setattr(kernel_cache, "decompress_payload", refuse)
    second = load_linux_image(GZIP_BZIMAGE, RAM, cache_dir=tmp_path)
    assert second.segments == first.segments


def test_corrupt_cache_entry_is_replaced(tmp_path: Path) -> None:
    load_linux_image(GZIP_BZIMAGE, RAM, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"garbage")
    image = load_linux_image(GZIP_BZIMAGE, RAM, cache_dir=tmp_path)
    assert segment_at(image, PHYS) == TEXT
    assert entry.read_bytes() == VMLINUX


def test_unwritable_cache_does_not_stop_the_boot(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    image = load_linux_image(GZIP_BZIMAGE, RAM, cache_dir=blocker / "cache")
    assert segment_at(image, PHYS) == TEXT
    assert any(note.startswith("decompressed-kernel cache not used: ") for note in image.notes)


def test_default_cache_dir_follows_xdg_base_directory() -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/kvm-vmm")
    assert default_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path("/h/.cache/kvm-vmm")
    assert default_cache_dir({"HOME": "/h"}) == Path("/h/.cache/kvm-vmm")
    assert default_cache_dir({}) is None


# --- distribution kernels: the default guest's, and any in /boot -------------------

KERNEL_ENV = "KVM_VMM_TEST_KERNEL"
DEFAULT_GUEST_KERNEL = "default-guest"


def boot_kernels() -> list[str]:
    return [str(path) for path in sorted(Path("/boot").glob("vmlinuz-*"))]


@pytest.fixture(scope="module")
def default_guest_kernel() -> Path:
    """$KVM_VMM_TEST_KERNEL, else the default guest's Debian cloud kernel: from the
    cache, fetched with apt-get the first time (as the boot tests and `demo` get it)."""
    named = os.environ.get(KERNEL_ENV)
    if named:
        return Path(named)
    cache = default_cache_dir(os.environ)
    if cache is None:
        unavailable(
            f"no cache directory ($HOME) for the default guest's kernel; or set {KERNEL_ENV}"
        )
    try:
        return fetch_guest_assets(cache).kernel
    except AssetsUnavailable as error:
        unavailable(
            f"the default guest's kernel could not be fetched ({error}); or set {KERNEL_ENV}"
        )


def unavailable(reason: str) -> NoReturn:
    """CI (KVM_SPLIT_REQUIRE_KVM=1, where apt-get works) must run these: fail there."""
    if os.environ.get(REQUIRE_KVM_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_KVM_ENV}=1 requires the distribution-kernel test")
    pytest.skip(reason)


@pytest.mark.parametrize("kernel", [DEFAULT_GUEST_KERNEL, *boot_kernels()])
def test_distribution_kernel_loads_both_ways(
    kernel: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kernel == DEFAULT_GUEST_KERNEL:
        path: Path = request.getfixturevalue("default_guest_kernel")
    else:
        path = Path(kernel)
        if not os.access(path, os.R_OK):
            pytest.skip(f"{path} is not readable (a /boot kernel of another user)")
    header = parse_setup_header(path.read_bytes())
    assert header.xloadflags & 1 and header.init_size > 0
    through_bzimage = load_linux(path, 2 * layout.GIB, "console=ttyS0", boot_path="bzimage")
    assert through_bzimage.entry_state.rip == header.pref_address + 0x200
    # The decompressors are test dependencies of kvm-vmm: a missing one is a failure.
    through_vmlinux = load_linux(path, 2 * layout.GIB, "console=ttyS0", cache_dir=tmp_path)
    # x86-64 vmlinux: startup_64 is the first byte of .text at LOAD_PHYSICAL_ADDR,
    # which is also the bzImage's pref_address.
    assert through_vmlinux.entry_state.rip == header.pref_address
    assert min(gpa for gpa, _ in through_vmlinux.segments if gpa >= layout.MIB) == (
        header.pref_address
    )
