"""The state SeaBIOS leaves for a kernel QEMU boots, on our own PIT, 8259 pair and RAM.

SeaBIOS: src/hw/timer.c pit_setup (counter 0, mode 2, count 0), src/hw/pic.c pic_setup
and enable_hwirq (vectors 08h/70h, IRQ0 and the cascade open); kvm-unit-tests' realmode
test waits for that tick with STI; HLT in real mode.
"""

from __future__ import annotations

from kvm_devices.pic import PicPair
from kvm_devices.pit import Pit, ns_of_tick
from kvm_devices.testing import RecordingLine, VirtualClock
from kvm_vmm.bios_state import TIMER_HANDLER, bios_memory, start_timer

PIT_HZ = 1_193_182  # the 8254's input clock on a PC


def test_timer_vector_points_at_an_eoi_and_iret_in_the_ebda() -> None:
    (entry, vector), (handler, code) = bios_memory([(0x100000, 0x4000)])
    assert entry == 0x08 * 4  # real-mode IVT: 4 bytes per vector, offset then segment
    offset, segment = int.from_bytes(vector[:2], "little"), int.from_bytes(vector[2:], "little")
    assert segment * 16 + offset == handler
    assert 0x9FC00 <= handler <= 0xA0000 - len(code)  # the EBDA, reserved
    # push ax; mov al, 20h; out 20h, al (OCW2: non-specific EOI); pop ax; iret
    assert code == TIMER_HANDLER == bytes.fromhex("50 b0 20 e6 20 58 cf")


def test_a_kernel_over_the_ivt_entry_or_the_handler_keeps_its_bytes() -> None:
    assert bios_memory([(0x0, 0x1000)]) == []  # a kernel loaded over the IVT
    assert bios_memory([(0x9F000, 0xFF1)]) == []  # one reaching the handler's first byte
    assert len(bios_memory([(0x24, 0x9FFCC)])) == 2  # ends one byte short of it


def test_pit_counter0_ticks_at_18_2_hz_into_an_open_irq0() -> None:
    clock = VirtualClock(ns_of_tick(1000))
    irq0 = RecordingLine()
    pit = Pit(clock, clock, irq0)
    intr = RecordingLine()
    pic = PicPair(intr.set_level)
    start_timer(pit, pic.master_ports)
    counter = pit.save_state().counters[0]
    assert (counter.mode_bits, counter.access, counter.bcd) == (2, 3, False)
    assert counter.count == 0x10000  # a count of 0 is 2^16 in binary
    clock.advance(1_000_000_000)
    rises = irq0.history.count(True)  # a pulse is recorded as a rise and a fall
    assert abs(rises - PIT_HZ / 65536) <= 1, rises  # 18.2 per second
    state = pic.save_state()
    assert state.master.imr == 0xFA and state.slave.imr == 0xFF
    pic.set_irq(0, True)
    assert intr.level and pic.acknowledge() == 0x08
