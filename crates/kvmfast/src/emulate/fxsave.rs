//! LDMXCSR/STMXCSR and FXSAVE/FXRSTOR (SDM Vol. 2A/2B, Vol. 1 10.5.1) over the vCPU's
//! XSAVE area.

use iced_x86::Mnemonic;

use super::completion::Completion;
use super::cpu::CR4_OSFXSR;
use super::exceptions::Fault;
use super::fpu_state::{FEATURE_SSE, FEATURE_X87, XsaveArea, check_device_available};
use super::linear::{Intent, alignment_check, data_access};
use super::operands::memory_operand;
use super::stop::Stop;

const FXSAVE_SIZE: usize = 512;
/// Bytes 0..160 hold the x87 state and MXCSR; XMM registers follow, 16 bytes each.
const XMM_END_64: usize = 416;
const XMM_END_32: usize = 288;

pub fn complete_mxcsr(c: &mut Completion<'_>) -> Result<(), Stop> {
    if c.cpu.sregs.cr4 & CR4_OSFXSR == 0 {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    check_device_available(&c.cpu)?;
    let operand = memory_operand(&c.cpu, &c.decoded)?;
    let load = c.decoded.instruction.mnemonic() == Mnemonic::Ldmxcsr;
    let intent = if load { Intent::Read } else { Intent::Write };
    let linear = operand.linear(&c.cpu, 0, 4, intent)?;
    alignment_check(&c.cpu, linear, 4).map_err(Stop::Fault)?;
    let mut area = XsaveArea::load(c.cpu.fd)?;
    if load {
        let value = c.memory.read_value(linear, 4, data_access(&c.cpu, false))? as u32;
        // "#GP(0) For an attempt to set reserved bits in MXCSR."
        if value & !c.quirks.mxcsr_mask != 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(0)));
        }
        area.set_mxcsr(value);
        // KVM takes MXCSR from the area only when a component that uses it is marked
        // in use; marking SSE changes nothing architectural (its registers are there).
        area.set_xstate_bv(area.xstate_bv() | FEATURE_SSE);
        area.store(c.cpu.fd)?;
    } else {
        c.memory.write_value(
            linear,
            4,
            u64::from(area.mxcsr()),
            data_access(&c.cpu, true),
        )?;
    }
    c.advance();
    Ok(())
}

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    check_device_available(&c.cpu)?;
    let mnemonic = c.decoded.instruction.mnemonic();
    let wide = matches!(mnemonic, Mnemonic::Fxsave64 | Mnemonic::Fxrstor64);
    let save = matches!(mnemonic, Mnemonic::Fxsave | Mnemonic::Fxsave64);
    let operand = memory_operand(&c.cpu, &c.decoded)?;
    let intent = if save { Intent::Write } else { Intent::Read };
    let linear = operand.linear(&c.cpu, 0, FXSAVE_SIZE, intent)?;
    // "#GP(0) If a memory operand is not aligned on a 16-byte boundary."
    if linear % 16 != 0 {
        return Err(Stop::Fault(Fault::GeneralProtection(0)));
    }
    let xmm_end = if c.cpu.bitness() == 64 {
        XMM_END_64
    } else {
        XMM_END_32
    };
    let mut area = XsaveArea::load(c.cpu.fd)?;
    if save {
        let image = save_image(&area.bytes[..xmm_end], c.quirks.mxcsr_mask, wide);
        c.memory.write(linear, &image, data_access(&c.cpu, true))?;
    } else {
        let mut image = vec![0u8; xmm_end];
        c.memory
            .read(linear, &mut image, data_access(&c.cpu, false))?;
        restore_image(
            &mut area.bytes[..xmm_end],
            &image,
            c.quirks.mxcsr_mask,
            wide,
        )
        .map_err(Stop::Fault)?;
        area.set_xstate_bv(area.xstate_bv() | FEATURE_X87 | FEATURE_SSE);
        area.store(c.cpu.fd)?;
    }
    c.advance();
    Ok(())
}

/// The FXSAVE image of the area's legacy region (as far as the XMM registers the mode
/// has): MXCSR_MASK the processor's, the x87 pointers narrowed for the form without
/// REX.W.
fn save_image(legacy: &[u8], mxcsr_mask: u32, wide: bool) -> Vec<u8> {
    let mut image = legacy.to_vec();
    image[28..32].copy_from_slice(&mxcsr_mask.to_le_bytes());
    if !wide {
        narrow_pointers(&mut image);
    }
    image
}

/// Loads an FXRSTOR image into the area's legacy region of the same length. "#GP(0)
/// ... an attempt to set reserved bits in MXCSR" leaves it untouched; MXCSR_MASK is
/// not loaded (the area keeps the processor's).
fn restore_image(
    legacy: &mut [u8],
    image: &[u8],
    mxcsr_mask: u32,
    wide: bool,
) -> Result<(), Fault> {
    let mxcsr = u32::from_le_bytes([image[24], image[25], image[26], image[27]]);
    if mxcsr & !mxcsr_mask != 0 {
        return Err(Fault::GeneralProtection(0));
    }
    let mut image = image.to_vec();
    if !wide {
        widen_pointers(&mut image);
    }
    image[28..32].copy_from_slice(&legacy[28..32]);
    legacy.copy_from_slice(&image);
    Ok(())
}

/// The 32-bit image (no REX.W): FPU IP and DP as 32-bit offsets with FCS and FDS
/// beside them. Processors that deprecate FCS/FDS (CPUID.(EAX=7,ECX=0):EBX[13]) store
/// zero there, which is what the area holds.
fn narrow_pointers(image: &mut [u8]) {
    let fip = u64::from_le_bytes(image[8..16].try_into().unwrap_or([0; 8]));
    let fdp = u64::from_le_bytes(image[16..24].try_into().unwrap_or([0; 8]));
    image[8..12].copy_from_slice(&(fip as u32).to_le_bytes());
    image[12..16].fill(0);
    image[16..20].copy_from_slice(&(fdp as u32).to_le_bytes());
    image[20..24].fill(0);
}

fn widen_pointers(image: &mut [u8]) {
    let fip = u32::from_le_bytes(image[8..12].try_into().unwrap_or([0; 4]));
    let fdp = u32::from_le_bytes(image[16..20].try_into().unwrap_or([0; 4]));
    image[8..16].copy_from_slice(&u64::from(fip).to_le_bytes());
    image[16..24].copy_from_slice(&u64::from(fdp).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: u32 = 0xffff;

    /// A legacy region with distinct bytes, MXCSR 0x1f80, FIP/FDP with upper halves set.
    fn legacy(length: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..length).map(|i| (i * 7 + 3) as u8).collect();
        bytes[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        bytes[16..24].copy_from_slice(&0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        bytes[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        bytes
    }

    #[test]
    fn fxsave64_stores_the_region_with_the_processors_mxcsr_mask() {
        let area = legacy(XMM_END_64);
        let image = save_image(&area, MASK, true);
        assert_eq!(image.len(), XMM_END_64);
        assert_eq!(image[28..32], MASK.to_le_bytes());
        assert_eq!(image[..28], area[..28]);
        assert_eq!(image[32..], area[32..]);
    }

    #[test]
    fn fxsave_without_rex_w_stores_32_bit_pointers_and_no_selectors() {
        // SDM Vol. 1 Table 10-2: FPU IP at 8, FCS at 12, FPU DP at 16, FDS at 20.
        let image = save_image(&legacy(XMM_END_32), MASK, false);
        assert_eq!(image.len(), XMM_END_32);
        assert_eq!(image[8..12], 0x5566_7788u32.to_le_bytes());
        assert_eq!(image[12..16], [0; 4]);
        assert_eq!(image[16..20], 0xddee_ff00u32.to_le_bytes());
        assert_eq!(image[20..24], [0; 4]);
    }

    #[test]
    fn fxrstor64_loads_all_but_mxcsr_mask() {
        let mut area = legacy(XMM_END_64);
        area[28..32].copy_from_slice(&MASK.to_le_bytes());
        let mut image = vec![0x5a; XMM_END_64];
        image[24..28].copy_from_slice(&0x7f80u32.to_le_bytes());
        image[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(restore_image(&mut area, &image, MASK, true), Ok(()));
        assert_eq!(area[..28], image[..28]);
        assert_eq!(area[28..32], MASK.to_le_bytes());
        assert_eq!(area[32..], image[32..]);
    }

    #[test]
    fn fxrstor_without_rex_w_zero_extends_the_pointers() {
        let mut area = legacy(XMM_END_32);
        let image = save_image(&legacy(XMM_END_32), MASK, false);
        assert_eq!(restore_image(&mut area, &image, MASK, false), Ok(()));
        assert_eq!(area[8..16], 0x5566_7788u64.to_le_bytes());
        assert_eq!(area[16..24], 0xddee_ff00u64.to_le_bytes());
    }

    #[test]
    fn fxrstor_with_reserved_mxcsr_bits_is_gp_and_loads_nothing() {
        let mut area = legacy(XMM_END_64);
        let before = area.clone();
        let mut image = vec![0; XMM_END_64];
        image[24..28].copy_from_slice(&0x1_0000u32.to_le_bytes());
        assert_eq!(
            restore_image(&mut area, &image, MASK, true),
            Err(Fault::GeneralProtection(0))
        );
        assert_eq!(area, before);
    }

    #[test]
    fn fxsave64_then_fxrstor64_gives_the_region_back() {
        let mut area = legacy(XMM_END_64);
        area[28..32].copy_from_slice(&MASK.to_le_bytes());
        let image = save_image(&area, MASK, true);
        let mut restored = vec![0; XMM_END_64];
        restored[28..32].copy_from_slice(&MASK.to_le_bytes());
        assert_eq!(restore_image(&mut restored, &image, MASK, true), Ok(()));
        assert_eq!(restored, area);
    }
}
