//! Guest RAM as vm-memory (and so virtio-queue) sees it: one region per VM memory slot,
//! each over the VM's existing mapping (nothing is mapped here), kept alive by the RAM
//! snapshot it was built from for as long as the device uses it.

use std::fmt;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::memory::{GuestRam, MAPPING_PROT};

/// The vm-memory type every queue and request is read and written through.
pub type Memory = GuestMemoryMmap<()>;

#[derive(Debug)]
pub enum MemoryError {
    /// The VM has no RAM (none added yet, or closed).
    NoRam,
    /// vm-memory refused a region (never expected for the VM's own page-aligned slots).
    Region(String),
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRam => write!(f, "the VM has no guest RAM (closed, or no add_memory yet)"),
            Self::Region(why) => write!(f, "guest RAM cannot be described to vm-memory: {why}"),
        }
    }
}

/// A device's view of guest RAM.
pub struct DeviceMemory {
    // Declared first so that it is dropped before the mappings it points into.
    memory: Memory,
    _ram: Arc<GuestRam>,
}

impl DeviceMemory {
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, MemoryError> {
        if ram.regions().is_empty() {
            return Err(MemoryError::NoRam);
        }
        let mut regions = Vec::with_capacity(ram.regions().len());
        for region in ram.regions() {
            // SAFETY: the range is exactly one of the VM's own mappings (memory::Mapping,
            // made with MAPPING_PROT and the flags it reports), and `ram`, kept in self beside
            // the regions, holds its Arc: it stays mapped while vm-memory can reach it. A
            // raw region is never unmapped by vm-memory.
            let mmap = unsafe {
                MmapRegion::<()>::build_raw(
                    region.mapping.as_ptr(),
                    region.mapping.size(),
                    MAPPING_PROT,
                    region.mapping.flags(),
                )
            }
            .map_err(|e| MemoryError::Region(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| MemoryError::Region("a slot ends beyond 2^64".into()))?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(Self { memory, _ram: ram })
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::memory::{Mapping, RamRegion};

    #[test]
    fn regions_share_the_vm_mappings() {
        let mut ram = GuestRam::default();
        ram.insert(RamRegion {
            guest_phys_addr: 0x10000,
            slot: 0,
            mapping: Arc::new(Mapping::anonymous(0x2000, false).unwrap()),
        });
        let ram = Arc::new(ram);
        let device = DeviceMemory::new(ram.clone()).unwrap();
        device
            .memory()
            .write_slice(b"virtio", GuestAddress(0x11000))
            .unwrap();
        let mut seen = [0u8; 6];
        assert!(ram.read_into(0x11000, &mut seen));
        assert_eq!(&seen, b"virtio");
        assert!(
            device
                .memory()
                .write_slice(b"x", GuestAddress(0x12000))
                .is_err()
        );
    }

    #[test]
    fn no_ram_is_an_error() {
        assert!(matches!(
            DeviceMemory::new(Arc::new(GuestRam::default())),
            Err(MemoryError::NoRam)
        ));
    }
}
