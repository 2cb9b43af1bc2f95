"""virtio-net on a Machine, in a network namespace of the test's own: the PCI function,
the record a snapshot rebuilds it from, the TAP released by close(), and --net's errors."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvm_vmm.cli import main
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.snapshot.disks import rebuild_records
from kvmfast.netns import Namespace, netns_unavailable_reason, private_netns
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

MAC = "52:54:00:12:34:56"


@pytest.fixture
def netns() -> Iterator[Namespace]:
    require_kvm()
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with private_netns("kvm-vmm-net") as namespace:
        yield namespace


def test_a_net_device_is_a_virtio_net_function_rebuilt_from_its_record(
    netns: Namespace, tmp_path: Path
) -> None:
    with Machine(MachineConfig()) as machine:
        with netns.inside():
            attached = machine.add_net(tap="kvmt0", mac=MAC)
        vendor_device = machine.platform.pci_bus.config_read(0, attached.slot, 0, 0, 4)
        assert (vendor_device & 0xFFFF, vendor_device >> 16) == (0x1AF4, 0x1041)
        assert machine.devices["virtio-net"] is attached.transport
        assert " kvmt0:" in netns.links()
        record = machine._device_record("virtio-net")
        assert record == {"name": "virtio-net", "kind": "virtio-net", "tap": "kvmt0", "mac": MAC}
        assert rebuild_records(tmp_path, [record], force=False) == [record]
    # close() let go of the TAP (the event loop's watch too): the kernel removed it.
    assert " kvmt0:" not in netns.links()
    with Machine(MachineConfig()) as again:
        with netns.inside():
            again._rebuild_device(record)
        rebuilt = again.devices["virtio-net"]
        assert again._device_record("virtio-net") == record
        mac = bytes.fromhex(MAC.replace(":", ""))
        config = rebuilt.bar_read(0x2000, 4) | rebuilt.bar_read(0x2004, 2) << 32
        assert config == int.from_bytes(mac, "little")  # virtio_net_config.mac


def test_a_kernel_named_tap_is_recorded_by_its_name(netns: Namespace) -> None:
    with Machine(MachineConfig()) as machine, netns.inside():
        attached = machine.add_net()
        name = attached.device.tap_name
        assert name is not None and attached.device.mac is not None
        assert machine._device_record("virtio-net")["tap"] == name


def test_the_cli_names_a_bad_net_and_exits_2(netns: Namespace) -> None:
    netns.ip("tuntap", "add", "dev", "kvmtun0", "mode", "tun")
    for spec, message in [
        ("tap=kvmt0,queues=4", "no multi-queue"),
        ("tap=kvmtun0", "TAP kvmtun0: not a TAP interface"),
    ]:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), netns.inside():
            status = main(["demo", "--tiny", "--net", spec, "--serial", "null"])
        assert status == 2
        assert message in stderr.getvalue()


def test_the_cli_prints_the_name_of_a_tap_the_kernel_made(netns: Namespace) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), netns.inside():
        status = main(["demo", "--tiny", "--net", f"mac={MAC}", "--serial", "null"])
    assert status == 0
    assert re.search(rf"virtio-net on TAP tap\d+ \(MAC {MAC}\)", stderr.getvalue())
