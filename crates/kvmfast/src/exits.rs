//! What run() hands back: an `Exit` for stops the VMM expects, a `GuestStop` exception
//! (with the vCPU's registers) for stops it cannot continue from.

use kvm_ioctls::VcpuFd;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::emulate::Report;
use crate::errors::{EmulationFailure, EntryFailure, TripleFault, kvm_error};
use crate::regs::{regs_to_dict, sregs_to_dict};

/// Why run() or run_once() returned.
#[pyclass(frozen, module = "kvmfast")]
#[derive(Debug, Clone)]
pub struct Exit {
    /// "hlt", "system_event", "stopped", "paused", "device_exit", or (run_once) the exit's name.
    #[pyo3(get)]
    reason: String,
    /// device_exit: the value written; system_event: the type; io/mmio: the address;
    /// ioapic_eoi: the vector; other exits: the KVM exit reason number.
    #[pyo3(get)]
    value: u64,
    /// system_event: the event data; io/mmio: the values transferred.
    #[pyo3(get)]
    data: Vec<u64>,
}

#[pymethods]
impl Exit {
    #[new]
    #[pyo3(signature = (reason, value = 0, data = Vec::new()))]
    fn new(reason: String, value: u64, data: Vec<u64>) -> Self {
        Self {
            reason,
            value,
            data,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Exit(reason={:?}, value={:#x}, data={:?})",
            self.reason, self.value, self.data
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Exit>()
            .map(|other| {
                let other = other.get();
                other.reason == self.reason && other.value == self.value && other.data == self.data
            })
            .unwrap_or(false)
    }
}

/// An exit as the run loop produces it, before it becomes a Python object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub reason: &'static str,
    pub value: u64,
    pub data: Vec<u64>,
}

impl ExitInfo {
    pub fn new(reason: &'static str, value: u64) -> Self {
        Self {
            reason,
            value,
            data: Vec::new(),
        }
    }

    pub fn into_exit(self) -> Exit {
        Exit {
            reason: self.reason.to_string(),
            value: self.value,
            data: self.data,
        }
    }
}

/// A stop caused by the guest that the VMM cannot simply resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFailure {
    /// KVM_EXIT_INTERNAL_ERROR.
    /// With the completion's report when the VMM looked at the instruction.
    Emulation {
        suberror: u32,
        data: Vec<u64>,
        report: Option<Box<Report>>,
        symbol: Option<String>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    Entry {
        hardware_entry_failure_reason: u64,
        cpu: u32,
    },
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
}

/// The instruction bytes KVM reports with an emulation failure: when data[0] (the flags
/// word) has bit 0 set, the next 16 bytes hold insn_size and up to 15 bytes.
pub fn emulation_insn_bytes(data: &[u64]) -> Vec<u8> {
    if data.len() < 3 || data[0] & 1 == 0 {
        return Vec::new();
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let size = usize::from(raw[0]).min(15);
    raw[1..=size].to_vec()
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl GuestFailure {
    /// The Python exception, with .regs and .sregs read from the stopped vCPU.
    pub fn into_pyerr(self, py: Python<'_>, vcpu: &VcpuFd) -> PyErr {
        match self.build(py, vcpu) {
            Ok(err) | Err(err) => err,
        }
    }

    fn build(self, py: Python<'_>, vcpu: &VcpuFd) -> PyResult<PyErr> {
        let regs = vcpu.get_regs().map_err(|e| kvm_error("KVM_GET_REGS", e))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| kvm_error("KVM_GET_SREGS", e))?;
        let rip = regs.rip;
        let err = match &self {
            Self::Emulation {
                suberror,
                data,
                report,
                symbol,
            } => {
                let insn = emulation_insn_bytes(data);
                let what = if *suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    "emulation failure"
                } else {
                    "internal error"
                };
                let bytes = if insn.is_empty() {
                    String::new()
                } else {
                    format!(", instruction bytes {}", hex_bytes(&insn))
                };
                let message = match report {
                    Some(report) => format!(
                        "KVM_EXIT_INTERNAL_ERROR ({what}): {}",
                        report.message(symbol.as_deref())
                    ),
                    None => format!(
                        "KVM_EXIT_INTERNAL_ERROR at RIP {rip:#x}: {what} (suberror {suberror}){bytes}"
                    ),
                };
                let err = EmulationFailure::new_err(message);
                let value = err.value(py);
                value.setattr("suberror", *suberror)?;
                value.setattr("data", data.clone())?;
                value.setattr("insn_bytes", PyBytes::new(py, &insn))?;
                value.setattr("rip", rip)?;
                value.setattr("symbol", symbol.clone())?;
                match report {
                    Some(report) => {
                        value.setattr("instruction", report.instruction.clone())?;
                        value.setattr("instruction_bytes", PyBytes::new(py, &report.bytes))?;
                        value.setattr("cpl", report.cpl)?;
                        value.setattr("reason", report.reason.clone())?;
                    }
                    None => {
                        value.setattr("instruction", py.None())?;
                        value.setattr("instruction_bytes", PyBytes::new(py, &insn))?;
                        value.setattr("cpl", py.None())?;
                        value.setattr("reason", py.None())?;
                    }
                }
                err
            }
            Self::Entry {
                hardware_entry_failure_reason,
                cpu,
            } => {
                let err = EntryFailure::new_err(format!(
                    "KVM_EXIT_FAIL_ENTRY at RIP {rip:#x}: hardware entry failure reason \
                     {hardware_entry_failure_reason:#x} on host CPU {cpu}"
                ));
                let value = err.value(py);
                value.setattr(
                    "hardware_entry_failure_reason",
                    *hardware_entry_failure_reason,
                )?;
                value.setattr("cpu", *cpu)?;
                err
            }
            Self::TripleFault => TripleFault::new_err(format!(
                "KVM_EXIT_SHUTDOWN at RIP {rip:#x}: the guest triple-faulted"
            )),
        };
        let value = err.value(py);
        value.setattr("regs", regs_to_dict(py, &regs)?)?;
        value.setattr("sregs", sregs_to_dict(py, &sregs)?)?;
        Ok(err)
    }
}

/// How a run ended other than with an Exit.
#[derive(Debug)]
pub enum RunError {
    /// A handler raised, or an ioctl failed.
    Python(PyErr),
    /// The guest stopped in a way that needs its registers in the exception.
    Guest(GuestFailure),
}

impl From<PyErr> for RunError {
    fn from(err: PyErr) -> Self {
        Self::Python(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insn_bytes_follow_the_flags_word() {
        // flags=1, insn_size=3, bytes 0f 01 ca (CLAC).
        let data = [1, u64::from_le_bytes([3, 0x0f, 0x01, 0xca, 0, 0, 0, 0]), 0];
        assert_eq!(emulation_insn_bytes(&data), vec![0x0f, 0x01, 0xca]);
        assert!(emulation_insn_bytes(&[0, data[1], 0]).is_empty());
        assert!(emulation_insn_bytes(&[1]).is_empty());
        let oversized = [1, u64::from_le_bytes([200, 1, 2, 3, 4, 5, 6, 7]), u64::MAX];
        assert_eq!(emulation_insn_bytes(&oversized).len(), 15);
    }
}
