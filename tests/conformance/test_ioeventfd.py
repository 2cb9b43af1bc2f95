"""Clause 2 — KVM_IOEVENTFD with KVM_CAP_IOEVENTFD_ANY_LENGTH (api.rst 4.59).

"With KVM_CAP_IOEVENTFD_ANY_LENGTH, a zero length ioeventfd is allowed, and
the kernel will ignore the length of guest write and may get a faster vmexit."
"""

from __future__ import annotations

import errno
import threading

import pytest
from guests import EXIT_PORT, GuestMachine, passed

import kvm_abi
import kvmfast
from kvm_abi.ioctl import KvmSystem, ioctl
from kvm_vmm.cpu_setup import enter
from kvm_vmm.doorbell import Doorbell
from kvm_vmm.loaders.image import EntryState
from kvmfast.testing import assemble

pytestmark = pytest.mark.kvm

DOORBELL = 0xD000_0000  # in the PCI hole: no RAM, no device
CODE_AT = 0x10_0000


def kernel_accepts_a_zero_length_mmio_ioeventfd() -> bool:
    """What the capability promises, found without asking KVM_CHECK_EXTENSION: a raw
    KVM_IOEVENTFD with len 0 on a fresh VM is accepted (EINVAL where it is not)."""
    with KvmSystem.open() as kvm, kvm.create_vm() as vm, kvmfast.EventFd() as eventfd:
        request = kvm_abi.kvm_ioeventfd(addr=DOORBELL, len=0, fd=eventfd.fd)
        try:
            ioctl(vm.fd, kvm_abi.KVM_IOEVENTFD, request)
        except OSError as error:
            if error.errno == errno.EINVAL:
                return False
            raise
        return True


def test_the_capability_is_reported() -> None:
    """virt/kvm/kvm_main.c reports KVM_CAP_IOEVENTFD_ANY_LENGTH as exactly 1, on the
    system fd and on a VM fd alike, and the kernel does take a zero-length ioeventfd."""
    kvm = kvmfast.Kvm()
    assert kvm.check_extension(kvm_abi.KVM_CAP_IOEVENTFD_ANY_LENGTH) == 1
    assert kvm.create_vm("split", 24).check_extension(kvm_abi.KVM_CAP_IOEVENTFD_ANY_LENGTH) == 1
    assert kernel_accepts_a_zero_length_mmio_ioeventfd()


class LongModeGuest:
    """A bare 64-bit guest on a kvmfast Vm (no platform), ended through an ExitSink."""

    def __init__(self, body: str) -> None:
        self.vm = kvmfast.Kvm().create_vm("split", 24)
        self.memory = self.vm.add_memory(0, 16 << 20)
        self.vm.add_pio(EXIT_PORT, 1, kvmfast.ExitSink())
        self.vcpu = self.vm.create_vcpu(0)
        code = assemble(
            f".intel_syntax noprefix\n.code64\n_start:\n{body}\n"
            f"        mov al, 0\n        out {EXIT_PORT}, al\n1:      jmp 1b\n",
            bits=64,
            origin=CODE_AT,
        )
        self.vm.write(CODE_AT, code)
        enter(self.vcpu, self.vm, EntryState("long64", CODE_AT, {"rsp": 0x8_0000}))

    def run(self) -> kvmfast.Exit:
        return self.vcpu.run()


STORES = f"""
        mov rbx, {DOORBELL}
        mov byte ptr [rbx], 0x11
        mov word ptr [rbx], 0x2222
        mov dword ptr [rbx], 0x33333333
        mov rax, 0x4444444444444444
        mov qword ptr [rbx], rax
"""


def test_zero_length_mmio_ioeventfd_fires_for_every_store_width_with_no_exit() -> None:
    guest = LongModeGuest(STORES)
    doorbell = kvmfast.EventFd()
    guest.vm.register_ioeventfd(doorbell.fd, DOORBELL, 0)
    assert guest.run().reason == "device_exit"
    assert doorbell.read() == 4  # 1-, 2-, 4- and 8-byte stores each signalled once
    assert guest.vcpu.counters()["exits"].get("mmio", 0) == 0


def test_without_the_ioeventfd_the_same_stores_exit_to_userspace() -> None:
    guest = LongModeGuest(STORES)
    assert guest.run().reason == "device_exit"
    assert guest.vcpu.counters()["exits"]["mmio"] == 4


def test_zero_length_with_datamatch_is_refused() -> None:
    vm = kvmfast.Kvm().create_vm("split", 24)
    with pytest.raises(kvmfast.KvmError) as raised:
        vm.register_ioeventfd(kvmfast.EventFd().fd, DOORBELL, 0, datamatch=1)
    assert raised.value.errno == errno.EINVAL


@pytest.mark.parametrize("length", [3, 5, 16])
def test_lengths_other_than_0_1_2_4_8_are_refused(length: int) -> None:
    vm = kvmfast.Kvm().create_vm("split", 24)
    with pytest.raises(kvmfast.KvmError) as raised:
        vm.register_ioeventfd(kvmfast.EventFd().fd, DOORBELL, length)
    assert raised.value.errno == errno.EINVAL


PIO_PORTS = {1: 0x700, 2: 0x710, 4: 0x720, 0: 0x730}


def test_pio_ioeventfds_of_each_length_match_their_width_and_zero_length_matches_any() -> None:
    guest = LongModeGuest(
        f"""
        mov dx, {PIO_PORTS[1]}
        out dx, al
        mov dx, {PIO_PORTS[2]}
        out dx, ax
        mov dx, {PIO_PORTS[4]}
        out dx, eax
        mov dx, {PIO_PORTS[0]}
        out dx, al
        out dx, ax
        out dx, eax
        mov dx, {PIO_PORTS[4]}
        out dx, al
"""
    )
    fds = {length: kvmfast.EventFd() for length in PIO_PORTS}
    for length, port in PIO_PORTS.items():
        guest.vm.register_ioeventfd(fds[length].fd, port, length, pio=True)
    assert guest.run().reason == "device_exit"
    assert {length: fd.read() for length, fd in fds.items()} == {1: 1, 2: 1, 4: 1, 0: 3}
    # The 1-byte write to the 4-byte ioeventfd does not match it: it exits.
    assert guest.vcpu.counters()["exits"]["io"] == 2  # that write, and the exit port


DOORBELL_GUEST = f"""
main:
        mov ebx, {DOORBELL}
        mov ecx, 10
ring:   mov dword ptr [rbx], ecx
        dec ecx
        jnz ring
        xor eax, eax
        ret
"""


@pytest.mark.parametrize("any_length", [True, False])
def test_our_doorbell_uses_zero_length_ioeventfds_where_it_can_and_exits_elsewhere(
    any_length: bool,
) -> None:
    guest = GuestMachine(DOORBELL_GUEST)
    rung = threading.Semaphore(0)
    notifications: list[int] = []

    def on_ring(count: int) -> None:
        notifications.append(count)
        for _ in range(count):
            rung.release()

    doorbell = Doorbell(guest.machine, DOORBELL, on_ring, any_length=any_length)
    try:
        assert doorbell.uses_ioeventfd is any_length
        assert passed(guest.run())
        for _ in range(10):
            assert rung.acquire(timeout=5)
        mmio_exits = guest.machine.vm.counters()["exits"].get("mmio", 0)
        assert mmio_exits == (0 if any_length else 10)
        assert sum(notifications) == 10
    finally:
        doorbell.close()
        guest.close()


def test_doorbell_detects_the_capability_by_default() -> None:
    """The default follows what the kernel does (probed with a raw ioctl), and the guest's
    ten stores then exit or not accordingly."""
    expected = kernel_accepts_a_zero_length_mmio_ioeventfd()
    guest = GuestMachine(DOORBELL_GUEST)
    rung = threading.Semaphore(0)

    def on_ring(count: int) -> None:
        for _ in range(count):
            rung.release()

    doorbell = Doorbell(guest.machine, DOORBELL, on_ring)
    try:
        assert doorbell.uses_ioeventfd is expected
        assert passed(guest.run())
        for _ in range(10):
            assert rung.acquire(timeout=5)
        mmio_exits = guest.machine.vm.counters()["exits"].get("mmio", 0)
        assert mmio_exits == (0 if expected else 10)
    finally:
        doorbell.close()
        guest.close()
