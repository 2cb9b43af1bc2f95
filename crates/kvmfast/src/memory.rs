//! Guest RAM: host mappings (anonymous, or a memory file's private copy), the Python
//! view of one slot, and reads and writes by guest-physical address across slots.

use std::ffi::c_int;
use std::ptr::NonNull;
use std::sync::{Arc, RwLock};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::locks;
use crate::memory_file::{self, BackingError};
use crate::volatile_copy;

/// How every guest RAM mapping is made (vm-memory is told the same when it describes one:
/// virtio/guest_memory.rs).
pub const MAPPING_PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
pub const MAPPING_FLAGS: libc::c_int =
    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
/// A memory file's pages load on demand and guest writes are copied on write: the
/// file never changes.
pub const FILE_MAPPING_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_NORESERVE;

/// A private read-write mapping, unmapped when the last owner drops it.
#[derive(Debug)]
pub struct Mapping {
    address: NonNull<u8>,
    size: usize,
    flags: libc::c_int,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent guest and host
// accesses to guest RAM are the guest's business, as on real hardware, and the host's
// go through volatile_copy or atomics, never Rust references.
unsafe impl Send for Mapping {}
// SAFETY: as above; nothing in Mapping itself is mutated after creation.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `size` bytes of zeroed memory; `hugepages` asks for transparent huge pages.
    pub fn anonymous(size: usize, hugepages: bool) -> std::io::Result<Self> {
        Self::map(size, MAPPING_FLAGS, -1, 0, hugepages)
    }

    /// Maps `size` bytes of `file` from `offset` (page aligned) copy-on-write: reads
    /// load the file's pages on demand, writes go to private copies.
    pub fn private_file(
        file: &std::fs::File,
        offset: u64,
        size: usize,
        hugepages: bool,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        Self::map(
            size,
            FILE_MAPPING_FLAGS,
            file.as_raw_fd(),
            offset,
            hugepages,
        )
    }

    /// Guest RAM from [offset, offset+size) of the memory file at `path`: mapped
    /// copy-on-write, or (`copy`) read into anonymous memory now.
    pub fn from_backing(
        path: &std::path::Path,
        offset: u64,
        size: usize,
        hugepages: bool,
        copy: bool,
    ) -> Result<Self, BackingError> {
        let file = memory_file::open_backing(path, offset, size as u64)?;
        let io_error = |error| BackingError::Io {
            path: path.to_path_buf(),
            error,
        };
        if !copy {
            return Self::private_file(&file, offset, size, hugepages).map_err(io_error);
        }
        let mapping = Self::anonymous(size, hugepages).map_err(io_error)?;
        memory_file::copy_from_file(path, &file, offset, size as u64, |at, data| {
            mapping.write_from(at, data);
        })?;
        Ok(mapping)
    }

    fn map(
        size: usize,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: libc::off_t,
        hugepages: bool,
    ) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses touches no existing
        // memory; a file mapped MAP_PRIVATE is never written through it.
        let address =
            unsafe { libc::mmap(std::ptr::null_mut(), size, MAPPING_PROT, flags, fd, offset) };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mapping = Self {
            address: NonNull::new(address.cast()).ok_or_else(std::io::Error::last_os_error)?,
            size,
            flags,
        };
        if hugepages {
            // SAFETY: the range is exactly the mapping created above.
            if unsafe { libc::madvise(address, size, libc::MADV_HUGEPAGE) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(mapping)
    }

    /// The mmap flags it was made with.
    pub fn flags(&self) -> libc::c_int {
        self.flags
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.address.as_ptr()
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Copies out of the mapping; the range must lie inside it.
    pub fn read_into(&self, offset: usize, out: &mut [u8]) {
        assert!(
            offset
                .checked_add(out.len())
                .is_some_and(|end| end <= self.size)
        );
        // SAFETY: the range was checked against the mapping, which lives as long as self.
        // vCPUs (and the page walker's atomics) may change it meanwhile: volatile_copy
        // never makes a Rust reference to it and reads aligned words whole.
        unsafe { volatile_copy::read(self.as_ptr().add(offset), out) };
    }

    /// Copies into the mapping; the range must lie inside it.
    pub fn write_from(&self, offset: usize, data: &[u8]) {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|end| end <= self.size)
        );
        // SAFETY: as in read_into, in the other direction.
        unsafe { volatile_copy::write(self.as_ptr().add(offset), data) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by Mapping::map with this size and nothing
        // refers to it any more (the last Arc is gone).
        unsafe { libc::munmap(self.address.as_ptr().cast(), self.size) };
    }
}

/// One memory slot of a VM as Python sees it: a writable, zero-copy buffer.
#[pyclass(frozen, module = "kvmfast")]
pub struct GuestMemory {
    mapping: Arc<Mapping>,
    guest_phys_addr: u64,
    slot: u32,
}

impl GuestMemory {
    pub fn new(mapping: Arc<Mapping>, guest_phys_addr: u64, slot: u32) -> Self {
        Self {
            mapping,
            guest_phys_addr,
            slot,
        }
    }
}

#[pymethods]
impl GuestMemory {
    #[getter]
    fn guest_phys_addr(&self) -> u64 {
        self.guest_phys_addr
    }

    #[getter]
    fn size(&self) -> usize {
        self.mapping.size()
    }

    #[getter]
    fn slot(&self) -> u32 {
        self.slot
    }

    fn __len__(&self) -> usize {
        self.mapping.size()
    }

    /// pwrite()s each 4 KiB page that is not all zeros to `fd` at `file_offset` + the
    /// page's offset, without the GIL; returns the bytes written. Zero pages are left
    /// to be holes of a file the caller has sized. The vCPUs must be paused.
    fn save_to(&self, py: Python<'_>, fd: i32, file_offset: u64) -> PyResult<u64> {
        let mapping = self.mapping.clone();
        py.detach(|| {
            memory_file::save_pages(
                mapping.size(),
                |at, out| mapping.read_into(at, out),
                fd,
                file_offset,
            )
        })
        .map_err(crate::errors::io_error)
    }

    fn __repr__(&self) -> String {
        format!(
            "GuestMemory(guest_phys_addr={:#x}, size={:#x}, slot={})",
            self.guest_phys_addr,
            self.mapping.size(),
            self.slot
        )
    }

    /// # Safety
    /// Called by CPython with a valid `Py_buffer` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no Py_buffer to fill"));
        }
        let mapping = &slf.get().mapping;
        let length = ffi::Py_ssize_t::try_from(mapping.size())
            .map_err(|_| PyBufferError::new_err("mapping too large for a buffer"))?;
        // SAFETY: view is CPython's; the buffer keeps a reference to this object (the
        // `obj` argument), and the object keeps the mapping alive, so the memory outlives
        // every exported view.
        let status = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                mapping.as_ptr().cast(),
                length,
                0,
                flags,
            )
        };
        if status < 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// # Safety
    /// Called by CPython when a view is released; nothing was allocated for it.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// One registered slot.
#[derive(Debug, Clone)]
pub struct RamRegion {
    pub guest_phys_addr: u64,
    pub slot: u32,
    pub mapping: Arc<Mapping>,
}

impl RamRegion {
    fn end(&self) -> u64 {
        self.guest_phys_addr + self.mapping.size() as u64
    }
}

/// The RAM a VM and its vCPUs share: the vCPU thread reads guest memory through it when
/// it completes an instruction KVM could not.
///
/// Readers take a snapshot and hold the lock only to clone an Arc: a vCPU completing an
/// instruction may wait for the GIL (an MMIO device call) while it uses guest RAM, and
/// must then hold no lock that a thread with the GIL (close(), add_memory()) can wait
/// for. A snapshot also keeps its mappings alive until the completion ends, whatever
/// close() does meanwhile.
#[derive(Debug, Default)]
pub struct SharedRam {
    current: RwLock<Arc<GuestRam>>,
}

impl SharedRam {
    pub fn snapshot(&self) -> Arc<GuestRam> {
        locks::read(&self.current).clone()
    }

    /// Installs `ram` and returns what it replaces.
    pub fn replace(&self, ram: GuestRam) -> Arc<GuestRam> {
        std::mem::replace(&mut *locks::write(&self.current), Arc::new(ram))
    }
}

/// The VM's RAM slots, sorted by guest-physical address.
#[derive(Debug, Default, Clone)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// Whether [gpa, gpa+size) overlaps any slot.
    pub fn overlaps(&self, guest_phys_addr: u64, size: u64) -> bool {
        let end = guest_phys_addr.saturating_add(size);
        self.regions
            .iter()
            .any(|region| guest_phys_addr < region.end() && region.guest_phys_addr < end)
    }

    pub fn insert(&mut self, region: RamRegion) {
        let index = self
            .regions
            .partition_point(|existing| existing.guest_phys_addr < region.guest_phys_addr);
        self.regions.insert(index, region);
    }

    pub fn slots_in_use(&self) -> impl Iterator<Item = u32> + '_ {
        self.regions.iter().map(|region| region.slot)
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Splits [gpa, gpa+len) into (region, offset, length) pieces, or None when any byte
    /// is outside RAM.
    fn pieces(
        &self,
        guest_phys_addr: u64,
        length: usize,
    ) -> Option<Vec<(&RamRegion, usize, usize)>> {
        let mut pieces = Vec::new();
        let mut address = guest_phys_addr;
        let end = guest_phys_addr.checked_add(length as u64)?;
        while address < end {
            let index = self
                .regions
                .partition_point(|region| region.guest_phys_addr <= address);
            let region = self.regions.get(index.checked_sub(1)?)?;
            if address >= region.end() {
                return None;
            }
            let piece_end = end.min(region.end());
            pieces.push((
                region,
                (address - region.guest_phys_addr) as usize,
                (piece_end - address) as usize,
            ));
            address = piece_end;
        }
        Some(pieces)
    }

    /// The host address of [gpa, gpa+len) when it lies inside one slot.
    pub fn host_range(&self, guest_phys_addr: u64, length: usize) -> Option<NonNull<u8>> {
        let index = self
            .regions
            .partition_point(|region| region.guest_phys_addr <= guest_phys_addr);
        let region = self.regions.get(index.checked_sub(1)?)?;
        let end = guest_phys_addr.checked_add(length as u64)?;
        if end > region.end() {
            return None;
        }
        let offset = (guest_phys_addr - region.guest_phys_addr) as usize;
        // SAFETY: offset lies inside the mapping (checked against its end above).
        NonNull::new(unsafe { region.mapping.as_ptr().add(offset) })
    }

    /// Whether every byte of [gpa, gpa+len) is RAM.
    pub fn contains(&self, guest_phys_addr: u64, length: usize) -> bool {
        self.pieces(guest_phys_addr, length).is_some()
    }

    /// Copies guest RAM into `out`; false (nothing copied) when a byte is outside RAM.
    pub fn read_into(&self, guest_phys_addr: u64, out: &mut [u8]) -> bool {
        let Some(pieces) = self.pieces(guest_phys_addr, out.len()) else {
            return false;
        };
        let mut done = 0;
        for (region, offset, piece_length) in pieces {
            region
                .mapping
                .read_into(offset, &mut out[done..done + piece_length]);
            done += piece_length;
        }
        true
    }

    /// Copies `data` into guest RAM; false (nothing written) when a byte is outside RAM.
    pub fn write_from(&self, guest_phys_addr: u64, data: &[u8]) -> bool {
        let Some(pieces) = self.pieces(guest_phys_addr, data.len()) else {
            return false;
        };
        let mut done = 0;
        for (region, offset, piece_length) in pieces {
            region
                .mapping
                .write_from(offset, &data[done..done + piece_length]);
            done += piece_length;
        }
        true
    }

    pub fn read(&self, guest_phys_addr: u64, length: usize) -> PyResult<Vec<u8>> {
        let pieces = self
            .pieces(guest_phys_addr, length)
            .ok_or_else(|| outside_ram(guest_phys_addr, length))?;
        let mut out = vec![0u8; length];
        let mut done = 0;
        for (region, offset, piece_length) in pieces {
            region
                .mapping
                .read_into(offset, &mut out[done..done + piece_length]);
            done += piece_length;
        }
        Ok(out)
    }

    pub fn write(&self, guest_phys_addr: u64, data: &[u8]) -> PyResult<()> {
        let pieces = self
            .pieces(guest_phys_addr, data.len())
            .ok_or_else(|| outside_ram(guest_phys_addr, data.len()))?;
        let mut done = 0;
        for (region, offset, piece_length) in pieces {
            region
                .mapping
                .write_from(offset, &data[done..done + piece_length]);
            done += piece_length;
        }
        Ok(())
    }
}

fn outside_ram(guest_phys_addr: u64, length: usize) -> PyErr {
    PyValueError::new_err(format!(
        "guest-physical range {guest_phys_addr:#x}+{length:#x} is not all guest RAM"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_with(regions: &[(u64, usize, u32)]) -> GuestRam {
        let mut ram = GuestRam::default();
        for &(gpa, size, slot) in regions {
            ram.insert(RamRegion {
                guest_phys_addr: gpa,
                slot,
                mapping: Arc::new(Mapping::anonymous(size, false).unwrap()),
            });
        }
        ram
    }

    #[test]
    fn pieces_span_adjacent_slots() {
        let ram = ram_with(&[(0x2000, 0x1000, 1), (0, 0x2000, 0)]);
        let pieces = ram.pieces(0x1ff0, 0x20).unwrap();
        let shape: Vec<_> = pieces.iter().map(|(r, o, l)| (r.slot, *o, *l)).collect();
        assert_eq!(shape, vec![(0, 0x1ff0, 0x10), (1, 0, 0x10)]);
    }

    #[test]
    fn pieces_reject_holes_and_edges() {
        let ram = ram_with(&[(0, 0x1000, 0), (0x3000, 0x1000, 1)]);
        assert!(ram.pieces(0xff0, 0x20).is_none());
        assert!(ram.pieces(0x3ff0, 0x11).is_none());
        assert!(ram.pieces(u64::MAX, 2).is_none());
        assert!(ram.pieces(0x3ff0, 0x10).is_some());
        assert!(ram.pieces(0x5000, 0).is_some());
    }

    /// A memory file of `pages` pages, page i starting with byte i + 1; removed on drop.
    struct MemoryFile(std::path::PathBuf);

    impl MemoryFile {
        fn new(name: &str, pages: usize) -> Self {
            let path =
                std::env::temp_dir().join(format!("kvmfast-memory-{name}-{}", std::process::id()));
            let mut bytes = vec![0u8; pages * 4096];
            for page in 0..pages {
                bytes[page * 4096] = page as u8 + 1;
            }
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }
    }

    impl Drop for MemoryFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn first_byte(mapping: &Mapping, page: usize) -> u8 {
        let mut byte = [0u8];
        mapping.read_into(page * 4096, &mut byte);
        byte[0]
    }

    #[test]
    fn private_file_mappings_do_not_see_each_other_nor_change_the_file() {
        let file = MemoryFile::new("private", 4);
        let before = std::fs::read(&file.0).unwrap();
        let one = Mapping::from_backing(&file.0, 4096, 3 * 4096, false, false).unwrap();
        let two = Mapping::from_backing(&file.0, 4096, 3 * 4096, false, false).unwrap();
        assert_eq!(one.flags(), FILE_MAPPING_FLAGS);
        assert_eq!(first_byte(&one, 0), 2);
        one.write_from(0, &[0xAA]);
        two.write_from(4096, &[0xBB]);
        assert_eq!((first_byte(&one, 0), first_byte(&one, 1)), (0xAA, 3));
        assert_eq!((first_byte(&two, 0), first_byte(&two, 1)), (2, 0xBB));
        drop((one, two));
        assert_eq!(std::fs::read(&file.0).unwrap(), before);
    }

    #[test]
    fn a_copied_file_is_anonymous_memory_with_its_bytes() {
        let file = MemoryFile::new("copy", 3);
        let copy = Mapping::from_backing(&file.0, 0, 3 * 4096, false, true).unwrap();
        assert_eq!(copy.flags(), MAPPING_FLAGS);
        let firsts: Vec<u8> = (0..3).map(|page| first_byte(&copy, page)).collect();
        assert_eq!(firsts, [1, 2, 3]);
        assert!(Mapping::from_backing(&file.0, 4096, 3 * 4096, false, true).is_err());
    }

    #[test]
    fn overlap_check_is_half_open() {
        let ram = ram_with(&[(0x1000, 0x1000, 0)]);
        assert!(!ram.overlaps(0, 0x1000));
        assert!(!ram.overlaps(0x2000, 0x1000));
        assert!(ram.overlaps(0x1fff, 1));
        assert!(ram.overlaps(0, 0x1001));
    }
}
