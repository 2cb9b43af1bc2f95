//! A Linux eventfd as a Python object, for irqfd, ioeventfd and the event loop.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{RwLock, RwLockReadGuard};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::io_error;
use crate::locks;

/// Reads an eventfd counter: Ok(None) when a non-blocking eventfd has nothing.
pub fn read_counter(fd: RawFd) -> std::io::Result<Option<u64>> {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a u64 we own; the fd is an eventfd the caller keeps open.
    let n = unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
    if n == 8 {
        return Ok(Some(value));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) => Ok(None),
        _ => Err(err),
    }
}

/// Adds `value` to an eventfd counter.
pub fn add_to_counter(fd: RawFd, value: u64) -> std::io::Result<()> {
    // SAFETY: writes 8 bytes from a u64 we own to an eventfd the caller keeps open.
    let n = unsafe { libc::write(fd, (&raw const value).cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A new eventfd (close-on-exec), optionally non-blocking.
pub fn new_eventfd(nonblocking: bool) -> std::io::Result<OwnedFd> {
    let mut flags = libc::EFD_CLOEXEC;
    if nonblocking {
        flags |= libc::EFD_NONBLOCK;
    }
    // SAFETY: eventfd has no memory arguments.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An eventfd: a 64-bit counter that KVM (irqfd/ioeventfd) or threads signal through.
#[pyclass(frozen, module = "kvmfast")]
pub struct EventFd {
    fd: RwLock<Option<OwnedFd>>,
    nonblocking: bool,
}

impl EventFd {
    fn open_fd(&self) -> PyResult<RwLockReadGuard<'_, Option<OwnedFd>>> {
        let guard = locks::read(&self.fd);
        if guard.is_none() {
            return Err(PyValueError::new_err("the EventFd is closed"));
        }
        Ok(guard)
    }

    fn raw(&self) -> PyResult<RawFd> {
        Ok(self.open_fd()?.as_ref().map_or(-1, AsRawFd::as_raw_fd))
    }

    /// A duplicate of the fd, for an owner (the event loop) that must outlive close().
    pub fn duplicate(&self) -> PyResult<OwnedFd> {
        let guard = self.open_fd()?;
        let fd = guard
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the EventFd is closed"))?;
        fd.try_clone().map_err(io_error)
    }

    /// Wraps an eventfd made elsewhere (a virtio device's, which keeps its own duplicate).
    pub fn from_owned(fd: OwnedFd, nonblocking: bool) -> Self {
        Self {
            fd: RwLock::new(Some(fd)),
            nonblocking,
        }
    }

    pub fn is_nonblocking(&self) -> bool {
        self.nonblocking
    }

    pub fn raw_fd(&self) -> PyResult<RawFd> {
        self.raw()
    }
}

#[pymethods]
impl EventFd {
    #[new]
    #[pyo3(signature = (nonblocking = true))]
    fn new(nonblocking: bool) -> PyResult<Self> {
        let fd = new_eventfd(nonblocking).map_err(io_error)?;
        Ok(Self {
            fd: RwLock::new(Some(fd)),
            nonblocking,
        })
    }

    #[getter]
    fn fd(&self) -> PyResult<RawFd> {
        self.raw()
    }

    fn fileno(&self) -> PyResult<RawFd> {
        self.raw()
    }

    #[getter]
    fn nonblocking(&self) -> bool {
        self.nonblocking
    }

    #[getter]
    fn closed(&self) -> bool {
        locks::read(&self.fd).is_none()
    }

    /// Adds n to the counter.
    #[pyo3(signature = (n = 1))]
    fn write(&self, n: u64) -> PyResult<()> {
        add_to_counter(self.raw()?, n).map_err(io_error)
    }

    /// Takes the counter (0 when a non-blocking eventfd has nothing; a blocking one waits,
    /// without the GIL).
    fn read(&self, py: Python<'_>) -> PyResult<u64> {
        let guard = self.open_fd()?;
        let fd = guard.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let value = if self.nonblocking {
            read_counter(fd)
        } else {
            py.detach(|| read_counter(fd))
        };
        Ok(value.map_err(io_error)?.unwrap_or(0))
    }

    /// Closes the fd; idempotent.
    fn close(&self) {
        let fd = locks::write(&self.fd).take();
        drop(fd);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc_value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) {
        self.close();
    }

    fn __repr__(&self) -> String {
        match self.raw() {
            Ok(fd) => format!("EventFd(fd={fd}, nonblocking={})", self.nonblocking),
            Err(_) => "EventFd(closed)".to_string(),
        }
    }
}
