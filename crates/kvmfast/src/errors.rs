//! The Python exceptions kvmfast raises, and the conversions from ioctl errors.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyOSError};
use pyo3::prelude::*;
use vmm_sys_util::errno;

create_exception!(
    kvmfast,
    KvmError,
    PyOSError,
    "An ioctl on /dev/kvm, a VM or a vCPU failed; the message names the ioctl, .errno is set."
);
create_exception!(
    kvmfast,
    InterruptAlreadyQueued,
    KvmError,
    "KVM_INTERRUPT returned EEXIST: an interrupt is already enqueued."
);
create_exception!(
    kvmfast,
    InvalidInterrupt,
    KvmError,
    "KVM_INTERRUPT returned EINVAL: the irq number is invalid."
);
create_exception!(
    kvmfast,
    PicInKernel,
    KvmError,
    "KVM_INTERRUPT returned ENXIO: the PIC is in the kernel."
);
create_exception!(
    kvmfast,
    BadInterruptPointer,
    KvmError,
    "KVM_INTERRUPT returned EFAULT: the pointer is invalid."
);
create_exception!(
    kvmfast,
    GuestStop,
    PyException,
    "The guest stopped in a way the VMM cannot continue from; .regs and .sregs hold its state."
);
create_exception!(
    kvmfast,
    EmulationFailure,
    GuestStop,
    "KVM_EXIT_INTERNAL_ERROR: KVM could not emulate an instruction (.suberror, .data, .insn_bytes)."
);
create_exception!(
    kvmfast,
    EntryFailure,
    GuestStop,
    "KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."
);
create_exception!(
    kvmfast,
    TripleFault,
    GuestStop,
    "KVM_EXIT_SHUTDOWN: the guest triple-faulted."
);

/// A failed ioctl as `KvmError(errno, "<IOCTL>: <strerror>")`.
pub fn kvm_error(ioctl: &str, err: errno::Error) -> PyErr {
    errno_error(ioctl, err.errno())
}

/// Same as [`kvm_error`] from a raw errno value.
pub fn errno_error(ioctl: &str, errno_value: i32) -> PyErr {
    let description = std::io::Error::from_raw_os_error(errno_value).to_string();
    // io::Error's text ends with " (os error N)"; OSError prints the errno itself.
    let description = match description.rfind(" (os error") {
        Some(cut) => description[..cut].to_string(),
        None => description,
    };
    KvmError::new_err((errno_value, format!("{ioctl}: {description}")))
}

/// A failed plain system call (eventfd, epoll) as OSError(errno, text).
pub fn io_error(err: std::io::Error) -> PyErr {
    PyOSError::new_err((err.raw_os_error().unwrap_or(libc::EIO), err.to_string()))
}

/// KVM_INTERRUPT's errors, each its own class with the KVM API document's wording.
pub fn interrupt_error(err: errno::Error) -> PyErr {
    let errno_value = err.errno();
    let message = |text: &str| (errno_value, format!("KVM_INTERRUPT: {text}"));
    match errno_value {
        libc::EEXIST => {
            InterruptAlreadyQueued::new_err(message("an interrupt is already enqueued"))
        }
        libc::EINVAL => InvalidInterrupt::new_err(message("the irq number is invalid")),
        libc::ENXIO => PicInKernel::new_err(message("the PIC is in the kernel")),
        libc::EFAULT => BadInterruptPointer::new_err(message("the pointer is invalid")),
        _ => kvm_error("KVM_INTERRUPT", err),
    }
}

/// Opening /dev/kvm failed: a missing device is a FileNotFoundError that says what to check.
pub fn open_kvm_error(path: &str, err: errno::Error) -> PyErr {
    if err.errno() == libc::ENOENT {
        PyFileNotFoundError::new_err((
            libc::ENOENT,
            format!(
                "{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or \
                 enable nested virtualisation)"
            ),
        ))
    } else {
        errno_error(&format!("open {path}"), err.errno())
    }
}

/// Registers the exception classes on the module.
pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("KvmError", py.get_type::<KvmError>())?;
    module.add(
        "InterruptAlreadyQueued",
        py.get_type::<InterruptAlreadyQueued>(),
    )?;
    module.add("InvalidInterrupt", py.get_type::<InvalidInterrupt>())?;
    module.add("PicInKernel", py.get_type::<PicInKernel>())?;
    module.add("BadInterruptPointer", py.get_type::<BadInterruptPointer>())?;
    module.add("GuestStop", py.get_type::<GuestStop>())?;
    module.add("EmulationFailure", py.get_type::<EmulationFailure>())?;
    module.add("EntryFailure", py.get_type::<EntryFailure>())?;
    module.add("TripleFault", py.get_type::<TripleFault>())?;
    Ok(())
}
