"""The Multiboot header of an OS image (Multiboot Specification 0.6.96, section 3.1).

The header is 4-byte aligned within the first 8192 bytes of the image: magic
0x1BADB002, flags, and a checksum making the three sum to zero. Flags bits
0-15 are requirements the boot loader must honour or refuse; bits 16-31 are
optional features it may ignore.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvm_vmm.loaders.errors import ImageFormatError, TruncatedImageError, UnsupportedImageError

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH_LIMIT = 8192

FLAG_PAGE_ALIGN_MODULES = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_ADDRESS_FIELDS = 1 << 16  # the "a.out kludge"

# Requirements this loader honours: modules are always page aligned and the
# memory fields and map are always given. A video mode request is accepted
# and left unanswered (there is no display), as QEMU does.
HONOURED_REQUIREMENTS = FLAG_PAGE_ALIGN_MODULES | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE
REQUIREMENT_MASK = 0xFFFF


@dataclass(frozen=True)
class AddressFields:
    """Header offsets 12-28, valid when flags bit 16 is set."""

    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    address_fields: AddressFields | None

    @property
    def wants_video_mode(self) -> bool:
        return bool(self.flags & FLAG_VIDEO_MODE)


def _header_length(flags: int) -> int:
    if flags & FLAG_VIDEO_MODE:
        return 48
    if flags & FLAG_ADDRESS_FIELDS:
        return 32
    return 12


def find_multiboot_header(image: bytes) -> MultibootHeader | None:
    """The first valid header, None if the image has no magic at all.

    A magic whose checksum does not match is skipped, as GRUB and QEMU do;
    if no valid header follows, that checksum is reported.
    """
    bad_checksum: tuple[int, int] | None = None
    limit = min(len(image), MULTIBOOT_SEARCH_LIMIT) - 12
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF != 0:
            if bad_checksum is None:
                bad_checksum = (offset, checksum)
            continue
        return _parse_header(image, offset, flags)
    if bad_checksum is not None:
        offset, checksum = bad_checksum
        raise ImageFormatError(
            f"Multiboot header at offset 0x{offset:x} has checksum 0x{checksum:08x}; "
            "magic + flags + checksum must be 0 mod 2^32"
        )
    return None


def _parse_header(image: bytes, offset: int, flags: int) -> MultibootHeader:
    unknown = flags & REQUIREMENT_MASK & ~HONOURED_REQUIREMENTS
    if unknown:
        bits = ", ".join(str(bit) for bit in range(16) if unknown >> bit & 1)
        raise UnsupportedImageError(
            f"Multiboot header flags 0x{flags:08x} require features this loader does not "
            f"know (bits {bits}); bits 0-15 are requirements, so the image cannot be booted"
        )
    end = offset + _header_length(flags)
    if end > MULTIBOOT_SEARCH_LIMIT:
        raise ImageFormatError(
            f"Multiboot header at offset 0x{offset:x} ends at 0x{end:x}, "
            f"past the first {MULTIBOOT_SEARCH_LIMIT} bytes of the image"
        )
    if end > len(image):
        raise TruncatedImageError(
            f"Multiboot header at offset 0x{offset:x} needs {end - offset} bytes "
            f"but the image ends at 0x{len(image):x}"
        )
    fields = None
    if flags & FLAG_ADDRESS_FIELDS:
        fields = AddressFields(*struct.unpack_from("<5I", image, offset + 12))
    return MultibootHeader(offset, flags, fields)
