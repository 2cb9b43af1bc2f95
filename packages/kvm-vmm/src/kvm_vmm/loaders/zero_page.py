"""The Linux zero page, ``struct boot_params`` (Documentation/arch/x86/zero-page.rst).

It starts all zero, receives the kernel's setup header at 0x1F1 (boot.rst,
"64-bit Boot Protocol"), and the fields a boot loader writes: type_of_loader,
loadflags, cmd_line_ptr, the initrd, the heap end, the E820 map and, from
protocol 2.14, the RSDP's address.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvm_vmm.e820 import E820Entry
from kvm_vmm.loaders.errors import LoaderError
from kvm_vmm.loaders.linux_header import (
    ACPI_RSDP_PROTOCOL,
    CAN_USE_HEAP,
    SETUP_HEADER_OFFSET,
    SetupHeader,
)

ZERO_PAGE_SIZE = 0x1000
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF
CODE32_START = 0x214
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
SETUP_DATA = 0x250
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128

LOADER_UNDEFINED = 0xFF  # no boot loader ID assigned to this VMM
# boot.rst: the end of the setup stack/heap from the start of the real-mode
# code, minus 0x200; unused on the 64-bit entry but kept coherent with it.
HEAP_END = 0xFE00 - 0x200


@dataclass(frozen=True)
class Ramdisk:
    address: int
    size: int


def build_zero_page(
    header: SetupHeader,
    load_address: int,
    cmdline_address: int,
    ramdisk: Ramdisk | None,
    e820: list[E820Entry],
    acpi_rsdp_address: int | None,
) -> bytes:
    if len(e820) > E820_MAX_ENTRIES:
        raise LoaderError(
            f"the memory map has {len(e820)} entries; the zero page holds {E820_MAX_ENTRIES}"
        )
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header.raw)] = header.raw
    page[SENTINEL] = 0  # a non-zero sentinel tells the kernel the loader copied junk
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] = header.loadflags | CAN_USE_HEAP
    struct.pack_into("<I", page, CODE32_START, load_address & 0xFFFFFFFF)
    struct.pack_into("<H", page, HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", page, CMD_LINE_PTR, cmdline_address & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, cmdline_address >> 32)
    struct.pack_into("<Q", page, SETUP_DATA, 0)  # no setup_data list is passed
    if ramdisk is not None:
        struct.pack_into("<I", page, RAMDISK_IMAGE, ramdisk.address & 0xFFFFFFFF)
        struct.pack_into("<I", page, RAMDISK_SIZE, ramdisk.size & 0xFFFFFFFF)
        struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, ramdisk.address >> 32)
        struct.pack_into("<I", page, EXT_RAMDISK_SIZE, ramdisk.size >> 32)
    else:
        struct.pack_into("<II", page, RAMDISK_IMAGE, 0, 0)
    if acpi_rsdp_address is not None and header.version >= ACPI_RSDP_PROTOCOL:
        struct.pack_into("<Q", page, ACPI_RSDP_ADDR, acpi_rsdp_address)
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        offset = E820_TABLE + index * 20
        page[offset : offset + 20] = entry.pack()
    return bytes(page)
