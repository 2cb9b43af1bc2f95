//! One split virtqueue as the device drives it: virtio-queue keeps the ring indices,
//! the used ring and the EVENT_IDX arithmetic; every chain is checked (chain.rs) before
//! its request runs; a chain or ring that breaks the rules stops the queue.

use std::fmt;
use std::num::Wrapping;
use std::sync::Arc;
use std::sync::atomic::fence;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::MAX_QUEUE_SIZE;
use super::chain::{Chain, ChainError, Table, walk};
use super::disk::Bounce;
use super::guest_memory::{DeviceMemory, Memory};
use super::queue_state::QueueState;

pub const MAX_QUEUE_SIZE_USIZE: usize = MAX_QUEUE_SIZE as usize;

/// VRING_AVAIL_F_NO_INTERRUPT (2.7.7): without EVENT_IDX, the driver's "don't bother".
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What a request hands back for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub used_len: u32,
}

/// One queue as the driver configured it (common configuration, 4.1.4.3).
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    pub size: u64,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SetupError {
    /// Not a power of two in 1..=MAX_QUEUE_SIZE.
    Size(u64),
    Misaligned {
        ring: &'static str,
        address: u64,
    },
    OutsideRam {
        ring: &'static str,
        address: u64,
        length: u64,
    },
    /// virtio-queue takes an avail ring at 0 for "not configured" (Queue::iter), so a
    /// ring there could never be served.
    AvailAtZero,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Size(size) => write!(
                f,
                "queue size {size} is not a power of two between 1 and {MAX_QUEUE_SIZE}"
            ),
            Self::Misaligned { ring, address } => {
                write!(f, "the {ring} at {address:#x} is misaligned (2.7)")
            }
            Self::OutsideRam {
                ring,
                address,
                length,
            } => write!(
                f,
                "the {ring} at {address:#x}+{length:#x} is not all guest RAM"
            ),
            Self::AvailAtZero => write!(f, "an available ring at guest address 0 is not served"),
        }
    }
}

/// Why a queue stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Broken {
    Chain(ChainError),
    /// The avail index ran more than a queue's worth ahead of what was served.
    AvailIndex,
    /// A chain without a writable byte for the status of its request.
    NoStatus,
    /// Ring memory refused an access (never expected: activate checked it).
    Ring,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Chain(error) => write!(f, "malformed descriptor chain: {error}"),
            Self::AvailIndex => write!(f, "the available index jumped beyond the queue size"),
            Self::NoStatus => write!(f, "a request chain with no writable status byte"),
            Self::Ring => write!(f, "the rings became unreachable"),
        }
    }
}

/// What one drain did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub completed: u64,
    /// The driver asked to be interrupted for what was completed.
    pub interrupt: bool,
    pub broken: Option<Broken>,
}

/// A queue after activate(): rings checked to lie in guest RAM.
pub struct ActiveQueue {
    queue: Queue,
    memory: Arc<DeviceMemory>,
    table: Table,
    bounce: Bounce,
    broken: bool,
    /// next_used at the last interrupt decision (None: unknown, interrupt next time).
    /// Kept here rather than in virtio-queue (its num_added), which a snapshot cannot
    /// read or restore.
    signalled_used: Option<Wrapping<u16>>,
    /// process() has run since activation: the rings may have been read or written.
    served: bool,
}

fn check_ring(
    memory: &Memory,
    ring: &'static str,
    address: u64,
    length: u64,
    align: u64,
) -> Result<(), SetupError> {
    if address % align != 0 {
        return Err(SetupError::Misaligned { ring, address });
    }
    let inside = address.checked_add(length).is_some()
        && memory.check_range(GuestAddress(address), length as usize);
    if !inside {
        return Err(SetupError::OutsideRam {
            ring,
            address,
            length,
        });
    }
    Ok(())
}

impl ActiveQueue {
    pub fn new(
        memory: Arc<DeviceMemory>,
        config: QueueConfig,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, SetupError> {
        let size = u16::try_from(config.size)
            .ok()
            .filter(|size| size.is_power_of_two() && *size <= MAX_QUEUE_SIZE)
            .ok_or(SetupError::Size(config.size))?;
        let guest = memory.memory();
        // Sizes and alignments of 2.7 (the avail ring and used ring with their event
        // fields, present whether or not EVENT_IDX is negotiated).
        let n = u64::from(size);
        check_ring(guest, "descriptor table", config.desc, 16 * n, 16)?;
        check_ring(guest, "available ring", config.avail, 6 + 2 * n, 2)?;
        check_ring(guest, "used ring", config.used, 6 + 8 * n, 4)?;
        if config.avail == 0 {
            return Err(SetupError::AvailAtZero);
        }
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| SetupError::Size(config.size))?;
        queue
            .try_set_size(size)
            .map_err(|_| SetupError::Size(config.size))?;
        let misaligned = |ring, address| SetupError::Misaligned { ring, address };
        queue
            .try_set_desc_table_address(GuestAddress(config.desc))
            .map_err(|_| misaligned("descriptor table", config.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(config.avail))
            .map_err(|_| misaligned("available ring", config.avail))?;
        queue
            .try_set_used_ring_address(GuestAddress(config.used))
            .map_err(|_| misaligned("used ring", config.used))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ok(Self {
            queue,
            memory,
            table: Table {
                address: config.desc,
                size,
                indirect_allowed: indirect,
            },
            bounce: Bounce::default(),
            broken: false,
            signalled_used: Some(Wrapping(0)),
            served: false,
        })
    }

    pub fn broken(&self) -> bool {
        self.broken
    }

    pub fn served(&self) -> bool {
        self.served
    }

    /// The ring state a snapshot keeps (meaningful while nothing is being served).
    pub fn state(&self) -> QueueState {
        let queue = self.queue.state();
        QueueState {
            ready: queue.ready,
            size: u64::from(queue.size),
            desc_table: queue.desc_table,
            avail_ring: queue.avail_ring,
            used_ring: queue.used_ring,
            next_avail: queue.next_avail,
            next_used: queue.next_used,
            event_idx: queue.event_idx_enabled,
            signalled_used: self.signalled_used.map(|used| used.0),
        }
    }

    /// Continues from a snapshot's indices (the caller has checked the rings match).
    pub fn restore(&mut self, state: &QueueState) {
        self.queue.set_next_avail(state.next_avail);
        self.queue.set_next_used(state.next_used);
        self.queue.set_event_idx(state.event_idx);
        self.signalled_used = state.signalled_used.map(Wrapping);
    }

    /// Serves every available chain with `run`, until the ring is empty with
    /// notifications re-enabled, `stop` is set (a reset waits), or a rule is broken
    /// (the queue then stays stopped). Chains completed before a break are still used.
    pub fn process(
        &mut self,
        stop: &AtomicBool,
        run: &mut dyn FnMut(&Memory, &Chain, &mut Bounce) -> Option<Completion>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        if self.broken {
            return outcome;
        }
        self.served = true;
        let memory = self.memory.clone();
        let guest = memory.memory();
        match self.drain(guest, stop, run, &mut outcome.completed) {
            Ok(true) => return outcome,
            Ok(false) => {}
            Err(broken) => {
                self.broken = true;
                outcome.broken = Some(broken);
            }
        }
        if outcome.completed > 0 {
            outcome.interrupt = self.driver_wants_interrupt(guest);
        }
        outcome
    }

    /// Ok(true) when stopped before the end.
    fn drain(
        &mut self,
        guest: &Memory,
        stop: &AtomicBool,
        run: &mut dyn FnMut(&Memory, &Chain, &mut Bounce) -> Option<Completion>,
        completed: &mut u64,
    ) -> Result<bool, Broken> {
        loop {
            self.queue
                .disable_notification(guest)
                .map_err(|_| Broken::Ring)?;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return Ok(true);
                }
                let head = match self.queue.iter(guest) {
                    Ok(mut available) => match available.next() {
                        Some(chain) => chain.head_index(),
                        None => break,
                    },
                    Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                        return Err(Broken::AvailIndex);
                    }
                    Err(_) => return Err(Broken::Ring),
                };
                let chain = walk(guest, self.table, head).map_err(Broken::Chain)?;
                let completion = run(guest, &chain, &mut self.bounce).ok_or(Broken::NoStatus)?;
                self.queue
                    .add_used(guest, completion.head, completion.used_len)
                    .map_err(|_| Broken::Ring)?;
                *completed += 1;
            }
            // Re-enabling reports chains that arrived meanwhile (without a doorbell).
            if !self
                .queue
                .enable_notification(guest)
                .map_err(|_| Broken::Ring)?
            {
                return Ok(false);
            }
        }
    }

    // -- The receive side of a network device: chains taken as frames arrive, not
    // as the driver rings, and several chains used at once for one merged frame.

    pub fn memory(&self) -> Arc<DeviceMemory> {
        self.memory.clone()
    }

    pub fn size(&self) -> u16 {
        self.table.size
    }

    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Gives back the chains taken since `next_avail` was `to` (not used).
    pub fn rewind(&mut self, to: u16) {
        self.queue.set_next_avail(to);
    }

    /// Chains the driver made available and we have not taken.
    pub fn available(&mut self, guest: &Memory) -> Result<u16, Broken> {
        let idx = self
            .queue
            .avail_idx(guest, Ordering::Acquire)
            .map_err(|_| self.fail(Broken::Ring))?;
        let count = (idx - Wrapping(self.queue.next_avail())).0;
        if count > self.table.size {
            return Err(self.fail(Broken::AvailIndex));
        }
        Ok(count)
    }

    /// The next available chain, checked (None: the ring is empty).
    pub fn pop(&mut self, guest: &Memory) -> Result<Option<Chain>, Broken> {
        if self.broken {
            return Err(Broken::Ring);
        }
        self.served = true;
        if self.available(guest)? == 0 {
            return Ok(None);
        }
        let head = match self.queue.iter(guest) {
            Ok(mut available) => available.next().map(|chain| chain.head_index()),
            Err(_) => return Err(self.fail(Broken::Ring)),
        };
        let Some(head) = head else {
            return Ok(None);
        };
        walk(guest, self.table, head)
            .map(Some)
            .map_err(|error| self.fail(Broken::Chain(error)))
    }

    /// Used entries for `completions`, all published by one used-index store: a driver
    /// reading a merged frame's buffers never finds only some of them (5.1.6.4).
    pub fn add_used_all(
        &mut self,
        guest: &Memory,
        completions: &[Completion],
    ) -> Result<(), Broken> {
        let used = self.queue.used_ring();
        let mut next = Wrapping(self.queue.next_used());
        for completion in completions {
            let slot = u64::from(next.0 % self.table.size);
            let mut entry = [0u8; 8];
            entry[..4].copy_from_slice(&u32::from(completion.head).to_le_bytes());
            entry[4..].copy_from_slice(&completion.used_len.to_le_bytes());
            guest
                .write_slice(&entry, GuestAddress(used + 4 + 8 * slot))
                .map_err(|_| self.fail(Broken::Ring))?;
            next += Wrapping(1);
        }
        guest
            .store(
                u16::to_le(next.0),
                GuestAddress(used + 2),
                Ordering::Release,
            )
            .map_err(|_| self.fail(Broken::Ring))?;
        self.queue.set_next_used(next.0);
        Ok(())
    }

    /// Asks the driver to ring when it adds chains; true when some arrived meanwhile.
    pub fn enable_notification(&mut self, guest: &Memory) -> Result<bool, Broken> {
        self.queue
            .enable_notification(guest)
            .map_err(|_| self.fail(Broken::Ring))
    }

    /// Whether the driver wants an interrupt for what was used since the last decision.
    pub fn interrupt_wanted(&mut self, guest: &Memory) -> bool {
        self.driver_wants_interrupt(guest)
    }

    pub fn fail(&mut self, broken: Broken) -> Broken {
        self.broken = true;
        broken
    }

    /// EVENT_IDX: the driver wants an interrupt once used_event is among the entries
    /// used since the last decision (2.7.10, vring_need_event as virtio-queue's
    /// needs_notification computes it); without it the avail ring's NO_INTERRUPT flag.
    fn driver_wants_interrupt(&mut self, guest: &Memory) -> bool {
        let used = Wrapping(self.queue.next_used());
        let since = self.signalled_used.replace(used);
        // The used ring's writes are visible before the driver's used_event is read.
        fence(Ordering::SeqCst);
        let avail = self.queue.avail_ring();
        if self.queue.event_idx_enabled() {
            let Some(old) = since else {
                return true;
            };
            let used_event_at = avail + 4 + 2 * u64::from(self.table.size);
            let Ok(used_event) = guest.read_obj::<u16>(GuestAddress(used_event_at)) else {
                return true;
            };
            let used_event = Wrapping(u16::from_le(used_event));
            return used - used_event - Wrapping(1) < used - old;
        }
        let flags = guest
            .read_obj::<u16>(GuestAddress(avail))
            .map(u16::from_le)
            .unwrap_or(0);
        flags & AVAIL_F_NO_INTERRUPT == 0
    }
}
