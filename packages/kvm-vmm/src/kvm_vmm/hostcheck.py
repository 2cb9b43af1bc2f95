"""What this host's KVM really does, learnt from tiny probe guests (``kvm-vmm host-check``).

KVMs differ in ways no capability query reveals: some run guest kernel code
through the instruction emulator (and fail on what it lacks), deliver
interrupts late, EOI level interrupts early, or get SYSCALL from user mode
wrong (``../shared/HOST-KVM.md``, ``docs/host-notes.md``). Each check here is a
guest of a few instructions run through kvmfast, exactly as the VMM's own
guests run, so an instruction that kvmfast completes passes.

Results are cached per host: the key holds the host kernel's release and
build, the KVM modules' parameters, the CPU model and the kvmfast build, so
a new kernel, module option or kvmfast re-probes. The first run costs tens of
milliseconds (and GNU as to build the probes); later ones read one file.

Where the host leaves a gap the VMM cannot close itself, a check names the
Linux switch that avoids it (:meth:`HostReport.linux_switches`); where
clearing a CPUID bit closes it, the check names the bit
(:meth:`HostReport.cpuid_bits_to_clear`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import kvmfast
from kvm_abi import KVM_CAP_SPLIT_IRQCHIP
from kvm_vmm.cpuid import CpuidEntry, cpuid_for_vcpu
from kvm_vmm.host_probes import (
    DEFERRED_LOOP,
    EDGE_VECTOR,
    KERNEL_CS,
    KVM_CPUID_FEATURES,
    KVM_ENOSYS_RESULT,
    LEVEL_GSI,
    LEVEL_VECTOR,
    LOOP_COUNT,
    MSI_ADDRESS,
    MSI_ASSERT,
    MSI_LEVEL,
    MSR_FMASK,
    MSR_LSTAR,
    MSR_STAR,
    NOT_TAKEN,
    ProbeGuest,
    ProbeMode,
    ProbeRun,
    Register,
    build_probe_program,
    cpuid_bit,
)
from kvmfast.assembler import AssemblerMissing, AssemblyError

PROBE_VERSION = 6  # bump when a probe changes meaning: cached reports are then ignored
CACHE_PREFIX = "hostcheck-"
# Reports kept in the cache: each kvmfast build is an identity of its own, so a
# developer's rebuilds would otherwise leave one file each, for good.
CACHE_KEEP = 8

Verdict = Literal["PASS", "WARN", "FAIL"]

# -- checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuidBit:
    """A feature flag, named as Linux's /proc/cpuinfo and clearcpuid= name it (KVM's
    own paravirtual flags, which have no such name, as KVM_FEATURE_* in <asm/kvm_para.h>)."""

    name: str
    leaf: int
    subleaf: int
    register: Register
    bit: int

    def test(self, entries: Iterable[CpuidEntry]) -> bool:
        return cpuid_bit(entries, self.leaf, self.subleaf, self.register, self.bit)

    def cleared_in(self, entries: Iterable[CpuidEntry]) -> list[CpuidEntry]:
        index = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}[self.register]
        out = []
        for entry in entries:
            if entry[0] == self.leaf and entry[1] == self.subleaf:
                values = list(entry)
                values[index] &= ~(1 << self.bit)
                entry = (
                    values[0],
                    values[1],
                    values[2],
                    values[3],
                    values[4],
                    values[5],
                    values[6],
                )
            out.append(entry)
        return out


SSSE3 = CpuidBit("ssse3", 1, 0, "ecx", 9)
CX16 = CpuidBit("cx16", 1, 0, "ecx", 13)
POPCNT = CpuidBit("popcnt", 1, 0, "ecx", 23)
XSAVE = CpuidBit("xsave", 1, 0, "ecx", 26)
AVX = CpuidBit("avx", 1, 0, "ecx", 28)
AVX2 = CpuidBit("avx2", 7, 0, "ebx", 5)
SMAP = CpuidBit("smap", 7, 0, "ebx", 20)
ABM = CpuidBit("abm", 0x8000_0001, 0, "ecx", 5)  # LZCNT
BMI1 = CpuidBit("bmi1", 7, 0, "ebx", 3)  # TZCNT among others
CPUID_BITS_TRIED = (SSSE3, CX16, POPCNT, XSAVE, AVX, AVX2, SMAP)
# KVM's paravirtual features that make Linux issue hypercalls (arch/x86/kernel/kvm.c):
# kicking a halted lock waiter, IPIs to several CPUs, yielding to a preempted vCPU.
KVM_PV_UNHALT = CpuidBit("KVM_FEATURE_PV_UNHALT", KVM_CPUID_FEATURES, 0, "eax", 7)
KVM_PV_SEND_IPI = CpuidBit("KVM_FEATURE_PV_SEND_IPI", KVM_CPUID_FEATURES, 0, "eax", 11)
KVM_PV_SCHED_YIELD = CpuidBit("KVM_FEATURE_PV_SCHED_YIELD", KVM_CPUID_FEATURES, 0, "eax", 13)
HYPERCALL_FEATURES = (KVM_PV_UNHALT, KVM_PV_SEND_IPI, KVM_PV_SCHED_YIELD)
HYPERCALL_TIMEOUT = 0.5  # seconds: a hypercall that works takes microseconds
AMD_VENDOR_EBX = 0x6874_7541  # "Auth" of "AuthenticAMD", CPUID leaf 0 EBX
# Bits the CPU sets from its own state, not from the CPUID table.
_DYNAMIC_BITS = {(1, "ecx", 27), (1, "edx", 9), (7, "ecx", 4)}  # OSXSAVE, APIC, OSPKE
_REPORTED_REGISTERS: tuple[tuple[int, Register], ...] = (
    (1, "ecx"),
    (1, "edx"),
    (7, "ebx"),
    (7, "ecx"),
    (7, "edx"),
)


@dataclass(frozen=True)
class Check:
    """One line of the host check: what was seen, what it means for guests."""

    key: str
    title: str
    verdict: Verdict
    summary: str
    linux_switches: tuple[str, ...] = ()
    cpuid_to_clear: tuple[str, ...] = ()  # names of CPUID_BITS_TRIED

    def line(self) -> str:
        return f"{self.verdict:<4}  {self.title:<26} {self.summary}"


@dataclass(frozen=True)
class InstructionProbe:
    key: str
    mnemonic: str
    entry: str
    used_by: str
    cpuid: CpuidBit | None = None  # the flag Linux checks before using the instruction
    linux_switch: str | None = None
    fatal_for_linux: bool = True
    mode: ProbeMode = "kernel"
    handlers: tuple[tuple[int, str], ...] = ()


INSTRUCTION_PROBES = (
    InstructionProbe(
        "clac",
        "CLAC",
        "insn_clac",
        "first instruction of every Linux interrupt entry",
        SMAP,
        "clearcpuid=smap",
    ),
    InstructionProbe(
        "stac", "STAC", "insn_stac", "Linux user-memory access", SMAP, "clearcpuid=smap"
    ),
    InstructionProbe(
        "popcnt", "POPCNT", "insn_popcnt", "Linux bitmap weights", POPCNT, "clearcpuid=popcnt"
    ),
    InstructionProbe(
        "xsave", "XSAVE", "insn_xsave", "Linux FPU context switches", XSAVE, "noxsave"
    ),
    InstructionProbe(
        "xrstor", "XRSTOR", "insn_xrstor", "Linux FPU context switches", XSAVE, "noxsave"
    ),
    InstructionProbe(
        "int3",
        "INT3",
        "insn_int3",
        "Linux's INT3 self-test and text_poke breakpoints",
        handlers=((3, "return_from_interrupt"),),
    ),
    InstructionProbe(
        "iret32",
        "IRET (32-bit)",
        "iret32",
        "32-bit guests returning from interrupts",
        fatal_for_linux=False,
        mode="protected32",
    ),
    InstructionProbe(
        "pshufb",
        "PSHUFB (SSSE3)",
        "insn_pshufb",
        "Linux's SSSE3 blake2s (random numbers)",
        SSSE3,
        "clearcpuid=ssse3",
    ),
    InstructionProbe(
        "ldmxcsr",
        "LDMXCSR",
        "insn_ldmxcsr",
        "kernel_fpu_begin() before in-kernel SIMD",
        SSSE3,
        "clearcpuid=ssse3",
    ),
    InstructionProbe("fwait", "FWAIT", "insn_fwait", "Linux's fpu__drop() at task exit"),
    InstructionProbe("lsl", "LSL", "insn_lsl", "Linux's NMI, #DB and #MC entries (per-CPU base)"),
    InstructionProbe(
        "cmpxchg16b",
        "LOCK CMPXCHG16B",
        "insn_cmpxchg16b",
        "Linux's SLUB allocator",
        CX16,
        "clearcpuid=cx16",
    ),
)


@dataclass(frozen=True)
class BitCountProbe:
    """LZCNT or TZCNT: F3-prefixed BSR/BSF encodings, which an emulator that ignores the
    prefix runs as BSR/BSF without an exit (SDM Vol. 2A "LZCNT", Vol. 2B "TZCNT")."""

    key: str
    mnemonic: str
    entry: str
    cpuid: CpuidBit
    expected: int  # the probe's result where the instruction runs as the SDM says
    substitute: str


BIT_COUNT_PROBES = (
    BitCountProbe("lzcnt", "LZCNT", "insn_lzcnt", ABM, 63, "BSR"),
    BitCountProbe("tzcnt", "TZCNT", "insn_tzcnt", BMI1, 64, "BSF"),
)


def bit_count_verdict(probe: BitCountProbe, run: ProbeRun) -> Check:
    """``run.reports``: the CPUID register holding the feature bit, then the result."""
    key, title = f"insn-{probe.key}", probe.mnemonic
    if not run.passed or len(run.reports) != 2:
        detail = f"exception {run.exception}" if run.exception is not None else run.ending
        return Check(key, title, "WARN", f"probe ended with {detail}")
    features, result = run.reports
    if not features >> probe.cpuid.bit & 1:
        return Check(
            key,
            title,
            "PASS",
            f"the guest's CPUID lacks it ({probe.cpuid.name}): it runs as "
            f"{probe.substitute}, as the SDM says it then does",
        )
    if result == probe.expected:
        return Check(key, title, "PASS", "runs (executed or completed)")
    # WARN, as every gap a Linux switch avoids: FAIL means a stock Linux stops here
    # (host-check's exit status, the boot tests' precondition), and with the switch
    # Linux does not use the instruction.
    switch = f"clearcpuid={probe.cpuid.name}"
    return Check(
        key,
        title,
        "WARN",
        f"silently wrong results: KVM runs it as {probe.substitute} with no exit (gave "
        f"{result}, not {probe.expected}); Linux is kept off it with {switch}",
        linux_switches=(switch,),
    )


EMULATED_NS_PER_INSTRUCTION = 20.0  # native code runs at ~0.3 ns; KVM's emulator at ~250


def _ns_per_instruction(guest: ProbeGuest, entry: str, mode: ProbeMode) -> float | None:
    """Per-instruction time of a dec/jnz loop: the difference of a long and a short run."""
    times: dict[int, float] = {}
    for count in (1, LOOP_COUNT) * 2:
        run = guest.run(entry, mode=mode, regs={"rcx": count})
        if not run.passed:
            return None
        times[count] = min(times.get(count, run.seconds), run.seconds)
    return max(times[LOOP_COUNT] - times[1], 0.0) / (2 * (LOOP_COUNT - 1)) * 1e9


def _speed_check(key: str, title: str, ns: float | None, what_slow_means: str) -> Check:
    if ns is None:
        return Check(key, title, "WARN", "the timing probe did not finish: speed unknown")
    if ns >= EMULATED_NS_PER_INSTRUCTION:
        return Check(
            key, title, "WARN", f"emulated, ~{ns:.0f} ns per instruction: {what_slow_means}"
        )
    return Check(key, title, "PASS", f"native (~{max(ns, 0.1):.1f} ns per instruction)")


def _cpuid_check(guest: ProbeGuest) -> tuple[Check, set[str], set[str]]:
    """Which flags the VMM can clear: set them all clear, read back what the guest sees.

    Returns the check, the flags the VMM can clear, and the tried flags the guest sees."""
    wanted = guest.cpuid
    for bit in CPUID_BITS_TRIED:
        wanted = bit.cleared_in(wanted)
    run = guest.run("cpuid_leaves", cpuid=wanted)
    title = "CPUID as the VMM sets it"
    if not run.passed or len(run.reports) != len(_REPORTED_REGISTERS):
        return Check("cpuid", title, "WARN", f"probe ended with {run.ending}"), set(), set()
    seen = dict(zip(_REPORTED_REGISTERS, run.reports, strict=True))
    visible = {
        bit.name for bit in CPUID_BITS_TRIED if seen[(bit.leaf, bit.register)] >> bit.bit & 1
    }
    ours = {bit.name for bit in CPUID_BITS_TRIED} - visible
    differing = []
    for (leaf, reg), value in seen.items():
        index = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}[reg]
        expected = next((e[index] for e in wanted if e[0] == leaf and e[1] == 0), 0)
        for position in range(32):
            if (value ^ expected) >> position & 1 and (leaf, reg, position) not in _DYNAMIC_BITS:
                differing.append(f"{leaf}.{reg.upper()}[{position}]")
    tried = [bit.name for bit in CPUID_BITS_TRIED]
    not_ours = [name for name in tried if name not in ours]
    if not differing:
        return Check("cpuid", title, "PASS", "the guest sees the flags the VMM sets"), ours, visible
    summary = (
        f"{len(differing)} flag bits differ from what the VMM set; clearing "
        f"{', '.join(not_ours) or 'nothing tried'} does not reach the guest"
        f"{' (only ' + ', '.join(sorted(ours)) + ' does)' if ours else ''}: "
        "guest kernels must be told with their own switches"
    )
    return Check("cpuid", title, "WARN", summary), ours, visible


def _instruction_check(guest: ProbeGuest, probe: InstructionProbe, ours: set[str]) -> Check:
    if probe.mode == "protected32":
        run = guest.run(probe.entry, mode="protected32")
    else:
        run = guest.run(probe.entry, handlers=dict(probe.handlers))
    return instruction_verdict(probe, run, ours)


def instruction_verdict(probe: InstructionProbe, run: ProbeRun, ours: set[str]) -> Check:
    """``ours``: the CPUID flags the VMM can hide from guests on this host."""
    key, title = f"insn-{probe.key}", probe.mnemonic
    if run.passed:
        return Check(key, title, "PASS", "runs (executed or completed)")
    if run.exception == 6:
        return Check(key, title, "PASS", "the CPU lacks it (#UD): guests do not use it")
    if run.ending != "emulation-failure":
        detail = f"exception {run.exception}" if run.exception is not None else run.ending
        return Check(key, title, "WARN", f"probe ended with {detail}")
    failing = f"KVM cannot emulate it ({probe.used_by})"
    if probe.cpuid is not None and probe.cpuid.name in ours:
        return Check(
            key,
            title,
            "WARN",
            f"{failing}; the VMM hides CPUID {probe.cpuid.name} so guests do not use it",
            cpuid_to_clear=(probe.cpuid.name,),
        )
    if probe.linux_switch is not None:
        return Check(
            key,
            title,
            "WARN",
            f"{failing}; Linux avoids it with {probe.linux_switch}",
            linux_switches=(probe.linux_switch,),
        )
    verdict: Verdict = "FAIL" if probe.fatal_for_linux else "WARN"
    return Check(key, title, verdict, f"{failing}; no switch avoids it: guests stop there")


def raise_level_interrupt(vm: kvmfast.Vm) -> None:
    """A level MSI on a reserved route, as our IOAPIC's pins deliver them."""
    vm.set_msi_route(LEVEL_GSI, MSI_ADDRESS, LEVEL_VECTOR | MSI_LEVEL | MSI_ASSERT)
    vm.irq_line(LEVEL_GSI, True)


def _early_eoi_check(guest: ProbeGuest) -> Check:
    run = guest.run(
        "early_eoi", handlers={LEVEL_VECTOR: "level_handler"}, on_signal=raise_level_interrupt
    )
    return early_eoi_verdict(run)


def early_eoi_verdict(run: ProbeRun) -> Check:
    """``run.reports``: the LAPIC's ISR and TMR words for the vector, read in its handler."""
    key, title = "early-eoi", "level interrupt EOI"
    if not run.passed or len(run.reports) != 2:
        return Check(key, title, "WARN", f"probe ended with {run.ending}")
    if run.reports[0] >> (LEVEL_VECTOR % 32) & 1:
        return Check(key, title, "PASS", "in service until the guest's EOI (as the SDM says)")
    return Check(
        key,
        title,
        "WARN",
        "EOIed at injection (KVM_EXIT_IOAPIC_EOI before the handler's EOI): a line still "
        "asserted is delivered once more; the IOAPIC's storm guard bounds it",
    )


def _deferred_injection_check(guest: ProbeGuest) -> Check:
    run = guest.run(
        "deferred_injection",
        handlers={EDGE_VECTOR: "edge_handler"},
        on_signal=lambda vm: vm.signal_msi(MSI_ADDRESS, EDGE_VECTOR),
    )
    return deferred_injection_verdict(run)


def deferred_injection_verdict(run: ProbeRun) -> Check:
    """``run.reports[0]``: the loop counter when the handler ran, NOT_TAKEN if it had not."""
    key, title = "deferred-injection", "interrupt pending at STI"
    if not run.passed or len(run.reports) != 1:
        return Check(key, title, "WARN", f"probe ended with {run.ending}")
    taken_at = run.reports[0]
    if taken_at == NOT_TAKEN:
        return Check(
            key,
            title,
            "WARN",
            "taken only at the guest's next exit: interrupts wait while it runs without exits",
        )
    late = (DEFERRED_LOOP - taken_at) * 2  # dec + jnz per iteration
    if late <= 4:
        return Check(key, title, "PASS", "taken right after STI's shadow")
    return Check(
        key,
        title,
        "WARN",
        f"taken ~{late} instructions after STI (the emulator's batch): interrupt latency "
        "grows while guest kernel code runs",
    )


def _syscall_check(guest: ProbeGuest, guest_sees_smap: bool) -> Check:
    # Linux's #PF entry begins with CLAC exactly when the guest sees SMAP, and that CLAC
    # is where kvmfast recognises the quirk's frame.
    handler = "page_fault_handler_smap" if guest_sees_smap else "page_fault_handler"
    msrs = {
        MSR_STAR: KERNEL_CS << 32,
        MSR_LSTAR: guest.program.symbols["syscall_entry"],
        MSR_FMASK: 0,
    }
    run = guest.run("user_syscall", mode="user", handlers={14: handler}, msrs=msrs)
    return syscall_verdict(run)


def syscall_verdict(run: ProbeRun) -> Check:
    """``run.reports``: CS at LSTAR, or the #PF frame's CS and CR2."""
    key, title = "user-syscall", "SYSCALL from user mode"
    if run.passed and run.reports == [KERNEL_CS]:
        return Check(key, title, "PASS", "enters LSTAR at CPL 0 (natively or repaired by kvmfast)")
    if run.exception == 14 or run.ending == "emulation-failure":
        return Check(
            key,
            title,
            "FAIL",
            "leaves CS at CPL 3, so fetching LSTAR faults into the guest kernel: Linux user "
            "processes cannot make system calls unless the VMM performs SYSCALL itself",
        )
    return Check(key, title, "WARN", f"probe ended with {run.ending} {run.detail}".strip())


def _hypercall_check(guest: ProbeGuest) -> Check:
    # Linux issues VMMCALL on AMD and VMCALL elsewhere (X86_FEATURE_VMMCALL).
    amd = any(entry[0] == 0 and entry[4] == AMD_VENDOR_EBX for entry in guest.cpuid)
    mnemonic, entry = ("VMMCALL", "hypercall_vmmcall") if amd else ("VMCALL", "hypercall_vmcall")
    call = replace(guest, timeout=HYPERCALL_TIMEOUT).run(entry)
    hidden = guest.cpuid
    for bit in HYPERCALL_FEATURES:
        hidden = bit.cleared_in(hidden)
    seen = guest.run("pv_features", cpuid=hidden)
    offered = tuple(bit for bit in HYPERCALL_FEATURES if bit.test(guest.cpuid))
    return hypercall_verdict(mnemonic, call, seen, offered)


def hypercall_verdict(
    mnemonic: str, call: ProbeRun, seen: ProbeRun, offered: tuple[CpuidBit, ...]
) -> Check:
    """``call``: an unknown hypercall (reports RAX); ``seen``: KVM's PV feature word as
    the guest reads it with ``HYPERCALL_FEATURES`` cleared; ``offered``: those of them
    KVM offers."""
    key, title = "hypercall", f"hypercall ({mnemonic})"
    if call.passed and call.reports == [KVM_ENOSYS_RESULT]:
        return Check(key, title, "PASS", "completes (KVM answers -KVM_ENOSYS to an unknown one)")
    if call.ending != "timeout":
        detail = f"exception {call.exception}" if call.exception is not None else call.ending
        return Check(key, title, "WARN", f"probe ended with {detail} {call.detail}".strip())
    never = f"never completes (the vCPU stays on {mnemonic})"
    names = tuple(bit.name for bit in offered)
    if not offered:
        return Check(key, title, "WARN", f"{never}; KVM offers no feature that makes Linux use it")
    if (
        seen.passed
        and len(seen.reports) == 1
        and not any(seen.reports[0] >> bit.bit & 1 for bit in offered)
    ):
        return Check(
            key,
            title,
            "WARN",
            f"{never}; the VMM hides {', '.join(names)} so that Linux makes none",
            cpuid_to_clear=names,
        )
    return Check(
        key,
        title,
        "FAIL",
        f"{never} and hiding {', '.join(names)} does not reach the guest: a Linux guest "
        "with two vCPUs or more stops at its first paravirtual IPI",
    )


def _kvm_check(kvm: kvmfast.Kvm) -> Check:
    split = kvm.check_extension(KVM_CAP_SPLIT_IRQCHIP)
    if not split:
        return Check("kvm", "KVM", "FAIL", "no KVM_CAP_SPLIT_IRQCHIP: this VMM cannot run here")
    return Check("kvm", "KVM", "PASS", f"/dev/kvm usable, API {kvm.api_version}, split irqchip")


def probe_host(kvm: kvmfast.Kvm | None = None) -> list[Check]:
    """Run every probe now (no cache)."""
    try:
        kvm = kvm if kvm is not None else kvmfast.Kvm()
    except OSError as error:
        return [Check("kvm", "KVM", "FAIL", f"/dev/kvm cannot be used: {error}")]
    checks = [_kvm_check(kvm)]
    if checks[0].verdict == "FAIL":
        return checks
    try:
        program = build_probe_program()
    except (AssemblerMissing, AssemblyError) as error:
        return [*checks, Check("probes", "probe guests", "WARN", f"not built: {error}")]
    guest = ProbeGuest(kvm, program, cpuid_for_vcpu(kvm.supported_cpuid(), 0, 1))
    checks.append(
        _speed_check(
            "kernel-code",
            "guest kernel code",
            _ns_per_instruction(guest, "count_loop", "kernel"),
            "a Linux boot takes minutes",
        )
    )
    checks.append(
        _speed_check(
            "user-code",
            "guest user code",
            _ns_per_instruction(guest, "user_count_loop", "user"),
            "guest programs run slowly",
        )
    )
    cpuid_check, ours, seen = _cpuid_check(guest)
    checks.append(cpuid_check)
    checks += [_instruction_check(guest, probe, ours) for probe in INSTRUCTION_PROBES]
    checks += [bit_count_verdict(probe, guest.run(probe.entry)) for probe in BIT_COUNT_PROBES]
    checks += [
        _early_eoi_check(guest),
        _deferred_injection_check(guest),
        _syscall_check(guest, SMAP.name in seen),
        _hypercall_check(guest),
    ]
    return checks


# -- the report and its cache ---------------------------------------------------------


@dataclass(frozen=True)
class HostReport:
    identity: dict[str, str]
    checks: list[Check]
    probe_seconds: float
    from_cache: bool = False

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.verdict == "FAIL"]

    def linux_switches(self) -> list[str]:
        """The Linux command-line switches that avoid this host's gaps, merged."""
        cleared: list[str] = []
        others: list[str] = []
        for check in self.checks:
            for switch in check.linux_switches:
                if switch.startswith("clearcpuid="):
                    names = switch.removeprefix("clearcpuid=").split(",")
                    cleared += [name for name in names if name not in cleared]
                elif switch not in others:
                    others.append(switch)
        return others + ([f"clearcpuid={','.join(cleared)}"] if cleared else [])

    def cpuid_bits_to_clear(self) -> list[CpuidBit]:
        names = {name for check in self.checks for name in check.cpuid_to_clear}
        return [bit for bit in (*CPUID_BITS_TRIED, *HYPERCALL_FEATURES) if bit.name in names]

    def lines(self) -> list[str]:
        return [check.line() for check in self.checks]

    def to_json(self) -> str:
        return json.dumps(
            {
                "identity": self.identity,
                "probe_seconds": self.probe_seconds,
                "checks": [asdict(check) for check in self.checks],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> HostReport:
        fields = json.loads(text)
        checks = [
            Check(
                key=str(c["key"]),
                title=str(c["title"]),
                verdict=_verdict(c["verdict"]),
                summary=str(c["summary"]),
                linux_switches=tuple(str(s) for s in c["linux_switches"]),
                cpuid_to_clear=tuple(str(s) for s in c["cpuid_to_clear"]),
            )
            for c in fields["checks"]
        ]
        identity = {str(k): str(v) for k, v in fields["identity"].items()}
        return cls(identity, checks, float(fields["probe_seconds"]), from_cache=True)


def _verdict(text: object) -> Verdict:
    if text == "PASS" or text == "WARN" or text == "FAIL":
        return text
    raise ValueError(f"unknown verdict {text!r}")


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _kvm_parameters(sysfs: Path = Path("/sys/module")) -> str:
    values = []
    for module in sorted(sysfs.glob("kvm*")):
        for parameter in sorted((module / "parameters").glob("*")):
            with contextlib.suppress(OSError):
                values.append(f"{module.name}.{parameter.name}={parameter.read_text().strip()}")
    return " ".join(values)


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


def _kvmfast_build() -> str:
    native = Path(kvmfast._native.__file__ or "")
    try:
        stat = native.stat()
    except OSError:
        return str(native)
    return f"{native} {stat.st_size} {stat.st_mtime_ns}"


def host_identity() -> dict[str, str]:
    """What the probes' results depend on: a change to any of these re-probes."""
    return {
        "release": os.uname().release,
        "osrelease": _read("/proc/sys/kernel/osrelease"),
        "version": _read("/proc/version"),
        "kvm_parameters": _kvm_parameters(),
        "cpu": _cpu_model(),
        "kvmfast": _kvmfast_build(),
        "probe_version": str(PROBE_VERSION),
    }


def cache_file(cache_dir: Path, identity: Mapping[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{CACHE_PREFIX}{digest[:24]}.json"


def host_report(
    cache_dir: Path | None, *, refresh: bool = False, kvm: kvmfast.Kvm | None = None
) -> HostReport:
    """This host's report: from the cache when this host was probed before, else probed now.

    A report whose probes could not all run (no assembler, no KVM) is not
    cached, so fixing that is seen at the next start.
    """
    identity = host_identity()
    path = None if cache_dir is None else cache_file(cache_dir, identity)
    if path is not None and not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            cached = HostReport.from_json(path.read_text())
            if cached.identity == identity:
                return cached
    began = time.perf_counter()
    checks = probe_host(kvm)
    report = HostReport(identity, checks, time.perf_counter() - began)
    complete = all(check.key != "probes" for check in checks) and checks[0].verdict == "PASS"
    if path is not None and complete:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(report.to_json())
            os.replace(temporary, path)
            _prune_cache(path.parent)
    return report


def _prune_cache(cache_dir: Path) -> None:
    """Removes all but the CACHE_KEEP newest reports."""
    reports = []
    for report in cache_dir.glob(f"{CACHE_PREFIX}*.json"):
        with contextlib.suppress(OSError):
            reports.append((report.stat().st_mtime_ns, report))
    for _, old in sorted(reports, reverse=True)[CACHE_KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()
