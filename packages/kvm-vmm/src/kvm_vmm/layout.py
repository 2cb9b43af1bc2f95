"""The guest-physical address map of the machine.

RAM starts at 0. Below 1 MiB it follows the PC: the real-mode IVT and BIOS
data area, then the VMM's boot data, the EBDA and the legacy VGA/BIOS hole.
RAM that would fall in the 32-bit PCI/MMIO hole (3 GiB-4 GiB) is moved above
4 GiB instead, as PC firmware does.

    0x0000_0000  real-mode IVT and BIOS data area        (0x500)
    0x0000_0500  boot GDT                                (0x100)
    0x0000_7000  Linux zero page (boot_params)           (0x1000)
    0x0000_8000  Multiboot information                   (0x1000)
    0x0000_9000  boot page tables: PML4, PDPT, 4 PDs     (0x6000, identity-maps 4 GiB)
    0x0002_0000  kernel command line (+ module strings)  (0x10000)
    0x0009_FC00  EBDA (reserved in the e820 map)         (0x400)
    0x000A_0000  VGA window and option ROMs              (reserved)
    0x000E_0000  ACPI tables, RSDP first (legacy scan)   (0x20000, up to 1 MiB)
    0x0010_0000  high memory: kernels load here and above
    0xC000_0000  32-bit PCI/MMIO hole: no RAM; the PCI windows, the IOAPIC
                 and the local APICs (kvm_vmm.board)
    0x1_0000_0000 RAM beyond 3 GiB continues here

The Linux boot protocol uses its areas at these fixed addresses and refuses a
kernel over them (:data:`LINUX_BOOT_AREAS`). A Multiboot kernel may load
anywhere in RAM, 0x8000 or 0xFF000 included: its boot data takes these
addresses only where the kernel leaves them free and goes to other free RAM
otherwise (:mod:`kvm_vmm.loaders.boot_memory`), and the ACPI tables move
within 0xC0000-0xFFFFF around it, the RSDP always in 0xE0000-0xFFFFF
(:mod:`kvm_vmm.acpi_placement`).
Boot data stays below 0x9FC00 or above 1 MiB, so that the e820 map can call
it usable RAM: it only holds what the kernel reads once and then reclaims.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
PAGE_SIZE = 0x1000


@dataclass(frozen=True)
class Region:
    """A named range of guest-physical addresses, ``[start, start + size)``."""

    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.start + self.size

    def overlaps(self, start: int, size: int) -> bool:
        return size > 0 and self.size > 0 and start < self.end and self.start < start + size

    def contains(self, start: int, size: int) -> bool:
        return self.start <= start and start + size <= self.end


REAL_MODE_IVT = Region("real-mode IVT and BIOS data", 0x0, 0x500)
BOOT_GDT = Region("boot GDT", 0x500, 0x100)
ZERO_PAGE = Region("Linux zero page", 0x7000, 0x1000)
MULTIBOOT_INFO = Region("Multiboot information", 0x8000, 0x1000)
BOOT_PAGE_TABLES = Region("boot page tables", 0x9000, 0x6000)
COMMAND_LINE = Region("kernel command line", 0x20000, 0x10000)
EBDA = Region("EBDA", 0x9FC00, 0x400)
LEGACY_HOLE = Region("VGA/BIOS hole", 0xA0000, 0x60000)
ACPI_TABLES = Region("ACPI tables", 0xE0000, 0x20000)

# Lower memory as the BIOS reports it (INT 12h, Multiboot mem_lower): up to the EBDA.
LOW_MEMORY_END = EBDA.start
HIGH_MEMORY_START = 0x100000

PCI_HOLE_START = 0xC000_0000
FOUR_GIB = 0x1_0000_0000

# What a Linux kernel image must never overwrite: the Linux loader puts its boot
# data at these fixed addresses, and the PC keeps its own areas. MULTIBOOT_INFO is
# not Linux's, but a vmlinux over it has always been refused and still is.
LINUX_BOOT_AREAS: tuple[Region, ...] = (
    REAL_MODE_IVT,
    BOOT_GDT,
    ZERO_PAGE,
    MULTIBOOT_INFO,
    BOOT_PAGE_TABLES,
    COMMAND_LINE,
    EBDA,
    LEGACY_HOLE,
)


def ram_regions(ram_size: int) -> list[Region]:
    """Where ``ram_size`` bytes of guest RAM appear: below the PCI hole, then above 4 GiB."""
    if ram_size <= 0:
        raise ValueError(f"guest RAM size must be positive, not {ram_size}")
    low = min(ram_size, PCI_HOLE_START)
    regions = [Region("RAM below the PCI hole", 0, low)]
    if ram_size > low:
        regions.append(Region("RAM above 4 GiB", FOUR_GIB, ram_size - low))
    return regions


def low_ram_end(ram_size: int) -> int:
    """One past the last byte of RAM below the PCI hole."""
    return ram_regions(ram_size)[0].end
