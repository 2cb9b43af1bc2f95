"""A reader for the AML our DSDT holds (ACPI 6.5 §20) and for _CRS buffers (§6.4),
written apart from kvm_vmm.aml so that the tests parse the tables back as an OS does.

Only the terms a static DSDT of names needs: DefScope, DefDevice, DefName with
integers, strings, buffers and packages. Anything else is an error: a table that
grows a method needs this reader to grow too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

Value = int | str | bytes | list["Value"]

DEVICE = "Device"


def pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """(PkgLength, offset after it) (§20.2.4)."""
    lead = data[at]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, at + 1
    length = lead & 0x0F
    for index in range(follow):
        length |= data[at + 1 + index] << (4 + 8 * index)
    return length, at + 1 + follow


def name_string(data: bytes, at: int) -> tuple[str, int]:
    """(path with a leading ``\\`` when rooted, segments joined by ``.``, offset after)."""
    prefix = ""
    if data[at] == 0x5C:
        prefix, at = "\\", at + 1
    if data[at] == 0x2E:
        count, at = 2, at + 1
    elif data[at] == 0x2F:
        count, at = data[at + 1], at + 2
    else:
        count = 1
    segments = [data[at + 4 * i : at + 4 * i + 4].decode("ascii") for i in range(count)]
    return prefix + ".".join(segments), at + 4 * count


def data_object(data: bytes, at: int) -> tuple[Value, int]:
    op = data[at]
    if op in (0x00, 0x01):
        return op, at + 1
    if op == 0xFF:
        return (1 << 64) - 1, at + 1
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if op in sizes:
        size = sizes[op]
        return int.from_bytes(data[at + 1 : at + 1 + size], "little"), at + 1 + size
    if op == 0x0D:
        end = data.index(b"\0", at + 1)
        return data[at + 1 : end].decode("ascii"), end + 1
    if op == 0x11:
        length, body = pkg_length(data, at + 1)
        end = at + 1 + length
        buffer_size, contents = data_object(data, body)
        assert isinstance(buffer_size, int)
        assert contents + buffer_size == end, "buffer size and PkgLength disagree"
        return data[contents:end], end
    if op == 0x12:
        length, body = pkg_length(data, at + 1)
        end = at + 1 + length
        count, at = data[body], body + 1
        elements: list[Value] = []
        while at < end:
            element, at = data_object(data, at)
            elements.append(element)
        assert at == end and len(elements) == count, "package count and contents disagree"
        return elements, end
    raise ValueError(f"AML data opcode {op:#04x} at {at:#x} is not one this reader knows")


def _absolute(scope: str, path: str) -> str:
    if path.startswith("\\"):
        return path
    return scope + path if scope == "\\" else f"{scope}.{path}"


def _terms(data: bytes, at: int, end: int, scope: str, namespace: dict[str, Value]) -> None:
    while at < end:
        op = data[at]
        if op == 0x08:
            path, at = name_string(data, at + 1)
            value, at = data_object(data, at)
            namespace[_absolute(scope, path)] = value
        elif op == 0x10 or data[at : at + 2] == b"\x5b\x82":
            opcode_length = 1 if op == 0x10 else 2
            length, body = pkg_length(data, at + opcode_length)
            block_end = at + opcode_length + length
            path, body = name_string(data, body)
            inner = _absolute(scope, path)
            if op != 0x10:
                namespace[inner] = DEVICE
            _terms(data, body, block_end, inner, namespace)
            at = block_end
        else:
            raise ValueError(f"AML opcode {op:#04x} at {at:#x} is not one this reader knows")
    assert at == end, "a term ran past its enclosing block"


def namespace(aml: bytes) -> dict[str, Value]:
    """Every object the AML (a table's body, after its header) declares, by absolute path."""
    found: dict[str, Value] = {}
    _terms(aml, 0, len(aml), "\\", found)
    return found


@dataclass(frozen=True)
class Resource:
    """One resource descriptor: ``kind`` io or memory (what a device decodes), or bus,
    io-window, memory-window (what a bridge hands on)."""

    kind: str
    minimum: int
    maximum: int
    length: int
    producer: bool = False


def resources(template: bytes) -> list[Resource]:
    """The descriptors of a ResourceTemplate buffer, which must end with an End Tag."""
    found = []
    at = 0
    while True:
        tag = template[at]
        if tag & 0x80:
            (length,) = struct.unpack_from("<H", template, at + 1)
            body = template[at + 3 : at + 3 + length]
            at += 3 + length
            if tag == 0x86:
                info, base, size = struct.unpack("<BII", body)
                assert info & 1, "read-write"
                found.append(Resource("memory", base, base + size - 1, size))
            elif tag in (0x87, 0x88):
                fmt = "<BBBIIIII" if tag == 0x87 else "<BBBHHHHH"
                kind, flags, _, _, minimum, maximum, translation, size = struct.unpack(fmt, body)
                assert translation == 0
                assert flags & 0b1100 == 0b1100, "min and max fixed"
                assert not flags & 0b10, "positive decode"
                name = {0: "memory-window", 1: "io-window", 2: "bus"}[kind]
                found.append(Resource(name, minimum, maximum, size, not flags & 1))
            else:
                raise ValueError(f"large resource {tag:#04x} is not one this reader knows")
        else:
            kind, length = tag >> 3 & 0x0F, tag & 0x07
            body = template[at + 1 : at + 1 + length]
            at += 1 + length
            if kind == 0x0F:
                assert at == len(template), "bytes after the End Tag"
                return found
            if kind == 0x08:
                info, minimum, maximum, _, size = struct.unpack("<BHHBB", body)
                assert info & 1, "16-bit decode"
                found.append(Resource("io", minimum, maximum + size - 1, size))
            else:
                raise ValueError(f"small resource {kind:#x} is not one this reader knows")
