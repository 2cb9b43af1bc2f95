"""How a Linux guest is booted here: the --fast-boot preset and the host's workarounds.

Where KVM emulates guest kernel code (~0.3 µs per instruction, see ``kvm-vmm
host-check``), a boot's time is the kernel's own work, so the switches that
skip work nobody needs in a VM are worth minutes. Each switch of the preset
says what it skips and how its effect was measured (docs/linux-boot.md has
the numbers); the preset is only ever added when asked for (``--fast-boot``,
or the demo, which says so).

The host check adds two more things, each only where its probe showed the
need and never with ``--no-host-workarounds``: CPUID flags the VMM hides
itself (where this host lets CPUID through), and Linux switches for gaps it
cannot close (``clearcpuid=ssse3`` while SSE instructions cannot be completed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvm_vmm.cpuid import CpuidEntry, cpuid_for_vcpu
from kvm_vmm.hostcheck import CpuidBit, HostReport

MERGED_LIST_SWITCHES = ("clearcpuid", "initcall_blacklist")  # comma lists: values merged


@dataclass(frozen=True)
class KernelSwitch:
    text: str
    skips: str  # the emulated work it saves
    evidence: str  # how its effect was measured


FAST_BOOT_PRESET: tuple[KernelSwitch, ...] = (
    KernelSwitch(
        "cryptomgr.notests",
        "the crypto API's self-tests of every built-in algorithm",
        "kept a Debian 6.1 boot from /init for over 400 s (HOST-KVM.md, prototype)",
    ),
    KernelSwitch(
        "quiet",
        "printing the boot log: each byte is emulated 8250 driver code and an exit",
        "docs/linux-boot.md: time to the same point with and without",
    ),
    KernelSwitch(
        "nowatchdog",
        "the soft/hard lockup detectors (timers per CPU, false alarms under emulation)",
        "docs/linux-boot.md",
    ),
    KernelSwitch(
        "tsc=reliable",
        "the clocksource watchdog's TSC checks and the TSC sync test at CPU bring-up",
        "docs/linux-boot.md",
    ),
    KernelSwitch(
        "random.trust_cpu=on",
        "waiting for entropy: the CRNG is seeded from RDRAND at once",
        "docs/linux-boot.md",
    ),
    KernelSwitch(
        "initcall_blacklist=trace_eval_init,blake2s_mod_init",
        "two initcalls whose work a VM can do without: filling the trace events' enum "
        "names into their print formats (only tracing output shows them) and the blake2s "
        "library's self-test (its vector code runs through kvmfast's completions)",
        "docs/linux-boot.md: 292 s -> 260 s to power-off, side by side on this host",
    ),
    KernelSwitch(
        "initcall_blacklist=ftrace_check_for_weak_functions",
        "ftrace's check for call sites inside overridden weak functions: a kallsyms "
        "look-up for each of the kernel's ~38,000 traceable call sites, ~35 s here (it "
        "runs in a worker, so initcall_debug bills it to whichever initcall runs then); "
        "only function tracing would list such a site",
        "docs/linux-boot.md: with the next two, 283 s -> 173 s to power-off, side by side",
    ),
    KernelSwitch(
        "initcall_blacklist=tracer_init_tracefs",
        "creating /sys/kernel/tracing, a directory and files per trace event (~35 s "
        "here): tracing from inside the guest is unavailable",
        "docs/linux-boot.md",
    ),
    KernelSwitch(
        "initcall_blacklist=cubictcp_register,bpf_rstat_kfunc_init,bpf_key_sig_kfuncs_init,"
        "kfunc_init,bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init",
        "verifying the kernel's own BTF (~40 s here), which the first registration of BPF "
        "kfuncs forces: these six register kfunc sets (and TCP CUBIC, so TCP uses Reno); "
        "a BPF program that needs the kernel's BTF still gets it, verified at that time",
        "docs/linux-boot.md",
    ),
    KernelSwitch(
        "init_on_alloc=0",
        "zeroing every page and object as it is allocated (Debian turns it on for "
        "hardening; each page is an emulated REP STOSB)",
        "docs/linux-boot.md: 260 s -> 248 s to power-off, side by side on this host",
    ),
)


def switch_key(switch: str) -> str:
    return switch.partition("=")[0]


def with_switches(cmdline: str, switches: Iterable[str]) -> str:
    """``cmdline`` with each switch appended unless the command line already sets it.

    What the user wrote wins. ``clearcpuid=`` lists are merged into one switch
    (Linux reads a single clearcpuid= list).
    """
    words = cmdline.split()
    for switch in switches:
        key = switch_key(switch)
        present = [i for i, word in enumerate(words) if switch_key(word) == key]
        if not present:
            words.append(switch)
        elif key in MERGED_LIST_SWITCHES:
            index = present[-1]
            values = words[index].partition("=")[2].split(",")
            values += [v for v in switch.partition("=")[2].split(",") if v and v not in values]
            words[index] = f"{key}={','.join(v for v in values if v)}"
    return " ".join(words)


@dataclass(frozen=True)
class LinuxBootPlan:
    """The command line a Linux guest gets, and why each added part is there."""

    cmdline: str
    fast_boot: tuple[str, ...] = ()
    host_switches: tuple[str, ...] = ()
    hidden_cpuid: tuple[CpuidBit, ...] = ()
    notes: list[str] = field(default_factory=list)


def plan_linux_boot(
    cmdline: str,
    *,
    fast_boot: bool,
    host: HostReport | None,
    host_workarounds: bool = True,
    preset: Sequence[KernelSwitch] = FAST_BOOT_PRESET,
) -> LinuxBootPlan:
    """Compose the command line: the user's, then the preset, then the host's switches."""
    fast = tuple(s.text for s in preset) if fast_boot else ()
    use_host = host is not None and host_workarounds
    host_switches = tuple(host.linux_switches()) if use_host and host is not None else ()
    hidden = tuple(host.cpuid_bits_to_clear()) if use_host and host is not None else ()
    notes = []
    if host is not None:
        # What will stop the guest, and why it will be slow: said before a long wait.
        worth_saying = [c for c in host.checks if c.verdict == "FAIL" or c.key == "kernel-code"]
        for check in worth_saying:
            if check.verdict != "PASS":
                notes.append(f"host-check: {check.title}: {check.summary}")
    composed = with_switches(with_switches(cmdline, fast), host_switches)
    return LinuxBootPlan(composed, fast, host_switches, hidden, notes)


class CpuidTarget(Protocol):
    """What hide_cpuid_flags needs of a vCPU (kvmfast.Vcpu)."""

    def set_cpuid(self, entries: list[CpuidEntry]) -> None: ...


def hide_cpuid_flags(
    vcpus: Sequence[CpuidTarget], supported: list[CpuidEntry], flags: Iterable[CpuidBit]
) -> None:
    """Give every vCPU the machine's CPUID minus ``flags`` (before its first run)."""
    hidden = list(flags)
    for index, vcpu in enumerate(vcpus):
        entries = cpuid_for_vcpu(supported, index, len(vcpus))
        for flag in hidden:
            entries = flag.cleared_in(entries)
        vcpu.set_cpuid(entries)
