"""A virtio-pci modern function (virtio 1.2 §4.1, no legacy interface) in front of a
:class:`~kvm_devices.virtio.backend.VirtioBackend`.

BAR0 (64-bit memory, :data:`BAR0_SIZE`) holds one 4 KiB page per structure: the common
configuration (§4.1.4.3), the ISR (§4.1.4.5), the device configuration (§4.1.4.6), the
notifications (§4.1.4.4, queue ``q`` at ``q * NOTIFY_OFF_MULTIPLIER``), the MSI-X table
and its PBA. Each structure has its vendor-specific capability, and a
VIRTIO_PCI_CAP_PCI_CFG window (§4.1.4.9) reaches BAR0 from configuration space.

Choices where the specification leaves room:

* BAR0 bytes outside every structure read 0 and ignore writes: the function claims the
  whole BAR, so there is no master abort to read all ones from. Access widths other than
  1, 2, 4 or 8 read 0 and are ignored.
* Interrupts before DRIVER_OK are dropped (§2.1.2: no used buffer notification before it;
  a configuration change then only changes config_generation).
* The configuration change interrupt sets ISR bit 1 whether or not MSI-X is on (§4.1.4.5:
  set "before sending a device configuration change notification"); the queue bit only
  with MSI-X off. INTx is asserted while MSI-X is off, COMMAND's interrupt disable is
  clear and the ISR is not 0; STATUS bit 3 follows the ISR (PCI 3.0 §6.2.3).
* config_generation (§4.1.4.3.2): each read of the device configuration compares the whole
  of it with what the previous read saw and bumps the generation on a difference, so a
  change between a driver's two generation reads is always seen.
* DEVICE_NEEDS_RESET (§2.1.2): set when the driver breaks a rule (see
  :mod:`kvm_devices.virtio.common_config`), when ``backend.activate`` raises ValueError, or
  when the backend reports ``needs_reset`` (seen on its configuration interrupt and on
  reads of the common configuration); a configuration change interrupt follows.

Locks (docs/architecture.md, "Device locks"): one lock guards the virtio state; every call
out (the interrupt sink, ``backend.activate``/``reset``/``notify``, the MSI-X table's
``signal``, the configuration space's STATUS bit) is posted to the outbox and made after
it is released. Order, outermost first: this function's lock -> the MSI-X table's lock and
the configuration space's lock (which never call back under theirs).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvm_devices.outbox import Outbox
from kvm_devices.pci.config_space import COMMAND, PciConfigSpace, PciConfigState
from kvm_devices.pci.msix import CAPABILITY_ID as MSIX_CAPABILITY_ID
from kvm_devices.pci.msix import MsixState, MsixTable
from kvm_devices.snapshot import Snapshotting, StateError, detached, state_from_data
from kvm_devices.virtio.backend import VirtioBackend, VirtioInterruptSink
from kvm_devices.virtio.capabilities import PciCfgWindow, PciCfgWindowState, virtio_cap_body
from kvm_devices.virtio.common_config import COMMON_CFG_LENGTH, CommonConfig, Effects, VirtioState
from kvm_devices.virtio.constants import (
    BAR0_SIZE,
    CLASS_CODES,
    COMMON_CFG_OFFSET,
    CONFIG_SOURCE,
    DEVICE_CFG_OFFSET,
    ISR_CONFIG,
    ISR_OFFSET,
    ISR_QUEUE,
    MAX_QUEUES,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NO_VECTOR,
    NOTIFY_OFF_MULTIPLIER,
    NOTIFY_OFFSET,
    PCI_CAP_COMMON_CFG,
    PCI_CAP_DEVICE_CFG,
    PCI_CAP_ID_VENDOR,
    PCI_CAP_ISR_CFG,
    PCI_CAP_NOTIFY_CFG,
    PCI_CLASS_OTHERS,
    REGION_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    TRANSPORT_UNSUPPORTED_FEATURES,
    VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_REVISION,
    VIRTIO_PCI_SUBSYSTEM_ID,
    VIRTIO_PCI_VENDOR_ID,
)

BAR0 = 0
INTERRUPT_PIN_INTA = 1
# The MSI-X table gets one page of BAR0: 16 bytes per entry.
MAX_MSIX_VECTORS = REGION_SIZE // 16


@dataclass
class VirtioPciState:
    """A virtio-pci function: its virtio registers, configuration space, MSI-X table and
    the VIRTIO_PCI_CAP_PCI_CFG window's fields."""

    virtio: VirtioState
    config: PciConfigState
    msix: MsixState
    pci_cfg: PciCfgWindowState


class _ConfigSpace(PciConfigSpace):
    """The function's configuration space, telling it when COMMAND was written: INTx
    disable (bit 10) gates the line at once (PCI 3.0 §6.2.2)."""

    def __init__(self, on_command_written: Callable[[], None], **kwargs: int) -> None:
        super().__init__(**kwargs)
        self._on_command_written = on_command_written

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        if 1 <= size <= 8 and offset < COMMAND + 2 and offset + size > COMMAND:
            self._on_command_written()


class _PciCfgHandler:
    """The VIRTIO_PCI_CAP_PCI_CFG capability's body, for the configuration space."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self._function = function

    def read_capability(self, offset: int, size: int) -> int:
        return self._function._pci_cfg_read(offset, size)

    def write_capability(self, offset: int, size: int, value: int) -> None:
        self._function._pci_cfg_write(offset, size, value)


class _MsixCapability:
    """The MSI-X capability's body: the table's, and a change of MSI-X enable (or function
    mask) re-evaluates the INTx line and the bindings even when no vector's effective
    mask changed with it (every vector masked)."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self._function = function

    def read_capability(self, offset: int, size: int) -> int:
        return self._function.msix.read_capability(offset, size)

    def write_capability(self, offset: int, size: int, value: int) -> None:
        self._function.msix.write_capability(offset, size, value)
        self._function._msix_control_written()


class _MsixForwarder:
    """The MSI-X table's sink: forwards to the interrupt sink; a vector's mask decides
    its binding."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self._function = function

    def vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        self._function._msix_vector_changed(vector, address, data, masked)

    def fire(self, vector: int) -> None:
        self._function._msix_fire(vector)


def _width_ok(size: int) -> bool:
    return size in (1, 2, 4, 8)


class VirtioPciFunction(Snapshotting[VirtioPciState]):
    """One virtio-pci function: ``config`` for the bus, :meth:`bar_read`/:meth:`bar_write`
    for BAR0, :meth:`interrupt` and :meth:`binding` for the VMM's interrupt wiring."""

    def __init__(
        self,
        backend: VirtioBackend,
        *,
        msix_vectors: int,
        interrupt_sink: VirtioInterruptSink,
        bar0_address: int = 0,
    ) -> None:
        num_queues = backend.num_queues
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"{num_queues} queues: a virtio-pci function has 1..{MAX_QUEUES}")
        if not 1 <= msix_vectors <= MAX_MSIX_VECTORS:
            raise ValueError(f"{msix_vectors} MSI-X vectors: 1..{MAX_MSIX_VECTORS} fit BAR0")
        config_size = backend.config_size
        if not 0 <= config_size <= REGION_SIZE:
            raise ValueError(f"device configuration of {config_size} bytes exceeds a page")
        self._backend = backend
        self._sink = interrupt_sink
        self._num_queues = num_queues
        self._config_size = config_size
        self._lock = threading.Lock()
        self._outbox = Outbox(self._lock)
        self._common = CommonConfig(
            device_features=backend.device_features & ~TRANSPORT_UNSUPPORTED_FEATURES,
            num_queues=num_queues,
            max_queue_size=backend.max_queue_size,
            msix_vectors=msix_vectors,
        )
        # Bumped on each reset: an activation that fails after a reset must not mark the
        # new incarnation of the device.
        self._epoch = 0
        self._config_seen: bytes | None = None
        self._intx_level = False  # the level last posted to the sink
        self._intx_request = False  # STATUS bit 3 as last posted
        self._pci_cfg = PciCfgWindow(BAR0, BAR0_SIZE)
        self.counters = self._common.counters
        self.counters.update(dropped_interrupts=0, notify_register_writes=0)

        device_type = backend.device_type
        self.config: PciConfigSpace = _ConfigSpace(
            self._command_written,
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=VIRTIO_PCI_DEVICE_ID_BASE + device_type,
            class_code=CLASS_CODES.get(device_type, PCI_CLASS_OTHERS),
            revision=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin=INTERRUPT_PIN_INTA,
        )
        self.config.add_memory_bar(BAR0, BAR0_SIZE, is_64bit=True, address=bar0_address)
        self.msix = MsixTable(
            msix_vectors, BAR0, MSIX_TABLE_OFFSET, BAR0, MSIX_PBA_OFFSET, _MsixForwarder(self)
        )
        self._add_capabilities()

    def _add_capabilities(self) -> None:
        config = self.config
        config.add_capability(
            MSIX_CAPABILITY_ID, self.msix.capability_body(), handler=_MsixCapability(self)
        )
        structures = [
            (PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LENGTH, b""),
            (
                PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                self._num_queues * NOTIFY_OFF_MULTIPLIER,
                NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"),
            ),
            (PCI_CAP_ISR_CFG, ISR_OFFSET, 1, b""),
        ]
        if self._config_size:  # §4.1.4.6: only for a device with a configuration
            structures.append((PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, self._config_size, b""))
        for cfg_type, offset, length, extra in structures:
            body = virtio_cap_body(cfg_type, bar=BAR0, offset=offset, length=length, extra=extra)
            config.add_capability(PCI_CAP_ID_VENDOR, body)
        config.add_capability(PCI_CAP_ID_VENDOR, self._pci_cfg.body(), handler=_PciCfgHandler(self))

    # -------------------------------------------------------------------- BAR0

    def bar_read(self, offset: int, size: int) -> int:
        if not _width_ok(size) or not 0 <= offset < BAR0_SIZE:
            return 0
        region, within = divmod(offset, REGION_SIZE)
        base = region * REGION_SIZE
        if base == MSIX_TABLE_OFFSET:
            return self.msix.table_read(within, size)
        if base == MSIX_PBA_OFFSET:
            return self.msix.pba_read(within, size)
        with self._lock:
            if base == COMMON_CFG_OFFSET:
                self._poll_backend_locked()
                value = self._common.read(within, size)
            elif base == ISR_OFFSET:
                value = self._read_isr_locked() if within == 0 else 0
            elif base == DEVICE_CFG_OFFSET:
                value = self._read_device_config_locked(within, size)
            else:
                value = 0
        self._outbox.flush()
        return value

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if not _width_ok(size) or not 0 <= offset < BAR0_SIZE:
            return
        value &= (1 << (8 * size)) - 1
        region, within = divmod(offset, REGION_SIZE)
        base = region * REGION_SIZE
        if base == MSIX_TABLE_OFFSET:
            self.msix.table_write(within, size, value)
            return
        if base == MSIX_PBA_OFFSET:
            self.msix.pba_write(within, size, value)  # read-only; counts a bad access
            return
        with self._lock:
            if base == COMMON_CFG_OFFSET:
                self._apply_locked(self._common.write(within, size, value))
            elif base == DEVICE_CFG_OFFSET:
                if within + size <= self._config_size:
                    self._backend.write_config(within, size, value)
            elif base == NOTIFY_OFFSET:
                # §4.1.5.2: the store's value (the queue index) adds nothing without
                # VIRTIO_F_NOTIFICATION_DATA; the address says which queue.
                queue, rest = divmod(within, NOTIFY_OFF_MULTIPLIER)
                if rest == 0 and queue < self._num_queues:
                    self.counters["notify_register_writes"] += 1
                    self._outbox.post(functools.partial(self._backend.notify, queue))
        self._outbox.flush()

    def notify_address(self, queue: int) -> int | None:
        """Queue ``queue``'s doorbell in guest-physical memory, while BAR0 decodes."""
        if not 0 <= queue < self._num_queues or not self.config.memory_enabled:
            return None
        base = self.config.bar_address(BAR0)
        if base is None:
            return None
        return base + NOTIFY_OFFSET + queue * NOTIFY_OFF_MULTIPLIER

    # -------------------------------------------------------------- interrupts

    def interrupt(self, source: int) -> None:
        """The backend signalled queue ``source`` (or :data:`CONFIG_SOURCE`) on a path that
        reaches Python: MSI-X masked or off."""
        with self._lock:
            if source == CONFIG_SOURCE:
                self._poll_backend_locked(force_interrupt=True)
            elif 0 <= source < self._num_queues and self._common.driver_ok:
                self._notify_locked(source)
            else:
                self.counters["dropped_interrupts"] += 1
        self._outbox.flush()

    def binding(self, source: int) -> tuple[str, int | None]:
        """How ``source``'s interrupt reaches the guest: ("msix", vector) when MSI-X is on
        and the vector is valid and effectively unmasked (the VMM wires an irqfd on its
        route), else ("python", None) (the VMM calls :meth:`interrupt`)."""
        with self._lock:
            vector = self._common.vector_of(source)
        if vector == NO_VECTOR or not self.msix.enabled:
            return ("python", None)
        _, _, masked = self.msix.message(vector)
        return ("python", None) if masked else ("msix", vector)

    def _notify_locked(self, source: int) -> None:
        """Send ``source``'s notification; the ISR bit is already set for the config."""
        if self.msix.enabled:
            vector = self._common.vector_of(source)
            if vector != NO_VECTOR:
                self._outbox.post(functools.partial(self.msix.signal, vector))
            else:
                self.counters["dropped_interrupts"] += 1
            return
        self._common.state.isr |= ISR_QUEUE if source != CONFIG_SOURCE else ISR_CONFIG
        self._update_intx_locked()

    def _config_interrupt_locked(self) -> None:
        if not self._common.driver_ok:
            self.counters["dropped_interrupts"] += 1
            return
        self._common.state.isr |= ISR_CONFIG
        self._notify_locked(CONFIG_SOURCE)

    def _poll_backend_locked(self, *, force_interrupt: bool = False) -> None:
        """Take the backend's needs_reset into DEVICE_NEEDS_RESET; a configuration
        interrupt follows when it was just set, or when the backend sent one."""
        effects = Effects()
        if self._common.driver_ok and self._backend.needs_reset:
            self._common.set_needs_reset(effects)
        if force_interrupt or effects.needs_reset:
            self._config_interrupt_locked()

    def _read_isr_locked(self) -> int:
        # §4.1.4.5.1: the ISR resets to 0 on the driver's read.
        value = self._common.state.isr
        self._common.state.isr = 0
        self._update_intx_locked()
        return value

    def _intx_request_locked(self) -> bool:
        """PCI 3.0 §6.2.3 STATUS bit 3: an interrupt is requested, whatever COMMAND bit 10."""
        return bool(self._common.state.isr) and not self.msix.enabled

    def _update_intx_locked(self, *, force: bool = False) -> None:
        request = self._intx_request_locked()
        level = request and not self.config.intx_disabled
        if force or request != self._intx_request:
            self._intx_request = request
            self._outbox.post(functools.partial(self.config.set_interrupt_status, request))
        if force or level != self._intx_level:
            self._intx_level = level
            self._outbox.post(functools.partial(self._sink.intx, level))

    def _command_written(self) -> None:
        with self._lock:
            self._update_intx_locked()
        self._outbox.flush()

    def _msix_control_written(self) -> None:
        with self._lock:
            self._update_intx_locked()
            self._outbox.post(self._sink.bindings_changed)
        self._outbox.flush()

    def _msix_vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        with self._lock:
            self._outbox.post(
                functools.partial(self._sink.msix_vector_changed, vector, address, data, masked)
            )
            self._outbox.post(self._sink.bindings_changed)
        self._outbox.flush()

    def _msix_fire(self, vector: int) -> None:
        with self._lock:
            self._outbox.post(functools.partial(self._sink.msix_fire, vector))
        self._outbox.flush()

    # ------------------------------------------------------------ the registers

    def _apply_locked(self, effects: Effects) -> None:
        if effects.reset:
            self._epoch += 1
            self._config_seen = None
            self._outbox.post(self._backend.reset)
            self._update_intx_locked()
        if effects.activate is not None:
            features, queues = effects.activate
            self._outbox.post(functools.partial(self._activate, self._epoch, features, queues))
        if effects.needs_reset:
            self._config_interrupt_locked()
        if effects.vectors_changed:
            self._outbox.post(self._sink.bindings_changed)

    def _activate(
        self, epoch: int, features: int, queues: list[tuple[int, int, int, int, bool]]
    ) -> None:
        try:
            self._backend.activate(features, queues)
        except ValueError:
            with self._lock:
                if epoch == self._epoch:
                    effects = Effects()
                    self._common.set_needs_reset(effects)
                    self._apply_locked(effects)
            self._outbox.flush()

    def _read_device_config_locked(self, offset: int, size: int) -> int:
        if offset + size > self._config_size:
            return 0
        current = b"".join(
            self._backend.read_config(at, 1).to_bytes(1, "little")
            for at in range(self._config_size)
        )
        if self._config_seen is not None and current != self._config_seen:
            state = self._common.state
            state.config_generation = (state.config_generation + 1) & 0xFF
        self._config_seen = current
        return self._backend.read_config(offset, size)

    # ----------------------------------------------------- the PCI_CFG window

    def _pci_cfg_read(self, offset: int, size: int) -> int:
        with self._lock:
            target = self._pci_cfg.target() if self._pci_cfg.touches_data(offset, size) else None
        if target is not None:
            value = self.bar_read(*target)
            with self._lock:
                self._pci_cfg.complete_read(value, target[1])
        with self._lock:
            return self._pci_cfg.read(offset, size)

    def _pci_cfg_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            access = self._pci_cfg.write(offset, size, value)
        if access is not None:
            self.bar_write(*access)

    # ---------------------------------------------------------------- snapshot

    def save_state(self) -> VirtioPciState:
        with self._lock:
            virtio = detached(self._common.state)
            pci_cfg = detached(self._pci_cfg.state)
        return VirtioPciState(
            virtio=virtio,
            config=self.config.save_state(),
            msix=self.msix.save_state(),
            pci_cfg=pci_cfg,
        )

    def check_state(self, data: object) -> VirtioPciState:
        name = "virtio-pci"
        if not isinstance(data, dict) or set(data) != {"virtio", "config", "msix", "pci_cfg"}:
            raise StateError("", "not a mapping of virtio, config, msix, pci_cfg", name)
        config = self.config.check_state(data["config"])
        msix = self.msix.check_state(data["msix"])
        rest = state_from_data(
            _VirtioParts, {"virtio": data["virtio"], "pci_cfg": data["pci_cfg"]}, name
        )
        virtio = rest.virtio
        if len(virtio.queues) != self._num_queues:
            raise StateError("virtio.queues", f"not {self._num_queues} queues", name)
        for index, queue in enumerate(virtio.queues):
            if queue.size > self._common.max_queue_size:
                raise StateError(f"virtio.queues[{index}].size", "beyond the maximum", name)
            for vector in (queue.msix_vector,):
                if vector != NO_VECTOR and vector >= self._common.msix_vectors:
                    raise StateError(f"virtio.queues[{index}].msix_vector", "no such", name)
        vector = virtio.config_msix_vector
        if vector != NO_VECTOR and vector >= self._common.msix_vectors:
            raise StateError("virtio.config_msix_vector", "no such vector", name)
        return VirtioPciState(virtio=virtio, config=config, msix=msix, pci_cfg=rest.pci_cfg)

    def restore_state(self, state: VirtioPciState) -> None:
        """Restore, re-announce the INTx level and the bindings, and bring the backend to
        the restored status: reset, then activated if DRIVER_OK (without NEEDS_RESET)."""
        self.config.restore_state(state.config)
        self.msix.restore_state(state.msix)
        with self._lock:
            self._common.state = detached(state.virtio)
            self._pci_cfg.state = detached(state.pci_cfg)
            self._epoch += 1
            self._config_seen = None
            self._outbox.post(self._backend.reset)
            status = self._common.state.status
            if status & STATUS_DRIVER_OK and not status & STATUS_DEVICE_NEEDS_RESET:
                activate = (self._common.state.driver_features, self._common.queue_tuples())
                self._outbox.post(functools.partial(self._activate, self._epoch, *activate))
            self._update_intx_locked(force=True)  # the line lives outside: say its level
            self._outbox.post(self._sink.bindings_changed)
        self._outbox.flush()


@dataclass
class _VirtioParts:
    virtio: VirtioState
    pci_cfg: PciCfgWindowState
