//! The virtio-net device's own state beside its queues: the TAP, the MAC address, the
//! link, what the driver accepted, a received frame waiting for buffers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::tap::{Offloads, Tap};
use super::{
    F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_UFO, F_HOST_TSO4, F_HOST_TSO6,
    F_HOST_UFO, F_MAC, F_MRG_RXBUF, F_STATUS, HEADER_SIZE, MAX_FRAME, S_LINK_UP, has,
};
use crate::fd_watch::Rearm;
use crate::locks;

/// Room for the largest frame the TAP hands us with its header, and some slack: a
/// read never truncates a frame we could deliver.
pub const RX_BUFFER_SIZE: usize = HEADER_SIZE + MAX_FRAME + 1024;

#[derive(Default)]
pub struct RxState {
    pub buffer: Vec<u8>,
    /// Length of a frame read but not yet delivered (its buffers were not all there).
    pub pending: Option<usize>,
}

impl RxState {
    pub fn clear(&mut self) {
        self.pending = None;
    }
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    link_up: AtomicBool,
    /// Set with link_up's fall, taken by the device to signal a configuration change.
    link_changed: AtomicBool,
    /// What the driver accepted at activation.
    negotiated: AtomicU64,
    pub rx: Mutex<RxState>,
    /// How the event loop watches the TAP again after it was parked.
    rearm: Mutex<Option<Rearm>>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            link_up: AtomicBool::new(true),
            link_changed: AtomicBool::new(false),
            negotiated: AtomicU64::new(0),
            rx: Mutex::new(RxState::default()),
            rearm: Mutex::new(None),
        }
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's features: the host offloads always (the TAP takes any header a
    /// virtio driver may write), the guest offloads as far as TUNSETOFFLOAD took them.
    pub fn features(&self) -> u64 {
        let offloads = self.tap.offloads();
        let mut bits = vec![
            F_MAC,
            F_STATUS,
            F_MRG_RXBUF,
            F_CSUM,
            F_HOST_TSO4,
            F_HOST_TSO6,
        ];
        if offloads.csum {
            bits.push(F_GUEST_CSUM);
        }
        if offloads.tso4 {
            bits.push(F_GUEST_TSO4);
        }
        if offloads.tso6 {
            bits.push(F_GUEST_TSO6);
        }
        if offloads.ufo {
            bits.extend([F_GUEST_UFO, F_HOST_UFO]);
        }
        bits.into_iter().fold(0, |all, bit| all | 1 << bit)
    }

    pub fn config(&self) -> Vec<u8> {
        let mut config = self.mac.to_vec();
        let status = if self.link_up() { S_LINK_UP } else { 0 };
        config.extend(status.to_le_bytes());
        config
    }

    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::SeqCst)
    }

    /// The TAP went away: the link is down for good (a new TAP needs a new device).
    pub fn lose_link(&self) {
        if self.link_up.swap(false, Ordering::SeqCst) {
            self.link_changed.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the link changed since the last call (the driver is to be told).
    pub fn take_link_change(&self) -> bool {
        self.link_changed.swap(false, Ordering::SeqCst)
    }

    pub fn negotiated(&self) -> u64 {
        self.negotiated.load(Ordering::SeqCst)
    }

    /// The driver accepted `features`: the TAP may hand us what the driver takes.
    pub fn activate(&self, features: u64) {
        self.negotiated.store(features, Ordering::SeqCst);
        self.tap.set_offloads(Offloads {
            csum: has(features, F_GUEST_CSUM),
            tso4: has(features, F_GUEST_TSO4),
            tso6: has(features, F_GUEST_TSO6),
            ufo: has(features, F_GUEST_UFO),
        });
    }

    /// The driver is gone: a frame held for it is dropped (the next one may have
    /// other offloads), and the TAP hands us only finished frames again.
    pub fn reset(&self) {
        locks::lock(&self.rx).clear();
        self.negotiated.store(0, Ordering::SeqCst);
        self.tap.set_offloads(Offloads::NONE);
    }

    pub fn attach(&self, rearm: Option<Rearm>) {
        *locks::lock(&self.rearm) = rearm;
    }

    /// Watches the TAP again (the loop reports it at once if frames wait).
    pub fn rearm(&self) {
        let rearm = locks::lock(&self.rearm).clone();
        if let Some(rearm) = rearm {
            rearm.rearm();
        }
    }
}
