"""The virtio-pci function (virtio 1.2 §4.1): PCI identity and capabilities, the driver's
initialisation through BAR0 (§3.1.1), notifications (§4.1.4.4), ISR and INTx (§4.1.4.5),
MSI-X (§4.1.5.1.2, PCI 3.0 §6.8.3.4), DEVICE_NEEDS_RESET (§2.1.2), the PCI_CFG window
(§4.1.4.9) and the state."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from kvm_devices.pci import config_space as pci
from kvm_devices.snapshot import StateError
from kvm_devices.testing import FakeVirtioBackend, RecordingVirtioSink
from kvm_devices.virtio import common_config as cc
from kvm_devices.virtio.constants import (
    BAR0_SIZE,
    COMMON_CFG_OFFSET,
    CONFIG_SOURCE,
    DEVICE_CFG_OFFSET,
    F_NOTIFICATION_DATA,
    F_RING_RESET,
    F_VERSION_1,
    ISR_OFFSET,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NO_VECTOR,
    NOTIFY_OFFSET,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from kvm_devices.virtio.pci_transport import VirtioPciFunction

BAR0_BASE = 0xFE00_0000
FEATURES = (1 << F_VERSION_1) | (1 << 9)
MSI_ADDRESS = 0xFEE0_0000
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_FUNCTION_MASK = 1 << 14


@dataclass
class Rig:
    function: VirtioPciFunction
    backend: FakeVirtioBackend
    sink: RecordingVirtioSink

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(COMMON_CFG_OFFSET + offset, size, value)

    def common_read(self, offset: int, size: int) -> int:
        return self.function.bar_read(COMMON_CFG_OFFSET + offset, size)

    @property
    def status(self) -> int:
        return self.common_read(cc.DEVICE_STATUS, 1)

    def capabilities(self) -> dict[int, int]:
        """Capability offset by virtio cfg_type (vendor-specific) or by PCI cap ID."""
        found = {}
        offset = self.function.config.read(pci.CAPABILITIES_POINTER, 1)
        while offset:
            cap_id = self.function.config.read(offset, 1)
            key = self.function.config.read(offset + 3, 1) if cap_id == 0x09 else 0x100 + cap_id
            found[key] = offset
            offset = self.function.config.read(offset + 1, 1)
        return found

    def msix_control(self, value: int) -> None:
        self.function.config.write(self.capabilities()[0x111] + 2, 2, value)

    def program_vector(self, vector: int, data: int, masked: bool) -> None:
        entry = MSIX_TABLE_OFFSET + 16 * vector
        self.function.bar_write(entry, 4, MSI_ADDRESS)
        self.function.bar_write(entry + 4, 4, 0)
        self.function.bar_write(entry + 8, 4, data)
        self.function.bar_write(entry + 12, 4, int(masked))

    def initialise(self, *, features: int = FEATURES, queue_vector: int | None = None) -> None:
        """The driver's sequence (§3.1.1), as Linux's virtio_pci_modern does it."""
        self.common_write(cc.DEVICE_STATUS, 1, 0)
        self.common_write(cc.DEVICE_STATUS, 1, 1)
        self.common_write(cc.DEVICE_STATUS, 1, 3)
        for select in (0, 1):
            self.common_write(cc.DRIVER_FEATURE_SELECT, 4, select)
            self.common_write(cc.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFF_FFFF)
        self.common_write(cc.DEVICE_STATUS, 1, 0xB)
        self.common_write(cc.QUEUE_SELECT, 2, 0)
        self.common_write(cc.QUEUE_SIZE, 2, 128)
        if queue_vector is not None:
            self.common_write(cc.QUEUE_MSIX_VECTOR, 2, queue_vector)
        for offset, address in ((cc.QUEUE_DESC, 0x10000), (cc.QUEUE_DRIVER, 0x11000)):
            self.common_write(offset, 4, address)
            self.common_write(offset + 4, 4, 0)
        self.common_write(cc.QUEUE_DEVICE, 8, 0x12000)
        self.common_write(cc.QUEUE_ENABLE, 2, 1)
        self.common_write(cc.DEVICE_STATUS, 1, 0xF)


def make(**backend_args: object) -> Rig:
    backend = FakeVirtioBackend(device_features=FEATURES, **backend_args)  # type: ignore[arg-type]
    sink = RecordingVirtioSink()
    function = VirtioPciFunction(
        backend, msix_vectors=3, interrupt_sink=sink, bar0_address=BAR0_BASE
    )
    function.config.write(pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_BUS_MASTER)
    return Rig(function, backend, sink)


# -- identity and capabilities ----------------------------------------------------------


@pytest.mark.parametrize(
    ("device_type", "device_id", "class_code"), [(2, 0x1042, 0x010000), (4, 0x1044, 0x00FF00)]
)
def test_pci_identity_is_a_modern_virtio_device(
    device_type: int, device_id: int, class_code: int
) -> None:
    # §4.1.2.1: device ID 0x1040 + type, revision >= 1; subsystem >= 0x40 (modern only).
    config = make(device_type=device_type).function.config
    assert config.read(pci.VENDOR_ID, 2) == 0x1AF4
    assert config.read(pci.DEVICE_ID, 2) == device_id
    assert config.read(pci.REVISION_ID, 1) == 1
    assert config.read(pci.CLASS_CODE, 4) & 0xFFFFFF == class_code
    assert config.read(pci.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert config.read(pci.SUBSYSTEM_ID, 2) == 0x40
    assert config.read(pci.INTERRUPT_PIN, 1) == 1


def test_bar0_is_a_64_bit_memory_bar_of_bar0_size() -> None:
    config = make().function.config
    config.write(pci.BAR0, 4, 0xFFFF_FFFF)
    config.write(pci.BAR0 + 4, 4, 0xFFFF_FFFF)
    assert config.read(pci.BAR0, 4) == (0x1_0000_0000 - BAR0_SIZE) | 0b100
    assert config.read(pci.BAR0 + 4, 4) == 0xFFFF_FFFF


def test_capabilities_describe_the_bar0_layout() -> None:
    # §4.1.4: struct virtio_pci_cap {cap_vndr, cap_next, cap_len, cfg_type, bar, id,
    # padding[2], offset, length}; the notify cap adds notify_off_multiplier.
    rig = make()
    config = rig.function.config
    caps = rig.capabilities()
    expected = {
        1: (16, COMMON_CFG_OFFSET, cc.COMMON_CFG_LENGTH),
        2: (20, NOTIFY_OFFSET, 2 * 4),
        3: (16, ISR_OFFSET, 1),
        4: (16, DEVICE_CFG_OFFSET, 8),
        5: (20, 0, 0),
    }
    for cfg_type, (cap_len, offset, length) in expected.items():
        at = caps[cfg_type]
        assert config.read(at + 2, 1) == cap_len
        assert config.read(at + 4, 1) == 0  # BAR0
        assert config.read(at + 8, 4) == offset
        assert config.read(at + 12, 4) == length
    assert config.read(caps[2] + 16, 4) == 4
    # The MSI-X capability: table size N-1, table and PBA in BAR0 at the contract's offsets.
    msix = caps[0x111]
    assert config.read(msix + 2, 2) == 2
    assert config.read(msix + 4, 4) == MSIX_TABLE_OFFSET
    assert config.read(msix + 8, 4) == MSIX_PBA_OFFSET


def test_a_device_without_configuration_has_no_device_cfg_capability() -> None:
    rig = make(device_type=4, config=bytearray())
    assert 4 not in rig.capabilities()
    assert {1, 2, 3, 5} <= set(rig.capabilities())


def test_transport_features_we_do_not_implement_are_never_offered() -> None:
    rig = make()
    rig.backend.device_features = FEATURES | (1 << F_NOTIFICATION_DATA) | (1 << F_RING_RESET)
    fresh = VirtioPciFunction(rig.backend, msix_vectors=1, interrupt_sink=rig.sink)
    fresh.bar_write(cc.DEVICE_FEATURE_SELECT, 4, 1)
    assert fresh.bar_read(cc.DEVICE_FEATURE, 4) == FEATURES >> 32


# -- initialisation, notifications ---------------------------------------------------


def test_driver_ok_activates_the_backend_with_the_queues() -> None:
    rig = make()
    rig.initialise()
    assert rig.backend.calls == [
        ("reset",),
        ("activate", FEATURES, [(128, 0x10000, 0x11000, 0x12000, True), (256, 0, 0, 0, False)]),
    ]
    assert rig.status == 0xF


def test_a_store_to_a_queues_notify_address_notifies_that_queue() -> None:
    rig = make()
    rig.initialise()
    rig.backend.calls.clear()
    assert rig.function.notify_address(1) == BAR0_BASE + NOTIFY_OFFSET + 4
    rig.function.bar_write(NOTIFY_OFFSET + 4, 2, 1)
    rig.function.bar_write(NOTIFY_OFFSET, 4, 0)
    rig.function.bar_write(NOTIFY_OFFSET + 2, 2, 0)  # not a queue's address
    rig.function.bar_write(NOTIFY_OFFSET + 8, 2, 2)  # no queue 2
    assert rig.backend.calls == [("notify", 1), ("notify", 0)]
    assert rig.function.bar_read(NOTIFY_OFFSET, 2) == 0


def test_notify_address_needs_bar0_mapped_and_decoding() -> None:
    rig = make()
    rig.function.config.write(pci.COMMAND, 2, 0)
    assert rig.function.notify_address(0) is None
    rig.function.config.write(pci.COMMAND, 2, pci.COMMAND_MEMORY)
    assert rig.function.notify_address(0) == BAR0_BASE + NOTIFY_OFFSET
    assert rig.function.notify_address(2) is None
    unmapped = VirtioPciFunction(FakeVirtioBackend(), msix_vectors=1, interrupt_sink=rig.sink)
    unmapped.config.write(pci.COMMAND, 2, pci.COMMAND_MEMORY)
    assert unmapped.notify_address(0) is None


# -- ISR and INTx ----------------------------------------------------------------------


def test_queue_interrupt_without_msix_sets_isr_and_holds_intx_until_isr_is_read() -> None:
    # §4.1.4.5.1: ISR bit 0 before a used buffer notification, INTx while set, cleared on read.
    rig = make()
    rig.initialise()
    rig.function.interrupt(0)
    assert rig.sink.intx_level
    assert rig.function.config.read(pci.STATUS, 2) & pci.STATUS_INTERRUPT
    rig.function.interrupt(1)
    assert rig.sink.calls.count(("intx", True)) == 1
    assert rig.function.bar_read(ISR_OFFSET, 1) == 1
    assert not rig.sink.intx_level
    assert not rig.function.config.read(pci.STATUS, 2) & pci.STATUS_INTERRUPT
    assert rig.function.bar_read(ISR_OFFSET, 1) == 0


def test_intx_disable_gates_the_line_not_the_status_bit() -> None:
    # PCI 3.0 §6.2.2 / §6.2.3: COMMAND bit 10 masks INTx#; STATUS bit 3 still reports it.
    rig = make()
    rig.initialise()
    rig.function.interrupt(0)
    command = pci.COMMAND_MEMORY | pci.COMMAND_BUS_MASTER
    rig.function.config.write(pci.COMMAND, 2, command | pci.COMMAND_INTX_DISABLE)
    assert not rig.sink.intx_level
    assert rig.function.config.read(pci.STATUS, 2) & pci.STATUS_INTERRUPT
    rig.function.config.write(pci.COMMAND, 2, command)
    assert rig.sink.intx_level


def test_interrupts_before_driver_ok_are_dropped() -> None:
    # §2.1.2: no used buffer notification before DRIVER_OK.
    rig = make()
    rig.function.interrupt(0)
    rig.function.interrupt(CONFIG_SOURCE)
    rig.function.interrupt(7)
    assert rig.function.bar_read(ISR_OFFSET, 1) == 0
    assert not rig.sink.calls
    assert rig.function.counters["dropped_interrupts"] == 3


def test_isr_other_bytes_read_0_and_do_not_clear() -> None:
    rig = make()
    rig.initialise()
    rig.function.interrupt(0)
    assert rig.function.bar_read(ISR_OFFSET + 1, 1) == 0
    assert rig.function.bar_read(ISR_OFFSET, 4) == 1


# -- MSI-X -------------------------------------------------------------------------------


def test_msix_masked_vector_goes_pending_and_fires_on_unmask() -> None:
    # PCI 3.0 §6.8.3.4: a masked vector's message is held pending, sent on unmask.
    rig = make()
    rig.program_vector(1, 0x41, masked=True)
    rig.msix_control(MSIX_CONTROL_ENABLE)
    rig.initialise(queue_vector=1)
    assert rig.function.binding(0) == ("python", None)
    rig.sink.calls.clear()
    rig.function.interrupt(0)
    assert rig.function.bar_read(MSIX_PBA_OFFSET, 8) == 0b10
    assert ("fire", 1) not in rig.sink.calls
    assert rig.function.bar_read(ISR_OFFSET, 1) == 0  # §4.1.4.5: ISR only without MSI-X
    rig.function.bar_write(MSIX_TABLE_OFFSET + 16 + 12, 4, 0)
    assert rig.sink.calls == [("vector", 1, MSI_ADDRESS, 0x41, False), ("bindings",), ("fire", 1)]
    assert rig.function.bar_read(MSIX_PBA_OFFSET, 8) == 0
    assert rig.function.binding(0) == ("msix", 1)
    assert not rig.sink.intx_level


def test_msix_unmasked_vector_fires_at_once() -> None:
    rig = make()
    rig.program_vector(0, 0x42, masked=False)
    rig.msix_control(MSIX_CONTROL_ENABLE)
    rig.initialise(queue_vector=0)
    rig.sink.calls.clear()
    rig.function.interrupt(0)
    assert rig.sink.calls == [("fire", 0)]


def test_binding_follows_enable_function_mask_and_the_vector_assignment() -> None:
    rig = make()
    rig.program_vector(0, 0x42, masked=False)
    rig.initialise(queue_vector=0)
    assert rig.function.binding(0) == ("python", None)  # MSI-X off: INTx
    rig.sink.calls.clear()
    rig.msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    assert ("bindings",) in rig.sink.calls
    assert rig.function.binding(0) == ("python", None)
    rig.msix_control(MSIX_CONTROL_ENABLE)
    assert rig.function.binding(0) == ("msix", 0)
    assert rig.function.binding(1) == ("python", None)  # queue 1 has NO_VECTOR
    assert rig.function.binding(CONFIG_SOURCE) == ("python", None)
    rig.sink.calls.clear()
    rig.common_write(cc.CONFIG_MSIX_VECTOR, 2, 0)
    assert rig.sink.calls == [("bindings",)]
    assert rig.function.binding(CONFIG_SOURCE) == ("msix", 0)


def test_enabling_msix_deasserts_a_pending_intx() -> None:
    rig = make()
    rig.initialise()
    rig.function.interrupt(0)
    assert rig.sink.intx_level
    rig.msix_control(MSIX_CONTROL_ENABLE)  # every vector still masked: no vector changes
    assert not rig.sink.intx_level


def test_msix_on_and_no_vector_drops_the_queue_interrupt() -> None:
    rig = make()
    rig.msix_control(MSIX_CONTROL_ENABLE)
    rig.initialise()
    rig.sink.calls.clear()
    rig.function.interrupt(0)
    assert rig.sink.calls == []
    assert rig.function.counters["dropped_interrupts"] == 1


def test_config_interrupt_sets_isr_bit_1_and_fires_the_config_vector() -> None:
    # §4.1.4.5.1: the configuration interrupt bit is set before the notification, MSI-X or not.
    rig = make()
    rig.program_vector(2, 0x43, masked=False)
    rig.msix_control(MSIX_CONTROL_ENABLE)
    rig.initialise()
    rig.common_write(cc.CONFIG_MSIX_VECTOR, 2, 2)
    rig.sink.calls.clear()
    rig.function.interrupt(CONFIG_SOURCE)
    assert rig.sink.calls == [("fire", 2)]
    assert rig.function.bar_read(ISR_OFFSET, 1) == 2


# -- DEVICE_NEEDS_RESET -----------------------------------------------------------------


def test_a_refused_activation_sets_needs_reset_and_interrupts() -> None:
    # §2.1.2: after setting DEVICE_NEEDS_RESET with DRIVER_OK set, a config change notification.
    rig = make(refuse_activation=True)
    rig.initialise()
    assert rig.status == 0xF | STATUS_DEVICE_NEEDS_RESET
    assert rig.sink.intx_level
    assert rig.function.bar_read(ISR_OFFSET, 1) == 2


def test_backend_needs_reset_is_seen_on_its_config_interrupt() -> None:
    rig = make()
    rig.initialise()
    rig.backend.needs_reset = True
    rig.function.interrupt(CONFIG_SOURCE)
    assert rig.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.function.bar_read(ISR_OFFSET, 1) == 2


def test_backend_needs_reset_is_seen_on_a_status_read_and_interrupts_once() -> None:
    rig = make()
    rig.initialise()
    rig.backend.needs_reset = True
    assert rig.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.sink.calls.count(("intx", True)) == 1


def test_driver_ok_without_features_ok_sets_needs_reset() -> None:
    rig = make()
    rig.initialise(features=FEATURES & ~(1 << F_VERSION_1))
    status = rig.status
    assert not status & STATUS_FEATURES_OK
    assert status & STATUS_DEVICE_NEEDS_RESET and status & STATUS_DRIVER_OK
    assert not any(call[0] == "activate" for call in rig.backend.calls)
    assert rig.sink.intx_level


def test_reset_clears_everything_and_resets_the_backend() -> None:
    rig = make(refuse_activation=True)
    rig.initialise(queue_vector=1)
    assert rig.sink.intx_level
    rig.backend.calls.clear()
    rig.sink.calls.clear()
    rig.common_write(cc.DEVICE_STATUS, 1, 0)
    assert rig.backend.calls == [("reset",)]
    assert rig.sink.calls == [("intx", False), ("bindings",)]
    assert rig.status == 0
    assert rig.function.bar_read(ISR_OFFSET, 1) == 0
    assert rig.common_read(cc.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    assert rig.common_read(cc.QUEUE_ENABLE, 2) == 0
    assert (
        rig.function.save_state().virtio
        == cc.CommonConfig(
            device_features=FEATURES, num_queues=2, max_queue_size=256, msix_vectors=3
        ).initial_state()
    )


def test_an_activation_failing_after_a_reset_does_not_mark_the_new_device() -> None:
    rig = make(refuse_activation=True)
    # The driver resets while activate() is still running (another vCPU).
    rig.backend.during_activate = lambda: rig.common_write(cc.DEVICE_STATUS, 1, 0)
    rig.initialise()
    assert rig.status == 0


# -- device configuration ------------------------------------------------------------


def test_device_configuration_reads_and_writes_the_backend() -> None:
    rig = make()
    assert rig.function.bar_read(DEVICE_CFG_OFFSET, 4) == 0x04030201
    assert rig.function.bar_read(DEVICE_CFG_OFFSET + 6, 4) == 0  # beyond its 8 bytes
    rig.function.bar_write(DEVICE_CFG_OFFSET + 4, 1, 0xAA)
    assert rig.backend.config[4] == 0xAA
    rig.function.bar_write(DEVICE_CFG_OFFSET + 7, 2, 0xFFFF)
    assert rig.backend.config[7] == 8


def test_config_generation_changes_when_the_configuration_changed_since_read() -> None:
    # §4.1.4.3.2: a changed config_generation after a read of a changed value.
    rig = make()
    generation = rig.common_read(cc.CONFIG_GENERATION, 1)
    rig.function.bar_read(DEVICE_CFG_OFFSET, 4)
    assert rig.common_read(cc.CONFIG_GENERATION, 1) == generation
    rig.backend.config[6] = 0x77  # the device changes a byte the driver did not read
    rig.function.bar_read(DEVICE_CFG_OFFSET, 4)
    assert rig.common_read(cc.CONFIG_GENERATION, 1) == generation + 1
    rig.function.bar_read(DEVICE_CFG_OFFSET, 4)
    assert rig.common_read(cc.CONFIG_GENERATION, 1) == generation + 1


# -- the PCI_CFG window --------------------------------------------------------------


def test_pci_cfg_window_reads_and_writes_bar0() -> None:
    # §4.1.4.9.1: pci_cfg_data accesses cap.length bytes at cap.offset of BAR cap.bar.
    rig = make()
    config = rig.function.config
    cap = rig.capabilities()[5]
    config.write(cap + 4, 1, 0)
    config.write(cap + 8, 4, COMMON_CFG_OFFSET + cc.NUM_QUEUES)
    config.write(cap + 12, 4, 2)
    assert config.read(cap + 16, 4) == 2
    config.write(cap + 8, 4, COMMON_CFG_OFFSET + cc.DEVICE_STATUS)
    config.write(cap + 12, 4, 1)
    config.write(cap + 16, 1, 1)
    assert rig.status == 1
    # Misaligned (2 bytes at an odd offset): the BAR is not touched, pci_cfg_data keeps
    # what the driver wrote.
    config.write(cap + 8, 4, COMMON_CFG_OFFSET + cc.DEVICE_STATUS - 1)
    config.write(cap + 12, 4, 2)
    config.write(cap + 16, 2, 3)
    assert rig.status == 1
    assert config.read(cap + 16, 2) == 3
    assert config.read(cap + 2, 2) == 0x0514  # cap_len and cfg_type stay read-only
    config.write(cap + 2, 2, 0)
    assert config.read(cap + 2, 2) == 0x0514


# -- state ---------------------------------------------------------------------------


def test_state_round_trip_restores_registers_msix_and_the_backend() -> None:
    rig = make()
    rig.program_vector(1, 0x45, masked=True)
    rig.msix_control(MSIX_CONTROL_ENABLE)
    rig.initialise(queue_vector=1)
    rig.function.interrupt(0)  # pending in the PBA
    rig.function.interrupt(CONFIG_SOURCE)  # ISR bit 1
    cap = rig.capabilities()[5]
    rig.function.config.write(cap + 8, 4, 0x14)
    data = json.loads(json.dumps(rig.function.save()))

    other = make()
    other.function.restore(data)
    assert other.function.save() == data
    assert other.status == 0xF
    assert other.function.bar_read(MSIX_PBA_OFFSET, 8) == 0b10
    assert other.backend.calls == [
        ("reset",),
        ("activate", FEATURES, [(128, 0x10000, 0x11000, 0x12000, True), (256, 0, 0, 0, False)]),
    ]
    assert ("bindings",) in other.sink.calls
    assert other.sink.calls[-1] == ("bindings",)
    assert ("intx", False) in other.sink.calls  # MSI-X on: the line is said to be low
    assert other.function.binding(0) == ("python", None)


def test_restored_intx_level_is_announced() -> None:
    rig = make()
    rig.initialise()
    rig.function.interrupt(0)
    other = make()
    other.function.restore(rig.function.save())
    assert other.sink.intx_level
    assert other.function.config.read(pci.STATUS, 2) & pci.STATUS_INTERRUPT


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("virtio", "queues"), []),
        (("virtio", "config_msix_vector"), 3),
        (("virtio", "status"), 0x100),
        (("msix", "enabled"), 1),
    ],
)
def test_check_state_refuses_a_state_of_another_function(
    path: tuple[str, str], value: object
) -> None:
    rig = make()
    data = rig.function.save()
    part = data[path[0]]
    assert isinstance(part, dict)
    part[path[1]] = value
    before = rig.function.save()
    with pytest.raises(StateError):
        rig.function.restore(data)
    assert rig.function.save() == before
