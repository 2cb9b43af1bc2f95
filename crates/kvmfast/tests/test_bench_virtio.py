"""kvmfast.bench_virtio measures what it says: every request of ours went through the
device into the used ring (and read the image), the floor touched no ring, and the
ratio is ours over the floor run just before it. Speed is not checked here."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from kvmfast import Kvm, bench_host, bench_virtio
from kvmfast.bench_virtio import (
    QUEUE_SIZE,
    check_completed,
    make_image,
    new_request_guest,
    run_benchmark,
)

# More than three turns of the avail ring: the guest's index wraps the queue.
REQUESTS = 3 * QUEUE_SIZE + 5


@pytest.mark.kvm
def test_a_short_run_reports_both_paths_and_the_used_ring_advanced_once_per_request(
    kvm: Kvm, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler (cc) to build the floor's eventfd_relay.c")
    assert bench_virtio.main(["--requests", str(REQUESTS), "--repeat", "2"]) == 0
    report = cast(dict[str, Any], json.loads(capsys.readouterr().out))
    ours, floor, ratio = report["ours"], report["floor"], report["ratio"]
    assert (report["requests"], report["repeat"], report["data_bytes"]) == (REQUESTS, 2, 512)
    assert ours["used_ring_advanced"] == ours["device_requests"] == REQUESTS
    assert floor["used_ring_advanced"] == floor["device_requests"] == 0
    # The doorbell is an ioeventfd and the MSI an irqfd: the only exit ends the run.
    assert ours["guest_exits"] == floor["guest_exits"] == 1
    for path in (ours, floor):
        assert len(path["ns_per_request_runs"]) == 2
        assert path["ns_per_request"] > 0 and path["host_cpu_ns_per_request"] >= 0
    assert ours["host_run_ns_per_request"] is None or ours["host_run_ns_per_request"] > 0
    low, high = ratio["range"]
    assert len(ratio["ratios"]) == 2 and (min(ratio["ratios"]), max(ratio["ratios"])) == (
        low,
        high,
    )
    assert 0 < low <= ratio["ours_to_floor"] <= high
    assert ratio["target"] == 1.2
    assert ratio["target_met"] == (ratio["ours_to_floor"] <= 1.2)
    assert report["host_pread"]["ns_per_pread"] > 0
    assert report["host_pread"]["measured_with"].startswith("C")
    machine = report["machine"]
    assert {"cpu_model", "kernel", "ioeventfd_any_length", "load_average"} <= set(machine)


@pytest.mark.kvm
def test_without_a_compiler_ours_still_runs_and_no_ratio_is_claimed(
    kvm: Kvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_host.shutil, "which", lambda name: None)
    warnings: list[str] = []
    report = run_benchmark(REQUESTS, repeat=1, data_bytes=4096, warn=warnings.append)
    ours = cast(dict[str, Any], report["ours"])
    assert ours["used_ring_advanced"] == ours["device_requests"] == REQUESTS
    assert report["floor"] is None
    assert "no C compiler" in cast(dict[str, str], report["ratio"])["skipped"]
    assert any("no C compiler" in warning for warning in warnings)
    pread = cast(dict[str, Any], report["host_pread"])
    assert pread["measured_with"] == "Python os.pread" and pread["bytes"] == 4096


@pytest.mark.kvm
def test_a_request_the_device_did_not_complete_is_an_error(kvm: Kvm, tmp_path: Path) -> None:
    """The check behind every run of ours: status byte OK and sector 0 in the buffer."""
    image = tmp_path / "disk.img"
    make_image(image)
    guest = new_request_guest(kvm, 1, 512)
    with guest.vm as vm:
        with pytest.raises(RuntimeError, match="did not read sector 0"):
            check_completed(vm, image, 512)
        vm.write(bench_virtio.STATUS_AT, b"\x00")
        with pytest.raises(RuntimeError, match="did not read sector 0"):
            check_completed(vm, image, 512)
        vm.write(bench_virtio.DATA_AT, image.read_bytes()[:512])
        check_completed(vm, image, 512)


def test_a_threads_cpu_time_is_read_from_proc_and_grows_while_it_runs() -> None:
    """How the I/O thread's time is taken, tried on this thread: found by its name, its
    utime + stime and its schedstat time grow by the CPU time it spent (user-mode work
    here, so a misread field shows)."""
    tid = threading.get_native_id()
    name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    assert tid in bench_host.threads_named(name)
    start = time.thread_time_ns()
    before = bench_host.thread_cpu(tid)
    total = 0
    while time.thread_time_ns() - start < 200_000_000:
        for value in range(100_000):
            total += value
    after = bench_host.thread_cpu(tid)
    spent = time.thread_time_ns() - start
    # Two reads of clock ticks (10 ms at most: USER_HZ >= 100) and a little slack.
    assert abs((after.cpu_ns - before.cpu_ns) - spent) <= 30_000_000
    if before.run_ns is not None and after.run_ns is not None:
        assert abs((after.run_ns - before.run_ns) - spent) <= 5_000_000
