"""AML (ACPI 6.5 §20) and the resource descriptors of _CRS buffers (§6.4), encoded by
hand: only the terms our DSDT uses.

Each function returns the encoded bytes of one term; callers nest them. Names are
NameSegs of 1-4 characters (padded with ``_``), or paths of them joined by ``.``,
optionally rooted with a leading backslash.
"""

from __future__ import annotations

import struct

# Opcodes and prefixes (§20.2, §20.3)
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C

# Resource descriptors (§6.4)
IO_PORT_TAG = 0x47  # small item 0x08, 7 bytes (§6.4.2.5)
IO_DECODE_16 = 1 << 0
END_TAG = 0x79  # small item 0x0F, 1 byte (§6.4.2.9)
MEMORY32_FIXED_TAG = 0x86  # large item (§6.4.3.4)
MEMORY32_FIXED_LENGTH = 9
DWORD_ADDRESS_TAG = 0x87  # large item (§6.4.3.5.2)
WORD_ADDRESS_TAG = 0x88  # large item (§6.4.3.5.3)
WORD_ADDRESS_LENGTH = 13
DWORD_ADDRESS_LENGTH = 23
# Address space descriptors: resource type (table 6.49) and general flags (_MAF, _MIF,
# _DEC clear for positive decode, bit 0 clear for a producer: a bridge's window).
RESOURCE_MEMORY = 0
RESOURCE_IO = 1
RESOURCE_BUS_NUMBER = 2
ADDRESS_MAX_FIXED = 1 << 3
ADDRESS_MIN_FIXED = 1 << 2
ADDRESS_CONSUMER = 1 << 0
# I/O type-specific flags (table 6.52): _RNG = 3, both ISA and non-ISA ranges.
IO_ENTIRE_RANGE = 0b11
# Memory type-specific flags (table 6.51): _RW bit 0, _MEM bits 1-2 (0 non-cacheable).
MEMORY_READ_WRITE = 1 << 0


class AmlError(ValueError):
    """A value AML cannot encode."""


def pkg_length(content_length: int) -> bytes:
    """PkgLength for ``content_length`` bytes following it (the length counts itself)."""
    for size in range(1, 5):
        total = content_length + size
        if size == 1 and total <= 0x3F:
            return bytes([total])
        if size > 1 and total < 1 << (4 + 8 * (size - 1)):
            lead = (size - 1) << 6 | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(size - 1, "little")
    raise AmlError(f"AML package of {content_length} bytes exceeds PkgLength's 2^28 limit")


def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value`` (§20.2.3)."""
    if not 0 <= value < 1 << 64:
        raise AmlError(f"AML integer {value} is outside 0..2^64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable: the range was checked above")


def dword(value: int) -> bytes:
    """A DWordConst whatever its value: EISA IDs are written this way (§19.6.35)."""
    if not 0 <= value < 1 << 32:
        raise AmlError(f"AML DWord {value} is outside 0..2^32-1")
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "little")


def string(text: str) -> bytes:
    encoded = text.encode("ascii")
    if b"\0" in encoded or any(byte > 0x7F for byte in encoded):
        raise AmlError(f"AML string {text!r} must be ASCII without NUL")
    return bytes([STRING_PREFIX]) + encoded + b"\0"


def name_seg(name: str) -> bytes:
    """A NameSeg: a lead character A-Z or _, then A-Z, 0-9 or _, padded with _ to 4."""
    if not 1 <= len(name) <= 4:
        raise AmlError(f"AML name {name!r} must be 1-4 characters")
    lead, rest = name[0], name[1:]
    valid_lead = lead == "_" or "A" <= lead <= "Z"
    valid_rest = all(c == "_" or "A" <= c <= "Z" or "0" <= c <= "9" for c in rest)
    if not (valid_lead and valid_rest):
        raise AmlError(f"AML name {name!r} is not a valid NameSeg")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString (§20.2.2): ``\\_SB``, ``PCI0``, ``\\_SB.PCI0``..."""
    root = path.startswith("\\")
    segments = [name_seg(segment) for segment in path.removeprefix("\\").split(".")]
    prefix = bytes([ROOT_CHAR]) if root else b""
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    if len(segments) > 0xFF:
        raise AmlError(f"AML path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def name(path: str, value: bytes) -> bytes:
    """DefName: Name(path, value) with ``value`` already encoded."""
    return bytes([NAME_OP]) + name_string(path) + value


def package(elements: list[bytes]) -> bytes:
    """DefPackage of up to 255 encoded elements."""
    if len(elements) > 0xFF:
        raise AmlError(f"AML Package of {len(elements)} elements exceeds 255")
    content = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(content)) + content


def buffer(data: bytes) -> bytes:
    """DefBuffer initialised with ``data`` (§20.2.5.4)."""
    content = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(content)) + content


def scope(path: str, terms: list[bytes]) -> bytes:
    """DefScope (§20.2.5.1)."""
    content = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(content)) + content


def device(path: str, terms: list[bytes]) -> bytes:
    """DefDevice (§20.2.5.2)."""
    content = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(content)) + content


def eisa_id(text: str) -> int:
    """EisaId("PNP0A08") (§19.6.35): three letters of 5 bits, a 16-bit product number,
    stored as the big-endian dword read little-endian."""
    letters, product = text[:3], text[3:]
    if len(text) != 7 or not all("A" <= c <= "Z" for c in letters):
        raise AmlError(f"EISA ID {text!r} is not three capital letters and four hex digits")
    try:
        number = int(product, 16)
    except ValueError:
        raise AmlError(f"EISA ID {text!r} does not end in four hex digits") from None
    value = (ord(letters[0]) - 0x40) << 26 | (ord(letters[1]) - 0x40) << 21
    value |= (ord(letters[2]) - 0x40) << 16 | number
    return int.from_bytes(value.to_bytes(4, "big"), "little")


# --- Resource descriptors (§6.4) ------------------------------------------------------


def _check_range(kind: str, minimum: int, maximum: int, limit: int) -> None:
    if not 0 <= minimum <= maximum < limit:
        raise AmlError(f"{kind} range [{minimum:#x}, {maximum:#x}] is not within 0..{limit - 1:#x}")


def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length): fixed ports a device decodes (§6.4.2.5)."""
    _check_range("I/O port", base, base + length - 1, 1 << 16)
    if not 0 < length <= 0xFF:
        raise AmlError(f"an I/O port descriptor covers 1..255 ports, not {length}")
    return struct.pack("<BBHHBB", IO_PORT_TAG, IO_DECODE_16, base, base, 1, length)


def memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed(ReadWrite, base, length): memory a device decodes (§6.4.3.4)."""
    _check_range("Memory32Fixed", base, base + length - 1, 1 << 32)
    if length <= 0:
        raise AmlError(f"a memory descriptor covers at least one byte, not {length}")
    return struct.pack(
        "<BHBII", MEMORY32_FIXED_TAG, MEMORY32_FIXED_LENGTH, MEMORY_READ_WRITE, base, length
    )


def _word_address(resource: int, type_flags: int, minimum: int, maximum: int) -> bytes:
    _check_range("Word address", minimum, maximum, 1 << 16)
    flags = ADDRESS_MAX_FIXED | ADDRESS_MIN_FIXED
    return struct.pack(
        "<BHBBBHHHHH",
        WORD_ADDRESS_TAG,
        WORD_ADDRESS_LENGTH,
        resource,
        flags,
        type_flags,
        0,
        minimum,
        maximum,
        0,
        maximum - minimum + 1,
    )


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, ...) (§6.4.3.5.3)."""
    _check_range("bus number", minimum, maximum, 1 << 8)
    return _word_address(RESOURCE_BUS_NUMBER, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _word_address(RESOURCE_IO, IO_ENTIRE_RANGE, minimum, maximum)


def dword_memory(minimum: int, maximum: int) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, ...) (§6.4.3.5.2)."""
    _check_range("DWord memory", minimum, maximum, 1 << 32)
    return struct.pack(
        "<BHBBBIIIII",
        DWORD_ADDRESS_TAG,
        DWORD_ADDRESS_LENGTH,
        RESOURCE_MEMORY,
        ADDRESS_MAX_FIXED | ADDRESS_MIN_FIXED,
        MEMORY_READ_WRITE,
        0,
        minimum,
        maximum,
        0,
        maximum - minimum + 1,
    )


def resource_template(descriptors: list[bytes]) -> bytes:
    """ResourceTemplate(){...}: a Buffer of the descriptors and an End Tag whose checksum
    0 means "treat as summing to zero" (§6.4.2.9)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
