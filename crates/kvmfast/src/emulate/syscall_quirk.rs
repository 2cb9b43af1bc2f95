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
/// Counted when a repaired SYSCALL faulted at LSTAR anyway and was performed again.
pub const REDONE: &str = "syscall_repair_faulted_redone";
const DOUBLE_FAULT: u64 = 8;
const PAGE_FAULT: u64 = 14;

/// Performs the SYSCALL if the exit is the quirk's #PF, or the fault a repaired SYSCALL
/// still took at LSTAR; None when it is neither, else the counter's name.
///
/// The second shape (seen on this host under a 100 Hz `--profile`, see PendingRepair):
/// KVM keeps the repaired CS but faults fetching LSTAR all the same, and delivers the
/// #PF at CPL 0 onto the user stack -- with SMAP a #DF. Either handler's first
/// instruction exits to us with a frame saying that nothing at LSTAR ran: RIP = LSTAR,
/// the kernel's CS, RSP the user's, and RCX/R11 still the user's RIP and RFLAGS. A
/// kernel never faults at its SYSCALL entry otherwise (its text is mapped, and TF and
/// IF are masked by FMASK), so the SYSCALL is performed again from that state.
pub fn repair(cpu: &mut Cpu<'_>, memory: &GuestMemory<'_>) -> Result<Option<&'static str>, Stop> {
    if !cpu.long_mode() || cpu.cpl() != 0 || cpu.sregs.cs.l == 0 {
        return Ok(None);
    }
    // Cheap checks first: RIP at the #PF or #DF handler, and a frame whose RIP is CR2
    // (a fetch fault) or, for the #DF, any kernel-CS frame.
    let vector = if handler_of(cpu, memory, PAGE_FAULT) == Some(cpu.regs.rip) {
        PAGE_FAULT
    } else if handler_of(cpu, memory, DOUBLE_FAULT) == Some(cpu.regs.rip) {
        DOUBLE_FAULT
    } else {
        return Ok(None);
    };
    let rsp = cpu.regs.rsp;
    let supervisor = Access::supervisor(false);
    let mut frame = [0u64; 6];
    for (i, slot) in frame.iter_mut().enumerate() {
        match memory.read_u64(rsp.wrapping_add(8 * i as u64), supervisor) {
            Ok(value) => *slot = value,
            Err(_) => return Ok(None),
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
    let user_frame = saved_cs & 3 == 3;
    let shape = match (vector, user_frame) {
        (PAGE_FAULT, true) if saved_rip == cpu.sregs.cr2 => NAME,
        (PAGE_FAULT, false) if saved_rip == cpu.sregs.cr2 => REDONE,
        (DOUBLE_FAULT, false) => REDONE,
        _ => return Ok(None),
    };
    let [star, lstar, fmask] = read_msrs(cpu)?;
    let selector = ((star >> 32) & 0xfffc) as u16;
    if lstar != saved_rip {
        return Ok(None);
    }
    if shape == REDONE && (saved_cs != u64::from(selector) || saved_rsp >> 47 != 0) {
        return Ok(None);
    }
    let flags = (cpu.regs.r11 & !fmask & !RFLAGS_RF) | RFLAGS_FIXED;
    let sregs = cpu.sregs_mut();
    sregs.cs = flat_segment(selector, true);
    sregs.ss = flat_segment(selector + 8, false);
    sregs.cr2 = lstar;
    let regs = cpu.regs_mut();
    regs.rip = lstar;
    regs.rsp = saved_rsp;
    regs.rflags = flags;
    cpu.store()?;
    Ok(Some(shape))
}

/// The 64-bit IDT gate's handler address for `vector`, if the IDT has that gate.
fn handler_of(cpu: &Cpu<'_>, memory: &GuestMemory<'_>, vector: u64) -> Option<u64> {
    let idt = &cpu.sregs.idt;
    if u64::from(idt.limit) < vector * 16 + 15 {
        return None;
    }
    let supervisor = Access::supervisor(false);
    let gate_low = memory.read_u64(idt.base + vector * 16, supervisor).ok()?;
    let gate_high = memory
        .read_u64(idt.base + vector * 16 + 8, supervisor)
        .ok()?;
    Some((gate_low & 0xffff) | ((gate_low >> 32) & 0xffff_0000) | ((gate_high & 0xffff_ffff) << 32))
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
/// left LSTAR, and applies the repair again if KVM reports it lost. Under a 100 Hz
/// `--profile` of a Linux boot the fault at CPL 0 still happened at init's first
/// SYSCALL (2026-11-26, twice in two boots): `repair` recognises that #PF or #DF frame
/// and performs the SYSCALL again.
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
