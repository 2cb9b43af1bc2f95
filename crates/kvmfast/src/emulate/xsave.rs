//! The XSAVE family (SDM Vol. 1 chapter 13, Vol. 2 "XSAVE", "XSAVEOPT", "XSAVEC",
//! "XSAVES", "XRSTOR", "XRSTORS", "XGETBV", "XSETBV") over KVM_GET/SET_XSAVE and
//! KVM_GET/SET_XCRS, in the standard and the compacted formats.
//!
//! XINUSE is KVM's XSTATE_BV of the vCPU's area (a component KVM reports in use may be
//! in its initial configuration: the SDM allows XINUSE[i] = 1 then). XSAVEOPT and
//! XSAVES apply the init optimization and not the modified optimization, which the SDM
//! leaves to the processor.

use iced_x86::Mnemonic;

use super::completion::Completion;
use super::cpu::{CR0_TS, CR4_OSXSAVE};
use super::exceptions::Fault;
use super::fpu_state::{
    AREA_SIZE, FCW_INIT, FEATURE_AVX, FEATURE_SSE, FEATURE_X87, HEADER_OFFSET, HEADER_SIZE,
    MXCSR_INIT, MXCSR_OFFSET, XMM_OFFSET, XsaveArea, set_xcr0, xcr0,
};
use super::linear::{Intent, data_access};
use super::operands::memory_operand;
use super::stop::Stop;
use super::timestamp::read_msr;

const MSR_IA32_XSS: u32 = 0xda0;
const COMPACTED: u64 = 1 << 63;
const COMPACTED_START: usize = 576;

// Where state component i lives: the guest sees the host's CPUID leaf 0DH, and KVM's
// area uses the same offsets.
use super::xstate_layout::component;

/// Offsets of the components in `bits` (i >= 2) in the compacted format (SDM Vol. 1
/// 13.4.3), and the end of the area.
fn compacted_layout(bits: u64) -> (Vec<(u32, usize)>, usize) {
    let mut offset = COMPACTED_START;
    let mut layout = Vec::new();
    for index in 2..63 {
        if bits & (1 << index) == 0 {
            continue;
        }
        let component = component(index);
        if component.aligned {
            offset = offset.next_multiple_of(64);
        }
        layout.push((index, offset));
        offset += component.size;
    }
    (layout, offset)
}

fn standard_end(bits: u64) -> usize {
    (2..63)
        .filter(|index| bits & (1 << index) != 0)
        .map(|index| {
            let c = component(index);
            c.offset + c.size
        })
        .max()
        .unwrap_or(COMPACTED_START)
        .max(COMPACTED_START)
}

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    if c.cpu.sregs.cr4 & CR4_OSXSAVE == 0 {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    let mnemonic = c.decoded.instruction.mnemonic();
    match mnemonic {
        Mnemonic::Xgetbv => return xgetbv(c),
        Mnemonic::Xsetbv => return xsetbv(c),
        _ => {}
    }
    if c.cpu.sregs.cr0 & CR0_TS != 0 {
        return Err(Stop::Fault(Fault::DeviceNotAvailable));
    }
    let supervisor = matches!(
        mnemonic,
        Mnemonic::Xsaves | Mnemonic::Xsaves64 | Mnemonic::Xrstors | Mnemonic::Xrstors64
    );
    if supervisor && c.cpu.cpl() != 0 {
        return Err(Stop::Fault(Fault::GeneralProtection(0)));
    }
    let xcr0 = xcr0(c.cpu.fd)?;
    let mut enabled = xcr0;
    if supervisor {
        let xss = read_msr(&c.cpu, MSR_IA32_XSS)?;
        enabled |= xss;
        if xss != 0 {
            let requested = ((c.cpu.regs.rdx & 0xffff_ffff) << 32) | (c.cpu.regs.rax & 0xffff_ffff);
            if requested & xss != 0 {
                return Err(Stop::Unsupported(format!(
                    "{mnemonic:?} of supervisor state components {:#x} (KVM_GET_XSAVE has only \
                     user state)",
                    requested & xss
                )));
            }
        }
    }
    let requested = ((c.cpu.regs.rdx & 0xffff_ffff) << 32) | (c.cpu.regs.rax & 0xffff_ffff);
    let rfbm = requested & enabled;
    let operand = memory_operand(&c.cpu, &c.decoded)?;
    // "#GP(0) If a memory operand is not aligned on a 64-byte boundary."
    let base = operand.linear(&c.cpu, 0, 1, Intent::Read)?;
    if base % 64 != 0 {
        return Err(Stop::Fault(Fault::GeneralProtection(0)));
    }
    let wide = matches!(
        mnemonic,
        Mnemonic::Xsave64
            | Mnemonic::Xsaveopt64
            | Mnemonic::Xsavec64
            | Mnemonic::Xsaves64
            | Mnemonic::Xrstor64
            | Mnemonic::Xrstors64
    );
    let form = Form {
        base_offset: operand.offset,
        segment: operand.segment,
        rfbm,
        xcr0,
        enabled,
        wide,
        xmm_registers: if c.cpu.bitness() == 64 { 16 } else { 8 },
    };
    let area = XsaveArea::load(c.cpu.fd)?;
    let beyond = (2..63).find(|&index| {
        rfbm & (1 << index) != 0 && {
            let comp = component(index);
            comp.offset + comp.size > AREA_SIZE
        }
    });
    if let Some(index) = beyond {
        return Err(Stop::Unsupported(format!(
            "state component {index} lies beyond KVM_GET_XSAVE's 4096 bytes"
        )));
    }
    match mnemonic {
        Mnemonic::Xsave | Mnemonic::Xsave64 => save_standard(c, &form, &area, false)?,
        Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => save_standard(c, &form, &area, true)?,
        Mnemonic::Xsavec | Mnemonic::Xsavec64 | Mnemonic::Xsaves | Mnemonic::Xsaves64 => {
            save_compacted(c, &form, &area)?;
        }
        _ => restore(c, &form, area, supervisor)?,
    }
    c.advance();
    Ok(())
}

/// What the instruction's operands decide.
struct Form {
    base_offset: u64,
    segment: iced_x86::Register,
    rfbm: u64,
    xcr0: u64,
    /// XCR0, with IA32_XSS for XSAVES/XRSTORS.
    enabled: u64,
    wide: bool,
    xmm_registers: usize,
}

impl Form {
    fn read(&self, c: &Completion<'_>, offset: usize, out: &mut [u8]) -> Result<(), Stop> {
        let linear = super::linear::linear_address(
            &c.cpu,
            self.segment,
            self.base_offset.wrapping_add(offset as u64),
            out.len(),
            Intent::Read,
        )
        .map_err(Stop::Fault)?;
        c.memory.read(linear, out, data_access(&c.cpu, false))
    }

    fn linear(&self, c: &Completion<'_>, offset: usize, length: usize) -> Result<u64, Stop> {
        super::linear::linear_address(
            &c.cpu,
            self.segment,
            self.base_offset.wrapping_add(offset as u64),
            length,
            Intent::Write,
        )
        .map_err(Stop::Fault)
    }

    /// Writes the pieces, after checking that every byte of [0, end) can be written,
    /// so that a fault leaves memory as it was.
    fn write_all(
        &self,
        c: &Completion<'_>,
        end: usize,
        pieces: &[(usize, Vec<u8>)],
    ) -> Result<(), Stop> {
        let linear = self.linear(c, 0, end)?;
        c.memory
            .probe_write(linear, end, data_access(&c.cpu, true))?;
        for (offset, bytes) in pieces {
            let linear = self.linear(c, *offset, bytes.len())?;
            c.memory.write(linear, bytes, data_access(&c.cpu, true))?;
        }
        Ok(())
    }
}

/// The legacy region's pieces for the components in `bits` (x87: FCW..FDP and the
/// ST registers; SSE: the XMM registers), plus MXCSR when `mxcsr`.
fn legacy_pieces(area: &XsaveArea, form: &Form, bits: u64, mxcsr: bool) -> Vec<(usize, Vec<u8>)> {
    let mut pieces = Vec::new();
    if bits & FEATURE_X87 != 0 {
        let mut head = area.bytes[..MXCSR_OFFSET].to_vec();
        if !form.wide {
            narrow(&mut head);
        }
        pieces.push((0, head));
        pieces.push((32, area.bytes[32..XMM_OFFSET].to_vec()));
    }
    if mxcsr {
        pieces.push((
            MXCSR_OFFSET,
            area.bytes[MXCSR_OFFSET..MXCSR_OFFSET + 8].to_vec(),
        ));
    }
    if bits & FEATURE_SSE != 0 {
        let end = XMM_OFFSET + 16 * form.xmm_registers;
        pieces.push((XMM_OFFSET, area.bytes[XMM_OFFSET..end].to_vec()));
    }
    pieces
}

fn narrow(head: &mut [u8]) {
    let fip = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8]));
    let fdp = u64::from_le_bytes(head[16..24].try_into().unwrap_or([0; 8]));
    head[8..12].copy_from_slice(&(fip as u32).to_le_bytes());
    head[12..16].fill(0);
    head[16..20].copy_from_slice(&(fdp as u32).to_le_bytes());
    head[20..24].fill(0);
}

fn widen(head: &mut [u8]) {
    let fip = u32::from_le_bytes(head[8..12].try_into().unwrap_or([0; 4]));
    let fdp = u32::from_le_bytes(head[16..20].try_into().unwrap_or([0; 4]));
    head[8..16].copy_from_slice(&u64::from(fip).to_le_bytes());
    head[16..24].copy_from_slice(&u64::from(fdp).to_le_bytes());
}

/// XSAVE and XSAVEOPT (standard format, SDM Vol. 1 13.7 and 13.9).
fn save_standard(
    c: &Completion<'_>,
    form: &Form,
    area: &XsaveArea,
    optimized: bool,
) -> Result<(), Stop> {
    let xinuse = area.xstate_bv() & form.xcr0;
    let saved = if optimized {
        form.rfbm & xinuse
    } else {
        form.rfbm
    };
    let mut header = [0u8; 8];
    form.read(c, HEADER_OFFSET, &mut header)?;
    let old_bv = u64::from_le_bytes(header);
    let new_bv = (old_bv & !form.rfbm) | (xinuse & form.rfbm);
    let mxcsr = form.rfbm & (FEATURE_SSE | FEATURE_AVX) != 0;
    let mut pieces = legacy_pieces(area, form, saved, mxcsr);
    for index in 2..63u32 {
        if saved & (1 << index) != 0 {
            let comp = component(index);
            pieces.push((
                comp.offset,
                area.bytes[comp.offset..comp.offset + comp.size].to_vec(),
            ));
        }
    }
    pieces.push((HEADER_OFFSET, new_bv.to_le_bytes().to_vec()));
    let end = standard_end(form.rfbm);
    form.write_all(c, end, &pieces)
}

/// XSAVEC and XSAVES (compacted format, SDM Vol. 1 13.10 and 13.11).
fn save_compacted(c: &Completion<'_>, form: &Form, area: &XsaveArea) -> Result<(), Stop> {
    let xinuse = area.xstate_bv() & form.xcr0;
    let saved = form.rfbm & xinuse;
    let mxcsr = form.rfbm & (FEATURE_SSE | FEATURE_AVX) != 0;
    let mut pieces = legacy_pieces(area, form, saved, mxcsr);
    let (layout, end) = compacted_layout(form.rfbm);
    for (index, offset) in layout {
        if saved & (1 << index) != 0 {
            let comp = component(index);
            pieces.push((
                offset,
                area.bytes[comp.offset..comp.offset + comp.size].to_vec(),
            ));
        }
    }
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&saved.to_le_bytes());
    header.extend_from_slice(&(form.rfbm | COMPACTED).to_le_bytes());
    pieces.push((HEADER_OFFSET, header));
    form.write_all(c, end, &pieces)
}

/// XRSTOR (either format) and XRSTORS (compacted only): SDM Vol. 1 13.8 and 13.12.
fn restore(
    c: &mut Completion<'_>,
    form: &Form,
    mut area: XsaveArea,
    supervisor: bool,
) -> Result<(), Stop> {
    let gp = Stop::Fault(Fault::GeneralProtection(0));
    let mut header = [0u8; HEADER_SIZE];
    form.read(c, HEADER_OFFSET, &mut header)?;
    let xstate_bv = u64::from_le_bytes(header[..8].try_into().unwrap_or([0; 8]));
    let xcomp_bv = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let compacted = xcomp_bv & COMPACTED != 0;
    if header[16..].iter().any(|&b| b != 0) {
        return Err(gp);
    }
    if compacted {
        let components = xcomp_bv & !COMPACTED;
        // XRSTORS may name the supervisor components of IA32_XSS too.
        if components & !form.enabled != 0 {
            return Err(gp);
        }
        if xstate_bv & !components != 0 {
            return Err(gp);
        }
    } else {
        if supervisor || xcomp_bv != 0 || xstate_bv & !form.xcr0 != 0 {
            return Err(gp);
        }
    }
    let load = form.rfbm & xstate_bv;
    let init = form.rfbm & !xstate_bv;

    // MXCSR first: its reserved bits are the one check left (SDM: #GP before any state
    // is loaded).
    let mxcsr_from_memory = if compacted {
        load & (FEATURE_SSE | FEATURE_AVX) != 0
    } else {
        form.rfbm & (FEATURE_SSE | FEATURE_AVX) != 0
    };
    let mut mxcsr = None;
    if mxcsr_from_memory {
        let mut bytes = [0u8; 4];
        form.read(c, MXCSR_OFFSET, &mut bytes)?;
        let value = u32::from_le_bytes(bytes);
        if value & !c.quirks.mxcsr_mask != 0 {
            return Err(gp);
        }
        mxcsr = Some(value);
    } else if compacted && form.rfbm & (FEATURE_SSE | FEATURE_AVX) != 0 {
        mxcsr = Some(MXCSR_INIT);
    }

    let mut bv = area.xstate_bv();
    if load & FEATURE_X87 != 0 {
        let mut head = [0u8; MXCSR_OFFSET];
        form.read(c, 0, &mut head)?;
        if !form.wide {
            widen(&mut head);
        }
        area.bytes[..MXCSR_OFFSET].copy_from_slice(&head);
        let mut registers = vec![0u8; XMM_OFFSET - 32];
        form.read(c, 32, &mut registers)?;
        area.bytes[32..XMM_OFFSET].copy_from_slice(&registers);
        bv |= FEATURE_X87;
    } else if init & FEATURE_X87 != 0 {
        area.bytes[..MXCSR_OFFSET].fill(0);
        area.bytes[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        area.bytes[32..XMM_OFFSET].fill(0);
        bv &= !FEATURE_X87;
    }
    let xmm_end = XMM_OFFSET + 16 * form.xmm_registers;
    if load & FEATURE_SSE != 0 {
        let mut registers = vec![0u8; xmm_end - XMM_OFFSET];
        form.read(c, XMM_OFFSET, &mut registers)?;
        area.bytes[XMM_OFFSET..xmm_end].copy_from_slice(&registers);
        bv |= FEATURE_SSE;
    } else if init & FEATURE_SSE != 0 {
        area.bytes[XMM_OFFSET..xmm_end].fill(0);
        bv &= !FEATURE_SSE;
    }
    let offsets: Vec<(u32, usize)> = if compacted {
        compacted_layout(xcomp_bv & !COMPACTED).0
    } else {
        (2..63u32)
            .filter(|index| form.rfbm & (1 << index) != 0)
            .map(|index| (index, component(index).offset))
            .collect()
    };
    for (index, memory_offset) in offsets {
        let bit = 1u64 << index;
        let comp = component(index);
        if load & bit != 0 {
            let mut bytes = vec![0u8; comp.size];
            form.read(c, memory_offset, &mut bytes)?;
            area.bytes[comp.offset..comp.offset + comp.size].copy_from_slice(&bytes);
            bv |= bit;
        } else if init & bit != 0 {
            area.bytes[comp.offset..comp.offset + comp.size].fill(0);
            bv &= !bit;
        }
    }
    // Init components with no slot in a compacted image (RFBM but not XCOMP_BV).
    for index in 2..63u32 {
        let bit = 1u64 << index;
        if init & bit != 0 && bv & bit != 0 {
            let comp = component(index);
            area.bytes[comp.offset..comp.offset + comp.size].fill(0);
            bv &= !bit;
        }
    }
    if let Some(value) = mxcsr {
        area.set_mxcsr(value);
        // KVM takes MXCSR only with x87, SSE or AVX in use; SSE in its initial state
        // marked in use is the same architectural state.
        if bv & (FEATURE_X87 | FEATURE_SSE | FEATURE_AVX) == 0 && value != MXCSR_INIT {
            bv |= FEATURE_SSE;
        }
    }
    area.set_xstate_bv(bv);
    area.store(c.cpu.fd)
}

fn xgetbv(c: &mut Completion<'_>) -> Result<(), Stop> {
    let index = c.cpu.regs.rcx & 0xffff_ffff;
    let value = match index {
        0 => xcr0(c.cpu.fd)?,
        // XINUSE, when CPUID.(EAX=0DH,ECX=1):EAX[2] says XGETBV with ECX=1 exists.
        1 if super::xstate_layout::has_xgetbv1() => {
            xcr0(c.cpu.fd)? & XsaveArea::load(c.cpu.fd)?.xstate_bv()
        }
        _ => return Err(Stop::Fault(Fault::GeneralProtection(0))),
    };
    let regs = c.cpu.regs_mut();
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    c.advance();
    Ok(())
}

fn xsetbv(c: &mut Completion<'_>) -> Result<(), Stop> {
    if c.cpu.cpl() != 0 || c.cpu.regs.rcx & 0xffff_ffff != 0 {
        return Err(Stop::Fault(Fault::GeneralProtection(0)));
    }
    let value = ((c.cpu.regs.rdx & 0xffff_ffff) << 32) | (c.cpu.regs.rax & 0xffff_ffff);
    // KVM applies the SDM's rules (x87 set, AVX needs SSE, supported bits only) and
    // refuses what the CPU would #GP on.
    if !set_xcr0(c.cpu.fd, value) {
        return Err(Stop::Fault(Fault::GeneralProtection(0)));
    }
    c.advance();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacted_components_follow_each_other() {
        let avx = component(2);
        assert_eq!(avx.size, 256);
        let (layout, end) = compacted_layout(FEATURE_AVX);
        assert_eq!(layout, vec![(2, COMPACTED_START)]);
        assert_eq!(end, COMPACTED_START + 256);
        assert_eq!(standard_end(FEATURE_AVX), avx.offset + 256);
    }

    #[test]
    fn pointers_narrow_and_widen() {
        let mut head = [0u8; 24];
        head[8..16].copy_from_slice(&0x1234_5678_9abc_u64.to_le_bytes());
        narrow(&mut head);
        assert_eq!(&head[8..12], &0x5678_9abc_u32.to_le_bytes());
        widen(&mut head);
        assert_eq!(
            u64::from_le_bytes(head[8..16].try_into().unwrap()),
            0x5678_9abc
        );
    }
}
