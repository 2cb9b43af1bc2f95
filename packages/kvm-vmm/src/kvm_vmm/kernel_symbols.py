"""A Linux kernel's own symbol table (kallsyms), read out of its vmlinux ELF.

Distribution kernels ship a stripped vmlinux (Debian's System.map is a placeholder;
the real one is in the 283 MB ``-dbg`` package), but every kernel carries kallsyms
in ``.rodata`` for /proc/kallsyms: compressed names, a 256-entry token table and an
offset per symbol. This finds those tables by their structure and decodes them, so
that ``--profile`` and failure reports can name functions without a System.map.

Two layouts of scripts/kallsyms.c are read, each table 8-byte aligned: Linux 6.1's
(Debian 12's kernel) ``offsets, relative_base, num_syms, names, markers,
[seqs_of_names], token_table, token_index``, and the later one (Debian's 6.12)
``num_syms, names, markers, token_table, token_index, offsets, relative_base, ...``.
An image whose tables do not check out against each other raises
``KallsymsNotFound`` rather than be guessed from.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

_DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_TOKENS = 256
_MARKER_STRIDE = 256  # a marker every 256 names


class KallsymsNotFound(ValueError):
    """The image has no kallsyms tables in the layout this module reads."""


@dataclass(frozen=True)
class KernelSymbol:
    address: int
    kind: str  # System.map's type letter: T/t text, D/d data, ...
    name: str


@dataclass(frozen=True)
class ElfSection:
    name: str
    address: int
    offset: int
    size: int


def elf_sections(elf: bytes) -> dict[str, ElfSection]:
    """The image's sections by name (raises KallsymsNotFound without section headers)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise KallsymsNotFound("not a 64-bit ELF image")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    if shoff == 0 or shoff + entsize * count > len(elf) or names_index >= count:
        raise KallsymsNotFound("the ELF image has no section headers")
    raw = [struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize) for i in range(count)]
    strings = raw[names_index][4]
    sections = {}
    for name_at, _type, _flags, address, offset, size in raw:
        end = elf.find(b"\0", strings + name_at)
        name = elf[strings + name_at : end].decode(errors="replace")
        sections[name] = ElfSection(name, address, offset, size)
    return sections


def _strings(data: bytes, start: int, count: int) -> list[bytes] | None:
    found = []
    for _ in range(count):
        end = data.find(b"\0", start)
        if end < 0:
            return None
        found.append(data[start:end])
        start = end + 1
    return found


def _token_tables(data: bytes) -> Iterator[tuple[int, list[bytes], int]]:
    """(token_table offset, tokens, token_index offset) for each place that has both."""
    hit = data.find(_DIGIT_TOKENS)
    while hit >= 0:
        # Symbol characters keep their own code, so "0".."9" are entries 48..57.
        start = hit
        for _ in range(ord("0")):
            start = data.rfind(b"\0", 0, start - 1) + 1
        tokens = _strings(data, start, _TOKENS)
        if tokens is not None:
            end = start + sum(len(token) + 1 for token in tokens)
            expected = [0]
            for token in tokens[:-1]:
                expected.append(expected[-1] + len(token) + 1)
            for index_at in range(end, end + 8):
                if (
                    index_at + 2 * _TOKENS <= len(data)
                    and list(struct.unpack_from(f"<{_TOKENS}H", data, index_at)) == expected
                ):
                    yield start, tokens, index_at
                    break
        hit = data.find(_DIGIT_TOKENS, hit + 1)


def _name_entries(data: bytes, at: int, count: int) -> Iterator[tuple[int, int, int]]:
    """(entry start, tokens start, token count) for ``count`` names from ``at``."""
    for _ in range(count):
        head = at
        length = data[at]
        if length & 0x80:  # a "big" symbol: two-byte length
            length = (length & 0x7F) | (data[at + 1] << 7)
            at += 2
        else:
            at += 1
        yield head, at, length
        at += length


def read_kallsyms(elf: bytes) -> list[KernelSymbol]:
    """The kernel's symbols, sorted by address."""
    sections = elf_sections(elf)
    rodata, text = sections.get(".rodata"), sections.get(".text")
    if rodata is None or text is None:
        raise KallsymsNotFound("the ELF image has no .rodata or .text section")
    data = elf[rodata.offset : rodata.offset + rodata.size]
    for table_at, tokens, index_at in _token_tables(data):
        found = _tables_before_tokens(data, table_at, text.address) or _tables_after_tokens(
            data, table_at, index_at, text.address
        )
        if found is not None:
            return _symbols(data, tokens, found, text.address)
    raise KallsymsNotFound("no kallsyms tables in a known layout found in .rodata")


@dataclass(frozen=True)
class _Tables:
    count: int
    offsets_at: int
    entries: list[tuple[int, int]]  # (tokens start, token count) per name


def _align8(offset: int) -> int:
    return offset + (-offset % 8)


def _aligned_rfind(data: bytes, needle: bytes, end: int) -> int:
    at = data.rfind(needle, 0, end)
    while at >= 0 and at % 8:
        at = data.rfind(needle, 0, at)
    return at


def _checked_names(
    data: bytes, names_at: int, count: int, table_at: int
) -> list[tuple[int, int]] | None:
    """(tokens start, token count) of ``count`` names from ``names_at``, if the markers
    that follow them (8-byte aligned, before the token table) agree: the offset into the
    names of every 256th name."""
    heads, entries = [], []
    try:
        for head, at, length in _name_entries(data, names_at, count):
            heads.append(head)
            entries.append((at, length))
    except IndexError:
        return None
    expected = [head - names_at for head in heads[::_MARKER_STRIDE]]
    markers_at = _align8(entries[-1][0] + entries[-1][1])
    if markers_at + 4 * len(expected) > table_at:
        return None
    markers = struct.unpack_from(f"<{len(expected)}I", data, markers_at)
    return entries if list(markers) == expected else None


def _tables_before_tokens(data: bytes, table_at: int, base: int) -> _Tables | None:
    """Linux 6.1: relative_base, num_syms (8 bytes each) and the names before the token
    table, the offsets just before relative_base."""
    base_at = _aligned_rfind(data, struct.pack("<Q", base), table_at)
    if base_at < 0:
        return None
    count = struct.unpack_from("<Q", data, base_at + 8)[0]
    offsets_at = base_at - _align8(4 * count)
    if not 0 < count < 1 << 24 or offsets_at < 0:
        return None
    entries = _checked_names(data, base_at + 16, count, table_at)
    return None if entries is None else _Tables(count, offsets_at, entries)


def _tables_after_tokens(data: bytes, table_at: int, index_at: int, base: int) -> _Tables | None:
    """Later kernels: num_syms (8 bytes) and the names before the token table, the
    offsets right after the token index and relative_base after them."""
    offsets_at = _align8(index_at + 2 * _TOKENS)
    base_at = data.find(struct.pack("<Q", base), offsets_at)
    while base_at >= 0 and base_at % 8:
        base_at = data.find(struct.pack("<Q", base), base_at + 1)
    if base_at < 0:
        return None
    for count in ((base_at - offsets_at) // 4, (base_at - offsets_at) // 4 - 1):
        count_at = _aligned_rfind(data, struct.pack("<Q", count), table_at)
        if count <= 0 or count_at < 0:
            continue
        entries = _checked_names(data, count_at + 8, count, table_at)
        if entries is not None:
            return _Tables(count, offsets_at, entries)
    return None


def _symbols(data: bytes, tokens: list[bytes], tables: _Tables, base: int) -> list[KernelSymbol]:
    offsets = struct.unpack_from(f"<{tables.count}i", data, tables.offsets_at)
    symbols = []
    for (at, length), offset in zip(tables.entries, offsets, strict=True):
        name = b"".join(tokens[code] for code in data[at : at + length]).decode(errors="replace")
        # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: non-negative offsets are absolute (per-CPU
        # symbols); negative ones count down from relative_base.
        address = offset if offset >= 0 else base - 1 - offset
        symbols.append(KernelSymbol(address, name[:1], name[1:]))
    symbols.sort(key=lambda symbol: symbol.address)
    return symbols


def system_map(symbols: list[KernelSymbol]) -> str:
    """System.map text ("address type name" per line), as kvmfast's load_symbols reads."""
    return "".join(f"{symbol.address:016x} {symbol.kind} {symbol.name}\n" for symbol in symbols)
