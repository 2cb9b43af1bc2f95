"""Tests of the reset control register at 0xCF9.

References: Intel 82371AB PIIX4 datasheet, "RC—Reset Control Register" (SYS_RST bit 1,
RST_CPU bit 2); Intel ICH datasheets, "RST_CNT—Reset Control Register" (FULL_RST bit 3);
ACPI 6.5 §4.8.3.6 Reset Register (FADT RESET_REG / RESET_VALUE).
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.reset_port import ResetPort, ResetPortState


class Counter:
    def __init__(self) -> None:
        self.resets = 0

    def __call__(self) -> None:
        self.resets += 1


def make() -> tuple[ResetPort, Counter]:
    counter = Counter()
    return ResetPort(counter), counter


def test_is_a_one_byte_device_with_fadt_reset_value_0x06() -> None:
    port, _ = make()
    assert isinstance(port, Device)
    assert ResetPort.SIZE == 1
    assert ResetPort.RESET_VALUE == 0x06


def test_power_on_value_reads_zero() -> None:
    port, counter = make()
    assert port.read(0, 1) == 0
    assert counter.resets == 0


def test_acpi_reset_register_write_of_reset_value_resets_once() -> None:
    port, counter = make()
    port.write(0, 1, ResetPort.RESET_VALUE)
    assert counter.resets == 1


@pytest.mark.parametrize("reboot_code", [0x06, 0x0E])
def test_linux_cf9_sequence_sys_rst_then_rst_cpu(reboot_code: int) -> None:
    # Linux's BOOT_CF9: write SYS_RST alone, then SYS_RST|RST_CPU (|FULL_RST when cold).
    port, counter = make()
    cf9 = port.read(0, 1) & ~reboot_code
    port.write(0, 1, cf9 | 0x02)
    assert counter.resets == 0
    assert port.read(0, 1) == 0x02
    port.write(0, 1, cf9 | reboot_code)
    assert counter.resets == 1
    # RST_CPU is never read back: the reset has already happened.
    assert port.read(0, 1) == reboot_code & 0x0A


def test_soft_reset_rst_cpu_without_sys_rst_also_resets() -> None:
    port, counter = make()
    port.write(0, 1, 0x04)
    assert counter.resets == 1
    assert port.read(0, 1) == 0


def test_reads_return_bits_1_and_3_of_the_last_write() -> None:
    port, counter = make()
    port.write(0, 1, 0xFB)
    assert port.read(0, 1) == 0x0A
    assert counter.resets == 0
    port.write(0, 1, 0x00)
    assert port.read(0, 1) == 0


def test_every_write_with_rst_cpu_resets_again() -> None:
    port, counter = make()
    for _ in range(3):
        port.write(0, 1, 0x06)
    assert counter.resets == 3


def test_wider_accesses_act_on_the_first_byte_only() -> None:
    port, counter = make()
    port.write(0, 2, 0x0402)  # RST_CPU in the second byte is undecoded
    assert counter.resets == 0
    assert port.read(0, 2) == 0xFF02
    assert port.read(0, 4) == 0xFFFF_FF02
    port.write(0, 4, 0xFFFF_FF06)
    assert counter.resets == 1


def test_other_offsets_are_undecoded() -> None:
    port, counter = make()
    port.write(1, 1, 0x06)
    port.write(-1, 2, 0x0606)
    assert counter.resets == 0
    assert port.read(1, 1) == 0xFF
    assert port.read(3, 4) == 0xFFFF_FFFF
    assert port.read(0, 0) == 0
    port.write(0, 0, 0x06)
    port.write(0, 16, 0x06)
    assert counter.resets == 0


def test_on_reset_runs_without_the_lock_held() -> None:
    seen: list[int] = []
    port: ResetPort

    def on_reset() -> None:
        reader = threading.Thread(target=lambda: seen.append(port.read(0, 1)))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive()

    port = ResetPort(on_reset)
    port.write(0, 1, 0x0E)
    assert seen == [0x0A]


def test_save_restore_round_trip() -> None:
    port, _ = make()
    port.write(0, 1, 0x0A)
    saved = port.save()
    assert saved == {"value": 0x0A}
    twin, counter = make()
    twin.restore(saved)
    assert twin.save() == saved
    assert twin.read(0, 1) == 0x0A
    assert counter.resets == 0


@pytest.mark.parametrize(
    "snapshot",
    [{}, {"value": 0x04}, {"value": -2}, {"value": True}, {"value": "2"}, {"value": 2, "x": 0}],
)
def test_restore_rejects_malformed_snapshots(snapshot: dict[str, object]) -> None:
    port, _ = make()
    with pytest.raises(ValueError):
        port.restore(snapshot)
    assert port.save() == {"value": 0}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(-1, 5),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, (1 << 64) - 1),
        ),
        max_size=30,
    )
)
def test_fuzz_never_raises_and_counts_resets(ops: list[tuple[bool, int, int, int]]) -> None:
    port, counter = make()
    expected_resets = 0
    last = 0
    for is_write, offset, size, value in ops:
        value &= (1 << (8 * size)) - 1
        if is_write:
            port.write(offset, size, value)
            if offset == 0:
                last = value & 0x0A
                expected_resets += bool(value & 0x04)
        else:
            result = port.read(offset, size)
            assert 0 <= result < 1 << (8 * size)
            if offset == 0:
                assert result & 0xFF == last
                assert result >> 8 == (1 << (8 * (size - 1))) - 1
            else:
                assert result == (1 << (8 * size)) - 1
    assert counter.resets == expected_resets
    saved = port.save()
    twin, _ = make()
    twin.restore(saved)
    assert twin.save() == saved == dataclass_state(last)


def dataclass_state(value: int) -> dict[str, object]:
    return dict(ResetPortState(value=value).__dict__)
