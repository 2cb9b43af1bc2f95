"""kvm_abi alone drives /dev/kvm: Documentation/virt/kvm/api.rst sections 4.1-4.16, 7.25.

Needs /dev/kvm (skipped without it, failed instead when KVM_SPLIT_REQUIRE_KVM=1).
"""

import ctypes
import errno
import mmap
from collections.abc import Iterator

import pytest

from kvm_abi import (
    KVM_API_VERSION,
    KVM_CAP_IOEVENTFD_ANY_LENGTH,
    KVM_CAP_SPLIT_IRQCHIP,
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_SUPPORTED_CPUID,
    KVM_INTERRUPT,
    KVM_INTERRUPT_ERRORS,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    kvm_cpuid2,
    kvm_interrupt,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
    with_flexible_array,
)
from kvm_abi.ioctl import KvmSystem, KvmVm, ioctl

pytestmark = pytest.mark.kvm

# The IOAPIC pins that the split irqchip reserves GSIs for (api.rst 7.25 args[0]).
IOAPIC_PINS = 24
# Where Intel's real-mode emulation wants its three TSS pages: below the BIOS, as
# every VMM puts it; an address above 2**31 that fcntl.ioctl could not pass.
TSS_ADDRESS = 0xFFFB_D000


@pytest.fixture
def vm(kvm: KvmSystem) -> Iterator[KvmVm]:
    with kvm.create_vm() as created:
        yield created


def test_api_version_is_12(kvm: KvmSystem) -> None:
    """api.rst 4.1: KVM_GET_API_VERSION returns 12, the only stable version."""
    assert kvm.api_version() == KVM_API_VERSION == 12


def test_split_irqchip_and_any_length_ioeventfd_are_available(kvm: KvmSystem) -> None:
    assert kvm.check_extension(KVM_CAP_SPLIT_IRQCHIP) > 0
    assert kvm.check_extension(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0
    assert kvm.check_extension(0xFFFF_FFF0) == 0  # no such capability


def test_vm_and_vcpu_are_created_and_kvm_run_fits_the_mapping(kvm: KvmSystem, vm: KvmVm) -> None:
    with vm.create_vcpu(0) as vcpu:
        assert vcpu.fd >= 0
        assert kvm.vcpu_mmap_size() >= ctypes.sizeof(kvm_run)


def test_enable_split_irqchip_with_24_pins_on_a_fresh_vm_returns_0(vm: KvmVm) -> None:
    """api.rst 7.25 KVM_CAP_SPLIT_IRQCHIP, args[0] = number of IOAPIC routes."""
    assert vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, IOAPIC_PINS) == 0


def test_enable_split_irqchip_after_a_vcpu_exists_fails_with_eexist(vm: KvmVm) -> None:
    with vm.create_vcpu(0), pytest.raises(OSError) as failure:
        vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, IOAPIC_PINS)
    assert failure.value.errno == errno.EEXIST


def test_vcpu_reset_state_reads_through_kvm_regs_and_kvm_sregs(vm: KvmVm) -> None:
    """The reset state of SDM vol. 3 section 9.1.1: CS 0xf000 based at 0xffff0000, IP 0xfff0."""
    with vm.create_vcpu(0) as vcpu:
        regs, sregs = kvm_regs(), kvm_sregs()
        ioctl(vcpu.fd, KVM_GET_REGS, regs)
        ioctl(vcpu.fd, KVM_GET_SREGS, sregs)
    assert (regs.rip, regs.rflags) == (0xFFF0, 0x2)
    assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF_0000)


def test_supported_cpuid_fills_a_flexible_array_and_refuses_one_too_small(
    kvm: KvmSystem,
) -> None:
    """api.rst 4.46: E2BIG when nent is too small, else nent is set to the entries written."""
    too_small = with_flexible_array(kvm_cpuid2, 1)(nent=1)
    with pytest.raises(OSError) as failure:
        ioctl(kvm.fd, KVM_GET_SUPPORTED_CPUID, too_small)
    assert failure.value.errno == errno.E2BIG
    cpuid = with_flexible_array(kvm_cpuid2, 256)(nent=256)
    ioctl(kvm.fd, KVM_GET_SUPPORTED_CPUID, cpuid)
    leaf_0 = [entry for entry in cpuid.entries[: cpuid.nent] if entry.function == 0]
    assert 1 < cpuid.nent <= 256
    assert leaf_0[0].eax >= 1  # the highest basic leaf


def _interrupt_errno(vcpu_fd: int, argument: kvm_interrupt | int) -> int:
    with pytest.raises(OSError) as failure:
        ioctl(vcpu_fd, KVM_INTERRUPT, argument)
    assert failure.value.errno is not None
    return failure.value.errno


def test_kvm_interrupt_fails_as_api_rst_says_with_the_split_irqchip(vm: KvmVm) -> None:
    """api.rst 4.16 (X86): EINVAL bad vector, EEXIST one already queued, EFAULT bad pointer."""
    vm.enable_cap(KVM_CAP_SPLIT_IRQCHIP, IOAPIC_PINS)
    with vm.create_vcpu(0) as vcpu:
        invalid = _interrupt_errno(vcpu.fd, kvm_interrupt(irq=256))
        assert ioctl(vcpu.fd, KVM_INTERRUPT, kvm_interrupt(irq=0x20)) == 0
        queued = _interrupt_errno(vcpu.fd, kvm_interrupt(irq=0x21))
        bad_pointer = _interrupt_errno(vcpu.fd, 8)  # an address no process maps
    assert KVM_INTERRUPT_ERRORS[invalid] == "the irq number is invalid"
    assert KVM_INTERRUPT_ERRORS[queued] == "if an interrupt is already enqueued"
    assert KVM_INTERRUPT_ERRORS[bad_pointer] == "if the pointer is invalid"


def test_kvm_interrupt_fails_with_enxio_when_the_pic_is_in_the_kernel(vm: KvmVm) -> None:
    ioctl(vm.fd, KVM_CREATE_IRQCHIP)
    with vm.create_vcpu(0) as vcpu:
        in_kernel = _interrupt_errno(vcpu.fd, kvm_interrupt(irq=0x20))
    assert KVM_INTERRUPT_ERRORS[in_kernel] == "if the PIC is in the kernel"


def test_a_real_mode_guest_out_exits_with_kvm_run_io(kvm: KvmSystem, vm: KvmVm) -> None:
    """api.rst 5 (kvm_run): KVM_EXIT_IO with direction, size, port, count, data_offset."""
    guest_code = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al, 0x42; out 0x10, al; hlt
    code_address = 0x1000
    with mmap.mmap(-1, 0x10000) as memory:
        memory[code_address : code_address + len(guest_code)] = guest_code
        host_address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        region = kvm_userspace_memory_region(
            slot=0, guest_phys_addr=0, memory_size=len(memory), userspace_addr=host_address
        )
        ioctl(vm.fd, KVM_SET_USER_MEMORY_REGION, region)
        ioctl(vm.fd, KVM_SET_TSS_ADDR, TSS_ADDRESS)
        with vm.create_vcpu(0) as vcpu:
            sregs = kvm_sregs()
            ioctl(vcpu.fd, KVM_GET_SREGS, sregs)
            sregs.cs.base, sregs.cs.selector = 0, 0
            ioctl(vcpu.fd, KVM_SET_SREGS, sregs)
            ioctl(vcpu.fd, KVM_SET_REGS, kvm_regs(rip=code_address, rflags=0x2))
            with mmap.mmap(vcpu.fd, kvm.vcpu_mmap_size()) as shared:
                run = kvm_run.from_buffer(shared)
                ioctl(vcpu.fd, KVM_RUN)
                exit_reason = run.exit_reason
                io = (run.io.direction, run.io.size, run.io.port, run.io.count)
                data = shared[run.io.data_offset]
                del run
    assert exit_reason == KVM_EXIT_IO
    assert io == (KVM_EXIT_IO_OUT, 1, 0x10, 1)
    assert data == 0x42
