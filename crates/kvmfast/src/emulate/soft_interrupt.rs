//! INT n, INT3, INTO and INT1 (SDM Vol. 2A "INT n/INTO/INT3/INT1", Vol. 3A 6.12 and
//! 6.14): the interrupt is delivered through the guest's IDT here, with the gate and
//! privilege checks, the TSS stack switch (and IST in IA-32e mode), the frame pushed
//! and RIP past the instruction in the frame.

use iced_x86::Mnemonic;

use super::completion::Completion;
use super::cpu::{
    CpuState, RFLAGS_AC, RFLAGS_IF, RFLAGS_NT, RFLAGS_OF, RFLAGS_RF, RFLAGS_TF, RFLAGS_VM,
};
use super::descriptors::{mark_accessed, null_segment, read_descriptor};
use super::exceptions::Fault;
use super::linear::{GuestView, canonical};
use super::paging::Access;
use super::stop::Stop;

const GATE_INTERRUPT: u64 = 0xe;
const GATE_TRAP: u64 = 0xf;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    let instruction = c.decoded.instruction;
    let (vector, software) = match instruction.mnemonic() {
        Mnemonic::Int3 => (3u8, true),
        Mnemonic::Int => (instruction.immediate8(), true),
        Mnemonic::Into => {
            if c.cpu.rflags() & RFLAGS_OF == 0 {
                c.advance();
                return Ok(());
            }
            (4, true)
        }
        // ICEBP: a #DB without the gate DPL check (SDM Vol. 3A 6.12.1.1).
        _ => (1, false),
    };
    let return_rip = c.decoded.next_rip();
    if !c.cpu.protected_mode() {
        return deliver_real_mode(&mut c.cpu, &c.memory, vector, return_rip);
    }
    if c.cpu.virtual_8086() {
        return Err(Stop::Unsupported(
            "a software interrupt in virtual-8086 mode".into(),
        ));
    }
    deliver(&mut c.cpu, &c.memory, vector, software, return_rip)
}

/// Delivers `vector` in protected or IA-32e mode with `return_rip` in the frame.
pub fn deliver(
    cpu: &mut CpuState,
    memory: &GuestView<'_>,
    vector: u8,
    software: bool,
    return_rip: u64,
) -> Result<(), Stop> {
    let long = cpu.long_mode();
    let cpl = cpu.cpl();
    let external = u32::from(!software);
    let idt_code = u32::from(vector) * 8 + 2 + external;
    let gp = |code: u32| Stop::Fault(Fault::GeneralProtection(code));

    let gate_size: u64 = if long { 16 } else { 8 };
    let gate_offset = u64::from(vector) * gate_size;
    if gate_offset + gate_size - 1 > u64::from(cpu.sregs.idt.limit) {
        return Err(gp(idt_code));
    }
    let gate_address = cpu.sregs.idt.base.wrapping_add(gate_offset);
    let low = memory.read_u64(gate_address, Access::supervisor(false))?;
    let high = if long {
        memory.read_u64(gate_address.wrapping_add(8), Access::supervisor(false))?
    } else {
        0
    };
    let system = (low >> 44) & 1 == 0;
    let gate_type = (low >> 40) & 0xf;
    let gate_dpl = ((low >> 45) & 3) as u8;
    let present = (low >> 47) & 1 != 0;
    let valid_type = if long {
        matches!(gate_type, GATE_INTERRUPT | GATE_TRAP)
    } else {
        match gate_type {
            GATE_INTERRUPT | GATE_TRAP => true,
            0x5..=0x7 => {
                return Err(Stop::Unsupported(format!(
                    "delivery through a {} gate",
                    if gate_type == 5 { "task" } else { "16-bit" }
                )));
            }
            _ => false,
        }
    };
    if !system || !valid_type {
        return Err(gp(idt_code));
    }
    if software && gate_dpl < cpl {
        return Err(gp(idt_code));
    }
    if !present {
        return Err(Stop::Fault(Fault::SegmentNotPresent(idt_code)));
    }
    let selector = ((low >> 16) & 0xffff) as u16;
    let mut target = (low & 0xffff) | ((low >> 32) & 0xffff_0000);
    if long {
        target |= (high & 0xffff_ffff) << 32;
    }
    let ist = if long { (low >> 32) & 7 } else { 0 };

    if selector & !3 == 0 {
        return Err(gp(external));
    }
    let selector_code = u32::from(selector & !3) + external;
    let code = read_descriptor(cpu, memory, selector).map_err(|stop| match stop {
        Stop::Fault(Fault::GeneralProtection(_)) => gp(selector_code),
        other => other,
    })?;
    if !code.is_code() || code.dpl() > cpl {
        return Err(gp(selector_code));
    }
    if code.segment.present == 0 {
        return Err(Stop::Fault(Fault::SegmentNotPresent(selector_code)));
    }
    if long && (code.segment.l == 0 || code.segment.db != 0) {
        return Err(gp(selector_code));
    }
    let new_cpl = if code.is_conforming() {
        cpl
    } else {
        code.dpl()
    };
    let inner = new_cpl < cpl;

    let flags = cpu.rflags();
    let old_cs = u64::from(cpu.sregs.cs.selector);
    let old_ss = u64::from(cpu.sregs.ss.selector);
    let old_rsp = cpu.regs.rsp;
    let stack_access = if new_cpl == 3 {
        Access::write(true, false)
    } else {
        Access::supervisor(true)
    };

    if long {
        let mut rsp = if ist != 0 {
            tss_u64(cpu, memory, 0x24 + 8 * (ist - 1))?
        } else if inner {
            tss_u64(cpu, memory, 4 + 8 * u64::from(new_cpl))?
        } else {
            old_rsp
        };
        rsp &= !0xf;
        let frame_rsp = rsp.wrapping_sub(40);
        if !canonical(cpu, frame_rsp) || !canonical(cpu, rsp.wrapping_sub(1)) {
            return Err(Stop::Fault(Fault::StackFault(0)));
        }
        let frame = [return_rip, old_cs, flags, old_rsp, old_ss];
        let bytes: Vec<u8> = frame.iter().flat_map(|v| v.to_le_bytes()).collect();
        memory.write(frame_rsp, &bytes, stack_access)?;
        mark_accessed(cpu, memory, selector, &code)?;
        let sregs = cpu.sregs_mut();
        if inner {
            let mut ss = null_segment(u16::from(new_cpl));
            ss.dpl = new_cpl;
            sregs.ss = ss;
        }
        let mut cs = code.segment;
        cs.selector = (selector & !3) | u16::from(new_cpl);
        cs.type_ |= 1;
        sregs.cs = cs;
        cpu.regs_mut().rsp = frame_rsp;
    } else {
        let (ss_segment, esp) = if inner {
            let esp = tss_u32(cpu, memory, 4 + 8 * u64::from(new_cpl))?;
            let ss_selector = tss_u32(cpu, memory, 8 + 8 * u64::from(new_cpl))? as u16;
            let tss_fault = Stop::Fault(Fault::InvalidTss(u32::from(ss_selector & !3)));
            if ss_selector & !3 == 0 || ss_selector & 3 != u16::from(new_cpl) {
                return Err(tss_fault);
            }
            let ss = read_descriptor(cpu, memory, ss_selector)
                .map_err(|_| Stop::Fault(Fault::InvalidTss(u32::from(ss_selector & !3))))?;
            if !ss.is_writable_data() || ss.dpl() != new_cpl {
                return Err(tss_fault);
            }
            if ss.segment.present == 0 {
                return Err(Stop::Fault(Fault::StackFault(u32::from(ss_selector & !3))));
            }
            (ss.segment, u64::from(esp))
        } else {
            (cpu.sregs.ss, old_rsp)
        };
        let mask: u64 = if ss_segment.db != 0 {
            0xffff_ffff
        } else {
            0xffff
        };
        let frame: Vec<u64> = if inner {
            vec![return_rip, old_cs, flags, old_rsp & 0xffff_ffff, old_ss]
        } else {
            vec![return_rip, old_cs, flags]
        };
        let size = 4 * frame.len() as u64;
        let new_esp = esp.wrapping_sub(size) & mask;
        let bytes: Vec<u8> = frame
            .iter()
            .flat_map(|v| (*v as u32).to_le_bytes())
            .collect();
        let linear = ss_segment.base.wrapping_add(new_esp) & 0xffff_ffff;
        memory.write(linear, &bytes, stack_access)?;
        mark_accessed(cpu, memory, selector, &code)?;
        let sregs = cpu.sregs_mut();
        sregs.ss = ss_segment;
        let mut cs = code.segment;
        cs.selector = (selector & !3) | u16::from(new_cpl);
        cs.type_ |= 1;
        sregs.cs = cs;
        let regs = cpu.regs_mut();
        regs.rsp = (old_rsp & !mask) | new_esp;
        if inner {
            regs.rsp = new_esp;
        }
        target &= 0xffff_ffff;
    }
    let mut new_flags = flags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate_type == GATE_INTERRUPT {
        new_flags &= !RFLAGS_IF;
    }
    cpu.set_rflags(new_flags);
    cpu.regs_mut().rip = target;
    Ok(())
}

fn tss_check(cpu: &CpuState, offset: u64, size: u64) -> Result<u64, Stop> {
    let tr = &cpu.sregs.tr;
    if tr.unusable != 0 || offset + size - 1 > u64::from(tr.limit) {
        return Err(Stop::Fault(Fault::InvalidTss(u32::from(tr.selector & !3))));
    }
    Ok(tr.base.wrapping_add(offset))
}

fn tss_u64(cpu: &CpuState, memory: &GuestView<'_>, offset: u64) -> Result<u64, Stop> {
    let address = tss_check(cpu, offset, 8)?;
    memory.read_u64(address, Access::supervisor(false))
}

fn tss_u32(cpu: &CpuState, memory: &GuestView<'_>, offset: u64) -> Result<u32, Stop> {
    let address = tss_check(cpu, offset, 4)?;
    Ok(memory.read_value(address, 4, Access::supervisor(false))? as u32)
}

/// Real-address mode (SDM Vol. 3A 20.1.4): FLAGS, CS, IP pushed; CS:IP from the IVT.
fn deliver_real_mode(
    cpu: &mut CpuState,
    memory: &GuestView<'_>,
    vector: u8,
    return_rip: u64,
) -> Result<(), Stop> {
    let entry = u64::from(vector) * 4;
    if entry + 3 > u64::from(cpu.sregs.idt.limit) {
        return Err(Stop::Unsupported(
            "a real-mode interrupt beyond the IVT limit (the CPU shuts down)".into(),
        ));
    }
    let vector_entry = memory.read_value(
        cpu.sregs.idt.base.wrapping_add(entry),
        4,
        Access::supervisor(false),
    )?;
    let sp = cpu.regs.rsp & 0xffff;
    let new_sp = sp.wrapping_sub(6) & 0xffff;
    let frame = [
        (return_rip & 0xffff) as u16,
        cpu.sregs.cs.selector,
        (cpu.rflags() & 0xffff) as u16,
    ];
    let bytes: Vec<u8> = frame.iter().flat_map(|v| v.to_le_bytes()).collect();
    memory.write(
        cpu.sregs.ss.base.wrapping_add(new_sp),
        &bytes,
        Access::supervisor(true),
    )?;
    let selector = (vector_entry >> 16) as u16;
    let flags = cpu.rflags() & !(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC);
    cpu.set_rflags(flags);
    let sregs = cpu.sregs_mut();
    sregs.cs.selector = selector;
    sregs.cs.base = u64::from(selector) << 4;
    let regs = cpu.regs_mut();
    regs.rsp = (regs.rsp & !0xffff) | new_sp;
    regs.rip = vector_entry & 0xffff;
    Ok(())
}

#[cfg(test)]
mod tests;
