"""Leaving KVM_RUN on request (KVM API doc 5, immediate_exit and signals; 4.8
KVM_NMI), and vCPUs run on threads other than the one that created them."""

from __future__ import annotations

import signal
import struct
import threading
import time

import pytest
from kvmfast_guest_support import (
    CODE_AT,
    EXIT_SEQUENCE,
    STACK_TOP,
    RecordingDevice,
    VcpuThread,
    boot_guest,
    wait_until,
    wait_until_in_kvm_run,
)

from kvmfast import Exit, Kvm, NullSink
from kvmfast.testing import LAPIC_LVT_LINT1, LVT_NMI, setup_long_mode

LVT_MASKED = 1 << 16

pytestmark = pytest.mark.kvm

SPIN = """
.global entry
entry:
    jmp entry
"""

KVM_MP_STATE_RUNNABLE = 0


def test_kick_forces_an_exit_and_the_loop_goes_on_until_stop(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    running = VcpuThread(vcpu)
    wait_until_in_kvm_run(vcpu)
    time.sleep(0.05)
    assert running.alive
    vcpu.kicker().stop()
    assert running.join(timeout=10).reason == "stopped"


def test_kick_during_run_once_returns_intr(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    result: list[Exit] = []
    worker = threading.Thread(target=lambda: result.append(vcpu.run_once()))
    worker.start()
    kicker = vcpu.kicker()

    def kicked_out() -> bool:
        # A kick before run_once() enters is consumed at its entry: kick until it returns.
        kicker.kick()
        return not worker.is_alive()

    assert wait_until(kicked_out)
    worker.join()
    assert result[0].reason == "intr"


def test_stop_before_run_is_honoured_at_the_next_run(kvm: Kvm) -> None:
    guest = boot_guest(kvm, SPIN)
    guest.vcpu.kicker().stop()
    assert guest.vcpu.run().reason == "stopped"
    assert guest.vcpu.get_regs()["rip"] == guest.program.symbols["entry"]


def test_a_second_thread_cannot_run_a_running_vcpu(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    running = VcpuThread(vcpu)
    wait_until_in_kvm_run(vcpu)
    with pytest.raises(RuntimeError, match="already running"):
        vcpu.run()
    vcpu.kicker().stop()
    assert running.join().reason == "stopped"


def test_ctrl_c_reaches_a_vcpu_run_on_the_main_thread(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    interrupter = threading.Timer(0.1, signal.pthread_kill, args=(main, signal.SIGINT))
    # Without the signal check the run would spin on: end it so that the test fails.
    backstop = threading.Timer(10, vcpu.kicker().stop)
    # Python's Ctrl-C handler, even where this process was started with SIGINT ignored
    # (a background job of a non-interactive shell): then Python installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter.start()
    backstop.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            vcpu.run()
    finally:
        backstop.cancel()
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    assert vcpu.counters()["exits"]["intr"] >= 1


def test_request_nmi_is_delivered_by_the_vcpu_thread(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        """
    .global entry, nmi
    entry:
        jmp entry
    nmi:
        mov al, 2
        out 0x81, al
        iretq
        """,
        vectors={2: "nmi"},
    )
    seen = RecordingDevice()
    guest.vm.add_pio(0x81, 1, seen)
    running = VcpuThread(guest.vcpu)
    wait_until_in_kvm_run(guest.vcpu)
    guest.vcpu.kicker().request_nmi()
    assert wait_until(lambda: len(seen.log) == 1)
    guest.vcpu.kicker().stop()
    assert running.join().reason == "stopped"
    assert seen.log == [("write", 0, 1, 2)]


@pytest.mark.parametrize("lint1", [LVT_NMI, LVT_NMI | LVT_MASKED])
def test_lint1_queues_an_nmi_only_when_its_lvt_says_so(kvm: Kvm, lint1: int) -> None:
    """api.rst, KVM_NMI: read the LAPIC (KVM_GET_LAPIC), check whether changing LINT1
    queues an NMI (its LVT entry), and only then issue KVM_NMI."""
    guest = boot_guest(
        kvm,
        """
    .global entry, nmi
    entry:
        jmp entry
    nmi:
        mov al, 2
        out 0x81, al
        iretq
        """,
        vectors={2: "nmi"},
    )
    page = bytearray(guest.vcpu.get_lapic())
    struct.pack_into("<I", page, LAPIC_LVT_LINT1, lint1)
    guest.vcpu.set_lapic(bytes(page))
    seen = RecordingDevice()
    guest.vm.add_pio(0x81, 1, seen)
    kicker = guest.vcpu.kicker()
    running = VcpuThread(guest.vcpu)
    wait_until_in_kvm_run(guest.vcpu)
    kicker.request_lint1()
    queues = not lint1 & LVT_MASKED
    if queues:
        assert wait_until(lambda: len(seen.log) == 1)
    else:
        time.sleep(0.2)
    kicker.stop()
    assert running.join().reason == "stopped"
    assert len(seen.log) == int(queues)
    assert guest.vcpu.counters()["lint1_nmi"] == int(queues)
    assert guest.vm.counters()["lint1_nmi"] == int(queues)


def test_two_vcpus_run_their_own_code_on_two_threads(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
    .global entry, entry1
    entry:
        mov ecx, 50
    loop0:
        mov al, 0xa0
        out 0x90, al
        dec ecx
        jnz loop0
        mov al, 0
        {EXIT_SEQUENCE}
    entry1:
        mov ecx, 70
    loop1:
        mov al, 0xa1
        out 0x91, al
        dec ecx
        jnz loop1
        mov al, 1
        {EXIT_SEQUENCE}
        """,
    )
    assert guest.program.symbols["entry"] == CODE_AT
    second = guest.vm.create_vcpu(1)
    setup_long_mode(
        guest.vm,
        second,
        guest.memory,
        entry=guest.program.symbols["entry1"],
        stack=STACK_TOP - 0x1000,
    )
    # An application processor waits for INIT/SIPI unless made runnable.
    second.set_mp_state(KVM_MP_STATE_RUNNABLE)
    guest.vm.add_pio(0x90, 1, NullSink())
    guest.vm.add_pio(0x91, 1, NullSink())
    threads = [VcpuThread(guest.vcpu), VcpuThread(second)]
    exits = [thread.join() for thread in threads]
    assert [(e.reason, e.value) for e in exits] == [("device_exit", 0), ("device_exit", 1)]
    assert guest.vcpu.counters()["pio"] == {0x90: 50, 0xF4: 1}
    assert second.counters()["pio"] == {0x91: 70, 0xF4: 1}
    total = guest.vm.counters()
    assert total["pio"] == {0x90: 50, 0x91: 70, 0xF4: 2}
    assert total["exits"]["io"] == 122


TWO_SPOTS = """
.global entry
entry:
    mov ecx, 2000
.global first_loop
first_loop:
    pause
    dec ecx
    jnz first_loop
.global second_loop
second_loop:
    pause
    jmp second_loop
"""


def test_request_sample_counts_the_rip_the_guest_was_at(kvm: Kvm) -> None:
    guest = boot_guest(kvm, TWO_SPOTS)
    symbols = guest.program.symbols
    running = VcpuThread(guest.vcpu)
    wait_until_in_kvm_run(guest.vcpu)
    kicker = guest.vcpu.kicker()
    for _ in range(50):
        kicker.request_sample()
        time.sleep(0.002)
    kicker.stop()
    assert running.join(timeout=10).reason == "stopped"
    samples = guest.vm.rip_samples()
    # Each request is one sample, taken where the kick found the guest: in one of its
    # loops (a request posted while the loop was already leaving still counts once).
    assert 1 <= sum(samples.values()) <= 50
    loops = range(symbols["first_loop"], symbols["second_loop"] + 4)
    assert all(rip in loops for rip in samples), {hex(rip): n for rip, n in samples.items()}
    assert guest.vm.counters()["exits"].get("intr", 0) >= 1
