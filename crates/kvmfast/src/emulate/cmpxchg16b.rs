//! LOCK CMPXCHG16B m128 (SDM Vol. 2A "CMPXCHG8B/CMPXCHG16B"): performed by the host CPU
//! with LOCK CMPXCHG16B on the guest page's host mapping, so that it is atomic against
//! every other vCPU (and device) that reaches the same memory.

use std::arch::asm;

use super::completion::Completion;
use super::cpu::RFLAGS_ZF;
use super::exceptions::Fault;
use super::linear::{Intent, data_access};
use super::operands::memory_operand;
use super::stop::Stop;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    let operand = memory_operand(&c.cpu, &c.decoded)?;
    // "#GP(0) If memory operand for CMPXCHG16B is not aligned on a 16-byte boundary."
    let linear = operand.linear(&c.cpu, 0, 16, Intent::Write)?;
    if linear % 16 != 0 {
        return Err(Stop::Fault(Fault::GeneralProtection(0)));
    }
    // The destination is always written (the old value when the comparison fails), so
    // the access is a write for the page checks.
    let access = data_access(&c.cpu, true);
    let Some(pointer) = c.memory.host_pointer(linear, 16, access)? else {
        return Err(Stop::Unsupported(
            "CMPXCHG16B on memory that is not guest RAM".into(),
        ));
    };
    let regs = &c.cpu.regs;
    let (mut rax, mut rdx) = (regs.rax, regs.rdx);
    let (rbx, rcx) = (regs.rbx, regs.rcx);
    let equal: u8;
    // SAFETY: pointer is 16-byte aligned (linear and physical addresses share their low
    // 12 bits) and lies in one page of guest RAM that stays mapped while the completion
    // holds its RAM snapshot (memory::SharedRam); the guest owns the memory's contents, which may change concurrently: that
    // is what the locked instruction is for.
    unsafe {
        asm!(
            "xchg {rbx_save}, rbx",
            "lock cmpxchg16b [{pointer}]",
            "sete {equal}",
            "xchg {rbx_save}, rbx",
            pointer = in(reg) pointer,
            rbx_save = inout(reg) rbx => _,
            equal = out(reg_byte) equal,
            inout("rax") rax,
            inout("rdx") rdx,
            in("rcx") rcx,
            options(nostack),
        );
    }
    let regs = c.cpu.regs_mut();
    regs.rax = rax;
    regs.rdx = rdx;
    let flags = if equal != 0 {
        c.cpu.rflags() | RFLAGS_ZF
    } else {
        c.cpu.rflags() & !RFLAGS_ZF
    };
    c.cpu.set_rflags(flags);
    c.advance();
    Ok(())
}
