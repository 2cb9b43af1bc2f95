//! POPCNT, LZCNT and TZCNT (SDM Vol. 2B), computed by the host CPU itself so that every
//! flag, the ones the SDM leaves undefined too, is what this processor produces (the
//! guest sees this processor's CPUID), or by what this processor executes in their
//! place when it lacks them.

use iced_x86::{CpuidFeature, Mnemonic};
use std::arch::asm;

use super::completion::Completion;
use super::cpu::{RFLAGS_STATUS, truncate};
use super::exceptions::Fault;
use super::host_features::HostFeatures;
use super::operands::source_value;
use super::stop::Stop;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    let instruction = c.decoded.instruction;
    let Some(executed) = executed_as(instruction.mnemonic(), HostFeatures::host()) else {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    };
    let destination = instruction.op0_register();
    let size = destination.size();
    let source = source_value(&c.cpu, &c.memory, &c.decoded, 1, size)?;
    let before = c
        .cpu
        .read_register(destination.full_register())
        .unwrap_or(0);
    let flags_in = c.cpu.rflags() & RFLAGS_STATUS;
    let (result, flags_out) = run_on_host(executed, size, source, flags_in, before)
        .ok_or_else(|| Stop::Unsupported(format!("{executed:?} of {size} bytes")))?;
    c.cpu
        .write_register(destination, truncate(result, size))
        .ok_or_else(|| Stop::Unsupported(format!("destination {destination:?}")))?;
    let flags = (c.cpu.rflags() & !RFLAGS_STATUS) | (flags_out & RFLAGS_STATUS);
    c.cpu.set_rflags(flags);
    c.advance();
    Ok(())
}

/// What this processor executes for the instruction, None for #UD. LZCNT and TZCNT
/// are BSR and BSF with an F3 prefix: a processor without them runs BSR and BSF
/// (SDM Vol. 2A "LZCNT", Vol. 2B "TZCNT"); one without POPCNT raises #UD ("POPCNT").
/// The guest sees this processor's CPUID, so that is what its processor does too.
pub fn executed_as(mnemonic: Mnemonic, host: &HostFeatures) -> Option<Mnemonic> {
    let (feature, otherwise) = match mnemonic {
        Mnemonic::Popcnt => (CpuidFeature::POPCNT, None),
        Mnemonic::Lzcnt => (CpuidFeature::LZCNT, Some(Mnemonic::Bsr)),
        Mnemonic::Tzcnt => (CpuidFeature::BMI1, Some(Mnemonic::Bsf)),
        _ => return None,
    };
    if host.has_all(&[feature]) {
        Some(mnemonic)
    } else {
        otherwise
    }
}

/// (result, RFLAGS after) of the instruction on the host with the guest's status flags
/// and destination (which BSR and BSF of zero leave as it was).
pub fn run_on_host(
    mnemonic: Mnemonic,
    size: usize,
    source: u64,
    flags_in: u64,
    destination: u64,
) -> Option<(u64, u64)> {
    macro_rules! host {
        ($insn:literal, $reg:literal) => {{
            let mut result = destination;
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
                    result = inout(reg) result,
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
        (Mnemonic::Bsr, 2) => host!("bsr", ":x"),
        (Mnemonic::Bsr, 4) => host!("bsr", ":e"),
        (Mnemonic::Bsr, 8) => host!("bsr", ":r"),
        (Mnemonic::Bsf, 2) => host!("bsf", ":x"),
        (Mnemonic::Bsf, 4) => host!("bsf", ":e"),
        (Mnemonic::Bsf, 8) => host!("bsf", ":r"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::cpu::{RFLAGS_CF, RFLAGS_ZF};

    #[test]
    fn popcnt_counts_and_sets_zf_only_for_zero() {
        let (count, flags) = run_on_host(Mnemonic::Popcnt, 8, 0xf0f0, RFLAGS_CF, 0).unwrap();
        assert_eq!(count, 8);
        assert_eq!(flags & (RFLAGS_CF | RFLAGS_ZF), 0);
        let (zero, flags) = run_on_host(Mnemonic::Popcnt, 4, 0, 0, 0).unwrap();
        assert_eq!(zero & 0xffff_ffff, 0);
        assert_ne!(flags & RFLAGS_ZF, 0);
    }

    #[test]
    fn lzcnt_and_tzcnt_of_zero_are_the_operand_width() {
        let (lz, flags) = run_on_host(Mnemonic::Lzcnt, 2, 0, 0, 0).unwrap();
        assert_eq!(lz & 0xffff, 16);
        assert_ne!(flags & RFLAGS_CF, 0);
        let (tz, _) = run_on_host(Mnemonic::Tzcnt, 8, 0x100, 0, 0).unwrap();
        assert_eq!(tz, 8);
    }

    #[test]
    fn lzcnt_and_tzcnt_count_from_the_other_end_of_bsr_and_bsf() {
        let (lz, _) = run_on_host(Mnemonic::Lzcnt, 8, 1, 0, 0).unwrap();
        assert_eq!(lz, 63);
        let (lz, flags) = run_on_host(Mnemonic::Lzcnt, 4, 0x8000_0000, 0, 0).unwrap();
        assert_eq!(lz & 0xffff_ffff, 0);
        assert_ne!(flags & RFLAGS_ZF, 0); // ZF: the result is zero
        let (tz, flags) = run_on_host(Mnemonic::Tzcnt, 4, 0, 0, 0).unwrap();
        assert_eq!(tz & 0xffff_ffff, 32);
        assert_ne!(flags & RFLAGS_CF, 0); // CF: the source is zero
        let (bsr, _) = run_on_host(Mnemonic::Bsr, 8, 1, 0, 0).unwrap();
        assert_eq!(bsr, 0);
        let (bsf, _) = run_on_host(Mnemonic::Bsf, 8, 0x100, 0, 0).unwrap();
        assert_eq!(bsf, 8);
    }

    #[test]
    fn bsr_and_bsf_of_zero_set_zf_and_keep_the_destination() {
        let (kept, flags) = run_on_host(Mnemonic::Bsr, 8, 0, 0, 0x1234).unwrap();
        assert_ne!(flags & RFLAGS_ZF, 0);
        assert_eq!(kept, 0x1234);
        let (kept, _) = run_on_host(Mnemonic::Bsf, 8, 0, 0, 0x5678).unwrap();
        assert_eq!(kept, 0x5678);
    }

    #[test]
    fn a_processor_without_the_feature_runs_bsr_bsf_or_raises_ud() {
        let bare = HostFeatures::with(&[]);
        assert_eq!(executed_as(Mnemonic::Popcnt, &bare), None);
        assert_eq!(executed_as(Mnemonic::Lzcnt, &bare), Some(Mnemonic::Bsr));
        assert_eq!(executed_as(Mnemonic::Tzcnt, &bare), Some(Mnemonic::Bsf));
        let full = HostFeatures::with(&[
            CpuidFeature::POPCNT,
            CpuidFeature::LZCNT,
            CpuidFeature::BMI1,
        ]);
        for mnemonic in [Mnemonic::Popcnt, Mnemonic::Lzcnt, Mnemonic::Tzcnt] {
            assert_eq!(executed_as(mnemonic, &full), Some(mnemonic));
        }
        assert_eq!(executed_as(Mnemonic::Add, &full), None);
    }
}
