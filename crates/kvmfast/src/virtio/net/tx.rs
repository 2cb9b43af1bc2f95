//! Transmission (virtio 1.2 section 5.1.6.2): a TX chain is a virtio_net_hdr and the
//! frame, all device-readable. A chain that breaks a packet's rules drops that packet
//! (counted) and is completed like any other: one bad packet never stops the queue.

use super::backend::Net;
use super::header::{HeaderError, check_tx};
use super::tap::is_gone;
use super::{HEADER_SIZE, MAX_FRAME};
use crate::virtio::chain::Chain;
use crate::virtio::counters::{DeviceCounters, bump};
use crate::virtio::disk::Bounce;
use crate::virtio::guest_memory::Memory;
use crate::virtio::queue::Completion;

/// Why a packet was dropped before reaching the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDrop {
    /// Fewer readable bytes than the 12-byte header.
    ShortHeader(u64),
    /// More than MAX_FRAME bytes after the header.
    TooLong(u64),
    /// A device-writable buffer: a TX chain has nothing for the device to write.
    WritableBuffer,
    Header(HeaderError),
    /// Guest memory refused a read (never expected: the chain was checked).
    Unreadable,
}

/// The packet in `chain`, checked and copied out of guest memory (header, frame).
pub fn packet<'b>(
    memory: &Memory,
    chain: &Chain,
    features: u64,
    bounce: &'b mut Bounce,
) -> Result<&'b [u8], TxDrop> {
    if chain.writable.total() > 0 {
        return Err(TxDrop::WritableBuffer);
    }
    let total = chain.readable.total();
    if total < HEADER_SIZE as u64 {
        return Err(TxDrop::ShortHeader(total));
    }
    if total - HEADER_SIZE as u64 > MAX_FRAME as u64 {
        return Err(TxDrop::TooLong(total - HEADER_SIZE as u64));
    }
    let bytes = &mut bounce.get(total as usize)[..total as usize];
    if !chain.readable.read(memory, bytes) {
        return Err(TxDrop::Unreadable);
    }
    let mut header = [0u8; HEADER_SIZE];
    header.copy_from_slice(&bytes[..HEADER_SIZE]);
    check_tx(&header, features).map_err(TxDrop::Header)?;
    Ok(bytes)
}

/// Sends the packet of one TX chain; the chain is completed whatever happens to it,
/// with nothing written (used length 0).
pub fn transmit(
    net: &Net,
    memory: &Memory,
    chain: &Chain,
    bounce: &mut Bounce,
    counters: &DeviceCounters,
) -> Completion {
    let completion = Completion {
        head: chain.head,
        used_len: 0,
    };
    let bytes = match packet(memory, chain, net.negotiated(), bounce) {
        Ok(bytes) => bytes,
        Err(_) => {
            bump(&counters.tx_dropped, 1);
            return completion;
        }
    };
    match net
        .tap()
        .write_frame(&[&bytes[..HEADER_SIZE], &bytes[HEADER_SIZE..]])
    {
        Ok(_) => {
            bump(&counters.tx_packets, 1);
            bump(&counters.tx_bytes, (bytes.len() - HEADER_SIZE) as u64);
        }
        Err(error) => {
            // The kernel refused it (the interface down, a header it finds wrong):
            // the packet is lost, as on a wire.
            bump(&counters.tx_errors, 1);
            if is_gone(&error) {
                net.lose_link();
            }
        }
    }
    completion
}
