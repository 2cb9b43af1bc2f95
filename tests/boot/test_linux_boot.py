"""Debian's cloud kernel on our split irqchip, driven through the library's Machine.

What the guest's /proc/interrupts must show (kernel/irq/proc.c prints the
chip's name and the flow handler: "IO-APIC  2-edge timer"):
- with the IOAPIC (the MADT describes it, Linux's default): the PIT's timer on
  GSI 2 (MADT interrupt source override IRQ0 -> GSI 2) and ttyS0 (IRQ 4) edge,
  the ACPI SCI (GSI 9, override "high level") fasteoi, i.e. level-triggered;
- with ``noapic``: the same lines through the 8259 pair (XT-PIC), the PIC's
  INTR delivered by KVM_INTERRUPT as ExtINT;
- one or two CPUs up (nproc), and power-off through ACPI S5: Outcome status 0;
- what the kernel logged of our e820 map, ACPI tables and initrd (dmesg).
Linux arms the PIT (IRQ 0, "timer") only when the LAPIC timer cannot run
without it (arch/x86/kernel/apic/apic.c, apic_needs_pit()): with a TSC-deadline
LAPIC timer it never does. The tests hide that feature from the guest
(``clearcpuid=tsc_deadline_timer``) so that our PIT drives the tick through our
IOAPIC or PIC, as it does for kernels and CPUs without it.
The two-vCPU IOAPIC boot is also sampled at 100 Hz as ``--profile`` does: the
profiler's kicks are safe through a whole SMP boot (docs/emulation.md).
The kvm-vmm command's own behaviour (clear errors for a malformed kernel, a
missing initrd, too little memory; what the fast boot adds) is tested through
the command: those tests take seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Boot, BootFiles, boot_linux

from kvm_vmm.initramfs import TEST_BEGIN_MARKER, TEST_END_MARKER, TEST_FIRMWARE_MARKER
from kvm_vmm.machine import POWERED_OFF, STATUS_TIMED_OUT

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

PIT_TICK = "clearcpuid=tsc_deadline_timer"
FLOW = re.compile(r"^\d+-(edge|level|fasteoi)$")
PROFILE_HZ = 100.0
CLI_TIMEOUT = 60.0  # seconds: the command's own tests stop before or just after the entry


@dataclass(frozen=True)
class Command:
    status: int
    stderr: str


def kvm_vmm(*args: str, serial: Path, timeout: float = CLI_TIMEOUT) -> Command:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvm_vmm.cli",
            *args,
            "--serial",
            f"file:{serial}",
            "--stats",
            "--timeout",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 120,
        stdin=subprocess.DEVNULL,
    )
    return Command(result.returncode, result.stderr)


@dataclass(frozen=True)
class InterruptLine:
    irq: str
    counts: list[int]
    chip: str
    flow: str
    names: str


def proc_interrupts(console: str) -> tuple[int, dict[str, InterruptLine]]:
    """nproc and the /proc/interrupts lines (by device name) that the test /init printed."""
    assert TEST_BEGIN_MARKER in console, console[-3000:]
    section = console.split(TEST_BEGIN_MARKER, 1)[1].split(TEST_FIRMWARE_MARKER, 1)[0]
    lines = [line.strip() for line in section.replace("\r", "").splitlines() if line.strip()]
    nproc = int(next(line for line in lines if line.startswith("nproc=")).split("=")[1])
    cpus = len(next(line for line in lines if line.startswith("CPU0")).split())
    table = {}
    for line in lines:
        irq, colon, rest = line.partition(":")
        if not colon or not irq.strip().isdigit():
            continue
        fields = rest.split()
        counts = [int(value) for value in fields[:cpus]]
        chip, flow_and_names = fields[cpus], fields[cpus + 1 :]
        flow = flow_and_names[0] if flow_and_names and FLOW.match(flow_and_names[0]) else ""
        names = " ".join(flow_and_names[1:] if flow else flow_and_names)
        for name in names.replace(",", " ").split():
            table[name] = InterruptLine(irq.strip(), counts, chip, flow, names)
    return nproc, table


def firmware_log(console: str) -> str:
    """The dmesg lines about e820, ACPI tables, the initrd and the IOAPIC that /init printed."""
    assert TEST_FIRMWARE_MARKER in console, console[-3000:]
    return console.split(TEST_FIRMWARE_MARKER, 1)[1].split(TEST_END_MARKER, 1)[0]


def assert_powered_off(boot: Boot) -> None:
    assert boot.outcome.status == 0 and boot.outcome.reason == POWERED_OFF, boot.tail()
    assert boot.stats["outcome"] == POWERED_OFF


@pytest.mark.usefixtures("boots_to_init")
@pytest.mark.parametrize("cpus", [2])
def test_ioapic_routes_timer_serial_and_the_level_sci(boot_files: BootFiles, cpus: int) -> None:
    # Profiled at 100 Hz on two vCPUs: every sample is a kick out of KVM_RUN, at any
    # point of the boot, on a vCPU that may be halted or taking an interrupt. One vCPU
    # is not booted again here: test_virtio_boot's two 1-vCPU boots check the same
    # lines, and CI's boot budget goes to the network test.
    profile_hz = PROFILE_HZ if cpus == 2 else None
    boot = boot_linux(boot_files, cpus=cpus, cmdline=PIT_TICK, profile_hz=profile_hz)
    assert_powered_off(boot)
    nproc, interrupts = proc_interrupts(boot.console)
    assert nproc == cpus
    assert interrupts["timer"].chip == "IO-APIC" and interrupts["timer"].flow == "2-edge"
    assert interrupts["ttyS0"].chip == "IO-APIC" and interrupts["ttyS0"].flow == "4-edge"
    assert interrupts["acpi"].chip == "IO-APIC" and interrupts["acpi"].flow == "9-fasteoi"
    assert sum(interrupts["timer"].counts) > 0  # our PIT ticked through our IOAPIC
    assert sum(interrupts["ttyS0"].counts) > 0  # the console's output went through it
    milestones = boot.stats["milestones"]
    assert isinstance(milestones, list)
    names = [milestone["name"] for milestone in milestones]
    assert "/init started" in names and names[-1] == "power-off"
    # The kernel read our firmware: e820 RAM above 1 MiB, every ACPI table, the
    # MADT's IOAPIC with 24 pins, and the initrd where the zero page put it.
    log = firmware_log(boot.console)
    assert "BIOS-e820: [mem 0x0000000000100000-" in log
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "FACS", "APIC"):
        assert f"ACPI: {table} 0x" in log, table
    assert "Using ACPI (MADT) for SMP configuration information" in log
    assert re.search(r"IOAPIC\[0\]: apic_id \d+, version \d+, address 0xfec00000, GSI 0-23", log)
    assert "RAMDISK: [mem " in log
    if profile_hz is not None:
        assert_profiled(boot, profile_hz)


def assert_profiled(boot: Boot, hz: float) -> None:
    """The samples cover the boot (at least a tenth of one vCPU's share of the rate)
    and most of them name a kernel function, from the image's own kallsyms."""
    seconds = boot.stats["seconds"]
    assert isinstance(seconds, float)
    assert boot.samples >= hz * seconds / 10, (boot.samples, seconds)
    named = [line for line in boot.profile if not line.where.startswith("0x")]
    assert sum(line.samples for line in named) >= boot.samples / 2, boot.profile[:25]


@pytest.mark.usefixtures("boots_to_init")
@pytest.mark.parametrize("cpus", [2])
def test_noapic_routes_through_the_8259_pair(boot_files: BootFiles, cpus: int) -> None:
    # Two vCPUs: Linux's first IPIs to several CPUs would be paravirtual (a hypercall
    # that never completes on some hosts) unless the host check hides KVM's PV IPI.
    # One vCPU is not booted again: the PIC's path is the BSP's alone either way (the
    # 8259's INTR reaches LINT0 of vCPU 0 only), and CI's boot budget goes to the
    # snapshot tests (a boot is about 6.5 min on the slowest host of this kind).
    boot = boot_linux(boot_files, cpus=cpus, cmdline=f"noapic {PIT_TICK}")
    assert_powered_off(boot)
    nproc, interrupts = proc_interrupts(boot.console)
    assert nproc == cpus
    for name in ("timer", "ttyS0", "acpi"):
        assert interrupts[name].chip == "XT-PIC", interrupts[name]
    assert sum(interrupts["timer"].counts) > 0


def test_a_malformed_kernel_is_a_clear_error(tmp_path: Path) -> None:
    kernel = tmp_path / "junk"
    kernel.write_bytes(bytes(range(256)) * 64)
    boot = kvm_vmm("run", "--kernel", str(kernel), serial=tmp_path / "c")
    assert boot.status == 2 and "Traceback" not in boot.stderr
    assert "is not a bzImage" in boot.stderr


def test_a_truncated_kernel_is_a_clear_error(boot_files: BootFiles, tmp_path: Path) -> None:
    kernel = tmp_path / "truncated"
    kernel.write_bytes(boot_files.kernel.read_bytes()[:100_000])
    boot = kvm_vmm("run", "--kernel", str(kernel), serial=tmp_path / "c")
    assert boot.status == 2 and "Traceback" not in boot.stderr
    assert "syssize" in boot.stderr


def test_a_missing_initrd_is_a_clear_error(boot_files: BootFiles, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.cpio"
    boot = kvm_vmm(
        "run", "--kernel", str(boot_files.kernel), "--initrd", str(missing), serial=tmp_path / "c"
    )
    assert boot.status == 2 and "Traceback" not in boot.stderr
    assert f"initrd file '{missing}' does not exist" in boot.stderr


@pytest.mark.parametrize(
    ("memory", "message"), [("1M", "too small"), ("32M", "larger than guest RAM")]
)
def test_too_little_memory_is_a_clear_error(
    boot_files: BootFiles, tmp_path: Path, memory: str, message: str
) -> None:
    boot = kvm_vmm(
        "run",
        "--kernel",
        str(boot_files.kernel),
        "--initrd",
        str(boot_files.initrd),
        "--memory",
        memory,
        serial=tmp_path / "c",
    )
    assert boot.status == 2 and "Traceback" not in boot.stderr
    assert message in boot.stderr


@pytest.mark.usefixtures("boots_to_init")
def test_the_command_says_what_the_fast_boot_adds(boot_files: BootFiles, tmp_path: Path) -> None:
    """`kvm-vmm run --fast-boot` (and `demo`) never change the command line silently;
    the run is stopped seconds after the kernel's entry."""
    boot = kvm_vmm(
        "run",
        "--kernel",
        str(boot_files.kernel),
        "--initrd",
        str(boot_files.initrd),
        "--fast-boot",
        serial=tmp_path / "c",
        timeout=5,
    )
    assert boot.status == STATUS_TIMED_OUT, boot.stderr[-3000:]
    assert "kvm-vmm: fast boot: adding " in boot.stderr
    stats = json.loads(boot.stderr[boot.stderr.rfind("\n{") :])
    assert stats["outcome"].startswith("timed out")
