"""Leaving KVM_RUN on request (KVM API doc 5, immediate_exit and signals; 4.8
KVM_NMI), and vCPUs run on threads other than the one that created them."""

from __future__ import annotations

import signal
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
)

from kvmfast import Exit, Kvm, NullSink
from kvmfast.testing import setup_long_mode

pytestmark = pytest.mark.kvm

SPIN = """
.global entry
entry:
    jmp entry
"""

KVM_MP_STATE_RUNNABLE = 0


def test_kick_forces_an_exit_and_the_loop_goes_on_until_stop(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    kicker = vcpu.kicker()
    running = VcpuThread(vcpu)
    time.sleep(0.05)
    kicker.kick()
    assert wait_until(lambda: vcpu.counters()["exits"].get("intr", 0) >= 1)
    assert running.alive
    kicker.stop()
    assert running.join(timeout=10).reason == "stopped"
    assert vcpu.counters()["exits"]["intr"] >= 2


def test_kick_during_run_once_returns_intr(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    result: list[Exit] = []
    worker = threading.Thread(target=lambda: result.append(vcpu.run_once()))
    worker.start()
    time.sleep(0.05)
    vcpu.kicker().kick()
    worker.join(10)
    assert not worker.is_alive()
    assert result[0].reason == "intr"


def test_stop_before_run_is_honoured_at_the_next_run(kvm: Kvm) -> None:
    guest = boot_guest(kvm, SPIN)
    guest.vcpu.kicker().stop()
    assert guest.vcpu.run().reason == "stopped"
    assert guest.vcpu.get_regs()["rip"] == guest.program.symbols["entry"]


def test_a_second_thread_cannot_run_a_running_vcpu(kvm: Kvm) -> None:
    vcpu = boot_guest(kvm, SPIN).vcpu
    running = VcpuThread(vcpu)
    time.sleep(0.05)
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
    interrupter.start()
    backstop.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            vcpu.run()
    finally:
        backstop.cancel()
        interrupter.join()
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
    time.sleep(0.05)
    guest.vcpu.kicker().request_nmi()
    assert wait_until(lambda: len(seen.log) == 1)
    guest.vcpu.kicker().stop()
    assert running.join().reason == "stopped"
    assert seen.log == [("write", 0, 1, 2)]


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
