//! virtio-net (virtio 1.2 section 5.1) over a TAP: queue 0 receives (frames the TAP
//! hands us, written into the driver's buffers as the event loop finds the TAP
//! readable), queue 1 transmits (each chain written to the TAP from its doorbell).
//! The 12-byte virtio_net_hdr travels unchanged between the guest and the TAP, which
//! speaks it too (IFF_VNET_HDR), so checksum and segmentation offloads need no work
//! here beyond negotiating them on both sides.

pub mod backend;
pub mod header;
pub mod mac;
pub mod rx;
pub mod tap;
pub mod tx;

/// struct virtio_net_hdr with num_buffers (5.1.6): the only layout of virtio 1.x.
pub const HEADER_SIZE: usize = 12;
/// The longest frame (after the header) a TX chain may carry: 64 KiB of GSO payload
/// with its Ethernet header, as Linux's tun takes it.
pub const MAX_FRAME: usize = 65550;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;

// Feature bits (5.1.3).
pub const F_CSUM: u32 = 0;
pub const F_GUEST_CSUM: u32 = 1;
pub const F_MAC: u32 = 5;
pub const F_GUEST_TSO4: u32 = 7;
pub const F_GUEST_TSO6: u32 = 8;
pub const F_GUEST_UFO: u32 = 10;
pub const F_HOST_TSO4: u32 = 11;
pub const F_HOST_TSO6: u32 = 12;
pub const F_HOST_UFO: u32 = 14;
pub const F_MRG_RXBUF: u32 = 15;
pub const F_STATUS: u32 = 16;

/// VIRTIO_NET_S_LINK_UP (5.1.4).
pub const S_LINK_UP: u16 = 1;
/// struct virtio_net_config up to status: mac[6], status (no MQ, MTU or speed).
pub const CONFIG_SIZE: usize = 8;

pub fn has(features: u64, bit: u32) -> bool {
    features & 1 << bit != 0
}

#[cfg(test)]
mod tests;
