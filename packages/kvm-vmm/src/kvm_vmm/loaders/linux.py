"""Booting Linux through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

Two paths lead from a bzImage to the kernel:

- "bzimage": the protected-mode part (after the setup sectors) is loaded at
  ``pref_address`` and entered at its 64-bit entry, offset 0x200; the kernel
  decompresses itself in the guest.
- "vmlinux": the payload is decompressed on the host (cached by content
  hash), its ELF PT_LOAD segments are loaded at their physical addresses and
  startup_64 is entered directly (vmlinux's e_entry is physical:
  arch/x86/kernel/vmlinux.lds.S has ENTRY(phys_startup_64)). In-guest
  decompression is all emulated on hosts whose KVM emulates kernel code, so
  this path saves tens of seconds there.

A bare ELF vmlinux can be booted too (the "vmlinux" path, with a setup
header made up for it). Either way the CPU starts in long mode with the
identity page tables, RSI = the zero page, interrupts off, and the initrd
sits page-aligned as high as ``initrd_addr_max`` and RAM allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvm_vmm import layout
from kvm_vmm.e820 import e820_map
from kvm_vmm.loaders.elf import ELFCLASS64, EM_X86_64, is_elf, parse_elf_executable
from kvm_vmm.loaders.errors import (
    CommandLineError,
    ImageFormatError,
    PlacementError,
    TruncatedImageError,
    UnsupportedImageError,
)
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.loaders.image import EntryState, LoadedImage, check_fits
from kvm_vmm.loaders.kernel_cache import decompress_kernel
from kvm_vmm.loaders.linux_header import (
    XLF_KERNEL_64,
    SetupHeader,
    is_bzimage,
    parse_setup_header,
    vmlinux_setup_header,
)
from kvm_vmm.loaders.zero_page import Ramdisk, build_zero_page

LinuxBootPath = Literal["bzimage", "vmlinux"]

STARTUP_64_OFFSET = 0x200  # the 64-bit entry's offset into the protected-mode kernel
VMLINUX_ALIGNMENT = 0x200000  # CONFIG_PHYSICAL_ALIGN of x86-64 kernels


@dataclass(frozen=True)
class KernelPlacement:
    segments: list[tuple[int, bytes]]
    entry: int
    load_address: int
    end: int  # one past the highest byte the kernel needs before it reads the memory map
    notes: list[str]


def _check_cmdline(cmdline: str, header: SetupHeader) -> bytes:
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise CommandLineError("the kernel command line contains a NUL byte")
    if len(encoded) > header.cmdline_size:
        raise CommandLineError(
            f"the kernel command line is {len(encoded)} bytes; this kernel accepts at most "
            f"{header.cmdline_size} (cmdline_size)"
        )
    if len(encoded) + 1 > layout.COMMAND_LINE.size:
        raise CommandLineError(
            f"the kernel command line is {len(encoded)} bytes; the VMM's area holds "
            f"{layout.COMMAND_LINE.size - 1}"
        )
    return encoded + b"\0"


def _protected_mode_kernel(image: bytes, header: SetupHeader) -> bytes:
    return image[header.setup_size : header.setup_size + header.syssize * 16]


def _place_bzimage(image: bytes, header: SetupHeader, ram_size: int) -> KernelPlacement:
    if not header.xloadflags & XLF_KERNEL_64:
        raise UnsupportedImageError(
            f"bzImage: xloadflags 0x{header.xloadflags:x} lack XLF_KERNEL_64: "
            "the kernel has no 64-bit entry point at offset 0x200"
        )
    kernel = _protected_mode_kernel(image, header)
    load_address = header.pref_address
    end = load_address + max(header.init_size, len(kernel))
    low_end = layout.low_ram_end(ram_size)
    if end > low_end:
        how = "relocatable" if header.relocatable_kernel else "not relocatable"
        raise PlacementError(
            f"bzImage: the kernel ({how}) needs 0x{end - load_address:x} bytes of RAM from "
            f"0x{load_address:x} (init_size) but RAM below the PCI hole ends at 0x{low_end:x}"
        )
    return KernelPlacement(
        [(load_address, kernel)], load_address + STARTUP_64_OFFSET, load_address, end, []
    )


def _place_vmlinux(
    elf_image: bytes, header: SetupHeader, ram_size: int, what: str
) -> KernelPlacement:
    elf = parse_elf_executable(elf_image, ELFCLASS64, EM_X86_64, what, ram_size)
    entry = elf.physical_entry(entry_is_physical=True)
    if entry is None:
        raise PlacementError(
            f"{what}: ELF entry point 0x{elf.entry:x} is outside every PT_LOAD segment"
        )
    segments = [(s.paddr, s.data) for s in elf.segments if s.data]
    load_address = min(gpa for gpa, _ in segments)
    image_end = max(gpa + len(data) for gpa, data in segments)
    runtime_end = header.pref_address + header.init_size if header.init_size else 0
    return KernelPlacement(segments, entry, load_address, max(image_end, runtime_end), [])


def _payload(image: bytes, header: SetupHeader) -> bytes:
    kernel = _protected_mode_kernel(image, header)
    start, length = header.payload_offset, header.payload_length
    if length == 0:
        raise ImageFormatError("bzImage: payload_length is 0, the image carries no payload")
    if start + length > len(kernel):
        raise TruncatedImageError(
            f"bzImage: the payload (offset 0x{start:x}, 0x{length:x} bytes into the "
            f"protected-mode kernel) runs past its end (0x{len(kernel):x} bytes)"
        )
    return kernel[start : start + length]


def _place_decompressed(
    image: bytes, header: SetupHeader, ram_size: int, cache_dir: Path | None
) -> KernelPlacement:
    result = decompress_kernel(_payload(image, header), ram_size, cache_dir)
    placement = _place_vmlinux(result.data, header, ram_size, f"{result.compression} payload")
    if result.cache_problem is not None:
        placement.notes.append(f"decompressed-kernel cache not used: {result.cache_problem}")
    return placement


def _place_initrd(initrd: bytes, header: SetupHeader, kernel_end: int, ram_size: int) -> Ramdisk:
    top = min(header.initrd_addr_max + 1, layout.low_ram_end(ram_size))
    address = (top - len(initrd)) // layout.PAGE_SIZE * layout.PAGE_SIZE
    if address < kernel_end:
        raise PlacementError(
            f"the initrd ({len(initrd)} bytes) does not fit between the kernel's end "
            f"0x{kernel_end:x} and 0x{top:x} (the lower of initrd_addr_max + 1 and the "
            "end of RAM below the PCI hole)"
        )
    return Ramdisk(address, len(initrd))


def kernel_elf(image: bytes, max_size: int, cache_dir: Path | None = None) -> bytes:
    """The kernel's ELF vmlinux: ``image`` itself, or a bzImage's payload decompressed
    (through the cache in ``cache_dir``), e.g. to read its symbols."""
    if is_bzimage(image):
        payload = _payload(image, parse_setup_header(image))
        return decompress_kernel(payload, max_size, cache_dir).data
    if is_elf(image):
        return image
    raise ImageFormatError("the kernel is neither a bzImage nor an ELF vmlinux")


def load_linux_image(
    image: bytes,
    ram_size: int,
    cmdline: str = "",
    initrd: bytes | None = None,
    boot_path: LinuxBootPath = "vmlinux",
    acpi_rsdp_address: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedImage:
    """Load a bzImage or a bare ELF vmlinux held in ``image``.

    ``boot_path`` only matters for a bzImage; ``cache_dir`` (None: no cache)
    keeps host-decompressed kernels for the "vmlinux" path.
    """
    if is_bzimage(image):
        header = parse_setup_header(image)
        if boot_path == "bzimage":
            placement = _place_bzimage(image, header, ram_size)
        else:
            placement = _place_decompressed(image, header, ram_size, cache_dir)
    elif is_elf(image):
        header = vmlinux_setup_header(VMLINUX_ALIGNMENT)
        placement = _place_vmlinux(image, header, ram_size, "vmlinux")
    else:
        raise ImageFormatError(
            "the kernel is neither a bzImage (no 'HdrS' at offset 0x202) nor an ELF vmlinux "
            f"(it starts with {image[:4].hex(' ')})"
        )
    command_line = _check_cmdline(cmdline, header)

    kernel_only = LoadedImage(placement.segments, EntryState("long64", placement.entry))
    check_fits(kernel_only, ram_size, layout.LINUX_BOOT_AREAS)

    segments = list(placement.segments)
    ramdisk = None
    if initrd:
        ramdisk = _place_initrd(initrd, header, placement.end, ram_size)
        segments.append((ramdisk.address, initrd))
    zero_page = build_zero_page(
        header,
        placement.load_address,
        layout.COMMAND_LINE.start,
        ramdisk,
        e820_map(ram_size),
        acpi_rsdp_address,
    )
    segments += [(layout.ZERO_PAGE.start, zero_page), (layout.COMMAND_LINE.start, command_line)]
    loaded = LoadedImage(
        segments=segments,
        entry_state=EntryState("long64", placement.entry, {"rsi": layout.ZERO_PAGE.start}),
        reserved=[
            (layout.ZERO_PAGE.start, len(zero_page)),
            (layout.COMMAND_LINE.start, len(command_line)),
        ],
        notes=placement.notes,
    )
    check_fits(loaded, ram_size, layout.LINUX_BOOT_AREAS)
    return loaded


def load_linux(
    kernel_path: Path,
    ram_size: int,
    cmdline: str = "",
    initrd_path: Path | None = None,
    boot_path: LinuxBootPath = "vmlinux",
    acpi_rsdp_address: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedImage:
    """Load a bzImage or ELF vmlinux file and its initrd (see :func:`load_linux_image`)."""
    image = read_boot_file(kernel_path, "kernel")
    initrd = None if initrd_path is None else read_boot_file(initrd_path, "initrd")
    return load_linux_image(
        image, ram_size, cmdline, initrd, boot_path, acpi_rsdp_address, cache_dir
    )
