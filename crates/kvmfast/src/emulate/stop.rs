//! Why a completion stops short: the exception it raises, what nobody can complete, or
//! a host error. Every part of the emulator returns it, so it depends on nothing there.

use pyo3::PyErr;
use vmm_sys_util::errno;

use super::exceptions::Fault;
use crate::errors::kvm_error;

/// Why a completion did not finish normally.
pub enum Stop {
    /// The instruction raises this exception in the guest.
    Fault(Fault),
    /// Nobody can complete it: the text says what is missing.
    Unsupported(String),
    /// A host-side error (an ioctl, a Python device).
    Host(PyErr),
}

impl Stop {
    pub fn ioctl(name: &str, err: errno::Error) -> Self {
        Self::Host(kvm_error(name, err))
    }
}
