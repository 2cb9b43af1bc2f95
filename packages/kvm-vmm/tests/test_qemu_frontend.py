"""QEMU's command line as kvm-unit-tests' x86/run builds it, translated for kvm-vmm run.

The runs themselves are in tests/multiboot/test_x86_run_lines.py; here the
translation, the questions a harness asks (--help, -device ?) and the refusals.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvm_vmm.cpuid import CpuidEntry
from kvm_vmm.qemu_frontend import (
    CpuRequest,
    QemuAnswer,
    QemuRun,
    QemuUsageError,
    cpu_note,
    split_suboptions,
    translate,
)

# x86/run's fixed part: its test devices, no display, COM1 on stdout, KVM.
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


def _run(*argv: str) -> QemuRun:
    translated = translate(list(argv))
    assert isinstance(translated, QemuRun), translated
    return translated


def test_x86_runs_command_line_becomes_kvm_vmm_run_arguments() -> None:
    run = _run(
        *X86_RUN,
        "-kernel",
        "x86/ioapic.flat",
        "-smp",
        "4",
        "-initrd",
        "/tmp/env",
        "-append",
        "a b",
        "-m",
        "256",
        "--no-reboot",
    )
    assert run.run_args == (
        "--kernel",
        "x86/ioapic.flat",
        "--cpus",
        "4",
        "--memory",
        str(256 << 20),
        "--serial",
        "stdio",
        "--initrd",
        "/tmp/env",
        "--cmdline",
        "a b",
        "--device",
        "pc-testdev",
        "--device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
    )
    assert run.cpus == 4 and run.cpu is None and run.notes == ()


@pytest.mark.parametrize(
    ("value", "size"),
    [("256", 256 << 20), ("64M", 64 << 20), ("1G", 1 << 30), ("size=512M", 512 << 20)],
)
def test_m_is_mib_unless_suffixed(value: str, size: int) -> None:
    run = _run("-kernel", "k", "-m", value, "-no-reboot")
    assert run.run_args[run.run_args.index("--memory") + 1] == str(size)


def test_defaults_are_qemus_128m_one_cpu_and_a_reset_note_without_no_reboot() -> None:
    run = _run("-kernel", "k")
    memory = str(128 << 20)
    assert run.run_args == ("--kernel", "k", "--cpus", "1", "--memory", memory, "--serial", "null")
    assert run.notes == ("a guest reset ends the run, as with -no-reboot: kvm-vmm does not reboot",)


def test_pci_testdev_is_a_device_option() -> None:
    run = _run("-kernel", "k", "-no-reboot", "-device", "pci-testdev")
    assert run.run_args[-2:] == ("--device", "pci-testdev")


def test_smp_cpus_key_and_split_irqchip_and_accel_spellings() -> None:
    run = _run(
        "-kernel",
        "k",
        "-smp",
        "cpus=3,maxcpus=3",
        "-machine",
        "pc,accel=kvm:tcg,kernel-irqchip=split",
        "-accel",
        "kvm,kernel-irqchip=split",
        "-enable-kvm",
        "-display",
        "none",
        "-nographic",
        "-no-reboot",
    )
    assert run.cpus == 3
    assert run.run_args[run.run_args.index("--serial") + 1] == "stdio"  # -nographic


def test_chardev_and_serial_chardev() -> None:
    run = _run("-kernel", "k", "-chardev", "file,id=log,path=/tmp/a,,b", "-serial", "chardev:log")
    assert run.run_args[run.run_args.index("--serial") + 1] == "file:/tmp/a,b"


def test_lost_tick_policy_discard_is_ours_others_are_noted() -> None:
    assert (
        _run("-kernel", "k", "-no-reboot", "-global", "kvm-pit.lost_tick_policy=discard").notes
        == ()
    )
    (note,) = _run("-kernel", "k", "-no-reboot", "-global", "kvm-pit.lost_tick_policy=delay").notes
    assert "discards lost ticks" in note


def test_cpu_model_and_features_are_kept_for_the_host_note() -> None:
    run = _run("-kernel", "k", "-cpu", "qemu64,+x2apic,-tsc-deadline,pmu=off")
    assert run.cpu == CpuRequest(
        "qemu64", (("x2apic", True), ("tsc-deadline", False), ("pmu", False))
    )


def test_cpu_bare_words_are_on_and_other_values_are_properties() -> None:
    # x86/unittests.cfg: -cpu max,host-phys-bits; host,hv_passthrough; qemu64,vendor=...;
    # IvyBridge,phys-bits=36,host-phys-bits=off.
    run = _run(
        "-kernel", "k", "-cpu", "max,host-phys-bits,hv_passthrough,vendor=GenuineIntel,phys-bits=36"
    )
    assert run.cpu == CpuRequest(
        "max",
        (("host-phys-bits", True), ("hv_passthrough", True)),
        (("vendor", "GenuineIntel"), ("phys-bits", "36")),
    )


def test_machine_pit_off_and_overcommit_are_accepted_with_a_note() -> None:
    run = _run("-kernel", "k", "-no-reboot", "-machine", "pit=off", "-overcommit", "cpu-pm=on")
    assert run.notes == (
        "-machine pit=off: kvm-vmm always has its PIT (pit=off ignored)",
        "-overcommit cpu-pm=on: kvm-vmm does not do cpu-pm=on (ignored)",
    )
    assert _run("-kernel", "k", "-no-reboot", "-overcommit", "mem-lock=off").notes == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-kernel", "k", "-hda", "disk.img"], "-hda: an option"),
        (["-kernel", "k", "disk.img"], "disk.img: a disk image"),
        (
            ["-kernel", "k", "-machine", "accel=kvm,kernel-irqchip=on"],
            "refused: kvm-vmm is the split irqchip",
        ),
        (["-kernel", "k", "-accel", "kvm,kernel-irqchip=off"], "refused"),
        (["-kernel", "k", "-machine", "accel=tcg"], "KVM only"),
        (["-kernel", "k", "-machine", "q35"], "type pc"),
        (["-kernel", "k", "-M", "q35,kernel-irqchip=split"], "type pc"),
        (["-kernel", "k", "-machine", "vmport=on"], "does not take 'vmport'"),
        (["-kernel", "k", "-device", "hyperv-testdev"], "no 'hyperv-testdev'"),
        (["-kernel", "k", "-overcommit", "cpu-pm=maybe"], "cpu-pm is on or off"),
        (["-kernel", "k", "-cpu", "max,=on"], "empty feature name"),
        (["-kernel", "k", "-device", "testdev,chardev=log"], "no 'testdev'"),
        (["-kernel", "k", "-vnc", ":0"], "-vnc none"),
        (["-kernel", "k", "-smp", "2,maxcpus=4"], "hotplug"),
        (["-kernel", "k", "-m", "lots"], "-m lots"),
        (["-kernel", "k", "-serial", "chardev:nope"], "no -chardev with id=nope"),
        (["-kernel", "k", "-serial", "stdio", "-serial", "null"], "one serial port"),
        (["-kernel", "k", "-global", "hpet.msi=on"], "kvm-pit.lost_tick_policy"),
        (["-kernel"], "needs a value"),
        (["-smp", "2"], "no -kernel"),
    ],
)
def test_what_cannot_be_honoured_is_one_error(argv: list[str], message: str) -> None:
    with pytest.raises(QemuUsageError, match=message.replace("(", r"\(")) as error:
        translate(argv)
    assert "\n" not in str(error.value)


def test_help_first_line_has_qemus_form_and_names_the_front_end() -> None:
    for flag in ("-h", "--help", "-help"):
        answer = translate([flag])
        assert isinstance(answer, QemuAnswer)
        first = answer.text.splitlines()[0]
        assert first.startswith("QEMU emulator version 7.2.0 "), first
        assert "kvm-vmm's QEMU-compatible front end" in first


def test_device_question_lists_the_devices_as_qemu_does() -> None:
    answer = translate(["-device", "?"])
    assert isinstance(answer, QemuAnswer)
    # x86/run greps for the quoted names, and adds -device pci-testdev if it is listed.
    assert '"pc-testdev"' in answer.text and '"isa-debug-exit"' in answer.text
    assert 'name "pci-testdev", bus PCI' in answer.text.splitlines()


def test_suboptions_split_on_single_commas_only() -> None:
    assert split_suboptions("a,b=c,,d,e") == ["a", "b=c,d", "e"]


X2APIC_ONLY: list[CpuidEntry] = [(1, 0, 0, 0, 0, 1 << 21, 0)]


def test_cpu_note_says_which_features_the_guest_really_sees() -> None:
    note = cpu_note(
        CpuRequest("qemu64", (("x2apic", True), ("tsc-deadline", True))), X2APIC_ONLY, None
    )
    assert note == (
        "-cpu qemu64,+x2apic,+tsc-deadline: the guest sees this host's CPUID as KVM offers it"
        " (x2apic: on; tsc-deadline: off)"
    )


def test_cpu_note_names_the_host_checks_verdict_when_cpuid_cannot_be_set() -> None:
    note = cpu_note(CpuRequest("host"), X2APIC_ONLY, "3 flag bits differ")
    assert note is not None and note.endswith(
        "this host's KVM does not let the VMM set it (host-check: 3 flag bits differ)"
    )


# Leaf 0 "AuthenticAMD" (EBX "Auth", EDX "enti", ECX "cAMD"), leaf 0x80000008 48 bits.
AMD_48_BITS: list[CpuidEntry] = [
    (0, 0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65),
    (0x80000008, 0, 0, 0x3030, 0, 0, 0),
]


def test_cpu_note_reports_vendor_and_physical_address_bits_as_the_guest_sees_them() -> None:
    request = CpuRequest(
        "IvyBridge",
        (("host-phys-bits", False), ("hv_passthrough", True)),
        (("vendor", "GenuineIntel"), ("phys-bits", "36")),
    )
    assert cpu_note(request, AMD_48_BITS, None) == (
        "-cpu IvyBridge,-host-phys-bits,+hv_passthrough,vendor=GenuineIntel,phys-bits=36:"
        " the guest sees this host's CPUID as KVM offers it (phys-bits: 48 (the host's);"
        " hv_passthrough: not honoured by kvm-vmm; vendor: AuthenticAMD; phys-bits: 48)"
    )


def test_cpu_note_is_silent_when_vendor_and_width_are_what_the_guest_gets() -> None:
    request = CpuRequest("max", (("host-phys-bits", True),), (("vendor", "AuthenticAMD"),))
    assert cpu_note(request, AMD_48_BITS, None) is None
    assert cpu_note(CpuRequest("max", (), (("phys-bits", "48"),)), AMD_48_BITS, None) is None


def test_cpu_host_with_what_the_guest_has_needs_no_note() -> None:
    assert cpu_note(CpuRequest("host", (("x2apic", True),)), X2APIC_ONLY, None) is None


def test_kvm_vmm_qemu_subcommand_and_script_answer_the_same() -> None:
    script = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kvm_vmm.cli import qemu_main; raise SystemExit(qemu_main())",
            "-h",
        ],
        capture_output=True,
        text=True,
    )
    command = subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", "qemu", "-h"], capture_output=True, text=True
    )
    assert script.returncode == command.returncode == 0, script.stderr + command.stderr
    assert script.stdout == command.stdout
    assert command.stdout.startswith("QEMU emulator version")
    unknown = subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", "qemu", "-kernel", "k", "-bogus"],
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2
    assert unknown.stderr == (
        "kvm-vmm-qemu-system-x86_64: error: -bogus: an option kvm-vmm's QEMU front end"
        " does not take\n"
    )


def test_a_kernel_that_cannot_be_read_is_one_error_line_status_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.flat"
    result = subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", "qemu", "-kernel", str(missing), "-no-reboot"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    # QEMU's wording, which kvm-unit-tests' runner greps for (scripts/vmm.bash,
    # qemu_parse_premature_failure) to tell "runs" from "cannot run this test".
    assert re.search(r"[Cc]ould not (load|open) kernel", result.stderr), result.stderr
    assert str(missing) in result.stderr


def test_an_answer_read_by_head_1_ends_without_a_traceback() -> None:
    # kvm-unit-tests' scripts/arch-run.bash: QEMU_VERSION_STRING="$($qemu -h | head -1)".
    # `true` closes the pipe before the answer is written (Python starts in ~1 s): the
    # write always meets a closed pipe, which `head -1` leaves to chance.
    for reader in ("head -1", "true"):
        result = subprocess.run(
            ["sh", "-c", f"'{sys.executable}' -m kvm_vmm.cli qemu -h | {reader}"],
            capture_output=True,
            text=True,
        )
        assert result.stderr == "", reader
    assert subprocess.run(
        ["sh", "-c", f"'{sys.executable}' -m kvm_vmm.cli qemu -h | head -1"],
        capture_output=True,
        text=True,
    ).stdout.startswith("QEMU emulator version")
