"""Multiboot kernels that load where QEMU loads them but the VMM's boot data used to be.

kvm-unit-tests' realmode.flat loads at 0x8000 (where the Multiboot information
was); a kernel linked with a plain ``ld -Ttext=0x100000`` has its ELF headers in
a PT_LOAD at 0xFF000 (in the BIOS area). Both boot under QEMU. Here our own
kernels, built at test time, load there and run to their debug-exit status: the
boot data goes around them (Multiboot Specification 0.6.96 section 3.3 fixes no
address for it; the kernel finds it through EBX), and the ACPI tables move
within 0xE0000-0xFFFFF, where the legacy RSDP scan (ACPI 6.5 section 5.2.5.1)
still finds them.
"""

from __future__ import annotations

import re

import pytest
from guests.multiboot import ImageLayout, KernelBuilder, KernelRunner

from kvm_vmm.loaders import LoadedImage, load_multiboot
from kvm_vmm.loaders.elf import ELFCLASS32, EM_386, parse_elf_executable

pytestmark = pytest.mark.kvm

MIB = 1 << 20
REALMODE_LOAD_ADDRESS = 0x8000
OLD_BOOT_DATA = (0x500, 0x8000, 0x9000, 0x20000)  # GDT, info, page tables, strings


def kernel_segments(loaded: LoadedImage) -> list[tuple[int, int]]:
    """(start, size) of what the kernel itself occupies: all but the boot data."""
    boot_data = set(loaded.reserved)
    return [(gpa, len(data)) for gpa, data in loaded.segments if (gpa, len(data)) not in boot_data]


@pytest.mark.parametrize("layout", ["elf32", "aout"])
def test_kernel_at_0x8000_gets_its_boot_information_elsewhere(
    kernels: KernelBuilder, runner: KernelRunner, layout: ImageLayout
) -> None:
    kernel = kernels.build("boot_info", layout, REALMODE_LOAD_ADDRESS)
    segments = kernel_segments(load_multiboot(kernel, 96 * MIB))
    start = min(gpa for gpa, _ in segments)
    end = max(gpa + size for gpa, size in segments)
    # The kernel (text to the end of its bss) covers what the old fixed areas held.
    assert start == REALMODE_LOAD_ADDRESS
    assert all(address < end for address in OLD_BOOT_DATA[1:])
    run = runner.run(kernel, "--memory", "96M", "--cmdline", "from 0x8000")
    assert run.passed, run.describe()
    printed = re.search(r"mem_upper=(\S+) cmdline=(.*) cpus=", run.serial)
    assert printed is not None, run.describe()
    assert int(printed.group(1), 16) == (96 * MIB - MIB) // 1024
    assert printed.group(2) == f"{kernel} from 0x8000"


def test_elf_with_its_headers_loaded_at_0xff000_runs(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    kernel = kernels.build("boot_info", "plain-ld", 0x100000)
    elf = parse_elf_executable(kernel.read_bytes(), ELFCLASS32, EM_386, "test kernel", 96 * MIB)
    first = min(elf.segments, key=lambda segment: segment.paddr)
    assert first.paddr == 0xFF000 and first.data[:4] == b"\x7fELF"
    run = runner.run(kernel, "--memory", "96M", "--cmdline", "plain ld")
    assert run.passed, run.describe()
    assert f"cmdline={kernel} plain ld cpus=" in run.serial


def test_kernel_over_0xe0000_moves_the_acpi_tables_where_the_scan_finds_them(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    kernel = kernels.build("acpi_scan", "elf32", 0xE0000)
    segments = kernel_segments(load_multiboot(kernel, 64 * MIB))
    assert min(gpa for gpa, _ in segments) == 0xE0000  # where the tables were
    run = runner.run(kernel, "--memory", "64M")
    assert run.passed, run.describe()
    printed = re.search(r"rsdp=(\S+) rsdt=(\S+)", run.serial)
    assert printed is not None, run.describe()
    rsdp, rsdt = (int(value, 16) for value in printed.groups())
    assert 0xE0000 < rsdp < rsdt < 0x100000
    for address in (rsdp, rsdt):
        assert not any(gpa <= address < gpa + size for gpa, size in segments), hex(address)
