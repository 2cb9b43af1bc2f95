"""Tests of the 8254 PIT model and port 61h.

Section names are those of the Intel 8254 datasheet (order 231164): "Mode 0"
... "Mode 5" with their waveform figures, "Read Operations" (counter latch
command, read-back command, status byte), "Gate" (Table: Gate pin operations
summary). Port 61h follows the Intel 82371AB (PIIX4) datasheet, "NMI Status
and Control Register". The Linux sequences are from arch/x86/kernel/tsc.c
(pit_calibrate_tsc, quick_pit_calibrate / pit_verify_msb / pit_expect_msb)
and drivers/clocksource/i8253.c (periodic = mode 2, oneshot = mode 4,
shutdown = mode 0 with count 0).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvm_devices.interfaces import Device
from kvm_devices.pit import INPUT_HZ, Pit, ns_of_tick, tick_at
from kvm_devices.testing import RecordingLine, VirtualClock

CH0, CH1, CH2, CONTROL = 0, 1, 2, 3
START_TICK = 1_000


def make(start_tick: int = START_TICK) -> tuple[Pit, VirtualClock, RecordingLine]:
    clock = VirtualClock(ns_of_tick(start_tick))
    line = RecordingLine()
    return Pit(clock, clock, line), clock, line


def now_tick(clock: VirtualClock) -> int:
    return tick_at(clock.now_ns())


def to_tick(clock: VirtualClock, tick: int) -> None:
    clock.advance_to(ns_of_tick(tick))


def outb(pit: Pit, offset: int, value: int) -> None:
    pit.write(offset, 1, value)


def inb(pit: Pit, offset: int) -> int:
    return pit.read(offset, 1)


def program(pit: Pit, channel: int, mode: int, count: int, bcd: bool = False) -> None:
    """Control word with lsb-then-msb access, then the count."""
    outb(pit, CONTROL, channel << 6 | 0x30 | mode << 1 | int(bcd))
    outb(pit, channel, count & 0xFF)
    outb(pit, channel, count >> 8)


def read16(pit: Pit, channel: int) -> int:
    return inb(pit, channel) | inb(pit, channel) << 8


def out_wave(pit: Pit, clock: VirtualClock, channel: int, first: int, last: int) -> list[bool]:
    """OUT at each tick from first to last inclusive."""
    wave = []
    for tick in range(first, last + 1):
        to_tick(clock, tick)
        wave.append(pit.out(channel))
    return wave


# ------------------------------------------------------------ mode waveforms


def test_mode0_interrupt_on_terminal_count_figure() -> None:
    """Mode 0: OUT low after the control word, high N+1 CLKs after the count is written."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x10)  # counter 0, lsb only, mode 0
    assert not pit.out(CH0)
    outb(pit, CH0, 4)
    w = now_tick(clock)
    assert out_wave(pit, clock, CH0, w, w + 6) == [False] * 5 + [True] * 2
    outb(pit, CONTROL, 0x00)  # latch: the count wrapped past 0 and keeps counting
    assert inb(pit, CH0) == 0xFF


def test_mode0_counts_down_from_n_after_the_load_edge() -> None:
    """Mode 0: the count is loaded on the CLK pulse after the write, then decrements."""
    pit, clock, _ = make()
    program(pit, CH0, 0, 1000)
    w = now_tick(clock)
    to_tick(clock, w + 1)
    assert read16(pit, CH0) == 1000
    to_tick(clock, w + 301)
    assert read16(pit, CH0) == 700


def test_mode0_first_byte_of_new_count_stops_counting() -> None:
    """Mode 0: writing the first byte disables counting and sets OUT low immediately."""
    pit, clock, _ = make()
    program(pit, CH0, 0, 10)
    to_tick(clock, now_tick(clock) + 20)
    assert pit.out(CH0)
    outb(pit, CH0, 5)
    assert not pit.out(CH0)
    frozen = read16(pit, CH0)
    to_tick(clock, now_tick(clock) + 50)
    assert read16(pit, CH0) == frozen
    outb(pit, CH0, 0)
    w = now_tick(clock)
    assert out_wave(pit, clock, CH0, w, w + 7) == [False] * 6 + [True] * 2


def test_mode0_gate_low_suspends_counting() -> None:
    """Mode 0 with GATE low at the write: OUT goes high N CLKs after GATE rises."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x90)  # counter 2, lsb, mode 0 (its gate starts low)
    outb(pit, CH2, 5)
    to_tick(clock, now_tick(clock) + 100)
    assert not pit.out(CH2)
    assert inb(pit, CH2) == 5
    pit.set_gate(CH2, True)
    g = now_tick(clock)
    assert out_wave(pit, clock, CH2, g, g + 6) == [False] * 5 + [True] * 2


def test_mode1_one_shot_and_retrigger() -> None:
    """Mode 1: OUT low on the CLK after the trigger, high N CLKs later; a retrigger restarts."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x92)  # counter 2, lsb, mode 1
    outb(pit, CH2, 3)
    assert pit.out(CH2)
    to_tick(clock, now_tick(clock) + 10)
    assert pit.out(CH2), "no trigger yet"
    pit.set_gate(CH2, True)
    t = now_tick(clock)
    assert out_wave(pit, clock, CH2, t, t + 5) == [True, False, False, False, True, True]
    pit.set_gate(CH2, False)
    pit.set_gate(CH2, True)
    t = now_tick(clock)
    to_tick(clock, t + 2)
    pit.set_gate(CH2, False)
    pit.set_gate(CH2, True)  # retrigger at t+2
    assert out_wave(pit, clock, CH2, t + 2, t + 7) == [False, False, False, False, True, True]


def test_mode2_rate_generator_figure() -> None:
    """Mode 2: OUT low for one CLK when the count reaches 1, reload every N CLKs."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x14)  # counter 0, lsb, mode 2
    outb(pit, CH0, 3)
    w = now_tick(clock)
    wave = out_wave(pit, clock, CH0, w, w + 9)
    assert wave == [True, True, True, False, True, True, False, True, True, False]
    counts = []
    for tick in range(w + 10, w + 16):
        to_tick(clock, tick)
        counts.append(inb(pit, CH0))
    assert counts == [3, 2, 1, 3, 2, 1]


def test_mode2_new_count_waits_for_end_of_period() -> None:
    """Mode 2: a count written during counting is loaded at the end of the current period."""
    pit, clock, line = make()
    program(pit, CH0, 2, 1000)
    w = now_tick(clock)
    to_tick(clock, w + 300)
    outb(pit, CH0, 500 & 0xFF)
    outb(pit, CH0, 500 >> 8)
    edges = [t for t in range(w + 301, w + 2600) if _rises(pit, clock, CH0, t)]
    assert edges == [w + 1001, w + 1501, w + 2001, w + 2501]
    assert line.pulses == 4


def _rises(pit: Pit, clock: VirtualClock, channel: int, tick: int) -> bool:
    to_tick(clock, tick - 1)
    before = pit.out(channel)
    to_tick(clock, tick)
    return not before and pit.out(channel)


def test_mode3_square_wave_even_and_odd() -> None:
    """Mode 3: even N is high N/2 and low N/2; odd N is high (N+1)/2 and low (N-1)/2."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x96)  # counter 2, lsb, mode 3
    pit.set_gate(CH2, True)
    outb(pit, CH2, 4)
    w = now_tick(clock)
    assert out_wave(pit, clock, CH2, w + 1, w + 8) == [True, True, False, False] * 2
    outb(pit, CONTROL, 0x96)
    outb(pit, CH2, 5)
    w = now_tick(clock)
    assert (
        out_wave(pit, clock, CH2, w + 1, w + 10)
        == [True] * 3 + [False] * 2 + [True] * 3 + [False] * 2
    )


def test_mode3_counts_by_two() -> None:
    """Mode 3: the counter decrements by two, from N (even) or N-1 (odd), each half cycle."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x16)
    outb(pit, CH0, 5)
    w = now_tick(clock)
    values = []
    for tick in range(w + 1, w + 6):
        to_tick(clock, tick)
        values.append(inb(pit, CH0))
    assert values == [4, 2, 0, 4, 2]


def test_mode3_new_count_at_end_of_half_cycle() -> None:
    """Mode 3: a new count is loaded at the end of the current half cycle."""
    pit, clock, _ = make()
    program(pit, CH0, 3, 100)
    w = now_tick(clock)
    to_tick(clock, w + 11)  # 10 edges into the high half
    outb(pit, CH0, 40)
    outb(pit, CH0, 0)
    # Falls at 50 as before, low half of the new count (20), then period 40.
    assert not _rises(pit, clock, CH0, w + 51) and not pit.out(CH0)
    edges = [t for t in range(w + 52, w + 160) if _rises(pit, clock, CH0, t)]
    assert edges == [w + 71, w + 111, w + 151]


def test_mode4_software_strobe() -> None:
    """Mode 4: OUT high, low for one CLK N+1 CLKs after the write, then high; once."""
    pit, clock, line = make()
    outb(pit, CONTROL, 0x18)
    outb(pit, CH0, 3)
    w = now_tick(clock)
    assert out_wave(pit, clock, CH0, w, w + 7) == [True] * 4 + [False] + [True] * 3
    assert line.pulses == 1
    assert clock.pending == 0


def test_mode5_hardware_strobe_retriggerable() -> None:
    """Mode 5: OUT strobes low one CLK, N+1 CLKs after the gate's rising edge."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x9A)  # counter 2, lsb, mode 5
    outb(pit, CH2, 3)
    to_tick(clock, now_tick(clock) + 10)
    assert pit.out(CH2)
    pit.set_gate(CH2, True)
    t = now_tick(clock)
    assert out_wave(pit, clock, CH2, t, t + 6) == [True] * 4 + [False] + [True] * 2
    pit.set_gate(CH2, False)
    pit.set_gate(CH2, True)
    t = now_tick(clock)
    to_tick(clock, t + 2)
    pit.set_gate(CH2, False)
    pit.set_gate(CH2, True)
    assert out_wave(pit, clock, CH2, t + 3, t + 7) == [True, True, True, False, True]


def test_modes_6_and_7_alias_2_and_3() -> None:
    """Control word: M2 is a don't-care for modes 2 and 3; status reports the bits written."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x1C)  # mode "6"
    outb(pit, CH0, 3)
    w = now_tick(clock)
    assert out_wave(pit, clock, CH0, w + 1, w + 6) == [True, True, False] * 2
    outb(pit, CONTROL, 0xE2)
    assert inb(pit, CH0) & 0x0E == 0x0C


# ------------------------------------------------------------ gate


def test_gate_low_forces_out_high_in_mode2_and_restarts() -> None:
    """Gate, modes 2/3: GATE low sets OUT high and stops counting; rising edge reloads."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x94)  # counter 2, lsb, mode 2
    pit.set_gate(CH2, True)
    outb(pit, CH2, 4)
    w = now_tick(clock)
    to_tick(clock, w + 4)
    assert not pit.out(CH2)
    pit.set_gate(CH2, False)
    assert pit.out(CH2)
    frozen = inb(pit, CH2)
    to_tick(clock, w + 40)
    assert inb(pit, CH2) == frozen and pit.out(CH2)
    pit.set_gate(CH2, True)
    g = now_tick(clock)
    assert out_wave(pit, clock, CH2, g + 1, g + 8) == [True, True, True, False] * 2


def test_gate_low_holds_mode3_high() -> None:
    """Gate, mode 3: GATE low forces OUT high at once, even in the low half."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x96)
    pit.set_gate(CH2, True)
    outb(pit, CH2, 10)
    to_tick(clock, now_tick(clock) + 8)
    assert not pit.out(CH2)
    pit.set_gate(CH2, False)
    assert pit.out(CH2)


# ------------------------------------------------------------ reading


def test_counter_latch_command_holds_until_read() -> None:
    """Counter latch command: the count is held until read; a second latch is ignored."""
    pit, clock, _ = make()
    program(pit, CH0, 2, 1000)
    w = now_tick(clock)
    to_tick(clock, w + 101)
    outb(pit, CONTROL, 0x00)
    to_tick(clock, w + 201)
    outb(pit, CONTROL, 0x00)  # ignored
    assert read16(pit, CH0) == 900
    assert read16(pit, CH0) == 800


def test_control_word_releases_latch() -> None:
    """Counter latch: the latched count is held until read or the counter is reprogrammed."""
    pit, clock, _ = make()
    program(pit, CH0, 2, 1000)
    to_tick(clock, now_tick(clock) + 50)
    outb(pit, CONTROL, 0x00)
    outb(pit, CONTROL, 0x10)  # lsb only, mode 0, no count yet
    outb(pit, CH0, 7)
    to_tick(clock, now_tick(clock) + 1)
    assert inb(pit, CH0) == 7


def test_read_back_table() -> None:
    """Read-back command: the datasheet's example table, in order."""
    pit, clock, _ = make()
    pit.set_gate(CH2, True)
    program(pit, CH0, 2, 0x1234)
    program(pit, CH1, 3, 0x0100)
    program(pit, CH2, 0, 0x0500)
    to_tick(clock, now_tick(clock) + 1)  # all loaded: count values 1234h, 100h, 500h
    outb(pit, CONTROL, 0b11000010)  # count and status of counter 0
    outb(pit, CONTROL, 0b11100100)  # status of counter 1
    outb(pit, CONTROL, 0b11101100)  # status of counters 2 and 1: only 2 latches
    outb(pit, CONTROL, 0b11011000)  # count of counter 2
    outb(pit, CONTROL, 0b11000100)  # count and status of counter 1: count only
    outb(pit, CONTROL, 0b11100010)  # status of counter 0: already latched, ignored
    to_tick(clock, now_tick(clock) + 16)
    assert inb(pit, CH0) == 0b1_0_11_010_0  # OUT high, count loaded, lsb/msb, mode 2, binary
    assert read16(pit, CH0) == 0x1234
    assert inb(pit, CH1) == 0b1_0_11_011_0
    assert read16(pit, CH1) == 0x0100
    assert inb(pit, CH2) == 0b0_0_11_000_0
    assert read16(pit, CH2) == 0x0500
    assert read16(pit, CH2) == 0x0500 - 16


def test_status_null_count_until_loaded() -> None:
    """Status byte: NULL COUNT is 1 from a count write until it reaches the counting element."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x34)
    outb(pit, CONTROL, 0xE2)
    assert inb(pit, CH0) & 0x40
    outb(pit, CH0, 0x10)
    outb(pit, CH0, 0x00)
    outb(pit, CONTROL, 0xE2)
    assert inb(pit, CH0) & 0x40
    to_tick(clock, now_tick(clock) + 1)
    outb(pit, CONTROL, 0xE2)
    assert not inb(pit, CH0) & 0x40
    outb(pit, CH0, 0x20)  # a new count in mode 2 waits for the end of the period
    outb(pit, CH0, 0x00)
    to_tick(clock, now_tick(clock) + 5)
    outb(pit, CONTROL, 0xE2)
    assert inb(pit, CH0) & 0x40
    to_tick(clock, now_tick(clock) + 16)
    outb(pit, CONTROL, 0xE2)
    assert not inb(pit, CH0) & 0x40


def test_mode1_null_count_waits_for_trigger() -> None:
    """Status byte, mode 1: the count reaches the counting element only on a trigger."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x92)
    outb(pit, CH2, 9)
    to_tick(clock, now_tick(clock) + 10)
    outb(pit, CONTROL, 0xE8)
    assert inb(pit, CH2) & 0x40
    pit.set_gate(CH2, True)
    to_tick(clock, now_tick(clock) + 1)
    outb(pit, CONTROL, 0xE8)
    assert not inb(pit, CH2) & 0x40


def test_bcd_counting() -> None:
    """Control word BCD=1: four decades; a count of 0 is 10^4."""
    pit, clock, _ = make()
    program(pit, CH0, 0, 0x0100, bcd=True)
    w = now_tick(clock)
    to_tick(clock, w + 2)
    assert read16(pit, CH0) == 0x0099
    assert out_wave(pit, clock, CH0, w + 100, w + 101) == [False, True]
    program(pit, CH0, 2, 0x0000, bcd=True)
    w = now_tick(clock)
    to_tick(clock, w + 1)
    assert read16(pit, CH0) == 0x0000
    to_tick(clock, w + 2)
    assert read16(pit, CH0) == 0x9999
    assert _rises(pit, clock, CH0, w + 10_001)


def test_count_zero_is_65536_binary() -> None:
    """Count 0 is the maximum count: 2^16 in binary."""
    pit, clock, _ = make()
    program(pit, CH0, 2, 0)
    w = now_tick(clock)
    to_tick(clock, w + 2)
    assert read16(pit, CH0) == 0xFFFF
    assert _rises(pit, clock, CH0, w + 65_537)


def test_lsb_only_msb_only_and_flip_flops() -> None:
    """RW modes: lsb only (msb 0), msb only (lsb 0), lsb then msb with the read flip-flop."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x20 | 0x04)  # msb only, mode 2
    outb(pit, CH0, 0x12)
    w = now_tick(clock)
    to_tick(clock, w + 1)
    assert inb(pit, CH0) == 0x12
    outb(pit, CONTROL, 0x00)
    assert inb(pit, CH0) == 0x12  # msb of the latched 0x1200
    outb(pit, CONTROL, 0x10 | 0x04)  # lsb only
    outb(pit, CH0, 0x80)
    to_tick(clock, now_tick(clock) + 1)
    assert inb(pit, CH0) == 0x80
    outb(pit, CONTROL, 0x34)
    outb(pit, CH0, 0x34)
    outb(pit, CH0, 0x12)
    w = now_tick(clock)
    to_tick(clock, w + 1)
    assert [inb(pit, CH0), inb(pit, CH0), inb(pit, CH0)] == [0x34, 0x12, 0x34]
    assert inb(pit, CH0) == 0x12  # the flip-flop goes on alternating


def test_interleaved_read_and_write_of_two_byte_count() -> None:
    """Read Operations: reads and writes of one counter may be interleaved."""
    pit, clock, _ = make()
    outb(pit, CONTROL, 0x30)
    outb(pit, CH0, 0x00)
    outb(pit, CH0, 0x40)
    to_tick(clock, now_tick(clock) + 1)
    low = inb(pit, CH0)
    outb(pit, CH0, 0x00)
    high = inb(pit, CH0)
    outb(pit, CH0, 0x20)
    assert (low, high) == (0x00, 0x40)
    to_tick(clock, now_tick(clock) + 1)
    assert read16(pit, CH0) == 0x2000


def test_wider_and_undecoded_accesses() -> None:
    """Package convention: wider accesses act on the byte at the offset; the rest is 0xFF."""
    pit, clock, _ = make()
    assert isinstance(pit, Device) and isinstance(pit.port61, Device)
    assert (Pit.BASE, Pit.LENGTH, Pit.PORT61) == (0x40, 4, 0x61)
    program(pit, CH0, 2, 0x1234)
    to_tick(clock, now_tick(clock) + 1)
    assert pit.read(0, 2) == 0xFF34
    assert pit.read(0, 4) == 0xFFFFFF12
    assert pit.read(3, 1) == 0xFF
    assert pit.read(4, 8) == (1 << 64) - 1
    pit.write(7, 1, 0x30)
    assert pit.read(0, 1) == 0x34


# ------------------------------------------------------------ port 61h


def test_linux_pit_calibrate_tsc_polls_out2() -> None:
    """pit_calibrate_tsc: counter 2, mode 0, gate via port 61h, poll bit 5 until OUT2 rises."""
    pit, clock, _ = make()
    port61 = pit.port61
    latch = INPUT_HZ // (1000 // 50)
    port61.write(0, 1, (port61.read(0, 1) & ~0x02) | 0x01)
    outb(pit, CONTROL, 0xB0)
    outb(pit, CH2, latch & 0xFF)
    outb(pit, CH2, latch >> 8)
    start = clock.now_ns()
    loops = 0
    while not port61.read(0, 1) & 0x20:
        clock.advance(2_000)
        loops += 1
        assert loops < 50_000
    # 59660 CLKs: the count plus the load edge.
    assert 0 <= clock.now_ns() - start - 50_000_400 < 2_000


def test_linux_quick_pit_calibrate_msb_sequence() -> None:
    """quick_pit_calibrate: mode 0 from 0xFFFF; pit_expect_msb sees the MSB fall every 256 CLKs."""
    pit, clock, _ = make()
    pit.port61.write(0, 1, 0x01)
    outb(pit, CONTROL, 0xB0)
    outb(pit, CH2, 0xFF)
    outb(pit, CH2, 0xFF)
    w = now_tick(clock)
    msbs = []
    for step in range(1, 6):
        to_tick(clock, w + 1 + 256 * step - 128)
        inb(pit, CH2)  # pit_verify_msb reads the lsb, then compares the msb
        msbs.append(inb(pit, CH2))
    assert msbs == [0xFF - i for i in range(5)]


def test_port61_bits() -> None:
    """NMI status and control: bits 0-3 read back, bit 4 toggles with refresh, 6-7 are 0."""
    pit, clock, _ = make()
    port61 = pit.port61
    port61.write(0, 1, 0xFF)
    value = port61.read(0, 1)
    assert value & 0x0F == 0x0F
    assert value & 0xC0 == 0
    toggles = set()
    for _ in range(8):
        clock.advance(7_500)
        toggles.add(port61.read(0, 1) & 0x10)
    assert toggles == {0, 0x10}
    assert port61.read(0, 2) >> 8 == 0xFF
    assert port61.read(1, 1) == 0xFF


def test_port61_gate_drives_counter2() -> None:
    """Port 61h bit 0 is counter 2's GATE: clearing it stops a mode 0 count."""
    pit, clock, _ = make()
    pit.port61.write(0, 1, 0x01)
    outb(pit, CONTROL, 0x90)
    outb(pit, CH2, 200)
    to_tick(clock, now_tick(clock) + 50)
    pit.port61.write(0, 1, 0x00)
    held = inb(pit, CH2)
    to_tick(clock, now_tick(clock) + 50)
    assert inb(pit, CH2) == held


# ------------------------------------------------------------ IRQ0


def test_irq0_mode2_1000hz_gives_1000_interrupts_per_second() -> None:
    """Linux periodic clockevent: mode 2, LATCH=1193; one IRQ0 edge per period, one timer."""
    pit, clock, line = make()
    outb(pit, CONTROL, 0x34)
    outb(pit, CH0, 1193 & 0xFF)
    outb(pit, CH0, 1193 >> 8)
    assert clock.pending == 1
    clock.advance(1_000_000_000)
    assert line.pulses == 1000
    assert clock.pending == 1


def test_irq0_mode0_fires_once_then_no_timer() -> None:
    """Mode 0 after mode 2: OUT (and IRQ0) rises once at terminal count; nothing stays pending."""
    pit, clock, line = make()
    program(pit, CH0, 2, 1193)
    clock.advance(10_000_000)
    program(pit, CH0, 0, 1193)
    assert not line.level
    clock.advance(2_000_000)
    assert line.level
    assert clock.pending == 0
    pulses = line.pulses
    clock.advance(100_000_000)
    assert line.pulses == pulses and line.history[-1] is True


def test_irq0_linux_shutdown_and_oneshot() -> None:
    """i8253 clockevents: shutdown (mode 0, count 0) then oneshot (mode 4): one edge each."""
    pit, clock, line = make()
    program(pit, CH0, 0, 0)
    clock.advance(60_000_000)
    assert line.history == [True]
    program(pit, CH0, 4, 1193)
    assert line.history == [True, False]
    clock.advance(5_000_000)
    assert line.pulses == 1
    assert clock.pending == 0


def test_irq0_mode1_follows_out_through_a_trigger() -> None:
    """Mode 1 on counter 0 (gate driven by the test): IRQ0 follows OUT, low from the
    trigger, high at terminal count, for every trigger."""
    pit, clock, line = make()
    outb(pit, CONTROL, 0x12)
    assert line.history == [True], "mode 1 control word: OUT high"
    outb(pit, CH0, 100)
    pit.set_gate(CH0, False)
    pit.set_gate(CH0, True)
    assert line.history == [True, False]
    clock.advance(ns_of_tick(102))
    assert line.history == [True, False, True]
    pit.set_gate(CH0, False)
    pit.set_gate(CH0, True)
    clock.advance(ns_of_tick(102))
    assert line.history == [True, False, True, False], "within 100 µs of the last IRQ0"
    clock.advance(20_000)
    assert line.history == [True, False, True, False, True], "postponed, not lost"
    assert clock.pending == 0


def test_irq0_idle_pit_schedules_nothing() -> None:
    """No timer while counter 0 is not counting: power-on, control word only, gate low."""
    pit, clock, _ = make()
    assert clock.pending == 0
    outb(pit, CONTROL, 0x34)
    assert clock.pending == 0
    outb(pit, CH0, 0x00)
    outb(pit, CH0, 0x10)
    assert clock.pending == 1
    pit.set_gate(CH0, False)
    assert clock.pending == 0
    pit.set_gate(CH0, True)
    assert clock.pending == 1
    outb(pit, CONTROL, 0x30)
    assert clock.pending == 0


def test_irq0_mode3_one_pulse_per_period() -> None:
    """Mode 3 on IRQ0: one pulse at each rising edge of the square wave."""
    pit, clock, line = make()
    program(pit, CH0, 3, 11932)  # 10.0001 ms
    clock.advance(1_005_000_000)
    assert line.pulses == 100


def test_irq0_fast_rates_are_coalesced() -> None:
    """Counts far below the minimum interval merge: no more than one IRQ0 per 100 µs."""
    pit, clock, line = make()
    program(pit, CH0, 2, 2)
    clock.advance(10_000_000)
    assert 90 <= line.pulses <= 101


class LateTimer:
    """Clock and Timer whose callbacks run only when the test says, late on purpose."""

    def __init__(self, start_ns: int) -> None:
        self.now = start_ns
        self.queue: list[tuple[int, int, Callable[[], None]]] = []
        self.cancelled: set[int] = set()
        self.order = itertools.count()

    def now_ns(self) -> int:
        return self.now

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> int:
        key = next(self.order)
        heapq.heappush(self.queue, (deadline_ns, key, callback))
        return key

    def cancel(self, handle: object) -> None:
        if isinstance(handle, int):
            self.cancelled.add(handle)

    def live(self) -> list[tuple[int, int, Callable[[], None]]]:
        return [item for item in self.queue if item[1] not in self.cancelled]

    def run_due(self) -> int:
        ran = 0
        while self.queue and self.queue[0][0] <= self.now:
            _, key, callback = heapq.heappop(self.queue)
            if key not in self.cancelled:
                callback()
                ran += 1
        return ran


def test_irq0_late_timer_delivers_one_interrupt_then_rephases() -> None:
    """Catch-up policy: after a long stall one late interrupt, then the next period edge."""
    timer = LateTimer(ns_of_tick(START_TICK))
    line = RecordingLine()
    pit = Pit(timer, timer, line)
    program(pit, CH0, 2, 1193)
    w = tick_at(timer.now)
    timer.now = ns_of_tick(w + 1 + 1193 * 5000 + 600)  # five seconds late
    assert timer.run_due() == 1
    assert line.pulses == 1
    ((deadline, _, _),) = timer.live()
    assert deadline == ns_of_tick(w + 1 + 1193 * 5001)


def test_irq0_edge_overtaken_by_a_write_is_delivered() -> None:
    """A due edge whose callback has not run yet is delivered before a reprogramming write."""
    timer = LateTimer(ns_of_tick(START_TICK))
    line = RecordingLine()
    pit = Pit(timer, timer, line)
    program(pit, CH0, 0, 100)
    timer.now += 1_000_000
    outb(pit, CONTROL, 0x30)
    assert line.history == [True, False]
    assert timer.run_due() == 0


class ThreadTimer:
    """Monotonic clock and a timer thread, as a VMM would provide them."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, int, Callable[[], None]]] = []
        self.cancelled: set[int] = set()
        self.order = itertools.count()
        self.wake = threading.Condition()
        self.stopped = False
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> int:
        with self.wake:
            key = next(self.order)
            heapq.heappush(self.queue, (deadline_ns, key, callback))
            self.wake.notify()
            return key

    def cancel(self, handle: object) -> None:
        with self.wake:
            if isinstance(handle, int):
                self.cancelled.add(handle)

    def run(self) -> None:
        while True:
            with self.wake:
                while not self.stopped and (
                    not self.queue or self.queue[0][0] > time.monotonic_ns()
                ):
                    delay = (self.queue[0][0] - time.monotonic_ns()) / 1e9 if self.queue else None
                    self.wake.wait(delay)
                if self.stopped:
                    return
                _, key, callback = heapq.heappop(self.queue)
                if key in self.cancelled:
                    continue
            try:
                callback()
            except BaseException as error:
                self.errors.append(error)

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=5)


def test_timer_thread_and_vcpu_thread_together() -> None:
    """Thread safety: IRQ0 callbacks on a timer thread while a vCPU thread reprograms,
    latches and gates; no deadlock, no error, interrupts keep coming."""
    timer = ThreadTimer()
    line = RecordingLine()
    pit = Pit(timer, timer, line)
    program(pit, CH0, 2, 1193)
    stop_at = time.monotonic() + 0.3
    try:
        while time.monotonic() < stop_at:
            outb(pit, CONTROL, 0x00)
            read16(pit, CH0)
            pit.port61.write(0, 1, 1)
            pit.port61.read(0, 1)
            outb(pit, CH0, 1193 & 0xFF)
            outb(pit, CH0, 1193 >> 8)
            time.sleep(0.0002)
    finally:
        timer.stop()
    assert timer.errors == []
    assert not timer.thread.is_alive()
    assert 20 <= line.pulses <= 320


# ------------------------------------------------------------ snapshots


def test_save_restore_round_trip_and_resume() -> None:
    """Snapshots: save→restore→save is identical, and the restored PIT keeps time."""
    pit, clock, line = make()
    program(pit, CH0, 2, 1193)
    pit.port61.write(0, 1, 0x03)
    outb(pit, CONTROL, 0xB6)
    outb(pit, CH2, 0x34)
    clock.advance(3_300_000)
    outb(pit, CONTROL, 0x80)
    snapshot = pit.save()
    twin_clock = VirtualClock(clock.now_ns())
    twin_line = RecordingLine()
    twin = Pit(twin_clock, twin_clock, twin_line)
    twin.restore(snapshot)
    assert twin.save() == snapshot
    assert twin_clock.pending == 1
    assert inb(twin, CH2) == inb(pit, CH2)
    clock.advance(10_000_000)
    twin_clock.advance(10_000_000)
    assert twin_line.pulses == line.pulses - 3
    assert read16(twin, CH0) == read16(pit, CH0)


def test_restore_on_another_clock_counts_no_time_while_saved() -> None:
    """Snapshots are of a paused machine: restoring later resumes where the save left off."""
    pit, clock, _ = make()
    program(pit, CH0, 2, 1000)
    to_tick(clock, now_tick(clock) + 301)
    snapshot = pit.save()
    later = VirtualClock(ns_of_tick(9_999_999))
    twin = Pit(later, later, RecordingLine())
    twin.restore(snapshot)
    assert read16(twin, CH0) == read16(pit, CH0) == 700


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("clock_tick"),
        lambda s: s.update(counters=s["counters"][:2]),
        lambda s: s["counters"][0].update(mode_bits=8),
        lambda s: s["counters"][0].update(output_latch=[1, 2, 3]),
        lambda s: s["counters"][0].update(armed=True, count=0),
        lambda s: s["counters"][1].update(gate="yes"),
        lambda s: s["port61"].update(control=0x10),
        lambda s: s.update(irq0_level=1),
    ],
)
def test_restore_rejects_malformed(mutate: Callable[[dict[str, object]], object]) -> None:
    pit, _, _ = make()
    snapshot = pit.save()
    mutate(snapshot)
    with pytest.raises(ValueError):
        pit.restore(snapshot)


# ------------------------------------------------------------ fuzz

Op = tuple[str, int, int, int]
SIZES = st.sampled_from([1, 2, 4, 8])
OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 8), SIZES, st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("control"), st.integers(0, 255), st.just(1), st.just(0)),
    st.tuples(st.just("program"), st.integers(0, 2), st.integers(0, 0x3F), st.integers(0, 3000)),
    st.tuples(st.just("read"), st.integers(0, 8), SIZES, st.just(0)),
    st.tuples(st.just("write61"), st.integers(0, 5), SIZES, st.integers(0, 255)),
    st.tuples(st.just("read61"), st.integers(0, 5), SIZES, st.just(0)),
    st.tuples(st.just("gate"), st.integers(0, 2), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("advance"), st.integers(0, 3_000_000), st.just(0), st.just(0)),
)


def apply(pit: Pit, clock: VirtualClock, op: Op) -> int | None:
    kind, a, b, c = op
    if kind == "write":
        pit.write(a, b, c)
    elif kind == "control":
        pit.write(CONTROL, 1, a)
    elif kind == "program":
        pit.write(CONTROL, 1, a << 6 | b)
        pit.write(a, 1, c & 0xFF)
        pit.write(a, 1, c >> 8)
    elif kind == "read":
        return pit.read(a, b)
    elif kind == "write61":
        pit.port61.write(a, b, c)
    elif kind == "read61":
        return pit.port61.read(a, b)
    elif kind == "gate":
        pit.set_gate(a, bool(b))
    else:
        clock.advance(a)
    return None


def counter0(pit: Pit) -> tuple[bool, int]:
    """Whether counter 0 is counting, and its mode (6 and 7 folded onto 2 and 3)."""
    counters = pit.save()["counters"]
    assert isinstance(counters, list)
    bits = int(counters[0]["mode_bits"])
    return bool(counters[0]["armed"]), bits & 3 if bits & 2 else bits


@settings(max_examples=200, deadline=None)
@given(st.lists(OPS, max_size=40), st.lists(OPS, max_size=40))
def test_fuzz_never_raises_and_restores_identically(before: list[Op], after: list[Op]) -> None:
    """Any access sequence: no exception, reads fit their width, one timer at most,
    none while counter 0 is idle, IRQ0 consistent with OUT0, and a restored twin
    behaves identically."""
    pit, clock, line = make()
    for op in before:
        result = apply(pit, clock, op)
        if result is not None:
            assert 0 <= result < 1 << (8 * op[2])
        assert clock.pending <= 1
        armed, mode = counter0(pit)
        if not armed:
            assert clock.pending == 0
        if mode > 1:
            assert not line.level, "pulse modes keep IRQ0 low between pulses"
        elif clock.pending == 0:
            assert line.level == pit.out(0), "level modes: IRQ0 follows OUT0"

    snapshot = pit.save()
    twin_clock = VirtualClock(clock.now_ns())
    twin_line = RecordingLine(level=line.level)
    twin = Pit(twin_clock, twin_clock, twin_line)
    twin.restore(snapshot)
    assert twin.save() == snapshot
    mark = len(line.history)
    for op in after:
        assert apply(pit, clock, op) == apply(twin, twin_clock, op)
    assert twin_line.history == line.history[mark:]
    assert twin.save() == pit.save()
