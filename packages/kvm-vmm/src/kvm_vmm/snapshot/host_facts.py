"""The facts of the host a snapshot depends on, and whether this host has them.

A guest keeps using what its CPU showed at boot: a feature this host lacks would #UD
(or worse) after the restore, and a TSC that ticks at another rate would skew the
guest's clock, so both are checked before anything is restored. The rest (the CPU's
name, the kernel) is recorded to say where a snapshot came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvm_vmm.cpuid import CpuidEntry

# CPUID words that list features, as (leaf, subleaf, register index into eax..edx).
FEATURE_WORDS = (
    (0x1, 0, 2),
    (0x1, 0, 3),
    (0x7, 0, 1),
    (0x7, 0, 2),
    (0x7, 0, 3),
    (0xD, 1, 0),
    (0x80000001, 0, 2),
    (0x80000001, 0, 3),
)
REGISTERS = ("eax", "ebx", "ecx", "edx")
# Bits KVM itself updates in a vCPU's CPUID as the guest runs (kvm_update_cpuid_runtime):
# OSXSAVE and APIC in leaf 1, OSPKE in leaf 7: they follow CR4 and APIC_BASE, not the host.
RUNTIME_BITS = {(0x1, 0, 2): 1 << 27, (0x1, 0, 3): 1 << 9, (0x7, 0, 2): 1 << 4}
TSC_TOLERANCE_PPM = 250  # two hosts of one kind calibrate their TSCs this close


def cpu_vendor(cpuid: Iterable[CpuidEntry]) -> str:
    for function, index, _flags, _eax, ebx, ecx, edx in cpuid:
        if (function, index) == (0, 0):
            return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode("latin-1")
    return "unknown"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def host_facts(supported: list[CpuidEntry], tsc_khz: int) -> dict[str, object]:
    return {
        "cpu_vendor": cpu_vendor(supported),
        "cpu_model": cpu_model(),
        "tsc_khz": tsc_khz,
        "kernel": os.uname().release,
    }


def missing_features(guest: Iterable[CpuidEntry], host: Iterable[CpuidEntry]) -> list[str]:
    """Feature bits the guest's CPUID shows that ``host`` (what this host would give a
    vCPU) does not, as "leaf 0x7.0 ebx bit 5"."""
    words = {word: 0 for word in FEATURE_WORDS}
    host_words = dict(words)
    for table, entries in ((words, guest), (host_words, host)):
        for function, index, _flags, *registers in entries:
            for word in FEATURE_WORDS:
                if word[:2] == (function, index):
                    table[word] = registers[word[2]]
    missing = []
    for word in FEATURE_WORDS:
        lacking = words[word] & ~host_words[word] & ~RUNTIME_BITS.get(word, 0)
        for bit in range(32):
            if lacking >> bit & 1:
                leaf, subleaf, register = word
                missing.append(f"leaf {leaf:#x}.{subleaf} {REGISTERS[register]} bit {bit}")
    return missing


def host_problem(saved: Mapping[str, object], here: Mapping[str, object]) -> str | None:
    """Why a snapshot taken on ``saved``'s host cannot run on ``here``, or None."""
    if saved.get("cpu_vendor") != here["cpu_vendor"]:
        return (
            f"it was taken on a {saved.get('cpu_vendor')} CPU; this host's is {here['cpu_vendor']}"
        )
    saved_khz, khz = saved.get("tsc_khz"), here["tsc_khz"]
    if not isinstance(saved_khz, int) or not isinstance(khz, int) or saved_khz <= 0:
        return f"its host's TSC rate {saved_khz!r} is not a number of kHz"
    if abs(saved_khz - khz) * 1_000_000 > khz * TSC_TOLERANCE_PPM:
        return (
            f"its host's TSC ran at {saved_khz} kHz, this one's at {khz} kHz: the guest's"
            " clock would run at the wrong rate"
        )
    return None
