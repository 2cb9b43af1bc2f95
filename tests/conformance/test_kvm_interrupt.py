"""Clause 1 — KVM_INTERRUPT (api.rst 4.16).

"Queues a hardware interrupt vector to be injected." Returns 0 on success,
-EEXIST if an interrupt is already enqueued, -EINVAL if the irq number is
invalid, -ENXIO if the PIC is in the kernel, -EFAULT if the pointer is
invalid. "'irq' is an interrupt vector, not an interrupt pin or line."
"This ioctl is useful if the in-kernel PIC is not used."
"""

from __future__ import annotations

import ctypes
import errno

import pytest
from guests import GuestMachine, passed

import kvm_abi
import kvmfast
from kvm_abi.ioctl import KvmSystem, ioctl

pytestmark = pytest.mark.kvm


@pytest.fixture
def split_vcpu() -> kvmfast.Vcpu:
    return kvmfast.Kvm().create_vm("split", 24).create_vcpu(0)


QUEUED_VECTOR_GUEST = """
main:
        SET_GATE 0x30, on_30
        SET_GATE 0x31, on_31
        REPORT 0x1000               /* IF is still 0: nothing can have been delivered yet */
wait:   sti
        hlt
        cmp dword ptr [served], 0
        je wait
        cli
        xor eax, eax
        ret

on_30:
        REPORT 0x30
        mov dword ptr [served], 1
        iretq

on_31:
        REPORT 0x31
        mov dword ptr [served], 1
        iretq

        .data
served: .long 0
"""


def test_returns_0_when_the_vector_is_queued() -> None:
    """The raw ioctl returns 0, and the vector it queued is held: a second one is refused."""
    with KvmSystem.open() as kvm, kvm.create_vm() as vm:
        assert vm.enable_cap(kvm_abi.KVM_CAP_SPLIT_IRQCHIP, 24) == 0
        with vm.create_vcpu(0) as vcpu:
            assert ioctl(vcpu.fd, kvm_abi.KVM_INTERRUPT, kvm_abi.kvm_interrupt(irq=0x30)) == 0
            with pytest.raises(OSError) as raised:
                ioctl(vcpu.fd, kvm_abi.KVM_INTERRUPT, kvm_abi.kvm_interrupt(irq=0x31))
            assert raised.value.errno == errno.EEXIST


def test_the_queued_vector_is_injected_into_the_guest() -> None:
    """Queued before the first KVM_RUN, the vector reaches the guest's gate once IF is set.

    The Machine leaves the BSP's LINT0 as ExtINT, which KVM requires before it
    injects a KVM_INTERRUPT vector.
    """
    guest = GuestMachine(QUEUED_VECTOR_GUEST)
    try:
        guest.machine.vcpus[0].interrupt(0x30)
        outcome = guest.run(timeout=15.0)
        assert passed(outcome), (outcome, guest.report.values)
        assert guest.report.values == [0x1000, 0x30]
    finally:
        guest.close()


def test_eexist_when_an_interrupt_is_already_enqueued() -> None:
    """The refused vector is dropped; the one already enqueued is the one the guest gets."""
    guest = GuestMachine(QUEUED_VECTOR_GUEST)
    try:
        vcpu = guest.machine.vcpus[0]
        vcpu.interrupt(0x30)
        with pytest.raises(kvmfast.InterruptAlreadyQueued, match="already enqueued") as raised:
            vcpu.interrupt(0x31)
        assert raised.value.errno == errno.EEXIST
        outcome = guest.run(timeout=15.0)
        assert passed(outcome), (outcome, guest.report.values)
        assert guest.report.values == [0x1000, 0x30]
    finally:
        guest.close()


def test_einval_for_an_irq_number_that_is_not_a_vector(split_vcpu: kvmfast.Vcpu) -> None:
    with pytest.raises(kvmfast.InvalidInterrupt, match="irq number is invalid") as raised:
        split_vcpu.interrupt(256)
    assert raised.value.errno == errno.EINVAL


def test_einval_is_checked_before_eexist(split_vcpu: kvmfast.Vcpu) -> None:
    split_vcpu.interrupt(0x30)
    with pytest.raises(kvmfast.InvalidInterrupt) as raised:
        split_vcpu.interrupt(300)
    assert raised.value.errno == errno.EINVAL


def test_enxio_when_the_pic_is_in_the_kernel() -> None:
    vcpu = kvmfast.Kvm().create_vm("kernel").create_vcpu(0)
    with pytest.raises(kvmfast.PicInKernel, match="PIC is in the kernel") as raised:
        vcpu.interrupt(0x30)
    assert raised.value.errno == errno.ENXIO


def test_efault_for_an_invalid_pointer_through_a_raw_ioctl() -> None:
    """The raw ioctl (kvm-abi alone) with an unmapped pointer, then kvmfast's mapping of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    with KvmSystem.open() as kvm, kvm.create_vm() as vm:
        assert vm.enable_cap(kvm_abi.KVM_CAP_SPLIT_IRQCHIP, 24) == 0
        with vm.create_vcpu(0) as vcpu:
            assert libc.ioctl(vcpu.fd, kvm_abi.KVM_INTERRUPT, 0x10) == -1
            assert ctypes.get_errno() == errno.EFAULT
    vcpu_fast = kvmfast.Kvm().create_vm("split", 24).create_vcpu(0)
    with pytest.raises(kvmfast.BadInterruptPointer, match="pointer is invalid") as raised:
        vcpu_fast.interrupt_with_invalid_pointer()
    assert raised.value.errno == errno.EFAULT


PIC_BASE = 0x48  # ICW2: deliberately not Linux's 0x30, so the vector cannot be a guess
PIC_LINE = 3

EXTINT_GUEST = f"""
main:
        SET_GATE {PIC_BASE + PIC_LINE}, on_irq
        /* 8259A initialization: ICW1 edge + ICW4, ICW2 base, ICW3 slave on IR2, ICW4 8086 */
        mov al, 0x11
        out 0x20, al
        mov al, {PIC_BASE}
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, {0xFF & ~(1 << PIC_LINE)}
        out 0x21, al
        REPORT 0x1000
wait:   sti
        hlt
        cmp dword ptr [served], 0
        je wait
        cli
        /* OCW3: read ISR; the EOI must have cleared it */
        mov al, 0x0B
        out 0x20, al
        in al, 0x20
        movzx eax, al
        REPORT eax
        xor eax, eax
        ret

on_irq:
        push rax
        REPORT {PIC_BASE + PIC_LINE}
        /* OCW2 non-specific EOI */
        mov al, 0x20
        out 0x20, al
        mov dword ptr [served], 1
        pop rax
        iretq

        .data
served: .long 0
"""


def test_a_pic_line_reaches_the_guest_as_icw2_base_plus_line_through_kvm_interrupt() -> None:
    guest = GuestMachine(EXTINT_GUEST)
    try:
        thread, outcome = guest.run_in_background()
        assert guest.report.wait_for(1), "guest never got ready"
        guest.machine.platform.pic.set_irq(PIC_LINE, True)
        guest.machine.platform.pic.set_irq(PIC_LINE, False)
        thread.join(30)
        assert outcome and passed(outcome[0]), outcome
        assert guest.report.values == [0x1000, PIC_BASE + PIC_LINE, 0]
        # The guest's ICW2 and EOI went to our 8259 model (no PIC in the kernel).
        master = guest.machine.platform.pic.save()["master"]
        assert isinstance(master, dict)
        assert master["vector_base"] == PIC_BASE
        assert master["isr"] == 0
    finally:
        guest.close()
