"""How runs end, and the exit status a harness reads for each.

A guest that does not end: ``--timeout`` and SIGTERM stop it and say where it was.
As QEMU's monitor does with ``info registers`` after a stop, kvm-vmm prints each
vCPU's RIP, the symbol there when ``--symbols`` names one, and the CPL; the exit
status is timeout(1)'s 124 or 128 + the signal's number. A guest that crashes the
machine ends with 4, a status no isa-debug-exit write ((v << 1) | 1, odd) and no
power-off (0) can produce.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests.multiboot import QEMU_TEST_DEVICES, KernelBuilder, KernelRunner

pytestmark = pytest.mark.kvm

POSITION = re.compile(
    r"vCPU 0: RIP (0x[0-9a-f]+) \((spin_forever\+0x[0-9a-f]+/0x[0-9a-f]+)\) CPL 0"
)


def system_map(kernel: Path) -> Path:
    """System.map of a test kernel (its ELF sits beside the image), as ``nm -n`` writes it."""
    elf = kernel.with_suffix(".elf")
    listing = subprocess.run(["nm", "-n", str(elf)], capture_output=True, text=True, check=True)
    path = kernel.with_suffix(".map")
    path.write_text(listing.stdout)
    return path


def test_a_timeout_reports_each_vcpus_position_and_status_124(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    kernel = kernels.build("spin")
    run = runner.run(kernel, "--timeout", "1", "--symbols", str(system_map(kernel)))
    assert run.status == 124, run.describe()
    assert "spinning" in run.serial
    assert "timed out after 1.0 s" in run.stderr
    assert POSITION.search(run.stderr), run.describe()


def test_sigterm_ends_the_run_cleanly_with_status_143(
    kernels: KernelBuilder, tmp_path: Path
) -> None:
    kernel = kernels.build("spin")
    serial = tmp_path / "com1.txt"
    command = [sys.executable, "-c", "from kvm_vmm.cli import main; raise SystemExit(main())"]
    command += ["run", "--kernel", str(kernel), *QEMU_TEST_DEVICES, "--stats"]
    command += ["--serial", f"file:{serial}", "--symbols", str(system_map(kernel))]
    with subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        deadline = time.monotonic() + 30
        while not (serial.exists() and "spinning" in serial.read_text()):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the kernel never printed"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated by SIGTERM" in stderr
    assert POSITION.search(stderr), stderr
    assert '"exits"' in stderr  # --stats still printed


def test_profile_finds_where_the_guest_spins(kernels: KernelBuilder, runner: KernelRunner) -> None:
    kernel = kernels.build("spin")
    run = runner.run(
        kernel, "--timeout", "2", "--profile", "500", "--symbols", str(system_map(kernel))
    )
    assert run.status == 124, run.describe()
    total = re.search(r"profile: (\d+) samples", run.stderr)
    assert total is not None, run.describe()
    # ~500 a second for two seconds; a tenth of that on a loaded 2-CPU host (the
    # sampler and the vCPU share it). The first lines belong to the spin loop.
    assert int(total.group(1)) >= 100, run.describe()
    top = re.search(r"profile: \d+ samples\n\s+([\d.]+)%\s+\d+\s+(\S+)", run.stderr)
    assert top is not None, run.describe()
    assert top.group(2) == "spin_forever" and float(top.group(1)) > 90, run.describe()


def test_a_triple_fault_ends_with_status_4_which_no_debug_exit_write_gives(
    kernels: KernelBuilder, runner: KernelRunner
) -> None:
    run = runner.run(kernels.build("triple_fault"))
    assert run.status == 4, run.describe()
    assert run.status % 2 == 0 and run.status != 0  # not (v << 1) | 1, not a power-off
    assert "faulting" in run.serial
    assert "vCPU 0: triple fault (status 4)" in run.stderr, run.describe()
