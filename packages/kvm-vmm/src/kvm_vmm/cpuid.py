"""The CPUID each vCPU gets: what KVM supports, with its own topology patched in.

On some hosts (see HOST-KVM.md) most of these leaves never reach the guest
unchanged; the APIC ID and topology fields do, and they must be per vCPU.
"""

from __future__ import annotations

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx

LEAF_FEATURES = 0x1
LEAF_EXTENDED_TOPOLOGY = 0xB
LEAF_V2_EXTENDED_TOPOLOGY = 0x1F
HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX: EBX[23:16] is valid


def cpuid_for_vcpu(supported: list[CpuidEntry], apic_id: int, vcpu_count: int) -> list[CpuidEntry]:
    entries: list[CpuidEntry] = []
    for function, index, flags, eax, ebx, ecx, edx in supported:
        if function == LEAF_FEATURES:
            ebx = (ebx & 0x0000FFFF) | (min(vcpu_count, 255) << 16) | ((apic_id & 0xFF) << 24)
            ecx |= HYPERVISOR_BIT
            edx = edx | HTT_BIT if vcpu_count > 1 else edx & ~HTT_BIT
        elif function in (LEAF_EXTENDED_TOPOLOGY, LEAF_V2_EXTENDED_TOPOLOGY):
            edx = apic_id
        entries.append((function, index, flags, eax, ebx, ecx, edx))
    return entries
