"""A virtio-style doorbell: the guest stores anything to one address, a host handler runs.

Where KVM has KVM_CAP_IOEVENTFD_ANY_LENGTH the doorbell is a zero-length MMIO
ioeventfd served by kvmfast's event loop: the guest's store never leaves the
kernel, whatever its width. Elsewhere it falls back to an MMIO exit to a tiny
register device, which behaves the same from the guest's side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import kvm_abi
import kvmfast
from kvm_devices.interfaces import Device


class DoorbellHost(Protocol):
    vm: kvmfast.Vm

    @property
    def event_loop(self) -> kvmfast.EventLoop: ...

    def add_mmio_device(self, base: int, length: int, device: Device, name: str) -> None: ...


@dataclass
class DoorbellRegister:
    """The exit path: each store is one notification; reads return 0."""

    ring: Callable[[int], None]

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.ring(1)


class Doorbell:
    """``handler(count)`` runs once per batch of ``count`` guest stores to ``address``."""

    LENGTH = 4  # what the fallback register decodes; the ioeventfd matches any width

    def __init__(
        self,
        host: DoorbellHost,
        address: int,
        handler: Callable[[int], None],
        *,
        any_length: bool | None = None,
    ) -> None:
        if any_length is None:
            any_length = host.vm.check_extension(kvm_abi.KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0
        self.address = address
        self.uses_ioeventfd = any_length
        self._host = host
        self._eventfd: kvmfast.EventFd | None = None
        if any_length:
            self._eventfd = kvmfast.EventFd()
            host.vm.register_ioeventfd(self._eventfd.fd, address, 0)
            host.event_loop.add(self._eventfd, handler)
        else:
            host.add_mmio_device(address, self.LENGTH, DoorbellRegister(handler), "doorbell")

    def close(self) -> None:
        if self._eventfd is None:
            return
        self._host.event_loop.remove(self._eventfd)
        self._host.vm.unregister_ioeventfd(self._eventfd.fd, self.address, 0)
        self._eventfd.close()
        self._eventfd = None
