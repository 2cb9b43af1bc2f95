//! What the guest put in one descriptor chain (virtio 1.2 section 2.7.5), checked in
//! full before a request touches it.
//!
//! virtio-queue's `DescriptorChain` iterator is not used for this: it ends a chain
//! silently at a loop, an index out of range, an unreadable or nested indirect table,
//! so that a truncated chain looks like a complete one. Here each of those is an
//! error the device reports (the chain is malformed: NEEDS_RESET).

use std::fmt;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::guest_memory::Memory;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESCRIPTOR_SIZE: u64 = 16;

/// The most entries an indirect table may have: a blk request of seg_max (254) data
/// segments plus header and status, whatever the queue's own size.
pub const MAX_INDIRECT_ENTRIES: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// A head or next index beyond the table it indexes.
    IndexOutOfRange { index: u16, table_size: u32 },
    /// More descriptors than the table holds: the chain loops.
    Loop,
    /// An indirect descriptor inside an indirect table (2.7.5.3.1).
    NestedIndirect,
    /// INDIRECT together with NEXT (2.7.5.3.1).
    IndirectWithNext,
    /// INDIRECT without VIRTIO_F_RING_INDIRECT_DESC negotiated.
    IndirectNotNegotiated,
    /// An indirect table whose length is 0, not a multiple of 16, or too long.
    BadIndirectLength(u32),
    /// A buffer or table not wholly in guest RAM.
    OutsideRam { address: u64, length: u64 },
    /// A device-readable buffer after a device-writable one (2.7.4.2).
    ReadableAfterWritable,
    /// More than 2^32 bytes in total (2.7.5.2).
    TooManyBytes,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IndexOutOfRange { index, table_size } => {
                write!(f, "descriptor index {index} beyond a table of {table_size}")
            }
            Self::Loop => write!(f, "the chain loops"),
            Self::NestedIndirect => write!(f, "an indirect descriptor in an indirect table"),
            Self::IndirectWithNext => write!(f, "an indirect descriptor with NEXT set"),
            Self::IndirectNotNegotiated => {
                write!(f, "an indirect descriptor without RING_INDIRECT_DESC")
            }
            Self::BadIndirectLength(length) => write!(f, "an indirect table of {length} bytes"),
            Self::OutsideRam { address, length } => {
                write!(f, "{address:#x}+{length:#x} is not all guest RAM")
            }
            Self::ReadableAfterWritable => write!(f, "a readable buffer after a writable one"),
            Self::TooManyBytes => write!(f, "more than 2^32 bytes"),
        }
    }
}

/// Guest byte ranges read or written as one stream, in chain order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments {
    ranges: Vec<(u64, u64)>,
    total: u64,
}

impl Segments {
    fn push(&mut self, address: u64, length: u64) {
        if length > 0 {
            self.ranges.push((address, length));
            self.total += length;
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The first `at` bytes and the rest (`at` is clamped to the total).
    pub fn split_at(&self, at: u64) -> (Segments, Segments) {
        let mut head = Segments::default();
        let mut tail = Segments::default();
        let mut left = at;
        for &(address, length) in &self.ranges {
            let take = length.min(left);
            head.push(address, take);
            tail.push(address + take, length - take);
            left -= take;
        }
        (head, tail)
    }

    /// Copies the stream's first `out.len()` bytes out of guest memory; false when it is
    /// shorter or memory refuses (never expected after `walk` checked every range).
    pub fn read(&self, memory: &Memory, out: &mut [u8]) -> bool {
        let mut done = 0usize;
        for &(address, length) in &self.ranges {
            if done == out.len() {
                break;
            }
            let take = (out.len() - done).min(usize::try_from(length).unwrap_or(usize::MAX));
            if memory
                .read_slice(&mut out[done..done + take], GuestAddress(address))
                .is_err()
            {
                return false;
            }
            done += take;
        }
        done == out.len()
    }

    /// Copies `data` into the stream from its start; false when it is shorter.
    pub fn write(&self, memory: &Memory, data: &[u8]) -> bool {
        let mut done = 0usize;
        for &(address, length) in &self.ranges {
            if done == data.len() {
                break;
            }
            let take = (data.len() - done).min(usize::try_from(length).unwrap_or(usize::MAX));
            if memory
                .write_slice(&data[done..done + take], GuestAddress(address))
                .is_err()
            {
                return false;
            }
            done += take;
        }
        done == data.len()
    }
}

/// A checked chain: its device-readable bytes, then its device-writable bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Segments,
    pub writable: Segments,
}

/// Where a queue's descriptors are and what the driver negotiated.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub address: u64,
    pub size: u16,
    pub indirect_allowed: bool,
}

fn in_ram(memory: &Memory, address: u64, length: u64) -> Result<(), ChainError> {
    let fits = usize::try_from(length).is_ok_and(|count| {
        address.checked_add(length).is_some()
            && (count == 0 || memory.check_range(GuestAddress(address), count))
    });
    if fits {
        Ok(())
    } else {
        Err(ChainError::OutsideRam { address, length })
    }
}

/// Walks the chain from `head`, checking every rule above.
pub fn walk(memory: &Memory, table: Table, head: u16) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut table_address = table.address;
    let mut table_size = u32::from(table.size);
    let mut index = head;
    let mut visited = 0u32;
    let mut indirect = false;
    let mut total = 0u64;
    loop {
        if u32::from(index) >= table_size {
            return Err(ChainError::IndexOutOfRange { index, table_size });
        }
        visited += 1;
        if visited > table_size {
            return Err(ChainError::Loop);
        }
        let at = table_address + u64::from(index) * DESCRIPTOR_SIZE;
        let descriptor: Descriptor =
            memory
                .read_obj(GuestAddress(at))
                .map_err(|_| ChainError::OutsideRam {
                    address: at,
                    length: DESCRIPTOR_SIZE,
                })?;
        let flags = descriptor.flags();
        let address = descriptor.addr().0;
        let length = descriptor.len();
        if flags & DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if !table.indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if flags & DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = length / DESCRIPTOR_SIZE as u32;
            if length == 0
                || u64::from(length) % DESCRIPTOR_SIZE != 0
                || entries > MAX_INDIRECT_ENTRIES
            {
                return Err(ChainError::BadIndirectLength(length));
            }
            in_ram(memory, address, u64::from(length))?;
            // The WRITE flag of the descriptor naming the table means nothing (2.7.5.3.2).
            (table_address, table_size, index, visited, indirect) = (address, entries, 0, 0, true);
            continue;
        }
        in_ram(memory, address, u64::from(length))?;
        total += u64::from(length);
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooManyBytes);
        }
        if flags & DESC_F_WRITE != 0 {
            chain.writable.push(address, u64::from(length));
        } else if chain.writable.total() > 0 {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            chain.readable.push(address, u64::from(length));
        }
        if flags & DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = descriptor.next();
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_ring::{INDIRECT, NEXT, WRITE, memory, put_descriptor};
    use super::*;

    /// (table, index, address, length, flags, next)
    type DescriptorAt = (u64, u16, u64, u32, u16, u16);

    const TABLE: Table = Table {
        address: 0x1000,
        size: 8,
        indirect_allowed: true,
    };

    #[test]
    fn a_chain_splits_into_readable_then_writable_bytes() {
        let memory = memory();
        put_descriptor(&memory, 0x1000, 0, 0x4000, 16, NEXT, 3);
        put_descriptor(&memory, 0x1000, 3, 0x5000, 512, WRITE | NEXT, 1);
        put_descriptor(&memory, 0x1000, 1, 0x6000, 1, WRITE, 0);
        let chain = walk(&memory, TABLE, 0).unwrap();
        assert_eq!(chain.readable.total(), 16);
        assert_eq!(chain.writable.total(), 513);
        let (data, status) = chain.writable.split_at(512);
        assert_eq!(data.ranges, vec![(0x5000, 512)]);
        assert_eq!(status.ranges, vec![(0x6000, 1)]);
    }

    #[test]
    fn an_indirect_table_is_followed() {
        let memory = memory();
        put_descriptor(&memory, 0x1000, 2, 0x3000, 32, INDIRECT, 0);
        put_descriptor(&memory, 0x3000, 0, 0x4000, 16, NEXT, 1);
        put_descriptor(&memory, 0x3000, 1, 0x6000, 1, WRITE, 0);
        let chain = walk(&memory, TABLE, 2).unwrap();
        assert_eq!((chain.readable.total(), chain.writable.total()), (16, 1));
        let no_indirect = Table {
            indirect_allowed: false,
            ..TABLE
        };
        assert_eq!(
            walk(&memory, no_indirect, 2),
            Err(ChainError::IndirectNotNegotiated)
        );
    }

    #[test]
    fn every_malformed_shape_is_reported() {
        let memory = memory();
        let cases: Vec<(&[DescriptorAt], ChainError)> = vec![
            (
                &[(0x1000, 0, 0x4000, 16, NEXT, 9)],
                ChainError::IndexOutOfRange {
                    index: 9,
                    table_size: 8,
                },
            ),
            (
                &[
                    (0x1000, 0, 0x4000, 16, NEXT, 1),
                    (0x1000, 1, 0x4000, 16, NEXT, 0),
                ],
                ChainError::Loop,
            ),
            (
                &[
                    (0x1000, 0, 0x3000, 16, INDIRECT, 0),
                    (0x3000, 0, 0x3000, 16, INDIRECT, 0),
                ],
                ChainError::NestedIndirect,
            ),
            (
                &[(0x1000, 0, 0x3000, 16, INDIRECT | NEXT, 1)],
                ChainError::IndirectWithNext,
            ),
            (
                &[(0x1000, 0, 0x3000, 24, INDIRECT, 0)],
                ChainError::BadIndirectLength(24),
            ),
            (
                &[(0x1000, 0, 0x3000, 0, INDIRECT, 0)],
                ChainError::BadIndirectLength(0),
            ),
            (
                &[(0x1000, 0, 0x3000, 16 * 257, INDIRECT, 0)],
                ChainError::BadIndirectLength(16 * 257),
            ),
            (
                &[(0x1000, 0, 0xfff0, 0x20, 0, 0)],
                ChainError::OutsideRam {
                    address: 0xfff0,
                    length: 0x20,
                },
            ),
            (
                &[(0x1000, 0, 0x1_0000_0000, 1, 0, 0)],
                ChainError::OutsideRam {
                    address: 0x1_0000_0000,
                    length: 1,
                },
            ),
            (
                &[
                    (0x1000, 0, 0x4000, 1, WRITE | NEXT, 1),
                    (0x1000, 1, 0x4000, 16, 0, 0),
                ],
                ChainError::ReadableAfterWritable,
            ),
            (
                &[
                    (0x1000, 0, 0x4000, u32::MAX, NEXT, 1),
                    (0x1000, 1, 0x4000, 16, 0, 0),
                ],
                ChainError::OutsideRam {
                    address: 0x4000,
                    length: u64::from(u32::MAX),
                },
            ),
        ];
        for (descriptors, expected) in cases {
            for &(table, index, address, length, flags, next) in descriptors {
                put_descriptor(&memory, table, index, address, length, flags, next);
            }
            assert_eq!(walk(&memory, TABLE, 0), Err(expected));
        }
        // A head beyond the table.
        assert_eq!(
            walk(&memory, TABLE, 8),
            Err(ChainError::IndexOutOfRange {
                index: 8,
                table_size: 8
            })
        );
    }

    #[test]
    fn split_and_stream_copies_cross_segments() {
        let memory = memory();
        let mut segments = Segments::default();
        segments.push(0x4000, 3);
        segments.push(0x5000, 5);
        assert!(segments.write(&memory, b"abcdefgh"));
        let mut out = [0u8; 8];
        assert!(segments.read(&memory, &mut out));
        assert_eq!(&out, b"abcdefgh");
        let (head, tail) = segments.split_at(4);
        assert_eq!(head.ranges, vec![(0x4000, 3), (0x5000, 1)]);
        assert_eq!(tail.ranges, vec![(0x5001, 4)]);
        assert!(!segments.write(&memory, b"too long!"));
    }
}
