"""Tests of the isa-debug-exit port.

The behaviour checked is that of QEMU's hw/misc/debugexit.c (``debug_exit_write``: exit
status ``(val << 1) | 1``; no read handler), the device kvm-unit-tests use at 0xF4/4.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.debug_exit import DebugExit
from kvm_devices.interfaces import Device


def make() -> tuple[DebugExit, list[int]]:
    codes: list[int] = []
    return DebugExit(codes.append), codes


def test_qemu_debugexit_write_exits_with_value_shifted_left_or_1() -> None:
    port, codes = make()
    port.write(0, 1, 0x00)
    port.write(0, 1, 0x10)
    port.write(0, 4, 0x7FFF_FFFF)
    assert codes == [0x01, 0x21, 0xFFFF_FFFF]


def test_qemu_debugexit_value_is_truncated_to_the_access_width() -> None:
    port, codes = make()
    port.write(0, 1, 0x1FF)
    port.write(0, 2, 0x12_3456)
    assert codes == [0x1FF, 0x68AD]


@pytest.mark.parametrize("offset", range(DebugExit.SIZE))
def test_qemu_debugexit_any_offset_inside_iosize_exits(offset: int) -> None:
    port, codes = make()
    port.write(offset, 1, 3)
    assert codes == [7]


def test_qemu_debugexit_writes_past_iosize_are_not_decoded() -> None:
    port, codes = make()
    port.write(DebugExit.SIZE, 1, 3)
    port.write(-1, 1, 3)
    assert codes == []


def test_qemu_debugexit_custom_iosize() -> None:
    codes: list[int] = []
    port = DebugExit(codes.append, size=1)
    port.write(1, 1, 3)
    port.write(0, 1, 3)
    assert codes == [7]
    with pytest.raises(ValueError):
        DebugExit(codes.append, size=0)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_qemu_debugexit_has_no_read_handler_reads_all_ones(size: int) -> None:
    port, codes = make()
    assert port.read(0, size) == (1 << (8 * size)) - 1
    assert codes == []


def test_conventional_place_is_kvm_unit_tests_iobase_0xf4_iosize_4() -> None:
    assert (DebugExit.BASE, DebugExit.SIZE) == (0xF4, 4)
    assert isinstance(make()[0], Device)


def test_snapshot_is_empty_and_round_trips() -> None:
    port, _ = make()
    saved = port.save()
    assert saved == {}
    port.restore(saved)
    assert port.save() == saved
    with pytest.raises(ValueError):
        port.restore({"bogus": 1})


accesses = st.tuples(
    st.booleans(),
    st.integers(min_value=0, max_value=DebugExit.SIZE + 4),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(accesses, max_size=30))
def test_fuzz_one_exit_per_decoded_write_and_reads_fit_the_width(
    ops: list[tuple[bool, int, int, int]],
) -> None:
    port, codes = make()
    expected: list[int] = []
    for is_write, offset, size, value in ops:
        if is_write:
            port.write(offset, size, value)
            if offset < DebugExit.SIZE:
                expected.append(((value & ((1 << (8 * size)) - 1)) << 1) | 1)
        else:
            assert port.read(offset, size) == (1 << (8 * size)) - 1
    assert codes == expected
    port.restore(port.save())
