//! POPCNT, LZCNT and TZCNT (SDM Vol. 2B), computed by the host CPU itself so that every
//! flag, the ones the SDM leaves undefined too, is what this processor produces (the
//! guest sees this processor's CPUID).

use iced_x86::Mnemonic;
use std::arch::asm;

use super::cpu::{RFLAGS_STATUS, truncate};
use super::operands::source_value;
use super::{Completion, Stop};

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    let instruction = c.decoded.instruction;
    let destination = instruction.op0_register();
    let size = destination.size();
    let source = source_value(&c.cpu, &c.memory, &c.decoded, 1, size)?;
    let flags_in = c.cpu.rflags() & RFLAGS_STATUS;
    let (result, flags_out) = run_on_host(instruction.mnemonic(), size, source, flags_in)
        .ok_or_else(|| {
            Stop::Unsupported(format!("{:?} of {size} bytes", instruction.mnemonic()))
        })?;
    c.cpu
        .write_register(destination, truncate(result, size))
        .ok_or_else(|| Stop::Unsupported(format!("destination {destination:?}")))?;
    let flags = (c.cpu.rflags() & !RFLAGS_STATUS) | (flags_out & RFLAGS_STATUS);
    c.cpu.set_rflags(flags);
    c.advance();
    Ok(())
}

/// (result, RFLAGS after) of the instruction on the host with the guest's status flags.
pub fn run_on_host(
    mnemonic: Mnemonic,
    size: usize,
    source: u64,
    flags_in: u64,
) -> Option<(u64, u64)> {
    macro_rules! host {
        ($insn:literal, $reg:literal) => {{
            let result: u64;
            let flags: u64;
            // SAFETY: pure register computation; the flags are set from, and read
            // back into, local values through the stack.
            unsafe {
                asm!(
                    "push {flags_in}",
                    "popfq",
                    concat!($insn, " {result", $reg, "}, {source", $reg, "}"),
                    "pushfq",
                    "pop {flags_out}",
                    flags_in = in(reg) flags_in | 2,
                    source = in(reg) source,
                    result = lateout(reg) result,
                    flags_out = lateout(reg) flags,
                );
            }
            Some((result, flags))
        }};
    }
    match (mnemonic, size) {
        (Mnemonic::Popcnt, 2) => host!("popcnt", ":x"),
        (Mnemonic::Popcnt, 4) => host!("popcnt", ":e"),
        (Mnemonic::Popcnt, 8) => host!("popcnt", ":r"),
        (Mnemonic::Lzcnt, 2) => host!("lzcnt", ":x"),
        (Mnemonic::Lzcnt, 4) => host!("lzcnt", ":e"),
        (Mnemonic::Lzcnt, 8) => host!("lzcnt", ":r"),
        (Mnemonic::Tzcnt, 2) => host!("tzcnt", ":x"),
        (Mnemonic::Tzcnt, 4) => host!("tzcnt", ":e"),
        (Mnemonic::Tzcnt, 8) => host!("tzcnt", ":r"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::cpu::{RFLAGS_CF, RFLAGS_ZF};

    #[test]
    fn popcnt_counts_and_sets_zf_only_for_zero() {
        let (count, flags) = run_on_host(Mnemonic::Popcnt, 8, 0xf0f0, RFLAGS_CF).unwrap();
        assert_eq!(count, 8);
        assert_eq!(flags & (RFLAGS_CF | RFLAGS_ZF), 0);
        let (zero, flags) = run_on_host(Mnemonic::Popcnt, 4, 0, 0).unwrap();
        assert_eq!(zero & 0xffff_ffff, 0);
        assert_ne!(flags & RFLAGS_ZF, 0);
    }

    #[test]
    fn lzcnt_and_tzcnt_of_zero_are_the_operand_width() {
        let (lz, flags) = run_on_host(Mnemonic::Lzcnt, 2, 0, 0).unwrap();
        assert_eq!(lz & 0xffff, 16);
        assert_ne!(flags & RFLAGS_CF, 0);
        let (tz, _) = run_on_host(Mnemonic::Tzcnt, 8, 0x100, 0).unwrap();
        assert_eq!(tz, 8);
    }
}
