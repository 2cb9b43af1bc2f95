//! virtio devices served in Rust (virtio 1.2): split virtqueues read through rust-vmm's
//! virtio-queue over vm-memory regions built on the VM's own RAM mappings, requests run
//! on the event loop thread (never a vCPU's), completions signalled through eventfds
//! (irqfds for MSI-X). `device` is the state a device shares with the loop, `python` its
//! Python face; `chain` checks what the guest put in a descriptor chain, `queue` drains
//! one queue, `blk` and `rng` execute requests, `disk` is the host image, `net` moves
//! frames between a TAP and the queues, `vsock` streams between the guest and
//! host Unix sockets.

pub mod blk;
pub mod chain;
pub mod counters;
pub mod device;
pub mod disk;
pub mod guest_memory;
pub mod net;
pub mod python;
pub mod queue;
pub mod queue_state;
pub mod rng;
#[cfg(test)]
mod test_ring;
#[cfg(test)]
mod tests;
pub mod vsock;

/// Device-independent feature bits (virtio 1.2 section 6).
pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// What every device of ours offers beside its own bits.
pub const COMMON_FEATURES: u64 =
    1 << VIRTIO_F_RING_INDIRECT_DESC | 1 << VIRTIO_F_RING_EVENT_IDX | 1 << VIRTIO_F_VERSION_1;

/// Device IDs (virtio 1.2 section 5).
pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLOCK: u32 = 2;
pub const DEVICE_ID_ENTROPY: u32 = 4;
pub const DEVICE_ID_VSOCK: u32 = 19;

/// The largest queue a driver may configure (a power of two, section 2.7).
pub const MAX_QUEUE_SIZE: u16 = 256;
