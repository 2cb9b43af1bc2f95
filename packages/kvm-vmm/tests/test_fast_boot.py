"""The Linux boot plan (--fast-boot preset, host workarounds) and the boot's milestones.

Command-line rules follow Documentation/admin-guide/kernel-parameters.rst:
space-separated words, "key=value"; clearcpuid= takes one comma-separated list.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvm_vmm.cpuid import cpuid_for_vcpu
from kvm_vmm.fast_boot import FAST_BOOT_PRESET, hide_cpuid_flags, plan_linux_boot, with_switches
from kvm_vmm.hostcheck import CX16, Check, HostReport
from kvm_vmm.milestones import FIRST_CONSOLE_BYTE, POWER_OFF, ConsolePattern, MilestoneSink
from kvmfast.testing import require_kvm


def test_switches_are_appended_in_order() -> None:
    assert with_switches("console=ttyS0", ["quiet", "tsc=reliable"]) == (
        "console=ttyS0 quiet tsc=reliable"
    )
    assert with_switches("", ["quiet"]) == "quiet"


def test_what_the_user_wrote_wins() -> None:
    assert with_switches("tsc=unstable quiet", ["tsc=reliable", "quiet"]) == "tsc=unstable quiet"


def test_clearcpuid_lists_are_merged_into_one_switch() -> None:
    merged = with_switches("clearcpuid=avx", ["clearcpuid=smap,avx", "clearcpuid=ssse3"])
    assert merged == "clearcpuid=avx,smap,ssse3"


def test_initcall_blacklists_are_merged_too() -> None:
    merged = with_switches("initcall_blacklist=foo_init", ["initcall_blacklist=bar_init"])
    assert merged == "initcall_blacklist=foo_init,bar_init"


def host(*checks: Check) -> HostReport:
    return HostReport({"release": "test"}, list(checks), 0.0)


GAPPY_HOST = host(
    Check("insn-pshufb", "PSHUFB", "WARN", "", linux_switches=("clearcpuid=ssse3",)),
    Check("insn-cmpxchg16b", "CMPXCHG16B", "WARN", "", cpuid_to_clear=("cx16",)),
    Check("insn-int3", "INT3", "FAIL", "KVM cannot emulate it"),
)


def test_the_preset_only_when_asked() -> None:
    assert plan_linux_boot("console=ttyS0", fast_boot=False, host=None).cmdline == "console=ttyS0"
    plan = plan_linux_boot("console=ttyS0", fast_boot=True, host=None)
    assert plan.fast_boot == tuple(switch.text for switch in FAST_BOOT_PRESET)
    words = plan.cmdline.split()
    assert words[0] == "console=ttyS0"
    # Each switch once; the preset's several initcall_blacklist= lists become one.
    keys = [word.partition("=")[0] for word in words]
    assert len(keys) == len(set(keys))
    for switch in plan.fast_boot:
        key, _, values = switch.partition("=")
        (word,) = [w for w in words if w.partition("=")[0] == key]
        assert set(values.split(",")) <= set(word.partition("=")[2].split(","))


def test_every_preset_switch_says_what_it_skips_and_how_that_was_measured() -> None:
    for switch in FAST_BOOT_PRESET:
        assert switch.skips and switch.evidence
        assert " " not in switch.text


def test_host_workarounds_follow_the_host_check_and_can_be_turned_off() -> None:
    plan = plan_linux_boot("console=ttyS0", fast_boot=False, host=GAPPY_HOST)
    assert plan.cmdline == "console=ttyS0 clearcpuid=ssse3"
    assert plan.hidden_cpuid == (CX16,)
    assert any("INT3" in note for note in plan.notes)
    off = plan_linux_boot("console=ttyS0", fast_boot=False, host=GAPPY_HOST, host_workarounds=False)
    assert off.cmdline == "console=ttyS0" and off.hidden_cpuid == ()
    assert off.notes == plan.notes  # what will fail is still said


def test_a_slow_host_says_so_before_the_boot() -> None:
    slow = host(Check("kernel-code", "guest kernel code", "WARN", "emulated, ~360 ns"))
    notes = plan_linux_boot("x", fast_boot=False, host=slow).notes
    assert notes == ["host-check: guest kernel code: emulated, ~360 ns"]


def test_a_host_without_gaps_adds_nothing() -> None:
    plan = plan_linux_boot("x", fast_boot=False, host=host(Check("kvm", "KVM", "PASS", "")))
    assert (plan.cmdline, plan.hidden_cpuid, plan.notes) == ("x", (), [])


class RecordingVcpu:
    def __init__(self) -> None:
        self.entries: list[tuple[int, int, int, int, int, int, int]] = []

    def set_cpuid(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        self.entries = entries


def test_hidden_cpuid_flags_keep_each_vcpus_topology() -> None:
    supported = [(1, 0, 0, 0x806F8, 0, 0xFFFF_FFFF, 0xFFFF_FFFF), (7, 0, 1, 0, 0, 0, 0)]
    vcpus = [RecordingVcpu(), RecordingVcpu()]
    hide_cpuid_flags(vcpus, supported, [CX16])
    for index, vcpu in enumerate(vcpus):
        expected = CX16.cleared_in(cpuid_for_vcpu(supported, index, 2))
        assert vcpu.entries == expected
        assert not CX16.test(vcpu.entries)
        assert vcpu.entries[0][4] >> 24 == index  # leaf 1 EBX: initial APIC ID


# -- milestones --------------------------------------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write_bytes(self, data: bytes) -> None:
        self.data += data


def test_milestones_found_one_byte_at_a_time_and_passed_through() -> None:
    inner = Collect()
    position = [0]  # a clock that reads how many bytes the UART has sent
    sink = MilestoneSink(
        inner, (ConsolePattern("run init", b"Run /init as init"),), lambda: position[0]
    )
    text = b"[ 1.0] booting\n[ 2.0] Run /init as init process\nRun /init as init again\n"
    for byte in text:
        position[0] += 1
        sink.write_bytes(bytes([byte]))
    assert bytes(inner.data) == text
    milestones = sink.milestones(0.0)
    assert [m.name for m in milestones] == [FIRST_CONSOLE_BYTE, "run init"]
    assert milestones[0].seconds == 1
    # Timed at the pattern's last byte, and only its first appearance counts.
    assert milestones[1].seconds == text.index(b"Run /init as init") + len(b"Run /init as init")


def test_a_pattern_split_across_larger_writes_is_found() -> None:
    sink = MilestoneSink(Collect(), (ConsolePattern("p", b"abcdef"),), Ticks())
    sink.write_bytes(b"xxabc")
    sink.write_bytes(b"de")
    sink.write_bytes(b"fyy")
    assert "p" in sink.reached


def test_marked_events_keep_their_first_time() -> None:
    sink = MilestoneSink(Collect(), (), Ticks())
    sink.mark(POWER_OFF)
    sink.mark(POWER_OFF)
    assert [(m.name, m.seconds) for m in sink.milestones(100.0)] == [(POWER_OFF, 1.0)]


@pytest.mark.kvm
def test_stats_report_exits_by_device_and_milestones(tmp_path: Path) -> None:
    """--stats on the tiny demo: it prints on COM1 and powers off through ACPI PM."""
    require_kvm()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "kvm_vmm.cli", "demo", "--tiny", "--serial", "null"),
            *("--stats", "--device", "pc-testdev", "--device", "isa-debug-exit"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stderr[result.stderr.index("{") :])
    assert stats["outcome"] == "guest powered off"
    assert stats["exits_by_device"]["com1"] > 0
    assert stats["exits_by_device"]["acpi-pm"] >= 1
    # Every device is named, the --device ones (which this guest never touches) too.
    assert stats["exits_by_device"]["pc-testdev"] == 0
    assert stats["exits_by_device"]["isa-debug-exit"] == 0
    assert {"com1", "pic", "ioapic", "pit", "rtc", "fw_cfg"} <= set(stats["exits_by_device"])
    assert sum(stats["exits_by_device"].values()) == stats["exits"]["io"] + stats["exits"].get(
        "mmio", 0
    )
    names = [m["name"] for m in stats["milestones"]]
    assert names[0] == FIRST_CONSOLE_BYTE and names[-1] == POWER_OFF
