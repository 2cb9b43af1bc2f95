"""The virtio-pci common configuration structure and the device status machine
(virtio 1.2 §4.1.4.3 and §2.1, §3.1.1), PCI-free.

:class:`CommonConfig` is not thread-safe and makes no call out: its owner holds its lock
around each access and turns the :class:`Effects` an access returns into calls (resetting
or activating the backend, interrupts) made after releasing it.

Choices where the specification leaves room:

* Reads of any offset and width give the bytes of the structure (beyond it: 0); reading
  has no side effect here. Writes act only at a field's natural width, or as either 32-bit
  half (or the whole) of a 64-bit field (§4.1.3.1); other writes are ignored and counted.
* The driver's feature bits are kept as written (§4.1.4.3.2 allows presenting invalid bits)
  and checked when it sets FEATURES_OK: refused (FEATURES_OK stays clear, §3.1.1 step 6)
  unless a subset of what is offered that includes VIRTIO_F_VERSION_1. Writes to
  driver_feature once FEATURES_OK is set are ignored: the features were agreed.
* queue_size (§4.1.4.3.2, driver requirements): a value that is not a power of two (any
  value from 1 when VIRTIO_F_RING_PACKED was negotiated) or exceeds the maximum is
  ignored, the previous size stays: the rule broken is the driver's, the device is not in
  an error state, and the driver can see its write was not taken by reading it back.
* Queue fields of an enabled queue are not rewritten (§4.1.4.3.2: "configure the other
  virtqueue fields before enabling"); queue_enable takes only 1 (the driver "MUST NOT
  write a 0"), and only before DRIVER_OK, when the backend learns its queues.
* An MSI-X vector beyond the table reads back as NO_VECTOR (§4.1.5.1.2: a failed mapping).
* Device status (§2.1.1): the driver must not clear a bit; doing so, or setting DRIVER_OK
  without FEATURES_OK, sets DEVICE_NEEDS_RESET. DEVICE_NEEDS_RESET belongs to the device:
  the driver writing it changes nothing. Once it is set only a reset (0) or FAILED is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from kvm_devices.snapshot import Mask, Range, StateError, bits
from kvm_devices.virtio.constants import (
    F_RING_PACKED,
    F_VERSION_1,
    ISR_CONFIG,
    ISR_QUEUE,
    NO_VECTOR,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
)

# §4.1.4.3 struct virtio_pci_common_cfg: offset -> (name, width).
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
# The 1.0 structure: queue_notif_config_data and queue_reset follow only with
# VIRTIO_F_NOTIF_CONFIG_DATA / VIRTIO_F_RING_RESET, which this transport does not offer.
COMMON_CFG_LENGTH = 0x38

_FIELDS: dict[int, int] = {
    DEVICE_FEATURE_SELECT: 4,
    DEVICE_FEATURE: 4,
    DRIVER_FEATURE_SELECT: 4,
    DRIVER_FEATURE: 4,
    CONFIG_MSIX_VECTOR: 2,
    NUM_QUEUES: 2,
    DEVICE_STATUS: 1,
    CONFIG_GENERATION: 1,
    QUEUE_SELECT: 2,
    QUEUE_SIZE: 2,
    QUEUE_MSIX_VECTOR: 2,
    QUEUE_ENABLE: 2,
    QUEUE_NOTIFY_OFF: 2,
    QUEUE_DESC: 8,
    QUEUE_DRIVER: 8,
    QUEUE_DEVICE: 8,
}
_QUEUE_ADDRESSES = {QUEUE_DESC: "desc", QUEUE_DRIVER: "driver", QUEUE_DEVICE: "device"}
MAX_QUEUE_SIZE = 0x8000  # §2.7 (packed) / §2.6 (split): queue sizes are at most 32768

QueueTuple = tuple[int, int, int, int, bool]


@dataclass
class QueueState:
    """One virtqueue's configuration as the driver wrote it (§4.1.4.3)."""

    size: Annotated[int, Range(0, MAX_QUEUE_SIZE)] = 0
    desc: Annotated[int, bits(64)] = 0
    driver: Annotated[int, bits(64)] = 0
    device: Annotated[int, bits(64)] = 0
    enabled: bool = False
    msix_vector: Annotated[int, bits(16)] = NO_VECTOR

    def as_tuple(self) -> QueueTuple:
        return (self.size, self.desc, self.driver, self.device, self.enabled)


@dataclass
class VirtioState:
    """The transport's virtio state: everything a reset (device_status = 0) clears."""

    status: Annotated[int, bits(8)] = 0
    device_feature_select: Annotated[int, bits(32)] = 0
    driver_feature_select: Annotated[int, bits(32)] = 0
    driver_features: Annotated[int, bits(64)] = 0
    config_msix_vector: Annotated[int, bits(16)] = NO_VECTOR
    config_generation: Annotated[int, bits(8)] = 0
    queue_select: Annotated[int, bits(16)] = 0
    isr: Annotated[int, Mask(ISR_QUEUE | ISR_CONFIG)] = 0
    queues: list[QueueState] = field(default_factory=list)

    def check_invariants(self) -> None:
        for index, queue in enumerate(self.queues):
            if queue.enabled and queue.size == 0:
                raise StateError(f"queues[{index}]", "enabled with size 0")


@dataclass
class Effects:
    """What an access asks of the owner, to be done once its lock is released."""

    reset: bool = False
    # (driver features, one tuple per queue): the backend must be activated.
    activate: tuple[int, list[QueueTuple]] | None = None
    # DEVICE_NEEDS_RESET was just set: a configuration change interrupt is due.
    needs_reset: bool = False
    vectors_changed: bool = False


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class CommonConfig:
    """The common configuration structure of one function, over its :class:`VirtioState`."""

    def __init__(
        self, *, device_features: int, num_queues: int, max_queue_size: int, msix_vectors: int
    ) -> None:
        if not 1 <= max_queue_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_queue_size {max_queue_size} is outside 1..{MAX_QUEUE_SIZE}")
        self.device_features = device_features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.msix_vectors = msix_vectors
        self.state = self.initial_state()
        self.counters = {"ignored_writes": 0, "refused_features": 0, "needs_reset": 0}

    def initial_state(self) -> VirtioState:
        """The state after a reset (§4.1.4.3.2: queues disabled, every event unmapped)."""
        return VirtioState(
            queues=[QueueState(size=self.max_queue_size) for _ in range(self.num_queues)]
        )

    @property
    def driver_ok(self) -> bool:
        return bool(self.state.status & STATUS_DRIVER_OK)

    def negotiated(self, bit: int) -> bool:
        return bool(
            self.state.status & STATUS_FEATURES_OK and self.state.driver_features >> bit & 1
        )

    def selected_queue(self) -> QueueState | None:
        select = self.state.queue_select
        return self.state.queues[select] if select < self.num_queues else None

    def queue_tuples(self) -> list[QueueTuple]:
        return [queue.as_tuple() for queue in self.state.queues]

    def vector_of(self, source: int) -> int:
        """The MSI-X vector of queue ``source`` (or of the configuration change, -1)."""
        if source < 0:
            return self.state.config_msix_vector
        if source < self.num_queues:
            return self.state.queues[source].msix_vector
        return NO_VECTOR

    def set_needs_reset(self, effects: Effects) -> None:
        if not self.state.status & STATUS_DEVICE_NEEDS_RESET:
            self.state.status |= STATUS_DEVICE_NEEDS_RESET
            self.counters["needs_reset"] += 1
            effects.needs_reset = True

    # ------------------------------------------------------------------ reads

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or not 0 <= offset < COMMON_CFG_LENGTH:
            return 0
        image = self._image()
        return int.from_bytes(image[offset : offset + size].ljust(size, b"\0"), "little")

    def _image(self) -> bytes:
        state = self.state
        queue = self.selected_queue()
        select = state.device_feature_select
        device_feature = (self.device_features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0
        driver_select = state.driver_feature_select
        driver_feature = (
            (state.driver_features >> (32 * driver_select)) & 0xFFFF_FFFF
            if driver_select < 2
            else 0
        )
        values = {
            DEVICE_FEATURE_SELECT: select,
            DEVICE_FEATURE: device_feature,
            DRIVER_FEATURE_SELECT: driver_select,
            DRIVER_FEATURE: driver_feature,
            CONFIG_MSIX_VECTOR: state.config_msix_vector,
            NUM_QUEUES: self.num_queues,
            DEVICE_STATUS: state.status,
            CONFIG_GENERATION: state.config_generation,
            QUEUE_SELECT: state.queue_select,
            # §4.1.4.3.2: size 0 for a queue that does not exist (unmapped, other fields 0).
            QUEUE_SIZE: queue.size if queue else 0,
            QUEUE_MSIX_VECTOR: queue.msix_vector if queue else NO_VECTOR,
            QUEUE_ENABLE: int(queue.enabled) if queue else 0,
            QUEUE_NOTIFY_OFF: state.queue_select if queue else 0,
            QUEUE_DESC: queue.desc if queue else 0,
            QUEUE_DRIVER: queue.driver if queue else 0,
            QUEUE_DEVICE: queue.device if queue else 0,
        }
        image = bytearray(COMMON_CFG_LENGTH)
        for offset, value in values.items():
            width = _FIELDS[offset]
            image[offset : offset + width] = value.to_bytes(width, "little")
        return bytes(image)

    # ----------------------------------------------------------------- writes

    def write(self, offset: int, size: int, value: int) -> Effects:
        effects = Effects()
        if size not in (1, 2, 4, 8):
            self.counters["ignored_writes"] += 1
            return effects
        value &= (1 << (8 * size)) - 1
        if _FIELDS.get(offset) == size:
            self._write_field(offset, size, value, effects)
            return effects
        # A 64-bit field written as two 32-bit halves (§4.1.3.1).
        base = offset - 4
        if size == 4 and _FIELDS.get(base) == 8:
            self._write_field(base, 8, value, effects, high_half=True)
        elif size == 4 and _FIELDS.get(offset) == 8:
            self._write_field(offset, 8, value, effects, low_half=True)
        else:
            self.counters["ignored_writes"] += 1
        return effects

    def _write_field(
        self,
        offset: int,
        size: int,
        value: int,
        effects: Effects,
        *,
        high_half: bool = False,
        low_half: bool = False,
    ) -> None:
        state = self.state
        queue = self.selected_queue()
        taken = True
        if offset == DEVICE_FEATURE_SELECT:
            state.device_feature_select = value
        elif offset == DRIVER_FEATURE_SELECT:
            state.driver_feature_select = value
        elif offset == DRIVER_FEATURE:
            taken = self._write_driver_feature(value)
        elif offset == CONFIG_MSIX_VECTOR:
            vector = self._mapped(value)
            effects.vectors_changed = vector != state.config_msix_vector
            state.config_msix_vector = vector
        elif offset == DEVICE_STATUS:
            self._write_status(value, effects)
        elif offset == QUEUE_SELECT:
            state.queue_select = value
        elif queue is None:
            taken = False
        elif offset == QUEUE_MSIX_VECTOR:
            vector = self._mapped(value)
            effects.vectors_changed = vector != queue.msix_vector
            queue.msix_vector = vector
        elif offset == QUEUE_SIZE:
            taken = not queue.enabled and self._valid_queue_size(value)
            if taken:
                queue.size = value
        elif offset == QUEUE_ENABLE:
            taken = value == 1 and not self.driver_ok and queue.size > 0
            queue.enabled = queue.enabled or taken
        elif offset in _QUEUE_ADDRESSES and not queue.enabled:
            name = _QUEUE_ADDRESSES[offset]
            old = getattr(queue, name)
            if high_half:
                value = (old & 0xFFFF_FFFF) | (value << 32)
            elif low_half:
                value = (old & ~0xFFFF_FFFF) | value
            setattr(queue, name, value)
        else:
            taken = False  # read-only fields, or the address of an enabled queue
        if not taken:
            self.counters["ignored_writes"] += 1

    def _write_driver_feature(self, value: int) -> bool:
        state = self.state
        select = state.driver_feature_select
        if select >= 2 or state.status & STATUS_FEATURES_OK:
            return select >= 2 and value == 0  # no feature lives there: 0 is no news
        shift = 32 * select
        state.driver_features = (state.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        return True

    def _mapped(self, vector: int) -> int:
        return vector if vector < self.msix_vectors else NO_VECTOR

    def _valid_queue_size(self, size: int) -> bool:
        if not 1 <= size <= self.max_queue_size:
            return False
        return self.negotiated(F_RING_PACKED) or _is_power_of_two(size)

    def features_acceptable(self) -> bool:
        features = self.state.driver_features
        return not features & ~self.device_features and bool(features >> F_VERSION_1 & 1)

    def _write_status(self, value: int, effects: Effects) -> None:
        state = self.state
        if value == 0:
            self.state = self.initial_state()
            effects.reset = True
            effects.vectors_changed = True
            return
        old = state.status
        value &= ~STATUS_DEVICE_NEEDS_RESET
        if old & STATUS_DEVICE_NEEDS_RESET:
            state.status |= value & STATUS_FAILED
            return
        if old & ~value:
            self.set_needs_reset(effects)  # §2.1.1: the driver MUST NOT clear a bit
            return
        new = value & ~old
        state.status = old | new
        if new & STATUS_FEATURES_OK and not self.features_acceptable():
            state.status &= ~STATUS_FEATURES_OK
            self.counters["refused_features"] += 1
        if new & STATUS_DRIVER_OK:
            if not state.status & STATUS_FEATURES_OK:
                self.set_needs_reset(effects)
            else:
                effects.activate = (state.driver_features, self.queue_tuples())
