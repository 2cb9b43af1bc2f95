//! A one-shot CLOCK_MONOTONIC timer as an fd an epoll set can watch (non-blocking
//! timerfd): the event loop's coalescing windows and vsock's CONNECT timeouts.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub struct OneShotTimer(OwnedFd);

impl OneShotTimer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create has no memory arguments.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just made and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Fires once after `after` (None: disarmed).
    pub fn set(&self, after: Option<Duration>) {
        let value = match after {
            // 0 would disarm it: a deadline already past fires in 1 ns.
            Some(after) => libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos().max(1)),
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: timerfd_settime reads one itimerspec we own; the timerfd is open.
        unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Takes the expiry count, so that the fd is no longer readable.
    pub fn clear(&self) {
        let mut count = 0u64;
        // SAFETY: read writes at most 8 bytes into the u64 we own.
        unsafe { libc::read(self.0.as_raw_fd(), (&raw mut count).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expirations(timer: &OneShotTimer) -> Option<u64> {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a u64 we own from an open timerfd.
        let read = unsafe { libc::read(timer.fd(), (&mut count as *mut u64).cast(), 8) };
        (read == 8).then_some(count)
    }

    #[test]
    fn fires_once_after_its_delay_and_not_when_disarmed() {
        let timer = OneShotTimer::new().unwrap();
        assert_eq!(expirations(&timer), None); // never armed: nothing to read
        timer.set(Some(Duration::ZERO)); // already due: fires at once, not disarmed
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(expirations(&timer), Some(1));
        assert_eq!(expirations(&timer), None); // one shot
        timer.set(Some(Duration::from_millis(1)));
        timer.set(None);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(expirations(&timer), None);
    }
}
