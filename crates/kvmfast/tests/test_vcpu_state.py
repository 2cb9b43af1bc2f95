"""vCPU state ioctls as dicts (KVM API doc 4.11-4.14 KVM_GET/SET_REGS and SREGS, 4.22
FPU, 4.57 LAPIC, 4.18 MSRS, 4.31 VCPU_EVENTS, 4.38 MP_STATE, 4.46 KVM_SET_CPUID2):
setters take partial dicts and leave the rest as it was."""

from __future__ import annotations

import struct

import pytest

from kvmfast import Kvm, KvmError, Vcpu
from kvmfast.testing import (
    LAPIC_LVT_LINT0,
    LAPIC_LVT_LINT1,
    LAPIC_SVR,
    LVT_EXTINT,
    LVT_NMI,
    set_lint0_extint,
)

pytestmark = pytest.mark.kvm

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_TSC_AUX = 0xC0000103
MSR_STAR = 0xC0000081


@pytest.fixture
def vcpu(kvm: Kvm) -> Vcpu:
    return kvm.create_vm().create_vcpu(0)


def test_set_regs_changes_only_the_given_registers(vcpu: Vcpu) -> None:
    before = vcpu.get_regs()
    assert set(before) == {
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    }  # fmt: skip
    vcpu.set_regs({"rax": 0x1122334455667788, "r15": 7})
    after = vcpu.get_regs()
    assert after["rax"] == 0x1122334455667788 and after["r15"] == 7
    assert {k: v for k, v in after.items() if k not in ("rax", "r15")} == {
        k: v for k, v in before.items() if k not in ("rax", "r15")
    }
    with pytest.raises(ValueError, match="no field"):
        vcpu.set_regs({"eax": 1})
    with pytest.raises(OverflowError):
        vcpu.set_regs({"rax": 1 << 64})


def test_set_sregs_patches_nested_segment_fields(vcpu: Vcpu) -> None:
    before = vcpu.get_sregs()
    assert before["cs"]["selector"] == 0xF000  # reset state (SDM Vol. 3A 9.1.4)
    vcpu.set_sregs({"ds": {"base": 0x12340}, "gdt": {"limit": 0x17}, "cr2": 0xDEAD})
    after = vcpu.get_sregs()
    assert after["ds"]["base"] == 0x12340
    assert after["ds"]["selector"] == before["ds"]["selector"]
    assert after["gdt"] == {"base": before["gdt"]["base"], "limit": 0x17}
    assert after["cr2"] == 0xDEAD
    assert after["cs"] == before["cs"]
    with pytest.raises(ValueError):
        vcpu.set_sregs({"ds": {"typ": 3}})  # type: ignore[typeddict-unknown-key]


def test_fpu_round_trip(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    assert len(fpu["xmm"]) == 16 and len(fpu["fpr"]) == 8
    xmm = list(fpu["xmm"])
    xmm[3] = bytes(range(16))
    vcpu.set_fpu({"xmm": xmm, "fcw": 0x27F})
    again = vcpu.get_fpu()
    assert again["xmm"][3] == bytes(range(16))
    assert again["fcw"] == 0x27F
    assert again["fpr"] == fpu["fpr"]
    with pytest.raises(ValueError):
        vcpu.set_fpu({"xmm": [b"short"]})


def test_lapic_page_and_lint0_extint(vcpu: Vcpu) -> None:
    page = vcpu.get_lapic()
    assert len(page) == 1024
    set_lint0_extint(vcpu)
    page = vcpu.get_lapic()

    def register(offset: int) -> int:
        value: int = struct.unpack_from("<I", page, offset)[0]
        return value

    assert register(LAPIC_LVT_LINT0) & 0x1_07FF == LVT_EXTINT
    assert register(LAPIC_LVT_LINT1) & 0x1_07FF == LVT_NMI
    assert register(LAPIC_SVR) & 0x1FF == 0x1FF
    with pytest.raises(ValueError):
        vcpu.set_lapic(b"\0" * 100)


def test_msrs_round_trip_and_unknown_msrs_are_named(vcpu: Vcpu) -> None:
    vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10, MSR_STAR: 0x0023_0010_0000_0000})
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS, MSR_STAR]) == {
        MSR_IA32_SYSENTER_CS: 0x10,
        MSR_STAR: 0x0023_0010_0000_0000,
    }
    with pytest.raises(KvmError, match="0xdeadbeef"):
        vcpu.get_msrs([MSR_IA32_SYSENTER_CS, 0xDEADBEEF])
    with pytest.raises(KvmError, match="0xdeadbeef"):
        vcpu.set_msrs({0xDEADBEEF: 1})


def test_vcpu_events_and_mp_state(vcpu: Vcpu) -> None:
    events = vcpu.get_vcpu_events()
    assert events["nmi"]["pending"] == 0
    vcpu.set_vcpu_events({"nmi": {"masked": 1}})
    assert vcpu.get_vcpu_events()["nmi"]["masked"] == 1
    assert vcpu.get_mp_state() == 0  # KVM_MP_STATE_RUNNABLE for the BSP
    vcpu.set_mp_state(3)  # KVM_MP_STATE_HALTED
    assert vcpu.get_mp_state() == 3


def test_set_cpuid_accepts_the_supported_table(kvm: Kvm, vcpu: Vcpu) -> None:
    supported = kvm.supported_cpuid()
    vcpu.set_cpuid(supported)
    with pytest.raises(ValueError, match="too many"):
        vcpu.set_cpuid([(0, 0, 0, 0, 0, 0, 0)] * 300)
