"""The structs of <linux/kvm.h> and <asm/kvm.h> (x86-64) as ctypes types, named as in C.

ctypes lays a Structure out with the platform C compiler's rules, so natural alignment
and padding come out as GCC's. Every class named ``kvm_*`` here is checked member by
member against the installed header by the tests.

Conventions:
- A C struct or union that has no name of its own (a member's inline type) is a private
  class named after its path, e.g. ``_kvm_run_io`` for ``kvm_run.io``.
- An anonymous C union or struct is a member listed in ``_anonymous_``, so its members
  are reached as in C (``run.io``, ``level.irq``); the member's own name (``exit``,
  ``u``) is not a C name.
- A flexible array member (``__DECLARE_FLEX_ARRAY`` or ``[0]``) is an array of length 0;
  ``with_flexible_array`` makes a type with room for n elements.
- ``char`` arrays are ``c_char`` arrays, as in C; ``.raw`` gives their bytes.
"""

import ctypes as _ctypes
from typing import Any as _Any
from typing import TypeVar as _TypeVar

from kvm_abi import constants as _c

_Structure = _ctypes.Structure
_Union = _ctypes.Union
_u8 = _ctypes.c_uint8
_u16 = _ctypes.c_uint16
_u32 = _ctypes.c_uint32
_u64 = _ctypes.c_uint64
_s16 = _ctypes.c_int16
_s32 = _ctypes.c_int32
_s64 = _ctypes.c_int64
_char = _ctypes.c_char
_ulong = _ctypes.c_ulong
_pointer = _ctypes.c_void_p


# --- <asm/kvm.h> ----------------------------------------------------------------


class kvm_pic_state(_Structure):
    _fields_ = (
        ("last_irr", _u8),
        ("irr", _u8),
        ("imr", _u8),
        ("isr", _u8),
        ("priority_add", _u8),
        ("irq_base", _u8),
        ("read_reg_select", _u8),
        ("poll", _u8),
        ("special_mask", _u8),
        ("init_state", _u8),
        ("auto_eoi", _u8),
        ("rotate_on_auto_eoi", _u8),
        ("special_fully_nested_mode", _u8),
        ("init4", _u8),
        ("elcr", _u8),
        ("elcr_mask", _u8),
    )


class _kvm_ioapic_state_redirtbl_fields(_Structure):
    _fields_ = (
        ("vector", _u8),
        ("delivery_mode", _u8, 3),
        ("dest_mode", _u8, 1),
        ("delivery_status", _u8, 1),
        ("polarity", _u8, 1),
        ("remote_irr", _u8, 1),
        ("trig_mode", _u8, 1),
        ("mask", _u8, 1),
        ("reserve", _u8, 7),
        ("reserved", _u8 * 4),
        ("dest_id", _u8),
    )


class _kvm_ioapic_state_redirtbl(_Union):
    _fields_ = (("bits", _u64), ("fields", _kvm_ioapic_state_redirtbl_fields))


class kvm_ioapic_state(_Structure):
    _fields_ = (
        ("base_address", _u64),
        ("ioregsel", _u32),
        ("id", _u32),
        ("irr", _u32),
        ("pad", _u32),
        ("redirtbl", _kvm_ioapic_state_redirtbl * _c.KVM_IOAPIC_NUM_PINS),
    )


class kvm_regs(_Structure):
    _fields_ = tuple(
        (name, _u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class kvm_lapic_state(_Structure):
    _fields_ = (("regs", _char * _c.KVM_APIC_REG_SIZE),)


class kvm_segment(_Structure):
    _fields_ = (
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    )


class kvm_dtable(_Structure):
    _fields_ = (("base", _u64), ("limit", _u16), ("padding", _u16 * 3))


_SREGS_SEGMENTS = [
    (name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
]
_SREGS_TABLES_AND_CONTROL = [
    ("gdt", kvm_dtable),
    ("idt", kvm_dtable),
    ("cr0", _u64),
    ("cr2", _u64),
    ("cr3", _u64),
    ("cr4", _u64),
    ("cr8", _u64),
    ("efer", _u64),
    ("apic_base", _u64),
]


class kvm_sregs(_Structure):
    _fields_ = (
        *_SREGS_SEGMENTS,
        *_SREGS_TABLES_AND_CONTROL,
        ("interrupt_bitmap", _u64 * ((_c.KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_sregs2(_Structure):
    _fields_ = (
        *_SREGS_SEGMENTS,
        *_SREGS_TABLES_AND_CONTROL,
        ("flags", _u64),
        ("pdptrs", _u64 * 4),
    )


class kvm_fpu(_Structure):
    _fields_ = (
        ("fpr", (_u8 * 16) * 8),
        ("fcw", _u16),
        ("fsw", _u16),
        ("ftwx", _u8),
        ("pad1", _u8),
        ("last_opcode", _u16),
        ("last_ip", _u64),
        ("last_dp", _u64),
        ("xmm", (_u8 * 16) * 16),
        ("mxcsr", _u32),
        ("pad2", _u32),
    )


class kvm_msr_entry(_Structure):
    _fields_ = (("index", _u32), ("reserved", _u32), ("data", _u64))


class kvm_msrs(_Structure):
    _fields_ = (("nmsrs", _u32), ("pad", _u32), ("entries", kvm_msr_entry * 0))


class kvm_msr_list(_Structure):
    _fields_ = (("nmsrs", _u32), ("indices", _u32 * 0))


class kvm_msr_filter_range(_Structure):
    _fields_ = (("flags", _u32), ("nmsrs", _u32), ("base", _u32), ("bitmap", _pointer))


class kvm_msr_filter(_Structure):
    _fields_ = (("flags", _u32), ("ranges", kvm_msr_filter_range * _c.KVM_MSR_FILTER_MAX_RANGES))


class kvm_cpuid_entry(_Structure):
    _fields_ = (
        ("function", _u32),
        ("eax", _u32),
        ("ebx", _u32),
        ("ecx", _u32),
        ("edx", _u32),
        ("padding", _u32),
    )


class kvm_cpuid(_Structure):
    _fields_ = (("nent", _u32), ("padding", _u32), ("entries", kvm_cpuid_entry * 0))


class kvm_cpuid_entry2(_Structure):
    _fields_ = (
        ("function", _u32),
        ("index", _u32),
        ("flags", _u32),
        ("eax", _u32),
        ("ebx", _u32),
        ("ecx", _u32),
        ("edx", _u32),
        ("padding", _u32 * 3),
    )


class kvm_cpuid2(_Structure):
    _fields_ = (("nent", _u32), ("padding", _u32), ("entries", kvm_cpuid_entry2 * 0))


class kvm_pit_channel_state(_Structure):
    _fields_ = (
        ("count", _u32),
        ("latched_count", _u16),
        ("count_latched", _u8),
        ("status_latched", _u8),
        ("status", _u8),
        ("read_state", _u8),
        ("write_state", _u8),
        ("write_latch", _u8),
        ("rw_mode", _u8),
        ("mode", _u8),
        ("bcd", _u8),
        ("gate", _u8),
        ("count_load_time", _s64),
    )


class kvm_debug_exit_arch(_Structure):
    _fields_ = (
        ("exception", _u32),
        ("pad", _u32),
        ("pc", _u64),
        ("dr6", _u64),
        ("dr7", _u64),
    )


class kvm_guest_debug_arch(_Structure):
    _fields_ = (("debugreg", _u64 * 8),)


class kvm_pit_state(_Structure):
    _fields_ = (("channels", kvm_pit_channel_state * 3),)


class kvm_pit_state2(_Structure):
    _fields_ = (
        ("channels", kvm_pit_channel_state * 3),
        ("flags", _u32),
        ("reserved", _u32 * 9),
    )


class kvm_reinject_control(_Structure):
    _fields_ = (("pit_reinject", _u8), ("reserved", _u8 * 31))


class _kvm_vcpu_events_exception(_Structure):
    _fields_ = (
        ("injected", _u8),
        ("nr", _u8),
        ("has_error_code", _u8),
        ("pending", _u8),
        ("error_code", _u32),
    )


class _kvm_vcpu_events_interrupt(_Structure):
    _fields_ = (("injected", _u8), ("nr", _u8), ("soft", _u8), ("shadow", _u8))


class _kvm_vcpu_events_nmi(_Structure):
    _fields_ = (("injected", _u8), ("pending", _u8), ("masked", _u8), ("pad", _u8))


class _kvm_vcpu_events_smi(_Structure):
    _fields_ = (("smm", _u8), ("pending", _u8), ("smm_inside_nmi", _u8), ("latched_init", _u8))


class _kvm_vcpu_events_triple_fault(_Structure):
    _fields_ = (("pending", _u8),)


class kvm_vcpu_events(_Structure):
    _fields_ = (
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", _u32),
        ("flags", _u32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", _u8 * 26),
        ("exception_has_payload", _u8),
        ("exception_payload", _u64),
    )


class kvm_debugregs(_Structure):
    _fields_ = (
        ("db", _u64 * 4),
        ("dr6", _u64),
        ("dr7", _u64),
        ("flags", _u64),
        ("reserved", _u64 * 9),
    )


class kvm_xsave(_Structure):
    # KVM_GET_XSAVE2 fills as many bytes as KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says
    # (at least 4096): size a buffer for it with with_flexible_array(kvm_xsave, n).
    _fields_ = (("region", _u32 * 1024), ("extra", _u32 * 0))


class kvm_xcr(_Structure):
    _fields_ = (("xcr", _u32), ("reserved", _u32), ("value", _u64))


class kvm_xcrs(_Structure):
    _fields_ = (
        ("nr_xcrs", _u32),
        ("flags", _u32),
        ("xcrs", kvm_xcr * _c.KVM_MAX_XCRS),
        ("padding", _u64 * 16),
    )


class kvm_sync_regs(_Structure):
    _fields_ = (("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events))


class kvm_vmx_nested_state_data(_Structure):
    _fields_ = (
        ("vmcs12", _u8 * _c.KVM_STATE_NESTED_VMX_VMCS_SIZE),
        ("shadow_vmcs12", _u8 * _c.KVM_STATE_NESTED_VMX_VMCS_SIZE),
    )


class _kvm_vmx_nested_state_hdr_smm(_Structure):
    _fields_ = (("flags", _u16),)


class kvm_vmx_nested_state_hdr(_Structure):
    _fields_ = (
        ("vmxon_pa", _u64),
        ("vmcs12_pa", _u64),
        ("smm", _kvm_vmx_nested_state_hdr_smm),
        ("pad", _u16),
        ("flags", _u32),
        ("preemption_timer_deadline", _u64),
    )


class kvm_svm_nested_state_data(_Structure):
    _fields_ = (("vmcb12", _u8 * _c.KVM_STATE_NESTED_SVM_VMCB_SIZE),)


class kvm_svm_nested_state_hdr(_Structure):
    _fields_ = (("vmcb_pa", _u64),)


class _kvm_nested_state_hdr(_Union):
    _fields_ = (
        ("vmx", kvm_vmx_nested_state_hdr),
        ("svm", kvm_svm_nested_state_hdr),
        ("pad", _u8 * 120),
    )


class _kvm_nested_state_data(_Union):
    _fields_ = (("vmx", kvm_vmx_nested_state_data * 0), ("svm", kvm_svm_nested_state_data * 0))


class kvm_nested_state(_Structure):
    _fields_ = (
        ("flags", _u16),
        ("format", _u16),
        ("size", _u32),
        ("hdr", _kvm_nested_state_hdr),
        ("data", _kvm_nested_state_data),
    )


class kvm_pmu_event_filter(_Structure):
    _fields_ = (
        ("action", _u32),
        ("nevents", _u32),
        ("fixed_counter_bitmap", _u32),
        ("flags", _u32),
        ("pad", _u32 * 4),
        ("events", _u64 * 0),
    )


# --- <linux/kvm.h>: memory, lines, irqchips ---------------------------------------


class kvm_memory_region(_Structure):
    _fields_ = (
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
    )


class kvm_userspace_memory_region(_Structure):
    _fields_ = (
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
    )


class _kvm_irq_level_irq_or_status(_Union):
    # KVM_IRQ_LINE_STATUS writes its result over the irq number it read.
    _fields_ = (("irq", _u32), ("status", _s32))


class kvm_irq_level(_Structure):
    _anonymous_ = ("irq_or_status",)
    _fields_ = (("irq_or_status", _kvm_irq_level_irq_or_status), ("level", _u32))


class _kvm_irqchip_chip(_Union):
    _fields_ = (("dummy", _char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state))


class kvm_irqchip(_Structure):
    _fields_ = (("chip_id", _u32), ("pad", _u32), ("chip", _kvm_irqchip_chip))


class kvm_pit_config(_Structure):
    _fields_ = (("flags", _u32), ("pad", _u32 * 15))


# --- exits --------------------------------------------------------------------------


class _kvm_hyperv_exit_synic(_Structure):
    _fields_ = (
        ("msr", _u32),
        ("pad2", _u32),
        ("control", _u64),
        ("evt_page", _u64),
        ("msg_page", _u64),
    )


class _kvm_hyperv_exit_hcall(_Structure):
    _fields_ = (("input", _u64), ("result", _u64), ("params", _u64 * 2))


class _kvm_hyperv_exit_syndbg(_Structure):
    _fields_ = (
        ("msr", _u32),
        ("pad2", _u32),
        ("control", _u64),
        ("status", _u64),
        ("send_page", _u64),
        ("recv_page", _u64),
        ("pending_page", _u64),
    )


class _kvm_hyperv_exit_u(_Union):
    _fields_ = (
        ("synic", _kvm_hyperv_exit_synic),
        ("hcall", _kvm_hyperv_exit_hcall),
        ("syndbg", _kvm_hyperv_exit_syndbg),
    )


class kvm_hyperv_exit(_Structure):
    _fields_ = (("type", _u32), ("pad1", _u32), ("u", _kvm_hyperv_exit_u))


class _kvm_xen_exit_hcall(_Structure):
    _fields_ = (
        ("longmode", _u32),
        ("cpl", _u32),
        ("input", _u64),
        ("result", _u64),
        ("params", _u64 * 6),
    )


class _kvm_xen_exit_u(_Union):
    _fields_ = (("hcall", _kvm_xen_exit_hcall),)


class kvm_xen_exit(_Structure):
    _fields_ = (("type", _u32), ("u", _kvm_xen_exit_u))


class _kvm_run_hw(_Structure):
    _fields_ = (("hardware_exit_reason", _u64),)


class _kvm_run_fail_entry(_Structure):
    _fields_ = (("hardware_entry_failure_reason", _u64), ("cpu", _u32))


class _kvm_run_ex(_Structure):
    _fields_ = (("exception", _u32), ("error_code", _u32))


class _kvm_run_io(_Structure):
    # The data of an IO exit is at data_offset bytes from the start of kvm_run.
    _fields_ = (
        ("direction", _u8),
        ("size", _u8),
        ("port", _u16),
        ("count", _u32),
        ("data_offset", _u64),
    )


class _kvm_run_debug(_Structure):
    _fields_ = (("arch", kvm_debug_exit_arch),)


class _kvm_run_mmio(_Structure):
    _fields_ = (("phys_addr", _u64), ("data", _u8 * 8), ("len", _u32), ("is_write", _u8))


class _kvm_run_hypercall(_Structure):
    _fields_ = (
        ("nr", _u64),
        ("args", _u64 * 6),
        ("ret", _u64),
        ("longmode", _u32),
        ("pad", _u32),
    )


class _kvm_run_tpr_access(_Structure):
    _fields_ = (("rip", _u64), ("is_write", _u32), ("pad", _u32))


class _kvm_run_s390_sieic(_Structure):
    _fields_ = (("icptcode", _u8), ("ipa", _u16), ("ipb", _u32))


class _kvm_run_s390_ucontrol(_Structure):
    _fields_ = (("trans_exc_code", _u64), ("pgm_code", _u32))


class _kvm_run_dcr(_Structure):
    _fields_ = (("dcrn", _u32), ("data", _u32), ("is_write", _u8))


class _kvm_run_internal(_Structure):
    _fields_ = (("suberror", _u32), ("ndata", _u32), ("data", _u64 * 16))


class _kvm_run_emulation_failure_insn(_Structure):
    _fields_ = (("insn_size", _u8), ("insn_bytes", _u8 * 15))


class _kvm_run_emulation_failure_flagged(_Union):
    _anonymous_ = ("insn",)
    _fields_ = (("insn", _kvm_run_emulation_failure_insn),)


class _kvm_run_emulation_failure(_Structure):
    # An overlay of internal for KVM_INTERNAL_ERROR_EMULATION: flags says which of
    # the following fields hold data.
    _anonymous_ = ("flagged",)
    _fields_ = (
        ("suberror", _u32),
        ("ndata", _u32),
        ("flags", _u64),
        ("flagged", _kvm_run_emulation_failure_flagged),
    )


class _kvm_run_osi(_Structure):
    _fields_ = (("gprs", _u64 * 32),)


class _kvm_run_papr_hcall(_Structure):
    _fields_ = (("nr", _u64), ("ret", _u64), ("args", _u64 * 9))


class _kvm_run_s390_tsch(_Structure):
    _fields_ = (
        ("subchannel_id", _u16),
        ("subchannel_nr", _u16),
        ("io_int_parm", _u32),
        ("io_int_word", _u32),
        ("ipb", _u32),
        ("dequeued", _u8),
    )


class _kvm_run_epr(_Structure):
    _fields_ = (("epr", _u32),)


class _kvm_run_system_event_payload(_Union):
    _fields_ = (("flags", _u64), ("data", _u64 * 16))


class _kvm_run_system_event(_Structure):
    _anonymous_ = ("payload",)
    _fields_ = (("type", _u32), ("ndata", _u32), ("payload", _kvm_run_system_event_payload))


class _kvm_run_s390_stsi(_Structure):
    _fields_ = (
        ("addr", _u64),
        ("ar", _u8),
        ("reserved", _u8),
        ("fc", _u8),
        ("sel1", _u8),
        ("sel2", _u16),
    )


class _kvm_run_eoi(_Structure):
    _fields_ = (("vector", _u8),)


class _kvm_run_arm_nisv(_Structure):
    _fields_ = (("esr_iss", _u64), ("fault_ipa", _u64))


class _kvm_run_msr(_Structure):
    _fields_ = (
        ("error", _u8),
        ("pad", _u8 * 7),
        ("reason", _u32),
        ("index", _u32),
        ("data", _u64),
    )


class _kvm_run_riscv_sbi(_Structure):
    _fields_ = (
        ("extension_id", _ulong),
        ("function_id", _ulong),
        ("args", _ulong * 6),
        ("ret", _ulong * 2),
    )


class _kvm_run_riscv_csr(_Structure):
    _fields_ = (
        ("csr_num", _ulong),
        ("new_value", _ulong),
        ("write_mask", _ulong),
        ("ret_value", _ulong),
    )


class _kvm_run_notify(_Structure):
    _fields_ = (("flags", _u32),)


class _kvm_run_exit(_Union):
    _fields_ = (
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("debug", _kvm_run_debug),
        ("mmio", _kvm_run_mmio),
        ("hypercall", _kvm_run_hypercall),
        ("tpr_access", _kvm_run_tpr_access),
        ("s390_sieic", _kvm_run_s390_sieic),
        ("s390_reset_flags", _u64),
        ("s390_ucontrol", _kvm_run_s390_ucontrol),
        ("dcr", _kvm_run_dcr),
        ("internal", _kvm_run_internal),
        ("emulation_failure", _kvm_run_emulation_failure),
        ("osi", _kvm_run_osi),
        ("papr_hcall", _kvm_run_papr_hcall),
        ("s390_tsch", _kvm_run_s390_tsch),
        ("epr", _kvm_run_epr),
        ("system_event", _kvm_run_system_event),
        ("s390_stsi", _kvm_run_s390_stsi),
        ("eoi", _kvm_run_eoi),
        ("hyperv", kvm_hyperv_exit),
        ("arm_nisv", _kvm_run_arm_nisv),
        ("msr", _kvm_run_msr),
        ("xen", kvm_xen_exit),
        ("riscv_sbi", _kvm_run_riscv_sbi),
        ("riscv_csr", _kvm_run_riscv_csr),
        ("notify", _kvm_run_notify),
        # Fixes the union at 256 bytes whatever the members.
        ("padding", _char * 256),
    )


class _kvm_run_s(_Union):
    _fields_ = (("regs", kvm_sync_regs), ("padding", _char * _c.SYNC_REGS_SIZE_BYTES))


class kvm_run(_Structure):
    """The page shared with KVM_RUN: mmap(vcpu_fd, 0, KVM_GET_VCPU_MMAP_SIZE)."""

    _anonymous_ = ("exit",)
    _fields_ = (
        ("request_interrupt_window", _u8),
        ("immediate_exit", _u8),
        ("padding1", _u8 * 6),
        ("exit_reason", _u32),
        ("ready_for_interrupt_injection", _u8),
        ("if_flag", _u8),
        ("flags", _u16),
        ("cr8", _u64),
        ("apic_base", _u64),
        ("exit", _kvm_run_exit),
        ("kvm_valid_regs", _u64),
        ("kvm_dirty_regs", _u64),
        ("s", _kvm_run_s),
    )


# --- coalesced MMIO, translation, vCPU ioctls -----------------------------------------


class _kvm_coalesced_mmio_pad_or_pio(_Union):
    _fields_ = (("pad", _u32), ("pio", _u32))


class kvm_coalesced_mmio_zone(_Structure):
    _anonymous_ = ("pad_or_pio",)
    _fields_ = (("addr", _u64), ("size", _u32), ("pad_or_pio", _kvm_coalesced_mmio_pad_or_pio))


class kvm_coalesced_mmio(_Structure):
    _anonymous_ = ("pad_or_pio",)
    _fields_ = (
        ("phys_addr", _u64),
        ("len", _u32),
        ("pad_or_pio", _kvm_coalesced_mmio_pad_or_pio),
        ("data", _u8 * 8),
    )


class kvm_coalesced_mmio_ring(_Structure):
    _fields_ = (("first", _u32), ("last", _u32), ("coalesced_mmio", kvm_coalesced_mmio * 0))


class kvm_translation(_Structure):
    _fields_ = (
        ("linear_address", _u64),
        ("physical_address", _u64),
        ("valid", _u8),
        ("writeable", _u8),
        ("usermode", _u8),
        ("pad", _u8 * 5),
    )


class kvm_interrupt(_Structure):
    _fields_ = (("irq", _u32),)


class _kvm_dirty_bitmap(_Union):
    _fields_ = (("dirty_bitmap", _pointer), ("padding2", _u64))


class kvm_dirty_log(_Structure):
    _anonymous_ = ("bitmap",)
    _fields_ = (("slot", _u32), ("padding1", _u32), ("bitmap", _kvm_dirty_bitmap))


class kvm_clear_dirty_log(_Structure):
    _anonymous_ = ("bitmap",)
    _fields_ = (
        ("slot", _u32),
        ("num_pages", _u32),
        ("first_page", _u64),
        ("bitmap", _kvm_dirty_bitmap),
    )


class kvm_signal_mask(_Structure):
    _fields_ = (("len", _u32), ("sigset", _u8 * 0))


class kvm_tpr_access_ctl(_Structure):
    _fields_ = (("enabled", _u32), ("flags", _u32), ("reserved", _u32 * 8))


class kvm_vapic_addr(_Structure):
    _fields_ = (("vapic_addr", _u64),)


class kvm_mp_state(_Structure):
    _fields_ = (("mp_state", _u32),)


class kvm_guest_debug(_Structure):
    _fields_ = (("control", _u32), ("pad", _u32), ("arch", kvm_guest_debug_arch))


class kvm_ioeventfd(_Structure):
    _fields_ = (
        ("datamatch", _u64),
        ("addr", _u64),
        ("len", _u32),
        ("fd", _s32),
        ("flags", _u32),
        ("pad", _u8 * 36),
    )


class kvm_enable_cap(_Structure):
    _fields_ = (("cap", _u32), ("flags", _u32), ("args", _u64 * 4), ("pad", _u8 * 64))


# --- interrupt routing, irqfd, MSI ----------------------------------------------------


class kvm_irq_routing_irqchip(_Structure):
    _fields_ = (("irqchip", _u32), ("pin", _u32))


class _kvm_irq_routing_msi_pad_or_devid(_Union):
    _fields_ = (("pad", _u32), ("devid", _u32))


class kvm_irq_routing_msi(_Structure):
    _anonymous_ = ("pad_or_devid",)
    _fields_ = (
        ("address_lo", _u32),
        ("address_hi", _u32),
        ("data", _u32),
        ("pad_or_devid", _kvm_irq_routing_msi_pad_or_devid),
    )


class kvm_irq_routing_s390_adapter(_Structure):
    _fields_ = (
        ("ind_addr", _u64),
        ("summary_addr", _u64),
        ("ind_offset", _u64),
        ("summary_offset", _u32),
        ("adapter_id", _u32),
    )


class kvm_irq_routing_hv_sint(_Structure):
    _fields_ = (("vcpu", _u32), ("sint", _u32))


class kvm_irq_routing_xen_evtchn(_Structure):
    _fields_ = (("port", _u32), ("vcpu", _u32), ("priority", _u32))


class _kvm_irq_routing_entry_u(_Union):
    _fields_ = (
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("adapter", kvm_irq_routing_s390_adapter),
        ("hv_sint", kvm_irq_routing_hv_sint),
        ("xen_evtchn", kvm_irq_routing_xen_evtchn),
        ("pad", _u32 * 8),
    )


class kvm_irq_routing_entry(_Structure):
    _fields_ = (
        ("gsi", _u32),
        ("type", _u32),
        ("flags", _u32),
        ("pad", _u32),
        ("u", _kvm_irq_routing_entry_u),
    )


class kvm_irq_routing(_Structure):
    _fields_ = (("nr", _u32), ("flags", _u32), ("entries", kvm_irq_routing_entry * 0))


class kvm_x86_mce(_Structure):
    _fields_ = (
        ("status", _u64),
        ("addr", _u64),
        ("misc", _u64),
        ("mcg_status", _u64),
        ("bank", _u8),
        ("pad1", _u8 * 7),
        ("pad2", _u64 * 3),
    )


class kvm_xen_hvm_config(_Structure):
    _fields_ = (
        ("flags", _u32),
        ("msr", _u32),
        ("blob_addr_32", _u64),
        ("blob_addr_64", _u64),
        ("blob_size_32", _u8),
        ("blob_size_64", _u8),
        ("pad2", _u8 * 30),
    )


class kvm_irqfd(_Structure):
    _fields_ = (
        ("fd", _u32),
        ("gsi", _u32),
        ("flags", _u32),
        ("resamplefd", _u32),
        ("pad", _u8 * 16),
    )


class kvm_clock_data(_Structure):
    _fields_ = (
        ("clock", _u64),
        ("flags", _u32),
        ("pad0", _u32),
        ("realtime", _u64),
        ("host_tsc", _u64),
        ("pad", _u32 * 4),
    )


class kvm_reg_list(_Structure):
    _fields_ = (("n", _u64), ("reg", _u64 * 0))


class kvm_one_reg(_Structure):
    _fields_ = (("id", _u64), ("addr", _u64))


class kvm_msi(_Structure):
    _fields_ = (
        ("address_lo", _u32),
        ("address_hi", _u32),
        ("data", _u32),
        ("flags", _u32),
        ("devid", _u32),
        ("pad", _u8 * 12),
    )


# --- devices, encryption, Hyper-V, Xen attributes -------------------------------------


class kvm_create_device(_Structure):
    _fields_ = (("type", _u32), ("fd", _u32), ("flags", _u32))


class kvm_device_attr(_Structure):
    _fields_ = (("flags", _u32), ("group", _u32), ("attr", _u64), ("addr", _u64))


class kvm_enc_region(_Structure):
    _fields_ = (("addr", _u64), ("size", _u64))


class kvm_hyperv_eventfd(_Structure):
    _fields_ = (("conn_id", _u32), ("fd", _s32), ("flags", _u32), ("padding", _u32 * 3))


class _kvm_xen_hvm_attr_shared_info(_Structure):
    _fields_ = (("gfn", _u64),)


class _kvm_xen_hvm_attr_evtchn_deliver_port(_Structure):
    _fields_ = (("port", _u32), ("vcpu", _u32), ("priority", _u32))


class _kvm_xen_hvm_attr_evtchn_deliver_eventfd(_Structure):
    _fields_ = (("port", _u32), ("fd", _s32))


class _kvm_xen_hvm_attr_evtchn_deliver(_Union):
    _fields_ = (
        ("port", _kvm_xen_hvm_attr_evtchn_deliver_port),
        ("eventfd", _kvm_xen_hvm_attr_evtchn_deliver_eventfd),
        ("padding", _u32 * 4),
    )


class _kvm_xen_hvm_attr_evtchn(_Structure):
    _fields_ = (
        ("send_port", _u32),
        ("type", _u32),
        ("flags", _u32),
        ("deliver", _kvm_xen_hvm_attr_evtchn_deliver),
    )


class _kvm_xen_hvm_attr_u(_Union):
    _fields_ = (
        ("long_mode", _u8),
        ("vector", _u8),
        ("shared_info", _kvm_xen_hvm_attr_shared_info),
        ("evtchn", _kvm_xen_hvm_attr_evtchn),
        ("xen_version", _u32),
        ("pad", _u64 * 8),
    )


class kvm_xen_hvm_attr(_Structure):
    _fields_ = (("type", _u16), ("pad", _u16 * 3), ("u", _kvm_xen_hvm_attr_u))


class _kvm_xen_vcpu_attr_runstate(_Structure):
    _fields_ = (
        ("state", _u64),
        ("state_entry_time", _u64),
        ("time_running", _u64),
        ("time_runnable", _u64),
        ("time_blocked", _u64),
        ("time_offline", _u64),
    )


class _kvm_xen_vcpu_attr_timer(_Structure):
    _fields_ = (("port", _u32), ("priority", _u32), ("expires_ns", _u64))


class _kvm_xen_vcpu_attr_u(_Union):
    _fields_ = (
        ("gpa", _u64),
        ("pad", _u64 * 8),
        ("runstate", _kvm_xen_vcpu_attr_runstate),
        ("vcpu_id", _u32),
        ("timer", _kvm_xen_vcpu_attr_timer),
        ("vector", _u8),
    )


class kvm_xen_vcpu_attr(_Structure):
    _fields_ = (("type", _u16), ("pad", _u16 * 3), ("u", _kvm_xen_vcpu_attr_u))


# --- AMD SEV command payloads (KVM_MEMORY_ENCRYPT_OP) -----------------------------


class kvm_sev_cmd(_Structure):
    _fields_ = (("id", _u32), ("data", _u64), ("error", _u32), ("sev_fd", _u32))


class kvm_sev_launch_start(_Structure):
    _fields_ = (
        ("handle", _u32),
        ("policy", _u32),
        ("dh_uaddr", _u64),
        ("dh_len", _u32),
        ("session_uaddr", _u64),
        ("session_len", _u32),
    )


class kvm_sev_launch_update_data(_Structure):
    _fields_ = (("uaddr", _u64), ("len", _u32))


class kvm_sev_launch_secret(_Structure):
    _fields_ = (
        ("hdr_uaddr", _u64),
        ("hdr_len", _u32),
        ("guest_uaddr", _u64),
        ("guest_len", _u32),
        ("trans_uaddr", _u64),
        ("trans_len", _u32),
    )


class kvm_sev_launch_measure(_Structure):
    _fields_ = (("uaddr", _u64), ("len", _u32))


class kvm_sev_guest_status(_Structure):
    _fields_ = (("handle", _u32), ("policy", _u32), ("state", _u32))


class kvm_sev_dbg(_Structure):
    _fields_ = (("src_uaddr", _u64), ("dst_uaddr", _u64), ("len", _u32))


class kvm_sev_attestation_report(_Structure):
    _fields_ = (("mnonce", _u8 * 16), ("uaddr", _u64), ("len", _u32))


class kvm_sev_send_start(_Structure):
    _fields_ = (
        ("policy", _u32),
        ("pdh_cert_uaddr", _u64),
        ("pdh_cert_len", _u32),
        ("plat_certs_uaddr", _u64),
        ("plat_certs_len", _u32),
        ("amd_certs_uaddr", _u64),
        ("amd_certs_len", _u32),
        ("session_uaddr", _u64),
        ("session_len", _u32),
    )


class kvm_sev_send_update_data(_Structure):
    _fields_ = (
        ("hdr_uaddr", _u64),
        ("hdr_len", _u32),
        ("guest_uaddr", _u64),
        ("guest_len", _u32),
        ("trans_uaddr", _u64),
        ("trans_len", _u32),
    )


class kvm_sev_receive_start(_Structure):
    _fields_ = (
        ("handle", _u32),
        ("policy", _u32),
        ("pdh_uaddr", _u64),
        ("pdh_len", _u32),
        ("session_uaddr", _u64),
        ("session_len", _u32),
    )


class kvm_sev_receive_update_data(_Structure):
    _fields_ = (
        ("hdr_uaddr", _u64),
        ("hdr_len", _u32),
        ("guest_uaddr", _u64),
        ("guest_len", _u32),
        ("trans_uaddr", _u64),
        ("trans_len", _u32),
    )


# --- dirty ring, binary statistics ------------------------------------------------------


class kvm_dirty_gfn(_Structure):
    _fields_ = (("flags", _u32), ("slot", _u32), ("offset", _u64))


class kvm_stats_header(_Structure):
    _fields_ = (
        ("flags", _u32),
        ("name_size", _u32),
        ("num_desc", _u32),
        ("id_offset", _u32),
        ("desc_offset", _u32),
        ("data_offset", _u32),
    )


class kvm_stats_desc(_Structure):
    _fields_ = (
        ("flags", _u32),
        ("exponent", _s16),
        ("size", _u16),
        ("offset", _u32),
        ("bucket_size", _u32),
        ("name", _char * 0),
    )


# --- variable-length structs ------------------------------------------------------------

_Struct = _TypeVar("_Struct", bound=_ctypes.Structure)


def with_flexible_array(struct_type: type[_Struct], count: int) -> type[_Struct]:
    """A subclass of ``struct_type`` whose trailing flexible array holds ``count`` elements.

    ``with_flexible_array(kvm_cpuid2, 80)()`` is a kvm_cpuid2 with 80 ``entries``, ready
    for KVM_GET_SUPPORTED_CPUID; the header fields keep their offsets.
    """
    if count < 0:
        raise ValueError(f"a flexible array cannot hold {count} elements")
    fields: _Any = struct_type._fields_
    name, array_type = fields[-1][0], fields[-1][1]
    if getattr(array_type, "_length_", None) != 0:
        raise TypeError(f"{struct_type.__name__} does not end in a flexible array")
    # A subclass's fields start at sizeof(base): right only where the base has no tail
    # padding after its flexible array, which holds for every struct of the header.
    if _ctypes.sizeof(struct_type) != getattr(struct_type, name).offset:
        raise TypeError(f"{struct_type.__name__}.{name} is not at the end of the struct")
    return type(
        struct_type.__name__,
        (struct_type,),
        {"_fields_": [(name, array_type._type_ * count)], "__module__": __name__},
    )
