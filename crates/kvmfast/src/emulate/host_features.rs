//! The host processor's features, for the completions that run code on it: every
//! instruction such code executes -- the guest's and the ones around it -- needs its
//! features here, or the VMM would die of SIGILL. The guest sees this processor's
//! CPUID, so one it lacks is one the guest's processor lacks too.

use std::sync::OnceLock;

use iced_x86::CpuidFeature;

/// What every x86-64 processor has (AMD64 baseline): no CPUID bit to check.
const BASELINE: &[CpuidFeature] = &[
    CpuidFeature::INTEL8086,
    CpuidFeature::INTEL186,
    CpuidFeature::INTEL286,
    CpuidFeature::INTEL386,
    CpuidFeature::INTEL486,
    CpuidFeature::X64,
    CpuidFeature::FPU,
    CpuidFeature::CMOV,
    CpuidFeature::SSE,
    CpuidFeature::SSE2,
];

/// A set of processor features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFeatures {
    present: Vec<CpuidFeature>,
}

impl HostFeatures {
    /// This processor's, read (CPUID and, for the AVX families, XGETBV: the state must
    /// be enabled by the host kernel too) once per process.
    pub fn host() -> &'static Self {
        static HOST: OnceLock<HostFeatures> = OnceLock::new();
        HOST.get_or_init(Self::detect)
    }

    /// A given set on top of the baseline (tests: a processor without some feature).
    pub fn with(features: &[CpuidFeature]) -> Self {
        let mut present = BASELINE.to_vec();
        present.extend_from_slice(features);
        Self { present }
    }

    pub fn has_all(&self, features: &[CpuidFeature]) -> bool {
        features
            .iter()
            .all(|feature| self.present.contains(feature))
    }

    fn detect() -> Self {
        use std::arch::is_x86_feature_detected as has;
        let detected = [
            (CpuidFeature::SSE3, has!("sse3")),
            (CpuidFeature::SSSE3, has!("ssse3")),
            (CpuidFeature::SSE4_1, has!("sse4.1")),
            (CpuidFeature::SSE4_2, has!("sse4.2")),
            (CpuidFeature::POPCNT, has!("popcnt")),
            (CpuidFeature::LZCNT, has!("lzcnt")),
            (CpuidFeature::BMI1, has!("bmi1")),
            (CpuidFeature::AES, has!("aes")),
            (CpuidFeature::PCLMULQDQ, has!("pclmulqdq")),
            (CpuidFeature::GFNI, has!("gfni")),
            (CpuidFeature::AVX, has!("avx")),
            (CpuidFeature::AVX2, has!("avx2")),
            (CpuidFeature::FMA, has!("fma")),
            (CpuidFeature::F16C, has!("f16c")),
            (CpuidFeature::VAES, has!("vaes")),
            (CpuidFeature::VPCLMULQDQ, has!("vpclmulqdq")),
            (CpuidFeature::AVX512F, has!("avx512f")),
            (CpuidFeature::AVX512VL, has!("avx512vl")),
            (CpuidFeature::AVX512BW, has!("avx512bw")),
            (CpuidFeature::AVX512DQ, has!("avx512dq")),
            (CpuidFeature::AVX512CD, has!("avx512cd")),
            (CpuidFeature::AVX512_VBMI, has!("avx512vbmi")),
            (CpuidFeature::AVX512_VBMI2, has!("avx512vbmi2")),
            (CpuidFeature::AVX512_IFMA, has!("avx512ifma")),
            (CpuidFeature::AVX512_VNNI, has!("avx512vnni")),
            (CpuidFeature::AVX512_BITALG, has!("avx512bitalg")),
            (CpuidFeature::AVX512_VPOPCNTDQ, has!("avx512vpopcntdq")),
        ];
        let present: Vec<CpuidFeature> = detected
            .into_iter()
            .filter_map(|(feature, present)| present.then_some(feature))
            .collect();
        Self::with(&present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_always_there_and_nothing_else_unless_given() {
        let bare = HostFeatures::with(&[]);
        assert!(bare.has_all(&[CpuidFeature::SSE2, CpuidFeature::X64]));
        assert!(!bare.has_all(&[CpuidFeature::POPCNT]));
        assert!(!bare.has_all(&[CpuidFeature::SSE2, CpuidFeature::AVX]));
        assert!(HostFeatures::with(&[CpuidFeature::AVX]).has_all(&[CpuidFeature::AVX]));
    }

    #[test]
    fn the_host_set_agrees_with_cpuid() {
        let host = HostFeatures::host();
        assert_eq!(
            host.has_all(&[CpuidFeature::AVX512BW]),
            std::arch::is_x86_feature_detected!("avx512bw")
        );
        assert_eq!(
            host.has_all(&[CpuidFeature::POPCNT]),
            std::arch::is_x86_feature_detected!("popcnt")
        );
    }
}
