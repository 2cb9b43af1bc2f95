"""ExtINT injection from a userspace PIC (KVM API doc 4.16 KVM_INTERRUPT, 5
request_interrupt_window / ready_for_interrupt_injection / KVM_EXIT_IRQ_WINDOW_OPEN):
acknowledge only when the vCPU can take the vector, otherwise ask for a window; a
halted vCPU on the split irqchip stays in KVM_RUN until a kick or an interrupt."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
from kvmfast_guest_support import (
    EXIT_SEQUENCE,
    LAPIC_EOI,
    LAPIC_SOFTWARE_ENABLE,
    RecordingDevice,
    VcpuThread,
    boot_guest,
    wait_until,
)

from kvmfast import Kvm, Vcpu, VcpuKicker, Vm
from kvmfast.testing import set_lint0_extint

pytestmark = pytest.mark.kvm

HANDLERS = """
.global handler30, handler31
handler30:
    mov al, 0x30
    out 0x81, al
    iretq
handler31:
    mov al, 0x31
    out 0x81, al
    iretq
"""


class FakePic:
    """The INTR output and INTA cycle of an 8259 with one request pending."""

    def __init__(self, kicker: VcpuKicker, vector: int) -> None:
        self.kicker = kicker
        self.vector = vector
        self.acknowledged = 0

    def request(self) -> None:
        self.kicker.set_extint(True)

    def acknowledge(self) -> int:
        self.acknowledged += 1
        self.kicker.set_extint(False)
        return self.vector


def test_injection_waits_for_the_interrupt_window(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
    .global entry
    entry:
        cli
        mov al, 1
        out 0x80, al        # the PIC raises INTR while interrupts are off
        mov ecx, 200
    busy:
        dec ecx
        jnz busy
        mov al, 2
        out 0x80, al        # still off: nothing may have been acknowledged
        sti
        hlt
        {EXIT_SEQUENCE}
    {HANDLERS}
        """,
        vectors={0x30: "handler30", 0x31: "handler31"},
    )
    vcpu = guest.vcpu
    set_lint0_extint(vcpu)
    pic = FakePic(vcpu.kicker(), vector=0x31)
    observations: list[tuple[int, bool]] = []

    class Control:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            if value == 1:
                pic.request()
            else:
                observations.append((pic.acknowledged, vcpu.request_interrupt_window))

    vectors = RecordingDevice()
    vcpu.set_extint_controller(pic)
    guest.vm.add_pio(0x80, 1, Control())
    guest.vm.add_pio(0x81, 1, vectors)
    exit = VcpuThread(vcpu).join()
    assert exit.reason == "device_exit"
    assert observations == [(0, True)]
    assert [value for _, _, _, value in vectors.log] == [0x31]
    assert pic.acknowledged == 1
    assert vcpu.counters()["exits"]["irq_window_open"] >= 1
    assert not vcpu.request_interrupt_window


READY_PORT = 0x82


class ReadyPort:
    """The guest writes here just before STI; HLT: the test waits for it, not for a time."""

    def __init__(self) -> None:
        self.written = threading.Event()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.written.set()


@dataclass
class HaltedGuest:
    vcpu: Vcpu
    vm: Vm
    vectors: RecordingDevice
    ready: ReadyPort
    halted_at: int
    """The RIP of a vCPU halted at the guest's HLT: KVM has already moved past it."""


def halted_guest(kvm: Kvm, *, enable_svr: bool) -> HaltedGuest:
    svr = LAPIC_SOFTWARE_ENABLE if enable_svr else ""
    guest = boot_guest(
        kvm,
        f"""
    .global entry, halted, handler32, handler41
    entry:
        {svr}
        out {READY_PORT:#x}, al
        sti
        hlt
    halted:
        {EXIT_SEQUENCE}
    handler32:
        mov al, 0x32
        out 0x81, al
        iretq
    handler41:
        mov al, 0x41
        out 0x81, al
        {LAPIC_EOI}
        iretq
        """,
        vectors={0x32: "handler32", 0x41: "handler41"},
    )
    vectors = RecordingDevice()
    ready = ReadyPort()
    guest.vm.add_pio(0x81, 1, vectors)
    guest.vm.add_pio(READY_PORT, 1, ready)
    return HaltedGuest(guest.vcpu, guest.vm, vectors, ready, guest.program.symbols["halted"])


def wait_until_halted(guest: HaltedGuest, timeout: float = 10.0) -> None:
    """Once the guest said it is ready, sample its RIP until it sits past its HLT.

    Each sample kicks the vCPU out of KVM_RUN and back in; a halted vCPU stays
    halted across that, so this observes the halt without ending it.
    """
    assert guest.ready.written.wait(timeout), "the guest never reported ready"
    kicker = guest.vcpu.kicker()

    def sampled_at_the_halt() -> bool:
        kicker.request_sample()
        return guest.halted_at in guest.vm.rip_samples()

    assert wait_until(sampled_at_the_halt, timeout), guest.vm.rip_samples()


def test_hlt_waits_in_kvm_until_the_pic_raises_intr(kvm: Kvm) -> None:
    guest = halted_guest(kvm, enable_svr=False)
    set_lint0_extint(guest.vcpu)
    pic = FakePic(guest.vcpu.kicker(), vector=0x32)
    guest.vcpu.set_extint_controller(pic)
    running = VcpuThread(guest.vcpu)
    wait_until_halted(guest)
    # HLT does not leave KVM_RUN with the split irqchip (../shared/HOST-KVM.md).
    assert running.alive
    assert guest.vectors.log == []
    assert pic.acknowledged == 0
    pic.request()
    assert running.join().reason == "device_exit"
    assert [value for _, _, _, value in guest.vectors.log] == [0x32]
    assert pic.acknowledged == 1


def test_hlt_wakes_on_an_msi(kvm: Kvm) -> None:
    guest = halted_guest(kvm, enable_svr=True)
    running = VcpuThread(guest.vcpu)
    wait_until_halted(guest)
    assert running.alive
    # Fixed delivery, physical destination APIC 0, vector 0x41 (SDM Vol. 3A 11.11).
    assert guest.vm.signal_msi(0xFEE0_0000, 0x41) == 1
    assert running.join().reason == "device_exit"
    assert [value for _, _, _, value in guest.vectors.log] == [0x41]


def test_falling_intr_withdraws_the_window_request(kvm: Kvm) -> None:
    guest = boot_guest(kvm, f"cli\nmov al, 1\nout 0x80, al\n{EXIT_SEQUENCE}")
    vcpu = guest.vcpu
    set_lint0_extint(vcpu)
    kicker = vcpu.kicker()
    vcpu.set_extint_controller(FakePic(kicker, 0x30))
    guest.vm.add_pio(0x80, 1, RecordingDevice())
    kicker.set_extint(True)
    assert vcpu.run_once().reason == "io"
    assert vcpu.request_interrupt_window
    kicker.set_extint(False)
    assert vcpu.run_once().reason == "device_exit"
    assert not vcpu.request_interrupt_window
