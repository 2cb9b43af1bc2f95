"""KVM_INTERRUPT's error contract, Documentation/virt/kvm/api.rst section 4.16 (X86)."""

import errno

import pytest

from kvm_abi import KVM_INTERRUPT_ERRORS


def test_kvm_interrupt_errors_are_api_rst_wording_by_errno() -> None:
    assert dict(KVM_INTERRUPT_ERRORS) == {
        errno.EEXIST: "if an interrupt is already enqueued",
        errno.EINVAL: "the irq number is invalid",
        errno.ENXIO: "if the PIC is in the kernel",
        errno.EFAULT: "if the pointer is invalid",
    }


def test_kvm_interrupt_errors_cannot_be_changed_by_a_caller() -> None:
    with pytest.raises(TypeError):
        KVM_INTERRUPT_ERRORS[errno.EIO] = "no"  # type: ignore[index]
