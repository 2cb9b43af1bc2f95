"""kvm_vmm.bench_net's network namespace: made with its loopback up, named where the
run inside looks for it, and gone afterwards, also when the run inside fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvm_vmm.bench_net_netns import (
    NamespaceUnavailable,
    interface_statistics,
    network_namespace,
    unavailable_reason,
)


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


@pytest.fixture
def name() -> str:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return f"kvm-vmm-test-bench-net-{os.getpid()}"


def test_the_namespace_has_its_loopback_up_and_is_deleted_at_the_end(name: str) -> None:
    with network_namespace(name) as netns:
        assert name in namespaces()
        links = subprocess.run(
            netns.exec_command(["ip", "-o", "link", "show", "lo"]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "state UNKNOWN" in links or ",UP" in links
        # The only interface inside is its loopback: nothing of the host's.
        shown = subprocess.run(
            netns.exec_command(["ls", "/sys/class/net"]), capture_output=True, text=True
        ).stdout
        assert shown.split() == ["lo"]
    assert name not in namespaces()


def test_the_namespace_is_deleted_when_the_run_inside_fails(name: str) -> None:
    with pytest.raises(RuntimeError, match="inside"), network_namespace(name):
        raise RuntimeError("the run inside failed")
    assert name not in namespaces()


def test_a_name_in_use_is_refused_and_the_namespace_left_as_it_was(name: str) -> None:
    with network_namespace(name):
        with pytest.raises(NamespaceUnavailable, match="netns add"), network_namespace(name):
            pass
        assert name in namespaces()
    assert name not in namespaces()


def test_a_process_run_inside_knows_the_namespace_and_its_taps_statistics(name: str) -> None:
    probe = (
        "from kvm_vmm.bench_net_netns import current_namespace, interface_statistics;"
        "print(current_namespace()); print(interface_statistics('lo')['rx_packets'] >= 0)"
    )
    with network_namespace(name) as netns:
        done = subprocess.run(
            netns.exec_command([sys.executable, "-c", probe]),
            capture_output=True,
            text=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [name, "True"]


def test_interface_statistics_reads_every_counter(tmp_path: Path) -> None:
    statistics = tmp_path / "nbtap0" / "statistics"
    statistics.mkdir(parents=True)
    (statistics / "rx_packets").write_text("12\n")
    (statistics / "tx_bytes").write_text("3400\n")
    assert interface_statistics("nbtap0", tmp_path) == {"rx_packets": 12, "tx_bytes": 3400}
