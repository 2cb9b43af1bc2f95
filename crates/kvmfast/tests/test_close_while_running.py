"""Vm.close() against vCPUs that are alive, running, or in the middle of a device call:
run() is refused with ValueError, nothing deadlocks, and KVM loses the RAM slots
before the RAM is unmapped (KVM API document 4.35, KVM_SET_USER_MEMORY_REGION: a slot
of size 0 is deleted)."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from kvmfast_guest_support import (
    EXIT_PORT,
    EXIT_SEQUENCE,
    MMIO_BASE,
    RAM_SIZE,
    VcpuThread,
    boot_guest,
    wait_until,
    wait_until_in_kvm_run,
)

from kvmfast import Kvm
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

HALT_FOREVER = "1: hlt\n jmp 1b"
KVM_RUN = 0xAE80
KVM_EXIT_IO = 2
# struct kvm_run: exit_reason at 8; the exit union at 32, io = {u8 direction, u8 size,
# u16 port, u32 count, u64 data_offset}.
EXIT_REASON_AT = 8
IO_PORT_AT = 32 + 2
IO_DATA_OFFSET_AT = 32 + 8


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_run_on_a_closed_vm_is_refused_while_the_vcpu_lives(kvm: Kvm) -> None:
    guest = boot_guest(kvm, f"mov al, 1\n {EXIT_SEQUENCE}")
    vm, vcpu = guest.vm, guest.vcpu
    del guest
    vm.close()
    for run in (vcpu.run, vcpu.run_once):
        with pytest.raises(ValueError, match="closed"):
            run()


def test_close_stops_a_vcpu_halted_in_kvm_run(kvm: Kvm) -> None:
    guest = boot_guest(kvm, HALT_FOREVER)
    thread = VcpuThread(guest.vcpu)
    wait_until_in_kvm_run(guest.vcpu)
    guest.vm.close()
    with pytest.raises(ValueError, match="closed"):
        thread.join(timeout=10)


# An MMIO load KVM hands to the run loop, and one of an instruction KVM cannot emulate
# (kvmfast completes it, reading guest RAM around the device call).
MMIO_LOADS = {"exit": "mov eax, [rbx]", "completion": "popcnt rax, [rbx]"}


def close_during_mmio_load(load: str) -> None:
    """Run in a child process (a deadlock there holds the GIL forever): the vCPU thread
    is in the device's read(), which returns only once the main thread's close() has
    begun."""
    guest = boot_guest(Kvm(), f"mov rbx, {MMIO_BASE:#x}\n {MMIO_LOADS[load]}\n {EXIT_SEQUENCE}")
    vm = guest.vm
    in_device = threading.Event()

    class WaitsForClose:
        def read(self, offset: int, size: int) -> int:
            in_device.set()
            assert wait_until(lambda: vm.closed, timeout=30)
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    vm.add_mmio(MMIO_BASE, 0x1000, WaitsForClose())
    thread = VcpuThread(guest.vcpu)
    assert in_device.wait(30)
    vm.close()
    try:
        thread.join(timeout=30)
    except ValueError as error:
        print(f"refused: {error}")


@pytest.mark.parametrize("load", sorted(MMIO_LOADS))
def test_close_while_a_vcpu_is_in_a_device_call_neither_deadlocks_nor_crashes(load: str) -> None:
    require_kvm()
    here = Path(__file__).parent
    child = (
        f"import sys; sys.path[:0] = [{str(here)!r}]; "
        "from test_close_while_running import close_during_mmio_load as scenario; "
        f"scenario({load!r})"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:
        pytest.fail("close() deadlocked with a vCPU thread in an MMIO device call")
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "closed" in done.stdout, done.stdout


def vcpu_fd_of(fds_before: set[str]) -> int:
    for name in set(os.listdir("/proc/self/fd")) - fds_before:
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("anon_inode:kvm-vcpu:"):
                return int(name)
        except FileNotFoundError:
            continue
    raise AssertionError("no new vCPU fd")


def map_at(address: int, size: int) -> None:
    """Fresh anonymous memory exactly at ``address`` (MAP_FIXED_NOREPLACE: never over a
    live mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    map_fixed_noreplace = 0x100000
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_fixed_noreplace
    result = libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if result != address:
        raise AssertionError(
            f"the old RAM address is still mapped: {os.strerror(ctypes.get_errno())}"
        )


def unmap(address: int, size: int) -> None:
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(address, size)


def raw_kvm_run(vcpu_fd: int, run_size: int) -> tuple[int, int, int]:
    """One KVM_RUN outside kvmfast, as anything holding the vCPU fd could issue it:
    (exit reason, I/O port, first I/O byte). SIGALRM bounds it."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.mmap(vcpu_fd, run_size)
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        libc.ioctl(vcpu_fd, KVM_RUN, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    (reason,) = struct.unpack_from("<I", page, EXIT_REASON_AT)
    (port,) = struct.unpack_from("<H", page, IO_PORT_AT)
    (data_offset,) = struct.unpack_from("<Q", page, IO_DATA_OFFSET_AT)
    value = page[data_offset] if data_offset < run_size else -1
    page.close()
    return reason, port, value


def test_after_close_fresh_memory_at_the_old_address_is_not_guest_ram(kvm: Kvm) -> None:
    gc.collect()  # no fd of an earlier test closes (and is reused) meanwhile
    fds_before = set(os.listdir("/proc/self/fd"))
    guest = boot_guest(kvm, f"mov al, 0x11\n {EXIT_SEQUENCE}")
    vm, vcpu = guest.vm, guest.vcpu
    vcpu_fd = vcpu_fd_of(fds_before)
    view = (ctypes.c_char * RAM_SIZE).from_buffer(guest.memory)
    host_address = ctypes.addressof(view)
    image = bytearray(view.raw)
    del view, guest
    gc.collect()
    code = image.index(bytes([0xB0, 0x11]))  # mov al, 0x11
    image[code + 1] = 0x5A
    vm.close()
    map_at(host_address, RAM_SIZE)
    try:
        ctypes.memmove(host_address, bytes(image), RAM_SIZE)
        reason, port, value = raw_kvm_run(vcpu_fd, kvm.vcpu_mmap_size)
    finally:
        unmap(host_address, RAM_SIZE)
    # With the slot still in KVM the guest would run the new page's code: OUT 0xF4, 0x5A.
    assert (reason, port, value) != (KVM_EXIT_IO, EXIT_PORT, 0x5A)
    del vcpu


def test_closing_running_vms_again_and_again_leaks_no_fd_or_mapping(kvm: Kvm) -> None:
    def cycle() -> None:
        guest = boot_guest(kvm, HALT_FOREVER)
        thread = VcpuThread(guest.vcpu)
        wait_until_in_kvm_run(guest.vcpu)
        guest.vm.close()
        with pytest.raises(ValueError, match="closed"):
            thread.join(timeout=10)

    cycle()  # the assembler's cache and the kick handler are set up once
    gc.collect()
    fds_before, maps_before = open_fds(), mappings()
    for _ in range(20):
        cycle()
    gc.collect()
    assert open_fds() == fds_before
    assert mappings() <= maps_before + 2  # allocator arenas may come and go
