"""A completion must not inject an interrupt the guest has already taken.

kvmfast completes an instruction from registers KVM syncs into the run page
(KVM_CAP_SYNC_REGS) and writes changed segment registers back through the same page,
which KVM applies as KVM_SET_SREGS does. That ioctl treats a bit set in
``interrupt_bitmap`` as an external interrupt acknowledged but not yet delivered, and
queues it for the next entry, whatever RFLAGS.IF says (KVM API, KVM_SET_SREGS). On this
host the run page's bitmap is never cleared by KVM: once an exit came with an interrupt
in flight (a kick ending KVM_RUN while the LAPIC timer's vector was being injected), that
vector stayed set, and every later completion that changed a segment register injected
the timer interrupt again. A completed INT3 enters its handler through an interrupt gate
(IF clear): the spurious interrupt then landed on the handler's first instruction, a
maskable interrupt with interrupts disabled (SDM Vol. 3A 6.8.1). A Linux guest profiled
at 100 Hz nested the timer on ``asm_exc_int3`` until its IRQ stack overflowed
(docs/emulation.md).

The guest runs INT3 and CLAC (for InterruptInFlightAtAnExit) in a loop at CPL 0 with IF
set; the interrupt handler counts, in
guest memory, entries whose saved RFLAGS has IF clear and entries on the #BP handler's
first instruction; the #BP handler checks that its frame's RIP is just past the INT3.
The first test makes an exit with an interrupt in flight on purpose, once; the second
is the profiler's situation (a fast LAPIC timer, kicks from another thread), where such
an exit comes at random: before the fix it failed about one run in three."""

from __future__ import annotations

import struct
import threading
import time

import pytest
from emulation_support import (
    Guest,
    InterruptInFlightAtAnExit,
    completions,
    emulated_cpl0,
    exception_handlers_asm,
    gate64,
    install_exception_handlers,
    make_guest,
    run_until_exit,
)

from kvmfast import Kvm

# Both tests watch what kvmfast completes at CPL 0 (INT3, CLAC, the SYSCALL repair).
pytestmark = emulated_cpl0

pytestmark = pytest.mark.kvm

TIMER_VECTOR = 0x30
BREAKPOINTS = 20_000
DONE = 0x10

GUEST = f"""
.global entry, breakpoint, timer, after_int3
.global ticks, timer_with_if_clear, timer_on_breakpoint, bad_frames, breakpoints
entry:
    sti
    mov r15, {BREAKPOINTS}
again:
    int3
after_int3:
    clac
    dec r15
    jnz again
    cli
    mov al, {DONE}
    out 0xf4, al
breakpoint:
    push rax
    lea rax, [rip + after_int3]
    cmp [rsp + 8], rax
    je 1f
    inc qword ptr [rip + bad_frames]
1:  inc qword ptr [rip + breakpoints]
    pop rax
    iretq
timer:
    push rax
    test qword ptr [rsp + 24], 0x200
    jnz 1f
    inc qword ptr [rip + timer_with_if_clear]
1:  lea rax, [rip + breakpoint]
    cmp [rsp + 8], rax
    jne 2f
    inc qword ptr [rip + timer_on_breakpoint]
2:  mov rax, 0xfee000b0
    mov dword ptr [rax], 0
    inc qword ptr [rip + ticks]
    pop rax
    iretq
    .balign 8
ticks: .quad 0
timer_with_if_clear: .quad 0
timer_on_breakpoint: .quad 0
bad_frames: .quad 0
breakpoints: .quad 0
{exception_handlers_asm()}
"""


def _counter(guest: Guest, name: str) -> int:
    value: int = struct.unpack("<Q", guest.vm.read(guest.symbols[name], 8))[0]
    return value


def _start_lapic_timer(guest: Guest, initial_count: int) -> None:
    lapic = bytearray(guest.vcpu.get_lapic())
    struct.pack_into("<I", lapic, 0xF0, 0x1FF)  # software enable
    struct.pack_into("<I", lapic, 0x320, (1 << 17) | TIMER_VECTOR)  # periodic
    struct.pack_into("<I", lapic, 0x3E0, 0xB)  # divide by 1
    struct.pack_into("<I", lapic, 0x380, initial_count)
    guest.vcpu.set_lapic(bytes(lapic))


def _guest(kvm: Kvm) -> Guest:
    guest = make_guest(kvm, GUEST)
    install_exception_handlers(
        guest,
        {3: gate64(guest.symbols["breakpoint"]), TIMER_VECTOR: gate64(guest.symbols["timer"])},
    )
    return guest


def _assert_no_interrupt_with_if_clear(guest: Guest) -> None:
    seen = {
        name: _counter(guest, name)
        for name in ("timer_with_if_clear", "timer_on_breakpoint", "bad_frames")
    }
    assert seen == dict.fromkeys(seen, 0)


def test_an_interrupt_in_flight_at_an_exit_is_delivered_once(kvm: Kvm) -> None:
    """Before the fix every INT3 completed after that exit delivered the vector again."""
    guest = _guest(kvm)
    in_flight = InterruptInFlightAtAnExit(guest.vcpu, TIMER_VECTOR, after_exits=100)
    in_flight.install()
    assert run_until_exit(guest) == DONE, guest.vcpu.get_regs()
    assert in_flight.fired
    assert guest.vcpu.counters()["exits"].get("intr") == 1
    assert _counter(guest, "breakpoints") == BREAKPOINTS
    _assert_no_interrupt_with_if_clear(guest)
    # The interrupt in flight, then the same vector as the PIC's ExtINT: nothing more.
    assert _counter(guest, "ticks") == 2


def test_no_interrupt_lands_on_a_completed_int3_with_if_clear(kvm: Kvm) -> None:
    guest = _guest(kvm)
    _start_lapic_timer(guest, 5_000)
    kicker = guest.vcpu.kicker()
    done = threading.Event()

    def kick() -> None:
        while not done.is_set():
            kicker.request_sample()
            time.sleep(0.0001)

    thread = threading.Thread(target=kick)
    thread.start()
    try:
        vector = run_until_exit(guest)
    finally:
        done.set()
        thread.join()
    assert vector == DONE, (vector, guest.vcpu.get_regs())
    assert _counter(guest, "breakpoints") == BREAKPOINTS
    assert completions(guest).get("int3") == BREAKPOINTS
    # The kicks and the timer both landed, often: the test saw the race it is about.
    assert guest.vcpu.counters()["exits"].get("intr", 0) > 100
    assert _counter(guest, "ticks") > 100
    _assert_no_interrupt_with_if_clear(guest)
