"""The AML encoders against ACPI 6.5 §20 (terms) and §6.4 (resource descriptors): the
bytes each encodes, and the same bytes read back by the tests' own AML reader."""

from __future__ import annotations

import aml_reader
import pytest

from kvm_vmm import aml


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, bytes([0x01])),
        (0x3E, bytes([0x3F])),
        (0x3F, bytes([0x41, 0x04])),  # total 0x41 in two bytes: 0x40|1, 0x04
        (0xFFD, bytes([0x4F, 0xFF])),
        (0xFFE, bytes([0x81, 0x00, 0x01])),  # total 0x1001
    ],
)
def test_pkg_length_20_2_4(length: int, encoded: bytes) -> None:
    assert aml.pkg_length(length) == encoded
    assert aml_reader.pkg_length(encoded, 0) == (length + len(encoded), len(encoded))


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0x1234, b"\x0b\x34\x12"),
        (0x12345678, b"\x0c\x78\x56\x34\x12"),
        (1 << 40, b"\x0e" + (1 << 40).to_bytes(8, "little")),
    ],
)
def test_integer_20_2_3(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_strings_and_names_20_2_2() -> None:
    assert aml.string("KVM") == b"\x0dKVM\x00"
    assert aml.name_seg("_S5") == b"_S5_"
    for bad_name in ("5AB", "", "ABCDE", "a"):
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad_name)
    with pytest.raises(aml.AmlError):
        aml.string("a\0b")
    with pytest.raises(aml.AmlError):
        aml.integer(-1)
    with pytest.raises(aml.AmlError):
        aml.dword(1 << 32)


def test_name_strings_20_2_2_root_dual_and_multi_name_paths() -> None:
    assert aml.name_string("PCI0") == b"PCI0"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("_SB.PCI0.S08") == b"\x2f\x03_SB_PCI0S08_"
    for path, read_back in (
        ("\\_SB", "\\_SB_"),
        ("\\_SB.PCI0", "\\_SB_.PCI0"),
        ("_SB.PCI0.S08", "_SB_.PCI0.S08_"),
    ):
        encoded = aml.name_string(path)
        assert aml_reader.name_string(encoded, 0) == (read_back, len(encoded))


@pytest.mark.parametrize(
    ("text", "value"),
    # The dwords iasl emits for EisaId(): PNP0A03 is the one every PC DSDT carries.
    [("PNP0A03", 0x030AD041), ("PNP0A08", 0x080AD041), ("PNP0C02", 0x020CD041)],
)
def test_eisa_id_19_6_35(text: str, value: int) -> None:
    assert aml.eisa_id(text) == value


@pytest.mark.parametrize("text", ["PNP0A0", "pnp0A03", "PNP0A0G", "PNP0A030"])
def test_malformed_eisa_ids_are_refused(text: str) -> None:
    with pytest.raises(aml.AmlError):
        aml.eisa_id(text)


def test_scope_device_and_names_nest_and_read_back() -> None:
    body = aml.name("_S5_", aml.package([aml.integer(5), aml.integer(0)])) + aml.scope(
        "\\_SB",
        [
            aml.device(
                "PCI0",
                [
                    aml.name("_HID", aml.dword(aml.eisa_id("PNP0A08"))),
                    aml.name("_STR", aml.string("x")),
                    aml.name("_CRS", aml.buffer(b"\x79\x00")),
                ],
            )
        ],
    )
    assert aml_reader.namespace(body) == {
        "\\_S5_": [5, 0],
        "\\_SB_.PCI0": aml_reader.DEVICE,
        "\\_SB_.PCI0._HID": 0x080AD041,
        "\\_SB_.PCI0._STR": "x",
        "\\_SB_.PCI0._CRS": b"\x79\x00",
    }


def test_a_package_longer_than_63_bytes_takes_a_two_byte_pkg_length() -> None:
    elements = [aml.integer(0x1000 + i) for i in range(30)]  # 3 bytes each
    encoded = aml.package(elements)
    assert encoded[1] >> 6 == 1
    value, end = aml_reader.data_object(encoded, 0)
    assert value == [0x1000 + i for i in range(30)] and end == len(encoded)
    with pytest.raises(aml.AmlError):
        aml.package([aml.integer(0)] * 256)


def test_resource_descriptors_6_4_bytes() -> None:
    """The bytes iasl compiles from the ASL each encoder's docstring names."""
    assert aml.io_port(0xCF8, 8) == bytes.fromhex("4701f80cf80c0108")
    assert aml.word_bus_number(0, 0xFF) == bytes.fromhex("880d00020c0000000000ff0000000001")
    assert aml.word_io(0x0D00, 0xFFFF) == bytes.fromhex("880d00010c030000000dffff000000f3")
    assert aml.memory32_fixed(0xE000_0000, 0x1000_0000) == bytes.fromhex("86090001000000e000000010")
    assert aml.dword_memory(0xC000_0000, 0xDFFF_FFFF) == bytes.fromhex(
        "871700000c01" + "00000000" + "000000c0" + "ffffffdf" + "00000000" + "00000020"
    )


def test_resource_template_ends_with_an_end_tag_and_reads_back() -> None:
    template = aml.resource_template(
        [
            aml.word_bus_number(0, 0xFF),
            aml.io_port(0xCF8, 8),
            aml.dword_memory(0x1000, 0x1FFF),
            aml.memory32_fixed(0x4000, 0x10),
        ]
    )
    value, _ = aml_reader.data_object(template, 0)
    assert isinstance(value, bytes) and value.endswith(b"\x79\x00")
    assert aml_reader.resources(value) == [
        aml_reader.Resource("bus", 0, 0xFF, 0x100, producer=True),
        aml_reader.Resource("io", 0xCF8, 0xCFF, 8),
        aml_reader.Resource("memory-window", 0x1000, 0x1FFF, 0x1000, producer=True),
        aml_reader.Resource("memory", 0x4000, 0x400F, 0x10),
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda: aml.io_port(0xFFFC, 8),
        lambda: aml.io_port(0x100, 0),
        lambda: aml.word_bus_number(0, 0x100),
        lambda: aml.word_io(0x2000, 0x1FFF),
        lambda: aml.dword_memory(0xFFFF_0000, 0x1_0000_0000),
        lambda: aml.memory32_fixed(0xFFFF_F000, 0x2000),
        lambda: aml.memory32_fixed(0x1000, 0),
    ],
)
def test_ranges_a_descriptor_cannot_hold_are_refused(make: object) -> None:
    assert callable(make)
    with pytest.raises(aml.AmlError):
        make()
