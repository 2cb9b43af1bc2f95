"""Reading kallsyms out of a vmlinux: a synthetic image laid out as Linux 6.1's
scripts/kallsyms.c lays it out (the real Debian kernel is checked in tests/boot)."""

from __future__ import annotations

import struct

import pytest

from kvm_vmm.kernel_symbols import KallsymsNotFound, KernelSymbol, read_kallsyms, system_map

TEXT = 0xFFFF_FFFF_8100_0000
MULTI = 0x01  # a code whose token is several characters, as kallsyms compresses names
MULTI_TOKEN = b"_init"


def _tokens() -> list[bytes]:
    # Characters used in names keep their own code (so "0".."9" are entries 48..57).
    return [
        bytes([code]) if 0x21 <= code < 0x7F else b"x%02x" % code if code != MULTI else MULTI_TOKEN
        for code in range(256)
    ]


def _pad8(blob: bytearray) -> None:
    blob += b"\0" * (-len(blob) % 8)


def _expected() -> list[KernelSymbol]:
    symbols = [KernelSymbol(0x1000, "A", "fixed_percpu_data")]  # absolute (per-CPU)
    symbols += [KernelSymbol(TEXT + 0x10 * i, "T", f"func_{i:03d}") for i in range(300)]
    symbols.append(KernelSymbol(TEXT + 0x4000, "t", "setup_init"))  # ends in MULTI
    symbols.append(KernelSymbol(TEXT + 0x5000, "T", "b" * 200))  # a "big" name
    return symbols


def _names_and_markers(symbols: list[KernelSymbol], break_marker: bool) -> bytes:
    """kallsyms_num_syms (8 bytes), the names, and the markers, each 8-byte aligned."""
    blob = bytearray(struct.pack("<Q", len(symbols)))
    names_at, heads = len(blob), []
    for symbol in symbols:
        heads.append(len(blob) - names_at)
        text = (symbol.kind + symbol.name).encode()
        codes = text[: -len(MULTI_TOKEN)] + bytes([MULTI]) if text.endswith(MULTI_TOKEN) else text
        if len(codes) < 0x80:
            blob += bytes([len(codes)])
        else:
            blob += bytes([(len(codes) & 0x7F) | 0x80, len(codes) >> 7])
        blob += codes
    _pad8(blob)
    markers = heads[::256]
    if break_marker:
        markers[-1] += 1
    blob += struct.pack(f"<{len(markers)}I", *markers)
    _pad8(blob)
    return bytes(blob)


def _offsets(symbols: list[KernelSymbol]) -> bytes:
    blob = bytearray()
    for symbol in symbols:
        offset = symbol.address if symbol.address < TEXT else TEXT - 1 - symbol.address
        blob += struct.pack("<i", offset)
    _pad8(blob)
    return bytes(blob)


def _token_table_and_index() -> bytes:
    tokens = _tokens()
    index, at = [], 0
    for token in tokens:
        index.append(at)
        at += len(token) + 1
    return b"".join(token + b"\0" for token in tokens) + struct.pack("<256H", *index)


def _rodata(symbols: list[KernelSymbol], layout: str, break_marker: bool = False) -> bytes:
    rodata = bytearray(b"\xaa" * 40)  # whatever precedes the tables
    _pad8(rodata)
    if layout == "6.1":
        rodata += _offsets(symbols) + struct.pack("<Q", TEXT)
        rodata += _names_and_markers(symbols, break_marker)
        rodata += b"\x01\x02\x03" * len(symbols)  # seqs_of_names (not read)
        _pad8(rodata)
        rodata += _token_table_and_index()
    else:
        rodata += _names_and_markers(symbols, break_marker) + _token_table_and_index()
        _pad8(rodata)
        rodata += _offsets(symbols) + struct.pack("<Q", TEXT)
        rodata += b"\x01\x02\x03" * len(symbols)
    rodata += b"arch/x86/kernel/head64.c\0"  # whatever follows
    return bytes(rodata)


def _elf(rodata: bytes) -> bytes:
    names = b"\0.text\0.rodata\0.shstrtab\0"
    body = bytearray(64)
    text_at = len(body)
    body += b"\x90" * 16
    _pad8(body)
    rodata_at = len(body)
    body += rodata
    names_at = len(body)
    body += names
    _pad8(body)
    sections_at = len(body)
    for name, kind, flags, address, offset, size in (
        (0, 0, 0, 0, 0, 0),
        (1, 1, 6, TEXT, text_at, 16),
        (7, 1, 2, TEXT + 0x20_0000, rodata_at, len(rodata)),
        (15, 3, 0, 0, names_at, len(names)),
    ):
        body += struct.pack("<IIQQQQIIQQ", name, kind, flags, address, offset, size, 0, 0, 8, 0)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    # type, machine, version, entry, phoff, shoff, flags, sizes and counts, shstrndx
    header = (2, 0x3E, 1, TEXT, 0, sections_at, 0, 64, 56, 0, 64, 4, 3)
    struct.pack_into("<16sHHIQQQIHHHHHH", body, 0, ident, *header)
    return bytes(body)


LAYOUTS = ["6.1", "6.12"]  # Debian 12's kernel, and the layout since


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_symbol_comes_back_with_its_address_type_and_name(layout: str) -> None:
    expected = _expected()
    symbols = read_kallsyms(_elf(_rodata(expected, layout)))
    assert symbols == sorted(expected, key=lambda symbol: symbol.address)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tables_that_disagree_are_not_guessed_from(layout: str) -> None:
    with pytest.raises(KallsymsNotFound):
        read_kallsyms(_elf(_rodata(_expected(), layout, break_marker=True)))


def test_images_without_tables_say_so() -> None:
    with pytest.raises(KallsymsNotFound, match="not a 64-bit ELF"):
        read_kallsyms(b"MZ" + bytes(100))
    with pytest.raises(KallsymsNotFound, match="no kallsyms tables"):
        read_kallsyms(_elf(b"\0" * 4096))


def test_system_map_lines_are_what_kvmfast_reads() -> None:
    line = system_map([KernelSymbol(TEXT + 0x10, "T", "start_kernel")])
    assert line == "ffffffff81000010 T start_kernel\n"
