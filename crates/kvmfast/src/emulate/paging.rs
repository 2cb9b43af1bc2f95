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

/// One page-table entry read through RAM, so that the walk can set its A/D bits.
struct Entry {
    address: u64,
    value: u64,
    wide: bool,
}

impl PagingMode {
    pub fn enabled(&self) -> bool {
        self.cr0 & CR0_PG != 0
    }

    /// The physical address of `linear`, or the #PF the access raises.
    pub fn translate(&self, ram: &GuestRam, linear: u64, access: Access) -> Result<u64, Fault> {
        if !self.enabled() {
            return Ok(linear & 0xffff_ffff);
        }
        let nxe = self.efer & EFER_NXE != 0;
        let address_mask = ((1u64 << self.physical_bits) - 1) & !0xfff;
        let reserved_high = if self.physical_bits >= 52 {
            0
        } else {
            ((1u64 << 52) - 1) & !((1u64 << self.physical_bits) - 1)
        };
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
            if access.fetch && (nxe || self.cr4 & CR4_SMEP != 0) {
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

        if self.efer & EFER_LMA != 0 || self.cr4 & CR4_PAE != 0 {
            let long = self.efer & EFER_LMA != 0;
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
                let index = if !long && level == 3 {
                    (linear >> 30) & 3
                } else {
                    (linear >> shift) & 0x1ff
                };
                let address = table + index * 8;
                let value = read_u64(ram, address).ok_or_else(|| fault_code(false, false))?;
                if value & P == 0 {
                    return Err(fault_code(false, false));
                }
                let mut reserved = value & reserved_high != 0 || (!nxe && value & XD != 0);
                // PAE PDPTEs have no R/W, U/S or XD: their bits 1, 2, 5-8 and 63 are
                // reserved (SDM Vol. 3A Table 4-8).
                let pae_pdpte = !long && level == 3;
                if pae_pdpte {
                    reserved |= value & (RW | US | 0x1e0 | XD) != 0;
                }
                if (long && level >= 4 && value & PS != 0) || (pae_pdpte && value & PS != 0) {
                    reserved = true;
                }
                let large = level > 1 && level <= 3 && value & PS != 0;
                if large {
                    // Bits 12 (PAT) .. shift-1 of a large page's address must be zero
                    // apart from PAT itself.
                    let low = ((1u64 << shift) - 1) & !0x1fff;
                    reserved |= value & low != 0;
                }
                if reserved {
                    return Err(fault_code(true, true));
                }
                if !pae_pdpte {
                    writable &= value & RW != 0;
                    user &= value & US != 0;
                    executable &= value & XD == 0 || !nxe;
                }
                walked.push(Entry {
                    address,
                    value,
                    wide: true,
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
            let pde =
                u64::from(read_u32(ram, pde_address).ok_or_else(|| fault_code(false, false))?);
            if pde & P == 0 {
                return Err(fault_code(false, false));
            }
            writable &= pde & RW != 0;
            user &= pde & US != 0;
            walked.push(Entry {
                address: pde_address,
                value: pde,
                wide: false,
            });
            if pde & PS != 0 && self.cr4 & CR4_PSE != 0 {
                // PSE-36: bits 20:13 give physical-address bits 39:32.
                let high = ((pde >> 13) & 0xff) << 32;
                physical = (pde & 0xffc0_0000) | high | (linear & 0x3f_ffff);
            } else {
                let pte_address = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
                let pte =
                    u64::from(read_u32(ram, pte_address).ok_or_else(|| fault_code(false, false))?);
                if pte & P == 0 {
                    return Err(fault_code(false, false));
                }
                writable &= pte & RW != 0;
                user &= pte & US != 0;
                walked.push(Entry {
                    address: pte_address,
                    value: pte,
                    wide: false,
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

/// The walk's side effects: A in every entry used, D in the last one for a write
/// (SDM Vol. 3A 4.8), set atomically as the CPU does (other vCPUs share the tables).
fn set_accessed_dirty(ram: &GuestRam, walked: &[Entry], write: bool) {
    let last = walked.len().saturating_sub(1);
    for (i, entry) in walked.iter().enumerate() {
        let mut bits = A;
        if write && i == last {
            bits |= D;
        }
        if entry.value & bits == bits {
            continue;
        }
        if entry.wide {
            if let Some(pointer) = aligned(ram, entry.address, 8) {
                // SAFETY: an 8-byte aligned location inside guest RAM, which stays mapped
                // while the caller holds the RAM lock.
                unsafe { AtomicU64::from_ptr(pointer.cast()) }.fetch_or(bits, Ordering::SeqCst);
            }
        } else if let Some(pointer) = aligned(ram, entry.address, 4) {
            // SAFETY: as above, 4-byte aligned.
            unsafe { AtomicU32::from_ptr(pointer.cast()) }.fetch_or(bits as u32, Ordering::SeqCst);
        }
    }
}

fn aligned(ram: &GuestRam, address: u64, size: usize) -> Option<*mut u8> {
    if address % size as u64 != 0 {
        return None;
    }
    ram.host_range(address, size).map(|p| p.as_ptr())
}

/// Page-table entries are read atomically: another vCPU may be changing them.
fn read_u64(ram: &GuestRam, address: u64) -> Option<u64> {
    let pointer = aligned(ram, address, 8)?;
    // SAFETY: see set_accessed_dirty.
    Some(unsafe { AtomicU64::from_ptr(pointer.cast()) }.load(Ordering::SeqCst))
}

fn read_u32(ram: &GuestRam, address: u64) -> Option<u32> {
    let pointer = aligned(ram, address, 4)?;
    // SAFETY: see set_accessed_dirty.
    Some(unsafe { AtomicU32::from_ptr(pointer.cast()) }.load(Ordering::SeqCst))
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
mod tests {
    use super::*;
    use crate::memory::{Mapping, RamRegion};
    use std::sync::Arc;

    fn ram() -> GuestRam {
        let mut ram = GuestRam::default();
        ram.insert(RamRegion {
            guest_phys_addr: 0,
            slot: 0,
            mapping: Arc::new(Mapping::anonymous(1 << 22, false).unwrap()),
        });
        ram
    }

    fn put(ram: &GuestRam, address: u64, value: u64) {
        assert!(ram.write_from(address, &value.to_le_bytes()));
    }

    fn long_mode(cr4: u64) -> PagingMode {
        PagingMode {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4: CR4_PAE | cr4,
            efer: EFER_LMA | EFER_NXE,
            physical_bits: 46,
        }
    }

    /// PML4[0] -> PDPT 0x2000 -> PD 0x3000; PD[0] -> PT 0x4000; PD[1] is a 2 MiB page.
    fn tables(ram: &GuestRam, pte: u64) {
        put(ram, 0x1000, 0x2000 | 7);
        put(ram, 0x2000, 0x3000 | 7);
        put(ram, 0x3000, 0x4000 | 7);
        put(ram, 0x3008, 0x20_0000 | PS | 3);
        put(ram, 0x4000 + 5 * 8, pte);
    }

    #[test]
    fn four_level_4k_and_2m_pages() {
        let ram = ram();
        tables(&ram, 0x9000 | 7);
        let mode = long_mode(0);
        assert_eq!(
            mode.translate(&ram, 0x5123, Access::read(false, false)),
            Ok(0x9123)
        );
        assert_eq!(
            mode.translate(&ram, 0x20_1234, Access::read(false, false)),
            Ok(0x20_1234)
        );
        // The walk set A everywhere and D in the PTE of a write.
        mode.translate(&ram, 0x5000, Access::write(false, false))
            .unwrap();
        let mut pte = [0u8; 8];
        ram.read_into(0x4028, &mut pte);
        assert_eq!(u64::from_le_bytes(pte) & (A | D), A | D);
    }

    #[test]
    fn not_present_and_protection_error_codes() {
        let ram = ram();
        tables(&ram, 0x9000 | 1); // present, read-only, supervisor
        let mode = long_mode(CR4_SMAP | CR4_SMEP);
        let missing = mode.translate(&ram, 0x6000, Access::write(true, false));
        assert_eq!(
            missing,
            Err(Fault::PageFault {
                address: 0x6000,
                error_code: PF_WRITE | PF_USER
            })
        );
        let user_on_supervisor = mode.translate(&ram, 0x5000, Access::read(true, false));
        assert_eq!(
            user_on_supervisor,
            Err(Fault::PageFault {
                address: 0x5000,
                error_code: PF_PRESENT | PF_USER
            })
        );
        let wp = mode.translate(&ram, 0x5008, Access::write(false, false));
        assert_eq!(
            wp,
            Err(Fault::PageFault {
                address: 0x5008,
                error_code: PF_PRESENT | PF_WRITE
            })
        );
    }

    #[test]
    fn smap_and_smep_follow_ac_and_access_kind() {
        let ram = ram();
        tables(&ram, 0x9000 | 7);
        let mode = long_mode(CR4_SMAP | CR4_SMEP);
        assert!(
            mode.translate(&ram, 0x5000, Access::read(false, false))
                .is_err()
        );
        assert_eq!(
            mode.translate(&ram, 0x5000, Access::read(false, true)),
            Ok(0x9000)
        );
        let fetch = Access {
            fetch: true,
            ..Access::default()
        };
        assert_eq!(
            mode.translate(&ram, 0x5000, fetch),
            Err(Fault::PageFault {
                address: 0x5000,
                error_code: PF_PRESENT | PF_FETCH
            })
        );
    }

    #[test]
    fn reserved_bits_report_rsvd() {
        let ram = ram();
        tables(&ram, (1 << 50) | 0x9000 | 7);
        let mode = long_mode(0);
        assert_eq!(
            mode.translate(&ram, 0x5000, Access::read(false, false)),
            Err(Fault::PageFault {
                address: 0x5000,
                error_code: PF_PRESENT | PF_RESERVED
            })
        );
    }

    #[test]
    fn thirty_two_bit_paging_with_4m_pages() {
        let ram = ram();
        assert!(ram.write_from(0x1000 + 4, &(0x40_0000u32 | 0x83).to_le_bytes()));
        assert!(ram.write_from(0x1000, &(0x2000u32 | 3).to_le_bytes()));
        assert!(ram.write_from(0x2000 + 4, &(0x7000u32 | 3).to_le_bytes()));
        let mode = PagingMode {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
            physical_bits: 36,
        };
        assert_eq!(
            mode.translate(&ram, 0x41_2345, Access::read(false, false)),
            Ok(0x41_2345)
        );
        assert_eq!(
            mode.translate(&ram, 0x1abc, Access::read(false, false)),
            Ok(0x7abc)
        );
    }
}
