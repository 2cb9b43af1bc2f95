"""KVM_INTERRUPT's errors as distinct exceptions (KVM API doc 4.16; each clause
checked on this host in ../shared/HOST-KVM.md): EEXIST for a second vector before
KVM_RUN, EINVAL for irq >= 256 (checked first), ENXIO with the PIC in the kernel,
EFAULT for a bad pointer. Also KVM_CAP_SPLIT_IRQCHIP's EEXIST once a vCPU exists."""

from __future__ import annotations

import errno

import pytest

from kvmfast import (
    BadInterruptPointer,
    InterruptAlreadyQueued,
    InvalidInterrupt,
    Kvm,
    KvmError,
    PicInKernel,
)
from kvmfast.testing import set_lint0_extint

pytestmark = pytest.mark.kvm

KVM_CAP_SPLIT_IRQCHIP = 121


def test_second_interrupt_before_run_is_already_queued(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    set_lint0_extint(vcpu)
    vcpu.interrupt(0x20)
    with pytest.raises(InterruptAlreadyQueued, match="an interrupt is already enqueued") as e:
        vcpu.interrupt(0x21)
    assert e.value.errno == errno.EEXIST
    assert isinstance(e.value, KvmError)
    assert "KVM_INTERRUPT" in str(e.value)


def test_irq_256_is_invalid_even_with_one_queued(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    with pytest.raises(InvalidInterrupt, match="the irq number is invalid") as e:
        vcpu.interrupt(256)
    assert e.value.errno == errno.EINVAL
    vcpu.interrupt(0x20)
    with pytest.raises(InvalidInterrupt):
        vcpu.interrupt(0x1000)


def test_in_kernel_pic_refuses_userspace_interrupts(kvm: Kvm) -> None:
    vm = kvm.create_vm(irqchip="kernel")
    assert vm.irqchip == "kernel"
    vcpu = vm.create_vcpu(0)
    with pytest.raises(PicInKernel, match="the PIC is in the kernel") as e:
        vcpu.interrupt(0x20)
    assert e.value.errno == errno.ENXIO


def test_unreadable_pointer_is_a_bad_interrupt_pointer(kvm: Kvm) -> None:
    vcpu = kvm.create_vm().create_vcpu(0)
    with pytest.raises(BadInterruptPointer, match="the pointer is invalid") as e:
        vcpu.interrupt_with_invalid_pointer()
    assert e.value.errno == errno.EFAULT


def test_split_irqchip_cannot_be_enabled_again_after_a_vcpu(kvm: Kvm) -> None:
    vm = kvm.create_vm(irqchip="none")
    vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, [24])
    vm.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, [24])
    assert e.value.errno == errno.EEXIST
    assert "KVM_ENABLE_CAP" in str(e.value)


def test_split_irqchip_route_count_is_bounded_by_the_kernel(kvm: Kvm) -> None:
    assert kvm.create_vm(ioapic_routes=4096).ioapic_routes == 4096
    with pytest.raises(KvmError) as e:
        kvm.create_vm(ioapic_routes=4097)
    assert e.value.errno == errno.EINVAL


def test_unknown_irqchip_mode_is_a_value_error(kvm: Kvm) -> None:
    with pytest.raises(ValueError):
        kvm.create_vm(irqchip="userspace")
