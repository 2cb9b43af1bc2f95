"""virtio-vsock on a Machine: the PCI function, the record a snapshot rebuilds it from
(and a restore that does), the socket made 0600 and removed by close(), and --vsock's
errors. The device's protocol is tested in crates/kvmfast/tests/test_virtio_vsock.py."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvmfast
from kvm_devices.virtio.pci_transport import VirtioPciFunction
from kvm_vmm.cli import main
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.snapshot.disks import rebuild_records
from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm


@pytest.fixture
def uds() -> Iterator[Path]:
    # sun_path holds 107 bytes: pytest's tmp_path may be longer.
    directory = Path(f"/tmp/kvm-vmm-vsock-{os.getpid()}")
    directory.mkdir()
    yield directory / "v.sock"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def test_a_vsock_device_is_a_virtio_vsock_function_rebuilt_from_its_record(
    uds: Path, tmp_path: Path
) -> None:
    require_kvm()
    with Machine(MachineConfig()) as machine:
        attached = machine.add_vsock(7, uds)
        vendor_device = machine.platform.pci_bus.config_read(0, attached.slot, 0, 0, 4)
        assert (vendor_device & 0xFFFF, vendor_device >> 16) == (0x1AF4, 0x1040 + 19)
        assert uds.stat().st_mode & 0o777 == 0o600
        record = machine._device_record("virtio-vsock")
        assert record == {
            "name": "virtio-vsock",
            "kind": "virtio-vsock",
            "cid": 7,
            "socket": str(uds),
        }
        assert rebuild_records(tmp_path, [record], force=False) == [record]
        # The host side listens while the guest has no driver yet.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(uds))
        with pytest.raises(kvmfast.VirtioError, match="in use"):
            machine.add_vsock(8, uds)
    assert not uds.exists(), "close() removes the socket"
    with Machine(MachineConfig()) as again:
        again._rebuild_device(record)
        rebuilt = again.devices["virtio-vsock"]
        assert isinstance(rebuilt, VirtioPciFunction)
        config = rebuilt.bar_read(0x2000, 4) | rebuilt.bar_read(0x2004, 4) << 32
        assert config == 7  # virtio_vsock_config.guest_cid
        assert uds.exists()


def test_a_snapshot_of_a_machine_with_vsock_is_restored_with_it(uds: Path, tmp_path: Path) -> None:
    require_kvm()
    snapshot = tmp_path / "snap"
    with Machine(MachineConfig()) as machine:
        machine.add_vsock(9, uds)
        machine.snapshot(snapshot)
    with Machine.restore(snapshot) as restored:
        assert restored._device_record("virtio-vsock")["cid"] == 9
        assert uds.exists()
    assert not uds.exists()


def test_the_cli_names_a_bad_vsock_and_exits_2(uds: Path) -> None:
    require_kvm()
    uds.write_bytes(b"")
    for arguments, message in [
        (["--vsock", "cid=2,socket=/tmp/x"], "reserved"),
        (["--vsock", f"cid=3,socket={uds}"], "in use"),
        (["--vsock", "cid=3,socket=/tmp/a", "--vsock", "cid=4,socket=/tmp/b"], "one device"),
    ]:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(["demo", "--tiny", *arguments, "--serial", "null"])
        assert status == 2
        assert message in stderr.getvalue()


def test_the_cli_runs_a_guest_with_vsock_and_removes_the_socket(uds: Path) -> None:
    require_kvm()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["demo", "--tiny", "--vsock", f"cid=3,socket={uds}", "--serial", "null"])
    assert status == 0, stderr.getvalue()
    assert not uds.exists()
