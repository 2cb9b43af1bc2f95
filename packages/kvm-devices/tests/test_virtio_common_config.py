"""The common configuration structure and status machine (virtio 1.2 §4.1.4.3, §2.1, §3.1.1)."""

from __future__ import annotations

import pytest

from kvm_devices.virtio import common_config as cc
from kvm_devices.virtio.common_config import CommonConfig, Effects
from kvm_devices.virtio.constants import (
    F_RING_EVENT_IDX,
    F_RING_PACKED,
    F_VERSION_1,
    NO_VECTOR,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
)

FEATURES = (1 << F_VERSION_1) | (1 << F_RING_EVENT_IDX) | 0b101


def make(**kwargs: int) -> CommonConfig:
    args = {"device_features": FEATURES, "num_queues": 2, "max_queue_size": 256, "msix_vectors": 3}
    args.update(kwargs)
    return CommonConfig(**args)


def negotiate(common: CommonConfig, features: int = FEATURES) -> Effects:
    common.write(cc.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE)
    common.write(cc.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for select in (0, 1):
        common.write(cc.DRIVER_FEATURE_SELECT, 4, select)
        common.write(cc.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFF_FFFF)
    return common.write(
        cc.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    )


def setup_queue(common: CommonConfig, queue: int, size: int = 64, base: int = 0x10000) -> None:
    common.write(cc.QUEUE_SELECT, 2, queue)
    common.write(cc.QUEUE_SIZE, 2, size)
    # 64-bit fields as two 32-bit halves, the way Linux's vp_iowrite64_twopart writes them.
    common.write(cc.QUEUE_DESC, 4, base & 0xFFFF_FFFF)
    common.write(cc.QUEUE_DESC + 4, 4, base >> 32)
    common.write(cc.QUEUE_DRIVER, 8, base + 0x1000)
    common.write(cc.QUEUE_DEVICE, 4, (base + 0x2000) & 0xFFFF_FFFF)
    common.write(cc.QUEUE_DEVICE + 4, 4, (base + 0x2000) >> 32)
    common.write(cc.QUEUE_ENABLE, 2, 1)


def test_device_feature_window_presents_32_bits_per_select_and_0_beyond() -> None:
    # §4.1.4.3.2: bits starting at device_feature_select * 32; 0 for selects other than 0/1.
    common = make()
    assert common.read(cc.DEVICE_FEATURE, 4) == FEATURES & 0xFFFF_FFFF
    common.write(cc.DEVICE_FEATURE_SELECT, 4, 1)
    assert common.read(cc.DEVICE_FEATURE, 4) == FEATURES >> 32 == 1
    common.write(cc.DEVICE_FEATURE_SELECT, 4, 7)
    assert common.read(cc.DEVICE_FEATURE, 4) == 0
    assert common.read(cc.DEVICE_FEATURE_SELECT, 4) == 7


def test_driver_feature_window_reads_back_per_select() -> None:
    common = make()
    common.write(cc.DRIVER_FEATURE, 4, 0x5)
    common.write(cc.DRIVER_FEATURE_SELECT, 4, 1)
    common.write(cc.DRIVER_FEATURE, 4, 0x1)
    assert common.read(cc.DRIVER_FEATURE, 4) == 1
    common.write(cc.DRIVER_FEATURE_SELECT, 4, 0)
    assert common.read(cc.DRIVER_FEATURE, 4) == 5
    assert common.state.driver_features == (1 << 32) | 5


def test_features_ok_is_kept_for_a_subset_with_version_1() -> None:
    common = make()
    negotiate(common, (1 << F_VERSION_1) | 1)
    assert common.read(cc.DEVICE_STATUS, 1) & STATUS_FEATURES_OK
    # §3.1.1: once accepted, the features are fixed.
    common.write(cc.DRIVER_FEATURE, 4, 0)
    assert common.state.driver_features == (1 << F_VERSION_1) | 1


@pytest.mark.parametrize(
    "features",
    [
        FEATURES & ~(1 << F_VERSION_1),  # §6.1: a modern device needs VERSION_1
        FEATURES | (1 << 1),  # a bit the device never offered
    ],
)
def test_features_ok_is_refused_otherwise(features: int) -> None:
    # §3.1.1 step 6: the device refuses by leaving FEATURES_OK clear on re-read.
    common = make()
    negotiate(common, features)
    assert common.read(cc.DEVICE_STATUS, 1) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert common.counters["refused_features"] == 1
    # DRIVER_OK without FEATURES_OK breaks the driver's rules: NEEDS_RESET, no activation.
    effects = common.write(
        cc.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK
    )
    assert effects.activate is None and effects.needs_reset
    assert common.read(cc.DEVICE_STATUS, 1) & STATUS_DEVICE_NEEDS_RESET


def test_driver_ok_activates_with_every_queue_tuple() -> None:
    common = make()
    negotiate(common)
    setup_queue(common, 0, 64, 0x1_0000_0000)
    effects = common.write(cc.DEVICE_STATUS, 1, 0xF)
    assert effects.activate == (
        FEATURES,
        [(64, 0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000, True), (256, 0, 0, 0, False)],
    )
    assert common.read(cc.DEVICE_STATUS, 1) == 0xF


def test_clearing_a_status_bit_sets_needs_reset_and_only_reset_or_failed_is_taken_after() -> None:
    # §2.1.1: "The driver MUST NOT clear a device status bit."
    common = make()
    negotiate(common)
    effects = common.write(cc.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE)
    assert effects.needs_reset
    status = common.read(cc.DEVICE_STATUS, 1)
    assert status & STATUS_DEVICE_NEEDS_RESET
    assert common.write(cc.DEVICE_STATUS, 1, status | STATUS_DRIVER_OK).activate is None
    common.write(cc.DEVICE_STATUS, 1, status | STATUS_FAILED)
    assert common.read(cc.DEVICE_STATUS, 1) == status | STATUS_FAILED


def test_the_driver_cannot_set_needs_reset() -> None:
    common = make()
    common.write(cc.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET)
    assert common.read(cc.DEVICE_STATUS, 1) == STATUS_ACKNOWLEDGE


def test_writing_zero_resets_everything() -> None:
    # §4.1.4.3.2: reset on 0, queue_enable 0 after it; §4.1.5.1.2: every event unmapped.
    common = make()
    negotiate(common)
    setup_queue(common, 1)
    common.write(cc.QUEUE_MSIX_VECTOR, 2, 2)
    common.write(cc.CONFIG_MSIX_VECTOR, 2, 1)
    common.write(cc.DEVICE_STATUS, 1, 0xF)
    common.state.isr = 3
    effects = common.write(cc.DEVICE_STATUS, 1, 0)
    assert effects.reset and effects.vectors_changed
    assert common.state == common.initial_state()
    assert common.read(cc.DEVICE_STATUS, 1) == 0
    common.write(cc.QUEUE_SELECT, 2, 1)
    assert common.read(cc.QUEUE_ENABLE, 2) == 0
    assert common.read(cc.QUEUE_SIZE, 2) == 256
    assert common.read(cc.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    assert common.read(cc.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR


@pytest.mark.parametrize("size", [0, 3, 100, 512, 0xFFFF])
def test_queue_size_not_a_power_of_two_or_too_big_is_ignored(size: int) -> None:
    # §4.1.4.3.2: the driver MUST NOT write a size that is not a power of 2 (split rings).
    common = make()
    common.write(cc.QUEUE_SIZE, 2, 128)
    common.write(cc.QUEUE_SIZE, 2, size)
    assert common.read(cc.QUEUE_SIZE, 2) == 128
    assert common.counters["ignored_writes"] == 1
    assert not common.read(cc.DEVICE_STATUS, 1) & STATUS_DEVICE_NEEDS_RESET


def test_packed_rings_take_any_size_up_to_the_maximum() -> None:
    common = make(device_features=FEATURES | (1 << F_RING_PACKED))
    negotiate(common, FEATURES | (1 << F_RING_PACKED))
    common.write(cc.QUEUE_SIZE, 2, 100)
    assert common.read(cc.QUEUE_SIZE, 2) == 100


def test_queue_select_beyond_the_queues_reads_size_0_and_ignores_writes() -> None:
    common = make()
    common.write(cc.QUEUE_SELECT, 2, 2)
    assert common.read(cc.QUEUE_SIZE, 2) == 0
    assert common.read(cc.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    common.write(cc.QUEUE_ENABLE, 2, 1)
    assert common.read(cc.QUEUE_ENABLE, 2) == 0
    assert common.read(cc.NUM_QUEUES, 2) == 2


def test_queue_notify_off_is_the_queue_index() -> None:
    common = make()
    common.write(cc.QUEUE_SELECT, 2, 1)
    assert common.read(cc.QUEUE_NOTIFY_OFF, 2) == 1


def test_an_enabled_queue_keeps_its_configuration_and_cannot_be_disabled() -> None:
    common = make()
    setup_queue(common, 0, 64, 0x4000)
    common.write(cc.QUEUE_SIZE, 2, 32)
    common.write(cc.QUEUE_DESC, 8, 0x8000)
    common.write(cc.QUEUE_ENABLE, 2, 0)  # §4.1.4.3.2: the driver MUST NOT write 0
    assert common.queue_tuples()[0] == (64, 0x4000, 0x5000, 0x6000, True)


def test_queues_cannot_be_enabled_after_driver_ok() -> None:
    common = make()
    negotiate(common)
    common.write(cc.DEVICE_STATUS, 1, 0xF)
    common.write(cc.QUEUE_ENABLE, 2, 1)
    assert common.read(cc.QUEUE_ENABLE, 2) == 0


def test_a_vector_beyond_the_table_reads_no_vector() -> None:
    # §4.1.5.1.2.1: mapping failures read back as NO_VECTOR.
    common = make()
    assert common.write(cc.CONFIG_MSIX_VECTOR, 2, 2).vectors_changed
    assert common.read(cc.CONFIG_MSIX_VECTOR, 2) == 2
    common.write(cc.QUEUE_MSIX_VECTOR, 2, 3)
    assert common.read(cc.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    assert not common.write(cc.QUEUE_MSIX_VECTOR, 2, 0x7FF).vectors_changed
    assert common.vector_of(-1) == 2 and common.vector_of(0) == NO_VECTOR


def test_reads_of_any_width_give_the_structure_bytes() -> None:
    common = make()
    common.write(cc.QUEUE_SELECT, 2, 1)
    # num_queues (2) then device_status (0) and config_generation (0), then queue_select.
    assert common.read(cc.NUM_QUEUES, 8) == 2 | (1 << 32) | (256 << 48)
    assert common.read(cc.QUEUE_SIZE + 1, 1) == 1
    assert common.read(cc.COMMON_CFG_LENGTH - 2, 4) == 0
    assert common.read(cc.COMMON_CFG_LENGTH, 4) == 0
    assert common.read(0, 3) == 0


def test_writes_of_the_wrong_width_are_ignored() -> None:
    common = make()
    common.write(cc.DEVICE_STATUS, 2, 1)
    common.write(cc.QUEUE_SELECT, 1, 1)
    common.write(cc.QUEUE_DESC + 2, 4, 1)
    assert common.read(cc.DEVICE_STATUS, 1) == 0
    assert common.read(cc.QUEUE_SELECT, 2) == 0
    assert common.read(cc.QUEUE_DESC, 8) == 0
    assert common.counters["ignored_writes"] == 3
