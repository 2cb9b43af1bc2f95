//! LAR, LSL, VERR and VERW (SDM Vol. 2A "LAR", 2B "LSL", "VERR/VERW"): what a selector's
//! descriptor allows, answered in ZF without faulting. Linux's paranoid entries (NMI,
//! #DB, #MC) read the CPU number with LSL of the per-CPU GDT entry, and this host's KVM
//! cannot emulate it.

use iced_x86::{Mnemonic, OpKind};

use super::completion::Completion;
use super::cpu::{RFLAGS_ZF, truncate};
use super::descriptors::{Descriptor, read_descriptor};
use super::exceptions::Fault;
use super::operands::source_value;
use super::stop::Stop;

/// System descriptor types LAR accepts (SDM Vol. 2A table 3-57): LDT, 64-bit TSSes and
/// call gate in IA-32e mode; the 16/32-bit TSSes, gates and LDT otherwise.
fn lar_accepts_system(segment_type: u8, long_mode: bool) -> bool {
    if long_mode {
        matches!(segment_type, 2 | 9 | 11 | 12)
    } else {
        matches!(segment_type, 1..=5 | 9 | 11 | 12)
    }
}

/// System descriptor types LSL accepts (SDM Vol. 2B table 3-65): those with a limit.
fn lsl_accepts_system(segment_type: u8, long_mode: bool) -> bool {
    if long_mode {
        matches!(segment_type, 2 | 9 | 11)
    } else {
        matches!(segment_type, 1..=3 | 9 | 11)
    }
}

/// The descriptor when it is visible at the current CPL and the selector's RPL: a null
/// selector, one beyond its table, or a privilege mismatch gives None (ZF = 0).
fn visible_descriptor(c: &Completion<'_>, selector: u16) -> Result<Option<Descriptor>, Stop> {
    if selector & !3 == 0 {
        return Ok(None);
    }
    let descriptor = match read_descriptor(&c.cpu, &c.memory, selector) {
        Ok(descriptor) => descriptor,
        // Beyond the GDT/LDT limit (or no LDT): the instruction answers ZF = 0.
        Err(Stop::Fault(Fault::GeneralProtection(_))) => return Ok(None),
        Err(stop) => return Err(stop),
    };
    let rpl = (selector & 3) as u8;
    if !descriptor.is_conforming() && (descriptor.dpl() < c.cpu.cpl() || descriptor.dpl() < rpl) {
        return Ok(None);
    }
    Ok(Some(descriptor))
}

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    if !c.cpu.protected_mode() || c.cpu.virtual_8086() {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    let instruction = c.decoded.instruction;
    let mnemonic = instruction.mnemonic();
    let source_index = if matches!(mnemonic, Mnemonic::Verr | Mnemonic::Verw) {
        0
    } else {
        1
    };
    // The selector is the low 16 bits of a register, or a 16-bit memory operand.
    let size = if instruction.op_kind(source_index) == OpKind::Memory {
        2
    } else {
        instruction.op_register(source_index).size()
    };
    let selector = truncate(
        source_value(&c.cpu, &c.memory, &c.decoded, source_index, size)?,
        2,
    ) as u16;
    let long_mode = c.cpu.long_mode();
    let answer = visible_descriptor(c, selector)?.and_then(|descriptor| {
        let segment = descriptor.segment;
        let system = segment.s == 0;
        match mnemonic {
            Mnemonic::Lar if !system || lar_accepts_system(segment.type_, long_mode) => {
                Some(Some((descriptor.raw >> 32) & 0x00f0_ff00))
            }
            Mnemonic::Lsl if !system || lsl_accepts_system(segment.type_, long_mode) => {
                Some(Some(u64::from(segment.limit)))
            }
            // Readable: data, or code with the R bit.
            Mnemonic::Verr if !system && (!descriptor.is_code() || segment.type_ & 2 != 0) => {
                Some(None)
            }
            Mnemonic::Verw if descriptor.is_writable_data() => Some(None),
            _ => None,
        }
    });
    let flags = c.cpu.rflags() & !RFLAGS_ZF;
    match answer {
        Some(value) => {
            if let Some(value) = value {
                let destination = instruction.op0_register();
                let value = if destination.size() == 2 {
                    value & 0xffff
                } else {
                    value
                };
                c.cpu
                    .write_register(destination, value)
                    .ok_or_else(|| Stop::Unsupported(format!("destination {destination:?}")))?;
            }
            c.cpu.set_rflags(flags | RFLAGS_ZF);
        }
        None => c.cpu.set_rflags(flags),
    }
    c.advance();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_accepts_only_64_bit_system_descriptors() {
        assert!(lsl_accepts_system(9, true) && lsl_accepts_system(2, true));
        assert!(!lsl_accepts_system(1, true) && !lsl_accepts_system(12, true));
        assert!(lsl_accepts_system(1, false) && lsl_accepts_system(3, false));
        assert!(lar_accepts_system(12, true) && !lar_accepts_system(4, true));
        assert!(lar_accepts_system(4, false) && !lar_accepts_system(14, false));
    }
}
