//! Reception (virtio 1.2 section 5.1.6.3): frames read from the TAP into the driver's
//! receive buffers, one chain per frame, or several with MRG_RXBUF (num_buffers in the
//! header). A frame is read only when a buffer waits for it; when the buffers run out
//! the TAP is left alone (its frames wait in the kernel's queue) until the driver
//! adds buffers and rings. A frame no buffers can ever hold is dropped.

use std::sync::atomic::{AtomicBool, Ordering};

use super::backend::{Net, RX_BUFFER_SIZE};
use super::header::finish_rx;
use super::tap::is_gone;
use super::{F_MRG_RXBUF, HEADER_SIZE, has};
use crate::fd_watch::Readiness;
use crate::locks;
use crate::virtio::counters::{DeviceCounters, bump};
use crate::virtio::guest_memory::Memory;
use crate::virtio::queue::{ActiveQueue, Broken, Completion};

/// Frames handled per readiness before the loop serves others (the TAP, level
/// triggered, is reported again at once if more wait).
const FRAMES_PER_CALL: usize = 256;

/// What placing one frame did.
#[derive(Debug, PartialEq, Eq)]
pub enum Placed {
    /// In this many chains.
    Delivered(u16),
    /// Not enough buffers yet: the frame waits for more. `more`: the driver added
    /// some while we looked (try again at once; else it rings when it adds them).
    NoRoom { more: bool },
    /// More than every buffer the ring could hold at once (or, without MRG_RXBUF, than
    /// the next buffer): dropped, the buffers left for the next frame.
    TooBig,
}

/// Puts `frame` (header and frame) into the next available chains, all or nothing.
pub fn place(
    queue: &mut ActiveQueue,
    guest: &Memory,
    frame: &mut [u8],
    features: u64,
) -> Result<Placed, Broken> {
    let merge = has(features, F_MRG_RXBUF);
    let start = queue.next_avail();
    let available = queue.available(guest)?;
    let mut chains = Vec::new();
    let mut room = 0u64;
    while room < frame.len() as u64 {
        if !merge && !chains.is_empty() {
            queue.rewind(start);
            return Ok(Placed::TooBig);
        }
        let Some(chain) = queue.pop(guest)? else {
            // With every buffer of the ring offered, none will come to add to them.
            if merge && available == queue.size() {
                queue.rewind(start);
                return Ok(Placed::TooBig);
            }
            // Asked with every chain taken: with EVENT_IDX, avail_event is then the
            // avail index, and the driver's next chain rings (2.7.10).
            let more = queue.enable_notification(guest)?;
            queue.rewind(start);
            return Ok(Placed::NoRoom { more });
        };
        room += chain.writable.total();
        chains.push(chain);
    }
    let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    finish_rx(frame, count, features);
    let mut completions = Vec::with_capacity(chains.len());
    let mut at = 0usize;
    for chain in &chains {
        let take = (frame.len() - at).min(usize::try_from(chain.writable.total()).unwrap_or(0));
        let (target, _) = chain.writable.split_at(take as u64);
        if !target.write(guest, &frame[at..at + take]) {
            return Err(queue.fail(Broken::Ring));
        }
        at += take;
        completions.push(Completion {
            head: chain.head,
            used_len: take as u32,
        });
    }
    queue.add_used_all(guest, &completions)?;
    Ok(Placed::Delivered(count))
}

/// What one pass over the TAP did.
#[derive(Debug, Default)]
pub struct RxOutcome {
    pub delivered: u64,
    pub interrupt: bool,
    pub broken: Option<Broken>,
    /// Park: frames wait and no buffers do (the rx doorbell will bring us back), or
    /// the TAP is gone.
    pub park: bool,
}

impl RxOutcome {
    pub fn readiness(&self) -> Readiness {
        if self.park {
            Readiness::Park
        } else {
            Readiness::Rearm
        }
    }
}

/// Moves frames from the TAP into the queue's buffers until the TAP is empty, the
/// buffers run out, or `stop` is raised.
pub fn receive(
    net: &Net,
    queue: &mut ActiveQueue,
    stop: &AtomicBool,
    counters: &DeviceCounters,
) -> RxOutcome {
    let mut outcome = RxOutcome::default();
    if queue.broken() || !net.link_up() {
        outcome.park = true;
        return outcome;
    }
    let memory = queue.memory();
    let guest = memory.memory();
    let features = net.negotiated();
    let mut state = locks::lock(&net.rx);
    let state = &mut *state;
    if state.buffer.len() < RX_BUFFER_SIZE {
        state.buffer.resize(RX_BUFFER_SIZE, 0);
    }
    let result = (|| -> Result<(), Broken> {
        for _ in 0..FRAMES_PER_CALL {
            if stop.load(Ordering::SeqCst) {
                outcome.park = true;
                return Ok(());
            }
            let length = match state.pending {
                Some(length) => length,
                None => {
                    if queue.available(guest)? == 0 && !queue.enable_notification(guest)? {
                        // Nowhere to put a frame: the TAP is watched only while empty,
                        // so that a frame arriving finds us here and parks it.
                        if net.tap().readable() {
                            bump(&counters.rx_deferred, 1);
                            outcome.park = true;
                        }
                        return Ok(());
                    }
                    match net.tap().read_frame(&mut state.buffer) {
                        Ok(Some(0)) => {
                            // End of file: nobody is on the other side any more.
                            net.lose_link();
                            outcome.park = true;
                            return Ok(());
                        }
                        Ok(Some(length)) if length < HEADER_SIZE => {
                            bump(&counters.rx_dropped, 1);
                            continue;
                        }
                        Ok(Some(length)) => length,
                        Ok(None) => return Ok(()),
                        Err(error) => {
                            bump(&counters.rx_errors, 1);
                            if is_gone(&error) {
                                net.lose_link();
                            }
                            // Either way the TAP is no use now; a transient error
                            // is retried at the next rx doorbell.
                            outcome.park = true;
                            return Ok(());
                        }
                    }
                }
            };
            state.pending = None;
            match place(queue, guest, &mut state.buffer[..length], features)? {
                Placed::Delivered(_) => {
                    outcome.delivered += 1;
                    bump(&counters.rx_packets, 1);
                    bump(&counters.rx_bytes, (length - HEADER_SIZE) as u64);
                }
                Placed::TooBig => bump(&counters.rx_dropped, 1),
                Placed::NoRoom { more } => {
                    state.pending = Some(length);
                    if !more {
                        bump(&counters.rx_deferred, 1);
                        outcome.park = true;
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(broken) = result {
        outcome.broken = Some(broken);
        outcome.park = true;
    }
    if outcome.delivered > 0 {
        outcome.interrupt = queue.interrupt_wanted(guest);
    }
    outcome
}
