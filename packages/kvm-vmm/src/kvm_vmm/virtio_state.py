"""A virtio-pci device's whole state: its transport's registers and its queues' positions.

The transport (kvm-devices) saves what the guest programmed: status, features, queue
addresses, MSI-X table. Where each queue stands (the next available entry to take, the
next used entry to fill, the last used index signalled for EVENT_IDX) lives in
kvmfast's queues and is saved beside it. Restore brings the transport back first, which
activates the kvmfast device with the saved queue addresses, then puts the queues'
positions back before the device serves anything.

A position is only consistent with the guest's rings at a clean pause: Machine.pause()
has let the request in flight complete and no doorbell can ring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

from kvm_devices.snapshot import StateError, bits, state_from_data, state_to_data
from kvm_devices.virtio.constants import (
    F_RING_EVENT_IDX,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
)
from kvm_devices.virtio.pci_transport import VirtioPciState
from kvm_vmm.pci_virtio import VirtioPciDevice

if TYPE_CHECKING:
    from kvmfast._native import QueueState


@dataclass
class QueuePosition:
    """kvmfast's VirtioDevice.queue_states() entry for one queue."""

    ready: bool
    size: Annotated[int, bits(16)]
    desc_table: Annotated[int, bits(64)]
    avail_ring: Annotated[int, bits(64)]
    used_ring: Annotated[int, bits(64)]
    next_avail: Annotated[int, bits(16)]
    next_used: Annotated[int, bits(16)]
    event_idx: bool
    signalled_used: Annotated[int, bits(16)] | None


@dataclass
class _Positions:
    queues: list[QueuePosition]


@dataclass(frozen=True)
class VirtioDeviceState:
    transport: VirtioPciState
    queues: list[QueuePosition]


class VirtioDeviceSnapshot:
    """The Snapshottable (kvm_devices.interfaces) of one attached virtio device."""

    def __init__(self, attached: VirtioPciDevice) -> None:
        self.attached = attached

    def save_state(self) -> VirtioDeviceState:
        positions = state_from_data(
            _Positions, {"queues": self.attached.device.queue_states()}, self.attached.name
        )
        return VirtioDeviceState(self.attached.transport.save_state(), positions.queues)

    def check_state(self, data: object) -> VirtioDeviceState:
        name = self.attached.name
        if not isinstance(data, dict) or set(data) != {"transport", "queues"}:
            raise StateError("", "not a mapping of transport and queues", name)
        try:
            transport = self.attached.transport.check_state(data["transport"])
        except StateError as error:
            raise error.within("transport", name) from None
        queues = state_from_data(_Positions, {"queues": data["queues"]}, name).queues
        if len(queues) != self.attached.device.num_queues:
            raise StateError("queues", f"not {self.attached.device.num_queues} queues", name)
        status = transport.virtio.status
        running = bool(status & STATUS_DRIVER_OK) and not status & STATUS_DEVICE_NEEDS_RESET
        event_idx = bool(transport.virtio.driver_features >> F_RING_EVENT_IDX & 1)
        programmed_queues = transport.virtio.queues
        for index, (queue, programmed) in enumerate(zip(queues, programmed_queues, strict=True)):
            if not running or not programmed.enabled:
                continue  # the device holds no position for it
            saved = (queue.ready, queue.size, queue.desc_table, queue.avail_ring, queue.used_ring)
            wanted = (True, programmed.size, programmed.desc, programmed.driver, programmed.device)
            if saved != wanted or queue.event_idx != event_idx:
                raise StateError(
                    f"queues[{index}]", "does not match the queue the transport holds", name
                )
        return VirtioDeviceState(transport, queues)

    def restore_state(self, state: VirtioDeviceState) -> None:
        """The caller has paused the device: activate() rings every doorbell, and the
        device must serve nothing until the queues stand where they stood."""
        self.attached.transport.restore_state(state.transport)  # activates the device
        status = state.transport.virtio.status
        if status & STATUS_DRIVER_OK and not status & STATUS_DEVICE_NEEDS_RESET:
            positions = [cast("QueueState", asdict(queue)) for queue in state.queues]
            self.attached.device.restore_queue_states(positions)

    def save(self) -> dict[str, object]:
        state = self.save_state()
        return {
            "transport": state_to_data(state.transport),
            "queues": [state_to_data(queue) for queue in state.queues],
        }

    def restore(self, data: object) -> None:
        self.restore_state(self.check_state(data))


def virtio_snapshottables(devices: list[VirtioPciDevice]) -> dict[str, Any]:
    return {attached.name: VirtioDeviceSnapshot(attached) for attached in devices}
