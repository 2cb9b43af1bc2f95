//! struct virtio_net_hdr (virtio 1.2 section 5.1.6): what a transmitted header may ask
//! of the device given the features the driver accepted (5.1.6.2.1), and the fields a
//! received frame's header gets from us (5.1.6.3.1).

use super::{F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_HOST_UFO, F_MRG_RXBUF, has};

pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

const FLAGS: usize = 0;
const GSO_TYPE: usize = 1;
const NUM_BUFFERS: usize = 10;

/// Why a transmitted header is refused (the packet is dropped and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    ChecksumNotNegotiated,
    /// A GSO type whose HOST_ feature was not accepted (ECN: never offered).
    GsoNotNegotiated(u8),
    UnknownGsoType(u8),
}

/// Checks a TX header against the accepted `features`.
pub fn check_tx(header: &[u8; 12], features: u64) -> Result<(), HeaderError> {
    if header[FLAGS] & F_NEEDS_CSUM != 0 && !has(features, F_CSUM) {
        return Err(HeaderError::ChecksumNotNegotiated);
    }
    let gso = header[GSO_TYPE];
    let needed = match gso {
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => F_HOST_TSO4,
        GSO_TCPV6 => F_HOST_TSO6,
        GSO_UDP => F_HOST_UFO,
        _ if gso & GSO_ECN != 0 => return Err(HeaderError::GsoNotNegotiated(gso)),
        _ => return Err(HeaderError::UnknownGsoType(gso)),
    };
    if has(features, needed) {
        Ok(())
    } else {
        Err(HeaderError::GsoNotNegotiated(gso))
    }
}

/// Completes the header of a received frame spread over `buffers` chains: num_buffers
/// (1 without MRG_RXBUF), and no checksum flags for a driver that did not accept
/// GUEST_CSUM (it must get flags 0, 5.1.6.3.1).
pub fn finish_rx(header: &mut [u8], buffers: u16, features: u64) {
    let buffers = if has(features, F_MRG_RXBUF) {
        buffers
    } else {
        1
    };
    header[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&buffers.to_le_bytes());
    if !has(features, F_GUEST_CSUM) {
        header[FLAGS] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u8, gso: u8) -> [u8; 12] {
        let mut header = [0u8; 12];
        header[FLAGS] = flags;
        header[GSO_TYPE] = gso;
        header
    }

    #[test]
    fn tx_headers_ask_only_for_what_was_negotiated() {
        let all = [F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_HOST_UFO]
            .into_iter()
            .fold(0u64, |features, bit| features | 1 << bit);
        assert_eq!(check_tx(&header(0, GSO_NONE), 0), Ok(()));
        assert_eq!(check_tx(&header(F_NEEDS_CSUM, GSO_TCPV4), all), Ok(()));
        assert_eq!(check_tx(&header(F_NEEDS_CSUM, GSO_TCPV6), all), Ok(()));
        assert_eq!(check_tx(&header(F_NEEDS_CSUM, GSO_UDP), all), Ok(()));
        assert_eq!(
            check_tx(&header(F_NEEDS_CSUM, GSO_NONE), 0),
            Err(HeaderError::ChecksumNotNegotiated)
        );
        assert_eq!(
            check_tx(&header(F_NEEDS_CSUM, GSO_TCPV4), 1 << F_CSUM),
            Err(HeaderError::GsoNotNegotiated(GSO_TCPV4))
        );
        assert_eq!(
            check_tx(&header(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN), all),
            Err(HeaderError::GsoNotNegotiated(GSO_TCPV4 | GSO_ECN))
        );
        assert_eq!(
            check_tx(&header(0, 2), all),
            Err(HeaderError::UnknownGsoType(2))
        );
    }

    #[test]
    fn rx_headers_carry_num_buffers_and_only_negotiated_flags() {
        let mut raw = header(F_NEEDS_CSUM, GSO_NONE);
        finish_rx(&mut raw, 3, 1 << F_MRG_RXBUF | 1 << F_GUEST_CSUM);
        assert_eq!((raw[FLAGS], &raw[10..]), (F_NEEDS_CSUM, &[3u8, 0][..]));
        finish_rx(&mut raw, 3, 0);
        assert_eq!((raw[FLAGS], &raw[10..]), (0, &[1u8, 0][..]));
    }
}
