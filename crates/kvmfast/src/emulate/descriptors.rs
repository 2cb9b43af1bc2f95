//! Segment descriptors (SDM Vol. 3A 3.4.5) read from the guest's GDT or LDT, as the
//! CPU reads them when it loads a segment register: implicit supervisor accesses.

use kvm_bindings::kvm_segment;

use super::cpu::CpuState;
use super::exceptions::Fault;
use super::linear::GuestView;
use super::paging::Access;
use super::stop::Stop;

/// A descriptor as read, with the segment register value it produces.
#[derive(Debug, Clone, Copy)]
pub struct Descriptor {
    pub raw: u64,
    pub segment: kvm_segment,
}

impl Descriptor {
    pub fn is_code(&self) -> bool {
        self.segment.s != 0 && self.segment.type_ & 8 != 0
    }

    pub fn is_conforming(&self) -> bool {
        self.is_code() && self.segment.type_ & 4 != 0
    }

    pub fn is_writable_data(&self) -> bool {
        self.segment.s != 0 && self.segment.type_ & 8 == 0 && self.segment.type_ & 2 != 0
    }

    pub fn dpl(&self) -> u8 {
        self.segment.dpl
    }
}

/// Decodes the eight bytes of a code or data descriptor for `selector`.
pub fn segment_from_raw(raw: u64, selector: u16) -> kvm_segment {
    let limit_low = raw & 0xffff;
    let limit_high = (raw >> 48) & 0xf;
    let granular = (raw >> 55) & 1 != 0;
    let mut limit = (limit_high << 16) | limit_low;
    if granular {
        limit = (limit << 12) | 0xfff;
    }
    let base = ((raw >> 16) & 0xff_ffff) | (((raw >> 56) & 0xff) << 24);
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((raw >> 40) & 0xf) as u8,
        s: ((raw >> 44) & 1) as u8,
        dpl: ((raw >> 45) & 3) as u8,
        present: ((raw >> 47) & 1) as u8,
        avl: ((raw >> 52) & 1) as u8,
        l: ((raw >> 53) & 1) as u8,
        db: ((raw >> 54) & 1) as u8,
        g: u8::from(granular),
        unusable: 0,
        padding: 0,
    }
}

/// Reads the descriptor a non-null selector names; #GP(selector) when it lies beyond the
/// table's limit.
pub fn read_descriptor(
    cpu: &CpuState,
    memory: &GuestView<'_>,
    selector: u16,
) -> Result<Descriptor, Stop> {
    let index = u64::from(selector & !7);
    let (base, limit) = if selector & 4 != 0 {
        let ldt = &cpu.sregs.ldt;
        if ldt.unusable != 0 || ldt.present == 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(u32::from(
                selector & !3,
            ))));
        }
        (ldt.base, u64::from(ldt.limit))
    } else {
        (cpu.sregs.gdt.base, u64::from(cpu.sregs.gdt.limit))
    };
    if index + 7 > limit {
        return Err(Stop::Fault(Fault::GeneralProtection(u32::from(
            selector & !3,
        ))));
    }
    let raw = memory.read_u64(base.wrapping_add(index), Access::supervisor(false))?;
    Ok(Descriptor {
        raw,
        segment: segment_from_raw(raw, selector),
    })
}

/// A null selector's segment register: unusable, as KVM reports one.
pub fn null_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        selector,
        unusable: 1,
        ..Default::default()
    }
}

/// Sets the accessed bit of a descriptor that is being loaded (SDM Vol. 3A 3.4.5.1).
pub fn mark_accessed(
    cpu: &CpuState,
    memory: &GuestView<'_>,
    selector: u16,
    descriptor: &Descriptor,
) -> Result<(), Stop> {
    if descriptor.raw & (1 << 40) != 0 {
        return Ok(());
    }
    let base = if selector & 4 != 0 {
        cpu.sregs.ldt.base
    } else {
        cpu.sregs.gdt.base
    };
    let address = base.wrapping_add(u64::from(selector & !7) + 5);
    let byte = ((descriptor.raw >> 40) as u8) | 1;
    memory.write(address, &[byte], Access::supervisor(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_descriptors_decode() {
        let code32 = segment_from_raw(0x00CF_9B00_0000_FFFF, 0x08);
        assert_eq!((code32.base, code32.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code32.type_, code32.s, code32.dpl, code32.db),
            (11, 1, 0, 1)
        );
        let user_data = segment_from_raw(0x00CF_F300_0000_FFFF, 0x23);
        assert_eq!(user_data.dpl, 3);
        let code64 = segment_from_raw(0x00AF_9B00_0000_FFFF, 0x08);
        assert_eq!((code64.l, code64.db), (1, 0));
    }
}
