"""Decompressing a bzImage's payload on the host, as the kernel's own decompressor would.

arch/x86/boot/compressed/Makefile compresses vmlinux.bin (the stripped
vmlinux ELF, plus relocations) with one of gzip, bzip2, lzma, xz, lzo, lz4,
zstd, or nothing; every format but gzip gets the uncompressed size appended
as 4 little-endian bytes, which a decoder here leaves unread. The format is
told by the payload's leading magic bytes, as lib/decompress.c does.

gzip, bzip2, lzma and xz use the standard library; lz4 and zstd the PyPI
packages ``lz4`` and ``zstandard`` (dependencies: Debian's kernels use them);
lzo the optional ``python-lzo``. Each is imported only when such a payload is
met.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

from kvm_vmm.loaders.errors import (
    DecompressionError,
    MissingDecompressorError,
    PlacementError,
    TruncatedImageError,
)

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK_SIZE = 8 << 20  # each legacy-format block decodes to at most 8 MiB
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"


@dataclass(frozen=True)
class Compression:
    name: str
    magic: bytes
    pypi_package: str | None  # None: the standard library decodes it


COMPRESSIONS = (
    Compression("gzip", b"\x1f\x8b", None),
    Compression("bzip2", b"BZh", None),
    Compression("lzma", b"\x5d\x00\x00", None),
    Compression("xz", b"\xfd7zXZ\x00", None),
    Compression("lzo", LZOP_MAGIC, "python-lzo"),
    Compression("lz4", struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
    Compression("zstd", b"\x28\xb5\x2f\xfd", "zstandard"),
    Compression("none", b"\x7fELF", None),
)


def identify_compression(payload: bytes) -> Compression:
    for compression in COMPRESSIONS:
        if payload.startswith(compression.magic):
            return compression
    known = ", ".join(f"{c.name} ({c.magic.hex(' ')})" for c in COMPRESSIONS)
    raise DecompressionError(
        f"unknown kernel payload compression: it starts with {payload[:8].hex(' ')}; "
        f"known magics are {known}"
    )


def _import(module: str, compression: Compression) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDecompressorError(
            f"the kernel payload is {compression.name}-compressed; decompressing it needs "
            f"the PyPI package {compression.pypi_package!r} "
            f"(pip install {compression.pypi_package})"
        ) from None


def _too_large(name: str, max_size: int) -> PlacementError:
    return PlacementError(
        f"the {name}-decompressed kernel is larger than guest RAM (0x{max_size:x} bytes)"
    )


def _truncated(name: str) -> TruncatedImageError:
    return TruncatedImageError(f"the {name} kernel payload ends before its compressed stream does")


class _StreamDecompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int, /) -> bytes: ...


def _stdlib_stream(
    name: str,
    decompressor: _StreamDecompressor,
    payload: bytes,
    max_size: int,
) -> bytes:
    try:
        output = decompressor.decompress(payload, max_size + 1)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise DecompressionError(f"the {name} kernel payload is corrupt: {error}") from None
    if len(output) > max_size:
        raise _too_large(name, max_size)
    if not decompressor.eof:
        raise _truncated(name)
    return output


def _gzip(payload: bytes, max_size: int, _: Compression) -> bytes:
    return _stdlib_stream("gzip", zlib.decompressobj(16 + zlib.MAX_WBITS), payload, max_size)


def _bzip2(payload: bytes, max_size: int, _: Compression) -> bytes:
    return _stdlib_stream("bzip2", bz2.BZ2Decompressor(), payload, max_size)


def _lzma(payload: bytes, max_size: int, _: Compression) -> bytes:
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
    return _stdlib_stream("lzma", decompressor, payload, max_size)


def _xz(payload: bytes, max_size: int, _: Compression) -> bytes:
    return _stdlib_stream("xz", lzma.LZMADecompressor(lzma.FORMAT_XZ), payload, max_size)


def _lz4_legacy(payload: bytes, max_size: int, compression: Compression) -> bytes:
    """lz4 -l: the magic, then blocks each preceded by its 4-byte compressed length."""
    block_codec = _import("lz4.block", compression)
    output = bytearray()
    position = 4
    while position + 4 <= len(payload):
        (length,) = struct.unpack_from("<I", payload, position)
        position += 4
        if length == LZ4_LEGACY_MAGIC:
            continue  # concatenated streams each start with the magic again
        if position + length > len(payload):
            if position == len(payload):
                break  # those 4 bytes were the appended uncompressed size
            raise _truncated("lz4")
        try:
            block = block_codec.decompress(
                payload[position : position + length], uncompressed_size=LZ4_LEGACY_BLOCK_SIZE
            )
        except block_codec.LZ4BlockError as error:
            raise DecompressionError(f"the lz4 kernel payload is corrupt: {error}") from None
        output += block
        if len(output) > max_size:
            raise _too_large("lz4", max_size)
        position += length
    return bytes(output)


def _zstd(payload: bytes, max_size: int, compression: Compression) -> bytes:
    zstandard = _import("zstandard", compression)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
        output = bytes(reader.read(max_size + 1))
    except zstandard.ZstdError as error:
        raise DecompressionError(f"the zstd kernel payload is corrupt: {error}") from None
    if len(output) > max_size:
        raise _too_large("zstd", max_size)
    return output


def _lzop(payload: bytes, max_size: int, compression: Compression) -> bytes:
    lzo = _import("lzo", compression)
    try:
        return _lzop_blocks(payload, max_size, lzo)
    except struct.error:
        raise _truncated("lzo") from None
    except lzo.error as error:
        raise DecompressionError(f"the lzo kernel payload is corrupt: {error}") from None


# lzop header flags (lzop's conf.h, as lib/decompress_unlzo.c reads them)
_F_ADLER32_D = 0x1
_F_ADLER32_C = 0x2
_F_H_EXTRA_FIELD = 0x40
_F_CRC32_D = 0x100
_F_CRC32_C = 0x200
_F_H_FILTER = 0x800


def _lzop_blocks(payload: bytes, max_size: int, lzo: ModuleType) -> bytes:
    position = len(LZOP_MAGIC)
    (version,) = struct.unpack_from(">H", payload, position)
    position += 4
    if version >= 0x0940:
        position += 2  # version needed to extract
    position += 1  # method
    if version >= 0x0940:
        position += 1  # level
    (flags,) = struct.unpack_from(">I", payload, position)
    position += 4
    if flags & _F_H_FILTER:
        position += 4
    position += 8  # mode, mtime low
    if version >= 0x0940:
        position += 4  # mtime high
    position += 1 + payload[position]  # file name
    position += 4  # header checksum
    if flags & _F_H_EXTRA_FIELD:
        (extra,) = struct.unpack_from(">I", payload, position)
        position += 4 + extra + 4
    output = bytearray()
    while True:
        (uncompressed_length,) = struct.unpack_from(">I", payload, position)
        position += 4
        if uncompressed_length == 0:
            return bytes(output)
        (compressed_length,) = struct.unpack_from(">I", payload, position)
        position += 4
        position += 4 * (bool(flags & _F_ADLER32_D) + bool(flags & _F_CRC32_D))
        if compressed_length < uncompressed_length:
            position += 4 * (bool(flags & _F_ADLER32_C) + bool(flags & _F_CRC32_C))
        block = payload[position : position + compressed_length]
        if len(block) < compressed_length:
            raise _truncated("lzo")
        position += compressed_length
        if compressed_length > uncompressed_length:
            raise DecompressionError(
                f"the lzo kernel payload is corrupt: a block of {compressed_length} bytes "
                f"claims to decode to fewer ({uncompressed_length})"
            )
        if compressed_length == uncompressed_length:
            output += block  # stored: lzop keeps incompressible blocks as they are
        else:
            # python-lzo's own header: 0xF0 and the big-endian decoded length.
            framed = b"\xf0" + struct.pack(">I", uncompressed_length) + block
            output += lzo.decompress(framed)
        if len(output) > max_size:
            raise _too_large("lzo", max_size)


def _stored(payload: bytes, max_size: int, _: Compression) -> bytes:
    if len(payload) > max_size:
        raise _too_large("uncompressed", max_size)
    return payload


_DECODERS: dict[str, Callable[[bytes, int, Compression], bytes]] = {
    "gzip": _gzip,
    "bzip2": _bzip2,
    "lzma": _lzma,
    "xz": _xz,
    "lzo": _lzop,
    "lz4": _lz4_legacy,
    "zstd": _zstd,
    "none": _stored,
}


def decompress_payload(payload: bytes, max_size: int) -> bytes:
    """The decompressed payload; refuses output larger than ``max_size`` (guest RAM)."""
    compression = identify_compression(payload)
    return _DECODERS[compression.name](payload, max_size, compression)
