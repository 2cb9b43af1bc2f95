//! /dev/kvm: capabilities, supported CPUID, and VM creation.

use std::ffi::CString;
use std::sync::OnceLock;

use kvm_bindings::{KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES, kvm_enable_cap};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::emulate::host_quirks::HostQuirks;
use crate::emulate::probe;
use crate::errors::{kvm_error, open_kvm_error};
use crate::regs::CpuidTuple;
use crate::vm::Vm;

/// An open /dev/kvm.
#[pyclass(frozen, module = "kvmfast")]
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
    /// Probed once, at the first VM this object creates.
    quirks: OnceLock<HostQuirks>,
}

impl Kvm {
    fn quirks(&self) -> HostQuirks {
        *self.quirks.get_or_init(|| probe::probe(&self.kvm))
    }
}

#[pymethods]
impl Kvm {
    /// Opens /dev/kvm (`path` names another device node, e.g. in a container).
    #[new]
    #[pyo3(signature = (*, path = "/dev/kvm"))]
    fn new(path: &str) -> PyResult<Self> {
        let c_path = CString::new(path)
            .map_err(|_| PyValueError::new_err("the KVM device path contains a NUL byte"))?;
        let kvm = kvm_ioctls::Kvm::new_with_path(&c_path).map_err(|e| open_kvm_error(path, e))?;
        Ok(Self {
            kvm,
            quirks: OnceLock::new(),
        })
    }

    #[getter]
    fn api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    /// KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent, else the capability's value.
    fn check_extension(&self, cap: u32) -> i32 {
        self.kvm.check_extension_raw(libc::c_ulong::from(cap))
    }

    #[getter]
    fn vcpu_mmap_size(&self) -> PyResult<usize> {
        self.kvm
            .get_vcpu_mmap_size()
            .map_err(|e| kvm_error("KVM_GET_VCPU_MMAP_SIZE", e))
    }

    /// KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples.
    fn supported_cpuid(&self) -> PyResult<Vec<CpuidTuple>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kvm_error("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx))
            .collect())
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs a snapshot saves, in KVM's order.
    fn msr_index_list(&self) -> PyResult<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| kvm_error("KVM_GET_MSR_INDEX_LIST", e))?;
        Ok(list.as_slice().to_vec())
    }

    /// A new VM. irqchip: "split" (LAPIC in KVM, IOAPIC/PIC in userspace, with
    /// `ioapic_routes` GSIs reserved for the IOAPIC), "kernel" (KVM_CREATE_IRQCHIP) or
    /// "none".
    #[pyo3(signature = (irqchip = "split", ioapic_routes = 24))]
    fn create_vm(&self, py: Python<'_>, irqchip: &str, ioapic_routes: u32) -> PyResult<Vm> {
        if !matches!(irqchip, "split" | "kernel" | "none") {
            return Err(PyValueError::new_err(format!(
                "irqchip must be \"split\", \"kernel\" or \"none\", not {irqchip:?}"
            )));
        }
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| kvm_error("KVM_CREATE_VM", e))?;
        match irqchip {
            "split" => {
                let mut request = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                request.args[0] = u64::from(ioapic_routes);
                fd.enable_cap(&request)
                    .map_err(|e| kvm_error("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", e))?;
            }
            "kernel" => fd
                .create_irq_chip()
                .map_err(|e| kvm_error("KVM_CREATE_IRQCHIP", e))?,
            _ => {}
        }
        let routes = if irqchip == "split" { ioapic_routes } else { 0 };
        let quirks = py.detach(|| self.quirks());
        Ok(Vm::new(
            fd,
            irqchip,
            routes,
            self.kvm.get_nr_memslots(),
            quirks,
        ))
    }

    /// The host quirks the start-up probes found (each a probe guest's verdict).
    fn host_quirks(&self, py: Python<'_>) -> std::collections::BTreeMap<&'static str, u64> {
        py.detach(|| self.quirks()).to_map()
    }

    fn __repr__(&self) -> String {
        format!("Kvm(api_version={})", self.kvm.get_api_version())
    }
}
