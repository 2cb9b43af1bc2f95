//! A device's state shared by its Python handle and the event loop thread: the backend
//! (blk, rng, net or vsock), its queues once activated, and the eventfds it signals through.
//!
//! Each queue's state sits behind its own mutex, held by the loop thread while it drains
//! the queue; reset() raises the queue's `stopping` flag (checked between requests) and
//! takes that mutex, so it returns only after the request in flight has completed, and
//! nothing touches the rings or signals after it.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::blk::Block;
use super::counters::{DeviceCounters, bump};
use super::guest_memory::{DeviceMemory, MemoryError};
use super::net::{self, backend::Net};
use super::queue::{ActiveQueue, Completion, QueueConfig, SetupError};
use super::queue_state::{QueueState, StateError};
use super::vsock::{self, Vsock, muxer::Filled};
use super::{
    COMMON_FEATURES, DEVICE_ID_BLOCK, DEVICE_ID_ENTROPY, DEVICE_ID_NET, DEVICE_ID_VSOCK,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, rng,
};
use crate::eventfd::{add_to_counter, new_eventfd};
use crate::fd_watch::{ReadableHandler, Readiness, Rearm};
use crate::locks;
use crate::memory::GuestRam;

pub enum Backend {
    Block(Block),
    Rng,
    Net(Net),
    /// Boxed: its streams' tables are many times the other backends' size.
    Vsock(Box<Vsock>),
}

#[derive(Debug)]
pub enum ActivateError {
    Features { extra: u64 },
    QueueCount { given: usize, expected: usize },
    AlreadyActive,
    Closed,
    Memory(MemoryError),
    Queue { index: usize, error: SetupError },
}

impl fmt::Display for ActivateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Features { extra } => {
                write!(
                    f,
                    "the driver accepted features the device does not offer: {extra:#x}"
                )
            }
            Self::QueueCount { given, expected } => {
                write!(f, "{given} queues given, the device has {expected}")
            }
            Self::AlreadyActive => write!(f, "the device is already active: reset() first"),
            Self::Closed => write!(f, "the device is closed"),
            Self::Memory(error) => write!(f, "{error}"),
            Self::Queue { index, error } => write!(f, "queue {index}: {error}"),
        }
    }
}

struct QueueSlot {
    active: Mutex<Option<ActiveQueue>>,
    stopping: AtomicBool,
    /// The doorbell's eventfd (ours; Python and KVM hold duplicates).
    notifier: OwnedFd,
    /// Written when the driver wants to hear of completions (an irqfd, or the VMM's).
    interrupt: OwnedFd,
}

pub struct DeviceCore {
    backend: Backend,
    device_type: u32,
    features: u64,
    config: Vec<u8>,
    queues: Vec<QueueSlot>,
    config_interrupt: OwnedFd,
    needs_reset: AtomicBool,
    closed: AtomicBool,
    /// While the machine is paused: doorbells are not served (guest RAM stands still).
    paused: AtomicBool,
    pub counters: DeviceCounters,
}

impl DeviceCore {
    pub fn new(backend: Backend) -> std::io::Result<Self> {
        let (device_type, features, config, queues) = match &backend {
            Backend::Block(block) => (DEVICE_ID_BLOCK, block.features(), block.config(), 1),
            Backend::Rng => (DEVICE_ID_ENTROPY, 0, Vec::new(), 1),
            Backend::Net(net) => (DEVICE_ID_NET, net.features(), net.config(), net::NUM_QUEUES),
            // Stream sockets only: no feature bit of 5.10.3 (SEQPACKET not offered).
            Backend::Vsock(vsock) => (DEVICE_ID_VSOCK, 0, vsock.config(), vsock::NUM_QUEUES),
        };
        let queues = (0..queues)
            .map(|_| {
                Ok(QueueSlot {
                    active: Mutex::new(None),
                    stopping: AtomicBool::new(false),
                    notifier: new_eventfd(true)?,
                    interrupt: new_eventfd(true)?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            backend,
            device_type,
            features: features | COMMON_FEATURES,
            config,
            queues,
            config_interrupt: new_eventfd(true)?,
            needs_reset: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            counters: DeviceCounters::default(),
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn config_size(&self) -> usize {
        self.config.len()
    }

    pub fn net(&self) -> Option<&Net> {
        match &self.backend {
            Backend::Net(net) => Some(net),
            _ => None,
        }
    }

    pub fn vsock(&self) -> Option<&Vsock> {
        match &self.backend {
            Backend::Vsock(vsock) => Some(vsock),
            _ => None,
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn notifier(&self, queue: usize) -> Option<&OwnedFd> {
        self.queues.get(queue).map(|slot| &slot.notifier)
    }

    pub fn interrupt(&self, queue: usize) -> Option<&OwnedFd> {
        self.queues.get(queue).map(|slot| &slot.interrupt)
    }

    pub fn config_interrupt(&self) -> &OwnedFd {
        &self.config_interrupt
    }

    /// Little-endian bytes of the device config at [offset, offset+size); bytes beyond
    /// it read as 0.
    pub fn read_config(&self, offset: u64, size: u64) -> u64 {
        // A network device's link status changes under the driver.
        let live = self.net().map(Net::config);
        let config = live.as_ref().unwrap_or(&self.config);
        (0..size.min(8)).fold(0, |value, i| {
            let byte = offset
                .checked_add(i)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
            value | u64::from(byte) << (8 * i)
        })
    }

    /// Checks every enabled queue (None: disabled) and starts serving them. The
    /// doorbells are rung once so that chains made available before this are served,
    /// on the loop thread like every other request.
    pub fn activate(
        &self,
        ram: Arc<GuestRam>,
        driver_features: u64,
        queues: &[Option<QueueConfig>],
    ) -> Result<(), ActivateError> {
        let extra = driver_features & !self.features;
        if extra != 0 {
            return Err(ActivateError::Features { extra });
        }
        if queues.len() != self.queues.len() {
            return Err(ActivateError::QueueCount {
                given: queues.len(),
                expected: self.queues.len(),
            });
        }
        let mut guards = self.lock_all_queues();
        // Under the queues' locks: a close() racing this either finds the queues
        // active and stops them, or is seen here.
        if self.closed.load(Ordering::SeqCst) {
            return Err(ActivateError::Closed);
        }
        if guards.iter().any(|guard| guard.is_some()) {
            return Err(ActivateError::AlreadyActive);
        }
        let memory = Arc::new(DeviceMemory::new(ram).map_err(ActivateError::Memory)?);
        let event_idx = driver_features & 1 << VIRTIO_F_RING_EVENT_IDX != 0;
        let indirect = driver_features & 1 << VIRTIO_F_RING_INDIRECT_DESC != 0;
        let mut active = Vec::new();
        for (index, config) in queues.iter().enumerate() {
            active.push(
                config
                    .map(|config| ActiveQueue::new(memory.clone(), config, event_idx, indirect))
                    .transpose()
                    .map_err(|error| ActivateError::Queue { index, error })?,
            );
        }
        for (guard, queue) in guards.iter_mut().zip(active) {
            **guard = queue;
        }
        if let Some(net) = self.net() {
            net.activate(driver_features);
        }
        drop(guards);
        for slot in &self.queues {
            let _ = add_to_counter(slot.notifier.as_raw_fd(), 1);
        }
        Ok(())
    }

    /// Each queue's ring state (a queue not activated: ready false, all zero, signalled
    /// used unknown). Meaningful while the device is paused or not served.
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues
            .iter()
            .map(|slot| {
                locks::lock(&slot.active)
                    .as_ref()
                    .map_or_else(QueueState::default, ActiveQueue::state)
            })
            .collect()
    }

    /// Every queue's slot locked, in queue order (the one order anything takes them in).
    fn lock_all_queues(&self) -> Vec<MutexGuard<'_, Option<ActiveQueue>>> {
        self.queues
            .iter()
            .map(|slot| locks::lock(&slot.active))
            .collect()
    }

    /// Sets the activated queues' indices from a snapshot, all or none: refused when the
    /// count, ready, size or a ring differs from activate()'s, or a queue was already
    /// served (its rings would be rewound under the driver).
    pub fn restore_queue_states(&self, states: &[QueueState]) -> Result<(), StateError> {
        if states.len() != self.queues.len() {
            return Err(StateError::Count {
                given: states.len(),
                expected: self.queues.len(),
            });
        }
        let mut guards = self.lock_all_queues();
        for (queue, (guard, state)) in guards.iter().zip(states).enumerate() {
            let active = guard.as_ref();
            let current = active.map_or_else(QueueState::default, ActiveQueue::state);
            if let Some(key) = state.mismatch(&current) {
                return Err(StateError::Mismatch { queue, key });
            }
            if active.is_some_and(ActiveQueue::served) {
                return Err(StateError::AlreadyServed { queue });
            }
        }
        for (guard, state) in guards.iter_mut().zip(states) {
            if let Some(active) = guard.as_mut() {
                active.restore(state);
            }
        }
        if let Some(vsock) = self.vsock() {
            // The driver's streams did not come with the snapshot (5.10.6.6).
            vsock.owe_transport_reset();
        }
        Ok(())
    }

    /// Stops every queue, waiting for a request in flight; clears NEEDS_RESET.
    pub fn reset(&self) {
        for slot in &self.queues {
            slot.stopping.store(true, Ordering::SeqCst);
            let taken = locks::lock(&slot.active).take();
            slot.stopping.store(false, Ordering::SeqCst);
            drop(taken);
        }
        if let Some(net) = self.net() {
            net.reset();
        }
        if let Some(vsock) = self.vsock() {
            vsock.reset();
        }
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Serves no doorbell until resume(), and returns once the request in flight (if
    /// any) has completed: a paused machine's RAM and rings are the device's no more.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        for slot in &self.queues {
            slot.stopping.store(true, Ordering::SeqCst);
            drop(locks::lock(&slot.active));
            slot.stopping.store(false, Ordering::SeqCst);
        }
    }

    /// Serves doorbells again, and each queue once now: a ring taken while paused, or
    /// the rest of a queue a pause cut short, is not lost.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        for slot in &self.queues {
            let _ = add_to_counter(slot.notifier.as_raw_fd(), 1);
        }
    }

    /// Stops for good: reset(), no activation after it, the image's lock released or
    /// the TAP let go (a machine closed is no longer their user).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.reset();
        match &self.backend {
            Backend::Block(block) => block.close(),
            Backend::Net(net) => net.tap().close(),
            Backend::Vsock(vsock) => vsock.close(),
            Backend::Rng => {}
        }
    }

    /// The doorbell of `queue` rang: serve it (the loop thread, or a test).
    pub fn serve(&self, queue: usize) {
        let Some(slot) = self.queues.get(queue) else {
            return;
        };
        bump(&self.counters.notifications, 1);
        if let Some(net) = self.net()
            && queue == net::RX_QUEUE
        {
            // The driver added receive buffers: frames waiting in the TAP can go.
            if self.receive() == Readiness::Rearm {
                net.rearm();
            }
            return;
        }
        if self.vsock().is_some() {
            match queue {
                vsock::RX_QUEUE => {}
                vsock::EVENT_QUEUE => {
                    self.vsock_event();
                    return;
                }
                _ => self.serve_queue(slot),
            }
            // Buffers were added, or the driver's packets owe it answers (and credit
            // may have opened for host bytes).
            self.vsock_receive();
            return;
        }
        self.serve_queue(slot);
    }

    /// Completes every chain the driver made available on `slot`.
    fn serve_queue(&self, slot: &QueueSlot) {
        let mut guard = locks::lock(&slot.active);
        if self.paused.load(Ordering::SeqCst) {
            return; // resume() rings every queue again
        }
        let Some(active) = guard.as_mut() else {
            return; // not activated (or reset): the doorbell means nothing
        };
        let counters = &self.counters;
        let outcome = active.process(&slot.stopping, &mut |memory, chain, bounce| match &self
            .backend
        {
            Backend::Block(block) => block.execute(memory, chain, bounce, counters),
            Backend::Rng => Some(rng::execute(memory, chain, counters)),
            Backend::Net(net) => Some(net::tx::transmit(net, memory, chain, bounce, counters)),
            Backend::Vsock(vsock) => Some(vsock::transmit(vsock, memory, chain, bounce, counters)),
        });
        bump(&counters.requests, outcome.completed);
        if outcome.completed > 0 {
            if outcome.interrupt {
                bump(&counters.interrupts, 1);
                let _ = add_to_counter(slot.interrupt.as_raw_fd(), 1);
            } else {
                bump(&counters.suppressed_interrupts, 1);
            }
        }
        if outcome.broken.is_some() {
            bump(&counters.malformed_chains, 1);
            self.signal_needs_reset();
        }
        self.signal_link_change();
    }

    /// The TAP is readable, or the driver added receive buffers: frames go into the
    /// receive queue's buffers. Park when the TAP must wait (no buffers, a paused or
    /// inactive device, a dead TAP); the rx doorbell (rung by activate() and resume()
    /// too) comes back here.
    pub fn receive(&self) -> Readiness {
        let Some((net, slot)) = self.net().zip(self.queues.get(net::RX_QUEUE)) else {
            return Readiness::Park;
        };
        let mut guard = locks::lock(&slot.active);
        if self.paused.load(Ordering::SeqCst) {
            return Readiness::Park;
        }
        let Some(active) = guard.as_mut() else {
            return Readiness::Park;
        };
        let outcome = net::rx::receive(net, active, &slot.stopping, &self.counters);
        drop(guard);
        if outcome.delivered > 0 {
            bump(&self.counters.requests, outcome.delivered);
            if outcome.interrupt {
                bump(&self.counters.interrupts, 1);
                let _ = add_to_counter(slot.interrupt.as_raw_fd(), 1);
            } else {
                bump(&self.counters.suppressed_interrupts, 1);
            }
        }
        if outcome.broken.is_some() {
            bump(&self.counters.malformed_chains, 1);
            self.signal_needs_reset();
        }
        self.signal_link_change();
        outcome.readiness()
    }

    /// Packets owed to the driver go into its receive buffers. Those without one wait
    /// (a paused, inactive or broken device too): the rx doorbell, rung by activate()
    /// and resume() as well, comes back here.
    pub fn vsock_receive(&self) {
        let Some((vsock, slot)) = self.vsock().zip(self.queues.get(vsock::RX_QUEUE)) else {
            return;
        };
        let mut guard = locks::lock(&slot.active);
        if self.paused.load(Ordering::SeqCst) {
            return;
        }
        // A broken queue (NEEDS_RESET signalled) is left alone until reset().
        let Some(active) = guard.as_mut().filter(|active| !active.broken()) else {
            return;
        };
        let memory = active.memory();
        let guest = memory.memory();
        let mut completions = Vec::new();
        let mut broken = None;
        while vsock.has_work() && !slot.stopping.load(Ordering::SeqCst) {
            let start = active.next_avail();
            let chain = match active.pop(guest) {
                Ok(Some(chain)) => chain,
                Ok(None) => match active.enable_notification(guest) {
                    Ok(true) => continue,
                    Ok(false) => {
                        bump(&self.counters.rx_deferred, 1);
                        break;
                    }
                    Err(error) => {
                        broken = Some(error);
                        break;
                    }
                },
                Err(error) => {
                    broken = Some(error);
                    break;
                }
            };
            match vsock.fill(guest, &chain, &self.counters) {
                Filled::Packet(length) => {
                    bump(&self.counters.rx_packets, 1);
                    completions.push(Completion {
                        head: chain.head,
                        used_len: length,
                    });
                }
                Filled::TooSmall => {
                    // A buffer no packet fits: given back empty (nothing is lost).
                    bump(&self.counters.rx_dropped, 1);
                    completions.push(Completion {
                        head: chain.head,
                        used_len: 0,
                    });
                }
                Filled::Nothing => {
                    active.rewind(start);
                    break;
                }
            }
        }
        if broken.is_none()
            && !completions.is_empty()
            && let Err(error) = active.add_used_all(guest, &completions)
        {
            broken = Some(error);
        }
        let interrupt =
            !completions.is_empty() && broken.is_none() && active.interrupt_wanted(guest);
        drop(guard);
        if !completions.is_empty() && broken.is_none() {
            bump(&self.counters.requests, completions.len() as u64);
            self.signal_used(slot, interrupt);
        }
        if broken.is_some() {
            bump(&self.counters.malformed_chains, 1);
            self.signal_needs_reset();
        }
    }

    /// The event queue: a TRANSPORT_RESET owed goes into the driver's next buffer.
    fn vsock_event(&self) {
        let Some((vsock, slot)) = self.vsock().zip(self.queues.get(vsock::EVENT_QUEUE)) else {
            return;
        };
        let mut guard = locks::lock(&slot.active);
        if self.paused.load(Ordering::SeqCst) || !vsock.transport_reset_owed() {
            return;
        }
        let Some(active) = guard.as_mut() else {
            return;
        };
        let memory = active.memory();
        let guest = memory.memory();
        let chain = match active.pop(guest) {
            Ok(Some(chain)) => chain,
            Ok(None) => return, // the driver rings when it adds an event buffer
            Err(_) => {
                drop(guard);
                bump(&self.counters.malformed_chains, 1);
                self.signal_needs_reset();
                return;
            }
        };
        let event = vsock::EVENT_TRANSPORT_RESET.to_le_bytes();
        let (target, _) = chain.writable.split_at(event.len() as u64);
        let used_len = if target.total() == event.len() as u64 && target.write(guest, &event) {
            vsock.take_transport_reset();
            event.len() as u32
        } else {
            0 // too small for an event: given back empty, the event waits for the next
        };
        let completion = Completion {
            head: chain.head,
            used_len,
        };
        if active.add_used_all(guest, &[completion]).is_err() {
            drop(guard);
            bump(&self.counters.malformed_chains, 1);
            self.signal_needs_reset();
            return;
        }
        let interrupt = active.interrupt_wanted(guest);
        drop(guard);
        bump(&self.counters.requests, 1);
        self.signal_used(slot, interrupt);
        if used_len == 0 {
            self.vsock_event();
        }
    }

    fn signal_used(&self, slot: &QueueSlot, interrupt: bool) {
        if interrupt {
            bump(&self.counters.interrupts, 1);
            let _ = add_to_counter(slot.interrupt.as_raw_fd(), 1);
        } else {
            bump(&self.counters.suppressed_interrupts, 1);
        }
    }

    /// A network device's link went down: the driver rereads the status (5.1.4).
    fn signal_link_change(&self) {
        if self.net().is_some_and(Net::take_link_change) {
            bump(&self.counters.config_interrupts, 1);
            let _ = add_to_counter(self.config_interrupt.as_raw_fd(), 1);
        }
    }

    /// NEEDS_RESET is signalled once, until reset() clears it.
    fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            bump(&self.counters.config_interrupts, 1);
            let _ = add_to_counter(self.config_interrupt.as_raw_fd(), 1);
        }
    }
}

/// A network device's TAP as the event loop watches it.
pub struct TapWatch(pub Arc<DeviceCore>);

impl ReadableHandler for TapWatch {
    fn fd(&self) -> RawFd {
        self.0.net().map_or(-1, |net| net.tap().as_raw_fd())
    }

    fn duplicate_fd(&self) -> std::io::Result<OwnedFd> {
        match self.0.net() {
            Some(net) => net.tap().duplicate(),
            None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    fn ready(&self) -> Readiness {
        self.0.receive()
    }

    fn attach(&self, rearm: Option<Rearm>) {
        if let Some(net) = self.0.net() {
            net.attach(rearm);
        }
    }
}

/// A vsock device's epoll set (every host socket of its streams) as the event loop
/// watches it.
pub struct VsockWatch(pub Arc<DeviceCore>);

impl ReadableHandler for VsockWatch {
    fn fd(&self) -> RawFd {
        self.0.vsock().map_or(-1, Vsock::epoll_fd)
    }

    fn duplicate_fd(&self) -> std::io::Result<OwnedFd> {
        match self.0.vsock() {
            Some(vsock) => vsock.duplicate_epoll(),
            None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    fn ready(&self) -> Readiness {
        let Some(vsock) = self.0.vsock() else {
            return Readiness::Park;
        };
        vsock.host_events(&self.0.counters);
        self.0.vsock_receive();
        // Always watched again: host_events took every event the set reported
        // (accepted, read lines to the end, stopped watching input it cannot pass on
        // yet), so the set reports only what happens next, such as the REQUEST
        // timer of a guest with no driver to answer. Packets waiting for buffers go
        // at the rx doorbell.
        Readiness::Rearm
    }

    /// Nothing to keep: the watch never parks.
    fn attach(&self, _rearm: Option<Rearm>) {}
}
