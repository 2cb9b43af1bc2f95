"""Tests of the 8042 keyboard controller model.

Sections are those of the IBM PS/2 Hardware Interface Technical Reference,
"Keyboard/Auxiliary Device Controller" (status register, command byte, commands, output
port) and "Keyboard" (commands from the system, scan code translation). The probe
sequences replay Linux's drivers/input/serio/i8042.c (``__i8042_command``,
``i8042_check_aux``, ``i8042_set_mux_mode``) and libps2.c / psmouse's handling of a
timed-out auxiliary byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.i8042 import (
    CTR_AUX_DISABLE,
    CTR_AUX_INT,
    CTR_KBD_DISABLE,
    CTR_KBD_INT,
    CTR_SYS,
    CTR_TRANSLATE,
    I8042,
    STATUS_AUX_OBF,
    STATUS_CMD,
    STATUS_IBF,
    STATUS_OBF,
    STATUS_SYS,
    STATUS_TIMEOUT,
    STATUS_UNLOCKED,
    translate_set2,
)
from kvm_devices.interfaces import Device
from kvm_devices.testing import RecordingLine


@dataclass
class Board:
    controller: I8042
    irq1: RecordingLine
    irq12: RecordingLine
    resets: list[int] = field(default_factory=list)


def make() -> Board:
    irq1, irq12 = RecordingLine(), RecordingLine()
    resets: list[int] = []
    controller = I8042(lambda: resets.append(1), irq1, irq12)
    return Board(controller, irq1, irq12, resets)


def status(board: Board) -> int:
    return board.controller.command_port.read(0, 1)


def command(board: Board, cmd: int, params: tuple[int, ...] = (), results: int = 0) -> list[int]:
    """Linux's __i8042_command: wait IBF clear, write, then poll OBF for each result."""
    assert not status(board) & STATUS_IBF
    board.controller.command_port.write(0, 1, cmd)
    for param in params:
        assert not status(board) & STATUS_IBF
        board.controller.data_port.write(0, 1, param)
    out = []
    for _ in range(results):
        assert status(board) & STATUS_OBF, f"command {cmd:#x}: no result (i8042 timeout)"
        out.append(board.controller.data_port.read(0, 1))
    return out


def keyboard(board: Board, byte: int, replies: int) -> list[int]:
    board.controller.data_port.write(0, 1, byte)
    out = []
    for _ in range(replies):
        assert status(board) & STATUS_OBF
        assert not status(board) & STATUS_AUX_OBF
        out.append(board.controller.data_port.read(0, 1))
    return out


def set_ctr(board: Board, value: int) -> None:
    command(board, 0x60, (value,))


def test_ports_and_their_conventional_places() -> None:
    board = make()
    assert (I8042.DATA_BASE, I8042.COMMAND_BASE) == (0x60, 0x64)
    assert isinstance(board.controller.data_port, Device)
    assert isinstance(board.controller.command_port, Device)


def test_status_register_bits_at_power_on() -> None:
    board = make()
    assert status(board) == STATUS_UNLOCKED | STATUS_SYS | STATUS_CMD
    board.controller.data_port.write(0, 1, 0xF4)
    assert not status(board) & STATUS_CMD  # bit 3: last write went to the data port


def test_self_test_0xaa_answers_0x55_and_sets_system_flag() -> None:
    board = make()
    set_ctr(board, 0)
    assert not status(board) & STATUS_SYS
    assert command(board, 0xAA, results=1) == [0x55]
    assert status(board) & STATUS_SYS


def test_read_and_write_command_byte_0x20_0x60() -> None:
    board = make()
    assert command(board, 0x20, results=1) == [CTR_KBD_INT | CTR_SYS | CTR_TRANSLATE]
    set_ctr(board, 0x25)
    assert command(board, 0x20, results=1) == [0x25]
    assert board.controller.command_byte == 0x25


def test_ram_bytes_0x21_0x3f_read_back() -> None:
    board = make()
    command(board, 0x7F, (0x99,))
    assert command(board, 0x3F, results=1) == [0x99]


@pytest.mark.parametrize(("cmd", "answer"), [(0xA9, 0x00), (0xAB, 0x00), (0xC0, 0x80)])
def test_interface_tests_and_input_port(cmd: int, answer: int) -> None:
    assert command(make(), cmd, results=1) == [answer]


def test_disable_enable_keyboard_and_aux_toggle_command_byte_bits() -> None:
    board = make()
    command(board, 0xAD)
    command(board, 0xA7)
    ctr = command(board, 0x20, results=1)[0]
    assert ctr & CTR_KBD_DISABLE and ctr & CTR_AUX_DISABLE
    command(board, 0xAE)
    command(board, 0xA8)
    ctr = command(board, 0x20, results=1)[0]
    assert not ctr & (CTR_KBD_DISABLE | CTR_AUX_DISABLE)


def test_linux_i8042_check_aux_loop_mux_and_irq_test() -> None:
    board = make()
    set_ctr(board, CTR_SYS | CTR_KBD_DISABLE | CTR_AUX_DISABLE)
    # Internal loop-back: the byte comes back from the aux side (AUXDATA set).
    board.controller.command_port.write(0, 1, 0xD3)
    board.controller.data_port.write(0, 1, 0x5A)
    assert status(board) & (STATUS_OBF | STATUS_AUX_OBF) == STATUS_OBF | STATUS_AUX_OBF
    assert board.controller.data_port.read(0, 1) == 0x5A
    # i8042_set_mux_mode: a plain loop-back echoes 0xA4 too, so no multiplexer.
    for byte in (0xF0, 0x56, 0xA4):
        assert command(board, 0xD3, (byte,), results=1) == [byte]
    # i8042_toggle_aux.
    command(board, 0xA7)
    assert command(board, 0x20, results=1)[0] & CTR_AUX_DISABLE
    command(board, 0xA8)
    assert not command(board, 0x20, results=1)[0] & CTR_AUX_DISABLE
    # AUX IRQ delivery test: enable AUXINT, loop 0xA5 without reading; IRQ12 rises.
    set_ctr(board, CTR_SYS | CTR_AUX_INT)
    assert not board.irq12.level
    command(board, 0xD3, (0xA5,))
    assert board.irq12.level and not board.irq1.level
    assert board.controller.data_port.read(0, 1) == 0xA5
    assert not board.irq12.level


def test_write_to_aux_device_with_no_mouse_answers_fe_with_timeout() -> None:
    board = make()
    set_ctr(board, CTR_SYS | CTR_AUX_INT | CTR_AUX_DISABLE)
    command(board, 0xD4, (0xFF,))
    value = status(board)
    assert value & STATUS_TIMEOUT and value & STATUS_AUX_OBF and value & STATUS_OBF
    assert board.irq12.level
    assert board.controller.data_port.read(0, 1) == 0xFE
    assert not command(board, 0x20, results=1)[0] & CTR_AUX_DISABLE
    assert not status(board) & STATUS_TIMEOUT


def test_d2_writes_keyboard_output_buffer_and_raises_irq1() -> None:
    board = make()
    command(board, 0xD2, (0x1C,))
    assert board.irq1.level
    assert status(board) & (STATUS_OBF | STATUS_AUX_OBF) == STATUS_OBF
    assert board.controller.data_port.read(0, 1) == 0x1C  # not translated


def test_output_port_read_write_and_reset_bit() -> None:
    board = make()
    assert command(board, 0xD0, results=1) == [0xCF]
    command(board, 0xD1, (0xDD,))
    assert not board.controller.a20_enabled
    assert board.resets == []
    command(board, 0xD1, (0xDF,))
    assert board.controller.a20_enabled
    command(board, 0xD1, (0xDE,))
    assert board.resets == [1]


def test_output_port_shows_output_buffer_full_bits() -> None:
    board = make()
    command(board, 0xD2, (0x01,))
    board.controller.command_port.write(0, 1, 0xD0)
    assert board.controller.data_port.read(0, 1) == 0x01
    assert command(board, 0xD0, results=1) == [0xCF | 0x10]


@pytest.mark.parametrize("cmd", range(0xF0, 0x100))
def test_pulse_output_port_resets_when_bit0_pulsed(cmd: int) -> None:
    board = make()
    command(board, cmd)
    assert board.resets == ([1] if cmd % 2 == 0 else [])


def test_keyboard_reset_identify_and_ack() -> None:
    board = make()
    set_ctr(board, CTR_SYS)  # untranslated
    assert keyboard(board, 0xFF, 2) == [0xFA, 0xAA]
    assert keyboard(board, 0xF2, 3) == [0xFA, 0xAB, 0x83]
    assert keyboard(board, 0xF4, 1) == [0xFA]
    assert keyboard(board, 0xED, 1) == [0xFA]
    assert keyboard(board, 0x07, 1) == [0xFA]
    assert keyboard(board, 0xF3, 1) == [0xFA]
    assert keyboard(board, 0x20, 1) == [0xFA]
    assert keyboard(board, 0xEE, 1) == [0xEE]
    assert keyboard(board, 0xE6, 1) == [0xFA]
    assert keyboard(board, 0xF0, 1) == [0xFA]
    assert keyboard(board, 0x00, 2) == [0xFA, 0x02]
    assert not status(board) & STATUS_OBF


def test_translated_identify_reads_ab_41_as_atkbd_expects() -> None:
    assert keyboard(make(), 0xF2, 3) == [0xFA, 0xAB, 0x41]


def test_each_keyboard_byte_gives_irq1_an_edge() -> None:
    board = make()
    keyboard(board, 0xFF, 0)
    assert board.irq1.history == [True]
    board.controller.data_port.read(0, 1)
    board.controller.data_port.read(0, 1)
    assert board.irq1.history == [True, False, True, False]


def test_scan_code_translation_set2_to_set1_with_break_prefix() -> None:
    board = make()
    board.controller.keyboard_input(bytes([0x1C, 0xF0, 0x1C, 0x76, 0x83, 0xF0, 0x83]))
    out = [board.controller.data_port.read(0, 1) for _ in range(5)]
    assert out == [0x1E, 0x9E, 0x01, 0x41, 0xC1]
    assert translate_set2(0x5A) == 0x1C and translate_set2(0x00) == 0xFF
    assert translate_set2(0xE0) == 0xE0


def test_translation_table_is_a_permutation_of_the_low_half() -> None:
    assert sorted(translate_set2(b) for b in range(1, 0x80)) == list(range(1, 0x80))
    assert all(translate_set2(b) == b for b in range(0x85, 0x100))


def test_untranslated_input_passes_through() -> None:
    board = make()
    set_ctr(board, CTR_SYS | CTR_KBD_INT)
    board.controller.keyboard_input([0x1C, 0xF0, 0x1C])
    out = [board.controller.data_port.read(0, 1) for _ in range(3)]
    assert out == [0x1C, 0xF0, 0x1C]


def test_disabled_keyboard_interface_holds_bytes_until_enabled() -> None:
    board = make()
    command(board, 0xAD)
    board.controller.keyboard_input([0x1C])
    assert not status(board) & STATUS_OBF
    command(board, 0xAE)
    assert status(board) & STATUS_OBF
    assert board.controller.data_port.read(0, 1) == 0x1E


def test_writing_to_the_keyboard_enables_its_interface() -> None:
    board = make()
    command(board, 0xAD)
    assert keyboard(board, 0xEE, 1) == [0xEE]


def test_keyboard_disable_f5_drops_input_and_f4_resumes() -> None:
    board = make()
    assert keyboard(board, 0xF5, 1) == [0xFA]
    board.controller.keyboard_input([0x1C])
    assert not status(board) & STATUS_OBF
    assert keyboard(board, 0xF4, 1) == [0xFA]
    board.controller.keyboard_input([0x1C])
    assert board.controller.data_port.read(0, 1) == 0x1E


def test_keyboard_buffer_holds_16_bytes() -> None:
    board = make()
    command(board, 0xAD)
    board.controller.keyboard_input([0x1C] * 40)
    command(board, 0xAE)
    count = 0
    while status(board) & STATUS_OBF:
        board.controller.data_port.read(0, 1)
        count += 1
    assert count == 16


def test_controller_replies_come_before_queued_keyboard_bytes() -> None:
    board = make()
    board.controller.keyboard_input([0x1C, 0x32])
    assert command(board, 0x20, results=2) == [0x1E, CTR_KBD_INT | CTR_SYS | CTR_TRANSLATE]
    assert board.controller.data_port.read(0, 1) == 0x30


def test_irq1_needs_command_byte_bit0() -> None:
    board = make()
    set_ctr(board, CTR_SYS | CTR_TRANSLATE)
    board.controller.keyboard_input([0x1C])
    assert not board.irq1.level
    set_ctr(board, CTR_SYS | CTR_TRANSLATE | CTR_KBD_INT)
    assert board.irq1.level


def test_data_port_read_when_empty_returns_last_byte() -> None:
    board = make()
    command(board, 0xAA, results=1)
    assert board.controller.data_port.read(0, 1) == 0x55


def test_wide_accesses_decode_only_offset_0() -> None:
    board = make()
    assert board.controller.command_port.read(0, 2) == 0xFF00 | status(board)
    assert board.controller.data_port.read(1, 1) == 0xFF
    board.controller.command_port.write(0, 4, 0x1234_56AA)
    assert board.controller.data_port.read(0, 4) == 0xFFFF_FF55


def test_snapshot_round_trip_mid_command() -> None:
    board = make()
    board.controller.keyboard_input([0x1C, 0xF0])
    board.controller.command_port.write(0, 1, 0x60)
    saved = board.controller.save()
    other = make()
    other.controller.restore(saved)
    assert other.controller.save() == saved
    assert other.irq1.level
    other.controller.data_port.write(0, 1, CTR_SYS)  # completes the 0x60 command
    assert other.controller.command_byte == CTR_SYS
    assert not other.irq1.level
    assert other.controller.data_port.read(0, 1) == 0x1E
    assert other.controller.data_port.read(0, 1) == 0xF0  # no longer translated


@pytest.mark.parametrize(
    "bad",
    [
        {"ram": [0] * 31},
        {"output_port": 256},
        {"pending_command": 0x20},
        {"controller_queue": [[1, 2, 0]]},
        {"keyboard_queue": [0] * 17},
        {"keyboard_scan_set": 4},
        {"keyboard_pending_command": 0xF4},
        {"obf": 1},
        {"unknown": 0},
    ],
)
def test_malformed_snapshot_raises(bad: dict[str, object]) -> None:
    board = make()
    saved = board.controller.save()
    saved.update(bad)
    with pytest.raises(ValueError):
        board.controller.restore(saved)


accesses = st.one_of(
    st.tuples(
        st.sampled_from(["data", "command"]),
        st.booleans(),
        st.integers(min_value=0, max_value=5),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(
            st.sampled_from([0x20, 0x60, 0xAA, 0xD1, 0xD2, 0xD3, 0xD4, 0xF2, 0xFF, 0xFE]),
            st.integers(min_value=0, max_value=(1 << 64) - 1),
        ),
    ),
    st.tuples(st.just("input"), st.just(True), st.just(0), st.just(1), st.integers(0, 0xFFFF)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(accesses, max_size=60))
def test_fuzz_never_raises_lines_follow_state_and_snapshots_replay(
    ops: list[tuple[str, bool, int, int, int]],
) -> None:
    board = make()
    twin: Board | None = None
    resets_before_twin = 0
    for step, (port_name, is_write, offset, size, value) in enumerate(ops):
        if step == len(ops) // 2:
            twin = make()
            twin.controller.restore(board.controller.save())
            resets_before_twin = len(board.resets)
        results = []
        for target in (board, twin) if twin is not None else (board,):
            if port_name == "input":
                target.controller.keyboard_input(value.to_bytes(2, "little"))
                continue
            port = (
                target.controller.data_port
                if port_name == "data"
                else target.controller.command_port
            )
            if is_write:
                port.write(offset, size, value)
            else:
                result = port.read(offset, size)
                assert 0 <= result < 1 << (8 * size)
                results.append(result)
        assert len(set(results)) <= 1  # the restored twin answers like the original
        saved = board.controller.save()
        assert board.irq1.level == saved["irq1_level"]
        assert board.irq12.level == saved["irq12_level"]
        assert not status(board) & STATUS_IBF
        if twin is not None:
            assert twin.controller.save() == saved
            assert (twin.irq1.level, twin.irq12.level) == (board.irq1.level, board.irq12.level)
            assert len(twin.resets) == len(board.resets) - resets_before_twin
    saved = board.controller.save()
    board.controller.restore(saved)
    assert board.controller.save() == saved
