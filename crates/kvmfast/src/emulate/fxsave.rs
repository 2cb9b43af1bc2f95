//! LDMXCSR/STMXCSR and FXSAVE/FXRSTOR (SDM Vol. 2A/2B, Vol. 1 10.5.1) over the vCPU's
//! XSAVE area.

use iced_x86::Mnemonic;

use super::cpu::CR4_OSFXSR;
use super::exceptions::Fault;
use super::fpu_state::{FEATURE_SSE, FEATURE_X87, XsaveArea, check_device_available};
use super::linear::{Intent, alignment_check, data_access};
use super::operands::memory_operand;
use super::{Completion, Stop};

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
        let mut image = area.bytes[..xmm_end].to_vec();
        image[28..32].copy_from_slice(&c.quirks.mxcsr_mask.to_le_bytes());
        if !wide {
            narrow_pointers(&mut image);
        }
        c.memory.write(linear, &image, data_access(&c.cpu, true))?;
    } else {
        let mut image = vec![0u8; xmm_end];
        c.memory
            .read(linear, &mut image, data_access(&c.cpu, false))?;
        let mxcsr = u32::from_le_bytes([image[24], image[25], image[26], image[27]]);
        if mxcsr & !c.quirks.mxcsr_mask != 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(0)));
        }
        if !wide {
            widen_pointers(&mut image);
        }
        // MXCSR_MASK is not loaded: the area keeps the processor's.
        let mask = area.bytes[28..32].to_vec();
        area.bytes[..xmm_end].copy_from_slice(&image);
        area.bytes[28..32].copy_from_slice(&mask);
        area.set_xstate_bv(area.xstate_bv() | FEATURE_X87 | FEATURE_SSE);
        area.store(c.cpu.fd)?;
    }
    c.advance();
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
