"""Guest kernel loaders: each turns a file into bytes at guest-physical addresses
and the CPU state to start it in (:class:`LoadedImage`).

:func:`load_kernel` tells the format from the file: a bzImage ("HdrS" at
0x202) or an ELF64 vmlinux boots through the Linux 64-bit protocol, an image
with a Multiboot header through Multiboot.
"""

from __future__ import annotations

from pathlib import Path

from kvm_vmm.loaders.elf import ELFCLASS64, elf_class, is_elf
from kvm_vmm.loaders.errors import (
    BootFileError,
    CommandLineError,
    DecompressionError,
    ImageFormatError,
    LoaderError,
    MissingDecompressorError,
    PlacementError,
    TruncatedImageError,
    UnsupportedImageError,
)
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.loaders.image import EntryMode, EntryState, LoadedImage, check_fits
from kvm_vmm.loaders.kernel_cache import default_cache_dir
from kvm_vmm.loaders.linux import LinuxBootPath, kernel_elf, load_linux, load_linux_image
from kvm_vmm.loaders.linux_header import is_bzimage
from kvm_vmm.loaders.multiboot import MultibootModule, load_multiboot, load_multiboot_image
from kvm_vmm.loaders.multiboot_header import find_multiboot_header

__all__ = [
    "BootFileError",
    "CommandLineError",
    "DecompressionError",
    "EntryMode",
    "EntryState",
    "ImageFormatError",
    "LinuxBootPath",
    "LoadedImage",
    "LoaderError",
    "MissingDecompressorError",
    "MultibootModule",
    "PlacementError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "check_fits",
    "default_cache_dir",
    "kernel_elf",
    "load_kernel",
    "load_linux",
    "load_linux_image",
    "load_multiboot",
    "load_multiboot_image",
]


def load_kernel(
    kernel_path: Path,
    ram_size: int,
    cmdline: str = "",
    initrd_path: Path | None = None,
    boot_path: LinuxBootPath = "vmlinux",
    acpi_rsdp_address: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedImage:
    """Load whatever kernel ``kernel_path`` holds.

    A bzImage boots as Linux; otherwise an image with a Multiboot header
    boots as Multiboot, and an ELF64 one as a Linux vmlinux.
    For a Multiboot kernel the initrd becomes module 0, its string the path
    as given; ``boot_path``, ``acpi_rsdp_address`` and ``cache_dir`` only
    concern Linux.
    """
    image = read_boot_file(kernel_path, "kernel")
    initrd = None if initrd_path is None else read_boot_file(initrd_path, "initrd")
    if not is_bzimage(image) and find_multiboot_header(image) is not None:
        modules = [] if initrd is None else [MultibootModule(initrd, str(initrd_path))]
        return load_multiboot_image(image, ram_size, cmdline, modules)
    if is_bzimage(image) or (is_elf(image) and elf_class(image) == ELFCLASS64):
        return load_linux_image(
            image, ram_size, cmdline, initrd, boot_path, acpi_rsdp_address, cache_dir
        )
    raise ImageFormatError(
        f"kernel {str(kernel_path)!r} is not a bzImage ('HdrS' at offset 0x202), an ELF64 "
        "vmlinux, nor a Multiboot image (magic 0x1BADB002 in its first 8192 bytes); "
        f"it starts with {image[:8].hex(' ')}"
    )
