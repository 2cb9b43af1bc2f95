//! virtio-blk requests (virtio 1.2 section 5.2): the header, the data and the status
//! byte of one checked chain, executed against the image.

use super::chain::{Chain, Segments};
use super::counters::{DeviceCounters, bump};
use super::disk::{BOUNCE_CHUNK, Bounce, Disk, SECTOR_SIZE};
use super::guest_memory::Memory;
use super::queue::{Completion, MAX_QUEUE_SIZE_USIZE};

// Feature bits (5.2.3).
const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;

// Request types and status values (5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const HEADER_SIZE: u64 = 16;
/// struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
const RANGE_SIZE: u64 = 16;
const RANGE_FLAG_UNMAP: u32 = 1;
pub const ID_BYTES: usize = 20;

/// Limits the config advertises. seg_max leaves room for header and status in a chain
/// of the largest queue; size_max bounds one segment as Linux's max_segment_size.
const SEG_MAX: u32 = MAX_QUEUE_SIZE_USIZE as u32 - 2;
const SIZE_MAX: u32 = 1 << 20;
const MAX_RANGE_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
const MAX_RANGES: u32 = 16;
/// Holes are punched in whole host pages where the guest aligns to this (in sectors).
const DISCARD_ALIGNMENT: u32 = 8;

/// struct virtio_blk_config up to write_zeroes_may_unmap and its padding (5.2.4): the
/// fields after it belong to features (secure erase, zoned) not offered.
pub const CONFIG_SIZE: usize = 60;

#[derive(Debug)]
pub struct Block {
    disk: Disk,
    serial: [u8; ID_BYTES],
}

/// Why a request fails (each an IOERR but for Unsupported).
#[derive(Debug)]
enum Failure {
    /// The chain's shape does not fit the request type.
    Layout,
    ReadOnly,
    OutOfRange,
    Host,
    Unsupported,
}

impl Block {
    pub fn close(&self) {
        self.disk.unlock();
    }

    /// `serial`: at most 20 bytes (None: derived from the image's device and inode).
    pub fn new(disk: Disk, serial: Option<&str>) -> Result<Self, String> {
        let serial = serial.map_or_else(|| disk.default_serial(), str::to_string);
        if serial.len() > ID_BYTES {
            return Err(format!(
                "serial {serial:?} is longer than the {ID_BYTES} bytes virtio-blk carries"
            ));
        }
        let mut id = [0u8; ID_BYTES];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        Ok(Self { disk, serial: id })
    }

    pub fn features(&self) -> u64 {
        let mut bits = [F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH].to_vec();
        if self.disk.readonly() {
            bits.push(F_RO);
        } else {
            bits.extend([F_DISCARD, F_WRITE_ZEROES]);
        }
        bits.into_iter().fold(0, |all, bit| all | 1 << bit)
    }

    pub fn config(&self) -> Vec<u8> {
        let mut config = vec![0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.disk.sectors().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_RANGE_SECTORS.to_le_bytes());
        put(40, &MAX_RANGES.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT.to_le_bytes());
        put(48, &MAX_RANGE_SECTORS.to_le_bytes());
        put(52, &MAX_RANGES.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        config
    }

    /// Runs one request; None when the chain has no writable status byte (nowhere to
    /// report anything: the chain is malformed).
    pub fn execute(
        &self,
        memory: &Memory,
        chain: &Chain,
        bounce: &mut Bounce,
        counters: &DeviceCounters,
    ) -> Option<Completion> {
        let writable_total = chain.writable.total();
        let (data_out, status) = chain.writable.split_at(writable_total.checked_sub(1)?);
        let status_byte = match self.run(memory, chain, &data_out, bounce, counters) {
            Ok(()) => S_OK,
            Err(failure) => {
                match failure {
                    Failure::Unsupported => bump(&counters.unsupported, 1),
                    Failure::Layout => {
                        bump(&counters.bad_requests, 1);
                        bump(&counters.io_errors, 1);
                    }
                    Failure::Host => {
                        bump(&counters.host_errors, 1);
                        bump(&counters.io_errors, 1);
                    }
                    _ => bump(&counters.io_errors, 1),
                }
                if matches!(failure, Failure::Unsupported) {
                    S_UNSUPP
                } else {
                    S_IOERR
                }
            }
        };
        status.write(memory, &[status_byte]).then_some(())?;
        // The whole writable part counts as written, as QEMU reports it (Linux reads
        // only the status byte).
        Some(Completion {
            head: chain.head,
            used_len: u32::try_from(writable_total).unwrap_or(u32::MAX),
        })
    }

    fn run(
        &self,
        memory: &Memory,
        chain: &Chain,
        data_out: &Segments,
        bounce: &mut Bounce,
        counters: &DeviceCounters,
    ) -> Result<(), Failure> {
        let (header_segments, data_in) = chain.readable.split_at(HEADER_SIZE);
        let mut header = [0u8; HEADER_SIZE as usize];
        if header_segments.total() < HEADER_SIZE || !header_segments.read(memory, &mut header) {
            return Err(Failure::Layout);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let writes = matches!(kind, T_OUT | T_DISCARD | T_WRITE_ZEROES);
        if writes && self.disk.readonly() {
            return Err(Failure::ReadOnly);
        }
        match kind {
            T_IN => {
                expect_layout(data_in.total() == 0)?;
                let offset = self.range(sector, data_out.total())?;
                self.read(memory, data_out, offset, bounce)?;
                bump(&counters.read_bytes, data_out.total());
            }
            T_OUT => {
                expect_layout(data_out.total() == 0)?;
                let offset = self.range(sector, data_in.total())?;
                self.write(memory, &data_in, offset, bounce)?;
                bump(&counters.written_bytes, data_in.total());
            }
            T_FLUSH => {
                expect_layout(data_in.total() == 0 && data_out.total() == 0)?;
                if !self.disk.readonly() {
                    self.disk.flush().map_err(|_| Failure::Host)?;
                }
                bump(&counters.flushes, 1);
            }
            T_GET_ID => {
                expect_layout(data_in.total() == 0 && data_out.total() > 0)?;
                // Short of 20 bytes the id is NUL-padded; the rest of a longer buffer
                // is zeroed so that every byte reported written was.
                let length = usize::try_from(data_out.total()).map_err(|_| Failure::Layout)?;
                let mut id = vec![0u8; length.min(BOUNCE_CHUNK)];
                let shown = id.len().min(ID_BYTES);
                id[..shown].copy_from_slice(&self.serial[..shown]);
                expect_layout(data_out.write(memory, &id))?;
            }
            T_DISCARD | T_WRITE_ZEROES => {
                expect_layout(data_out.total() == 0)?;
                self.ranges(memory, kind, &data_in, bounce, counters)?;
            }
            _ => return Err(Failure::Unsupported),
        }
        Ok(())
    }

    /// The byte offset of `length` bytes at `sector`, when they are whole sectors inside
    /// the image.
    fn range(&self, sector: u64, length: u64) -> Result<u64, Failure> {
        expect_layout(length % SECTOR_SIZE == 0)?;
        let end = sector
            .checked_add(length / SECTOR_SIZE)
            .ok_or(Failure::OutOfRange)?;
        if end > self.disk.sectors() {
            return Err(Failure::OutOfRange);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn read(
        &self,
        memory: &Memory,
        data: &Segments,
        offset: u64,
        bounce: &mut Bounce,
    ) -> Result<(), Failure> {
        for_each_chunk(data, offset, |chunk, at| {
            let buffer = bounce.get(chunk.total() as usize);
            self.disk
                .read_exact_at(buffer, at)
                .map_err(|_| Failure::Host)?;
            expect_layout(chunk.write(memory, buffer))
        })
    }

    fn write(
        &self,
        memory: &Memory,
        data: &Segments,
        offset: u64,
        bounce: &mut Bounce,
    ) -> Result<(), Failure> {
        for_each_chunk(data, offset, |chunk, at| {
            let buffer = bounce.get(chunk.total() as usize);
            expect_layout(chunk.read(memory, buffer))?;
            self.disk
                .write_all_at(buffer, at)
                .map_err(|_| Failure::Host)
        })
    }

    /// DISCARD and WRITE_ZEROES: every range checked before any is applied.
    fn ranges(
        &self,
        memory: &Memory,
        kind: u32,
        data: &Segments,
        bounce: &mut Bounce,
        counters: &DeviceCounters,
    ) -> Result<(), Failure> {
        let count = data.total() / RANGE_SIZE;
        expect_layout(data.total() % RANGE_SIZE == 0 && count > 0)?;
        if count > u64::from(MAX_RANGES) {
            return Err(Failure::OutOfRange);
        }
        let mut raw = vec![0u8; data.total() as usize];
        expect_layout(data.read(memory, &mut raw))?;
        let mut ranges = Vec::new();
        for entry in raw.chunks_exact(RANGE_SIZE as usize) {
            let sector = u64::from_le_bytes(entry[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(entry[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(entry[12..16].try_into().unwrap_or_default());
            // Unknown flags, and unmap on a discard, are UNSUPP (5.2.6.2).
            if flags & !RANGE_FLAG_UNMAP != 0 || (kind == T_DISCARD && flags != 0) {
                return Err(Failure::Unsupported);
            }
            if sectors > MAX_RANGE_SECTORS {
                return Err(Failure::OutOfRange);
            }
            let length = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.range(sector, length)?;
            ranges.push((offset, length, flags & RANGE_FLAG_UNMAP != 0));
        }
        for (offset, length, unmap) in ranges {
            if length == 0 {
                continue;
            }
            if kind == T_DISCARD {
                // Discard is a hint (5.2.6.2: the device MAY deallocate): a file system
                // that cannot punch holes leaves the data.
                match self.disk.punch_hole(offset, length) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    other => other.map_err(|_| Failure::Host)?,
                }
                bump(&counters.discards, 1);
            } else {
                self.disk
                    .write_zeroes(offset, length, unmap, bounce)
                    .map_err(|_| Failure::Host)?;
                bump(&counters.write_zeroes, 1);
            }
        }
        Ok(())
    }
}

fn expect_layout(holds: bool) -> Result<(), Failure> {
    if holds { Ok(()) } else { Err(Failure::Layout) }
}

/// `f(chunk, disk offset)` for each bounce-buffer-sized piece of `data`, in order, from
/// disk offset `offset`; the first failure ends it.
fn for_each_chunk(
    data: &Segments,
    offset: u64,
    mut f: impl FnMut(&Segments, u64) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut rest = data.clone();
    let mut at = offset;
    while rest.total() > 0 {
        let (chunk, tail) = rest.split_at(BOUNCE_CHUNK as u64);
        f(&chunk, at)?;
        at += chunk.total();
        rest = tail;
    }
    Ok(())
}
