"""The Multiboot information structure (Multiboot Specification 0.6.96, section 3.3).

Two blobs, each placed in free RAM by :class:`~kvm_vmm.loaders.boot_memory.BootMemory`:
the structure with the memory map, module list and boot loader name (at
:data:`kvm_vmm.layout.MULTIBOOT_INFO` when the kernel leaves it free), and the
command line with the module strings (at :data:`kvm_vmm.layout.COMMAND_LINE` when
free). The specification fixes no address for either: the kernel finds them
through EBX.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvm_vmm import layout
from kvm_vmm.e820 import e820_map
from kvm_vmm.loaders.boot_memory import BootMemory
from kvm_vmm.loaders.errors import CommandLineError

MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
BOOT_LOADER_NAME = "kvm-vmm"

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MEMORY_MAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

INFO_SIZE = 88  # through the VBE fields (offset 86, 2 bytes)
MMAP_ENTRY_SIZE = 24  # the size field (4) and the 20 bytes it counts
MODULE_ENTRY_SIZE = 16


@dataclass(frozen=True)
class PlacedModule:
    """A module already given its guest-physical range."""

    start: int
    end: int
    string: str


@dataclass(frozen=True)
class MultibootInfo:
    """The two blobs to write and where: the structure area and the string area."""

    info_address: int
    info: bytes
    strings_address: int
    strings: bytes


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _c_string(text: str, what: str) -> bytes:
    encoded = text.encode()
    if b"\0" in encoded:
        raise CommandLineError(f"{what} contains a NUL byte, which would end it early")
    return encoded + b"\0"


def build_multiboot_info(
    ram_size: int, cmdline: str, modules: Sequence[PlacedModule], memory: BootMemory
) -> MultibootInfo:
    """The information for ``modules`` already placed, its two blobs taken from ``memory``."""
    strings = bytearray(_c_string(cmdline, "command line"))
    module_string_offsets = []
    for index, module in enumerate(modules):
        module_string_offsets.append(len(strings))
        strings += _c_string(module.string, f"module {index} string")

    memory_map = b"".join(
        struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, entry.addr, entry.size, int(entry.type))
        for entry in e820_map(ram_size)
    )
    mmap_offset = _align(INFO_SIZE, 8)
    modules_offset = _align(mmap_offset + len(memory_map), 8)
    name_offset = modules_offset + MODULE_ENTRY_SIZE * len(modules)
    name = _c_string(BOOT_LOADER_NAME, "boot loader name")
    total = name_offset + len(name)

    info_base = memory.place(
        "Multiboot information", total, alignment=8, prefer=layout.MULTIBOOT_INFO.start
    ).start
    strings_base = memory.place(
        "Multiboot command line and module strings",
        len(strings),
        prefer=layout.COMMAND_LINE.start,
    ).start
    module_list = b"".join(
        struct.pack("<IIII", module.start, module.end, strings_base + offset, 0)
        for module, offset in zip(modules, module_string_offsets, strict=True)
    )
    low_end = layout.low_ram_end(ram_size)
    mem_lower_kib = min(low_end, layout.LOW_MEMORY_END) // layout.KIB
    mem_upper_kib = max(0, low_end - layout.HIGH_MEMORY_START) // layout.KIB
    info = bytearray(total)
    struct.pack_into(
        "<12I",
        info,
        0,
        INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MEMORY_MAP | INFO_BOOT_LOADER_NAME,
        mem_lower_kib,
        mem_upper_kib,
        0,  # boot_device: not given (flags bit 1 clear)
        strings_base,
        len(modules),
        info_base + modules_offset,
        0,
        0,
        0,
        0,  # syms: no a.out or ELF symbols given (flags bits 4, 5 clear)
        len(memory_map),
    )
    struct.pack_into("<I", info, 48, info_base + mmap_offset)
    struct.pack_into("<I", info, 64, info_base + name_offset)
    info[mmap_offset : mmap_offset + len(memory_map)] = memory_map
    info[modules_offset : modules_offset + len(module_list)] = module_list
    info[name_offset:total] = name
    return MultibootInfo(info_base, bytes(info), strings_base, bytes(strings))
