"""kvmfast.x86's two GDT layouts: each selector names the descriptor its segment-register
state says, in both modes (Intel SDM vol. 3A §3.4.5: type, S, DPL, P, L, D/B, G)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from kvmfast import x86

Layout = tuple[Callable[..., bytes], int, int]
LAYOUTS: dict[str, Layout] = {
    "flat guests": (x86.flat_guest_gdt, x86.FLAT_GUEST_CS, x86.FLAT_GUEST_DS),
    "Linux boot": (x86.linux_boot_gdt, x86.LINUX_BOOT_CS, x86.LINUX_BOOT_DS),
}


def loaded_from(descriptor: int) -> dict[str, int]:
    access, flags = descriptor >> 40 & 0xFF, descriptor >> 52 & 0xF
    limit = (descriptor & 0xFFFF) | (descriptor >> 48 & 0xF) << 16
    base = (descriptor >> 16 & 0xFF_FFFF) | (descriptor >> 56 & 0xFF) << 24
    return {
        "base": base,
        "limit": (limit << 12 | 0xFFF) if flags >> 3 else limit,
        "type": access & 0xF,
        "s": access >> 4 & 1,
        "dpl": access >> 5 & 3,
        "present": access >> 7,
        "avl": flags & 1,
        "l": flags >> 1 & 1,
        "db": flags >> 2 & 1,
        "g": flags >> 3,
    }


def test_the_selectors_are_the_ones_guests_and_linux_are_written_for() -> None:
    assert (x86.FLAT_GUEST_CS, x86.FLAT_GUEST_DS) == (0x08, 0x10)
    # Documentation/arch/x86/boot.rst: __BOOT_CS 0x10, __BOOT_DS 0x18.
    assert (x86.LINUX_BOOT_CS, x86.LINUX_BOOT_DS) == (0x10, 0x18)


@pytest.mark.parametrize("long_mode", [True, False])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_selector_holds_the_descriptor_its_segment_state_says(
    name: str, long_mode: bool
) -> None:
    build, cs, ds = LAYOUTS[name]
    gdt = build(long_mode=long_mode)
    assert struct.unpack_from("<Q", gdt, 0)[0] == 0  # the null descriptor
    for selector, code in ((cs, True), (ds, False)):
        (descriptor,) = struct.unpack_from("<Q", gdt, selector)
        state = x86.flat_segment(selector, code=code, long_mode=long_mode)
        expected = {key: value for key, value in state.items() if key in loaded_from(0)}
        assert loaded_from(descriptor) == expected, (name, selector)
    assert x86.flat_segment(cs, code=True, long_mode=long_mode)["l"] == long_mode


def test_a_user_segment_is_its_descriptor_with_dpl_3() -> None:
    user_data = x86.GDT_DATA | 3 << 45
    state = x86.flat_segment(0x23, code=False, long_mode=True, dpl=3)
    assert loaded_from(user_data) == {k: v for k, v in state.items() if k in loaded_from(0)}
