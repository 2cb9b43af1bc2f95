"""What a PC BIOS leaves behind for a Multiboot kernel that counts on it.

QEMU boots ``-kernel`` through SeaBIOS, and kvm-unit-tests' realmode test counts on
what SeaBIOS set up (its x86/run: "the realmode test relies on the PIT"): it drops to
real mode and waits with ``STI; HLT``, and what wakes it is the BIOS's timer tick.
SeaBIOS (src/hw/timer.c ``pit_setup``, src/hw/pic.c ``pic_setup`` and
``enable_hwirq``) leaves:

* 8254 counter 0 in mode 2 (rate generator), binary, low then high byte, count 0
  (65536: 1.193182 MHz / 65536 = 18.2 Hz), its output on IRQ0 (Intel 8254 datasheet,
  "Control Word Format"; a count of 0 is the maximum, 2^16 in binary);
* the 8259 pair initialised at vectors 08h and 70h (our PIC's power-on state), IRQ0
  and the cascade input IRQ2 unmasked on the master (OCW1 = 0xFA), the slave masked;
* real-mode vector 08h (the IVT entry at 0x20, offset then segment) on a handler that
  sends the master a non-specific EOI (OCW2 = 0x20) and returns with IRET.

The handler lives at the top of the EBDA, which the memory map reserves. A
protected-mode kernel masks the 8259s before it enables interrupts
(kvm-unit-tests' setup and our own test kernels do), so the ticks reach no one else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvm_vmm.layout import EBDA

TIMER_VECTOR = 0x08  # the master 8259's IRQ0 at the BIOS's vector base 08h
IVT_ENTRY_SIZE = 4
PIT_COUNTER0 = 0
PIT_CONTROL = 3
PIT_MODE2_COUNTER0 = 0x34  # counter 0, low byte then high byte, mode 2, binary
PIC_DATA = 1  # OCW1, the interrupt mask, once initialised
MASTER_MASK = 0xFA  # IRQ0 (timer) and IRQ2 (cascade) open
# push ax; mov al, 20h; out 20h, al; pop ax; iret
TIMER_HANDLER = bytes((0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF))
TIMER_HANDLER_ADDRESS = EBDA.start + EBDA.size - 16


class Port(Protocol):
    def write(self, offset: int, size: int, value: int) -> None: ...


def _overlaps(start: int, size: int, occupied: Sequence[tuple[int, int]]) -> bool:
    return any(start < gpa + length and gpa < start + size for gpa, length in occupied)


def bios_memory(occupied: Sequence[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """The IVT entry and the timer handler as (address, bytes), or nothing when the
    kernel's own segments (``occupied``: (address, size)) cover either: the kernel's
    bytes win, as they would over a BIOS's."""
    entry = TIMER_VECTOR * IVT_ENTRY_SIZE
    if _overlaps(entry, IVT_ENTRY_SIZE, occupied) or _overlaps(
        TIMER_HANDLER_ADDRESS, len(TIMER_HANDLER), occupied
    ):
        return []
    segment, offset = TIMER_HANDLER_ADDRESS >> 4, TIMER_HANDLER_ADDRESS & 0xF
    vector = offset.to_bytes(2, "little") + segment.to_bytes(2, "little")
    return [(entry, vector), (TIMER_HANDLER_ADDRESS, TIMER_HANDLER)]


def start_timer(pit: Port, master_pic: Port) -> None:
    """Counter 0 at 18.2 Hz and the master 8259 open to it, through their own ports."""
    pit.write(PIT_CONTROL, 1, PIT_MODE2_COUNTER0)
    pit.write(PIT_COUNTER0, 1, 0)
    pit.write(PIT_COUNTER0, 1, 0)
    master_pic.write(PIC_DATA, 1, MASTER_MASK)
