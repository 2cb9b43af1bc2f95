"""Several vCPUs: APs started by the guest's INIT, SIPI, SIPI, IOAPIC destinations reaching them.

Intel SDM Vol. 3A 8.4.4 (MP initialization: the APs wait for a SIPI, in KVM_RUN
with the LAPIC in the kernel), 10.6.2 (physical and flat logical destinations);
82093AA datasheet section 3.2.4 (Destination Mode, Destination Field).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from guests.multiboot import QEMU_TEST_DEVICES, KernelBuilder, KernelRunner

from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("cpus", [2, 3])
def test_8_4_4_aps_start_by_init_sipi_and_take_physical_and_logical_ioapic_interrupts(
    kernels: KernelBuilder, runner: KernelRunner, cpus: int
) -> None:
    run = runner.run(kernels.build("smp"), "--cpus", str(cpus))
    assert run.passed, run.describe()
    assert f"cpus online: {cpus:#x}" in run.serial


def test_qemu_style_command_line_runs_the_kernel_unchanged(kernels: KernelBuilder) -> None:
    """kvm-unit-tests' QEMU flags, spelled for kvm-vmm; COM1 on stdout, status (0 << 1) | 1."""
    require_kvm()
    kernel = kernels.build("smp")
    command = [sys.executable, "-m", "kvm_vmm.cli", "run", "--kernel", str(kernel)]
    command += ["--cpus", "2", *QEMU_TEST_DEVICES, "--serial", "stdio", "--timeout", "30"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == ["cpus online: 0x2", "PASS"], result.stderr
