//! Guest-linear to guest-physical translation with the guest's own page tables
//! (SDM Vol. 3A chapter 4): 32-bit, PAE, 4-level and 5-level paging, 4K/2M/4M/1G
//! pages, R/W, U/S, XD, CR0.WP, SMEP and SMAP, reserved bits, and the accessed and
//! dirty bits the walk sets.
//!
//! KVM_TRANSLATE answers only "which physical page" (x86 KVM reports no permissions and
//! sets no A/D bits), so the exact #PF of an access needs this walk on every host.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::cpu::{
    CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE,
};
use super::exceptions::{Fault, PF_FETCH, PF_PRESENT, PF_RESERVED, PF_USER, PF_WRITE};
use crate::memory::GuestRam;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// What an access is, as the paging checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub write: bool,
    pub fetch: bool,
    /// A user-mode access: CPL 3 and not an implicit supervisor access (descriptor
    /// tables, the TSS, the stack of an interrupt delivered to CPL 0).
    pub user: bool,
    /// An explicit supervisor data access with EFLAGS.AC=1, which SMAP lets through.
    pub smap_allowed: bool,
}

impl Access {
    pub fn read(user: bool, smap_allowed: bool) -> Self {
        Self {
            user,
            smap_allowed,
            ..Self::default()
        }
    }

    pub fn write(user: bool, smap_allowed: bool) -> Self {
        Self {
            write: true,
            user,
            smap_allowed,
            ..Self::default()
        }
    }

    /// An implicit supervisor access (SMAP always applies to these).
    pub fn supervisor(write: bool) -> Self {
        Self {
            write,
            ..Self::default()
        }
    }
}

/// The control registers that decide a translation.
#[derive(Debug, Clone, Copy)]
pub struct PagingMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// MAXPHYADDR: physical-address bits above it are reserved in entries.
    pub physical_bits: u32,
}

/// Where the walk finds the paging structures: guest RAM, or a plain buffer in the unit
/// tests. Entries are read, and their A/D bits set, atomically as the CPU does: another
/// vCPU may be changing the same tables.
pub trait PageTables {
    /// The naturally aligned entry at `address`; None where there is no RAM.
    fn load(&self, address: u64, size: EntrySize) -> Option<u64>;
    /// ORs `bits` into that entry (nothing where there is no RAM).
    fn set_bits(&self, address: u64, size: EntrySize, bits: u64);
}

/// 4-byte entries of 32-bit paging, 8-byte entries of every other mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntrySize {
    Four,
    Eight,
}

impl EntrySize {
    fn bytes(self) -> usize {
        match self {
            Self::Four => 4,
            Self::Eight => 8,
        }
    }
}

/// One entry the walk used, with what it may set in it afterwards.
struct Entry {
    address: u64,
    value: u64,
    size: EntrySize,
    /// False for a PAE PDPTE: it has no A bit (bit 5 is reserved, SDM Vol. 3A Table 4-8;
    /// AMD APM Vol. 2 5.4.1), and setting it would make every later walk fault.
    has_accessed: bool,
}

impl PagingMode {
    pub fn enabled(&self) -> bool {
        self.cr0 & CR0_PG != 0
    }

    /// The physical address of `linear`, or the #PF the access raises.
    pub fn translate<M: PageTables + ?Sized>(
        &self,
        ram: &M,
        linear: u64,
        access: Access,
    ) -> Result<u64, Fault> {
        if !self.enabled() {
            return Ok(linear & 0xffff_ffff);
        }
        let nxe = self.efer & EFER_NXE != 0;
        let long = self.efer & EFER_LMA != 0;
        let pae = self.cr4 & CR4_PAE != 0;
        let address_mask = ((1u64 << self.physical_bits) - 1) & !0xfff;
        let above_maxphyaddr = !((1u64 << self.physical_bits) - 1);
        // Physical-address bits from MAXPHYADDR up are reserved: through bit 51 in the
        // 4/5-level formats (62:52 are ignored or protection keys there), through bit 62
        // in PAE PDEs and PTEs, through bit 63 in PAE PDPTEs (SDM Vol. 3A 4.4.2, 4.5.4).
        let reserved_high = if long {
            above_maxphyaddr & ((1u64 << 52) - 1)
        } else {
            above_maxphyaddr & !XD
        };
        // The I/D bit is reported only where fetches can be refused (SDM Vol. 3A 4.7).
        let reports_fetch = self.cr4 & CR4_SMEP != 0 || (pae && nxe);
        let fault_code = |present: bool, reserved: bool| {
            let mut code = 0;
            if present {
                code |= PF_PRESENT;
            }
            if reserved {
                code |= PF_RESERVED | PF_PRESENT;
            }
            if access.write {
                code |= PF_WRITE;
            }
            if access.user {
                code |= PF_USER;
            }
            if access.fetch && reports_fetch {
                code |= PF_FETCH;
            }
            Fault::PageFault {
                address: linear,
                error_code: code,
            }
        };

        let mut walked: Vec<Entry> = Vec::with_capacity(5);
        let (mut writable, mut user, mut executable) = (true, true, true);
        let physical;

        if long || pae {
            let levels: u32 = if !long {
                3
            } else if self.cr4 & CR4_LA57 != 0 {
                5
            } else {
                4
            };
            let mut table = if long {
                self.cr3 & address_mask
            } else {
                self.cr3 & 0xffff_ffe0
            };
            let mut level = levels;
            loop {
                let shift = 12 + 9 * (level - 1);
                // PAE paging's top level is the four PDPTEs that bits 31:30 select.
                let pae_pdpte = !long && level == 3;
                let index = if pae_pdpte {
                    (linear >> 30) & 3
                } else {
                    (linear >> shift) & 0x1ff
                };
                let address = table + index * 8;
                let value = ram
                    .load(address, EntrySize::Eight)
                    .ok_or_else(|| fault_code(false, false))?;
                if value & P == 0 {
                    return Err(fault_code(false, false));
                }
                let mut reserved = value & reserved_high != 0 || (!nxe && value & XD != 0);
                // PAE PDPTEs have no R/W, U/S, A, PS or XD: their bits 2:1, 8:5 and 63
                // are reserved (SDM Vol. 3A Table 4-8).
                if pae_pdpte {
                    reserved |= value & (RW | US | 0x1e0 | XD) != 0;
                }
                // PS is reserved in PML5Es and PML4Es (SDM Vol. 3A Tables 4-14, 4-15).
                if long && level >= 4 && value & PS != 0 {
                    reserved = true;
                }
                let large = !pae_pdpte && level > 1 && level <= 3 && value & PS != 0;
                if large {
                    // Bits 12 (PAT) .. shift-1 of a large page's address must be zero
                    // apart from PAT itself.
                    let low = ((1u64 << shift) - 1) & !0x1fff;
                    reserved |= value & low != 0;
                }
                if reserved {
                    return Err(fault_code(true, true));
                }
                // PAE PDPTEs do not take part in access rights (SDM Vol. 3A 4.6).
                if !pae_pdpte {
                    writable &= value & RW != 0;
                    user &= value & US != 0;
                    executable &= value & XD == 0 || !nxe;
                }
                walked.push(Entry {
                    address,
                    value,
                    size: EntrySize::Eight,
                    has_accessed: !pae_pdpte,
                });
                if level == 1 || large {
                    let page_mask = (1u64 << shift) - 1;
                    physical = (value & address_mask & !page_mask) | (linear & page_mask);
                    break;
                }
                table = value & address_mask;
                level -= 1;
            }
        } else {
            // 32-bit paging: two levels of 4-byte entries, 4 MiB pages with CR4.PSE.
            let directory = self.cr3 & 0xffff_f000;
            let pde_address = directory + ((linear >> 22) & 0x3ff) * 4;
            let pde = ram
                .load(pde_address, EntrySize::Four)
                .ok_or_else(|| fault_code(false, false))?;
            if pde & P == 0 {
                return Err(fault_code(false, false));
            }
            let large = pde & PS != 0 && self.cr4 & CR4_PSE != 0;
            // A 4 MiB PDE holds physical-address bits 39:32 in its bits 20:13; bit 21
            // and the bits for addresses from min(MAXPHYADDR, 40) up are reserved
            // (SDM Vol. 3A 4.3, Table 4-4).
            if large && pde & pse_reserved(self.physical_bits) != 0 {
                return Err(fault_code(true, true));
            }
            writable &= pde & RW != 0;
            user &= pde & US != 0;
            walked.push(Entry {
                address: pde_address,
                value: pde,
                size: EntrySize::Four,
                has_accessed: true,
            });
            if large {
                let high = ((pde >> 13) & 0xff) << 32;
                physical = (pde & 0xffc0_0000) | high | (linear & 0x3f_ffff);
            } else {
                let pte_address = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
                let pte = ram
                    .load(pte_address, EntrySize::Four)
                    .ok_or_else(|| fault_code(false, false))?;
                if pte & P == 0 {
                    return Err(fault_code(false, false));
                }
                writable &= pte & RW != 0;
                user &= pte & US != 0;
                walked.push(Entry {
                    address: pte_address,
                    value: pte,
                    size: EntrySize::Four,
                    has_accessed: true,
                });
                physical = (pte & 0xffff_f000) | (linear & 0xfff);
            }
        }

        let wp = self.cr0 & CR0_WP != 0;
        let violation = if access.user {
            !user || (access.write && !writable) || (access.fetch && !executable)
        } else if access.fetch {
            !executable || (user && self.cr4 & CR4_SMEP != 0)
        } else {
            (access.write && !writable && wp)
                || (user && self.cr4 & CR4_SMAP != 0 && !access.smap_allowed)
        };
        if violation {
            return Err(fault_code(true, false));
        }
        set_accessed_dirty(ram, &walked, access.write);
        Ok(physical)
    }
}

/// The reserved bits of a 4 MiB PDE of 32-bit paging with CR4.PSE (PSE-36: physical
/// bits 39:32 in PDE bits 20:13).
fn pse_reserved(physical_bits: u32) -> u64 {
    let limit = physical_bits.clamp(32, 40);
    let unused_high = ((1u64 << 21) - 1) & !((1u64 << (limit - 19)) - 1);
    (1 << 21) | unused_high
}

/// The walk's side effects: A in every entry used that has one, D in the one that maps
/// the page for a write (SDM Vol. 3A 4.8; AMD APM Vol. 2 5.4.2).
fn set_accessed_dirty<M: PageTables + ?Sized>(ram: &M, walked: &[Entry], write: bool) {
    let last = walked.len().saturating_sub(1);
    for (i, entry) in walked.iter().enumerate() {
        let mut bits = if entry.has_accessed { A } else { 0 };
        if write && i == last {
            bits |= D;
        }
        if entry.value & bits != bits {
            ram.set_bits(entry.address, entry.size, bits);
        }
    }
}

impl PageTables for GuestRam {
    fn load(&self, address: u64, size: EntrySize) -> Option<u64> {
        let pointer = aligned(self, address, size.bytes())?;
        // SAFETY: a naturally aligned location inside guest RAM, which stays mapped while
        // the caller holds the RAM lock.
        Some(unsafe {
            match size {
                EntrySize::Four => {
                    u64::from(AtomicU32::from_ptr(pointer.cast()).load(Ordering::SeqCst))
                }
                EntrySize::Eight => AtomicU64::from_ptr(pointer.cast()).load(Ordering::SeqCst),
            }
        })
    }

    fn set_bits(&self, address: u64, size: EntrySize, bits: u64) {
        let Some(pointer) = aligned(self, address, size.bytes()) else {
            return;
        };
        // SAFETY: as in load.
        unsafe {
            match size {
                EntrySize::Four => {
                    AtomicU32::from_ptr(pointer.cast()).fetch_or(bits as u32, Ordering::SeqCst);
                }
                EntrySize::Eight => {
                    AtomicU64::from_ptr(pointer.cast()).fetch_or(bits, Ordering::SeqCst);
                }
            }
        }
    }
}

fn aligned(ram: &GuestRam, address: u64, size: usize) -> Option<*mut u8> {
    if address % size as u64 != 0 {
        return None;
    }
    ram.host_range(address, size).map(|p| p.as_ptr())
}

/// The host's MAXPHYADDR (CPUID 8000_0008h EAX[7:0]); the guest sees the host's CPUID.
pub fn host_physical_bits() -> u32 {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max >= 0x8000_0008 {
        std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    }
}

#[cfg(test)]
mod tests;
