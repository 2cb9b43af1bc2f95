"""Helpers for kvm-vmm's tests and experiments; production code never imports this."""

from __future__ import annotations

import struct

SHT_PROGBITS = 1
SHT_STRTAB = 3


def fake_module(name: str, depends: str = "", *, extra: tuple[str, ...] = ()) -> bytes:
    """A relocatable ELF64 with a .modinfo section, as modpost leaves a .ko."""
    info = "\0".join([*extra, f"depends={depends}", f"name={name}", "vermagic=6.1.0 SMP"])
    modinfo_data = info.encode() + b"\0"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body = modinfo_data + shstrtab
    modinfo_offset = 64
    shstrtab_offset = modinfo_offset + len(modinfo_data)
    shoff = 64 + len(body)
    shoff += -shoff % 8
    header = (
        b"\x7fELF"
        + bytes([2, 1, 1, 0])  # ELFCLASS64, little-endian, version 1, System V
        + bytes(8)
        + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    )
    sections = b"".join(
        [
            bytes(64),  # SHN_UNDEF
            struct.pack(
                "<IIQQQQIIQQ", 1, SHT_PROGBITS, 0, 0, modinfo_offset, len(modinfo_data), 0, 0, 1, 0
            ),
            struct.pack(
                "<IIQQQQIIQQ", 10, SHT_STRTAB, 0, 0, shstrtab_offset, len(shstrtab), 0, 0, 1, 0
            ),
        ]
    )
    return header + body + bytes(shoff - 64 - len(body)) + sections
