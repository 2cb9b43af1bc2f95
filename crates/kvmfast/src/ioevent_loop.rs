//! The ioeventfd fast path: one Rust thread waits on registered eventfds with epoll
//! and runs their handlers, Python ones with the GIL taken only for the call, native
//! ones (IrqfdTrigger, VirtioQueueHandler) without Python at all; and readable fds
//! with native handlers (fd_watch: a TAP's frames), armed one-shot like the doorbells.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::io_error;
use crate::eventfd::{EventFd, add_to_counter, new_eventfd, read_counter};
use crate::fd_watch::{FdHandler, ReadableHandler, Readiness, Rearm};
use crate::locks;
use crate::timerfd::OneShotTimer;
use crate::virtio::device::DeviceCore;
use crate::virtio::python::VirtioQueueHandler;

/// Doorbell → interrupt without Python: writes 1 to an irqfd's eventfd.
#[pyclass(frozen, module = "kvmfast")]
pub struct IrqfdTrigger {
    irq_eventfd: Arc<OwnedFd>,
}

#[pymethods]
impl IrqfdTrigger {
    #[new]
    fn new(irq_eventfd: &EventFd) -> PyResult<Self> {
        Ok(Self {
            irq_eventfd: Arc::new(irq_eventfd.duplicate()?),
        })
    }

    fn __repr__(&self) -> String {
        format!("IrqfdTrigger(fd={})", self.irq_eventfd.as_raw_fd())
    }
}

enum LoopHandler {
    Python(Py<PyAny>),
    Irqfd(Arc<OwnedFd>),
    /// A virtio queue's doorbell: its requests run here, on the loop thread.
    Virtio(Arc<DeviceCore>, usize),
    /// Not an eventfd: a readable fd whose handler reads it (nothing is read here).
    Readable(Arc<dyn ReadableHandler>),
}

struct Registration {
    /// The fd number the caller registered (the key of remove() and counters()).
    caller_fd: RawFd,
    /// Our duplicate, so that closing the caller's EventFd cannot hand its number to
    /// another file under our feet.
    fd: OwnedFd,
    handler: LoopHandler,
    notifications: AtomicU64,
    /// Whether the fd is in the epoll set (it leaves it for a coalescing window).
    in_epoll: AtomicBool,
}

/// How far a window grows while a doorbell keeps ringing through it (doubling each
/// time), as adaptive interrupt moderation does: the loop thread then wakes rarely
/// enough that, on a host whose two CPUs share a core, the vCPU runs at its floor.
const MAX_WINDOW_GROWTH: u32 = 16;

/// epoll's tokens for the loop's own wake-up eventfd and its coalescing timer;
/// registrations count from FIRST_TOKEN.
const WAKE_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_TOKEN: u64 = 2;

struct LoopShared {
    epoll: OwnedFd,
    wake: OwnedFd,
    /// A timerfd that ends the coalescing windows.
    timer: OneShotTimer,
    stopping: AtomicBool,
    next_token: AtomicU64,
    registrations: Mutex<HashMap<u64, Arc<Registration>>>,
}

impl LoopShared {
    fn registrations(&self) -> MutexGuard<'_, HashMap<u64, Arc<Registration>>> {
        locks::lock(&self.registrations)
    }

    fn epoll_ctl(
        &self,
        op: libc::c_int,
        fd: RawFd,
        token: u64,
        events: u32,
    ) -> std::io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl reads one epoll_event we own; both fds are open.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Doorbells are one-shot: once epoll reports one, a guest ringing it again finds
    /// it disarmed and wakes nobody, until the loop re-arms it.
    fn arm(&self, op: libc::c_int, registration: &Registration, token: u64) -> std::io::Result<()> {
        let events = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
        self.epoll_ctl(op, registration.fd.as_raw_fd(), token, events)
    }

    /// The loop thread. A doorbell is handled as soon as epoll reports it. If its
    /// counter said more than one ring (the guest rings faster than the loop wakes), it
    /// leaves the epoll set for `window` (doubled, up to MAX_WINDOW_GROWTH times, while
    /// it keeps ringing) and the rings of that window are handled together at its end:
    /// no wake-up, and no epoll callback at all in the guest's eventfd write meanwhile,
    /// which is what a ring costs beyond KVM's own floor (NAPI's interrupt mitigation,
    /// for ioeventfds). A single ring re-arms at once, so a request/response doorbell
    /// waits for no window.
    fn run(&self, window: Duration) {
        // A timer slack of 50 us (the default) would stretch every window.
        // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        // (token, end of its window, that window's length)
        let mut deferred: Vec<(u64, Instant, Duration)> = Vec::new();
        // The timer's deadline as last set: a wake-up with no window opened or closed
        // (every single ring of a request/response doorbell) makes no timerfd call.
        let mut timer_at: Option<Instant> = None;
        loop {
            // SAFETY: epoll_wait writes at most events.len() entries into our array.
            let ready = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if ready < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
            for event in &events[..ready as usize] {
                match event.u64 {
                    WAKE_TOKEN => {
                        let _ = read_counter(self.wake.as_raw_fd());
                        if self.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                    TIMER_TOKEN => {
                        self.timer.clear();
                        timer_at = None; // a timerfd that fired is disarmed
                        let now = Instant::now();
                        let (due, waiting): (Vec<_>, Vec<_>) =
                            deferred.drain(..).partition(|(_, at, _)| *at <= now);
                        deferred = waiting;
                        for (token, _, length) in due {
                            // A doorbell still ringing fast gets a longer window.
                            let next = (length * 2).min(window * MAX_WINDOW_GROWTH);
                            if !self.serve(token, false, next, &mut deferred) {
                                return;
                            }
                        }
                    }
                    token => {
                        if !self.serve(token, true, window, &mut deferred) {
                            return;
                        }
                    }
                }
            }
            let next = deferred.iter().map(|(_, at, _)| *at).min();
            if next != timer_at {
                self.set_timer(next);
                timer_at = next;
            }
        }
    }

    /// Handles what doorbell `token` has counted and decides when it is armed again;
    /// `in_epoll`: reported by epoll (registered, disarmed), else at its window's end
    /// (out of the set). False when Python is shutting down and the loop must end.
    fn serve(
        &self,
        token: u64,
        in_epoll: bool,
        window: Duration,
        deferred: &mut Vec<(u64, Instant, Duration)>,
    ) -> bool {
        let Some(registration) = self.registrations().get(&token).cloned() else {
            return true; // removed meanwhile
        };
        if let LoopHandler::Readable(handler) = &registration.handler {
            registration.notifications.fetch_add(1, Ordering::Relaxed);
            if handler.ready() == Readiness::Rearm {
                self.rearm(token);
            }
            return true;
        }
        let count = read_counter(registration.fd.as_raw_fd()).ok().flatten();
        if let Some(count) = count
            && !self.notify(&registration, count)
        {
            return false;
        }
        let coalesce = count.is_some_and(|count| count > 1) && !window.is_zero();
        // Under the registrations' lock, so that remove() and this agree on whether
        // the fd is in the epoll set.
        let registrations = self.registrations();
        if !registrations.contains_key(&token) {
            return true;
        }
        if coalesce {
            if in_epoll {
                let _ = self.epoll_ctl(libc::EPOLL_CTL_DEL, registration.fd.as_raw_fd(), 0, 0);
                registration.in_epoll.store(false, Ordering::Relaxed);
            }
            deferred.push((token, Instant::now() + window, window));
        } else {
            // Arming reports the fd at once if it was rung since the read.
            let op = if in_epoll {
                libc::EPOLL_CTL_MOD
            } else {
                libc::EPOLL_CTL_ADD
            };
            let _ = self.arm(op, &registration, token);
            registration.in_epoll.store(true, Ordering::Relaxed);
        }
        true
    }

    /// Arms readable registration `token` again, if it is still in the loop.
    fn rearm(&self, token: u64) {
        let registrations = self.registrations();
        if let Some(registration) = registrations.get(&token) {
            let _ = self.arm(libc::EPOLL_CTL_MOD, registration, token);
        }
    }

    fn set_timer(&self, at: Option<Instant>) {
        self.timer
            .set(at.map(|at| at.saturating_duration_since(Instant::now())));
    }

    /// Calls the handler with `count`; false when Python is shutting down.
    fn notify(&self, registration: &Registration, count: u64) -> bool {
        registration.notifications.fetch_add(1, Ordering::Relaxed);
        match &registration.handler {
            LoopHandler::Irqfd(irq) => {
                let _ = add_to_counter(irq.as_raw_fd(), 1);
                true
            }
            LoopHandler::Virtio(device, queue) => {
                device.serve(*queue);
                true
            }
            LoopHandler::Readable(_) => true, // served in serve(), never counted
            LoopHandler::Python(callback) => Python::try_attach(|py| {
                if let Err(err) = callback.call1(py, (count,)) {
                    // Nobody to raise to on this thread: report like an unraisable error.
                    err.write_unraisable(py, Some(callback.bind(py)));
                }
            })
            .is_some(),
        }
    }
}

fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL reads the file status flags of an open fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// The event loop: add eventfds with handlers, start(), stop().
#[pyclass(frozen, module = "kvmfast")]
pub struct EventLoop {
    shared: Arc<LoopShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    coalesce: Duration,
}

impl EventLoop {
    fn thread(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        locks::lock(&self.thread)
    }

    fn remove_fd(&self, caller_fd: RawFd) -> PyResult<()> {
        let mut registrations = self.shared.registrations();
        let token = registrations
            .iter()
            .find(|(_, r)| r.caller_fd == caller_fd)
            .map(|(token, _)| *token)
            .ok_or_else(|| PyValueError::new_err(format!("fd {caller_fd} is not in the loop")))?;
        if let Some(registration) = registrations.remove(&token) {
            // Out of the set already while it coalesces a window.
            if registration.in_epoll.load(Ordering::Relaxed) {
                self.shared
                    .epoll_ctl(libc::EPOLL_CTL_DEL, registration.fd.as_raw_fd(), 0, 0)
                    .map_err(io_error)?;
            }
        }
        Ok(())
    }

    /// Signals the thread to end and hands back its handle (None if not running).
    fn signal_stop(&self) -> Option<JoinHandle<()>> {
        let handle = self.thread().take()?;
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = add_to_counter(self.shared.wake.as_raw_fd(), 1);
        Some(handle)
    }
}

#[pymethods]
impl EventLoop {
    /// `coalesce_us`: how long a doorbell that rang more than once since the last
    /// look stays disarmed, its rings handled together at the end (0: never).
    #[new]
    #[pyo3(signature = (coalesce_us = 50))]
    fn new(coalesce_us: u64) -> PyResult<Self> {
        // SAFETY: epoll_create1 has no memory arguments.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io_error(std::io::Error::last_os_error()));
        }
        // SAFETY: the fd was just created and nothing else owns it.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let timer = OneShotTimer::new().map_err(io_error)?;
        let shared = LoopShared {
            epoll,
            wake: new_eventfd(true).map_err(io_error)?,
            timer,
            stopping: AtomicBool::new(false),
            next_token: AtomicU64::new(FIRST_TOKEN),
            registrations: Mutex::new(HashMap::new()),
        };
        let level = libc::EPOLLIN as u32;
        shared
            .epoll_ctl(
                libc::EPOLL_CTL_ADD,
                shared.wake.as_raw_fd(),
                WAKE_TOKEN,
                level,
            )
            .map_err(io_error)?;
        shared
            .epoll_ctl(libc::EPOLL_CTL_ADD, shared.timer.fd(), TIMER_TOKEN, level)
            .map_err(io_error)?;
        Ok(Self {
            shared: Arc::new(shared),
            thread: Mutex::new(None),
            coalesce: Duration::from_micros(coalesce_us),
        })
    }

    /// Watches `eventfd` (which must be non-blocking); `handler` is a callable taking the
    /// counter value, an IrqfdTrigger or a VirtioQueueHandler. One call per readiness: notifications that
    /// arrive together are coalesced into one call with their sum.
    fn add(&self, eventfd: &EventFd, handler: &Bound<'_, PyAny>) -> PyResult<()> {
        let caller_fd = eventfd.raw_fd()?;
        if !eventfd.is_nonblocking() || !is_nonblocking(caller_fd) {
            return Err(PyValueError::new_err(
                "the event loop needs a non-blocking EventFd (EventFd(nonblocking=True))",
            ));
        }
        let handler = if let Ok(trigger) = handler.cast::<IrqfdTrigger>() {
            LoopHandler::Irqfd(trigger.get().irq_eventfd.clone())
        } else if let Ok(virtio) = handler.cast::<VirtioQueueHandler>() {
            let (device, queue) = virtio.get().target();
            LoopHandler::Virtio(device, queue)
        } else if handler.is_callable() {
            LoopHandler::Python(handler.clone().unbind())
        } else {
            return Err(PyValueError::new_err(
                "handler must be a callable(count), an IrqfdTrigger or a VirtioQueueHandler",
            ));
        };
        let mut registrations = self.shared.registrations();
        if registrations.values().any(|r| r.caller_fd == caller_fd) {
            return Err(PyValueError::new_err(format!(
                "fd {caller_fd} is already in the loop"
            )));
        }
        let registration = Registration {
            caller_fd,
            fd: eventfd.duplicate()?,
            handler,
            notifications: AtomicU64::new(0),
            in_epoll: AtomicBool::new(true),
        };
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        self.shared
            .arm(libc::EPOLL_CTL_ADD, &registration, token)
            .map_err(io_error)?;
        registrations.insert(token, Arc::new(registration));
        Ok(())
    }

    /// Watches the fd of `handler` for input; the handler runs on the loop thread when
    /// it is readable, and says whether to watch it again at once or to wait until the
    /// handler's owner re-arms it.
    fn add_readable(&self, handler: &FdHandler) -> PyResult<()> {
        let caller_fd = handler.raw_fd();
        let handler = handler.handler();
        if caller_fd < 0 {
            return Err(PyValueError::new_err("the handler's fd is closed"));
        }
        if !is_nonblocking(caller_fd) {
            return Err(PyValueError::new_err(format!(
                "fd {caller_fd} is blocking: the loop thread must never wait in a handler"
            )));
        }
        let fd = handler.duplicate_fd().map_err(io_error)?;
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        {
            let mut registrations = self.shared.registrations();
            if registrations.values().any(|r| r.caller_fd == caller_fd) {
                return Err(PyValueError::new_err(format!(
                    "fd {caller_fd} is already in the loop"
                )));
            }
            let registration = Registration {
                caller_fd,
                fd,
                handler: LoopHandler::Readable(handler.clone()),
                notifications: AtomicU64::new(0),
                in_epoll: AtomicBool::new(true),
            };
            self.shared
                .arm(libc::EPOLL_CTL_ADD, &registration, token)
                .map_err(io_error)?;
            registrations.insert(token, Arc::new(registration));
        }
        // Outside the registrations' lock: the handler may be re-arming meanwhile.
        let shared: Weak<LoopShared> = Arc::downgrade(&self.shared);
        handler.attach(Some(Rearm::new(move || {
            if let Some(shared) = shared.upgrade() {
                shared.rearm(token);
            }
        })));
        Ok(())
    }

    /// Stops watching the fd of `handler`; ValueError if it was not added.
    fn remove_readable(&self, handler: &FdHandler) -> PyResult<()> {
        self.remove_fd(handler.raw_fd())?;
        handler.handler().attach(None);
        Ok(())
    }

    /// Stops watching `eventfd`; ValueError if it was not added.
    fn remove(&self, eventfd: &EventFd) -> PyResult<()> {
        self.remove_fd(eventfd.raw_fd()?)
    }

    /// Starts the loop thread (no-op when it runs).
    fn start(&self) -> PyResult<()> {
        let mut thread = self.thread();
        if thread.is_some() {
            return Ok(());
        }
        self.shared.stopping.store(false, Ordering::SeqCst);
        let shared = self.shared.clone();
        let coalesce = self.coalesce;
        let handle = std::thread::Builder::new()
            .name("kvmfast-ioevent".to_string())
            .spawn(move || {
                block_ending_signals();
                shared.run(coalesce)
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the event loop: {e}")))?;
        *thread = Some(handle);
        Ok(())
    }

    /// Stops the loop thread and waits for it (without the GIL, which it may need to
    /// finish a handler call). Idempotent.
    fn stop(&self, py: Python<'_>) {
        if let Some(handle) = self.signal_stop() {
            let _ = py.detach(|| handle.join());
        }
    }

    #[getter]
    fn coalesce_us(&self) -> u128 {
        self.coalesce.as_micros()
    }

    #[getter]
    fn running(&self) -> bool {
        self.thread().is_some()
    }

    /// {caller fd: notifications handled}.
    fn counters(&self) -> HashMap<RawFd, u64> {
        self.shared
            .registrations()
            .values()
            .map(|r| (r.caller_fd, r.notifications.load(Ordering::Relaxed)))
            .collect()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc_value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) {
        self.stop(py);
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if let Some(handle) = self.signal_stop() {
            // Dropped with the GIL held (tp_dealloc): let the thread finish a handler call
            // that may be waiting for it.
            let _ = Python::try_attach(|py| py.detach(|| handle.join()));
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP end a kvm-vmm process through Python's handlers
/// (kvm_vmm.signals), which the main thread runs once its blocking call returns with
/// EINTR. The kernel may hand a process-directed signal to any thread that does not
/// block it: had this loop thread taken one, the main thread would have stayed blocked
/// (in a kernel file's read(), say) with the signal seen but never acted on.
fn block_ending_signals() {
    // SAFETY: the set is a local we initialise with sigemptyset before use, and
    // pthread_sigmask changes only the calling thread's mask (old mask not wanted).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
