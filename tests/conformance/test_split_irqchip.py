"""Clause 4 — KVM_CAP_SPLIT_IRQCHIP (api.rst 7.x).

"Create a local apic for each processor in the kernel. This can be used
instead of KVM_CREATE_IRQCHIP if the userspace VMM wishes to emulate the
IOAPIC and PIC (and also the PIT, even though this has to be enabled
separately). This capability also enables in kernel routing of interrupt
requests; when KVM_CAP_SPLIT_IRQCHIP only routes of KVM_IRQ_ROUTING_MSI type
are used, and the first args[0] MSI routes are reserved for the IOAPIC pins.
... Fails if VCPU has already been created, or if the irqchip is already in
the kernel (i.e. KVM_CREATE_IRQCHIP has already been called)."
"""

from __future__ import annotations

import ctypes
import errno
import threading

import pytest
from guests import GuestMachine, passed

import kvm_abi
import kvmfast
from kvm_abi.ioctl import KvmSystem, ioctl

pytestmark = pytest.mark.kvm

LEVEL = 1 << 15


KVM_LAPIC_VERSION = 0x14  # arch/x86/kvm/lapic.c APIC_VERSION: an integrated xAPIC
LAPIC_VERSION_REGISTER = 0x30  # Intel SDM Vol. 3A 11.4.8, Local APIC Version Register


def lapic_page(vcpu_fd: int) -> bytes:
    """KVM_GET_LAPIC: the in-kernel LAPIC's register page; OSError where there is none."""
    state = kvm_abi.kvm_lapic_state()
    ioctl(vcpu_fd, kvm_abi.KVM_GET_LAPIC, state)
    return ctypes.string_at(ctypes.addressof(state), ctypes.sizeof(state))


def get_irqchip_errno(vm_fd: int, chip_id: int) -> int:
    """KVM_GET_IRQCHIP for one chip: 0, or the errno it failed with."""
    try:
        ioctl(vm_fd, kvm_abi.KVM_GET_IRQCHIP, kvm_abi.kvm_irqchip(chip_id=chip_id))
    except OSError as error:
        assert error.errno is not None
        return error.errno
    return 0


def test_enabling_on_a_fresh_vm_creates_a_kernel_lapic_and_no_kernel_pic_or_ioapic() -> None:
    """ "Create a local apic for each processor in the kernel": KVM_GET_LAPIC answers with
    KVM's LAPIC. The PIC and IOAPIC are not in the kernel: KVM_GET_IRQCHIP, which
    "reads the state of a kernel interrupt controller created with KVM_CREATE_IRQCHIP",
    fails with ENXIO (arch/x86/kvm/x86.c: !irqchip_kernel)."""
    with KvmSystem.open() as kvm, kvm.create_vm() as vm:
        assert vm.enable_cap(kvm_abi.KVM_CAP_SPLIT_IRQCHIP, 24) == 0
        with vm.create_vcpu(0) as vcpu:
            page = lapic_page(vcpu.fd)
        version = int.from_bytes(
            page[LAPIC_VERSION_REGISTER : LAPIC_VERSION_REGISTER + 4], "little"
        )
        assert version & 0xFF == KVM_LAPIC_VERSION
        for chip in (
            kvm_abi.KVM_IRQCHIP_PIC_MASTER,
            kvm_abi.KVM_IRQCHIP_PIC_SLAVE,
            kvm_abi.KVM_IRQCHIP_IOAPIC,
        ):
            assert get_irqchip_errno(vm.fd, chip) == errno.ENXIO


def test_controls_no_kernel_lapic_without_the_cap_and_a_kernel_pic_with_create_irqchip() -> None:
    """The controls of the test above: the same two ioctls tell the three set-ups apart."""
    with KvmSystem.open() as kvm:
        with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            with pytest.raises(OSError) as raised:
                lapic_page(vcpu.fd)
            assert raised.value.errno == errno.EINVAL  # x86.c: !lapic_in_kernel
        with kvm.create_vm() as vm:
            ioctl(vm.fd, kvm_abi.KVM_CREATE_IRQCHIP)
            assert get_irqchip_errno(vm.fd, kvm_abi.KVM_IRQCHIP_PIC_MASTER) == 0


LAPIC_GUEST = """
main:
        mov ebx, 0xFEE00030         /* LAPIC version register */
        mov eax, [rbx]
        REPORT eax
        xor eax, eax
        ret
"""


def test_the_guest_sees_the_kernel_lapic_without_an_exit() -> None:
    guest = GuestMachine(LAPIC_GUEST)
    try:
        assert passed(guest.run())
        page = guest.machine.vcpus[0].get_lapic()
        version = int.from_bytes(
            page[LAPIC_VERSION_REGISTER : LAPIC_VERSION_REGISTER + 4], "little"
        )
        assert guest.report.values == [version]
        assert version & 0xFF == KVM_LAPIC_VERSION
        # The kernel answered: the read never left it.
        counters = guest.machine.vm.counters()
        assert counters["exits"].get("mmio", 0) == 0
        assert counters["unmapped_mmio"] == 0
    finally:
        guest.close()


def test_fails_once_a_vcpu_has_been_created() -> None:
    vm = kvmfast.Kvm().create_vm("none")
    vm.create_vcpu(0)
    with pytest.raises(kvmfast.KvmError) as raised:
        vm.enable_cap(kvm_abi.KVM_CAP_SPLIT_IRQCHIP, [24])
    assert raised.value.errno == errno.EEXIST


def test_fails_once_the_irqchip_is_in_the_kernel() -> None:
    vm = kvmfast.Kvm().create_vm("kernel")
    with pytest.raises(kvmfast.KvmError) as raised:
        vm.enable_cap(kvm_abi.KVM_CAP_SPLIT_IRQCHIP, [24])
    assert raised.value.errno == errno.EEXIST


ROUTES_GUEST = """
main:
        call lapic_enable
        SET_GATE 0x61, on_reserved
        SET_GATE 0x62, on_above
        REPORT 0x1000
        sti
wait:   hlt
        cmp dword ptr [served], 2
        jb wait
        xor eax, eax
        ret

on_reserved:
        REPORT 0x61
        inc dword ptr [served]
        call lapic_eoi
        iretq

on_above:
        REPORT 0x62
        inc dword ptr [served]
        call lapic_eoi
        iretq

        .data
served: .long 0
"""


def test_reserved_routes_deliver_and_only_they_produce_eoi_exits(eoi_vectors: list[int]) -> None:
    """A level MSI route on a reserved GSI (< args[0]) brings the EOI back; one above does not."""
    guest = GuestMachine(ROUTES_GUEST)
    try:
        vm = guest.machine.vm
        # GSI 20 is reserved for IOAPIC pin 20; the guest left that pin masked, so we
        # may borrow its route here. GSI 30 lies above args[0] = 24.
        vm.set_msi_route(20, 0xFEE0_0000, LEVEL | 0x61)
        vm.set_msi_route(30, 0xFEE0_0000, LEVEL | 0x62)
        thread, outcome = guest.run_in_background()
        assert guest.report.wait_for(1)
        assert vm.irq_line(20, True) == 1
        assert guest.report.wait_for(2)
        assert vm.irq_line(30, True) == 1
        thread.join(30)
        assert outcome and passed(outcome[0]), outcome
        assert guest.report.values == [0x1000, 0x61, 0x62]
        assert eoi_vectors == [0x61]
        assert guest.machine.vcpus[0].counters()["exits"]["ioapic_eoi"] == 1
    finally:
        guest.close()


LEGACY_PORTS_GUEST = """
main:
        /* PIT channel 0: mode 2, lobyte/hibyte, count 0x1234; then latch and read back */
        mov al, 0x34
        out 0x43, al
        mov al, 0x34
        out 0x40, al
        mov al, 0x12
        out 0x40, al
        mov al, 0xE2                /* read-back: status of counter 0 */
        out 0x43, al
        in al, 0x40
        movzx eax, al
        REPORT eax
        /* PIC: OCW1 then read the mask back */
        mov al, 0xA5
        out 0x21, al
        in al, 0x21
        movzx eax, al
        REPORT eax
        xor eax, eax
        ret
"""


def test_no_in_kernel_pit_or_pic_answers_the_legacy_ports() -> None:
    guest = GuestMachine(LEGACY_PORTS_GUEST)
    try:
        assert passed(guest.run())
        # Read-back status: OUT high, null count clear, RW lobyte/hibyte, mode 2, binary.
        assert guest.report.values == [0b1011_0100, 0xA5]
        # The guest's count reached our PIT model.
        counters = guest.machine.platform.pit.save()["counters"]
        assert isinstance(counters, list)
        assert counters[0]["count_register"] == 0x1234
        pio = guest.machine.vm.counters()["pio"]
        assert pio[0x40] >= 3 and pio[0x20] >= 2  # the exits reached our models
        assert guest.machine.platform.pic.master_ports.read(1, 1) == 0xA5
    finally:
        guest.close()


def test_the_guest_sees_our_ioapic_not_an_in_kernel_one() -> None:
    """IOAPIC version register through MMIO: our model's 0x20, 24 pins."""
    guest = GuestMachine(
        """
main:
        mov ecx, 1
        call ioapic_read
        REPORT eax
        xor eax, eax
        ret
"""
    )
    try:
        assert passed(guest.run())
        assert guest.report.values == [0x0017_0020]
        assert guest.machine.vm.counters()["mmio"][0xFEC0_0000] == 2
    finally:
        guest.close()


def test_threads_do_not_leak_between_runs() -> None:
    before = threading.active_count()
    guest = GuestMachine("main:\n        xor eax, eax\n        ret\n")
    try:
        assert passed(guest.run())
    finally:
        guest.close()
    assert threading.active_count() == before
