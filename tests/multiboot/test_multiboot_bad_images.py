"""Kernels that cannot be booted: one clear line on stderr and exit status 2, the guest never runs.

Multiboot Specification 0.6.96 section 3.1 (the header: magic, flags, checksum and,
with flags bit 16, the address fields of section 3.1.3) and the ELF32 program headers;
kvm_vmm.layout for RAM, the device windows and the ACPI tables' range.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from guests.multiboot import KernelBuilder, KernelRunner

pytestmark = pytest.mark.kvm

USAGE_ERROR = 2
MB_HEADER_MAGIC = 0x1BADB002
MB_ADDRESS_FIELDS = 1 << 16
HALT_FOREVER = b"\xf4\xeb\xfd"  # hlt; jmp back to it
HEADER_SIZE = 32


def aout_kernel(
    load_addr: int, entry_addr: int, load_end_addr: int = 0, bss_end_addr: int = 0
) -> bytes:
    """A header with the address fields (3.1.3) at offset 0, loaded from load_addr."""
    checksum = -(MB_HEADER_MAGIC + MB_ADDRESS_FIELDS) & 0xFFFFFFFF
    header = struct.pack(
        "<8I",
        MB_HEADER_MAGIC,
        MB_ADDRESS_FIELDS,
        checksum,
        load_addr,  # header_addr: the header is the first loaded byte
        load_addr,
        load_end_addr,
        bss_end_addr,  # 0: no bss
        entry_addr,
    )
    return header + HALT_FOREVER


def refused(runner: KernelRunner, kernel: Path, *options: str) -> str:
    """Run ``kernel``; assert it is refused before it runs; the error message."""
    run = runner.run(kernel, "--memory", "64M", *options)
    assert run.status == USAGE_ERROR, run.describe()
    assert run.serial == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("kvm-vmm: error: ")]
    assert len(errors) == 1, run.describe()
    return errors[0]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_3_1_no_multiboot_header(runner: KernelRunner, tmp_path: Path) -> None:
    kernel = write(tmp_path, "no-header.bin", bytes(16384))
    assert "nor a Multiboot image (magic 0x1BADB002" in refused(runner, kernel)


def test_3_1_header_cut_by_the_end_of_the_file(runner: KernelRunner, tmp_path: Path) -> None:
    kernel = write(tmp_path, "cut-header.bin", aout_kernel(0x200000, 0x200020)[:20])
    assert "needs 32 bytes but the image ends at 0x14" in refused(runner, kernel)


def test_3_1_3_image_shorter_than_load_end_addr(
    kernels: KernelBuilder, runner: KernelRunner, tmp_path: Path
) -> None:
    whole = kernels.build("smp", "aout").read_bytes()
    kernel = write(tmp_path, "truncated.bin", whole[: len(whole) // 2])
    message = refused(runner, kernel)
    assert f"but the file ends at {len(whole) // 2:#x}" in message


def test_elf_segment_cut_by_the_end_of_the_file(
    kernels: KernelBuilder, runner: KernelRunner, tmp_path: Path
) -> None:
    whole = kernels.build("smp", "elf32").read_bytes()
    header_offset = whole.find(struct.pack("<I", MB_HEADER_MAGIC))
    kernel = write(tmp_path, "truncated.flat", whole[: header_offset + 0x100])
    assert "runs past the end of the file" in refused(runner, kernel)


def test_3_1_3_load_address_outside_ram(runner: KernelRunner, tmp_path: Path) -> None:
    kernel = write(tmp_path, "high.bin", aout_kernel(0x8000000, 0x8000000 + HEADER_SIZE))
    assert "load address 0x8000000 outside RAM" in refused(runner, kernel)


@pytest.mark.parametrize(
    ("load_addr", "window"),
    [(0xFEC00000, "IOAPIC window (0xfec00000-0xfec00fff)"),
     (0xFEE00000, "local APIC window (0xfee00000-0xfee00fff)")],
)  # fmt: skip
def test_3_1_3_load_address_over_a_device_window(
    runner: KernelRunner, tmp_path: Path, load_addr: int, window: str
) -> None:
    kernel = write(tmp_path, "mmio.bin", aout_kernel(load_addr, load_addr + HEADER_SIZE))
    assert f"overlaps the {window}, which is not RAM" in refused(runner, kernel)


def test_3_1_3_kernel_over_all_of_0xe0000_to_0xfffff_leaves_no_place_for_the_rsdp(
    runner: KernelRunner, tmp_path: Path
) -> None:
    """The one place the ACPI tables cannot leave: the legacy scan's range (ACPI 6.5
    section 5.2.5.1). Lower boot areas are no refusal: the boot data goes elsewhere."""
    image = aout_kernel(0xE0000, 0xE0000 + HEADER_SIZE, bss_end_addr=0x100000)
    message = refused(runner, write(tmp_path, "bios.bin", image))
    assert "no room for the RSDP (36 bytes) in 0xe0000-0xfffff; taken there: " in message
    assert "the kernel's segment 0xe0000-0xfffff; the RSDP cannot go elsewhere" in message


def test_3_1_3_entry_outside_the_image(runner: KernelRunner, tmp_path: Path) -> None:
    kernel = write(tmp_path, "entry.bin", aout_kernel(0x200000, 0x300000))
    assert "entry_addr 0x300000 is outside the loaded image" in refused(runner, kernel)


def test_elf_entry_outside_every_segment(
    kernels: KernelBuilder, runner: KernelRunner, tmp_path: Path
) -> None:
    elf = bytearray(kernels.build("smp", "elf32").read_bytes())
    e_entry_offset = 24  # ELF32 header: e_ident[16], e_type, e_machine, e_version, e_entry
    struct.pack_into("<I", elf, e_entry_offset, 0x100)
    kernel = write(tmp_path, "entry.flat", bytes(elf))
    assert "ELF entry point 0x100 is outside every PT_LOAD segment" in refused(runner, kernel)
