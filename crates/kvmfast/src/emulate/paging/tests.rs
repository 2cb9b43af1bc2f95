//! The walk against the paging chapter of the SDM (Vol. 3A chapter 4), on page tables
//! in a plain buffer; one test runs it on guest RAM (the atomic accessors).

use std::cell::RefCell;
use std::sync::Arc;

use super::*;
use crate::memory::{Mapping, RamRegion};

/// Physical memory from address 0: the paging structures of one test.
struct Buffer {
    bytes: RefCell<Vec<u8>>,
}

impl Buffer {
    fn new() -> Self {
        Self {
            bytes: RefCell::new(vec![0; 0x10_0000]),
        }
    }

    fn put(&self, address: u64, value: u64) {
        let at = address as usize;
        self.bytes.borrow_mut()[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn put32(&self, address: u64, value: u32) {
        let at = address as usize;
        self.bytes.borrow_mut()[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn get(&self, address: u64) -> u64 {
        self.load(address, EntrySize::Eight).unwrap()
    }

    fn get32(&self, address: u64) -> u64 {
        self.load(address, EntrySize::Four).unwrap()
    }
}

impl PageTables for Buffer {
    fn load(&self, address: u64, size: EntrySize) -> Option<u64> {
        let n = size.bytes();
        assert_eq!(address % n as u64, 0, "entries are naturally aligned");
        let bytes = self.bytes.borrow();
        let slice = bytes.get(address as usize..address as usize + n)?;
        let mut value = [0u8; 8];
        value[..n].copy_from_slice(slice);
        Some(u64::from_le_bytes(value))
    }

    fn set_bits(&self, address: u64, size: EntrySize, bits: u64) {
        let Some(old) = self.load(address, size) else {
            return;
        };
        let n = size.bytes();
        let at = address as usize;
        self.bytes.borrow_mut()[at..at + n].copy_from_slice(&(old | bits).to_le_bytes()[..n]);
    }
}

fn pf(address: u64, error_code: u32) -> Result<u64, Fault> {
    Err(Fault::PageFault {
        address,
        error_code,
    })
}

fn read() -> Access {
    Access::read(false, false)
}

fn write() -> Access {
    Access::write(false, false)
}

fn fetch(user: bool) -> Access {
    Access {
        fetch: true,
        user,
        ..Access::default()
    }
}

const PE: u64 = 1;

fn long_mode(cr4: u64) -> PagingMode {
    PagingMode {
        cr0: CR0_PG | CR0_WP | PE,
        cr3: 0x1000,
        cr4: CR4_PAE | cr4,
        efer: EFER_LMA | EFER_NXE,
        physical_bits: 46,
    }
}

/// 4-level tables: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; PT[5] is
/// `pte` (linear 0x5000), PD[1] a 2 MiB page at 0x60_0000 (linear 0x20_0000) and
/// PDPT[1] a 1 GiB page at 0x8000_0000 (linear 0x4000_0000), all user and writable.
fn four_level(pte: u64) -> Buffer {
    let m = Buffer::new();
    m.put(0x1000, 0x2000 | 7);
    m.put(0x2000, 0x3000 | 7);
    m.put(0x2008, 0x8000_0000 | PS | 7);
    m.put(0x3000, 0x4000 | 7);
    m.put(0x3008, 0x60_0000 | PS | 7);
    m.put(0x4000 + 5 * 8, pte);
    m
}

/// PAE paging (CR4.PAE, no IA-32e mode): CR3 = 0x7020 holds four PDPTEs (32-byte
/// aligned, SDM Vol. 3A 4.4.1); PDPTE[0] -> PD 0x8000 -> PT 0x9000; PT[5] is `pte`
/// (linear 0x5000) and PD[1] a 2 MiB page at 0x40_0000 (linear 0x20_0000).
fn pae_mode(efer: u64) -> PagingMode {
    PagingMode {
        cr0: CR0_PG | CR0_WP | PE,
        cr3: 0x7020,
        cr4: CR4_PAE,
        efer,
        physical_bits: 46,
    }
}

fn pae_tables(pdpte: u64, pte: u64) -> Buffer {
    let m = Buffer::new();
    m.put(0x7020, pdpte);
    m.put(0x8000, 0x9000 | 7);
    m.put(0x8008, 0x40_0000 | PS | 7);
    m.put(0x9000 + 5 * 8, pte);
    m
}

/// 32-bit paging: page directory 0xb000; PDE[0] -> PT 0xc000 whose PTE[1] maps linear
/// 0x1000 to 0x7000; PDE[1] is `pde1` (linear 0x40_0000).
fn thirty_two_bit(cr4: u64, efer: u64) -> PagingMode {
    PagingMode {
        cr0: CR0_PG | CR0_WP | PE,
        cr3: 0xb000,
        cr4,
        efer,
        physical_bits: 36,
    }
}

fn thirty_two_bit_tables(pde1: u32) -> Buffer {
    let m = Buffer::new();
    m.put32(0xb000, 0xc000 | 7);
    m.put32(0xb004, pde1);
    m.put32(0xc004, 0x7000 | 7);
    m
}

#[test]
fn paging_off_is_identity_on_32_bits() {
    let m = Buffer::new();
    let mode = PagingMode {
        cr0: PE,
        ..long_mode(0)
    };
    assert_eq!(mode.translate(&m, 0x1_2345_6789, read()), Ok(0x2345_6789));
}

/// SDM Vol. 3A 4.5.4, Figures 4-8 to 4-10: 4 KiB, 2 MiB and 1 GiB pages.
#[test]
fn four_level_4k_2m_and_1g_pages() {
    let m = four_level(0x9000 | 7);
    let mode = long_mode(0);
    assert_eq!(mode.translate(&m, 0x5123, read()), Ok(0x9123));
    assert_eq!(mode.translate(&m, 0x21_2345, read()), Ok(0x61_2345));
    assert_eq!(mode.translate(&m, 0x7abc_def0, read()), Ok(0xbabc_def0));
}

/// SDM Vol. 3A 4.5.4: with CR4.LA57 a PML5 table (bits 56:48 of the address) comes
/// first; without it those bits select nothing.
#[test]
fn five_level_paging_starts_at_the_pml5() {
    let m = four_level(0x9000 | 7);
    m.put(0xe000 + 8, 0x1000 | 7); // PML5[1] -> the PML4
    let mode = PagingMode {
        cr3: 0xe000,
        ..long_mode(CR4_LA57)
    };
    assert_eq!(mode.translate(&m, (1 << 48) | 0x5123, read()), Ok(0x9123));
    assert_eq!(mode.translate(&m, 0x5123, read()), pf(0x5123, 0));
    assert_eq!(m.get(0xe008) & A, A);
}

/// SDM Vol. 3A 4.4.2, Figures 4-5 and 4-6.
#[test]
fn pae_4k_and_2m_pages() {
    let m = pae_tables(0x8000 | P, 0xa000 | 7);
    let mode = pae_mode(0);
    assert_eq!(mode.translate(&m, 0x5123, read()), Ok(0xa123));
    assert_eq!(mode.translate(&m, 0x21_2345, read()), Ok(0x41_2345));
    // Bits 31:30 select the PDPTE: PDPTE[3] is not present.
    assert_eq!(mode.translate(&m, 0xc000_5000, read()), pf(0xc000_5000, 0));
}

/// A PAE PDPTE has no A bit (bit 5 is reserved, SDM Vol. 3A Table 4-8; AMD APM Vol. 2
/// 5.4.1): the walk sets A in the PDE and PTE only, and a second walk through the same
/// PDPTE still succeeds.
#[test]
fn pae_walk_leaves_the_pdpte_alone() {
    let m = pae_tables(0x8000 | P, 0xa000 | 7);
    let mode = pae_mode(0);
    assert_eq!(mode.translate(&m, 0x5000, write()), Ok(0xa000));
    assert_eq!(m.get(0x7020), 0x8000 | P);
    assert_eq!(m.get(0x8000) & (A | D), A);
    assert_eq!(m.get(0x9028) & (A | D), A | D);
    assert_eq!(mode.translate(&m, 0x5000, read()), Ok(0xa000));
    assert_eq!(mode.translate(&m, 0x20_0000, write()), Ok(0x40_0000));
    assert_eq!(m.get(0x7020), 0x8000 | P);
    assert_eq!(m.get(0x8008) & (A | D), A | D);
}

/// SDM Vol. 3A Table 4-8: PDPTE bits 2:1, 8:5 and 63:MAXPHYADDR are reserved.
#[test]
fn pae_pdpte_reserved_bits() {
    let mode = pae_mode(EFER_NXE);
    for bit in [1, 2, 5, 6, 7, 8, 46, 52, 62, 63] {
        let m = pae_tables(0x8000 | P | (1 << bit), 0xa000 | 7);
        assert_eq!(
            mode.translate(&m, 0x5000, read()),
            pf(0x5000, PF_PRESENT | PF_RESERVED),
            "PDPTE bit {bit}"
        );
    }
}

/// SDM Vol. 3A 4.4.2 and Tables 4-9 to 4-11: in PAE PDEs and PTEs bits 62:MAXPHYADDR
/// are reserved (in the 4-level formats only 51:MAXPHYADDR: 62:52 are ignored there).
#[test]
fn pae_entries_reserve_bits_up_to_62() {
    let mode = pae_mode(EFER_NXE);
    let m = pae_tables(0x8000 | P, (1 << 55) | 0xa000 | 7);
    assert_eq!(
        mode.translate(&m, 0x5000, read()),
        pf(0x5000, PF_PRESENT | PF_RESERVED)
    );
    let m = four_level((1 << 55) | 0x9000 | 7);
    assert_eq!(long_mode(0).translate(&m, 0x5000, read()), Ok(0x9000));
}

/// SDM Vol. 3A 4.3, Figure 4-2 and 4-3: two levels of 4-byte entries; 4 MiB pages
/// only with CR4.PSE (PS is ignored without it).
#[test]
fn thirty_two_bit_4k_and_4m_pages() {
    let m = thirty_two_bit_tables(0x40_0000 | 0x87);
    let pse = thirty_two_bit(CR4_PSE, 0);
    assert_eq!(pse.translate(&m, 0x1abc, read()), Ok(0x7abc));
    assert_eq!(pse.translate(&m, 0x41_2345, read()), Ok(0x41_2345));
    // Without PSE the same PDE points at a page table at 0x40_0000 (zero: not present).
    let no_pse = thirty_two_bit(0, 0);
    assert_eq!(no_pse.translate(&m, 0x41_2345, read()), pf(0x41_2345, 0));
}

/// SDM Vol. 3A Table 4-4 (PSE-36): PDE bits 20:13 are physical bits 39:32; bit 21 and
/// the bits for addresses at or above min(MAXPHYADDR, 40) are reserved.
#[test]
fn thirty_two_bit_4m_page_high_address_bits() {
    let mode = PagingMode {
        physical_bits: 40,
        ..thirty_two_bit(CR4_PSE, 0)
    };
    let m = thirty_two_bit_tables(0x40_0000 | (0x81 << 13) | 0x87);
    assert_eq!(mode.translate(&m, 0x40_0010, read()), Ok(0x81_0040_0010));
    let m = thirty_two_bit_tables(0x40_0000 | (1 << 21) | 0x87);
    assert_eq!(
        mode.translate(&m, 0x40_0010, write()),
        pf(0x40_0010, PF_PRESENT | PF_RESERVED | PF_WRITE)
    );
    // MAXPHYADDR 36: bits 20:17 (physical 39:36) are reserved too.
    let m = thirty_two_bit_tables(0x40_0000 | (1 << 17) | 0x87);
    assert_eq!(
        thirty_two_bit(CR4_PSE, 0).translate(&m, 0x40_0010, read()),
        pf(0x40_0010, PF_PRESENT | PF_RESERVED)
    );
    assert_eq!(mode.translate(&m, 0x40_0010, read()), Ok(0x10_0040_0010));
}

/// SDM Vol. 3A 4.8: A in every paging-structure entry used, D only in the entry that
/// maps the page and only on a write; nothing for an access that faults.
#[test]
fn accessed_and_dirty_bits() {
    let m = four_level(0x9000 | 7);
    let mode = long_mode(0);
    mode.translate(&m, 0x5000, read()).unwrap();
    for entry in [0x1000, 0x2000, 0x3000, 0x4028] {
        assert_eq!(m.get(entry) & (A | D), A, "entry {entry:#x} after a read");
    }
    mode.translate(&m, 0x5000, write()).unwrap();
    for entry in [0x1000, 0x2000, 0x3000] {
        assert_eq!(
            m.get(entry) & (A | D),
            A,
            "non-leaf {entry:#x} after a write"
        );
    }
    assert_eq!(m.get(0x4028) & (A | D), A | D);
    // Large pages: D in the PDE / PDPTE that maps them.
    mode.translate(&m, 0x20_0000, write()).unwrap();
    assert_eq!(m.get(0x3008) & (A | D), A | D);
    mode.translate(&m, 0x4000_0000, write()).unwrap();
    assert_eq!(m.get(0x2008) & (A | D), A | D);

    // A write refused by CR0.WP sets neither bit.
    let m = four_level(0x9000 | 5);
    assert!(mode.translate(&m, 0x5000, write()).is_err());
    assert_eq!(m.get(0x1000) & A, 0);
    assert_eq!(m.get(0x4028) & (A | D), 0);

    // 32-bit paging: the same rules on 4-byte entries.
    let m = thirty_two_bit_tables(0);
    thirty_two_bit(0, 0).translate(&m, 0x1000, write()).unwrap();
    assert_eq!(m.get32(0xb000) & (A | D), A);
    assert_eq!(m.get32(0xc004) & (A | D), A | D);
}

/// SDM Vol. 3A 4.6.2: with EFER.NXE an XD bit at any level forbids fetches; 4.7: such
/// a #PF has P and I/D set. Reads are not affected.
#[test]
fn execute_disable_with_nxe() {
    let mode = long_mode(0);
    let m = four_level(XD | 0x9000 | 7);
    assert_eq!(mode.translate(&m, 0x5000, read()), Ok(0x9000));
    assert_eq!(
        mode.translate(&m, 0x5000, fetch(false)),
        pf(0x5000, PF_PRESENT | PF_FETCH)
    );
    assert_eq!(
        mode.translate(&m, 0x5000, fetch(true)),
        pf(0x5000, PF_PRESENT | PF_USER | PF_FETCH)
    );
    let m = four_level(0x9000 | 7);
    m.put(0x2000, XD | 0x3000 | 7); // XD in the PDPTE covers the page below it
    assert_eq!(
        mode.translate(&m, 0x5000, fetch(false)),
        pf(0x5000, PF_PRESENT | PF_FETCH)
    );
    // PAE paging has XD too (SDM Vol. 3A Table 4-11).
    let m = pae_tables(0x8000 | P, XD | 0xa000 | 7);
    assert_eq!(
        pae_mode(EFER_NXE).translate(&m, 0x5000, fetch(false)),
        pf(0x5000, PF_PRESENT | PF_FETCH)
    );
}

/// SDM Vol. 3A 4.5.4 / 4.4.2: with EFER.NXE = 0 bit 63 is reserved; a fetch fault then
/// has no I/D bit unless CR4.SMEP is set (4.7).
#[test]
fn execute_disable_bit_is_reserved_without_nxe() {
    let m = four_level(XD | 0x9000 | 7);
    let mode = PagingMode {
        efer: EFER_LMA,
        ..long_mode(0)
    };
    assert_eq!(
        mode.translate(&m, 0x5000, read()),
        pf(0x5000, PF_PRESENT | PF_RESERVED)
    );
    assert_eq!(
        mode.translate(&m, 0x5000, fetch(false)),
        pf(0x5000, PF_PRESENT | PF_RESERVED)
    );
    let smep = PagingMode {
        efer: EFER_LMA,
        ..long_mode(CR4_SMEP)
    };
    assert_eq!(
        smep.translate(&m, 0x5000, fetch(false)),
        pf(0x5000, PF_PRESENT | PF_RESERVED | PF_FETCH)
    );
    let m = pae_tables(0x8000 | P, XD | 0xa000 | 7);
    assert_eq!(
        pae_mode(0).translate(&m, 0x5000, read()),
        pf(0x5000, PF_PRESENT | PF_RESERVED)
    );
}

/// SDM Vol. 3A 4.7: I/D is set only with CR4.SMEP, or with NXE under PAE or 4/5-level
/// paging; 32-bit paging with EFER.NXE (and no SMEP) reports no I/D.
#[test]
fn fetch_bit_in_the_error_code() {
    let m = thirty_two_bit_tables(0);
    let nxe = thirty_two_bit(0, EFER_NXE);
    assert_eq!(nxe.translate(&m, 0x80_0000, fetch(false)), pf(0x80_0000, 0));
    let smep = thirty_two_bit(CR4_SMEP, EFER_NXE);
    assert_eq!(
        smep.translate(&m, 0x80_0000, fetch(false)),
        pf(0x80_0000, PF_FETCH)
    );
    let m = pae_tables(0x8000 | P, 0);
    assert_eq!(
        pae_mode(0).translate(&m, 0x5000, fetch(true)),
        pf(0x5000, PF_USER)
    );
    assert_eq!(
        pae_mode(EFER_NXE).translate(&m, 0x5000, fetch(true)),
        pf(0x5000, PF_USER | PF_FETCH)
    );
}

/// SDM Vol. 3A 4.6.1: supervisor writes to a read-only page succeed with CR0.WP = 0
/// and fault with CR0.WP = 1 (R/W = 0 at any level counts); user writes always fault.
#[test]
fn cr0_wp_governs_supervisor_writes() {
    let wp = long_mode(0);
    let no_wp = PagingMode {
        cr0: CR0_PG | PE,
        ..wp
    };
    let m = four_level(0x9000 | 5); // user, read-only
    assert_eq!(
        wp.translate(&m, 0x5008, write()),
        pf(0x5008, PF_PRESENT | PF_WRITE)
    );
    assert_eq!(no_wp.translate(&m, 0x5008, write()), Ok(0x9008));
    assert_eq!(m.get(0x4028) & D, D);
    assert_eq!(
        no_wp.translate(&m, 0x5008, Access::write(true, false)),
        pf(0x5008, PF_PRESENT | PF_WRITE | PF_USER)
    );
    let m = four_level(0x9000 | 7);
    m.put(0x3000, 0x4000 | 5); // read-only in the PDE
    assert_eq!(
        wp.translate(&m, 0x5008, write()),
        pf(0x5008, PF_PRESENT | PF_WRITE)
    );
    assert_eq!(no_wp.translate(&m, 0x5008, write()), Ok(0x9008));
    // 32-bit paging follows the same rule.
    let m = thirty_two_bit_tables(0);
    m.put32(0xc004, 0x7000 | 5);
    let mode = thirty_two_bit(0, 0);
    assert_eq!(
        mode.translate(&m, 0x1000, write()),
        pf(0x1000, PF_PRESENT | PF_WRITE)
    );
    let mode = PagingMode {
        cr0: CR0_PG | PE,
        ..mode
    };
    assert_eq!(mode.translate(&m, 0x1000, write()), Ok(0x7000));
}

/// SDM Vol. 3A 4.6.1: a user-mode access needs U/S = 1 at every level.
#[test]
fn user_access_needs_user_at_every_level() {
    let mode = long_mode(0);
    let m = four_level(0x9000 | 7);
    assert_eq!(
        mode.translate(&m, 0x5000, Access::read(true, false)),
        Ok(0x9000)
    );
    m.put(0x2000, 0x3000 | 3); // supervisor PDPTE
    assert_eq!(
        mode.translate(&m, 0x5000, Access::read(true, false)),
        pf(0x5000, PF_PRESENT | PF_USER)
    );
    assert_eq!(mode.translate(&m, 0x5000, read()), Ok(0x9000));
    // PAE PDPTEs have no U/S: user access rights come from the PDE and PTE.
    let m = pae_tables(0x8000 | P, 0xa000 | 7);
    assert_eq!(
        pae_mode(0).translate(&m, 0x5000, Access::write(true, false)),
        Ok(0xa000)
    );
}

/// SDM Vol. 3A 4.6.1: SMAP refuses supervisor data accesses to user pages unless they
/// are explicit with EFLAGS.AC = 1 (implicit ones always); SMEP refuses supervisor
/// fetches from user pages; neither affects user-mode accesses.
#[test]
fn smap_and_smep() {
    let m = four_level(0x9000 | 7);
    let mode = long_mode(CR4_SMAP | CR4_SMEP);
    assert_eq!(mode.translate(&m, 0x5000, read()), pf(0x5000, PF_PRESENT));
    assert_eq!(
        mode.translate(&m, 0x5000, Access::read(false, true)),
        Ok(0x9000)
    );
    assert_eq!(
        mode.translate(&m, 0x5000, Access::write(false, true)),
        Ok(0x9000)
    );
    assert_eq!(
        mode.translate(&m, 0x5000, Access::supervisor(true)),
        pf(0x5000, PF_PRESENT | PF_WRITE)
    );
    assert_eq!(
        mode.translate(&m, 0x5000, fetch(false)),
        pf(0x5000, PF_PRESENT | PF_FETCH)
    );
    assert_eq!(mode.translate(&m, 0x5000, fetch(true)), Ok(0x9000));
    assert_eq!(
        mode.translate(&m, 0x5000, Access::read(true, false)),
        Ok(0x9000)
    );
    // SMAP with AC = 1 still honours CR0.WP on a read-only user page.
    let m = four_level(0x9000 | 5);
    assert_eq!(
        mode.translate(&m, 0x5000, Access::write(false, true)),
        pf(0x5000, PF_PRESENT | PF_WRITE)
    );
    // Supervisor pages are untouched by both.
    let m = four_level(0x9000 | 3);
    assert_eq!(mode.translate(&m, 0x5000, read()), Ok(0x9000));
    assert_eq!(mode.translate(&m, 0x5000, fetch(false)), Ok(0x9000));
}

/// SDM Vol. 3A 4.5.4 and 4.7: reserved bits fault with P and RSVD set, plus W/R and
/// U/S of the access; bits above MAXPHYADDR, PS in a PML4E, and address bits below a
/// large page's size (other than PAT) are reserved.
#[test]
fn reserved_bits_fault_with_rsvd() {
    let mode = long_mode(0);
    let m = four_level((1 << 50) | 0x9000 | 7);
    assert_eq!(
        mode.translate(&m, 0x5000, Access::write(true, false)),
        pf(0x5000, PF_PRESENT | PF_RESERVED | PF_WRITE | PF_USER)
    );
    let m = four_level(0x9000 | 7);
    m.put(0x1000, 0x2000 | PS | 7);
    assert_eq!(
        mode.translate(&m, 0x5000, read()),
        pf(0x5000, PF_PRESENT | PF_RESERVED)
    );
    let m = four_level(0x9000 | 7);
    m.put(0x3008, 0x60_0000 | (1 << 13) | PS | 7);
    assert_eq!(
        mode.translate(&m, 0x20_0000, read()),
        pf(0x20_0000, PF_PRESENT | PF_RESERVED)
    );
    m.put(0x2008, 0x8000_0000 | (1 << 21) | PS | 7);
    assert_eq!(
        mode.translate(&m, 0x4000_0000, read()),
        pf(0x4000_0000, PF_PRESENT | PF_RESERVED)
    );
    // PAT (bit 12) of a large page is not an address bit.
    m.put(0x3008, 0x60_0000 | (1 << 12) | PS | 7);
    assert_eq!(mode.translate(&m, 0x20_0010, read()), Ok(0x60_0010));
    // A reserved bit in a PAE 2 MiB PDE.
    let m = pae_tables(0x8000 | P, 0);
    m.put(0x8008, 0x40_0000 | (1 << 20) | PS | 7);
    assert_eq!(
        pae_mode(0).translate(&m, 0x20_0000, read()),
        pf(0x20_0000, PF_PRESENT | PF_RESERVED)
    );
}

/// SDM Vol. 3A 4.7: a not-present entry at any level gives P = 0 with the access's
/// W/R and U/S; tables outside RAM read as not present here.
#[test]
fn not_present_at_each_level() {
    let mode = long_mode(0);
    for (entry, value) in [(0x1000, 0x2006), (0x2000, 0x3006), (0x3000, 0x4006)] {
        let m = four_level(0x9000 | 7);
        m.put(entry, value);
        assert_eq!(
            mode.translate(&m, 0x5000, Access::write(true, false)),
            pf(0x5000, PF_WRITE | PF_USER),
            "entry {entry:#x}"
        );
    }
    let m = four_level(0x9000 | 6);
    assert_eq!(mode.translate(&m, 0x5000, read()), pf(0x5000, 0));
    let m = four_level(0x9000 | 7);
    m.put(0x3000, 0x4000_0000 | 7); // a page table beyond the buffer
    assert_eq!(mode.translate(&m, 0x5000, read()), pf(0x5000, 0));
}

/// The accessors on guest RAM: the walk reads entries there and sets A/D atomically.
#[test]
fn walk_on_guest_ram() {
    let mut ram = GuestRam::default();
    ram.insert(RamRegion {
        guest_phys_addr: 0,
        slot: 0,
        mapping: Arc::new(Mapping::anonymous(1 << 20, false).unwrap()),
    });
    let put = |address: u64, value: u64| assert!(ram.write_from(address, &value.to_le_bytes()));
    put(0x1000, 0x2000 | 7);
    put(0x2000, 0x3000 | 7);
    put(0x3000, 0x4000 | 7);
    put(0x4028, 0x9000 | 7);
    let mode = long_mode(0);
    assert_eq!(mode.translate(&ram, 0x5123, write()), Ok(0x9123));
    let mut pte = [0u8; 8];
    assert!(ram.read_into(0x4028, &mut pte));
    assert_eq!(u64::from_le_bytes(pte), 0x9000 | 7 | A | D);
    assert_eq!(ram.load(0x1000, EntrySize::Eight), Some(0x2000 | 7 | A));
    assert_eq!(ram.load(0x1000, EntrySize::Four), Some(0x2000 | 7 | A));
    assert_eq!(ram.load(1 << 20, EntrySize::Eight), None);
    put(0x3000, (1 << 20) | 7); // a page table outside RAM
    assert_eq!(mode.translate(&ram, 0x5000, read()), pf(0x5000, 0));
}
