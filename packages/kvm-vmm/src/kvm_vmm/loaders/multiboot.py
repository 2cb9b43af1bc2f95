"""Booting a Multiboot kernel (Multiboot Specification 0.6.96).

The kernel is loaded from its a.out-kludge address fields (header flags bit
16) or else from its ELF32 program headers, wherever in RAM they say (QEMU
loads kvm-unit-tests' realmode.flat at 0x8000, and ``ld -Ttext=0x100000``
puts the ELF headers in a segment at 0xFF000). Modules follow it page-aligned
from 1 MiB up; the GDT and the Multiboot information go to free RAM around
all of these (:class:`BootMemory`). The CPU starts as section 3.2 ("Machine
state") demands: 32-bit protected mode, flat segments, paging and interrupts
off, EAX = 0x2BADB002 and EBX = the Multiboot information's address; no page
tables are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvm_vmm import layout
from kvm_vmm.layout import Region
from kvm_vmm.loaders.boot_memory import BootMemory
from kvm_vmm.loaders.elf import (
    ELFCLASS32,
    ELFCLASS64,
    EM_386,
    elf_class,
    is_elf,
    parse_elf_executable,
)
from kvm_vmm.loaders.errors import (
    ImageFormatError,
    PlacementError,
    TruncatedImageError,
    UnsupportedImageError,
)
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.loaders.image import GDT_SIZE, EntryState, LoadedImage, check_fits, check_segments
from kvm_vmm.loaders.multiboot_header import (
    AddressFields,
    MultibootHeader,
    find_multiboot_header,
)
from kvm_vmm.loaders.multiboot_info import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    PlacedModule,
    build_multiboot_info,
)

WHAT = "Multiboot kernel"


@dataclass(frozen=True)
class MultibootModule:
    """A boot module: its contents and the string the kernel sees for it."""

    data: bytes
    string: str


@dataclass(frozen=True)
class KernelSegments:
    segments: list[tuple[int, bytes]]
    entry: int


def _segments_from_address_fields(
    image: bytes, header_offset: int, fields: AddressFields, ram_size: int
) -> KernelSegments:
    if fields.load_addr > fields.header_addr:
        raise ImageFormatError(
            f"{WHAT}: load_addr 0x{fields.load_addr:x} is above header_addr "
            f"0x{fields.header_addr:x}; the header must lie inside the loaded text"
        )
    file_start = header_offset - (fields.header_addr - fields.load_addr)
    if file_start < 0:
        raise ImageFormatError(
            f"{WHAT}: header_addr - load_addr = 0x{fields.header_addr - fields.load_addr:x} "
            f"puts the start of the text before the start of the file "
            f"(header at offset 0x{header_offset:x})"
        )
    if fields.load_end_addr == 0:
        load_size = len(image) - file_start
    elif fields.load_end_addr < fields.load_addr:
        raise ImageFormatError(
            f"{WHAT}: load_end_addr 0x{fields.load_end_addr:x} is below "
            f"load_addr 0x{fields.load_addr:x}"
        )
    else:
        load_size = fields.load_end_addr - fields.load_addr
    if file_start + load_size > len(image):
        raise TruncatedImageError(
            f"{WHAT}: load_addr..load_end_addr needs file bytes up to offset "
            f"0x{file_start + load_size:x} but the file ends at 0x{len(image):x}"
        )
    load_end = fields.load_addr + load_size
    bss_size = 0
    if fields.bss_end_addr != 0:
        if fields.bss_end_addr < load_end:
            raise ImageFormatError(
                f"{WHAT}: bss_end_addr 0x{fields.bss_end_addr:x} is below "
                f"the end of the loaded data 0x{load_end:x}"
            )
        bss_size = fields.bss_end_addr - load_end
    if load_size + bss_size > ram_size:
        raise PlacementError(
            f"{WHAT}: load_addr..bss_end_addr spans 0x{load_size + bss_size:x} bytes, "
            f"more than guest RAM (0x{ram_size:x} bytes)"
        )
    if not fields.load_addr <= fields.entry_addr < load_end + bss_size:
        raise PlacementError(
            f"{WHAT}: entry_addr 0x{fields.entry_addr:x} is outside the loaded image "
            f"(0x{fields.load_addr:x}-0x{load_end + bss_size - 1:x})"
        )
    data = image[file_start : file_start + load_size] + bytes(bss_size)
    return KernelSegments([(fields.load_addr, data)], fields.entry_addr)


def _segments_from_elf(image: bytes, ram_size: int) -> KernelSegments:
    if elf_class(image) == ELFCLASS64:
        raise UnsupportedImageError(
            f"{WHAT}: is a 64-bit ELF; Multiboot starts kernels in 32-bit mode and loads "
            "ELF32 images (convert with objcopy -O elf32-i386, or give header flags bit 16)"
        )
    elf = parse_elf_executable(image, ELFCLASS32, EM_386, WHAT, ram_size)
    entry = elf.physical_entry(entry_is_physical=False)
    if entry is None:
        raise PlacementError(
            f"{WHAT}: ELF entry point 0x{elf.entry:x} is outside every PT_LOAD segment"
        )
    # The entry lies in a non-empty segment, so at least one segment remains.
    return KernelSegments([(s.paddr, s.data) for s in elf.segments if s.data], entry)


def _kernel_segments(image: bytes, header: MultibootHeader, ram_size: int) -> KernelSegments:
    if header.address_fields is not None:
        return _segments_from_address_fields(image, header.offset, header.address_fields, ram_size)
    if is_elf(image):
        return _segments_from_elf(image, ram_size)
    raise ImageFormatError(
        f"{WHAT}: the header gives no load addresses (flags bit 16 clear) "
        f"and the image is not ELF (starts with {image[:4].hex(' ')})"
    )


def _place_modules(
    kernel: KernelSegments, modules: Sequence[MultibootModule], ram_size: int
) -> list[PlacedModule]:
    kernel_end = max(gpa + len(data) for gpa, data in kernel.segments)
    cursor = max(kernel_end, layout.HIGH_MEMORY_START)
    low_end = layout.low_ram_end(ram_size)
    placed = []
    for index, module in enumerate(modules):
        start = (cursor + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE
        end = start + len(module.data)
        if end > low_end:
            raise PlacementError(
                f"module {index} ({module.string!r}, {len(module.data)} bytes) does not fit "
                f"between the kernel's end 0x{kernel_end:x} and the end of low RAM 0x{low_end:x}"
            )
        placed.append(PlacedModule(start, end, module.string))
        cursor = end
    return placed


def load_multiboot_image(
    image: bytes,
    ram_size: int,
    cmdline: str = "",
    modules: Sequence[MultibootModule] = (),
) -> LoadedImage:
    """Load a Multiboot kernel held in ``image`` into a guest of ``ram_size`` bytes.

    ``cmdline`` is passed verbatim (add the kernel's name in front if the
    kernel expects GRUB's convention).
    """
    header = find_multiboot_header(image)
    if header is None:
        raise ImageFormatError(
            f"{WHAT}: no Multiboot header (magic 0x1BADB002 at a 4-byte aligned offset "
            f"in the first 8192 bytes)"
        )
    kernel = _kernel_segments(image, header, ram_size)
    check_segments(kernel.segments, ram_size)

    memory = BootMemory(ram_size)
    for gpa, data in kernel.segments:
        memory.claim(Region("the kernel's segment", gpa, len(data)))
    placed = _place_modules(kernel, modules, ram_size)
    for index, module in enumerate(placed):
        memory.claim(Region(f"module {index}", module.start, module.end - module.start))
    gdt = memory.place("boot GDT", GDT_SIZE, alignment=8, prefer=layout.BOOT_GDT.start)
    info = build_multiboot_info(ram_size, cmdline, placed, memory)
    segments = list(kernel.segments)
    segments += [(p.start, m.data) for p, m in zip(placed, modules, strict=True) if m.data]
    segments += [(info.info_address, info.info), (info.strings_address, info.strings)]
    notes = []
    if header.wants_video_mode:
        notes.append(
            "the Multiboot header asks for a video mode (flags bit 2); there is no display, "
            "so the Multiboot information carries no video fields"
        )
    loaded = LoadedImage(
        segments=segments,
        entry_state=EntryState(
            "protected32",
            kernel.entry,
            {"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": info.info_address},
            gdt_address=gdt.start,
        ),
        reserved=[
            (info.info_address, len(info.info)),
            (info.strings_address, len(info.strings)),
        ],
        notes=notes,
    )
    check_fits(loaded, ram_size)
    return loaded


def load_multiboot(
    kernel_path: Path,
    ram_size: int,
    cmdline: str = "",
    module_paths: Sequence[Path] = (),
) -> LoadedImage:
    """Load a Multiboot kernel file; each module's string is its path as given."""
    image = read_boot_file(kernel_path, "kernel")
    modules = [
        MultibootModule(read_boot_file(path, f"module {index}"), str(path))
        for index, path in enumerate(module_paths)
    ]
    return load_multiboot_image(image, ram_size, cmdline, modules)
