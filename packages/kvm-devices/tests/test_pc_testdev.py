"""Tests of the pc-testdev model.

The reference is QEMU's hw/misc/pc-testdev.c (the version with ``test_irq_line_read``
and ``test_flush_page_read``): its region table (0xE0 ioport, 0xE4 flush page, 0xE8
byte-split ioport, 0x2000 irq lines x24, 0xFF000000 iomem of IOMEM_LEN = 64 KiB), its
``valid`` access sizes, and QEMU's memory core clipping an access at a region's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.pc_testdev import PcTestdev


@dataclass
class Recorder:
    irqs: list[tuple[int, bool]] = field(default_factory=list)
    flushes: list[int] = field(default_factory=list)

    def set_irq(self, line: int, level: bool) -> None:
        self.irqs.append((line, level))

    def flush(self, address: int) -> None:
        self.flushes.append(address)


def make() -> tuple[PcTestdev, Recorder]:
    recorder = Recorder()
    return PcTestdev(recorder.set_irq, recorder.flush), recorder


def test_region_table_of_testdev_realizefn() -> None:
    assert PcTestdev.BASE_SCRATCH == 0xE0 and PcTestdev.SCRATCH_SIZE == 4
    assert PcTestdev.BASE_FLUSH == 0xE4 and PcTestdev.FLUSH_SIZE == 4
    assert PcTestdev.BASE_SCRATCH_BYTE == 0xE8 and PcTestdev.SCRATCH_BYTE_SIZE == 4
    assert PcTestdev.BASE_IRQ == 0x2000 and PcTestdev.IRQ_SIZE == 24
    assert PcTestdev.BASE_IOMEM == 0xFF00_0000 and PcTestdev.IOMEM_SIZE == 0x10000
    device, _ = make()
    views = [
        device.scratch_port,
        device.flush_port,
        device.scratch_byte_port,
        device.irq_ports,
        device.iomem,
    ]
    assert all(isinstance(view, Device) for view in views)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_test_ioport_reads_back_what_was_written_at_that_width(size: int) -> None:
    device, _ = make()
    value = 0x8765_4321 & ((1 << (8 * size)) - 1)
    device.scratch_port.write(0, size, value)
    assert device.scratch_port.read(0, size) == value


def test_test_ioport_partial_writes_merge_little_endian() -> None:
    device, _ = make()
    device.scratch_port.write(0, 4, 0x1122_3344)
    device.scratch_port.write(2, 1, 0xAA)
    assert device.scratch_port.read(0, 4) == 0x11AA_3344
    device.scratch_port.write(1, 2, 0xBBCC)
    assert device.scratch_port.read(0, 4) == 0x11BB_CC44
    assert device.scratch_port.read(3, 1) == 0x11


def test_ioport_byte_region_shares_ioport_data() -> None:
    device, _ = make()
    device.scratch_port.write(0, 4, 0xDEAD_BEEF)
    assert device.scratch_byte_port.read(0, 4) == 0xDEAD_BEEF
    device.scratch_byte_port.write(1, 2, 0x1234)
    assert device.scratch_port.read(0, 4) == 0xDE12_34EF


def test_access_running_past_region_end_is_clipped() -> None:
    device, _ = make()
    device.scratch_port.write(2, 4, 0x5566_7788)
    assert device.scratch_port.read(0, 4) == 0x7788_0000
    assert device.scratch_port.read(2, 4) == 0xFFFF_7788


def test_test_flush_page_write_passes_page_of_address() -> None:
    device, recorder = make()
    device.flush_port.write(0, 4, 0x0012_3ABC)
    assert recorder.flushes == [0x0012_3000]


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 2), (2, 2), (1, 4), (0, 8)])
def test_test_flush_ops_valid_only_4_bytes(offset: int, size: int) -> None:
    device, recorder = make()
    device.flush_port.write(offset, size, 0x1000)
    assert recorder.flushes == []
    assert device.flush_port.read(offset, size) == (1 << (8 * size)) - 1


def test_test_flush_page_read_returns_0_and_no_callback_is_fine() -> None:
    device = PcTestdev(lambda line, level: None)
    assert device.flush_port.read(0, 4) == 0
    device.flush_port.write(0, 4, 0x1000)


def test_test_irq_line_write_sets_line_offset_to_bool_of_value() -> None:
    device, recorder = make()
    device.irq_ports.write(0, 1, 1)
    device.irq_ports.write(23, 1, 0x80)
    device.irq_ports.write(23, 1, 0)
    device.irq_ports.write(5, 1, 0xFF)
    assert recorder.irqs == [(0, True), (23, True), (23, False), (5, True)]
    assert device.irq_levels[5] and device.irq_levels[0] and not device.irq_levels[23]


def test_test_irq_ops_valid_only_1_byte_and_read_returns_0() -> None:
    device, recorder = make()
    device.irq_ports.write(0, 2, 0x0101)
    device.irq_ports.write(24, 1, 1)
    assert recorder.irqs == []
    assert device.irq_ports.read(3, 1) == 0
    assert device.irq_ports.read(3, 2) == 0xFFFF
    assert device.irq_ports.read(24, 1) == 0xFF


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_test_iomem_reads_back_little_endian(size: int) -> None:
    device, _ = make()
    value = 0x0102_0304_0506_0708 & ((1 << (8 * size)) - 1)
    device.iomem.write(0x100, size, value)
    assert device.iomem.read(0x100, size) == value
    assert device.iomem.read(0x100, 1) == 0x08


def test_test_iomem_end_of_window_is_clipped() -> None:
    device, _ = make()
    device.iomem.write(0xFFFE, 4, 0xAABB_CCDD)
    assert device.iomem.read(0xFFFE, 2) == 0xCCDD
    assert device.iomem.read(0xFFFE, 4) == 0xFFFF_CCDD
    assert device.iomem.read(0x10000, 8) == (1 << 64) - 1


def test_snapshot_round_trip_restores_memory_and_registers() -> None:
    device, _ = make()
    device.scratch_port.write(0, 4, 0xCAFE_F00D)
    device.iomem.write(0x42, 8, 0x1122_3344_5566_7788)
    device.irq_ports.write(7, 1, 1)
    saved = device.save()
    other, recorder = make()
    other.restore(saved)
    assert other.save() == saved
    assert other.scratch_port.read(0, 4) == 0xCAFE_F00D
    assert other.iomem.read(0x42, 8) == 0x1122_3344_5566_7788
    assert other.irq_levels[7]
    assert recorder.irqs == []  # restoring does not drive the lines


@pytest.mark.parametrize(
    "bad",
    [
        {"scratch": 1 << 32},
        {"scratch": "0"},
        {"irq_levels": [False] * 23},
        {"irq_levels": [0] * 24},
        {"iomem": bytes(10)},
        {"extra": 1},
    ],
)
def test_malformed_snapshot_raises(bad: dict[str, object]) -> None:
    device, _ = make()
    saved = device.save()
    saved.update(bad)
    with pytest.raises(ValueError):
        device.restore(saved)


VIEWS = ["scratch_port", "flush_port", "scratch_byte_port", "irq_ports", "iomem"]
LENGTHS = {"scratch_port": 4, "flush_port": 4, "scratch_byte_port": 4, "irq_ports": 24}
accesses = st.tuples(
    st.sampled_from(VIEWS),
    st.booleans(),
    st.integers(min_value=0, max_value=0x10004),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(accesses, max_size=40))
def test_fuzz_matches_a_byte_array_model_and_never_raises(
    ops: list[tuple[str, bool, int, int, int]],
) -> None:
    device, recorder = make()
    scratch = bytearray(4)
    iomem: dict[int, int] = {}
    for view_name, is_write, raw_offset, size, value in ops:
        view: Device = getattr(device, view_name)
        offset = raw_offset if view_name == "iomem" else raw_offset % (LENGTHS[view_name] + 5)
        mask = (1 << (8 * size)) - 1
        if is_write:
            view.write(offset, size, value)
            for i in range(size):
                byte = (value >> (8 * i)) & 0xFF
                if view_name in ("scratch_port", "scratch_byte_port") and offset + i < 4:
                    scratch[offset + i] = byte
                if view_name == "iomem" and offset + i < 0x10000:
                    iomem[offset + i] = byte
            continue
        result = view.read(offset, size)
        assert 0 <= result <= mask
        if view_name in ("scratch_port", "scratch_byte_port"):
            expected = [scratch[offset + i] if offset + i < 4 else 0xFF for i in range(size)]
            assert result == int.from_bytes(bytes(expected), "little")
        elif view_name == "iomem":
            expected = [
                iomem.get(offset + i, 0) if offset + i < 0x10000 else 0xFF for i in range(size)
            ]
            assert result == int.from_bytes(bytes(expected), "little")
    assert all(0 <= line < 24 for line, _ in recorder.irqs)
    assert all(address & 0xFFF == 0 for address in recorder.flushes)
    saved = device.save()
    device.restore(saved)
    assert device.save() == saved
