//! The SYSCALL host quirk (../shared/HOST-KVM.md, found by probe.rs): a guest user-mode
//! SYSCALL sets RIP = LSTAR, RCX and R11 but leaves CS/SS at CPL 3, so fetching the
//! kernel's entry raises #PF into the guest kernel, whose #PF entry begins with an
//! instruction that exits to us (CLAC in Linux). Recognised by that frame -- the #PF
//! handler's first instruction, CR2 = LSTAR, a saved RIP of LSTAR and a CPL-3 CS -- the
//! #PF is dropped and the SYSCALL performed as SDM Vol. 2B "SYSCALL" says: CS from
//! STAR[47:32], SS = CS + 8 (flat, DPL 0), RFLAGS = R11 & ~FMASK with RF clear, RIP =
//! LSTAR, RSP as the user left it.

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use super::Stop;
use super::cpu::{Cpu, RFLAGS_FIXED, RFLAGS_RF};
use super::linear::GuestMemory;
use super::paging::Access;
use super::probe::{MSR_FMASK, MSR_LSTAR, MSR_STAR};

pub const NAME: &str = "syscall_keeps_user_cs";
const PAGE_FAULT: u64 = 14;

/// Performs the SYSCALL if the exit is the quirk's #PF; false when it is not.
pub fn repair(cpu: &mut Cpu<'_>, memory: &GuestMemory<'_>) -> Result<bool, Stop> {
    if !cpu.long_mode() || cpu.cpl() != 0 || cpu.sregs.cs.l == 0 {
        return Ok(false);
    }
    // Cheap checks first: RIP at the #PF handler, and a CPL-3 frame whose RIP is CR2.
    let idt = &cpu.sregs.idt;
    if u64::from(idt.limit) < PAGE_FAULT * 16 + 15 {
        return Ok(false);
    }
    let supervisor = Access::supervisor(false);
    let Ok(gate_low) = memory.read_u64(idt.base + PAGE_FAULT * 16, supervisor) else {
        return Ok(false);
    };
    let Ok(gate_high) = memory.read_u64(idt.base + PAGE_FAULT * 16 + 8, supervisor) else {
        return Ok(false);
    };
    let handler =
        (gate_low & 0xffff) | ((gate_low >> 32) & 0xffff_0000) | ((gate_high & 0xffff_ffff) << 32);
    if cpu.regs.rip != handler {
        return Ok(false);
    }
    let rsp = cpu.regs.rsp;
    let mut frame = [0u64; 6];
    for (i, slot) in frame.iter_mut().enumerate() {
        match memory.read_u64(rsp.wrapping_add(8 * i as u64), supervisor) {
            Ok(value) => *slot = value,
            Err(_) => return Ok(false),
        }
    }
    let [
        _error_code,
        saved_rip,
        saved_cs,
        _saved_flags,
        saved_rsp,
        _saved_ss,
    ] = frame;
    if saved_cs & 3 != 3 || saved_rip != cpu.sregs.cr2 {
        return Ok(false);
    }
    let [star, lstar, fmask] = read_msrs(cpu)?;
    if lstar != saved_rip {
        return Ok(false);
    }
    let selector = ((star >> 32) & 0xfffc) as u16;
    let flags = (cpu.regs.r11 & !fmask & !RFLAGS_RF) | RFLAGS_FIXED;
    let sregs = cpu.sregs_mut();
    sregs.cs = flat_segment(selector, true);
    sregs.ss = flat_segment(selector + 8, false);
    let regs = cpu.regs_mut();
    regs.rip = lstar;
    regs.rsp = saved_rsp;
    regs.rflags = flags;
    cpu.store()?;
    Ok(true)
}

/// The segment registers SYSCALL loads (fixed values, not read from the GDT).
fn flat_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn read_msrs(cpu: &Cpu<'_>) -> Result<[u64; 3], Stop> {
    let entries = [MSR_STAR, MSR_LSTAR, MSR_FMASK].map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    });
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| Stop::Unsupported(format!("MSR list: {e:?}")))?;
    let read = cpu
        .fd
        .get_msrs(&mut msrs)
        .map_err(|e| Stop::ioctl("KVM_GET_MSRS", e))?;
    if read < 3 {
        return Err(Stop::Unsupported("KVM cannot read STAR/LSTAR/FMASK".into()));
    }
    let values = msrs.as_slice();
    Ok([values[0].data, values[1].data, values[2].data])
}

/// The state a repair set, kept until the guest has run from it.
///
/// Found on this host (tests/test_emulate_syscall_quirk.py): a signal that ends the
/// first KVM_RUN after a repair, before the guest has executed the entry's first
/// instruction, can undo the repair -- KVM then reports the user CS again at RIP =
/// LSTAR, or reports the repaired CS and still faults at LSTAR, now delivering the #PF
/// at CPL 0 onto the user stack (a double fault in Linux, with SMAP). So the run loop
/// blocks the kick signal for the entries that follow a repair until the guest has
/// left LSTAR, and applies the repair again if KVM reports it lost.
#[derive(Clone, Copy)]
pub struct PendingRepair {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// What an exit says of a pending repair.
#[derive(Debug, PartialEq, Eq)]
pub enum RepairState {
    /// The guest has left LSTAR: nothing more to watch.
    Ran,
    /// Still at LSTAR with the repaired CS: watch the next exit too.
    Waiting,
    /// Back at LSTAR with the user's CS: apply the repair again.
    Lost,
}

impl PendingRepair {
    pub fn state_after(&self, rip: u64, cs_selector: u16) -> RepairState {
        if rip != self.regs.rip {
            RepairState::Ran
        } else if cs_selector == self.sregs.cs.selector {
            RepairState::Waiting
        } else {
            RepairState::Lost
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> PendingRepair {
        let mut repair = PendingRepair {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
        };
        repair.regs.rip = 0xffff_ffff_81c0_0080;
        repair.sregs.cs.selector = 0x10;
        repair
    }

    #[test]
    fn a_repair_is_lost_only_at_lstar_with_another_cs() {
        let repair = pending();
        assert_eq!(
            repair.state_after(0xffff_ffff_81c0_0080, 0x33),
            RepairState::Lost
        );
        assert_eq!(
            repair.state_after(0xffff_ffff_81c0_0080, 0x10),
            RepairState::Waiting
        );
        assert_eq!(
            repair.state_after(0xffff_ffff_81c0_0083, 0x10),
            RepairState::Ran
        );
        assert_eq!(repair.state_after(0x40_1000, 0x33), RepairState::Ran);
    }
}
