"""The command lines kvm-unit-tests' x86/run builds, run by kvm-vmm's QEMU front end.

Each row is such a command line (x86/run's fixed devices and display options, then
the test's own -kernel, -smp, -m, -cpu, -append and -initrd) with one of our
Multiboot kernels in place of a kvm-unit-tests binary; the harness reads COM1 on
stdout and the exit status, as kvm-unit-tests' runner does.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from guests.multiboot import KernelBuilder

from kvmfast.testing import require_kvm

pytestmark = pytest.mark.kvm

FRONT_END = "from kvm_vmm.cli import qemu_main; raise SystemExit(qemu_main())"
X86_RUN = [
    "-nodefaults",
    "-device",
    "pc-testdev",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=0x4",
    "-vnc",
    "none",
    "-serial",
    "stdio",
    "-machine",
    "accel=kvm",
]
# x86/run of kvm-unit-tests 1da1819e (2026-06-26) word for word, once `-device ?` lists
# pci-testdev; the runner then adds the test's -smp, -append, qemu_params and -initrd.
X86_RUN_1DA1819E = [
    "--no-reboot",
    "-nodefaults",
    "-global",
    "kvm-pit.lost_tick_policy=discard",
    "-device",
    "pc-testdev",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=0x4",
    "-display",
    "none",
    "-serial",
    "stdio",
    "-device",
    "pci-testdev",
    "-machine",
    "accel=kvm",
]
PASSED = 1  # the kernel's main returned 0: isa-debug-exit with 0, (0 << 1) | 1
CRASHED = 4


@dataclass(frozen=True)
class Row:
    kernel: str
    options: tuple[str, ...]
    status: int
    stdout: tuple[str, ...]  # lines (in order) COM1 must show
    stderr: str = ""  # a line the front end must print on stderr
    prefix: tuple[str, ...] = tuple(X86_RUN)


ROWS = {
    "ioapic-like, -smp 1": Row("ioapic_edge", ("-smp", "1"), PASSED, ("PASS",)),
    "smptest, -smp 2, --no-reboot -display none": Row(
        "smp",
        ("-smp", "2", "--no-reboot", "-display", "none"),
        PASSED,
        ("cpus online: 0x2", "PASS"),
    ),
    "-append and -initrd (the environment as module 0)": Row(
        "boot_info",
        ("-smp", "1", "-append", "alpha beta", "-initrd", "ENV"),
        PASSED,
        ("cmdline=KERNEL alpha beta", "PASS"),
    ),
    "-m 256, split irqchip, lost ticks discarded": Row(
        "boot_info",
        (
            "-m",
            "256",
            "-machine",
            "accel=kvm,kernel-irqchip=split",
            "-global",
            "kvm-pit.lost_tick_policy=discard",
        ),
        PASSED,
        ("ram=0x10000000", "PASS"),
    ),
    "-cpu qemu64,+x2apic: accepted with a warning": Row(
        "smp",
        ("-smp", "3", "-cpu", "qemu64,+x2apic"),
        PASSED,
        ("cpus online: 0x3", "PASS"),
        "kvm-vmm-qemu-system-x86_64: warning: -cpu qemu64,+x2apic: the guest sees this "
        "host's CPUID as KVM offers it (x2apic: ",
    ),
    "realmode-like: waits with STI; HLT for the timer tick SeaBIOS leaves": Row(
        "bios_state", ("-smp", "1"), PASSED, ("timer ticks through the 8259", "PASS")
    ),
    "vmexit-like: -device pci-testdev found on bus 0 and driven through both BARs": Row(
        "pci_testdev",
        ("-smp", "1", "-device", "pci-testdev"),
        PASSED,
        ("pci-testdev: 6 tests", "PASS"),
    ),
    "x86/run 1da1819e verbatim, [apic] x2apic's -smp and -cpu, the environment": Row(
        "smp",
        ("-smp", "2", "-cpu", "qemu64,+x2apic,+tsc-deadline", "-initrd", "ENV"),
        PASSED,
        ("cpus online: 0x2", "PASS"),
        "kvm-vmm-qemu-system-x86_64: warning: -cpu qemu64,+x2apic,+tsc-deadline: the guest sees",
        tuple(X86_RUN_1DA1819E),
    ),
    "a crash is not a pass": Row(
        "triple_fault", ("-smp", "1"), CRASHED, ("faulting",), "vCPU 0: triple fault (status 4)"
    ),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_x86_run_command_line(name: str, kernels: KernelBuilder, tmp_path: Path) -> None:
    require_kvm()
    row = ROWS[name]
    kernel = kernels.build(row.kernel)
    environment = tmp_path / "env"
    environment.write_text("KVM_UNIT_TESTS_ENV_OLD=1\n")
    options = [str(environment) if option == "ENV" else option for option in row.options]
    command = [sys.executable, "-c", FRONT_END, *row.prefix, "-kernel", str(kernel), *options]
    if "--no-reboot" not in options:
        command.append("-no-reboot")
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    described = f"status {result.returncode}\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == row.status, described
    lines = iter(result.stdout.splitlines())
    for want in row.stdout:  # in this order, each in a line of its own or a later one
        want = want.replace("KERNEL", str(kernel))
        assert any(want in line for line in lines), f"{want!r} missing\n{described}"
    if row.stderr:
        assert row.stderr in result.stderr, described
    else:
        assert "warning" not in result.stderr, described
