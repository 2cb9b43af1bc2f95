"""QEMU's pci-testdev as kvm-unit-tests drives it (QEMU hw/misc/pci-testdev.c;
kvm-unit-tests lib/pci-testdev.c ``pci_testdev_one``, lib/pci.h ``pci_test_dev_hdr``).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.pci.config_space import PciConfigSpace
from kvm_devices.pci_testdev import PciTestdev

NR_WRITES = 16  # lib/pci-testdev.c


def _bar_with(device: PciTestdev, io: bool) -> Device:
    return device.io if io else device.memory


def test_identity_and_bars_as_qemu_registers_them() -> None:
    device = PciTestdev(memory_address=0xFEBF_F000, io_address=0xC000)
    config: PciConfigSpace = device.config
    assert config.read(0x00, 4) == 0x0005_1B36  # PCI_VENDOR_ID_REDHAT, _DEVICE_ID_REDHAT_TEST
    assert config.read(0x08, 4) == 0x00FF_0000  # revision 0, class PCI_CLASS_OTHERS
    assert config.read(0x3D, 1) == 0  # no interrupt pin
    assert config.read(0x10, 4) == 0xFEBF_F000  # BAR0: 32-bit memory
    assert config.read(0x14, 4) == 0xC001  # BAR1: I/O
    config.write(0x10, 4, 0xFFFF_FFFF)
    config.write(0x14, 4, 0xFFFF_FFFF)
    assert config.read(0x10, 4) == 0xFFFF_F000  # 4 KiB (IOTEST_MEMSIZE * 2)
    assert config.read(0x14, 4) == 0xFF01  # 256 ports (IOTEST_IOSIZE * 2)


def test_nothing_selected_reads_zero_and_ignores_writes() -> None:
    device = PciTestdev()
    assert device.memory.read(0, 4) == 0 and device.io.read(12, 4) == 0
    device.memory.write(2048, 1, 0xFA)
    assert device.memory.read(12, 4) == 0


def _name(device: PciTestdev, io: bool) -> str:
    bar = _bar_with(device, io)
    text = b""
    for offset in range(16, 64):
        byte = bar.read(offset, 1)
        if byte == 0:
            break
        text += bytes((byte,))
    return text.decode()


def test_the_drivers_loop_finds_three_tests_per_bar_and_each_passes() -> None:
    """pci_testdev_one: select n, count must read 0, width 1|2|4, then 16 writes of
    ``data`` at ``offset``; count 0 (an ioeventfd took them) or 16 is a pass. The loop
    ends at the first n that fails: n = 3 selects nothing, whose count reads 0 but
    whose width reads 0."""
    device = PciTestdev()
    names = []
    for io in (False, True):
        bar = _bar_with(device, io)
        number = 0
        while True:
            bar.write(0, 1, number)
            if bar.read(12, 4) != 0 or bar.read(1, 1) not in (1, 2, 4):
                break
            data, offset = bar.read(8, 4), bar.read(4, 4)
            for _ in range(NR_WRITES):
                bar.write(offset, bar.read(1, 1), data)
            assert bar.read(12, 4) == NR_WRITES
            names.append(_name(device, io))
            number += 1
    assert names == [
        "mmio-no-eventfd",
        "mmio-wildcard-eventfd",
        "mmio-datamatch-eventfd",
        "portio-no-eventfd",
        "portio-wildcard-eventfd",
        "portio-datamatch-eventfd",
    ]


def test_header_fields_of_each_test() -> None:
    device = PciTestdev()
    device.memory.write(0, 1, 2)  # mmio-datamatch-eventfd
    assert device.memory.read(0, 1) == 2 and device.memory.read(1, 1) == 1
    assert device.memory.read(4, 4) == 2048 + 2  # IOTEST_SIZE(i) + i * width
    assert device.memory.read(8, 1) == 0xFA  # IOTEST_DATAMATCH
    device.io.write(0, 1, 1)  # portio-wildcard-eventfd
    assert device.io.read(0, 1) == 4 and device.io.read(4, 4) == 128 + 4
    assert device.io.read(8, 1) == 0xCE  # IOTEST_NOMATCH: any byte counts
    # The header is readable through either BAR: reads do not look at the type.
    assert device.memory.read(0, 1) == 4


def test_datamatch_counts_only_its_byte_and_wildcard_any() -> None:
    device = PciTestdev()
    device.io.write(0, 1, 2)  # portio-datamatch-eventfd at 128 + 5
    device.io.write(133, 1, 0x12)
    device.io.write(134, 1, 0xFA)  # another offset
    assert device.io.read(12, 4) == 0
    device.io.write(133, 4, 0x0000_00FA)  # split into bytes: only the first is at 133
    assert device.io.read(12, 4) == 1
    device.io.write(0, 1, 1)  # portio-wildcard-eventfd at 128 + 4: any byte
    device.io.write(132, 1, 0x12)
    assert device.io.read(12, 4) == 1


def test_selecting_clears_the_count_and_a_bad_number_selects_none() -> None:
    device = PciTestdev()
    device.memory.write(0, 1, 0)
    device.memory.write(2048, 1, 0xFA)
    assert device.memory.read(12, 4) == 1
    device.memory.write(0, 1, 0)
    assert device.memory.read(12, 4) == 0
    device.memory.write(0, 1, 3)  # IOTEST_MAX_TEST: no test
    assert device.memory.read(0, 4) == 0
    device.memory.write(0, 1, 0)
    device.reset()
    assert device.memory.read(4, 4) == 0


def test_reads_at_or_past_the_headers_last_byte_are_zero() -> None:
    device = PciTestdev()
    device.memory.write(0, 1, 0)  # "mmio-no-eventfd": bufsize 16 + 15 + 1 = 32
    assert device.memory.read(30, 1) == ord("d")
    assert device.memory.read(31, 1) == 0 and device.memory.read(200, 4) == 0


@given(
    io=st.booleans(),
    offset=st.integers(-8, 5000),
    size=st.sampled_from([0, 1, 2, 4, 8, 3]),
    value=st.integers(0, (1 << 64) - 1),
)
def test_any_access_is_answered_and_never_raises(
    io: bool, offset: int, size: int, value: int
) -> None:
    device = PciTestdev()
    bar = _bar_with(device, io)
    bar.write(offset, size, value)
    assert 0 <= bar.read(offset, size) < 1 << (8 * size) or size == 0
