"""kvm_abi against the installed <linux/kvm.h> and <asm/kvm.h> (Linux UAPI, 6.1 or later).

Nothing here is a number typed into the test: a C program generated from kvm_abi's own
structs and constants prints what GCC makes of the header, and every size, alignment,
offset, signedness, bit-field position and value must agree. The completeness tests
parse the header's own #defines and struct definitions.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

import pytest
from abi_header_probe import (
    HeaderUnavailable,
    InstalledHeader,
    c_program,
    find_installed_header,
    header_facts,
    python_facts,
)

from kvm_abi import constants, ioctls, structs

STRUCTS: dict[str, Any] = {
    name: value
    for name, value in vars(structs).items()
    if name.startswith("kvm_") and isinstance(value, type)
}
CONSTANTS: dict[str, int] = {
    name: value
    for module in (constants, ioctls)
    for name, value in vars(module).items()
    if name.isupper() and not name.startswith("_") and isinstance(value, int)
}

# What kvm_abi leaves out of the header on purpose, by the reason why.
OTHER_ARCHITECTURES = re.compile(
    r"KVM_(S390|PPC|ARM|VM_PPC|VM_MIPS|VM_S390|VM_TYPE_ARM|MMU_FSL_BOOKE)_\w+"
    r"|KVM_CREATE_SPAPR_TCE(_64)?|KVM_ALLOCATE_RMA|KVM_DIRTY_TLB"
    r"|kvm_(s390|ppc|arm)_\w+|kvm_pv_cmd|kvm_config_tlb|kvm_dirty_tlb|kvm_vfio_spapr_tce"
)
# The header's "Deprecated interfaces" section, and KVM_DEBUG_GUEST ("no longer supported").
DEPRECATED = re.compile(
    r"KVM_TRC_\w+|KVM_TRACE_\w+|KVM_DEBUG_GUEST|kvm_user_trace_setup|kvm_breakpoint|kvm_debug_guest"
)
# Device assignment: its ioctls were removed in Linux 4.12 (VFIO replaced them); and
# KVM_SET_MEMORY_ALIAS, "obsolete" in the header, which kernels reject.
REMOVED = re.compile(
    r"KVM_(DE)?ASSIGN_\w+|KVM_DEV_ASSIGN_\w+|KVM_DEV_IRQ_\w+|KVM_MAX_MSIX_PER_DEV|kvm_assigned_\w+"
    r"|KVM_SET_MEMORY_ALIAS|kvm_memory_alias"
)
# Defined from PAGE_SIZE, which the UAPI headers leave undefined: not a userspace constant.
NOT_CONSTANT = re.compile(r"KVM_COALESCED_MMIO_MAX")
LEFT_OUT = (OTHER_ARCHITECTURES, DEPRECATED, REMOVED, NOT_CONSTANT)


def left_out(name: str) -> bool:
    return any(pattern.fullmatch(name) for pattern in LEFT_OUT)


@pytest.fixture(scope="module")
def installed_header() -> InstalledHeader:
    try:
        header = find_installed_header()
    except HeaderUnavailable as reason:
        pytest.skip(str(reason))
    if header.linux_version < (6, 1):
        pytest.skip(f"kvm_abi describes the 6.1 UAPI; the header is {header.linux_version}")
    return header


@pytest.fixture(scope="module")
def facts(
    installed_header: InstalledHeader, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, str], dict[str, str]]:
    """(kvm_abi's facts, the header's facts), for everything kvm_abi defines."""
    workdir: Path = tmp_path_factory.mktemp("kvm_abi_probe")
    ours = python_facts(STRUCTS, CONSTANTS)
    theirs = header_facts(installed_header, c_program(STRUCTS, CONSTANTS), workdir)
    return ours, theirs


def differences(ours: dict[str, str], theirs: dict[str, str], keys: list[str]) -> list[str]:
    return [
        f"{key}: kvm_abi {ours[key]}, <linux/kvm.h> {theirs.get(key, 'absent')}"
        for key in keys
        if ours[key] != theirs.get(key)
    ]


@pytest.mark.parametrize("struct_name", sorted(STRUCTS))
def test_struct_layout_matches_header(
    facts: tuple[dict[str, str], dict[str, str]], struct_name: str
) -> None:
    ours, theirs = facts
    keys = [key for key in ours if re.fullmatch(rf"\w+ {struct_name}(\..*)?", key)]
    assert f"sizeof {struct_name}" in keys
    assert differences(ours, theirs, keys) == []


def test_constant_values_match_header(facts: tuple[dict[str, str], dict[str, str]]) -> None:
    ours, theirs = facts
    keys = [key for key in ours if key.startswith("const ")]
    assert len(keys) == len(CONSTANTS)
    assert differences(ours, theirs, keys) == []


def test_every_constant_of_kvm_abi_is_defined_by_header(installed_header: InstalledHeader) -> None:
    assert sorted(set(CONSTANTS) - set(installed_header.defines)) == []


def test_every_kvm_define_of_header_is_in_kvm_abi(installed_header: InstalledHeader) -> None:
    """Every object-like KVM_* and *_VECTOR macro: caps, exits, flags, ioctls, ..."""
    header_names = {
        name
        for name in installed_header.defines
        if name.startswith("KVM_") or name.endswith("_VECTOR")
    }
    missing = sorted(name for name in header_names - set(CONSTANTS) if not left_out(name))
    assert missing == []


def test_every_kvm_struct_of_header_is_in_kvm_abi(installed_header: InstalledHeader) -> None:
    missing = sorted(
        name for name in installed_header.struct_names - set(STRUCTS) if not left_out(name)
    )
    assert missing == []


def test_exclusions_name_only_what_header_has(installed_header: InstalledHeader) -> None:
    """Each left-out pattern still matches something, so none hides a typo in kvm_abi."""
    names = set(installed_header.defines) | installed_header.struct_names
    for pattern in LEFT_OUT:
        assert any(pattern.fullmatch(name) for name in names), pattern.pattern
    assert not any(left_out(name) for name in [*CONSTANTS, *STRUCTS])


def test_brief_families_are_present() -> None:
    """The families the issue names, each with members (the header test checks them all)."""
    for prefix in (
        "KVM_CAP_",
        "KVM_EXIT_",
        "KVM_INTERNAL_ERROR_",
        "KVM_MP_STATE_",
        "KVM_SYSTEM_EVENT_",
        "KVM_IRQ_ROUTING_",
        "KVM_IRQFD_FLAG_",
        "KVM_IOEVENTFD_FLAG_",
        "KVM_MEM_",
        "KVM_VCPUEVENT_VALID_",
        "KVM_GUESTDBG_",
    ):
        assert any(name.startswith(prefix) for name in CONSTANTS), prefix
    for struct_name in [
        "kvm_run",
        "kvm_regs",
        "kvm_sregs",
        "kvm_segment",
        "kvm_dtable",
        "kvm_fpu",
        "kvm_lapic_state",
        "kvm_cpuid2",
        "kvm_cpuid_entry2",
        "kvm_msrs",
        "kvm_msr_entry",
        "kvm_userspace_memory_region",
        "kvm_interrupt",
        "kvm_ioeventfd",
        "kvm_irqfd",
        "kvm_msi",
        "kvm_irq_routing",
        "kvm_irq_routing_entry",
        "kvm_enable_cap",
        "kvm_irq_level",
        "kvm_pit_config",
        "kvm_pit_state2",
        "kvm_vcpu_events",
        "kvm_mp_state",
        "kvm_clock_data",
        "kvm_guest_debug",
        "kvm_xsave",
        "kvm_xcrs",
        "kvm_debugregs",
        "kvm_irqchip",
    ]:
        assert struct_name in STRUCTS


def test_probe_names_the_member_and_constant_that_differ(
    installed_header: InstalledHeader, tmp_path: Path
) -> None:
    """The comparison itself: a kvm_segment with a 4-byte selector and a wrong KVM_RUN."""

    class kvm_segment(ctypes.Structure):
        _fields_ = (
            *((name, ctype) for name, ctype in structs.kvm_segment._fields_[:2]),
            ("selector", ctypes.c_uint32),
            *((name, ctype) for name, ctype in structs.kvm_segment._fields_[3:]),
        )

    wrong_structs = {"kvm_segment": kvm_segment}
    wrong_constants = {"KVM_RUN": ioctls.KVM_RUN + 1}
    ours = python_facts(wrong_structs, wrong_constants)
    theirs = header_facts(installed_header, c_program(wrong_structs, wrong_constants), tmp_path)
    found = differences(ours, theirs, list(ours))
    assert "sizeof kvm_segment.selector: kvm_abi 4, <linux/kvm.h> 2" in found
    assert "offsetof kvm_segment.type: kvm_abi 16, <linux/kvm.h> 14" in found
    assert f"const KVM_RUN: kvm_abi {ioctls.KVM_RUN + 1}, <linux/kvm.h> {ioctls.KVM_RUN}" in found
