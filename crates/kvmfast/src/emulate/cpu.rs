//! The vCPU state one completion reads and changes: registers fetched once per exit,
//! written back only when changed, and the architectural views of them (mode, CPL,
//! general registers by their iced-x86 name).

use iced_x86::Register;
use kvm_bindings::{
    KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events,
};
use kvm_ioctls::VcpuFd;
use std::ops::{Deref, DerefMut};

use super::stop::Stop;
use crate::run_page::RunPage;

pub const RFLAGS_CF: u64 = 1 << 0;
pub const RFLAGS_FIXED: u64 = 1 << 1;
pub const RFLAGS_PF: u64 = 1 << 2;
pub const RFLAGS_AF: u64 = 1 << 4;
pub const RFLAGS_ZF: u64 = 1 << 6;
pub const RFLAGS_SF: u64 = 1 << 7;
pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_DF: u64 = 1 << 10;
pub const RFLAGS_OF: u64 = 1 << 11;
pub const RFLAGS_IOPL: u64 = 3 << 12;
pub const RFLAGS_NT: u64 = 1 << 14;
pub const RFLAGS_RF: u64 = 1 << 16;
pub const RFLAGS_VM: u64 = 1 << 17;
pub const RFLAGS_AC: u64 = 1 << 18;
pub const RFLAGS_VIF: u64 = 1 << 19;
pub const RFLAGS_VIP: u64 = 1 << 20;
pub const RFLAGS_ID: u64 = 1 << 21;
/// The six status flags an arithmetic instruction defines.
pub const RFLAGS_STATUS: u64 =
    RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Registers of one exit, with what changed, and the vCPU they go back to.
pub struct Cpu<'a> {
    pub fd: &'a VcpuFd,
    /// The run page when KVM syncs registers through it (KVM_CAP_SYNC_REGS).
    page: Option<&'a RunPage>,
    state: CpuState,
}

/// The registers alone: what the architectural views and most completions need, so
/// that unit tests can build one without a vCPU.
#[derive(Debug, Clone)]
pub struct CpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    regs_changed: bool,
    sregs_changed: bool,
}

impl CpuState {
    pub fn new(regs: kvm_regs, sregs: kvm_sregs) -> Self {
        Self {
            regs,
            sregs,
            regs_changed: false,
            sregs_changed: false,
        }
    }
}

impl Deref for Cpu<'_> {
    type Target = CpuState;

    fn deref(&self) -> &CpuState {
        &self.state
    }
}

impl DerefMut for Cpu<'_> {
    fn deref_mut(&mut self) -> &mut CpuState {
        &mut self.state
    }
}

impl<'a> Cpu<'a> {
    /// The registers of the exit: from the run page when KVM synced them there, else
    /// through KVM_GET_REGS / KVM_GET_SREGS.
    pub fn load(fd: &'a VcpuFd, page: Option<&'a RunPage>) -> Result<Self, Stop> {
        let synced = u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS);
        let page = page.filter(|page| page.valid_regs() & synced == synced);
        let (regs, sregs) = match page {
            Some(page) => {
                let mut sregs = page.sync_sregs();
                sregs.interrupt_bitmap = in_flight_interrupt_bitmap(&page.sync_events());
                (page.sync_regs(), sregs)
            }
            None => (
                fd.get_regs().map_err(|e| Stop::ioctl("KVM_GET_REGS", e))?,
                fd.get_sregs()
                    .map_err(|e| Stop::ioctl("KVM_GET_SREGS", e))?,
            ),
        };
        Ok(Self {
            fd,
            page,
            state: CpuState::new(regs, sregs),
        })
    }

    /// A state to start from without ioctls (after a rollback).
    pub fn from_state(&self, regs: kvm_regs, sregs: kvm_sregs) -> Self {
        Self {
            fd: self.fd,
            page: self.page,
            state: CpuState::new(regs, sregs),
        }
    }

    /// Writes back what changed.
    pub fn store(&mut self) -> Result<(), Stop> {
        if let Some(page) = self.page {
            if self.sregs_changed {
                page.put_sync_sregs(&self.sregs);
            }
            if self.regs_changed {
                page.put_sync_regs(&self.regs);
            }
            self.sregs_changed = false;
            self.regs_changed = false;
            return Ok(());
        }
        if self.sregs_changed {
            self.fd
                .set_sregs(&self.sregs)
                .map_err(|e| Stop::ioctl("KVM_SET_SREGS", e))?;
            self.sregs_changed = false;
        }
        if self.regs_changed {
            self.fd
                .set_regs(&self.regs)
                .map_err(|e| Stop::ioctl("KVM_SET_REGS", e))?;
            self.regs_changed = false;
        }
        Ok(())
    }

    /// Interrupt, NMI and exception state (synced, or KVM_GET_VCPU_EVENTS).
    pub fn events(&self) -> Result<kvm_vcpu_events, Stop> {
        match self.page {
            Some(page) => Ok(page.sync_events()),
            None => self
                .fd
                .get_vcpu_events()
                .map_err(|e| Stop::ioctl("KVM_GET_VCPU_EVENTS", e)),
        }
    }

    /// Sets events as KVM_SET_VCPU_EVENTS does (at the next entry when synced).
    pub fn set_events(&self, events: &kvm_vcpu_events) -> Result<(), Stop> {
        match self.page {
            Some(page) => {
                page.put_sync_events(events);
                Ok(())
            }
            None => self
                .fd
                .set_vcpu_events(events)
                .map_err(|e| Stop::ioctl("KVM_SET_VCPU_EVENTS", e)),
        }
    }
}

impl CpuState {
    pub fn regs_mut(&mut self) -> &mut kvm_regs {
        self.regs_changed = true;
        &mut self.regs
    }

    pub fn sregs_mut(&mut self) -> &mut kvm_sregs {
        self.sregs_changed = true;
        &mut self.sregs
    }

    pub fn long_mode(&self) -> bool {
        self.sregs.efer & EFER_LMA != 0
    }

    pub fn protected_mode(&self) -> bool {
        self.sregs.cr0 & CR0_PE != 0
    }

    pub fn virtual_8086(&self) -> bool {
        self.protected_mode() && !self.long_mode() && self.regs.rflags & RFLAGS_VM != 0
    }

    /// 16, 32 or 64: the default operand size of the code segment.
    pub fn bitness(&self) -> u32 {
        if self.long_mode() && self.sregs.cs.l != 0 {
            64
        } else if self.protected_mode() && !self.virtual_8086() && self.sregs.cs.db != 0 {
            32
        } else {
            16
        }
    }

    /// The current privilege level: SS.DPL in protected mode (SDM Vol. 3A 5.5 keeps it
    /// there too), 3 in virtual-8086 mode, 0 in real mode.
    pub fn cpl(&self) -> u8 {
        if !self.protected_mode() {
            0
        } else if self.virtual_8086() {
            3
        } else {
            self.sregs.ss.dpl
        }
    }

    pub fn rflags(&self) -> u64 {
        self.regs.rflags
    }

    pub fn set_rflags(&mut self, value: u64) {
        self.regs_mut().rflags = value | RFLAGS_FIXED;
    }

    /// Moves RIP past an instruction of `length` bytes, wrapping as the mode does.
    pub fn advance(&mut self, next_rip: u64) {
        let mask = match self.bitness() {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        };
        let regs = self.regs_mut();
        regs.rip = next_rip & mask;
        // An instruction that completes clears RF (SDM Vol. 3A 18.3.1.1).
        regs.rflags &= !RFLAGS_RF;
    }

    /// General register n in encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..).
    pub fn gpr(&self, n: usize) -> u64 {
        let r = &self.regs;
        [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ][n & 15]
    }

    pub fn set_gpr(&mut self, n: usize, value: u64) {
        let r = self.regs_mut();
        let slot = match n & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => &mut r.rsp,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = value;
    }

    /// The value of a general register by its iced-x86 name (any width, AH..BH too).
    pub fn read_register(&self, register: Register) -> Option<u64> {
        if let Some(n) = high_byte_register(register) {
            return Some((self.gpr(n) >> 8) & 0xff);
        }
        match register {
            Register::RIP => return Some(self.regs.rip),
            Register::EIP => return Some(self.regs.rip & 0xffff_ffff),
            _ => {}
        }
        if !register.is_gpr() {
            return None;
        }
        let value = self.gpr(gpr_index(register));
        Some(truncate(value, register.size()))
    }

    /// Writes a general register as the CPU does: 32-bit writes zero the upper half,
    /// 8- and 16-bit writes keep the other bits.
    pub fn write_register(&mut self, register: Register, value: u64) -> Option<()> {
        if let Some(n) = high_byte_register(register) {
            let old = self.gpr(n);
            self.set_gpr(n, (old & !0xff00) | ((value & 0xff) << 8));
            return Some(());
        }
        if !register.is_gpr() {
            return None;
        }
        let n = gpr_index(register);
        let old = self.gpr(n);
        let new = match register.size() {
            1 => (old & !0xff) | (value & 0xff),
            2 => (old & !0xffff) | (value & 0xffff),
            4 => value & 0xffff_ffff,
            _ => value,
        };
        self.set_gpr(n, new);
        Some(())
    }

    pub fn segment(&self, register: Register) -> Option<&kvm_segment> {
        let s = &self.sregs;
        Some(match register {
            Register::ES => &s.es,
            Register::CS => &s.cs,
            Register::SS => &s.ss,
            Register::DS => &s.ds,
            Register::FS => &s.fs,
            Register::GS => &s.gs,
            _ => return None,
        })
    }
}

/// `interrupt_bitmap` as KVM_GET_SREGS gives it: the vector of the external interrupt
/// KVM has in flight, else nothing.
///
/// The run page's copy cannot be used: KVM's store_regs fills it without clearing it
/// first (found on this host, kernel 6.18: the vector of a timer interrupt in flight at
/// one exit stays set at every later exit), and KVM_SET_SREGS -- a completion's write
/// back -- queues the vector it finds there as injected (KVM API document: "pending
/// external interrupts ... acknowledged by the APIC but not yet injected"), delivered
/// at the next entry whatever RFLAGS.IF says: a spurious interrupt on the first
/// instruction of the #BP handler a completed INT3 entered with IF clear, or at LSTAR
/// after a SYSCALL repair, at CPL 0 on the user's stack (docs/emulation.md).
fn in_flight_interrupt_bitmap(events: &kvm_vcpu_events) -> [u64; 4] {
    let mut bitmap = [0u64; 4];
    if events.interrupt.injected != 0 && events.interrupt.soft == 0 {
        let vector = usize::from(events.interrupt.nr);
        bitmap[vector / 64] |= 1 << (vector % 64);
    }
    bitmap
}

/// AH, CH, DH, BH: the register number whose bits 15:8 they name.
fn high_byte_register(register: Register) -> Option<usize> {
    match register {
        Register::AH => Some(0),
        Register::CH => Some(1),
        Register::DH => Some(2),
        Register::BH => Some(3),
        _ => None,
    }
}

fn gpr_index(register: Register) -> usize {
    register.full_register() as usize - Register::RAX as usize
}

pub fn truncate(value: u64, bytes: usize) -> u64 {
    match bytes {
        1 => value & 0xff,
        2 => value & 0xffff,
        4 => value & 0xffff_ffff,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interrupt_bitmap_holds_only_the_interrupt_in_flight() {
        let mut events = kvm_vcpu_events::default();
        events.interrupt.nr = 0x30;
        assert_eq!(in_flight_interrupt_bitmap(&events), [0; 4]);
        events.interrupt.injected = 1;
        assert_eq!(in_flight_interrupt_bitmap(&events), [1 << 48, 0, 0, 0]);
        events.interrupt.nr = 0xff;
        assert_eq!(in_flight_interrupt_bitmap(&events), [0, 0, 0, 1 << 63]);
        // A software interrupt is re-executed, not re-injected (KVM reports none).
        events.interrupt.soft = 1;
        assert_eq!(in_flight_interrupt_bitmap(&events), [0; 4]);
    }
}
