//! The SYSCALL host quirk (../shared/HOST-KVM.md, found by probe.rs): a guest user-mode
//! SYSCALL sets RIP = LSTAR, RCX and R11 but leaves CS/SS at CPL 3, so fetching the
//! kernel's entry raises #PF into the guest kernel, whose #PF entry begins with an
//! instruction that exits to us (CLAC in Linux). Recognised by that frame -- the #PF
//! handler's first instruction, CR2 = LSTAR, a saved RIP of LSTAR and a CPL-3 CS -- the
//! #PF is dropped and the SYSCALL performed as SDM Vol. 2B "SYSCALL" says: CS from
//! STAR[47:32], SS = CS + 8 (flat, DPL 0), RFLAGS &= ~FMASK with RF clear, RIP =
//! LSTAR, RSP as the user left it.
//!
//! A user program that jumps to LSTAR produces the same frame (an ordinary SIGSEGV
//! for the guest), and RCX and R11 are then whatever it chose. So the frame is taken
//! for a SYSCALL only with the evidence one leaves ([`SyscallEvidence::kernel_flags`]):
//! `0F 05` at RCX - 2 in memory the user may execute, the frame's RFLAGS already
//! masked by FMASK (this host's SYSCALL applies FMASK before the fetch faults; a user
//! jump keeps IF set, which every kernel's FMASK clears), and R11 -- the RFLAGS the
//! SYSCALL saved -- equal to the frame's outside FMASK and free of bits no RFLAGS can
//! hold. The kernel's RFLAGS comes from the frame, never from R11.

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use super::cpu::{
    Cpu, RFLAGS_AC, RFLAGS_DF, RFLAGS_FIXED, RFLAGS_ID, RFLAGS_IF, RFLAGS_IOPL, RFLAGS_NT,
    RFLAGS_RF, RFLAGS_STATUS, RFLAGS_TF, RFLAGS_VIF, RFLAGS_VIP, RFLAGS_VM,
};
use super::linear::{GuestView, canonical};
use super::paging::Access;
use super::probe::{MSR_FMASK, MSR_LSTAR, MSR_STAR};
use super::stop::Stop;

pub const NAME: &str = "syscall_keeps_user_cs";
const PAGE_FAULT: u64 = 14;
const SYSCALL_OPCODE: [u8; 2] = [0x0f, 0x05];

/// Every RFLAGS bit the architecture defines (SDM Vol. 1 3.4.3); the others are
/// reserved and fail VM entry when set.
const RFLAGS_DEFINED: u64 = RFLAGS_STATUS
    | RFLAGS_FIXED
    | RFLAGS_TF
    | RFLAGS_IF
    | RFLAGS_DF
    | RFLAGS_IOPL
    | RFLAGS_NT
    | RFLAGS_RF
    | RFLAGS_VM
    | RFLAGS_AC
    | RFLAGS_VIF
    | RFLAGS_VIP
    | RFLAGS_ID;

/// What the #PF frame and the registers at the handler say of the CPL-3 fetch at LSTAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallEvidence {
    /// RFLAGS in the #PF frame: pushed by the CPU, so the user did not choose it.
    pub frame_flags: u64,
    /// R11, where a SYSCALL saves the RFLAGS it started with.
    pub r11: u64,
    pub fmask: u64,
    /// The two bytes at RCX - 2, read as a user-mode fetch through the guest's paging;
    /// None when that fetch would fault or does not reach RAM.
    pub bytes_before_rcx: Option<[u8; 2]>,
}

/// Why a frame at LSTAR is not a SYSCALL's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSyscall {
    /// RCX - 2 does not hold a SYSCALL the user could have executed.
    NoSyscallBeforeRcx,
    /// The frame's RFLAGS has a bit FMASK clears: no SYSCALL ran before the fetch.
    FlagsNotMasked,
    /// R11 holds a bit no RFLAGS can (reserved, or VM in 64-bit mode).
    R11NotFlags,
    /// R11 and the frame's RFLAGS differ outside FMASK.
    R11NotFrameFlags,
}

impl SyscallEvidence {
    /// The RFLAGS the SYSCALL gives the kernel, or why the frame is not a SYSCALL's.
    pub fn kernel_flags(&self) -> Result<u64, NotSyscall> {
        if self.bytes_before_rcx != Some(SYSCALL_OPCODE) {
            return Err(NotSyscall::NoSyscallBeforeRcx);
        }
        // RF is the fault's own (set in the frame of a fault-class exception, SDM Vol.
        // 3A 18.3.1.1), not the SYSCALL's; bit 1 stays set whatever FMASK says.
        if self.frame_flags & self.fmask & !(RFLAGS_RF | RFLAGS_FIXED) != 0 {
            return Err(NotSyscall::FlagsNotMasked);
        }
        if self.r11 & !RFLAGS_DEFINED != 0 || self.r11 & (RFLAGS_VM | RFLAGS_FIXED) != RFLAGS_FIXED
        {
            return Err(NotSyscall::R11NotFlags);
        }
        if (self.r11 ^ self.frame_flags) & !(self.fmask | RFLAGS_RF) != 0 {
            return Err(NotSyscall::R11NotFrameFlags);
        }
        Ok(
            (self.frame_flags & !self.fmask & RFLAGS_DEFINED & !(RFLAGS_RF | RFLAGS_VM))
                | RFLAGS_FIXED,
        )
    }
}

/// Performs the SYSCALL if the exit is the quirk's #PF; false when it is not (the
/// guest's #PF handler then runs on as for any user fault).
pub fn repair(cpu: &mut Cpu<'_>, memory: &GuestView<'_>) -> Result<bool, Stop> {
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
        saved_flags,
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
    let evidence = SyscallEvidence {
        frame_flags: saved_flags,
        r11: cpu.regs.r11,
        fmask,
        bytes_before_rcx: user_code_before(cpu, memory, cpu.regs.rcx),
    };
    let Ok(flags) = evidence.kernel_flags() else {
        return Ok(false);
    };
    let selector = ((star >> 32) & 0xfffc) as u16;
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

/// The two bytes before `rcx` as the user's instruction fetch would see them: canonical,
/// user-accessible and executable in the guest's current paging, and in RAM (a device
/// is never read for this: its reads can have effects).
fn user_code_before(cpu: &Cpu<'_>, memory: &GuestView<'_>, rcx: u64) -> Option<[u8; 2]> {
    let fetch = Access {
        fetch: true,
        user: true,
        ..Access::default()
    };
    let start = rcx.wrapping_sub(2);
    let mut bytes = [0u8; 2];
    for (offset, byte) in (0u64..).zip(bytes.iter_mut()) {
        let linear = start.wrapping_add(offset);
        if !canonical(cpu, linear) {
            return None;
        }
        let physical = memory.paging.translate(memory.ram, linear, fetch).ok()?;
        let mut one = [0u8; 1];
        if !memory.ram.read_into(physical, &mut one) {
            return None;
        }
        *byte = one[0];
    }
    Some(bytes)
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

    /// Linux's FMASK: CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID.
    const LINUX_FMASK: u64 = 0x0025_7fd5;

    /// A real SYSCALL on this host: the user ran with IF and CF set, the frame holds
    /// those flags masked by FMASK plus the fault's RF.
    fn real_syscall(fmask: u64) -> SyscallEvidence {
        let user_flags = RFLAGS_FIXED | RFLAGS_IF | 1;
        SyscallEvidence {
            frame_flags: (user_flags & !fmask) | RFLAGS_RF,
            r11: user_flags,
            fmask,
            bytes_before_rcx: Some(SYSCALL_OPCODE),
        }
    }

    /// A user-mode jump to LSTAR: the frame holds the user's own RFLAGS (IF set).
    fn jump(fmask: u64, r11: u64) -> SyscallEvidence {
        SyscallEvidence {
            frame_flags: RFLAGS_FIXED | RFLAGS_IF | RFLAGS_RF,
            r11,
            fmask,
            bytes_before_rcx: Some(SYSCALL_OPCODE),
        }
    }

    #[test]
    fn a_real_syscall_gets_the_frame_flags_masked() {
        assert_eq!(real_syscall(LINUX_FMASK).kernel_flags(), Ok(RFLAGS_FIXED));
        // FMASK 0x4700 (TF IF DF NT) keeps CF; the fault's RF is never passed on.
        assert_eq!(real_syscall(0x4700).kernel_flags(), Ok(RFLAGS_FIXED | 1));
        assert_eq!(
            real_syscall(0).kernel_flags(),
            Ok(RFLAGS_FIXED | RFLAGS_IF | 1)
        );
    }

    #[test]
    fn the_kernel_flags_never_come_from_r11() {
        let mut evidence = real_syscall(0);
        evidence.frame_flags = RFLAGS_FIXED | RFLAGS_IF | RFLAGS_AC;
        evidence.r11 = evidence.frame_flags;
        assert_eq!(
            evidence.kernel_flags(),
            Ok(RFLAGS_FIXED | RFLAGS_IF | RFLAGS_AC)
        );
    }

    #[test]
    fn whatever_the_inputs_the_kernel_flags_are_valid_flags() {
        let bits: Vec<u64> = (0..64).map(|bit| 1u64 << bit).collect();
        let samples = [
            0,
            RFLAGS_FIXED,
            RFLAGS_FIXED | RFLAGS_IF | RFLAGS_IOPL,
            u64::MAX,
        ];
        for &frame in samples.iter().chain(&bits) {
            for &r11 in samples.iter().chain(&bits) {
                for fmask in [0, 0x4700, LINUX_FMASK, u64::MAX] {
                    let evidence = SyscallEvidence {
                        frame_flags: frame | RFLAGS_FIXED,
                        r11,
                        fmask,
                        bytes_before_rcx: Some(SYSCALL_OPCODE),
                    };
                    if let Ok(flags) = evidence.kernel_flags() {
                        assert_eq!(flags & !RFLAGS_DEFINED, 0, "{evidence:?}");
                        assert_eq!(flags & (RFLAGS_VM | RFLAGS_RF), 0, "{evidence:?}");
                        assert_ne!(flags & RFLAGS_FIXED, 0, "{evidence:?}");
                        assert_eq!(flags & fmask & !RFLAGS_FIXED, 0, "{evidence:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_jump_with_hostile_r11_is_not_a_syscall() {
        let reserved = RFLAGS_FIXED | RFLAGS_IF | (1 << 63) | (1 << 22) | (1 << 15);
        let vm = RFLAGS_FIXED | RFLAGS_IF | RFLAGS_VM;
        let iopl3 = RFLAGS_FIXED | RFLAGS_IF | RFLAGS_IOPL;
        for r11 in [reserved, vm, iopl3] {
            // Linux's FMASK clears IF: a frame with IF set did not come from SYSCALL.
            assert_eq!(
                jump(LINUX_FMASK, r11).kernel_flags(),
                Err(NotSyscall::FlagsNotMasked)
            );
        }
        // With nothing masked, R11 must be the frame's flags and be flags at all.
        assert_eq!(
            jump(0, reserved).kernel_flags(),
            Err(NotSyscall::R11NotFlags)
        );
        assert_eq!(jump(0, vm).kernel_flags(), Err(NotSyscall::R11NotFlags));
        assert_eq!(
            jump(0, iopl3).kernel_flags(),
            Err(NotSyscall::R11NotFrameFlags)
        );
        assert_eq!(jump(0, 0).kernel_flags(), Err(NotSyscall::R11NotFlags));
    }

    #[test]
    fn iopl_in_r11_is_compared_where_fmask_keeps_it() {
        let mut evidence = real_syscall(0x4700);
        evidence.r11 |= RFLAGS_IOPL;
        assert_eq!(evidence.kernel_flags(), Err(NotSyscall::R11NotFrameFlags));
    }

    #[test]
    fn no_syscall_opcode_before_rcx_is_not_a_syscall() {
        for bytes in [
            None,
            Some([0x0f, 0x34]),
            Some([0x05, 0x0f]),
            Some([0x90, 0x90]),
        ] {
            let mut evidence = real_syscall(LINUX_FMASK);
            evidence.bytes_before_rcx = bytes;
            assert_eq!(evidence.kernel_flags(), Err(NotSyscall::NoSyscallBeforeRcx));
        }
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
