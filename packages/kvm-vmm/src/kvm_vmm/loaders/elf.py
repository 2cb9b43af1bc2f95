"""The parts of ELF (System V ABI, "ELF Header" and "Program Header") a loader needs.

Only little-endian executables (ET_EXEC) are accepted: what is loaded is
each PT_LOAD segment at its physical address (p_paddr), its file bytes
followed by zeros up to p_memsz.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvm_vmm.loaders.errors import (
    ImageFormatError,
    PlacementError,
    TruncatedImageError,
    UnsupportedImageError,
)

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1

_TYPE_NAMES = {0: "ET_NONE", 1: "a relocatable object (ET_REL)", 3: "a shared object (ET_DYN)"}
_MACHINE_NAMES = {EM_386: "x86 (EM_386)", EM_X86_64: "x86-64 (EM_X86_64)"}
_CLASS_NAMES = {ELFCLASS32: "ELF32", ELFCLASS64: "ELF64"}


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD segment: ``data`` is already padded with zeros to p_memsz."""

    paddr: int
    vaddr: int
    data: bytes
    file_size: int


@dataclass(frozen=True)
class ElfExecutable:
    elf_class: int
    machine: int
    entry: int
    segments: list[ElfSegment]

    def physical_entry(self, entry_is_physical: bool) -> int | None:
        """e_entry as a physical address inside a segment, or None if it is in none.

        Multiboot kernels give a virtual e_entry that is translated through
        the segment holding it (as GRUB does); Linux's vmlinux gives the
        physical address of startup_64 directly.
        """
        for physical in (entry_is_physical, not entry_is_physical):
            for segment in self.segments:
                start = segment.paddr if physical else segment.vaddr
                if start <= self.entry < start + len(segment.data):
                    return segment.paddr + self.entry - start
        return None


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def elf_class(data: bytes) -> int:
    """EI_CLASS of an ELF file (1 = ELF32, 2 = ELF64); 0 if too short."""
    return data[4] if len(data) > 4 else 0


def parse_elf_executable(
    data: bytes, elf_class_: int, machine: int, what: str, ram_size: int
) -> ElfExecutable:
    """Parse ``data`` as an executable of the given class and machine.

    ``what`` names the file in error messages ("Multiboot kernel", "vmlinux");
    a segment larger than ``ram_size`` is refused before its zero fill is made.
    """
    header_size = 52 if elf_class_ == ELFCLASS32 else 64
    if len(data) < header_size:
        raise TruncatedImageError(
            f"{what}: {len(data)} bytes is shorter than an ELF header ({header_size} bytes)"
        )
    if not is_elf(data):
        raise ImageFormatError(f"{what}: no ELF magic (starts with {data[:4].hex(' ')})")
    if data[4] != elf_class_:
        found = _CLASS_NAMES.get(data[4], f"EI_CLASS {data[4]}")
        raise UnsupportedImageError(
            f"{what}: is {found}, expected {_CLASS_NAMES.get(elf_class_, elf_class_)}"
        )
    if data[5] != ELFDATA2LSB:
        raise UnsupportedImageError(f"{what}: EI_DATA {data[5]} is not little-endian (1)")
    if elf_class_ == ELFCLASS32:
        e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIII", data, 16)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
        min_phentsize = 32
    else:
        e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIQQ", data, 16)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
        min_phentsize = 56
    if e_type != ET_EXEC:
        raise UnsupportedImageError(
            f"{what}: ELF e_type is {_TYPE_NAMES.get(e_type, e_type)}, not an executable (ET_EXEC)"
        )
    if e_machine != machine:
        found = _MACHINE_NAMES.get(e_machine, f"e_machine {e_machine}")
        raise UnsupportedImageError(
            f"{what}: ELF is for {found}, expected {_MACHINE_NAMES.get(machine, machine)}"
        )
    if e_phnum == 0:
        raise ImageFormatError(f"{what}: ELF has no program headers")
    if e_phentsize < min_phentsize:
        raise ImageFormatError(
            f"{what}: ELF e_phentsize {e_phentsize} is smaller than a program header "
            f"({min_phentsize})"
        )
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > len(data):
        raise TruncatedImageError(
            f"{what}: program header table ends at offset 0x{table_end:x}, "
            f"past the end of the file (0x{len(data):x})"
        )
    segments = []
    for index in range(e_phnum):
        offset = e_phoff + index * e_phentsize
        if elf_class_ == ELFCLASS32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
                "<6I", data, offset
            )
        else:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
                "<IIQQQQQ", data, offset
            )
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise ImageFormatError(
                f"{what}: PT_LOAD segment {index} has p_filesz 0x{p_filesz:x} "
                f"larger than p_memsz 0x{p_memsz:x}"
            )
        if p_offset + p_filesz > len(data):
            raise TruncatedImageError(
                f"{what}: PT_LOAD segment {index} (offset 0x{p_offset:x}, 0x{p_filesz:x} bytes) "
                f"runs past the end of the file (0x{len(data):x} bytes)"
            )
        if p_memsz > ram_size:
            raise PlacementError(
                f"{what}: PT_LOAD segment {index} needs 0x{p_memsz:x} bytes, "
                f"more than guest RAM (0x{ram_size:x} bytes)"
            )
        contents = data[p_offset : p_offset + p_filesz] + bytes(p_memsz - p_filesz)
        segments.append(ElfSegment(p_paddr, p_vaddr, contents, p_filesz))
    if not segments:
        raise ImageFormatError(f"{what}: ELF has no PT_LOAD segment")
    return ElfExecutable(elf_class_, e_machine, e_entry, segments)
