"""The real-mode setup header of a Linux bzImage (Documentation/arch/x86/boot.rst).

The header sits at offset 0x1F1 of the image, "HdrS" at 0x202 tells it is
there, and the byte at 0x201 (the jump's offset) says where it ends. Fields
are read only when the header's protocol version defines them; this loader
requires 2.12, the first with ``xloadflags``, so all of those used here are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvm_vmm.loaders.errors import ImageFormatError, TruncatedImageError, UnsupportedImageError

SETUP_HEADER_OFFSET = 0x1F1
SETUP_HEADER_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MINIMUM_PROTOCOL = 0x020C  # xloadflags, hence XLF_KERNEL_64, exist from 2.12
ACPI_RSDP_PROTOCOL = 0x020E  # boot_params.acpi_rsdp_addr is honoured from 2.14
SETUP_HEADER_LIMIT = 0x290  # boot_params.edd_mbr_sig_buffer follows the header
DEFAULT_SETUP_SECTS = 4  # "if this field is 0, the real value is 4"

XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7

# What a vmlinux without a bzImage around it is given: the values of the
# x86-64 kernels' own headers (COMMAND_LINE_SIZE 2048 less the NUL, and
# arch/x86/boot/header.S's initrd_addr_max).
VMLINUX_CMDLINE_SIZE = 2047
VMLINUX_INITRD_ADDR_MAX = 0x7FFFFFFF


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header this loader reads, and the header's bytes.

    ``raw`` is the header from 0x1F1 to its end, to be copied into the zero
    page at the same offset.
    """

    raw: bytes
    version: int
    setup_sects: int
    syssize: int
    loadflags: int
    xloadflags: int
    relocatable_kernel: bool
    kernel_alignment: int
    cmdline_size: int
    initrd_addr_max: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part: the boot sector and the setup sectors."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def _u8(data: bytes, offset: int) -> int:
    return data[offset]


def _u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def is_bzimage(data: bytes) -> bool:
    return data[0x202:0x206] == SETUP_HEADER_MAGIC


def parse_setup_header(data: bytes) -> SetupHeader:
    """Parse and check the setup header of the bzImage in ``data``."""
    if len(data) < 0x206:
        raise TruncatedImageError(
            f"bzImage: {len(data)} bytes is too short to hold a setup header (0x206 bytes)"
        )
    if not is_bzimage(data):
        raise ImageFormatError(
            f"not a bzImage: no 'HdrS' magic at offset 0x202 (found {data[0x202:0x206].hex(' ')})"
        )
    if len(data) < 0x208:
        raise TruncatedImageError("bzImage: the file ends inside the setup header's version")
    header_end = min(0x202 + data[0x201], SETUP_HEADER_LIMIT)
    version = _u16(data, 0x206)
    if version < MINIMUM_PROTOCOL:
        raise UnsupportedImageError(
            f"bzImage: boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.12, "
            "the first that tells whether the kernel has a 64-bit entry (xloadflags)"
        )
    if header_end < 0x268 or len(data) < header_end:
        raise TruncatedImageError(
            f"bzImage: the setup header ends at 0x{header_end:x} (file: 0x{len(data):x} bytes); "
            "protocol 2.12 needs it to reach 0x268"
        )
    boot_flag = _u16(data, 0x1FE)
    if boot_flag != BOOT_FLAG:
        raise ImageFormatError(f"bzImage: boot_flag is 0x{boot_flag:04x}, not 0xaa55")
    header = SetupHeader(
        raw=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        version=version,
        setup_sects=_u8(data, 0x1F1) or DEFAULT_SETUP_SECTS,
        syssize=_u32(data, 0x1F4),
        loadflags=_u8(data, 0x211),
        xloadflags=_u16(data, 0x236),
        relocatable_kernel=bool(_u8(data, 0x234)),
        kernel_alignment=_u32(data, 0x230),
        cmdline_size=_u32(data, 0x238),
        initrd_addr_max=_u32(data, 0x22C),
        payload_offset=_u32(data, 0x248),
        payload_length=_u32(data, 0x24C),
        pref_address=_u64(data, 0x258),
        init_size=_u32(data, 0x260),
    )
    protected_mode_end = header.setup_size + header.syssize * 16
    if len(data) < protected_mode_end:
        raise TruncatedImageError(
            f"bzImage: setup ({header.setup_sects} sectors) and syssize (0x{header.syssize:x} "
            f"paragraphs) need 0x{protected_mode_end:x} bytes; the file has 0x{len(data):x}"
        )
    return header


def vmlinux_setup_header(kernel_alignment: int) -> SetupHeader:
    """A header for a bare vmlinux, as a bzImage of protocol 2.15 would carry it."""
    raw = bytearray(0x26C - SETUP_HEADER_OFFSET)

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, raw, offset - SETUP_HEADER_OFFSET, value)

    put("<H", 0x1FE, BOOT_FLAG)
    put("<B", 0x201, 0x26C - 0x202)
    raw[0x202 - SETUP_HEADER_OFFSET : 0x206 - SETUP_HEADER_OFFSET] = SETUP_HEADER_MAGIC
    put("<H", 0x206, 0x020F)
    put("<H", 0x1FA, 0xFFFF)  # vid_mode: "normal"
    put("<B", 0x211, LOADED_HIGH)
    put("<I", 0x22C, VMLINUX_INITRD_ADDR_MAX)
    put("<I", 0x230, kernel_alignment)
    put("<H", 0x236, XLF_KERNEL_64)
    put("<I", 0x238, VMLINUX_CMDLINE_SIZE)
    return SetupHeader(
        raw=bytes(raw),
        version=0x020F,
        setup_sects=DEFAULT_SETUP_SECTS,
        syssize=0,
        loadflags=LOADED_HIGH,
        xloadflags=XLF_KERNEL_64,
        relocatable_kernel=False,
        kernel_alignment=kernel_alignment,
        cmdline_size=VMLINUX_CMDLINE_SIZE,
        initrd_addr_max=VMLINUX_INITRD_ADDR_MAX,
        payload_offset=0,
        payload_length=0,
        pref_address=0,
        init_size=0,
    )
