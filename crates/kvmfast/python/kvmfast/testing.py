"""Helpers shared by the KVM-backed tests of every package.

:func:`require_kvm` skips (or, on CI machines that have KVM, fails) a test when
/dev/kvm is unusable, and :func:`set_lint0_extint` opens a vCPU's LINT0 to the PIC.
The tests' guests are built with :mod:`kvmfast.assembler` and entered with
:mod:`kvmfast.flat_guest`, whose names this module re-exports for them; production
code imports those modules, never this one.
"""

from __future__ import annotations

import os
import struct

from kvmfast._native import Vcpu
from kvmfast.assembler import (
    AssemblerMissing,
    AssemblyError,
    GuestProgram,
    assemble,
    assemble_program,
)
from kvmfast.flat_guest import install_idt, setup_long_mode, setup_protected_mode

__all__ = [
    "LAPIC_LVT_LINT0",
    "LAPIC_LVT_LINT1",
    "LAPIC_SVR",
    "LVT_EXTINT",
    "LVT_NMI",
    "REQUIRE_KVM_ENV",
    "SVR_ENABLED_SPURIOUS_FF",
    "AssemblerMissing",
    "AssemblyError",
    "GuestProgram",
    "assemble",
    "assemble_program",
    "install_idt",
    "kvm_unavailable_reason",
    "require_kvm",
    "set_lint0_extint",
    "setup_long_mode",
    "setup_protected_mode",
]

REQUIRE_KVM_ENV = "KVM_SPLIT_REQUIRE_KVM"

# Local APIC register offsets (Intel SDM Vol. 3A, Table 11-1) and LVT encodings
# (Figure 11-8): delivery mode ExtINT = 0b111, NMI = 0b100, mask bit 16 clear.
LAPIC_SVR = 0xF0
LAPIC_LVT_LINT0 = 0x350
LAPIC_LVT_LINT1 = 0x360
LVT_EXTINT = 0x700
LVT_NMI = 0x400
SVR_ENABLED_SPURIOUS_FF = 0x1FF


def set_lint0_extint(vcpu: Vcpu) -> None:
    """Let the PIC's ExtINT through: LVT LINT0 = ExtINT, LINT1 = NMI, APIC enabled.

    A reset local APIC masks LINT0, and then KVM_INTERRUPT is accepted but never
    delivered (../shared/HOST-KVM.md).
    """
    page = bytearray(vcpu.get_lapic())
    struct.pack_into("<I", page, LAPIC_LVT_LINT0, LVT_EXTINT)
    struct.pack_into("<I", page, LAPIC_LVT_LINT1, LVT_NMI)
    struct.pack_into("<I", page, LAPIC_SVR, SVR_ENABLED_SPURIOUS_FF)
    vcpu.set_lapic(bytes(page))


def kvm_unavailable_reason() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm (this host has no KVM)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no /dev/kvm (present but not readable and writable by this user)"
    return None


def require_kvm() -> None:
    """Skip the calling test when KVM is unusable; fail instead when the environment
    variable KVM_SPLIT_REQUIRE_KVM=1 says this machine must have it."""
    import pytest

    reason = kvm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_KVM_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_KVM_ENV}=1 requires KVM")
    pytest.skip(reason)
