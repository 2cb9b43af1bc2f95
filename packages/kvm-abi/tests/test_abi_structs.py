"""Using the ctypes structs as the header's comments describe them (no compiler needed)."""

import ctypes

import pytest

import kvm_abi
from kvm_abi import (
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_irq_level,
    kvm_irq_routing,
    kvm_msrs,
    kvm_run,
    kvm_segment,
    kvm_xsave,
    with_flexible_array,
)


@pytest.mark.parametrize(
    ("struct_type", "array_name"),
    [(kvm_cpuid2, "entries"), (kvm_msrs, "entries"), (kvm_irq_routing, "entries")],
)
def test_flexible_array_grows_after_the_header_fields(
    struct_type: type[ctypes.Structure], array_name: str
) -> None:
    """__DECLARE_FLEX_ARRAY: the array starts where the fixed part ends."""
    sized = with_flexible_array(struct_type, 5)
    element = getattr(struct_type, array_name)
    element_size = ctypes.sizeof(getattr(struct_type(), array_name)._type_)
    assert getattr(sized, array_name).offset == element.offset
    assert ctypes.sizeof(sized) == ctypes.sizeof(struct_type) + 5 * element_size
    assert isinstance(sized(), struct_type)
    assert len(getattr(sized(), array_name)) == 5


def test_flexible_cpuid2_entries_are_cpuid_entry2() -> None:
    cpuid = with_flexible_array(kvm_cpuid2, 2)()
    cpuid.nent = 2
    cpuid.entries[1].function = 0x4000_0000
    raw = bytes(cpuid)
    entry_offset = kvm_cpuid2.entries.offset + ctypes.sizeof(kvm_cpuid_entry2)
    assert int.from_bytes(raw[entry_offset : entry_offset + 4], "little") == 0x4000_0000


def test_xsave_extra_region_follows_the_4096_bytes() -> None:
    """kvm_xsave: region[1024] then extra[] for KVM_CAP_XSAVE2 sizes beyond 4096."""
    assert ctypes.sizeof(with_flexible_array(kvm_xsave, 256)) == 4096 + 1024


def test_flexible_array_refuses_a_struct_without_one() -> None:
    with pytest.raises(TypeError):
        with_flexible_array(kvm_segment, 3)
    with pytest.raises(ValueError):
        with_flexible_array(kvm_cpuid2, -1)


def test_irq_level_status_overlays_irq() -> None:
    """KVM_IRQ_LINE_STATUS returns its status in the union with the irq it read."""
    level = kvm_irq_level(level=1)
    level.irq = 0xFFFF_FFFF
    assert level.status == -1


def test_kvm_run_exit_members_share_the_union() -> None:
    """kvm_run's exit union: io, mmio, eoi, ... all start at the same offset."""
    offsets = {
        getattr(kvm_run, name).offset
        for name in ("hw", "fail_entry", "io", "mmio", "eoi", "system_event", "internal")
    }
    assert offsets == {kvm_run.exit.offset}
    assert kvm_run.kvm_valid_regs.offset == kvm_run.exit.offset + 256


def test_kvm_run_reads_an_io_exit_from_a_page() -> None:
    """KVM_EXIT_IO: data is at io.data_offset bytes from the start of kvm_run."""
    page = bytearray(4096)
    run = kvm_run.from_buffer(page)
    run.exit_reason = kvm_abi.KVM_EXIT_IO
    run.io.direction = kvm_abi.KVM_EXIT_IO_OUT
    run.io.size = 1
    run.io.port = 0x3F8
    run.io.count = 1
    run.io.data_offset = 4096 - 8
    page[4096 - 8] = ord("A")
    assert page[run.io.data_offset] == ord("A")
    assert int.from_bytes(page[kvm_run.io.offset + 2 : kvm_run.io.offset + 4], "little") == 0x3F8


def test_emulation_failure_instruction_bytes_overlay_internal_data() -> None:
    """linux/kvm.h: emulation_failure overlays internal; flags is data[0], then insn_size."""
    run = kvm_run()
    run.internal.data[0] = kvm_abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    run.internal.data[1] = 0xCA_01_0F_03  # size 3, then 0f 01 ca (CLAC), little endian
    assert run.emulation_failure.flags == 1
    assert run.emulation_failure.insn_size == 3
    assert list(run.emulation_failure.insn_bytes[:3]) == [0x0F, 0x01, 0xCA]
