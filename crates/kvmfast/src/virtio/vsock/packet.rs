//! struct virtio_vsock_hdr (virtio 1.2 section 5.10.6): the 44 little-endian bytes in
//! front of every packet on the rx and tx queues, and what the device accepts in one.

use std::fmt;

pub const HEADER_SIZE: usize = 44;

/// VIRTIO_VSOCK_TYPE_STREAM: the only socket type offered (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

/// VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE / _SEND (5.10.6.5): the sender will receive or send
/// no more.
pub const SHUTDOWN_RECEIVE: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The host's CID (5.10.4: 2 is the host).
pub const HOST_CID: u64 = 2;

/// VIRTIO_VSOCK_OP_* (5.10.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Response => 2,
            Self::Rst => 3,
            Self::Shutdown => 4,
            Self::Rw => 5,
            Self::CreditUpdate => 6,
            Self::CreditRequest => 7,
        }
    }
}

/// The header as it travels, every field kept (op and type unchecked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.kind.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    /// The RST that answers this packet (5.10.6.4: src and dst swapped).
    pub fn reset_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op: Op::Rst.to_u16(),
            ..Self::default()
        }
    }
}

/// Why a packet from the driver is not taken as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer readable bytes than a header: dropped (nothing to answer).
    ShortHeader(u64),
    /// A device-writable buffer on the tx queue: dropped.
    WritableBuffer,
    /// src_cid is not the guest's: dropped (the guest may not speak for another).
    ForeignSource(u64),
    /// dst_cid is not the host's: dropped (only the host is reachable through us).
    NotForHost(u64),
    /// A type other than STREAM: answered with RST (5.10.6.4).
    UnknownType(u16),
    /// An op the spec does not define: answered with RST.
    UnknownOp(u16),
    /// An RW whose len is larger than the bytes after the header, or than
    /// MAX_PAYLOAD: answered with RST (the stream's bytes can no longer be trusted).
    BadLength { len: u32, readable: u64 },
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShortHeader(total) => {
                write!(f, "{total} bytes, short of a {HEADER_SIZE}-byte header")
            }
            Self::WritableBuffer => write!(f, "a device-writable buffer on the tx queue"),
            Self::ForeignSource(cid) => write!(f, "src_cid {cid} is not the guest's"),
            Self::NotForHost(cid) => write!(f, "dst_cid {cid} is not the host's"),
            Self::UnknownType(kind) => write!(f, "socket type {kind}"),
            Self::UnknownOp(op) => write!(f, "op {op}"),
            Self::BadLength { len, readable } => {
                write!(f, "len {len} with {readable} payload bytes")
            }
        }
    }
}

impl PacketError {
    /// Whether the driver hears of it (an RST), rather than the packet vanishing.
    pub fn answered(&self) -> bool {
        matches!(
            self,
            Self::UnknownType(_) | Self::UnknownOp(_) | Self::BadLength { .. }
        )
    }
}

/// The most payload one RW may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// Checks a tx packet's header against the device's rules; `readable`: the chain's
/// readable bytes (header included), `writable`: its writable bytes.
pub fn check_tx(
    bytes: Option<&[u8; HEADER_SIZE]>,
    readable: u64,
    writable: u64,
    guest_cid: u64,
) -> Result<(Header, Op), (Option<Header>, PacketError)> {
    if writable > 0 {
        return Err((None, PacketError::WritableBuffer));
    }
    let Some(bytes) = bytes.filter(|_| readable >= HEADER_SIZE as u64) else {
        return Err((None, PacketError::ShortHeader(readable)));
    };
    let header = Header::parse(bytes);
    let fail = |error| Err((Some(header), error));
    if header.src_cid != guest_cid {
        return fail(PacketError::ForeignSource(header.src_cid));
    }
    if header.dst_cid != HOST_CID {
        return fail(PacketError::NotForHost(header.dst_cid));
    }
    if header.kind != TYPE_STREAM {
        return fail(PacketError::UnknownType(header.kind));
    }
    let Some(op) = Op::from_u16(header.op) else {
        return fail(PacketError::UnknownOp(header.op));
    };
    let payload = readable - HEADER_SIZE as u64;
    if op == Op::Rw && (u64::from(header.len) > payload || header.len > MAX_PAYLOAD) {
        return fail(PacketError::BadLength {
            len: header.len,
            readable: payload,
        });
    }
    Ok((header, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn header(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 80,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn a_header_round_trips_and_lays_out_as_the_spec() {
        let original = header(5, 10);
        let bytes = original.to_bytes();
        assert_eq!(Header::parse(&bytes), original);
        // Offsets of 5.10.6: len at 24, type at 28, op at 30, fwd_cnt last.
        assert_eq!(&bytes[24..28], &10u32.to_le_bytes());
        assert_eq!(&bytes[28..30], &1u16.to_le_bytes());
        assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
        assert_eq!(&bytes[40..44], &7u32.to_le_bytes());
    }

    #[test]
    fn well_formed_packets_pass() {
        for op in 1..=7 {
            let bytes = header(op, 0).to_bytes();
            let (parsed, kind) = check_tx(Some(&bytes), 44, 0, GUEST).unwrap();
            assert_eq!((parsed.op, kind.to_u16()), (op, op));
        }
        let bytes = header(5, 100).to_bytes();
        assert!(check_tx(Some(&bytes), 144, 0, GUEST).is_ok());
        // A control packet's len means nothing: not checked.
        let bytes = header(6, 9999).to_bytes();
        assert!(check_tx(Some(&bytes), 44, 0, GUEST).is_ok());
    }

    #[test]
    fn every_bad_shape_is_dropped_or_answered() {
        let good = header(5, 10);
        let cases: Vec<(Header, u64, u64, PacketError, bool)> = vec![
            (good, 43, 0, PacketError::ShortHeader(43), false),
            (good, 54, 1, PacketError::WritableBuffer, false),
            (
                Header { src_cid: 9, ..good },
                54,
                0,
                PacketError::ForeignSource(9),
                false,
            ),
            (
                Header { dst_cid: 3, ..good },
                54,
                0,
                PacketError::NotForHost(3),
                false,
            ),
            (
                Header { kind: 2, ..good },
                54,
                0,
                PacketError::UnknownType(2),
                true,
            ),
            (
                Header { op: 0, ..good },
                54,
                0,
                PacketError::UnknownOp(0),
                true,
            ),
            (
                Header { op: 8, ..good },
                54,
                0,
                PacketError::UnknownOp(8),
                true,
            ),
            (
                good,
                53,
                0,
                PacketError::BadLength {
                    len: 10,
                    readable: 9,
                },
                true,
            ),
            (
                Header {
                    len: MAX_PAYLOAD + 1,
                    ..good
                },
                44 + 2 * u64::from(MAX_PAYLOAD),
                0,
                PacketError::BadLength {
                    len: MAX_PAYLOAD + 1,
                    readable: 2 * u64::from(MAX_PAYLOAD),
                },
                true,
            ),
        ];
        for (header, readable, writable, expected, answered) in cases {
            let bytes = header.to_bytes();
            let (_, error) = check_tx(Some(&bytes), readable, writable, GUEST).unwrap_err();
            assert_eq!(error, expected);
            assert_eq!(error.answered(), answered, "{error}");
        }
        assert_eq!(
            check_tx(None, 0, 0, GUEST).unwrap_err().1,
            PacketError::ShortHeader(0)
        );
    }

    #[test]
    fn a_reset_reply_swaps_the_addresses() {
        let reply = header(1, 0).reset_reply();
        assert_eq!(
            (reply.src_cid, reply.dst_cid, reply.src_port, reply.dst_port),
            (HOST_CID, GUEST, 80, 1234)
        );
        assert_eq!((reply.op, reply.kind, reply.len), (3, TYPE_STREAM, 0));
    }
}
