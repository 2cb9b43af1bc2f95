"""A vCPU's whole state as JSON-able data, and its restore in the order KVM needs.

Saved while the vCPU is paused at kvmfast's clean point (no SYSCALL repair, ExtINT
acknowledgement or I/O completion in flight), so KVM's state is all there is.

Restore order (api.rst and what QEMU's kvm_arch_put_registers does):
CPUID first (it decides which XSAVE components and MSRs exist), MP state, regs, sregs
(CR0/CR4/EFER before the state that depends on them), XSAVE and XCRs, debug registers,
the LAPIC after sregs (APIC_BASE comes with sregs), MSRs after the LAPIC with
IA32_TSC_DEADLINE last (it is relative to the TSC, which must be set first, and only
accepted while the LAPIC's timer is in TSC-deadline mode), and the vCPU events last
(an injected exception or NMI refers to the state restored before it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import kvmfast

if TYPE_CHECKING:
    from kvmfast._native import VcpuEvents

from kvm_vmm.snapshot.shape import ShapeError, check_like, check_u64, hex_bytes, int_pairs

MSR_IA32_TSC_DEADLINE = 0x6E0
# KVM_VCPUEVENT_VALID_*: which parts of kvm_vcpu_events KVM_SET_VCPU_EVENTS takes.
VALID_NMI_PENDING = 0x1
VALID_SIPI_VECTOR = 0x2
VALID_SHADOW = 0x4
VALID_SMM = 0x8
RESTORED_EVENTS = VALID_NMI_PENDING | VALID_SIPI_VECTOR | VALID_SHADOW | VALID_SMM
VCPU_STATE_KEYS = (
    "cpuid",
    "mp_state",
    "regs",
    "sregs",
    "xsave",
    "xcrs",
    "debugregs",
    "lapic",
    "msrs",
    "events",
)


def save_vcpu(vcpu: kvmfast.Vcpu, msr_indices: list[int]) -> dict[str, object]:
    """Everything KVM holds for ``vcpu``; ``msr_indices`` is KVM_GET_MSR_INDEX_LIST."""
    return {
        "cpuid": [list(entry) for entry in vcpu.get_cpuid()],
        "mp_state": vcpu.get_mp_state(),
        "regs": dict(vcpu.get_regs()),
        "sregs": dict(vcpu.get_sregs()),
        "xsave": vcpu.get_xsave().hex(),
        "xcrs": sorted([index, value] for index, value in vcpu.get_xcrs().items()),
        "debugregs": dict(vcpu.get_debugregs()),
        "lapic": vcpu.get_lapic().hex(),
        "msrs": sorted([index, value] for index, value in vcpu.save_msrs(msr_indices).items()),
        "events": dict(vcpu.get_vcpu_events()),
    }


def check_vcpu(data: object, fresh: kvmfast.Vcpu, path: str) -> dict[str, Any]:
    """``data`` checked against the shapes ``fresh`` (a vCPU of the restoring VM) gives:
    raises :class:`ShapeError` naming the first field that is wrong."""
    if not isinstance(data, dict) or sorted(data) != sorted(VCPU_STATE_KEYS):
        raise ShapeError(path, f"expected a mapping of {', '.join(VCPU_STATE_KEYS)}")
    cpuid = data["cpuid"]
    if not isinstance(cpuid, list) or not cpuid:
        raise ShapeError(f"{path}.cpuid", "expected a list of entries")
    for index, entry in enumerate(cpuid):
        check_like(entry, [0] * 7, f"{path}.cpuid[{index}]")
    check_u64(data["mp_state"], f"{path}.mp_state")
    check_like(data["regs"], fresh.get_regs(), f"{path}.regs")
    check_like(data["sregs"], fresh.get_sregs(), f"{path}.sregs")
    hex_bytes(data["xsave"], len(fresh.get_xsave()), f"{path}.xsave")
    int_pairs(data["xcrs"], f"{path}.xcrs")
    check_like(data["debugregs"], fresh.get_debugregs(), f"{path}.debugregs")
    hex_bytes(data["lapic"], len(fresh.get_lapic()), f"{path}.lapic")
    int_pairs(data["msrs"], f"{path}.msrs")
    check_like(data["events"], fresh.get_vcpu_events(), f"{path}.events")
    return cast(dict[str, Any], data)


def restore_vcpu(vcpu: kvmfast.Vcpu, state: Mapping[str, Any]) -> None:
    """Put a state check_vcpu() accepted into ``vcpu``, in the order of the module
    documentation. KVM's refusal of a part raises KvmError (or ValueError) naming it."""
    vcpu.set_cpuid([tuple(entry) for entry in state["cpuid"]])
    vcpu.set_mp_state(state["mp_state"])
    vcpu.set_regs(state["regs"])
    vcpu.set_sregs(state["sregs"])
    vcpu.set_xsave(bytes.fromhex(state["xsave"]))
    vcpu.set_xcrs(dict(map(tuple, state["xcrs"])))
    vcpu.set_debugregs(state["debugregs"])
    vcpu.set_lapic(bytes.fromhex(state["lapic"]))
    msrs = dict(map(tuple, state["msrs"]))
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    vcpu.set_msrs(msrs)
    if deadline is not None:
        vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})
    events = dict(state["events"])
    events["flags"] = events["flags"] | RESTORED_EVENTS
    vcpu.set_vcpu_events(cast("VcpuEvents", events))
