//! The little of the local APIC's register page that the VMM itself must read.

/// LVT LINT1 register offset in the KVM_GET_LAPIC page (Intel SDM Vol. 3A, Table 11-1).
pub const LVT_LINT1: usize = 0x360;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_NMI: u32 = 0b100;

/// Reads a 32-bit register from a KVM_GET_LAPIC page.
pub fn register(page: &[libc::c_char; 1024], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| page[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Whether raising LINT1 queues an NMI: the LVT entry is unmasked with delivery mode
/// NMI (SDM Vol. 3A, 11.5.1). KVM_NMI does not look (api.rst, KVM_NMI): the VMM must.
pub fn lint1_queues_nmi(lvt: u32) -> bool {
    lvt & LVT_MASKED == 0 && (lvt >> LVT_DELIVERY_MODE_SHIFT) & 0b111 == DELIVERY_MODE_NMI
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unmasked_nmi_entry_queues_an_nmi() {
        assert!(lint1_queues_nmi(0x400));
        assert!(lint1_queues_nmi(0x4ff)); // the vector field is ignored for NMI
        assert!(!lint1_queues_nmi(0x1_0400)); // masked
        assert!(!lint1_queues_nmi(0x700)); // ExtINT
        assert!(!lint1_queues_nmi(0x000)); // fixed
        assert!(!lint1_queues_nmi(0x1_0000)); // reset value
    }

    #[test]
    fn registers_are_little_endian_words() {
        let mut page = [0 as libc::c_char; 1024];
        page[LVT_LINT1] = 0x00;
        page[LVT_LINT1 + 1] = 0x04;
        page[LVT_LINT1 + 2] = 0x01;
        assert_eq!(register(&page, LVT_LINT1), 0x1_0400);
    }
}
