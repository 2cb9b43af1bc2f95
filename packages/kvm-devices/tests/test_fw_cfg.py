"""Tests of the fw_cfg traditional interface.

Sections are those of QEMU's docs/specs/fw_cfg.rst ("Selector (Control) Register",
"Data Register", "Signature", "Revision / feature bitmap", "File Directory", "Ranges");
where the document defers to the source, QEMU's hw/nvram/fw_cfg.c (``fw_cfg_comb_valid``,
``fw_cfg_comb_write``, ``fw_cfg_select``, ``fw_cfg_data_read``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.fw_cfg import (
    ARCH_LOCAL,
    FILE_FIRST,
    FwCfg,
    FwCfgItem,
    le16,
    le32,
    le64,
)
from kvm_devices.interfaces import Device

SEL = FwCfg.SELECTOR_OFFSET
DATA = FwCfg.DATA_OFFSET


def select(device: FwCfg, key: int) -> None:
    device.write(SEL, 2, key)


def read_bytes(device: FwCfg, count: int) -> bytes:
    return bytes(device.read(DATA, 1) for _ in range(count))


def read_item(device: FwCfg, key: int, count: int) -> bytes:
    select(device, key)
    return read_bytes(device, count)


def test_register_locations_x86_selector_0x510_data_0x511() -> None:
    device = FwCfg(ram_size=1 << 30, nb_cpus=2)
    assert FwCfg.BASE == 0x510 and FwCfg.LENGTH == 2 and (SEL, DATA) == (0, 1)
    assert isinstance(device, Device)


def test_signature_item_reads_qemu() -> None:
    assert read_item(FwCfg(1 << 30, 1), FwCfgItem.SIGNATURE, 4) == b"QEMU"


def test_after_reset_the_signature_is_selected() -> None:
    assert read_bytes(FwCfg(1 << 30, 1), 4) == b"QEMU"


def test_id_feature_bitmap_traditional_interface_only_no_dma() -> None:
    assert read_item(FwCfg(1 << 30, 1), FwCfgItem.ID, 4) == le32(1)


def test_numbered_items_of_an_x86_machine() -> None:
    device = FwCfg(ram_size=0x1_2345_6000, nb_cpus=3, max_cpus=8)
    assert read_item(device, FwCfgItem.RAM_SIZE, 8) == le64(0x1_2345_6000)
    assert read_item(device, FwCfgItem.NB_CPUS, 2) == le16(3)
    assert read_item(device, FwCfgItem.MAX_CPUS, 2) == le16(8)
    assert read_item(device, FwCfgItem.UUID, 16) == bytes(16)
    assert read_item(device, FwCfgItem.NOGRAPHIC, 2) == le16(1)
    assert read_item(device, FwCfgItem.BOOT_MENU, 2) == le16(0)
    assert device.item(FwCfgItem.NUMA) == bytes(8 * 9)  # 0 nodes, 8 per-CPU entries


def test_data_offset_past_item_end_reads_zero_and_stays() -> None:
    device = FwCfg(1 << 30, 1)
    assert read_item(device, FwCfgItem.SIGNATURE, 7) == b"QEMU\0\0\0"
    assert device.save() == {"selector": 0, "offset": 4}


def test_unknown_selector_reads_zeros() -> None:
    device = FwCfg(1 << 30, 1)
    for key in (0x001A, 0x1234, 0x3FFF, 0x8000, 0xBFFF):
        assert read_item(device, key, 4) == bytes(4)


def test_selecting_resets_the_data_offset() -> None:
    device = FwCfg(1 << 30, 1)
    assert read_item(device, FwCfgItem.SIGNATURE, 2) == b"QE"
    assert read_item(device, FwCfgItem.SIGNATURE, 4) == b"QEMU"


def test_bit14_write_channel_is_ignored_for_reads() -> None:
    device = FwCfg(1 << 30, 1)
    assert read_item(device, 0x4000 | FwCfgItem.SIGNATURE, 4) == b"QEMU"


def test_bit15_selects_architecture_specific_items() -> None:
    device = FwCfg(1 << 30, 1, items={ARCH_LOCAL | 3: b"e820"})
    assert read_item(device, ARCH_LOCAL | 3, 4) == b"e820"
    assert read_item(device, 3, 8) == le64(1 << 30)


def test_given_kernel_items_are_served() -> None:
    device = FwCfg(
        1 << 30,
        1,
        items={
            FwCfgItem.KERNEL_SIZE: le32(0x1000),
            FwCfgItem.CMDLINE_DATA: b"console=ttyS0\0",
        },
    )
    assert read_item(device, FwCfgItem.KERNEL_SIZE, 4) == le32(0x1000)
    assert read_item(device, FwCfgItem.CMDLINE_DATA, 14) == b"console=ttyS0\0"


def test_file_directory_big_endian_entries_in_name_order() -> None:
    device = FwCfg(1 << 30, 1, files={"opt/b": b"BBB", "etc/a": b"A", "opt/a": b""})
    directory = device.item(FwCfgItem.FILE_DIR)
    assert directory[:4] == (3).to_bytes(4, "big")
    entries = [directory[4 + 64 * i : 4 + 64 * (i + 1)] for i in range(3)]
    names = [entry[8:].rstrip(b"\0") for entry in entries]
    assert names == [b"etc/a", b"opt/a", b"opt/b"]
    sizes = [int.from_bytes(entry[:4], "big") for entry in entries]
    selects = [int.from_bytes(entry[4:6], "big") for entry in entries]
    assert sizes == [1, 0, 3]
    assert selects == [FILE_FIRST, FILE_FIRST + 1, FILE_FIRST + 2]
    assert all(entry[6:8] == b"\0\0" for entry in entries)
    assert read_item(device, FILE_FIRST + 2, 4) == b"BBB\0"
    assert len(directory) == 4 + 3 * 64


def test_empty_file_directory_is_a_zero_count() -> None:
    assert FwCfg(1 << 30, 1).item(FwCfgItem.FILE_DIR) == bytes(4)


def test_comb_write_8_bit_is_a_data_write_and_is_ignored() -> None:
    device = FwCfg(1 << 30, 1)
    select(device, FwCfgItem.NB_CPUS)
    device.write(SEL, 1, FwCfgItem.SIGNATURE)
    device.write(DATA, 1, 0x55)
    assert read_bytes(device, 2) == le16(1)


def test_comb_read_8_bit_at_selector_port_reads_data() -> None:
    device = FwCfg(1 << 30, 1)
    assert device.read(SEL, 1) == ord("Q")
    assert device.read(DATA, 1) == ord("E")


@pytest.mark.parametrize(("offset", "size"), [(0, 2), (0, 4), (0, 8), (2, 1), (5, 2)])
def test_comb_valid_rejects_other_reads_as_undecoded(offset: int, size: int) -> None:
    device = FwCfg(1 << 30, 1)
    assert device.read(offset, size) == (1 << (8 * size)) - 1
    assert device.save()["offset"] == 0


@pytest.mark.parametrize(("offset", "size"), [(1, 2), (1, 4), (2, 2)])
def test_comb_valid_rejects_other_selector_writes(offset: int, size: int) -> None:
    device = FwCfg(1 << 30, 1)
    device.write(offset, size, FwCfgItem.NB_CPUS)
    assert device.save()["selector"] == FwCfgItem.SIGNATURE


@pytest.mark.parametrize("size", [4, 8])
def test_wide_selector_write_is_clipped_to_the_16_bit_selector(size: int) -> None:
    device = FwCfg(1 << 30, 1)
    device.write(SEL, size, 0xABCD_0000 | FwCfgItem.NB_CPUS)
    assert device.save()["selector"] == FwCfgItem.NB_CPUS


def test_read_straddling_the_window_end_is_clipped_to_the_data_byte() -> None:
    device = FwCfg(1 << 30, 1)
    assert device.read(DATA, 2) == 0xFF00 | ord("Q")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"files": {"": b""}}, "name"),
        ({"files": {"x" * 56: b""}}, "name"),
        ({"files": {"caf\u00e9": b""}}, "ASCII"),
        ({"items": {FwCfgItem.FILE_DIR: b""}}, "directory"),
        ({"items": {0x20: b""}}, "file range"),
        ({"items": {0x4001: b""}}, "read selector"),
        ({"nb_cpus": 0}, "nb_cpus"),
        ({"nb_cpus": 4, "max_cpus": 2}, "nb_cpus"),
    ],
)
def test_bad_configuration_raises(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"ram_size": 1 << 30, "nb_cpus": 1}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FwCfg(**arguments)  # type: ignore[arg-type]


def test_snapshot_keeps_selector_and_offset() -> None:
    device = FwCfg(1 << 30, 1, files={"etc/x": b"hello"})
    select(device, FILE_FIRST)
    read_bytes(device, 2)
    saved = device.save()
    assert saved == {"selector": FILE_FIRST, "offset": 2}
    other = FwCfg(1 << 30, 1, files={"etc/x": b"hello"})
    other.restore(saved)
    assert other.save() == saved
    assert read_bytes(other, 3) == b"llo"


@pytest.mark.parametrize(
    "bad",
    [
        {"selector": 0x10000, "offset": 0},
        {"selector": 0, "offset": 5},
        {"selector": 0x1234, "offset": 1},
        {"selector": 0, "offset": -1},
        {"selector": 0},
        {"selector": "0", "offset": 0},
    ],
)
def test_malformed_snapshot_raises(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FwCfg(1 << 30, 1).restore(bad)


accesses = st.tuples(
    st.booleans(),
    st.integers(min_value=0, max_value=FwCfg.LENGTH + 4),
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(
        st.sampled_from([0, 1, 3, 5, 0x19, 0x20, 0x21, 0x4000, 0x8000]),
        st.integers(min_value=0, max_value=(1 << 64) - 1),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(accesses, max_size=40))
def test_fuzz_data_reads_follow_the_selected_item_then_zeros(
    ops: list[tuple[bool, int, int, int]],
) -> None:
    device = FwCfg(1 << 30, 2, files={"etc/a": b"abc", "etc/b": b"\x01\x02"})
    selector, offset = 0, 0
    for is_write, port, size, value in ops:
        if is_write:
            device.write(port, size, value)
            if port == SEL and size >= 2:
                selector, offset = value & 0xFFFF, 0
            continue
        result = device.read(port, size)
        assert 0 <= result < 1 << (8 * size)
        decoded = port < FwCfg.LENGTH and min(size, FwCfg.LENGTH - port) == 1
        if not decoded:
            assert result == (1 << (8 * size)) - 1
            continue
        data = device.item(selector)
        expected = data[offset] if offset < len(data) else 0
        offset = min(offset + 1, len(data)) if offset < len(data) else offset
        assert result & 0xFF == expected
    assert device.save() == {"selector": selector, "offset": offset}
    saved = device.save()
    device.restore(saved)
    assert device.save() == saved
