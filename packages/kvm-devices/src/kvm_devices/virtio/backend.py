"""What the virtio-pci transport needs from a device and from the VMM's interrupt wiring."""

from __future__ import annotations

from typing import Protocol


class VirtioBackend(Protocol):
    """One virtio device's queues and configuration (kvmfast.VirtioDevice, through a thin
    VMM adapter that binds the VM).

    ``read_config``, ``write_config`` and ``needs_reset`` are leaves: they never call into a
    device or block, so the transport uses them under its lock. ``activate``, ``reset`` and
    ``notify`` are calls out: the transport makes them from its outbox, never under its lock.
    """

    @property
    def device_type(self) -> int: ...

    @property
    def num_queues(self) -> int: ...

    @property
    def max_queue_size(self) -> int: ...

    @property
    def device_features(self) -> int: ...

    @property
    def config_size(self) -> int: ...

    @property
    def needs_reset(self) -> bool:
        """A malformed chain was seen: the device stopped and wants a reset."""

    def read_config(self, offset: int, size: int) -> int:
        """Device-specific configuration, little-endian; outside it reads 0."""

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, driver_features: int, queues: list[tuple[int, int, int, int, bool]]) -> None:
        """Start processing; one ``(size, desc, driver, device, enabled)`` per queue.

        Raises ValueError for a setup the device refuses (a ring outside guest RAM...).
        """

    def reset(self) -> None:
        """Stop processing: no used-ring write or interrupt once this returns."""

    def notify(self, queue: int) -> None:
        """The driver kicked ``queue`` (the doorbell path when no ioeventfd took the store)."""


class VirtioInterruptSink(Protocol):
    """How a virtio-pci function's interrupts leave it (kvm-vmm wires them to KVM)."""

    def intx(self, asserted: bool) -> None:
        """The function's INTx line (its pin), True while the ISR has a bit set and MSI-X is off."""

    def msix_vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        """A vector's message or effective mask changed (the VMM updates that vector's route)."""

    def msix_fire(self, vector: int) -> None:
        """Deliver ``vector``'s message now."""

    def bindings_changed(self) -> None:
        """Some ``binding(source)`` may answer differently: the VMM re-reads them."""
