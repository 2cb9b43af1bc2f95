"""ioeventfd writes complete in the kernel without an exit (KVM API doc 4.59
KVM_IOEVENTFD; KVM_CAP_IOEVENTFD_ANY_LENGTH for length 0), the kernel's own answers
surface as KvmError, and the event loop turns eventfd notifications into handler calls
or, through IrqfdTrigger and KVM_IRQFD (4.75), into guest interrupts."""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
import time
from pathlib import Path

import pytest
from kvmfast_guest_support import (
    EXIT_SEQUENCE,
    LAPIC_BASE,
    LAPIC_EOI,
    LAPIC_SOFTWARE_ENABLE,
    MMIO_BASE,
    RecordingDevice,
    boot_guest,
    run_with_timeout,
    wait_until,
)

from kvmfast import EventFd, EventLoop, IrqfdTrigger, Kvm, KvmError

DOORBELL = MMIO_BASE + 0x2000


@pytest.mark.kvm
def test_zero_length_mmio_ioeventfd_fires_for_every_width_without_an_exit(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        mov rbx, {DOORBELL:#x}
        mov byte ptr [rbx], 1
        mov word ptr [rbx], 2
        mov dword ptr [rbx], 3
        mov qword ptr [rbx], 4
        mov dx, 0x510
        out dx, al
        out dx, ax
        {EXIT_SEQUENCE}
        """,
    )
    doorbell, port_bell = EventFd(), EventFd()
    guest.vm.register_ioeventfd(doorbell.fd, DOORBELL, 0)
    guest.vm.register_ioeventfd(port_bell.fd, 0x510, 0, pio=True)
    device = RecordingDevice()
    guest.vm.add_mmio(MMIO_BASE, 0x10000, device)
    assert guest.vcpu.run().reason == "device_exit"
    assert doorbell.read() == 4
    assert port_bell.read() == 2
    assert device.log == []
    counters = guest.vcpu.counters()
    assert counters["exits"] == {"io": 1}
    assert counters["mmio"] == {}
    assert counters["unmapped_pio"] == 0


@pytest.mark.kvm
def test_datamatch_and_deassign(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        mov rbx, {DOORBELL:#x}
        mov dword ptr [rbx], 7
        mov dword ptr [rbx], 8
        {EXIT_SEQUENCE}
        """,
    )
    bell = EventFd()
    guest.vm.register_ioeventfd(bell.fd, DOORBELL, 4, datamatch=8)
    device = RecordingDevice()
    guest.vm.add_mmio(DOORBELL, 4, device)
    assert guest.vcpu.run().reason == "device_exit"
    assert bell.read() == 1
    assert device.log == [("write", 0, 4, 7)]
    guest.vm.unregister_ioeventfd(bell.fd, DOORBELL, 4, datamatch=8)
    with pytest.raises(KvmError) as e:
        guest.vm.unregister_ioeventfd(bell.fd, DOORBELL, 4, datamatch=8)
    assert e.value.errno == errno.ENOENT


@pytest.mark.kvm
def test_the_kernel_judges_lengths_and_flags(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    bell = EventFd()
    with pytest.raises(KvmError) as length_3:
        vm.register_ioeventfd(bell.fd, DOORBELL, 3)
    assert length_3.value.errno == errno.EINVAL
    assert "KVM_IOEVENTFD" in str(length_3.value)
    with pytest.raises(KvmError) as zero_with_match:
        vm.register_ioeventfd(bell.fd, DOORBELL, 0, datamatch=1)
    assert zero_with_match.value.errno == errno.EINVAL


def test_eventfd_counts_and_does_not_block() -> None:
    with EventFd() as bell:
        assert bell.read() == 0
        bell.write()
        bell.write(5)
        assert bell.read() == 6
        assert bell.read() == 0
    assert bell.closed
    bell.close()
    with pytest.raises(ValueError):
        bell.write()


class CountRecorder:
    """An event-loop handler that keeps the counts it is called with."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.called = threading.Event()

    def __call__(self, count: int) -> None:
        self.seen.append(count)
        self.called.set()


@pytest.mark.parametrize("coalesce_us", [0, 50])
def test_event_loop_calls_a_python_handler_with_the_coalesced_count(coalesce_us: int) -> None:
    bell = EventFd()
    handler = CountRecorder()
    seen, called = handler.seen, handler.called

    with EventLoop(coalesce_us=coalesce_us) as loop:
        assert loop.coalesce_us == coalesce_us
        loop.add(bell, handler)
        bell.write(3)  # before start: delivered as one notification once it runs
        loop.start()
        assert called.wait(10)
        assert seen == [3]
        assert loop.counters() == {bell.fd: 1}
        called.clear()
        bell.write()
        assert called.wait(10)
        assert seen == [3, 1]
        loop.remove(bell)
        assert loop.counters() == {}
        with pytest.raises(ValueError):
            loop.remove(bell)
    assert not loop.running
    loop.stop()


def test_a_doorbell_rung_more_than_once_is_coalesced_for_a_window() -> None:
    """Rung twice before the loop looked: handled, then left disarmed for the window; the
    rings of the window come as one call at its end, none lost. A single ring re-arms at
    once: the next one is handled without waiting for any window."""
    window_s = 5.0
    bell = EventFd()
    handler = CountRecorder()
    seen, called = handler.seen, handler.called

    with EventLoop(coalesce_us=int(window_s * 1e6)) as loop:
        loop.add(bell, handler)
        bell.write(2)
        loop.start()
        assert called.wait(10) and seen == [2]
        called.clear()
        for _ in range(3):
            bell.write()
        assert called.wait(window_s + 10)
        assert seen == [2, 3]  # one call for the window's three rings
    with EventLoop(coalesce_us=int(window_s * 1e6)) as loop:
        seen.clear()
        called.clear()
        loop.add(bell, handler)
        loop.start()
        bell.write()
        assert called.wait(10) and seen == [1]
        called.clear()
        bell.write()
        # Well before the window would end: a single ring left the doorbell armed.
        assert called.wait(window_s / 2) and seen == [1, 1]


def _blocked_signals(thread_name: str) -> set[int]:
    """The signals the thread named so blocks (empty while it is not there yet)."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if (task / "comm").read_text().strip() == thread_name:
                status = (task / "status").read_text()
                mask = int(status.split("SigBlk:")[1].split()[0], 16)
                return {number for number in range(1, 65) if mask >> (number - 1) & 1}
    return set()


def test_the_loop_thread_leaves_ending_signals_to_the_main_thread() -> None:
    # kvm_vmm.signals: a process-directed SIGINT/SIGTERM/SIGHUP must reach a Python
    # thread (the main one, blocked maybe in a kernel file's read()), not this one.
    ending = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    with EventLoop() as loop:
        loop.start()
        # The thread names itself, then blocks them, once running: give it time.
        deadline = time.monotonic() + 10
        while not ending <= (blocked := _blocked_signals("kvmfast-ioevent")):
            assert time.monotonic() < deadline, f"the loop thread blocks {sorted(blocked)}"
            time.sleep(0.01)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # ours is not


def test_event_loop_refuses_blocking_eventfds_and_odd_handlers() -> None:
    loop = EventLoop()
    with pytest.raises(ValueError, match="non-blocking"):
        loop.add(EventFd(nonblocking=False), lambda count: None)
    with pytest.raises(ValueError):
        loop.add(EventFd(), 42)  # type: ignore[arg-type]
    bell = EventFd()
    loop.add(bell, lambda count: None)
    with pytest.raises(ValueError, match="already"):
        loop.add(bell, lambda count: None)


def test_irqfd_trigger_forwards_without_python() -> None:
    bell, irq = EventFd(), EventFd()
    loop = EventLoop()
    loop.add(bell, IrqfdTrigger(irq))
    loop.start()
    bell.write(2)
    assert wait_until(lambda: loop.counters()[bell.fd] == 1)
    assert wait_until(lambda: irq.read() == 1)
    loop.stop()


@pytest.mark.kvm
def test_doorbell_to_interrupt_through_irqfd_trigger(kvm: Kvm) -> None:
    rounds = 5
    guest = boot_guest(
        kvm,
        f"""
    .global entry, handler
    entry:
        {LAPIC_SOFTWARE_ENABLE}
        mov rbx, {DOORBELL:#x}
        mov ecx, {rounds}
    again:
        cli
        mov dword ptr [rbx], ecx    # doorbell: the event loop raises GSI 10
        sti
        hlt                         # woken by the MSI
        dec ecx
        jnz again
        {EXIT_SEQUENCE}
    handler:
        mov al, 0x42
        out 0x81, al
        {LAPIC_EOI}
        iretq
        """,
        vectors={0x42: "handler"},
    )
    vm = guest.vm
    doorbell, irq = EventFd(), EventFd()
    vm.set_msi_route(10, LAPIC_BASE, 0x42)
    vm.register_irqfd(irq.fd, 10)
    vm.register_ioeventfd(doorbell.fd, DOORBELL, 0)
    handled = RecordingDevice()
    vm.add_pio(0x81, 1, handled)
    with EventLoop() as loop:
        loop.add(doorbell, IrqfdTrigger(irq))
        loop.start()
        assert run_with_timeout(guest.vcpu).reason == "device_exit"
        assert loop.counters()[doorbell.fd] == rounds
    assert [value for _, _, _, value in handled.log] == [0x42] * rounds
    assert guest.vcpu.counters()["mmio"] == {}
    vm.unregister_irqfd(irq.fd, 10)
    vm.remove_route(10)
    with pytest.raises(ValueError):
        vm.remove_route(10)
