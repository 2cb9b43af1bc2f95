"""The few local-APIC registers the VMM sets, in KVM_GET/SET_LAPIC's 1 KiB image.

Offsets and LVT encodings: Intel SDM vol. 3A, 11.5.1 (Local Vector Table).
"""

from __future__ import annotations

import struct

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
LVT_DELIVERY_MODE_SHIFT = 8
DELIVERY_MODE_NMI = 0b100
DELIVERY_MODE_EXTINT = 0b111
LINT0_EXTINT = DELIVERY_MODE_EXTINT << LVT_DELIVERY_MODE_SHIFT  # 0x700
LINT1_NMI = DELIVERY_MODE_NMI << LVT_DELIVERY_MODE_SHIFT  # 0x400
LAPIC_STATE_SIZE = 1024


def with_lvt(state: bytes, *, lint0: int | None = None, lint1: int | None = None) -> bytes:
    """A copy of a LAPIC image with LVT LINT0 and/or LINT1 replaced."""
    if len(state) != LAPIC_STATE_SIZE:
        raise ValueError(f"LAPIC state is {len(state)} bytes, expected {LAPIC_STATE_SIZE}")
    image = bytearray(state)
    if lint0 is not None:
        struct.pack_into("<I", image, APIC_LVT_LINT0, lint0)
    if lint1 is not None:
        struct.pack_into("<I", image, APIC_LVT_LINT1, lint1)
    return bytes(image)
