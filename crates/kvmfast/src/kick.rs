//! Getting a vCPU out of KVM_RUN from any thread: requests, `immediate_exit` and a
//! real-time signal.
//!
//! Order that loses no wake-up: the requester sets its request bit, then
//! `immediate_exit = 1`, then signals the thread inside run(). The run loop clears
//! `immediate_exit` and only then reads the request bits before each KVM_RUN, so a
//! request it did not see has set `immediate_exit` after the clear and the next
//! KVM_RUN returns at once (or the signal interrupts it).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use pyo3::prelude::*;

use crate::locks;
use crate::run_page::RunPage;

/// Leave KVM_RUN and re-enter after handling the other requests.
pub const REQUEST_KICK: u32 = 1 << 0;
/// Return Exit("stopped") from run().
pub const REQUEST_STOP: u32 = 1 << 1;
/// Issue KVM_NMI on the vCPU thread before the next entry.
pub const REQUEST_NMI: u32 = 1 << 2;
/// Raise LINT1: KVM_NMI only if the vCPU's LVT LINT1 says NMI, unmasked.
pub const REQUEST_LINT1: u32 = 1 << 3;
/// Record the guest's RIP in the vCPU's samples (a profiler's tick).
pub const REQUEST_SAMPLE: u32 = 1 << 4;
/// Return Exit("paused") from run() at the next clean point (see [`before_entry`]).
pub const REQUEST_PAUSE: u32 = 1 << 5;

/// What the run loop does, before an entry, with the requests it took.
#[derive(Debug, PartialEq, Eq)]
pub enum BeforeEntry {
    /// Return Exit("stopped").
    Stop,
    /// Return Exit("paused"): nothing is in flight, run() can continue from here.
    Pause,
    /// A pause was asked for but something is in flight: enter the guest and ask again
    /// after the next exit.
    DeferPause,
    /// Enter the guest.
    Enter,
}

/// The decision, apart from KVM. A pause is honoured only where the vCPU's state is all
/// in KVM and the devices: not while a SYSCALL-quirk repair waits for the guest to run
/// from it (a return would leave the entry that must not be cut short to a later run(),
/// emulate::syscall_quirk::PendingRepair), nor while an ExtINT vector acknowledged at
/// the PIC has not been accepted by KVM_INTERRUPT (it would exist only in the injector).
/// A stop is honoured at once, as before.
pub fn before_entry(requests: u32, repair_pending: bool, extint_in_flight: bool) -> BeforeEntry {
    if requests & REQUEST_STOP != 0 {
        BeforeEntry::Stop
    } else if requests & REQUEST_PAUSE == 0 {
        BeforeEntry::Enter
    } else if repair_pending || extint_in_flight {
        BeforeEntry::DeferPause
    } else {
        BeforeEntry::Pause
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn ignore_kick(_signal: libc::c_int) {}

/// Installs the kick signal's handler once per process: a no-op without SA_RESTART, so
/// that the signal only makes KVM_RUN return EINTR.
fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler is an
        // async-signal-safe no-op with the signature sa_handler expects.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_kick as *const () as libc::sighandler_t;
            action.sa_flags = 0;
            libc::sigemptyset(&mut action.sa_mask);
            let status = libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
            assert_eq!(status, 0, "sigaction for the vCPU kick signal failed");
        }
    });
}

/// Makes sure the calling thread can receive the kick signal.
fn unblock_kick_signal() {
    // SAFETY: building a one-signal set and unblocking it for this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Runs `f` with the kick signal blocked on this thread: a kick posted meanwhile is
/// delivered (and its requests served) once `f` returns.
pub fn with_kick_signal_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: building a one-signal set and changing this thread's mask only; the old
    // mask is restored before returning.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    let result = f();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

/// The part of a vCPU that other threads may touch while it runs.
#[derive(Debug)]
pub struct KickState {
    run_page: Arc<RunPage>,
    requests: AtomicU32,
    extint_level: AtomicBool,
    /// The thread inside run(), held locked while signalling so that it cannot leave
    /// run() (and perhaps exit) between the look-up and pthread_kill.
    running_thread: Mutex<Option<libc::pthread_t>>,
}

impl KickState {
    pub fn new(run_page: Arc<RunPage>) -> Self {
        install_kick_handler();
        Self {
            run_page,
            requests: AtomicU32::new(0),
            extint_level: AtomicBool::new(false),
            running_thread: Mutex::new(None),
        }
    }

    fn thread(&self) -> MutexGuard<'_, Option<libc::pthread_t>> {
        locks::lock(&self.running_thread)
    }

    /// Posts request bits and forces the vCPU out of KVM_RUN.
    pub fn post(&self, bits: u32) {
        self.requests.fetch_or(bits, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.run_page.set_immediate_exit(true);
        if let Some(thread) = *self.thread() {
            // SAFETY: the thread is inside run() (it clears running_thread under this
            // lock before leaving), so the pthread_t is live.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// The PIC's INTR output; a rising edge kicks the vCPU so that it can inject.
    pub fn set_extint(&self, level: bool) {
        let was = self.extint_level.swap(level, Ordering::SeqCst);
        if level && !was {
            self.post(REQUEST_KICK);
        }
    }

    pub fn extint_level(&self) -> bool {
        self.extint_level.load(Ordering::SeqCst)
    }

    /// Keeps request bits for the next look without forcing an exit: a deferred pause
    /// waits for the guest's next exit.
    pub fn defer(&self, bits: u32) {
        self.requests.fetch_or(bits, Ordering::SeqCst);
    }

    /// Run loop, before each KVM_RUN: clear `immediate_exit`, then take the requests.
    pub fn take_requests(&self) -> u32 {
        self.run_page.set_immediate_exit(false);
        fence(Ordering::SeqCst);
        self.requests.swap(0, Ordering::SeqCst)
    }

    /// Registers the calling thread as the one inside run() until the guard drops.
    pub fn enter(&self) -> RunningThread<'_> {
        unblock_kick_signal();
        // SAFETY: pthread_self has no preconditions.
        *self.thread() = Some(unsafe { libc::pthread_self() });
        RunningThread { state: self }
    }
}

/// While alive, kicks are signalled to the thread that created it.
pub struct RunningThread<'a> {
    state: &'a KickState,
}

impl Drop for RunningThread<'_> {
    fn drop(&mut self) {
        *self.state.thread() = None;
    }
}

/// A handle that other threads use to interrupt one vCPU. Send and Sync.
#[pyclass(frozen, module = "kvmfast")]
pub struct VcpuKicker {
    state: Arc<KickState>,
}

impl VcpuKicker {
    pub fn new(state: Arc<KickState>) -> Self {
        Self { state }
    }
}

#[pymethods]
impl VcpuKicker {
    /// Forces one exit from KVM_RUN; run() re-enters after handling requests.
    fn kick(&self) {
        self.state.post(REQUEST_KICK);
    }

    /// Makes run() return Exit("stopped") (at once if it is running, else at its next call).
    fn stop(&self) {
        self.state.post(REQUEST_STOP);
    }

    /// Makes run() return Exit("paused") at the next clean point: no SYSCALL-quirk
    /// repair pending and no acknowledged ExtINT vector waiting for KVM, the last I/O
    /// exit completed by KVM, synced registers flushed to KVM. A later run() continues from there. Returns at once;
    /// the caller learns of the pause from run()'s return.
    fn pause(&self) {
        self.state.post(REQUEST_PAUSE);
    }

    /// Drives the PIC's INTR line into the vCPU's ExtINT injector.
    fn set_extint(&self, level: bool) {
        self.state.set_extint(level);
    }

    /// The INTR level last set.
    #[getter]
    fn extint(&self) -> bool {
        self.state.extint_level()
    }

    /// Issues KVM_NMI on the vCPU's own thread before its next entry.
    fn request_nmi(&self) {
        self.state.post(REQUEST_NMI);
    }

    /// Drives the LAPIC's LINT1 input: on the vCPU's own thread, before its next entry,
    /// reads LVT LINT1 (KVM_GET_LAPIC) and issues KVM_NMI only if that entry is NMI
    /// and unmasked, as api.rst's KVM_NMI section asks of a VMM with an in-kernel LAPIC.
    fn request_lint1(&self) {
        self.state.post(REQUEST_LINT1);
    }

    /// Takes the vCPU out of the guest once and counts the RIP it was at in the VM's
    /// samples (Vm.rip_samples): a sampling profiler of guest code.
    fn request_sample(&self) {
        self.state.post(REQUEST_SAMPLE);
    }

    fn __repr__(&self) -> String {
        format!("VcpuKicker(extint={})", self.state.extint_level())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_waits_for_a_pending_repair_and_an_extint_in_flight() {
        assert_eq!(
            before_entry(REQUEST_PAUSE, false, false),
            BeforeEntry::Pause
        );
        assert_eq!(
            before_entry(REQUEST_PAUSE, true, false),
            BeforeEntry::DeferPause
        );
        assert_eq!(
            before_entry(REQUEST_PAUSE, false, true),
            BeforeEntry::DeferPause
        );
        assert_eq!(
            before_entry(REQUEST_PAUSE | REQUEST_KICK, true, true),
            BeforeEntry::DeferPause
        );
    }

    #[test]
    fn a_stop_is_honoured_at_once_and_wins_over_a_pause() {
        assert_eq!(before_entry(REQUEST_STOP, true, true), BeforeEntry::Stop);
        assert_eq!(
            before_entry(REQUEST_STOP | REQUEST_PAUSE, false, false),
            BeforeEntry::Stop
        );
    }

    #[test]
    fn other_requests_enter_the_guest() {
        assert_eq!(before_entry(0, true, true), BeforeEntry::Enter);
        assert_eq!(
            before_entry(REQUEST_KICK | REQUEST_NMI | REQUEST_SAMPLE, false, false),
            BeforeEntry::Enter
        );
    }
}
