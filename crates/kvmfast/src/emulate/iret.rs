//! IRET with a 32-bit operand in protected mode (SDM Vol. 2A "IRET/IRETD/IRETQ",
//! PROTECTED-MODE, RETURN-TO-SAME-PRIVILEGE-LEVEL and RETURN-TO-OUTER-PRIVILEGE-LEVEL),
//! which this host's KVM cannot emulate; real-mode IRET too. Task returns (NT=1),
//! returns to virtual-8086 mode and 16-bit IRET are reported, not guessed.

use iced_x86::Mnemonic;

use super::completion::Completion;
use super::cpu::{
    Cpu, RFLAGS_AC, RFLAGS_AF, RFLAGS_CF, RFLAGS_DF, RFLAGS_ID, RFLAGS_IF, RFLAGS_IOPL, RFLAGS_NT,
    RFLAGS_OF, RFLAGS_PF, RFLAGS_RF, RFLAGS_SF, RFLAGS_TF, RFLAGS_VIF, RFLAGS_VIP, RFLAGS_VM,
    RFLAGS_ZF,
};
use super::descriptors::{mark_accessed, null_segment, read_descriptor};
use super::exceptions::Fault;
use super::linear::GuestView;
use super::paging::Access;
use super::stop::Stop;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    let operand_size = match c.decoded.instruction.mnemonic() {
        Mnemonic::Iretd => 4,
        _ => 2,
    };
    if !c.cpu.protected_mode() {
        return real_mode(&mut c.cpu, &c.memory, operand_size);
    }
    if c.cpu.long_mode() {
        return Err(Stop::Unsupported("IRET in IA-32e mode".into()));
    }
    if c.cpu.virtual_8086() {
        return Err(Stop::Unsupported("IRET in virtual-8086 mode".into()));
    }
    if c.cpu.rflags() & RFLAGS_NT != 0 {
        return Err(Stop::Unsupported("IRET with NT=1 (a task return)".into()));
    }
    if operand_size != 4 {
        return Err(Stop::Unsupported("16-bit IRET in protected mode".into()));
    }
    protected_mode(&mut c.cpu, &c.memory)?;
    unblock_nmi(&c.cpu)
}

fn gp(code: u16) -> Stop {
    Stop::Fault(Fault::GeneralProtection(u32::from(code & !3)))
}

fn stack_access(cpu: &Cpu<'_>) -> Access {
    Access::read(cpu.cpl() == 3, false)
}

fn protected_mode(cpu: &mut Cpu<'_>, memory: &GuestView<'_>) -> Result<(), Stop> {
    let cpl = cpu.cpl();
    let ss = cpu.sregs.ss;
    let mask: u64 = if ss.db != 0 { 0xffff_ffff } else { 0xffff };
    let esp = cpu.regs.rsp & mask;
    let pop = |index: u64| -> Result<u64, Stop> {
        let offset = esp.wrapping_add(4 * index) & mask;
        if offset + 3 > u64::from(ss.limit) {
            return Err(Stop::Fault(Fault::StackFault(0)));
        }
        memory.read_value(
            ss.base.wrapping_add(offset) & 0xffff_ffff,
            4,
            stack_access(cpu),
        )
    };
    let eip = pop(0)?;
    let cs_selector = pop(1)? as u16;
    let popped_flags = pop(2)?;
    if popped_flags & RFLAGS_VM != 0 && cpl == 0 {
        return Err(Stop::Unsupported("IRET to virtual-8086 mode".into()));
    }
    if cs_selector & !3 == 0 {
        return Err(gp(0));
    }
    let rpl = (cs_selector & 3) as u8;
    if rpl < cpl {
        return Err(gp(cs_selector));
    }
    let code = read_descriptor(cpu, memory, cs_selector)?;
    if !code.is_code()
        || (code.is_conforming() && code.dpl() > rpl)
        || (!code.is_conforming() && code.dpl() != rpl)
    {
        return Err(gp(cs_selector));
    }
    if code.segment.present == 0 {
        return Err(Stop::Fault(Fault::SegmentNotPresent(u32::from(
            cs_selector & !3,
        ))));
    }
    if eip > u64::from(code.segment.limit) {
        return Err(gp(0));
    }
    let outer = rpl > cpl;
    let mut new_ss = None;
    let mut new_esp = esp.wrapping_add(12) & mask;
    if outer {
        let esp_outer = pop(3)?;
        let ss_selector = pop(4)? as u16;
        if ss_selector & !3 == 0 {
            return Err(gp(0));
        }
        if ss_selector & 3 != u16::from(rpl) {
            return Err(gp(ss_selector));
        }
        let stack = read_descriptor(cpu, memory, ss_selector)?;
        if !stack.is_writable_data() || stack.dpl() != rpl {
            return Err(gp(ss_selector));
        }
        if stack.segment.present == 0 {
            return Err(Stop::Fault(Fault::StackFault(u32::from(ss_selector & !3))));
        }
        mark_accessed(cpu, memory, ss_selector, &stack)?;
        let mut segment = stack.segment;
        segment.type_ |= 1;
        let outer_mask: u64 = if segment.db != 0 { 0xffff_ffff } else { 0xffff };
        new_esp = esp_outer & outer_mask;
        new_ss = Some(segment);
    }
    mark_accessed(cpu, memory, cs_selector, &code)?;

    let old_flags = cpu.rflags();
    let iopl = ((old_flags & RFLAGS_IOPL) >> 12) as u8;
    let mut writable = RFLAGS_CF
        | RFLAGS_PF
        | RFLAGS_AF
        | RFLAGS_ZF
        | RFLAGS_SF
        | RFLAGS_TF
        | RFLAGS_DF
        | RFLAGS_OF
        | RFLAGS_NT
        | RFLAGS_RF
        | RFLAGS_AC
        | RFLAGS_ID;
    if cpl <= iopl {
        writable |= RFLAGS_IF;
    }
    if cpl == 0 {
        writable |= RFLAGS_IOPL | RFLAGS_VIF | RFLAGS_VIP;
    }
    let flags = (old_flags & !writable) | (popped_flags & writable);

    let mut cs = code.segment;
    cs.type_ |= 1;
    let sregs = cpu.sregs_mut();
    sregs.cs = cs;
    if let Some(segment) = new_ss {
        sregs.ss = segment;
        // Data segments the outer level may not use become null (SDM: "FOR each
        // SegReg in (ES, FS, GS, and DS)").
        for segment in [&mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ds] {
            let data_or_nonconforming = segment.type_ & 8 == 0 || segment.type_ & 4 == 0;
            if segment.unusable == 0 && data_or_nonconforming && segment.dpl < rpl {
                *segment = null_segment(0);
            }
        }
    }
    cpu.set_rflags(flags);
    let regs = cpu.regs_mut();
    regs.rip = eip;
    if outer {
        regs.rsp = new_esp;
    } else {
        regs.rsp = (regs.rsp & !mask) | new_esp;
    }
    Ok(())
}

fn real_mode(cpu: &mut Cpu<'_>, memory: &GuestView<'_>, operand_size: usize) -> Result<(), Stop> {
    let sp = cpu.regs.rsp & 0xffff;
    let at = |index: u64| {
        cpu.sregs
            .ss
            .base
            .wrapping_add((sp + index * operand_size as u64) & 0xffff)
    };
    let access = Access::supervisor(false);
    let ip = memory.read_value(at(0), operand_size, access)?;
    let cs = memory.read_value(at(1), operand_size, access)? as u16;
    let popped = memory.read_value(at(2), operand_size, access)?;
    let writable: u64 = if operand_size == 4 {
        0x257fd5 & !(RFLAGS_VM | RFLAGS_VIF | RFLAGS_VIP)
    } else {
        0xffff & !0x2a
    };
    let flags = (cpu.rflags() & !writable) | (popped & writable);
    cpu.set_rflags(flags);
    let sregs = cpu.sregs_mut();
    sregs.cs.selector = cs;
    sregs.cs.base = u64::from(cs) << 4;
    let regs = cpu.regs_mut();
    regs.rip = ip
        & if operand_size == 4 {
            0xffff_ffff
        } else {
            0xffff
        };
    regs.rsp = (regs.rsp & !0xffff) | ((sp + 3 * operand_size as u64) & 0xffff);
    Ok(())
}

/// IRET ends NMI blocking (SDM Vol. 3A 6.7.1); KVM tracks the blocking and cannot know
/// that this IRET ran, so it is told.
fn unblock_nmi(cpu: &Cpu<'_>) -> Result<(), Stop> {
    let mut events = cpu.events()?;
    if events.nmi.masked == 0 {
        return Ok(());
    }
    events.nmi.masked = 0;
    events.flags = 0;
    cpu.set_events(&events)
}
