//! The guest's vector state between the XSAVE area (SDM Vol. 1 13.4: XMM in the legacy
//! region, upper YMM halves in component 2, opmasks in 5, ZMM0-15 upper halves in 6,
//! ZMM16-31 in 7; offsets from CPUID leaf 0DH, which the guest shares with the host)
//! and the stub's Exchange.

use super::super::fpu_state::{FEATURE_AVX, FEATURE_SSE, XsaveArea};
use super::stub::{Exchange, Width};

const OPMASK: u32 = 5;
const ZMM_HI256: u32 = 6;
const HI16_ZMM: u32 = 7;
const AVX: u32 = 2;

use super::super::xstate_layout::offset;

/// The parts of register n's state: (area offset, exchange range) pairs.
fn slices(width: Width, n: usize) -> Vec<(u32, usize, std::ops::Range<usize>)> {
    let mut parts = Vec::new();
    if n < 16 {
        parts.push((
            FEATURE_SSE.trailing_zeros(),
            super::super::fpu_state::XMM_OFFSET + 16 * n,
            0..16,
        ));
        if width != Width::Xmm {
            parts.push((AVX, offset(AVX) + 16 * n, 16..32));
        }
        if width == Width::Zmm {
            parts.push((ZMM_HI256, offset(ZMM_HI256) + 32 * n, 32..64));
        }
    } else if width == Width::Zmm {
        parts.push((HI16_ZMM, offset(HI16_ZMM) + 64 * (n - 16), 0..64));
    }
    parts
}

/// Copies the state a stub of `width` uses from the area into the exchange.
pub fn load(area: &XsaveArea, width: Width, exchange: &mut Exchange) {
    for n in 0..32 {
        for (_, at, range) in slices(width, n) {
            let length = range.len();
            if at + length <= area.bytes.len() {
                exchange.zmm[n][range].copy_from_slice(&area.bytes[at..at + length]);
            }
        }
    }
    if width == Width::Zmm {
        let base = offset(OPMASK);
        for (n, k) in exchange.k.iter_mut().enumerate() {
            *k = area.u64_at(base + 8 * n);
        }
    }
}

/// Copies the exchange back; true when the area changed. Components written get their
/// XSTATE_BV bit (their state is what the area holds).
pub fn store(area: &mut XsaveArea, width: Width, exchange: &Exchange) -> bool {
    let mut changed = false;
    let mut bv = area.xstate_bv();
    for n in 0..32 {
        for (component, at, range) in slices(width, n) {
            let length = range.len();
            if at + length > area.bytes.len() {
                continue;
            }
            if area.bytes[at..at + length] != exchange.zmm[n][range.clone()] {
                area.bytes[at..at + length].copy_from_slice(&exchange.zmm[n][range]);
                bv |= 1 << component;
                changed = true;
            }
        }
    }
    if width == Width::Zmm {
        let base = offset(OPMASK);
        for (n, &k) in exchange.k.iter().enumerate() {
            if area.u64_at(base + 8 * n) != k {
                area.set_u64(base + 8 * n, k);
                bv |= 1 << OPMASK;
                changed = true;
            }
        }
    }
    if changed {
        area.set_xstate_bv(bv | FEATURE_SSE | if width == Width::Xmm { 0 } else { FEATURE_AVX });
    }
    changed
}

/// A VEX instruction zeroes its destinations above bit 255 (SDM Vol. 1 14.1.3): in the
/// ZMM_Hi256 component when the guest has AVX-512 state. True when that changed it.
pub fn clear_above_ymm(area: &mut XsaveArea, written: &[usize]) -> bool {
    if area.xstate_bv() & (1 << ZMM_HI256) == 0 {
        return false;
    }
    let base = offset(ZMM_HI256);
    let mut changed = false;
    for &n in written.iter().filter(|&&n| n < 16) {
        let at = base + 32 * n;
        if at + 32 <= area.bytes.len() && area.bytes[at..at + 32].iter().any(|&b| b != 0) {
            area.bytes[at..at + 32].fill(0);
            changed = true;
        }
    }
    changed
}

/// XCR0 bits a width needs (SDM Vol. 1 13.3: SSE|AVX for VEX, and opmask, ZMM_Hi256
/// and Hi16_ZMM for EVEX).
pub fn required_xcr0(width: Width) -> u64 {
    match width {
        Width::Xmm => 0,
        Width::Ymm => FEATURE_SSE | FEATURE_AVX,
        Width::Zmm => {
            FEATURE_SSE | FEATURE_AVX | (1 << OPMASK) | (1 << ZMM_HI256) | (1 << HI16_ZMM)
        }
    }
}
