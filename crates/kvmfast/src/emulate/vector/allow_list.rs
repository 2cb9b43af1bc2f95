//! Which vector instructions may run on the host: pure computations only.
//!
//! Legacy-encoded SSE..SSE4.1, AES-NI and PCLMULQDQ; VEX-encoded AVX, AVX2, FMA, F16C,
//! VAES and VPCLMULQDQ; EVEX-encoded AVX-512 (F, VL, BW, DQ, CD, VBMI, VBMI2, IFMA,
//! VNNI, BITALG, VPOPCNTDQ) and GFNI. Operands: vector or opmask registers, at most one
//! memory operand (no vector index: no gathers or scatters), an imm8 and up to two
//! explicit general registers; iced-x86's register usage must show nothing else, so
//! implicit users of GPRs (PCMPISTRI's ECX, MASKMOVDQU's RDI) stay out.

use iced_x86::{
    CpuidFeature, EncodingKind, Instruction, InstructionInfoFactory, Mnemonic, OpKind, Register,
};

const LEGACY_FEATURES: &[CpuidFeature] = &[
    CpuidFeature::SSE,
    CpuidFeature::SSE2,
    CpuidFeature::SSE3,
    CpuidFeature::SSSE3,
    CpuidFeature::SSE4_1,
    CpuidFeature::AES,
    CpuidFeature::PCLMULQDQ,
    CpuidFeature::GFNI,
];
const VEX_FEATURES: &[CpuidFeature] = &[
    CpuidFeature::AVX,
    CpuidFeature::AVX2,
    CpuidFeature::FMA,
    CpuidFeature::F16C,
    CpuidFeature::AES,
    CpuidFeature::PCLMULQDQ,
    CpuidFeature::VAES,
    CpuidFeature::VPCLMULQDQ,
    CpuidFeature::GFNI,
];
const EVEX_FEATURES: &[CpuidFeature] = &[
    CpuidFeature::AVX512F,
    CpuidFeature::AVX512VL,
    CpuidFeature::AVX512BW,
    CpuidFeature::AVX512DQ,
    CpuidFeature::AVX512CD,
    CpuidFeature::AVX512_VBMI,
    CpuidFeature::AVX512_VBMI2,
    CpuidFeature::AVX512_IFMA,
    CpuidFeature::AVX512_VNNI,
    CpuidFeature::AVX512_BITALG,
    CpuidFeature::AVX512_VPOPCNTDQ,
    CpuidFeature::VAES,
    CpuidFeature::VPCLMULQDQ,
    CpuidFeature::GFNI,
];

/// How many explicit general-register operands the stub can carry (RAX, RDX).
pub const MAX_GPR_OPERANDS: usize = 2;

/// Whether the instruction is a pure vector computation the host may run for the guest.
pub fn allowed(instruction: &Instruction) -> bool {
    let features = instruction.cpuid_features();
    let known: &[&[CpuidFeature]] = match instruction.encoding() {
        EncodingKind::Legacy => &[LEGACY_FEATURES],
        // VEX also encodes the opmask instructions (KMOVW, KORTESTW, ...) of AVX-512.
        EncodingKind::VEX => &[VEX_FEATURES, EVEX_FEATURES],
        EncodingKind::EVEX => &[EVEX_FEATURES],
        _ => return false,
    };
    if features.is_empty()
        || !features
            .iter()
            .all(|f| known.iter().any(|set| set.contains(f)))
    {
        return false;
    }
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Vzeroupper | Mnemonic::Vzeroall
    ) {
        return true;
    }
    if excluded(instruction.mnemonic()) {
        return false;
    }
    let mut memory = 0;
    let mut vector = 0;
    let mut general = Vec::new();
    for index in 0..instruction.op_count() {
        match instruction.op_kind(index) {
            OpKind::Register => {
                let register = instruction.op_register(index);
                if is_vector(register) || register.is_k() {
                    vector += 1;
                } else if register.is_gpr() {
                    general.push(register.full_register());
                } else {
                    return false;
                }
            }
            OpKind::Memory => memory += 1,
            OpKind::Immediate8 => {}
            _ => return false,
        }
    }
    if vector == 0 || memory > 1 || general.len() > MAX_GPR_OPERANDS {
        return false;
    }
    if is_vector(instruction.memory_index()) {
        return false;
    }
    let address = [instruction.memory_base(), instruction.memory_index()]
        .map(|register| register.full_register());
    InstructionInfoFactory::new()
        .info(instruction)
        .used_registers()
        .iter()
        .all(|used| {
            let register = used.register();
            is_vector(register)
                || register.is_k()
                || general.contains(&register.full_register())
                || (memory == 1
                    && (address.contains(&register.full_register())
                        || register.is_segment_register()))
        })
}

/// Instructions of those features that are not pure computations.
fn excluded(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Ldmxcsr
            | Mnemonic::Stmxcsr
            | Mnemonic::Vldmxcsr
            | Mnemonic::Vstmxcsr
            | Mnemonic::Maskmovdqu
            | Mnemonic::Vmaskmovdqu
            | Mnemonic::Vmaskmovps
            | Mnemonic::Vmaskmovpd
            | Mnemonic::Vpmaskmovd
            | Mnemonic::Vpmaskmovq
            | Mnemonic::Monitor
            | Mnemonic::Mwait
            | Mnemonic::Lfence
            | Mnemonic::Mfence
            | Mnemonic::Sfence
            | Mnemonic::Clflush
            | Mnemonic::Prefetchnta
            | Mnemonic::Prefetcht0
            | Mnemonic::Prefetcht1
            | Mnemonic::Prefetcht2
            | Mnemonic::Pause
    )
}

/// Whether the instruction uses AVX-512 state (ZMM16-31, ZMM upper halves, opmasks).
pub fn uses_avx512(instruction: &Instruction) -> bool {
    instruction.encoding() == EncodingKind::EVEX
        || instruction
            .cpuid_features()
            .iter()
            .any(|feature| EVEX_FEATURES.contains(feature) && !VEX_FEATURES.contains(feature))
}

/// An XMM, YMM or ZMM register.
pub fn is_vector(register: Register) -> bool {
    register.is_xmm() || register.is_ymm() || register.is_zmm()
}

/// Whether a misaligned memory operand raises #GP(0): legacy SSE 16-byte operands but
/// the unaligned moves (SDM Vol. 1 11.4.1); VEX and EVEX only the explicitly aligned
/// moves (Vol. 1 14.9, 15.7).
pub fn alignment_required(instruction: &Instruction, size: usize) -> bool {
    let mnemonic = instruction.mnemonic();
    if instruction.encoding() != EncodingKind::Legacy {
        return matches!(
            mnemonic,
            Mnemonic::Vmovdqa
                | Mnemonic::Vmovdqa32
                | Mnemonic::Vmovdqa64
                | Mnemonic::Vmovaps
                | Mnemonic::Vmovapd
                | Mnemonic::Vmovntdq
                | Mnemonic::Vmovntps
                | Mnemonic::Vmovntpd
                | Mnemonic::Vmovntdqa
        );
    }
    size == 16
        && !matches!(
            mnemonic,
            Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Lddqu
        )
}

/// (V)COMIS*, (V)UCOMIS*, (V)PTEST, VTESTP* and KORTEST/KTEST set status flags; nothing
/// else the allow-list takes does.
pub fn writes_flags(instruction: &Instruction) -> bool {
    matches!(
        instruction.mnemonic(),
        Mnemonic::Comiss
            | Mnemonic::Ucomiss
            | Mnemonic::Comisd
            | Mnemonic::Ucomisd
            | Mnemonic::Ptest
            | Mnemonic::Vcomiss
            | Mnemonic::Vucomiss
            | Mnemonic::Vcomisd
            | Mnemonic::Vucomisd
            | Mnemonic::Vptest
            | Mnemonic::Vtestps
            | Mnemonic::Vtestpd
            | Mnemonic::Kortestb
            | Mnemonic::Kortestw
            | Mnemonic::Kortestd
            | Mnemonic::Kortestq
            | Mnemonic::Ktestb
            | Mnemonic::Ktestw
            | Mnemonic::Ktestd
            | Mnemonic::Ktestq
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn pure_computations_only() {
        assert!(allowed(&decode(&[0x66, 0x0f, 0x38, 0x00, 0xc1]))); // pshufb xmm0, xmm1
        assert!(allowed(&decode(&[0x66, 0x0f, 0xfe, 0x06]))); // paddd xmm0, [rsi]
        assert!(allowed(&decode(&[0x66, 0x0f, 0x70, 0xc1, 0x93]))); // pshufd xmm0, xmm1, 0x93
        assert!(!allowed(&decode(&[0x0f, 0x38, 0x00, 0xc1]))); // pshufb mm0, mm1 (MMX)
        assert!(allowed(&decode(&[0x66, 0x0f, 0xd7, 0xc1]))); // pmovmskb eax, xmm1
        assert!(allowed(&decode(&[0xc5, 0xf9, 0x6e, 0xe9]))); // vmovd xmm5, ecx
        assert!(!allowed(&decode(&[0x0f, 0xae, 0x16]))); // ldmxcsr [rsi]
        assert!(!allowed(&decode(&[0x66, 0x0f, 0xf7, 0xc1]))); // maskmovdqu (implicit [rdi])
        assert!(allowed(&decode(&[0xc5, 0xf9, 0xfe, 0xc1]))); // vpaddd xmm0, xmm0, xmm1
        assert!(allowed(&decode(&[0xc5, 0xfa, 0x6f, 0x07]))); // vmovdqu xmm0, [rdi]
        assert!(allowed(&decode(&[0xc5, 0xf8, 0x77]))); // vzeroupper
        assert!(allowed(&decode(&[0x62, 0xf1, 0x7d, 0x48, 0xfe, 0xc1]))); // vpaddd zmm0, zmm0, zmm1
        assert!(allowed(&decode(&[0x62, 0x72, 0x4d, 0x28, 0x76, 0xc7]))); // vpermi2d ymm8, ymm6, ymm7
        assert!(allowed(&decode(&[0xc5, 0xf8, 0x92, 0xc8]))); // kmovw k1, eax
        assert!(!allowed(&decode(&[0x66, 0x0f, 0x3a, 0x63, 0xc1, 0x00]))); // pcmpistri (ECX)
        assert!(!allowed(&decode(&[0xf2, 0x0f, 0x38, 0xf1, 0xc3]))); // crc32 (SSE4.2)
        // vpgatherdd xmm0, [rax + xmm1*4], xmm2: a vector index
        assert!(!allowed(&decode(&[0xc4, 0xe2, 0x69, 0x90, 0x04, 0x88])));
    }

    #[test]
    fn vector_register_numbers_index_the_area() {
        assert_eq!(Register::XMM9.number() % 32, 9);
        assert_eq!(Register::YMM15.number() % 32, 15);
        assert_eq!(Register::ZMM31.number() % 32, 31);
    }
}
