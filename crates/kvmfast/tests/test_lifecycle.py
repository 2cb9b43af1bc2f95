"""Creating and destroying VMs leaks no fd and no mapping; guest RAM is a zero-copy
buffer that stays valid while anything exports it."""

from __future__ import annotations

import gc
import os

import pytest

from kvmfast import GuestMemory, Kvm, NullSink, Vcpu

pytestmark = pytest.mark.kvm


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_two_hundred_vms_leave_no_fd_or_mapping_behind(kvm: Kvm) -> None:
    gc.collect()
    fds_before, maps_before = open_fds(), mappings()
    for _ in range(200):
        vm = kvm.create_vm()
        memory = vm.add_memory(0, 1 << 20)
        memory_high = vm.add_memory(1 << 20, 1 << 20, hugepages=True)
        vm.add_pio(0x80, 1, NullSink())
        vcpus = [vm.create_vcpu(i) for i in range(2)]
        vm.close()
        vm.close()  # idempotent
        del vm, memory, memory_high, vcpus
    # Dropping without close() releases everything too.
    for _ in range(20):
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        vm.add_memory(0, 1 << 20)
        del vm, vcpu
    gc.collect()
    assert open_fds() == fds_before
    assert mappings() <= maps_before + 2  # allocator arenas may come and go


class DeviceHoldingItsVcpu:
    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def make_cycles(kvm: Kvm) -> None:
    """vm → address map → device → vcpu → vm, and vcpu → EOI hook → vcpu."""
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.add_pio(0x80, 1, DeviceHoldingItsVcpu(vcpu))

    def on_eoi(vector: int, vcpu: Vcpu = vcpu) -> None:
        del vector, vcpu

    vcpu.set_eoi_handler(on_eoi)


def test_cycles_through_handlers_and_hooks_are_collected(kvm: Kvm) -> None:
    gc.collect()
    fds_before = open_fds()
    for _ in range(20):
        make_cycles(kvm)
    gc.collect()
    assert open_fds() == fds_before


def test_memory_is_a_writable_zero_copy_buffer(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    memory = vm.add_memory(0x10_0000, 0x2000)
    assert (memory.guest_phys_addr, memory.size, memory.slot, len(memory)) == (
        0x10_0000,
        0x2000,
        0,
        0x2000,
    )
    view = memoryview(memory)
    assert not view.readonly and view.nbytes == 0x2000
    view[0x10:0x14] = b"abcd"
    assert vm.read(0x10_0010, 4) == b"abcd"
    vm.write(0x10_1FFE, b"yz")
    assert bytes(view[-2:]) == b"yz"


def test_reads_and_writes_span_adjacent_slots_and_refuse_holes(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    low = vm.add_memory(0, 0x1000)
    high = vm.add_memory(0x1000, 0x1000)
    assert (low.slot, high.slot) == (0, 1)
    vm.write(0xFFE, b"1234")
    assert bytes(memoryview(low)[-2:]) == b"12"
    assert bytes(memoryview(high)[:2]) == b"34"
    vm.add_memory(0x3000, 0x1000)
    with pytest.raises(ValueError, match="not all guest RAM"):
        vm.read(0x1FFF, 2)
    with pytest.raises(ValueError):
        vm.write(0x4000, b"x")


def test_bad_memory_requests_are_refused(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.add_memory(0, 0x4000)
    for gpa, size in [(0x2000, 0x1000), (0x5000, 0x800), (0x5800, 0x1000), (0x6000, 0)]:
        with pytest.raises(ValueError):
            vm.add_memory(gpa, size)


def test_an_exported_buffer_outlives_the_vm(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    memory: GuestMemory | None = vm.add_memory(0, 0x1000)
    assert memory is not None
    view = memoryview(memory)
    view[0] = 0x5A
    vm.close()
    del memory
    gc.collect()
    assert view[0] == 0x5A
    view[1] = 0xA5
    assert bytes(view[:2]) == b"\x5a\xa5"
    view.release()


def test_a_closed_vm_refuses_kvm_calls(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.close()
    assert vm.closed
    with pytest.raises(ValueError, match="closed"):
        vm.create_vcpu(0)
    with pytest.raises(ValueError, match="closed"):
        _ = vm.fd


def test_a_vcpu_keeps_its_vm_running(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(3)
    assert vcpu.vm is vm and vcpu.id == 3
    del vm
    gc.collect()
    assert not vcpu.vm.closed


def test_kvm_reports_its_api(kvm: Kvm) -> None:
    assert kvm.api_version == 12
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.check_extension(121) == 1  # KVM_CAP_SPLIT_IRQCHIP
    leaf0 = [entry for entry in kvm.supported_cpuid() if entry[0] == 0]
    assert leaf0 and leaf0[0][3] >= 1  # the highest basic leaf
    vm = kvm.create_vm(irqchip="none")
    assert (vm.irqchip, vm.ioapic_routes) == ("none", 0)
    assert vm.check_extension(121) == 1
