"""Issuing KVM ioctls from Python, with nothing but the standard library.

Enough to drive /dev/kvm with kvm_abi alone: open the system fd, ask about the API and
capabilities, create a VM and its vCPUs, enable a capability, and issue any other ioctl
with ``ioctl(fd, request, arg)``. Every fd is owned by the object that opened it and
closed by ``close()`` or by leaving its ``with`` block.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from kvm_abi.constants import KVM_API_VERSION
from kvm_abi.ioctls import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_GET_API_VERSION,
    KVM_GET_VCPU_MMAP_SIZE,
)
from kvm_abi.structs import kvm_enable_cap

# fcntl.ioctl passes an integer argument as a C int, too small for unsigned long
# arguments such as KVM_SET_TSS_ADDR's 0xfffbd000; libc's ioctl takes them whole.
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.ioctl.restype = ctypes.c_int

IoctlArgument = int | ctypes.Structure | ctypes.Union | ctypes.Array[Any]


def ioctl(fd: int, request: int, arg: IoctlArgument = 0) -> int:
    """Issue one ioctl and return its non-negative result.

    An int is passed by value (an unsigned long, as the kernel reads it); a ctypes
    object is passed by pointer and KVM reads and writes it in place.
    Raises OSError with the ioctl's errno when it fails.
    """
    passed: ctypes.c_ulong | ctypes._CArgObject = (
        ctypes.c_ulong(arg) if isinstance(arg, int) else ctypes.byref(arg)
    )
    result: int = _LIBC.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), passed)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


class _OwnedFd:
    """An fd closed exactly once, by close() or at the end of a with block."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class KvmVcpu(_OwnedFd):
    fd: int
    vcpu_id: int


@dataclass
class KvmVm(_OwnedFd):
    fd: int

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION on the VM: the answer for this VM (KVM_CAP_CHECK_EXTENSION_VM)."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, capability)

    def enable_cap(self, capability: int, *args: int) -> int:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        if len(args) > 4:
            raise ValueError(f"kvm_enable_cap has 4 args, got {len(args)}")
        request = kvm_enable_cap(cap=capability)
        for index, value in enumerate(args):
            request.args[index] = value
        return ioctl(self.fd, KVM_ENABLE_CAP, request)

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        return KvmVcpu(ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id), vcpu_id)


@dataclass
class KvmSystem(_OwnedFd):
    """The /dev/kvm fd."""

    fd: int

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> KvmSystem:
        """Open the KVM device; refuses a kernel whose API version is not KVM_API_VERSION."""
        system = cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        version = system.api_version()
        if version != KVM_API_VERSION:
            system.close()
            raise OSError(f"{path} speaks KVM API {version}, kvm_abi speaks {KVM_API_VERSION}")
        return system

    def api_version(self) -> int:
        return ioctl(self.fd, KVM_GET_API_VERSION)

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else 1 or a capability-specific value."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, capability)

    def vcpu_mmap_size(self) -> int:
        """How many bytes to mmap from a vCPU fd: kvm_run and the pages after it."""
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, machine_type: int = 0) -> KvmVm:
        return KvmVm(ioctl(self.fd, KVM_CREATE_VM, machine_type))
