"""Tests of the 16550A UART model.

Section numbers are those of the PC16550D datasheet (National Semiconductor / TI,
SNLS378), section 8 "Registers"; the probe sequences are Linux's, from
drivers/tty/serial/8250/8250_port.c (autoconfig, autoconfig_16550a, size_fifo,
autoconfig_irq).
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.testing import MemorySink, QueueSource, RecordingLine
from kvm_devices.uart import Uart16550, UartState

RBR, THR, DLL, IER, DLM, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7


def make(source: QueueSource | None = None) -> tuple[Uart16550, RecordingLine, MemorySink]:
    line = RecordingLine()
    sink = MemorySink()
    return Uart16550(line, sink, source), line, sink


def inb(uart: Uart16550, offset: int) -> int:
    return uart.read(offset, 1)


def outb(uart: Uart16550, offset: int, value: int) -> None:
    uart.write(offset, 1, value)


def drain(uart: Uart16550) -> bytes:
    data = bytearray()
    while inb(uart, LSR) & 0x01:
        data.append(inb(uart, RBR))
    return bytes(data)


# ------------------------------------------------------------ Linux's probe


def linux_size_fifo(uart: Uart16550) -> int:
    old_lcr = inb(uart, LCR)
    outb(uart, LCR, 0)
    old_fcr = inb(uart, FCR)
    old_mcr = inb(uart, MCR)
    outb(uart, FCR, 0x07)
    outb(uart, MCR, 0x10)
    outb(uart, LCR, 0x80)
    old_dl = inb(uart, DLL) | inb(uart, DLM) << 8
    outb(uart, DLL, 1)
    outb(uart, DLM, 0)
    outb(uart, LCR, 0x03)
    for count in range(256):
        outb(uart, THR, count)
    count = 0
    while inb(uart, LSR) & 0x01 and count < 256:
        inb(uart, RBR)
        count += 1
    outb(uart, FCR, old_fcr)
    outb(uart, MCR, old_mcr)
    outb(uart, LCR, 0x80)
    outb(uart, DLL, old_dl & 0xFF)
    outb(uart, DLM, old_dl >> 8)
    outb(uart, LCR, old_lcr)
    return count


def linux_autoconfig_16550a(uart: Uart16550) -> str:
    """autoconfig_16550a() with the 16550A variant probes enabled (UPF_FULL_PROBE)."""
    outb(uart, LCR, 0x80)  # UART_LCR_CONF_MODE_A
    if inb(uart, 2) == 0:  # EFR readable with DLAB: ST16C650V1 or FSL 64-byte
        return "16650"
    outb(uart, LCR, 0xBF)  # UART_LCR_CONF_MODE_B
    if inb(uart, 2) == 0:
        return "EFRv2"
    outb(uart, LCR, 0)
    status1 = inb(uart, MCR)
    outb(uart, LCR, 0xE0)
    status2 = inb(uart, 2)  # EXCR1 on a National SuperIO
    if not (status2 ^ status1) & 0x10:
        outb(uart, LCR, 0)
        outb(uart, MCR, status1 ^ 0x10)
        outb(uart, LCR, 0xE0)
        status2 = inb(uart, 2)
        outb(uart, LCR, 0)
        outb(uart, MCR, status1)
        if (status2 ^ status1) & 0x10:
            return "NS16550A"
    outb(uart, LCR, 0)
    outb(uart, FCR, 0x21)
    iir1 = inb(uart, IIR) & 0xE0
    outb(uart, FCR, 0x01)
    outb(uart, LCR, 0x80)
    outb(uart, FCR, 0x21)
    iir2 = inb(uart, IIR) & 0xE0
    outb(uart, FCR, 0x01)
    outb(uart, LCR, 0)
    if iir1 == 0xC0 and iir2 == 0xE0:
        return "16750"
    iersave = inb(uart, IER)
    outb(uart, IER, iersave & ~0x40)
    if not inb(uart, IER) & 0x40:
        outb(uart, IER, iersave | 0x40)
        if inb(uart, IER) & 0x40:
            return "XSCALE"
    outb(uart, IER, iersave)
    if linux_size_fifo(uart) == 64:
        return "U6_16550A"
    return "16550A"


def linux_autoconfig(uart: Uart16550) -> str:
    scratch = inb(uart, IER)
    outb(uart, IER, 0)
    scratch2 = inb(uart, IER) & 0x0F
    outb(uart, IER, 0x0F)
    scratch3 = inb(uart, IER) & 0x0F
    outb(uart, IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"
    save_mcr = inb(uart, MCR)
    save_lcr = inb(uart, LCR)
    outb(uart, MCR, 0x10 | 0x08 | 0x02)  # LOOP | OUT2 | RTS
    status1 = inb(uart, MSR) & 0xF0
    outb(uart, MCR, save_mcr)
    if status1 != 0x90:  # DCD | CTS
        return "LOOP test failed"
    outb(uart, LCR, 0xBF)
    outb(uart, 2, 0)  # EFR := 0 (the FCR on a 16550A)
    outb(uart, LCR, 0)
    outb(uart, FCR, 0x01)
    fifo_bits = inb(uart, IIR) & 0xC0
    if fifo_bits == 0x00:
        outb(uart, SCR, 0xA5)
        first = inb(uart, SCR)
        outb(uart, SCR, 0x5A)
        kind = "16450" if (first, inb(uart, SCR)) == (0xA5, 0x5A) else "8250"
    elif fifo_bits == 0x80:
        kind = "16550"
    elif fifo_bits == 0xC0:
        kind = linux_autoconfig_16550a(uart)
    else:
        kind = "unknown"
    outb(uart, LCR, save_lcr)
    outb(uart, MCR, save_mcr)
    outb(uart, FCR, 0x01)  # serial8250_clear_fifos
    outb(uart, FCR, 0x07)
    outb(uart, FCR, 0x00)
    inb(uart, RBR)
    outb(uart, IER, 0)
    return kind


def test_linux_autoconfig_identifies_a_16550a() -> None:
    uart, line, sink = make()
    assert linux_autoconfig(uart) == "16550A"
    assert sink.data == b""  # size_fifo's 256 bytes stayed in loopback
    assert not line.level


def test_scratch_register_8_10_holds_any_value() -> None:
    uart, _, _ = make()
    for value in (0xA5, 0x5A, 0x00, 0xFF):
        outb(uart, SCR, value)
        assert inb(uart, SCR) == value


def test_fcr_0xe7_reports_fifos_in_iir_bits_7_6_and_no_64_byte_fifo() -> None:
    uart, _, _ = make()
    outb(uart, FCR, 0xE7)
    assert inb(uart, IIR) == 0xC1


def test_linux_size_fifo_counts_16_bytes() -> None:
    uart, _, _ = make()
    assert linux_size_fifo(uart) == 16


def test_linux_autoconfig_irq_sees_the_thre_interrupt_with_out2() -> None:
    uart, line, sink = make()
    outb(uart, MCR, 0x01 | 0x02 | 0x08)
    outb(uart, IER, 0x0F)
    inb(uart, LSR)
    inb(uart, RBR)
    inb(uart, IIR)
    inb(uart, MSR)
    outb(uart, THR, 0xFF)
    assert line.level
    assert sink.data == b"\xff"


# ------------------------------------------------------------------ registers


def test_reset_configuration_table_ii() -> None:
    uart, line, _ = make()
    assert [inb(uart, offset) for offset in range(8)] == [0, 0, 0x01, 0, 0, 0x60, 0xB0, 0]
    assert line.history == []


def test_divisor_latch_8_2_is_behind_dlab() -> None:
    uart, _, sink = make()
    outb(uart, IER, 0x05)
    outb(uart, LCR, 0x83)
    outb(uart, DLL, 0x0C)
    outb(uart, DLM, 0x01)
    assert (inb(uart, DLL), inb(uart, DLM)) == (0x0C, 0x01)
    assert sink.data == b""
    outb(uart, LCR, 0x03)
    assert inb(uart, IER) == 0x05
    outb(uart, LCR, 0x80)
    assert uart.read(DLL, 2) == 0x010C
    assert inb(uart, LCR) == 0x80


def test_ier_8_7_keeps_bits_0_3_and_mcr_8_8_bits_0_4() -> None:
    uart, _, _ = make()
    outb(uart, IER, 0xFF)
    assert inb(uart, IER) == 0x0F
    outb(uart, MCR, 0xEF)
    assert inb(uart, MCR) == 0x0F


def test_thr_goes_to_the_sink_as_whole_bytes_whatever_the_word_length_8_1() -> None:
    uart, _, sink = make()
    outb(uart, THR, ord("h"))  # LCR still at reset: 5 data bits
    outb(uart, LCR, 0x03)
    outb(uart, THR, ord("i"))
    outb(uart, LCR, 0x02)  # 7 data bits
    outb(uart, THR, 0xFF)
    assert sink.data == b"hi\xff"
    assert inb(uart, LSR) & 0x60 == 0x60


def test_wide_access_splits_into_byte_accesses() -> None:
    uart, _, sink = make()
    outb(uart, LCR, 0x03)
    uart.write(SCR, 2, 0x4142)  # SCR then an undecoded port
    assert inb(uart, SCR) == 0x42
    assert uart.read(SCR, 2) == 0xFF42
    uart.write(THR, 2, 0x0F41)  # THR then IER
    assert sink.data == b"A"
    assert inb(uart, IER) == 0x0F
    assert uart.read(8, 4) == 0xFFFF_FFFF
    assert uart.read(LSR, 1) == 0x60


# ------------------------------------------------------------------- loopback


def test_loopback_8_8_returns_tx_to_rx_and_not_to_the_line() -> None:
    uart, _, sink = make()
    outb(uart, LCR, 0x03)
    outb(uart, MCR, 0x10)
    outb(uart, THR, 0x55)
    assert inb(uart, LSR) & 0x01
    assert inb(uart, RBR) == 0x55
    assert not inb(uart, LSR) & 0x01
    assert sink.data == b""


@pytest.mark.parametrize(
    ("mcr", "status"),
    [(0x11, 0x20), (0x12, 0x10), (0x14, 0x40), (0x18, 0x80), (0x1F, 0xF0), (0x10, 0x00)],
)
def test_loopback_8_9_msr_follows_mcr_outputs(mcr: int, status: int) -> None:
    uart, _, _ = make()
    outb(uart, MCR, mcr)
    assert inb(uart, MSR) & 0xF0 == status


def test_msr_delta_bits_8_9_and_modem_status_interrupt() -> None:
    uart, line, _ = make()
    outb(uart, IER, 0x08)
    outb(uart, MCR, 0x10 | 0x04)  # loopback: CTS, DSR, DCD drop; RI rises
    assert inb(uart, IIR) == 0x00
    assert not line.level  # loopback forces OUT2 inactive
    assert inb(uart, MSR) == 0x40 | 0x01 | 0x02 | 0x08
    assert inb(uart, IIR) == 0x01
    outb(uart, MCR, 0x10)  # RI falls: trailing edge
    assert inb(uart, MSR) == 0x04
    assert inb(uart, MSR) == 0x00


def test_loopback_overrun_8_4_keeps_the_fifo_and_raises_line_status() -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x03)
    outb(uart, FCR, 0x01)
    outb(uart, IER, 0x05)
    outb(uart, MCR, 0x10)
    for value in range(17):
        outb(uart, THR, value)
    assert inb(uart, IIR) == 0xC6
    assert inb(uart, LSR) == 0x63
    assert inb(uart, LSR) == 0x61
    assert drain(uart) == bytes(range(16))


def test_loopback_overrun_without_fifo_overwrites_rbr() -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x03)
    outb(uart, MCR, 0x10)
    outb(uart, THR, 1)
    outb(uart, THR, 2)
    assert inb(uart, LSR) == 0x63
    assert inb(uart, RBR) == 2


def test_host_input_waits_while_in_loopback() -> None:
    uart, _, _ = make()
    outb(uart, MCR, 0x10)
    uart.receive(b"x")
    assert not inb(uart, LSR) & 0x01
    outb(uart, MCR, 0)
    assert inb(uart, RBR) == ord("x")


# --------------------------------------------------------------------- FIFOs


@pytest.mark.parametrize(("bits", "level"), [(0, 1), (1, 4), (2, 8), (3, 14)])
def test_fifo_trigger_levels_8_5_and_timeout_indication_8_6(bits: int, level: int) -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x03)
    outb(uart, FCR, 0x01 | bits << 6)
    outb(uart, IER, 0x01)
    if level > 1:
        uart.receive(bytes(level - 1))
        assert inb(uart, IIR) == 0xCC  # data below the trigger level: timeout
    uart.receive(b"\x01")
    assert inb(uart, IIR) == 0xC4
    inb(uart, RBR)
    assert inb(uart, IIR) == (0xCC if level > 1 else 0xC1)
    drain(uart)
    assert inb(uart, IIR) == 0xC1


def test_fcr_clears_the_receiver_fifo_8_5() -> None:
    uart, _, _ = make()
    outb(uart, FCR, 0x01)
    uart.receive(b"abc")
    outb(uart, FCR, 0x03)
    assert not inb(uart, LSR) & 0x01
    uart.receive(b"d")
    outb(uart, FCR, 0x00)  # leaving FIFO mode clears too
    assert not inb(uart, LSR) & 0x01
    assert inb(uart, IIR) == 0x01


def test_fifo_holds_16_bytes_and_the_rest_waits_in_the_backlog() -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x03)
    outb(uart, FCR, 0x01)
    uart.receive(bytes(range(40)))
    state = uart.save()
    assert state["rx_fifo"] == list(range(16))
    assert state["host_backlog"] == bytes(range(16, 40)).hex()
    assert drain(uart) == bytes(range(40))


def test_input_backlog_loses_nothing_over_10000_bytes() -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x03)
    data = bytes((i * 7 + i // 256) & 0xFF for i in range(10_000))
    uart.receive(data)
    assert drain(uart) == data
    outb(uart, FCR, 0xC1)
    uart.receive(data)
    assert drain(uart) == data


def test_host_thread_input_while_the_guest_reads_keeps_order() -> None:
    uart, _, _ = make()
    outb(uart, FCR, 0x01)
    data = bytes(i & 0xFF for i in range(5_000))

    def host() -> None:
        for start in range(0, len(data), 7):
            uart.receive(data[start : start + 7])

    writer = threading.Thread(target=host)
    writer.start()
    received = bytearray()
    while writer.is_alive() or inb(uart, LSR) & 0x01:
        if inb(uart, LSR) & 0x01:
            received.append(inb(uart, RBR))
    writer.join()
    assert bytes(received) == data


def test_poll_input_pulls_from_the_source_as_the_guest_drains() -> None:
    source = QueueSource()
    uart, line, _ = make(source)
    outb(uart, LCR, 0x03)
    outb(uart, FCR, 0x01)
    outb(uart, MCR, 0x08)
    outb(uart, IER, 0x01)
    data = bytes(i & 0xFF for i in range(10_000))
    source.feed(data)
    assert uart.poll_input() == 16
    assert line.level
    assert uart.poll_input() == 0
    assert drain(uart) == data
    assert not line.level


def test_input_passes_whole_bytes_whatever_the_word_length() -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x00)  # 5 data bits
    uart.receive(b"\xff")
    assert inb(uart, RBR) == 0xFF


# ---------------------------------------------------------------- interrupts


def test_thre_interrupt_8_6_raised_on_enable_cleared_by_iir_read_and_thr_write() -> None:
    uart, line, sink = make()
    outb(uart, LCR, 0x03)
    outb(uart, MCR, 0x08)
    outb(uart, IER, 0x02)
    assert line.level
    assert inb(uart, IIR) == 0x02
    assert not line.level
    assert inb(uart, IIR) == 0x01
    history = len(line.history)
    outb(uart, THR, ord("a"))
    assert line.history[history:] == [True]  # empty again at once: a new edge
    outb(uart, THR, ord("b"))
    assert line.history[history:] == [True, False, True]
    assert sink.data == b"ab"
    outb(uart, IER, 0x00)
    assert not line.level


def test_out2_gates_the_irq_line() -> None:
    uart, line, _ = make()
    outb(uart, IER, 0x01)
    uart.receive(b"x")
    assert inb(uart, IIR) == 0x04
    assert not line.level
    outb(uart, MCR, 0x08)
    assert line.level
    outb(uart, MCR, 0x00)
    assert not line.level
    outb(uart, MCR, 0x08)
    inb(uart, RBR)
    assert not line.level


def test_loopback_forces_out2_inactive_so_the_irq_line_is_low() -> None:
    uart, line, _ = make()
    outb(uart, IER, 0x02)
    outb(uart, MCR, 0x18)
    assert inb(uart, IIR) == 0x02  # pending, yet the OUT2 pin is forced high
    outb(uart, IER, 0x00)
    outb(uart, IER, 0x02)
    assert not line.level
    outb(uart, MCR, 0x08)
    assert line.level


def test_interrupt_priorities_table_iv() -> None:
    uart, line, _ = make()
    outb(uart, LCR, 0x03)
    outb(uart, MCR, 0x10)
    outb(uart, THR, 1)
    outb(uart, THR, 2)  # overrun without FIFO
    outb(uart, MCR, 0x18)  # loopback, DCD changes: modem status delta
    outb(uart, IER, 0x0F)
    assert inb(uart, IIR) == 0x06
    inb(uart, LSR)
    assert inb(uart, IIR) == 0x04
    inb(uart, RBR)
    assert inb(uart, IIR) == 0x02
    assert inb(uart, IIR) == 0x00
    inb(uart, MSR)
    assert inb(uart, IIR) == 0x01
    assert not line.level


# --------------------------------------------------------------- save/restore


def test_save_restore_round_trips_and_behaves_the_same() -> None:
    uart, _, _ = make()
    outb(uart, LCR, 0x83)
    outb(uart, DLL, 0x01)
    outb(uart, LCR, 0x03)
    outb(uart, FCR, 0x81)
    outb(uart, MCR, 0x0B)
    outb(uart, IER, 0x03)
    outb(uart, SCR, 0x77)
    uart.receive(bytes(range(50)))
    snapshot = uart.save()

    copy, copy_line, _ = make()
    copy.restore(snapshot)
    assert copy.save() == snapshot
    assert copy_line.level  # the line is driven to the restored level
    assert [inb(copy, o) for o in range(8)] == [inb(uart, o) for o in range(8)]
    assert drain(copy) == drain(uart)


@pytest.mark.parametrize(
    "change",
    [
        {"ier": 0x10},
        {"mcr": 0x20},
        {"lcr": -1},
        {"divisor": 0x10000},
        {"fifo_enabled": 1},
        {"rx_fifo": [1, 2]},
        {"rx_fifo": [256]},
        {"host_backlog": "abc"},
        {"line_errors": 0x01},
        {"fifo_trigger_bits": 4},
        {"extra": 0},
    ],
)
def test_restore_rejects_malformed_snapshots(change: dict[str, object]) -> None:
    uart, _, _ = make()
    with pytest.raises(ValueError):
        uart.restore({**uart.save(), **change})
    assert uart.save() == make()[0].save()


def test_state_dataclass_fields_match_snapshot_keys() -> None:
    uart, _, _ = make()
    assert set(uart.save()) == set(UartState.__dataclass_fields__)


# ------------------------------------------------------------------ property

operations = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 12), st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(
        st.just("write"),
        st.integers(0, 12),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 0xFF)),
    ),
    st.tuples(st.just("receive"), st.integers(0, 40), st.just(1), st.just(0)),
    st.tuples(st.just("poll"), st.just(0), st.just(1), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, max_size=80), st.binary(max_size=64))
def test_fuzz_never_raises_and_keeps_invariants(
    ops: list[tuple[str, int, int, int]], source_data: bytes
) -> None:
    source = QueueSource()
    source.feed(source_data)
    uart, line, _ = make(source)
    for kind, a, size, value in ops:
        if kind == "read":
            assert 0 <= uart.read(a, size) < 1 << (8 * size)
        elif kind == "write":
            uart.write(a, size, value & ((1 << (8 * size)) - 1))
        elif kind == "receive":
            uart.receive(bytes(range(a)))
        else:
            uart.poll_input()
        state = uart.save()
        fifo = state["rx_fifo"]
        assert isinstance(fifo, list)
        assert len(fifo) <= (16 if state["fifo_enabled"] else 1)
        mcr = state["mcr"]
        assert isinstance(mcr, int)
        if line.level:
            assert mcr & 0x08 and not mcr & 0x10
        if not mcr & 0x10 and state["host_backlog"]:
            assert len(fifo) == (16 if state["fifo_enabled"] else 1)
    snapshot = uart.save()
    copy, copy_line, _ = make()
    copy.restore(snapshot)
    assert copy.save() == snapshot
    assert copy_line.level == line.level
