//! ExtINT injection: the userspace PIC's INTR output delivered through KVM_INTERRUPT.
//!
//! With the split irqchip KVM accepts an ExtINT vector only when
//! `ready_for_interrupt_injection` says the vCPU can take one (interrupts enabled, no
//! event being re-injected, LVT LINT0 set to ExtINT and no vector already queued).
//! When it cannot, the injector asks for an interrupt window and tries again at
//! KVM_EXIT_IRQ_WINDOW_OPEN. The PIC is acknowledged (its INTA cycle) only when the
//! vector can be queued, and never twice for one vector.

use pyo3::prelude::*;
use vmm_sys_util::errno;

use crate::errors::kvm_error;

/// What the injector needs from the vCPU; a trait so the logic can be tested without KVM.
pub trait InjectionPort {
    /// `ready_for_interrupt_injection && if_flag`, as of the last exit.
    fn window_open(&self) -> bool;
    fn set_window_request(&mut self, requested: bool);
    /// KVM_INTERRUPT.
    fn interrupt(&mut self, vector: u8) -> Result<(), errno::Error>;
}

#[derive(Debug, Default)]
pub struct ExtintInjector {
    /// Acknowledged at the PIC but refused by KVM with EEXIST: injected before any new one.
    acknowledged: Option<u8>,
    /// We set `request_interrupt_window` and must clear it when nothing needs it.
    window_requested: bool,
    /// A vector was queued since the last exit, so the last exit's
    /// `ready_for_interrupt_injection` no longer holds.
    queued_since_exit: bool,
}

impl ExtintInjector {
    /// KVM_RUN returned: the kvm_run interrupt fields are fresh again.
    pub fn exited(&mut self) {
        self.queued_since_exit = false;
    }

    /// Before an entry and at KVM_EXIT_IRQ_WINDOW_OPEN. `level` reads the PIC's INTR
    /// output now (acknowledge may change it); `acknowledge` runs the PIC's INTA cycle.
    pub fn service(
        &mut self,
        port: &mut impl InjectionPort,
        level: impl Fn() -> bool,
        acknowledge: impl FnOnce() -> PyResult<Option<u8>>,
    ) -> PyResult<()> {
        if let Some(vector) = self.acknowledged {
            if self.can_queue(port) && self.queue(port, vector)? {
                self.acknowledged = None;
            } else {
                return self.request_window(port, true);
            }
        }
        if !level() {
            return self.request_window(port, false);
        }
        if !self.can_queue(port) {
            return self.request_window(port, true);
        }
        let Some(vector) = acknowledge()? else {
            // Nobody to acknowledge: leave INTR pending without spinning on windows.
            return self.request_window(port, false);
        };
        if !self.queue(port, vector)? {
            self.acknowledged = Some(vector);
            return self.request_window(port, true);
        }
        // Still high after the INTA cycle: another request waits behind this one.
        self.request_window(port, level())
    }

    /// A vector acknowledged at the PIC that KVM has not accepted yet.
    pub fn holds_acknowledged(&self) -> bool {
        self.acknowledged.is_some()
    }

    fn can_queue(&self, port: &impl InjectionPort) -> bool {
        !self.queued_since_exit && port.window_open()
    }

    /// Ok(false) when KVM still holds a vector (EEXIST): try again later.
    fn queue(&mut self, port: &mut impl InjectionPort, vector: u8) -> PyResult<bool> {
        match port.interrupt(vector) {
            Ok(()) => {
                self.queued_since_exit = true;
                Ok(true)
            }
            Err(err) if err.errno() == libc::EEXIST => Ok(false),
            Err(err) => Err(kvm_error("KVM_INTERRUPT", err)),
        }
    }

    fn request_window(&mut self, port: &mut impl InjectionPort, requested: bool) -> PyResult<()> {
        if requested != self.window_requested {
            port.set_window_request(requested);
            self.window_requested = requested;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[derive(Default)]
    struct FakePort {
        open: bool,
        window: bool,
        queued: Vec<u8>,
        refuse_with_eexist: bool,
    }

    impl InjectionPort for FakePort {
        fn window_open(&self) -> bool {
            self.open
        }
        fn set_window_request(&mut self, requested: bool) {
            self.window = requested;
        }
        fn interrupt(&mut self, vector: u8) -> Result<(), errno::Error> {
            if self.refuse_with_eexist {
                return Err(errno::Error::new(libc::EEXIST));
            }
            self.queued.push(vector);
            Ok(())
        }
    }

    fn ack_counter(count: &Cell<u32>, vector: u8) -> impl FnOnce() -> PyResult<Option<u8>> + '_ {
        move || {
            count.set(count.get() + 1);
            Ok(Some(vector))
        }
    }

    #[test]
    fn closed_window_requests_one_and_does_not_acknowledge() {
        let mut injector = ExtintInjector::default();
        let mut port = FakePort::default();
        let acks = Cell::new(0);
        injector
            .service(&mut port, || true, ack_counter(&acks, 0x20))
            .unwrap();
        assert!(port.window);
        assert_eq!(acks.get(), 0);
        assert!(port.queued.is_empty());
    }

    #[test]
    fn open_window_acknowledges_queues_and_clears_the_request() {
        let mut injector = ExtintInjector::default();
        let mut port = FakePort::default();
        let acks = Cell::new(0);
        injector
            .service(&mut port, || true, ack_counter(&acks, 0x20))
            .unwrap();
        injector.exited();
        port.open = true;
        let level = Cell::new(true);
        injector
            .service(
                &mut port,
                || level.get(),
                || {
                    level.set(false);
                    Ok(Some(0x21))
                },
            )
            .unwrap();
        assert_eq!(port.queued, vec![0x21]);
        assert!(!port.window);
    }

    #[test]
    fn no_second_acknowledge_before_the_next_exit() {
        let mut injector = ExtintInjector::default();
        let mut port = FakePort {
            open: true,
            ..FakePort::default()
        };
        let acks = Cell::new(0);
        injector
            .service(&mut port, || true, ack_counter(&acks, 0x30))
            .unwrap();
        // INTR still high: the stale window flag must not cause another INTA.
        injector
            .service(&mut port, || true, ack_counter(&acks, 0x31))
            .unwrap();
        assert_eq!(acks.get(), 1);
        assert_eq!(port.queued, vec![0x30]);
        assert!(port.window, "INTR still high: wait for the next window");
    }

    #[test]
    fn eexist_keeps_the_acknowledged_vector_for_later() {
        let mut injector = ExtintInjector::default();
        let mut port = FakePort {
            open: true,
            refuse_with_eexist: true,
            ..FakePort::default()
        };
        let acks = Cell::new(0);
        injector
            .service(&mut port, || true, ack_counter(&acks, 0x40))
            .unwrap();
        assert!(port.window);
        assert!(injector.holds_acknowledged());
        injector.exited();
        port.refuse_with_eexist = false;
        // INTR dropped meanwhile: the acknowledged vector is still owed to the CPU.
        injector
            .service(&mut port, || false, ack_counter(&acks, 0x41))
            .unwrap();
        assert_eq!(acks.get(), 1);
        assert_eq!(port.queued, vec![0x40]);
        assert!(!port.window);
        assert!(!injector.holds_acknowledged());
    }

    #[test]
    fn falling_level_withdraws_the_window_request() {
        let mut injector = ExtintInjector::default();
        let mut port = FakePort::default();
        let acks = Cell::new(0);
        injector
            .service(&mut port, || true, ack_counter(&acks, 0x20))
            .unwrap();
        assert!(port.window);
        injector
            .service(&mut port, || false, ack_counter(&acks, 0x20))
            .unwrap();
        assert!(!port.window);
        assert_eq!(acks.get(), 0);
    }

    #[test]
    fn other_kvm_errors_surface() {
        struct BrokenPort;
        impl InjectionPort for BrokenPort {
            fn window_open(&self) -> bool {
                true
            }
            fn set_window_request(&mut self, _requested: bool) {}
            fn interrupt(&mut self, _vector: u8) -> Result<(), errno::Error> {
                Err(errno::Error::new(libc::EINVAL))
            }
        }
        let mut injector = ExtintInjector::default();
        assert!(
            injector
                .service(&mut BrokenPort, || true, || Ok(Some(1)))
                .is_err()
        );
    }
}
