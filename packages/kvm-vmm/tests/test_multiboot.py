"""The Multiboot loader against the Multiboot Specification 0.6.96: the header (3.1),
the machine state (3.2) and the boot information (3.3). Kernels are built here with
struct, and, where binutils is installed, assembled and linked as kvm-unit-tests are."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvm_vmm import layout
from kvm_vmm.e820 import E820Type, e820_map
from kvm_vmm.loaders import (
    BootFileError,
    CommandLineError,
    EntryState,
    ImageFormatError,
    LoadedImage,
    MultibootModule,
    PlacementError,
    TruncatedImageError,
    UnsupportedImageError,
    check_fits,
    load_kernel,
    load_multiboot,
    load_multiboot_image,
)

RAM = 64 * layout.MIB
MAGIC = 0x1BADB002


def mb_header(flags: int = 0, extra: bytes = b"", checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", MAGIC, flags, checksum) + extra


def elf32(
    segments: list[tuple[int, int, bytes, int]],
    entry: int,
    *,
    machine: int = 3,
    elf_type: int = 2,
) -> bytes:
    """An ELF32 executable; each segment is (paddr, vaddr, file bytes, memsz)."""
    phoff = 52
    data_offset = phoff + 32 * len(segments)
    headers = b""
    contents = b""
    for paddr, vaddr, data, memsz in segments:
        offset = data_offset + len(contents)
        headers += struct.pack("<8I", 1, offset, vaddr, paddr, len(data), memsz, 7, 0x1000)
        contents += data
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIIIIIHHHHHH", elf_type, machine, 1, entry, phoff, 0, 0, 52, 32, len(segments), 40, 0, 0
    )
    return ehdr + headers + contents


def simple_kernel(flags: int = 0, load: int = 0x400000, body: bytes = b"\xf4" * 64) -> bytes:
    """kvm-unit-tests' shape: the header opens the text, the entry follows it."""
    text = mb_header(flags) + body
    return elf32([(load, load, text, len(text) + 0x100)], entry=load + 12)


def segment_at(image: LoadedImage, gpa: int) -> bytes:
    for start, data in image.segments:
        if start == gpa:
            return data
    raise AssertionError(f"no segment at 0x{gpa:x}")


def read(image: LoadedImage, gpa: int, size: int) -> bytes:
    for start, data in image.segments:
        if start <= gpa and gpa + size <= start + len(data):
            return data[gpa - start : gpa - start + size]
    raise AssertionError(f"0x{gpa:x}+{size} is not in any segment")


def c_string(image: LoadedImage, gpa: int) -> str:
    for start, data in image.segments:
        if start <= gpa < start + len(data):
            end = data.index(b"\0", gpa - start)
            return data[gpa - start : end].decode()
    raise AssertionError(f"0x{gpa:x} is not in any segment")


def test_3_2_machine_state_protected_mode_with_magic_and_info_pointer() -> None:
    image = load_multiboot_image(simple_kernel(), RAM)
    assert image.entry_state == EntryState(
        "protected32", 0x400000 + 12, {"rax": 0x2BADB002, "rbx": layout.MULTIBOOT_INFO.start}
    )
    assert image.entry_state.rflags == 0x2  # IF clear
    text = segment_at(image, 0x400000)
    assert text[:4] == struct.pack("<I", MAGIC)
    assert text[-0x100:] == bytes(0x100)  # bss (p_memsz beyond p_filesz) is zero


def test_3_3_boot_information_fields() -> None:
    module = MultibootModule(b"ENV=1\n", "env.txt")
    image = load_multiboot_image(simple_kernel(), RAM, "console=ttyS0 -v", [module])
    info = layout.MULTIBOOT_INFO.start
    flags, mem_lower, mem_upper, _, cmdline, mods_count, mods_addr = struct.unpack(
        "<7I", read(image, info, 28)
    )
    assert flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert mem_lower == 639
    assert mem_upper == (RAM - layout.MIB) // 1024
    assert c_string(image, cmdline) == "console=ttyS0 -v"
    assert mods_count == 1
    start, end, string, _ = struct.unpack("<4I", read(image, mods_addr, 16))
    assert start % 0x1000 == 0 and end - start == len(module.data)
    assert read(image, start, end - start) == module.data
    assert c_string(image, string) == "env.txt"
    assert start >= 0x400000 + len(segment_at(image, 0x400000))
    mmap_length, mmap_addr = struct.unpack("<II", read(image, info + 44, 8))
    entries = [
        struct.unpack("<IQQI", read(image, mmap_addr + offset, 24))
        for offset in range(0, mmap_length, 24)
    ]
    assert entries == [(20, e.addr, e.size, int(e.type)) for e in e820_map(RAM)]
    (name,) = struct.unpack("<I", read(image, info + 64, 4))
    assert c_string(image, name) == "kvm-vmm"
    assert (info, len(segment_at(image, info))) in image.reserved


def test_3_3_mem_upper_stops_at_the_pci_hole() -> None:
    image = load_multiboot_image(simple_kernel(), 4 * layout.GIB)
    (mem_upper,) = struct.unpack("<I", read(image, layout.MULTIBOOT_INFO.start + 8, 4))
    assert mem_upper == (0xC0000000 - layout.MIB) // 1024


def test_3_1_1_header_must_be_4_byte_aligned() -> None:
    kernel = bytearray(simple_kernel())
    text_offset = 52 + 32
    kernel[text_offset : text_offset + 12] = bytes(12)
    kernel[text_offset + 2 : text_offset + 14] = mb_header()
    with pytest.raises(ImageFormatError, match="no Multiboot header"):
        load_multiboot_image(bytes(kernel), RAM)


def test_3_1_1_header_must_be_in_the_first_8192_bytes() -> None:
    body = bytes(8192) + mb_header()
    kernel = elf32([(0x400000, 0x400000, body, len(body))], entry=0x400000)
    with pytest.raises(ImageFormatError, match="no Multiboot header"):
        load_multiboot_image(kernel, RAM)


def test_3_1_2_bad_checksum_is_reported() -> None:
    text = mb_header(checksum=0x12345678) + b"\xf4"
    kernel = elf32([(0x400000, 0x400000, text, len(text))], entry=0x400000)
    with pytest.raises(ImageFormatError, match="checksum 0x12345678"):
        load_multiboot_image(kernel, RAM)


def test_3_1_2_a_later_valid_header_wins_over_a_bad_one() -> None:
    text = mb_header(checksum=1) + mb_header() + b"\xf4" * 8
    kernel = elf32([(0x400000, 0x400000, text, len(text))], entry=0x400000 + 24)
    assert load_multiboot_image(kernel, RAM).entry_state.rip == 0x400000 + 24


def test_3_1_2_unknown_requirement_bits_are_refused() -> None:
    with pytest.raises(UnsupportedImageError, match="bits 3, 15"):
        load_multiboot_image(simple_kernel(flags=(1 << 3) | (1 << 15)), RAM)


def test_3_1_2_unknown_optional_bits_are_ignored() -> None:
    image = load_multiboot_image(simple_kernel(flags=1 << 17), RAM)
    assert image.entry_state.rip == 0x400000 + 12


def test_3_1_2_requirements_page_align_and_memory_info_are_honoured() -> None:
    image = load_multiboot_image(
        simple_kernel(flags=0b11), RAM, modules=[MultibootModule(b"x", "a")] * 3
    )
    (mods_addr,) = struct.unpack("<I", read(image, layout.MULTIBOOT_INFO.start + 24, 4))
    starts = [struct.unpack("<I", read(image, mods_addr + 16 * i, 4))[0] for i in range(3)]
    assert all(start % 0x1000 == 0 for start in starts) and len(set(starts)) == 3


def test_3_1_4_video_mode_request_is_accepted_with_a_note() -> None:
    video = struct.pack("<4I", 0, 80, 25, 0)
    text = mb_header(1 << 2, bytes(20) + video) + b"\xf4"
    kernel = elf32([(0x400000, 0x400000, text, len(text))], entry=0x400000 + 48)
    image = load_multiboot_image(kernel, RAM)
    assert any("video mode" in note for note in image.notes)
    (flags,) = struct.unpack("<I", read(image, layout.MULTIBOOT_INFO.start, 4))
    assert not flags & 1 << 11


def aout_kernel(
    load_addr: int = 0x200000,
    header_offset: int = 0x40,
    load_end: int | None = None,
    bss_end: int | None = None,
    entry: int | None = None,
    size: int = 0x400,
) -> bytes:
    header_addr = load_addr + header_offset
    load_end_addr = load_addr + size if load_end is None else load_end
    bss_end_addr = load_end_addr + 0x1000 if bss_end is None else bss_end
    entry_addr = header_addr + 32 if entry is None else entry
    fields = struct.pack("<5I", header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr)
    image = bytearray(b"\x90" * size)
    image[header_offset : header_offset + 32] = mb_header(1 << 16, fields)
    return bytes(image)


def test_3_1_3_address_fields_load_the_file_from_load_addr() -> None:
    kernel = aout_kernel()
    image = load_multiboot_image(kernel, RAM)
    loaded = segment_at(image, 0x200000)
    assert loaded[:0x400] == kernel
    assert loaded[0x400:] == bytes(0x1000)  # bss_end_addr: zero-filled
    assert image.entry_state.rip == 0x200000 + 0x40 + 32


def test_3_1_3_load_end_addr_zero_means_the_rest_of_the_file() -> None:
    kernel = aout_kernel(load_end=0, bss_end=0)
    assert segment_at(load_multiboot_image(kernel, RAM), 0x200000) == kernel


def test_3_1_3_text_may_start_before_the_file_offset_of_the_header() -> None:
    # Header at file offset 0x40 but header_addr - load_addr = 0x10: the text
    # starts at file offset 0x30.
    kernel = bytearray(b"\x90" * 0x200)
    fields = struct.pack("<5I", 0x300010, 0x300000, 0x300100, 0, 0x300030)
    kernel[0x40:0x60] = mb_header(1 << 16, fields)
    image = load_multiboot_image(bytes(kernel), RAM)
    assert segment_at(image, 0x300000) == bytes(kernel[0x30:0x130])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"header_offset": 0x40, "load_addr": 0x200000, "size": 0x100, "load_end": 0x200800},
         TruncatedImageError, "file ends"),
        ({"bss_end": 0x200100}, ImageFormatError, "bss_end_addr"),
        ({"load_end": 0x1FF000}, ImageFormatError, "load_end_addr"),
        ({"entry": 0x100000}, PlacementError, "entry_addr 0x100000 is outside"),
        ({"load_addr": 0x8000000}, PlacementError, "outside RAM"),
        ({"load_addr": 0xFEC00000}, PlacementError,
         "segment 0xfec00000-0xfec013ff overlaps the IOAPIC window \\(0xfec00000-0xfec00fff\\)"),
        ({"load_addr": 0xFEDFF000}, PlacementError, "overlaps the local APIC window"),
    ],
)  # fmt: skip
def test_3_1_3_bad_address_fields(
    kwargs: dict[str, int], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        load_multiboot_image(aout_kernel(**kwargs), RAM)


def test_3_1_3_load_addr_above_header_addr_is_refused() -> None:
    fields = struct.pack("<5I", 0x200000, 0x200100, 0, 0, 0x200000)
    kernel = mb_header(1 << 16, fields) + bytes(0x200)
    with pytest.raises(ImageFormatError, match="load_addr 0x200100 is above header_addr"):
        load_multiboot_image(kernel, RAM)


def test_3_1_3_text_starting_before_the_file_is_refused() -> None:
    fields = struct.pack("<5I", 0x200100, 0x200000, 0, 0, 0x200100)
    kernel = mb_header(1 << 16, fields) + bytes(0x200)
    with pytest.raises(ImageFormatError, match="before the start of the file"):
        load_multiboot_image(kernel, RAM)


def test_header_cut_by_the_end_of_the_file_is_truncated() -> None:
    kernel = mb_header(1 << 16, b"\0" * 8)
    with pytest.raises(TruncatedImageError, match="needs 32 bytes"):
        load_multiboot_image(kernel, RAM)


def test_elf_virtual_entry_is_translated_to_physical() -> None:
    text = mb_header() + b"\xf4" * 16
    kernel = elf32([(0x400000, 0xC0400000, text, len(text))], entry=0xC0400000 + 12)
    assert load_multiboot_image(kernel, RAM).entry_state.rip == 0x400000 + 12


def test_elf_entry_outside_the_segments_is_refused() -> None:
    text = mb_header() + b"\xf4"
    kernel = elf32([(0x400000, 0x400000, text, len(text))], entry=0x500000)
    with pytest.raises(PlacementError, match="entry point 0x500000 is outside"):
        load_multiboot_image(kernel, RAM)


def test_elf_segment_past_the_end_of_the_file_is_truncated() -> None:
    kernel = simple_kernel()[:-10]
    with pytest.raises(TruncatedImageError, match="runs past the end of the file"):
        load_multiboot_image(kernel, RAM)


def test_elf_segment_larger_than_ram_is_refused_before_allocating() -> None:
    text = mb_header() + b"\xf4"
    kernel = elf32([(0x400000, 0x400000, text, 0xFFFFFFFF)], entry=0x400000)
    with pytest.raises(PlacementError, match="more than guest RAM"):
        load_multiboot_image(kernel, RAM)


def test_elf_for_another_machine_or_type_is_refused() -> None:
    text = mb_header() + b"\xf4"
    with pytest.raises(UnsupportedImageError, match="is for e_machine 40, expected x86"):
        load_multiboot_image(elf32([(0x400000,) * 2 + (text, 13)], 0x400000, machine=40), RAM)
    with pytest.raises(UnsupportedImageError, match="ET_DYN"):
        load_multiboot_image(elf32([(0x400000,) * 2 + (text, 13)], 0x400000, elf_type=3), RAM)


def test_64_bit_elf_without_address_fields_is_refused() -> None:
    kernel = bytearray(simple_kernel())
    kernel[4] = 2  # EI_CLASS = ELFCLASS64
    with pytest.raises(UnsupportedImageError, match="64-bit ELF"):
        load_multiboot_image(bytes(kernel), RAM)


def test_non_elf_without_address_fields_is_refused() -> None:
    with pytest.raises(ImageFormatError, match="not ELF"):
        load_multiboot_image(b"\x90" * 16 + mb_header() + b"\x90" * 16, RAM)


def test_module_too_big_for_ram_is_refused() -> None:
    module = MultibootModule(bytes(RAM), "big")
    with pytest.raises(PlacementError, match="module 0 \\('big'"):
        load_multiboot_image(simple_kernel(), RAM, modules=[module])


def test_command_line_longer_than_the_old_64_kib_area_is_passed_whole() -> None:
    image = load_multiboot_image(simple_kernel(), RAM, "x" * 0x18000)
    (cmdline,) = struct.unpack("<I", read(image, image.entry_state.registers["rbx"] + 16, 4))
    assert c_string(image, cmdline) == "x" * 0x18000


def test_command_line_with_a_nul_byte_is_refused() -> None:
    with pytest.raises(CommandLineError, match="NUL byte"):
        load_multiboot_image(simple_kernel(), RAM, "a\0b")


def test_load_multiboot_reads_files_and_names_missing_ones(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(simple_kernel())
    module = tmp_path / "env"
    module.write_bytes(b"A=1\n")
    image = load_multiboot(kernel, RAM, "x", [module])
    (mods_addr,) = struct.unpack("<I", read(image, layout.MULTIBOOT_INFO.start + 24, 4))
    (string,) = struct.unpack("<I", read(image, mods_addr + 8, 4))
    assert c_string(image, string) == str(module)
    with pytest.raises(BootFileError, match=r"module 0 file .*missing.* does not exist"):
        load_multiboot(kernel, RAM, "", [tmp_path / "missing"])
    with pytest.raises(BootFileError, match=r"kernel file .* is a directory"):
        load_multiboot(tmp_path, RAM)


def test_load_kernel_recognises_multiboot_and_passes_the_initrd_as_module_0(
    tmp_path: Path,
) -> None:
    kernel = tmp_path / "test.flat"
    kernel.write_bytes(simple_kernel())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"ENV\n")
    image = load_kernel(kernel, RAM, "arg", initrd)
    assert image.entry_state.mode == "protected32"
    (mods_count,) = struct.unpack("<I", read(image, layout.MULTIBOOT_INFO.start + 20, 4))
    assert mods_count == 1
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ImageFormatError, match="not a bzImage"):
        load_kernel(junk, RAM)


def test_check_fits_refuses_segments_in_the_pci_hole_and_overlapping_segments() -> None:
    state = EntryState("protected32", 0)
    areas = layout.LINUX_BOOT_AREAS
    check_fits(LoadedImage([(4 * layout.GIB, b"x")], state), 5 * layout.GIB, areas)
    with pytest.raises(PlacementError, match="segment 0xc0000000-0xc0000000 overlaps the PCI"):
        check_fits(LoadedImage([(0xC0000000, b"x")], state), 5 * layout.GIB)
    with pytest.raises(PlacementError, match="load address 0x4000000 outside RAM"):
        check_fits(LoadedImage([(RAM, b"x")], state), RAM)
    with pytest.raises(PlacementError, match="overlap"):
        check_fits(LoadedImage([(0x200000, b"ab"), (0x200001, b"c")], state), RAM)
    # Boot data the image itself declares may use a fixed area; nothing else may.
    own = LoadedImage([(0x7000, b"zp")], state, reserved=[(0x7000, 2)])
    check_fits(own, RAM, areas)
    with pytest.raises(PlacementError, match="Linux zero page"):
        check_fits(LoadedImage([(0x7000, b"zp")], state), RAM, areas)


def test_check_fits_refuses_segments_over_what_the_entry_state_writes() -> None:
    """cpu_setup writes the GDT (and for long mode the page tables) after the segments:
    a segment there would be overwritten, so it is refused, naming both."""
    protected = EntryState("protected32", 0x8000, gdt_address=0x1000)
    check_fits(LoadedImage([(0x9000, bytes(0x6000))], protected), RAM)
    with pytest.raises(PlacementError, match="overlaps the boot GDT \\(0x1000-0x101f\\)"):
        check_fits(LoadedImage([(0x1010, b"x")], protected), RAM)
    long_mode = EntryState("long64", 0x100000)
    with pytest.raises(PlacementError, match="overlaps the boot page tables"):
        check_fits(LoadedImage([(0xA000, b"x")], long_mode), RAM)
    with pytest.raises(PlacementError, match="boot GDT at 0x4000000-0x400001f is outside"):
        check_fits(LoadedImage([], EntryState("protected32", 0, gdt_address=RAM)), RAM)


def kernel_ranges(image: LoadedImage) -> list[tuple[int, int]]:
    """(start, size) of every segment that is not the loader's boot data."""
    boot_data = set(image.reserved)
    return [(gpa, len(data)) for gpa, data in image.segments if (gpa, len(data)) not in boot_data]


def boot_data_of(image: LoadedImage) -> list[tuple[int, int]]:
    """The info, the strings and the GDT: everything the VMM adds for a Multiboot kernel."""
    return [*image.reserved, (image.entry_state.gdt_address, 32)]


def assert_boot_data_clear_of_the_kernel(image: LoadedImage) -> None:
    """Boot data overlaps no kernel segment, and lies in RAM the memory map calls usable."""
    usable = [e for e in e820_map(RAM) if e.type == E820Type.RAM]
    for start, size in boot_data_of(image):
        assert not any(gpa < start + size and start < gpa + n for gpa, n in kernel_ranges(image))
        assert any(e.addr <= start and start + size <= e.end for e in usable), hex(start)


def test_realmode_flat_shape_at_0x8000_loads_with_its_boot_data_elsewhere() -> None:
    """kvm-unit-tests' realmode.flat: one segment 0x8000-0xa86b, where QEMU loads it."""
    text = mb_header() + b"\xf4" * (0xA86C - 0x8000 - 12)
    image = load_multiboot_image(elf32([(0x8000, 0x8000, text, len(text))], 0x800C), RAM, "r")
    assert kernel_ranges(image) == [(0x8000, 0x286C)]
    assert image.entry_state.rip == 0x800C
    assert_boot_data_clear_of_the_kernel(image)
    info = image.entry_state.registers["rbx"]
    (cmdline,) = struct.unpack("<I", read(image, info + 16, 4))
    assert c_string(image, cmdline) == "r"
    # Where the kernel leaves them free, the strings keep their old address.
    assert cmdline == layout.COMMAND_LINE.start


def test_kernel_over_every_old_boot_area_moves_all_of_it() -> None:
    """A kernel from 0x400 to 0x30000 covers the old GDT, information, page tables and
    strings; modules still follow from 1 MiB."""
    kernel = aout_kernel(load_addr=0x400, header_offset=0x40, size=0x2FC00, bss_end=0x30000)
    module = MultibootModule(b"M" * 100, "mod")
    image = load_multiboot_image(kernel, RAM, "c", [module])
    assert_boot_data_clear_of_the_kernel(image)
    info = image.entry_state.registers["rbx"]
    assert info >= 0x30000 and image.entry_state.gdt_address >= 0x30000
    mods_count, mods_addr = struct.unpack("<II", read(image, info + 20, 8))
    start, end, string, _ = struct.unpack("<4I", read(image, mods_addr, 16))
    assert mods_count == 1 and start == layout.HIGH_MEMORY_START
    assert read(image, start, end - start) == module.data and c_string(image, string) == "mod"


def test_kernel_filling_low_ram_gets_its_boot_data_above_1_mib() -> None:
    low = 0x9FC00 - 0x500
    kernel = aout_kernel(load_addr=0x500, size=low, bss_end=0x9FC00, header_offset=0x100)
    image = load_multiboot_image(kernel, RAM)
    assert_boot_data_clear_of_the_kernel(image)
    assert all(start >= layout.HIGH_MEMORY_START for start, _ in boot_data_of(image))


def test_kernel_in_the_ivt_ebda_and_vga_window_loads() -> None:
    """No device decodes those addresses here: RAM is there, as QEMU loads into them."""
    for load_addr in (0x0, 0x9F000, 0xB0000):
        image = load_multiboot_image(aout_kernel(load_addr=load_addr), RAM)
        assert kernel_ranges(image)[0][0] == load_addr
        assert_boot_data_clear_of_the_kernel(image)


def test_elf_headers_in_a_pt_load_at_0xff000_load() -> None:
    """ld -Ttext=0x100000 without a linker script: ELF and program headers in a PT_LOAD
    just below the text, in the BIOS area."""
    text = mb_header() + b"\xf4" * 64
    headers = b"\x7fELF" + bytes(0xB0)
    kernel = elf32(
        [(0xFF000, 0xFF000, headers, len(headers)), (0x100000, 0x100000, text, len(text))],
        entry=0x10000C,
    )
    image = load_multiboot_image(kernel, RAM)
    assert segment_at(image, 0xFF000) == headers
    assert_boot_data_clear_of_the_kernel(image)


def test_kernel_leaving_no_room_for_boot_data_is_refused_naming_what_takes_it() -> None:
    ram = 2 * layout.MIB
    kernel = aout_kernel(load_addr=0x500, size=0x800, bss_end=ram, header_offset=0x100)
    with pytest.raises(
        PlacementError,
        match=r"no room for the boot GDT \(32 bytes\) in 0x500-0x9fbff, 0x100000-0x1fffff; "
        r"taken there: the kernel's segment 0x500-0x1fffff$",
    ):
        load_multiboot_image(kernel, ram)


AS = shutil.which("as")
LD = shutil.which("ld")
OBJCOPY = shutil.which("objcopy")
NM = shutil.which("nm")

MINIMAL_KERNEL_ASM = """
.section .text
.globl start
.code32
mb_magic = 0x1BADB002
mb_flags = 0x0
    .long mb_magic, mb_flags, 0 - (mb_magic + mb_flags)
start:
    mov $0x2BADB002, %ecx
    cmp %ecx, %eax
    hlt
.section .bss
    .skip 0x3000
"""


def build_with_binutils(tmp_path: Path, as_flags: list[str], ld_emulation: str) -> Path:
    assert AS is not None and LD is not None
    source = tmp_path / "kernel.S"
    source.write_text(MINIMAL_KERNEL_ASM)
    obj = tmp_path / "kernel.o"
    elf = tmp_path / "kernel.elf"
    subprocess.run([AS, *as_flags, "-o", str(obj), str(source)], check=True)
    subprocess.run(
        [LD, "-m", ld_emulation, "-nostdlib", "-Ttext=0x400000", "-e", "start", "-o", str(elf),
         str(obj)],
        check=True,
    )  # fmt: skip
    return elf


def symbol_address(elf: Path, name: str) -> int:
    assert NM is not None
    for line in subprocess.run([NM, str(elf)], capture_output=True, text=True).stdout.split("\n"):
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return int(fields[0], 16)
    raise AssertionError(f"{name} not in {elf}")


@pytest.mark.skipif(AS is None or LD is None or NM is None, reason="binutils not installed")
def test_kernel_linked_by_ld_m_elf_i386_loads_at_its_symbols(tmp_path: Path) -> None:
    elf = build_with_binutils(tmp_path, ["--32"], "elf_i386")
    image = load_multiboot(elf, RAM)
    assert image.entry_state.rip == symbol_address(elf, "start")
    text = read(image, 0x400000, 12)
    assert text == mb_header()


@pytest.mark.skipif(
    AS is None or LD is None or NM is None or OBJCOPY is None, reason="binutils not installed"
)
def test_kvm_unit_tests_flat_file_64_bit_objects_converted_to_elf32_i386(tmp_path: Path) -> None:
    """kvm-unit-tests' x86 %.flat: a 64-bit link turned into elf32-i386 by objcopy."""
    assert OBJCOPY is not None
    elf = build_with_binutils(tmp_path, ["--64"], "elf_x86_64")
    flat = tmp_path / "test.flat"
    subprocess.run([OBJCOPY, "-O", "elf32-i386", str(elf), str(flat)], check=True)
    image = load_multiboot(flat, RAM)
    assert image.entry_state.rip == symbol_address(elf, "start")
    bss_end = max(gpa + len(data) for gpa, data in image.segments if gpa >= 0x400000)
    assert bss_end >= 0x400000 + 0x3000
