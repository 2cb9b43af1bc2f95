//! A file descriptor the event loop watches for input next to its eventfd doorbells
//! (a TAP's frames, later vsock's sockets), served by a native handler on the loop's
//! thread. The fd is armed one-shot: after each call the handler says whether to watch
//! it again at once, or to leave it parked (its input left in the kernel's queue) until
//! the handler's owner re-arms it through the `Rearm` the loop handed it.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;

use pyo3::prelude::*;

/// What a handler wants after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Watch again now (level-triggered: input still queued is reported at once).
    Rearm,
    /// Not until `Rearm::rearm` is called (nowhere to put the input, or the fd is dead).
    Park,
}

pub trait ReadableHandler: Send + Sync {
    /// The fd to watch (-1 once its owner closed it).
    fn fd(&self) -> RawFd;
    /// A duplicate of the fd for the loop to watch, made while the owner keeps it open
    /// (an error once it closed it).
    fn duplicate_fd(&self) -> std::io::Result<OwnedFd>;
    /// The fd is readable (or in error): take what can be taken.
    fn ready(&self) -> Readiness;
    /// The loop's way to watch the fd again (None: no longer in a loop).
    fn attach(&self, rearm: Option<Rearm>);
}

/// Arms a parked fd in the loop that handed it out; a no-op once the fd left the loop.
#[derive(Clone)]
pub struct Rearm(Arc<dyn Fn() + Send + Sync>);

impl Rearm {
    pub fn new(arm: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(arm))
    }

    pub fn rearm(&self) {
        (self.0)();
    }
}

/// A ReadableHandler as Python holds it, for EventLoop.add_readable.
#[pyclass(frozen, module = "kvmfast")]
pub struct FdHandler {
    handler: Arc<dyn ReadableHandler>,
    /// The fd as it was when made: the loop's key for it, even once its owner closed it.
    fd: RawFd,
}

impl FdHandler {
    pub fn new(handler: Arc<dyn ReadableHandler>) -> Self {
        let fd = handler.fd();
        Self { handler, fd }
    }

    pub fn handler(&self) -> Arc<dyn ReadableHandler> {
        self.handler.clone()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }
}

#[pymethods]
impl FdHandler {
    #[getter]
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn __repr__(&self) -> String {
        format!("FdHandler(fd={})", self.fd)
    }
}
