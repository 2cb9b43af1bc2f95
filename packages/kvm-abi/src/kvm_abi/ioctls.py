"""The ioctl request numbers of <linux/kvm.h> for x86 and for every architecture.

Computed as the header computes them, from the _IO* macros and the sizes of the
structs in ``kvm_abi.structs``, so a struct that is the wrong size gives a wrong
number here too: the tests compare both with the installed header. Left out are the
ioctls of other architectures (s390, PowerPC, ARM) and those the kernel no longer
implements (device assignment, tracing, memory aliases, KVM_DEBUG_GUEST).
"""

from ctypes import c_uint64 as _u64
from ctypes import c_ulong as _ulong
from ctypes import sizeof as _sizeof

from kvm_abi import structs as _s
from kvm_abi._ioc import _IO, _IOR, _IOW, _IOWR
from kvm_abi.constants import KVMIO as _KVMIO

# --- ioctls on the /dev/kvm fd --------------------------------------------------------

KVM_GET_API_VERSION = _IO(_KVMIO, 0x00)
KVM_CREATE_VM = _IO(_KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(_KVMIO, 0x02, _sizeof(_s.kvm_msr_list))
KVM_CHECK_EXTENSION = _IO(_KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(_KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(_KVMIO, 0x05, _sizeof(_s.kvm_cpuid2))
KVM_GET_EMULATED_CPUID = _IOWR(_KVMIO, 0x09, _sizeof(_s.kvm_cpuid2))
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(_KVMIO, 0x0A, _sizeof(_s.kvm_msr_list))

# --- ioctls on a VM fd ------------------------------------------------------------------

KVM_SET_MEMORY_REGION = _IOW(_KVMIO, 0x40, _sizeof(_s.kvm_memory_region))
KVM_CREATE_VCPU = _IO(_KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(_KVMIO, 0x42, _sizeof(_s.kvm_dirty_log))
KVM_SET_NR_MMU_PAGES = _IO(_KVMIO, 0x44)
KVM_GET_NR_MMU_PAGES = _IO(_KVMIO, 0x45)
KVM_SET_USER_MEMORY_REGION = _IOW(_KVMIO, 0x46, _sizeof(_s.kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _IO(_KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(_KVMIO, 0x48, _sizeof(_u64))

KVM_CREATE_IRQCHIP = _IO(_KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(_KVMIO, 0x61, _sizeof(_s.kvm_irq_level))
KVM_GET_IRQCHIP = _IOWR(_KVMIO, 0x62, _sizeof(_s.kvm_irqchip))
# _IOR although the kernel reads the struct: the header's historical mistake is ABI.
KVM_SET_IRQCHIP = _IOR(_KVMIO, 0x63, _sizeof(_s.kvm_irqchip))
KVM_CREATE_PIT = _IO(_KVMIO, 0x64)
KVM_GET_PIT = _IOWR(_KVMIO, 0x65, _sizeof(_s.kvm_pit_state))
KVM_SET_PIT = _IOR(_KVMIO, 0x66, _sizeof(_s.kvm_pit_state))
KVM_IRQ_LINE_STATUS = _IOWR(_KVMIO, 0x67, _sizeof(_s.kvm_irq_level))
KVM_REGISTER_COALESCED_MMIO = _IOW(_KVMIO, 0x67, _sizeof(_s.kvm_coalesced_mmio_zone))
KVM_UNREGISTER_COALESCED_MMIO = _IOW(_KVMIO, 0x68, _sizeof(_s.kvm_coalesced_mmio_zone))
KVM_SET_GSI_ROUTING = _IOW(_KVMIO, 0x6A, _sizeof(_s.kvm_irq_routing))
KVM_REINJECT_CONTROL = _IO(_KVMIO, 0x71)
KVM_IRQFD = _IOW(_KVMIO, 0x76, _sizeof(_s.kvm_irqfd))
KVM_CREATE_PIT2 = _IOW(_KVMIO, 0x77, _sizeof(_s.kvm_pit_config))
KVM_SET_BOOT_CPU_ID = _IO(_KVMIO, 0x78)
KVM_IOEVENTFD = _IOW(_KVMIO, 0x79, _sizeof(_s.kvm_ioeventfd))
KVM_XEN_HVM_CONFIG = _IOW(_KVMIO, 0x7A, _sizeof(_s.kvm_xen_hvm_config))
KVM_SET_CLOCK = _IOW(_KVMIO, 0x7B, _sizeof(_s.kvm_clock_data))
KVM_GET_CLOCK = _IOR(_KVMIO, 0x7C, _sizeof(_s.kvm_clock_data))
KVM_GET_PIT2 = _IOR(_KVMIO, 0x9F, _sizeof(_s.kvm_pit_state2))
KVM_SET_PIT2 = _IOW(_KVMIO, 0xA0, _sizeof(_s.kvm_pit_state2))
# On a VM fd with KVM_CAP_VM_TSC_CONTROL, on a vCPU fd with KVM_CAP_TSC_CONTROL.
KVM_SET_TSC_KHZ = _IO(_KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(_KVMIO, 0xA3)
KVM_SIGNAL_MSI = _IOW(_KVMIO, 0xA5, _sizeof(_s.kvm_msi))
KVM_SET_PMU_EVENT_FILTER = _IOW(_KVMIO, 0xB2, _sizeof(_s.kvm_pmu_event_filter))

KVM_CREATE_DEVICE = _IOWR(_KVMIO, 0xE0, _sizeof(_s.kvm_create_device))
# On a device fd, and on VM and vCPU fds for their own attributes.
KVM_SET_DEVICE_ATTR = _IOW(_KVMIO, 0xE1, _sizeof(_s.kvm_device_attr))
KVM_GET_DEVICE_ATTR = _IOW(_KVMIO, 0xE2, _sizeof(_s.kvm_device_attr))
KVM_HAS_DEVICE_ATTR = _IOW(_KVMIO, 0xE3, _sizeof(_s.kvm_device_attr))

# --- ioctls on a vCPU fd ----------------------------------------------------------------

KVM_RUN = _IO(_KVMIO, 0x80)
KVM_GET_REGS = _IOR(_KVMIO, 0x81, _sizeof(_s.kvm_regs))
KVM_SET_REGS = _IOW(_KVMIO, 0x82, _sizeof(_s.kvm_regs))
KVM_GET_SREGS = _IOR(_KVMIO, 0x83, _sizeof(_s.kvm_sregs))
KVM_SET_SREGS = _IOW(_KVMIO, 0x84, _sizeof(_s.kvm_sregs))
KVM_TRANSLATE = _IOWR(_KVMIO, 0x85, _sizeof(_s.kvm_translation))
KVM_INTERRUPT = _IOW(_KVMIO, 0x86, _sizeof(_s.kvm_interrupt))
KVM_GET_MSRS = _IOWR(_KVMIO, 0x88, _sizeof(_s.kvm_msrs))
KVM_SET_MSRS = _IOW(_KVMIO, 0x89, _sizeof(_s.kvm_msrs))
KVM_SET_CPUID = _IOW(_KVMIO, 0x8A, _sizeof(_s.kvm_cpuid))
KVM_SET_SIGNAL_MASK = _IOW(_KVMIO, 0x8B, _sizeof(_s.kvm_signal_mask))
KVM_GET_FPU = _IOR(_KVMIO, 0x8C, _sizeof(_s.kvm_fpu))
KVM_SET_FPU = _IOW(_KVMIO, 0x8D, _sizeof(_s.kvm_fpu))
KVM_GET_LAPIC = _IOR(_KVMIO, 0x8E, _sizeof(_s.kvm_lapic_state))
KVM_SET_LAPIC = _IOW(_KVMIO, 0x8F, _sizeof(_s.kvm_lapic_state))
KVM_SET_CPUID2 = _IOW(_KVMIO, 0x90, _sizeof(_s.kvm_cpuid2))
KVM_GET_CPUID2 = _IOWR(_KVMIO, 0x91, _sizeof(_s.kvm_cpuid2))
KVM_TPR_ACCESS_REPORTING = _IOWR(_KVMIO, 0x92, _sizeof(_s.kvm_tpr_access_ctl))
KVM_SET_VAPIC_ADDR = _IOW(_KVMIO, 0x93, _sizeof(_s.kvm_vapic_addr))
KVM_GET_MP_STATE = _IOR(_KVMIO, 0x98, _sizeof(_s.kvm_mp_state))
KVM_SET_MP_STATE = _IOW(_KVMIO, 0x99, _sizeof(_s.kvm_mp_state))
KVM_NMI = _IO(_KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = _IOW(_KVMIO, 0x9B, _sizeof(_s.kvm_guest_debug))
KVM_X86_SETUP_MCE = _IOW(_KVMIO, 0x9C, _sizeof(_u64))
KVM_X86_GET_MCE_CAP_SUPPORTED = _IOR(_KVMIO, 0x9D, _sizeof(_u64))
KVM_X86_SET_MCE = _IOW(_KVMIO, 0x9E, _sizeof(_s.kvm_x86_mce))
KVM_GET_VCPU_EVENTS = _IOR(_KVMIO, 0x9F, _sizeof(_s.kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _IOW(_KVMIO, 0xA0, _sizeof(_s.kvm_vcpu_events))
KVM_GET_DEBUGREGS = _IOR(_KVMIO, 0xA1, _sizeof(_s.kvm_debugregs))
KVM_SET_DEBUGREGS = _IOW(_KVMIO, 0xA2, _sizeof(_s.kvm_debugregs))
# On a vCPU fd, and on a VM fd with KVM_CAP_ENABLE_CAP_VM.
KVM_ENABLE_CAP = _IOW(_KVMIO, 0xA3, _sizeof(_s.kvm_enable_cap))
KVM_GET_XSAVE = _IOR(_KVMIO, 0xA4, _sizeof(_s.kvm_xsave))
KVM_SET_XSAVE = _IOW(_KVMIO, 0xA5, _sizeof(_s.kvm_xsave))
KVM_GET_XCRS = _IOR(_KVMIO, 0xA6, _sizeof(_s.kvm_xcrs))
KVM_SET_XCRS = _IOW(_KVMIO, 0xA7, _sizeof(_s.kvm_xcrs))
KVM_GET_ONE_REG = _IOW(_KVMIO, 0xAB, _sizeof(_s.kvm_one_reg))
KVM_SET_ONE_REG = _IOW(_KVMIO, 0xAC, _sizeof(_s.kvm_one_reg))
KVM_KVMCLOCK_CTRL = _IO(_KVMIO, 0xAD)
KVM_GET_REG_LIST = _IOWR(_KVMIO, 0xB0, _sizeof(_s.kvm_reg_list))
KVM_SMI = _IO(_KVMIO, 0xB7)

# --- memory encryption (a VM fd) ----------------------------------------------------------

KVM_MEMORY_ENCRYPT_OP = _IOWR(_KVMIO, 0xBA, _sizeof(_ulong))
KVM_MEMORY_ENCRYPT_REG_REGION = _IOR(_KVMIO, 0xBB, _sizeof(_s.kvm_enc_region))
KVM_MEMORY_ENCRYPT_UNREG_REGION = _IOR(_KVMIO, 0xBC, _sizeof(_s.kvm_enc_region))

# --- later additions, on the fd named -----------------------------------------------------

KVM_HYPERV_EVENTFD = _IOW(_KVMIO, 0xBD, _sizeof(_s.kvm_hyperv_eventfd))  # VM
KVM_GET_NESTED_STATE = _IOWR(_KVMIO, 0xBE, _sizeof(_s.kvm_nested_state))  # vCPU
KVM_SET_NESTED_STATE = _IOW(_KVMIO, 0xBF, _sizeof(_s.kvm_nested_state))  # vCPU
KVM_CLEAR_DIRTY_LOG = _IOWR(_KVMIO, 0xC0, _sizeof(_s.kvm_clear_dirty_log))  # VM
KVM_GET_SUPPORTED_HV_CPUID = _IOWR(_KVMIO, 0xC1, _sizeof(_s.kvm_cpuid2))  # system or vCPU
KVM_X86_SET_MSR_FILTER = _IOW(_KVMIO, 0xC6, _sizeof(_s.kvm_msr_filter))  # VM
KVM_RESET_DIRTY_RINGS = _IO(_KVMIO, 0xC7)  # VM
KVM_XEN_HVM_GET_ATTR = _IOWR(_KVMIO, 0xC8, _sizeof(_s.kvm_xen_hvm_attr))  # VM
KVM_XEN_HVM_SET_ATTR = _IOW(_KVMIO, 0xC9, _sizeof(_s.kvm_xen_hvm_attr))  # VM
KVM_XEN_VCPU_GET_ATTR = _IOWR(_KVMIO, 0xCA, _sizeof(_s.kvm_xen_vcpu_attr))  # vCPU
KVM_XEN_VCPU_SET_ATTR = _IOW(_KVMIO, 0xCB, _sizeof(_s.kvm_xen_vcpu_attr))  # vCPU
KVM_GET_SREGS2 = _IOR(_KVMIO, 0xCC, _sizeof(_s.kvm_sregs2))  # vCPU
KVM_SET_SREGS2 = _IOW(_KVMIO, 0xCD, _sizeof(_s.kvm_sregs2))  # vCPU
KVM_GET_STATS_FD = _IO(_KVMIO, 0xCE)  # VM or vCPU
KVM_GET_XSAVE2 = _IOR(_KVMIO, 0xCF, _sizeof(_s.kvm_xsave))  # vCPU
KVM_XEN_HVM_EVTCHN_SEND = _IOW(_KVMIO, 0xD0, _sizeof(_s.kvm_irq_routing_xen_evtchn))  # VM
