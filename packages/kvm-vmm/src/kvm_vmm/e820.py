"""The BIOS E820 memory map of the guest, as INT 15h AX=E820h would report it.

Types follow the ACPI specification (6.5, section 15 "System Address Map
Interfaces", table 15.1). The map is derived from :mod:`kvm_vmm.layout`:
usable RAM up to the EBDA, the EBDA and VGA/BIOS hole reserved, usable RAM
from 1 MiB to the PCI hole, the PCI ECAM window reserved, and RAM moved above
4 GiB.

The ECAM window is reserved here as firmware does: Linux accepts the MCFG's
window only where something reserves it, the ACPI motherboard resources or,
failing those, an E820 reserved entry (``pci_mmcfg_reserved``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from kvm_vmm import board, layout


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        """The 20-byte ``struct boot_e820_entry`` of the Linux zero page."""
        return struct.pack("<QQI", self.addr, self.size, int(self.type))


def e820_map(ram_size: int) -> list[E820Entry]:
    """The guest's memory map for ``ram_size`` bytes of RAM, sorted and non-overlapping.

    RAM too small to reach 1 MiB is still all reported: usable below the EBDA,
    reserved from the EBDA up to its end.
    """
    low_end = layout.low_ram_end(ram_size)
    entries = [E820Entry(0, min(low_end, layout.LOW_MEMORY_END), E820Type.RAM)]
    if low_end > layout.LOW_MEMORY_END:
        reserved_end = min(low_end, layout.HIGH_MEMORY_START)
        entries.append(
            E820Entry(
                layout.LOW_MEMORY_END, reserved_end - layout.LOW_MEMORY_END, E820Type.RESERVED
            )
        )
    if low_end > layout.HIGH_MEMORY_START:
        entries.append(
            E820Entry(layout.HIGH_MEMORY_START, low_end - layout.HIGH_MEMORY_START, E820Type.RAM)
        )
    ecam = board.PCI_ECAM_WINDOW
    entries.append(E820Entry(ecam.start, ecam.size, E820Type.RESERVED))
    for region in layout.ram_regions(ram_size)[1:]:
        entries.append(E820Entry(region.start, region.size, E820Type.RAM))
    return entries
