//! A hand-built split ring in a small vm-memory guest, for the unit tests of this module.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::guest_memory::Memory;

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// The test guest: 64 KiB at 0.
pub const RAM_SIZE: u64 = 0x10000;

/// The test queue's layout: descriptors, avail ring, used ring.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x2800;

pub fn memory() -> Memory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap()
}

pub fn put_descriptor(
    memory: &Memory,
    table: u64,
    index: u16,
    address: u64,
    length: u32,
    flags: u16,
    next: u16,
) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&address.to_le_bytes());
    raw[8..12].copy_from_slice(&length.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    memory
        .write_slice(&raw, GuestAddress(table + u64::from(index) * 16))
        .unwrap();
}

pub fn put_u16(memory: &Memory, address: u64, value: u16) {
    memory
        .write_obj(value.to_le(), GuestAddress(address))
        .unwrap();
}

pub fn get_u16(memory: &Memory, address: u64) -> u16 {
    u16::from_le(memory.read_obj(GuestAddress(address)).unwrap())
}

pub fn get_u32(memory: &Memory, address: u64) -> u32 {
    u32::from_le(memory.read_obj(GuestAddress(address)).unwrap())
}

/// The driver's side of a queue of `size` at DESC/AVAIL/USED.
pub struct Driver {
    pub size: u16,
    pub avail_idx: u16,
}

impl Driver {
    pub fn new(size: u16) -> Self {
        Self { size, avail_idx: 0 }
    }

    /// Makes chain `head` available.
    pub fn offer(&mut self, memory: &Memory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        put_u16(memory, AVAIL + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put_u16(memory, AVAIL + 2, self.avail_idx);
    }

    pub fn set_used_event(&self, memory: &Memory, value: u16) {
        put_u16(memory, AVAIL + 4 + 2 * u64::from(self.size), value);
    }

    pub fn used_idx(&self, memory: &Memory) -> u16 {
        get_u16(memory, USED + 2)
    }

    /// (id, len) of used entry `n`.
    pub fn used(&self, memory: &Memory, n: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(n % self.size);
        (get_u32(memory, at), get_u32(memory, at + 4))
    }

    pub fn avail_event(&self, memory: &Memory) -> u16 {
        get_u16(memory, USED + 4 + 8 * u64::from(self.size))
    }
}

/// A temporary image file of `bytes` zeroes in the system temp directory, removed on drop.
pub struct TempImage {
    pub path: std::path::PathBuf,
}

impl TempImage {
    pub fn new(bytes: usize) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kvmfast-disk-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        Self { path }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
