//! INT n delivered in IA-32e mode, 32-bit protected mode and real mode (SDM Vol. 2A
//! "INT n/INTO/INT3/INT1" pseudo-code, Vol. 3A 6.12, 6.14 and 20.1.4) on registers and
//! guest RAM built here, without a vCPU: what this host's KVM cannot show us, since it
//! raises #UD for a user-mode INT n itself.

use std::cell::Cell;
use std::sync::{Arc, RwLock};

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use super::*;
use crate::address_map::RangeMap;
use crate::emulate::cpu::{CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_NXE};
use crate::emulate::descriptors::segment_from_raw;
use crate::emulate::exceptions::PF_WRITE;
use crate::emulate::paging::PagingMode;
use crate::handlers::Handler;
use crate::memory::{GuestRam, Mapping, RamRegion};

const GDT: u64 = 0x1_0000;
const IDT: u64 = 0x1_1000;
const TSS: u64 = 0x1_2000;
const KERNEL_CS: u16 = 0x08;
const USER_CS: u16 = 0x23;
const USER_SS: u16 = 0x2b;
const TSS_SELECTOR: u16 = 0x30;
/// 64-bit code, DPL 0, not yet accessed (type 0xa).
const KERNEL_CODE: u64 = 0x00af_9a00_0000_ffff;
const USER_CODE: u64 = 0x00af_fb00_0000_ffff;
const USER_DATA: u64 = 0x00cf_f300_0000_ffff;
const HANDLER: u64 = 0xffff_8000_1234_5678;
const USER_RSP: u64 = 0x10_0008;
/// TSS.RSP0, deliberately not 16-byte aligned (SDM Vol. 3A 6.14.2 aligns it).
const RSP0: u64 = 0x20_0ff8;
const IST1: u64 = 0x30_0000;
const RETURN_RIP: u64 = 0x40_1002;
const USER_FLAGS: u64 = RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | 2;

/// Guest RAM with identity-mapped 2 MiB user pages over the first 8 MiB, a GDT, an IDT
/// and a 64-bit TSS.
struct Machine {
    ram: GuestRam,
    mmio: RwLock<RangeMap<Handler>>,
}

impl Machine {
    fn new() -> Self {
        let mut ram = GuestRam::default();
        ram.insert(RamRegion {
            guest_phys_addr: 0,
            slot: 0,
            mapping: Arc::new(Mapping::anonymous(8 << 20, false).unwrap()),
        });
        let machine = Self {
            ram,
            mmio: RwLock::new(RangeMap::new(1 << 52)),
        };
        machine.put(0x1000, 0x2000 | 7);
        machine.put(0x2000, 0x3000 | 7);
        for page in 0..4 {
            machine.put(0x3000 + page * 8, (page << 21) | 0x87);
        }
        machine.put(GDT + 8, KERNEL_CODE);
        machine.put(GDT + 0x20, USER_CODE);
        machine.put(GDT + 0x28, USER_DATA);
        machine.put(TSS + 4, RSP0);
        machine.put(TSS + 0x24, IST1);
        machine
    }

    fn put(&self, address: u64, value: u64) {
        assert!(self.ram.write_from(address, &value.to_le_bytes()));
    }

    fn get(&self, address: u64) -> u64 {
        let mut bytes = [0u8; 8];
        assert!(self.ram.read_into(address, &mut bytes));
        u64::from_le_bytes(bytes)
    }

    /// A 64-bit gate (SDM Vol. 3A Figure 6-8): `kind` 0xe interrupt, 0xf trap.
    fn gate(&self, vector: u8, kind: u64, dpl: u64, present: bool, ist: u64) {
        let low = (HANDLER & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (ist << 32)
            | (kind << 40)
            | (dpl << 45)
            | (u64::from(present) << 47)
            | ((HANDLER >> 16) & 0xffff) << 48;
        let address = IDT + u64::from(vector) * 16;
        self.put(address, low);
        self.put(address + 8, HANDLER >> 32);
    }

    fn memory(&self) -> GuestView<'_> {
        self.memory_with(paging())
    }

    fn memory_with(&self, paging: PagingMode) -> GuestView<'_> {
        GuestView {
            ram: &self.ram,
            mmio: &self.mmio,
            paging,
            device_exit: Cell::new(None),
        }
    }

    fn put32(&self, address: u64, value: u32) {
        assert!(self.ram.write_from(address, &value.to_le_bytes()));
    }

    fn get32(&self, address: u64) -> u32 {
        let mut bytes = [0u8; 4];
        assert!(self.ram.read_into(address, &mut bytes));
        u32::from_le_bytes(bytes)
    }
}

/// 4-level paging with the tables Machine::new builds.
fn paging() -> PagingMode {
    PagingMode {
        cr0: CR0_PG | CR0_WP | CR0_PE,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LMA | EFER_NXE,
        physical_bits: 46,
    }
}

fn table(base: u64, limit: u16) -> kvm_dtable {
    kvm_dtable {
        base,
        limit,
        ..Default::default()
    }
}

/// A CPL-3 vCPU in 64-bit mode, as KVM reports one.
fn user_cpu() -> CpuState {
    let cr = paging();
    let sregs = kvm_sregs {
        cs: segment_from_raw(USER_CODE, USER_CS),
        ss: segment_from_raw(USER_DATA, USER_SS),
        tr: kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: TSS_SELECTOR,
            type_: 0xb,
            present: 1,
            ..Default::default()
        },
        gdt: table(GDT, 0x37),
        idt: table(IDT, 0xfff),
        cr0: cr.cr0,
        cr3: cr.cr3,
        cr4: cr.cr4,
        efer: cr.efer | (1 << 8),
        ..Default::default()
    };
    let regs = kvm_regs {
        rip: RETURN_RIP - 2,
        rsp: USER_RSP,
        rflags: USER_FLAGS,
        ..Default::default()
    };
    CpuState::new(regs, sregs)
}

fn kernel_cpu() -> CpuState {
    let mut cpu = user_cpu();
    cpu.sregs.cs = segment_from_raw(KERNEL_CODE | (1 << 40), KERNEL_CS);
    cpu.sregs.ss = null_segment(0);
    cpu.regs.rsp = 0x28_0008;
    cpu
}

fn int(machine: &Machine, cpu: &mut CpuState, vector: u8) -> Result<(), Stop> {
    deliver(cpu, &machine.memory(), vector, true, RETURN_RIP)
}

/// Stop has no Debug (it holds a PyErr): these say what a test did not expect.
fn delivered(result: Result<(), Stop>) {
    if let Err(stop) = result {
        panic!("not delivered: {}", describe(&stop));
    }
}

fn fault(result: Result<(), Stop>) -> Fault {
    match result {
        Err(Stop::Fault(fault)) => fault,
        Err(stop) => panic!("no fault: {}", describe(&stop)),
        Ok(()) => panic!("delivered"),
    }
}

fn describe(stop: &Stop) -> String {
    match stop {
        Stop::Fault(fault) => format!("{fault:?}"),
        Stop::Unsupported(reason) => format!("unsupported: {reason}"),
        Stop::Host(err) => format!("host error: {err}"),
    }
}

/// SDM Vol. 3A 6.14.2-6.14.4, Figure 6-9: from CPL 3 through a DPL-3 interrupt gate to
/// a DPL-0 handler: RSP from TSS.RSP0 aligned down to 16, then SS, RSP, RFLAGS, CS and
/// RIP (past the INT) pushed; SS a null selector with RPL 0; CS from the gate with CPL
/// 0; TF, NT, RF, VM and (interrupt gate) IF cleared, AC kept; the code descriptor
/// marked accessed.
#[test]
fn int_from_cpl3_switches_to_the_tss_rsp0_stack() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    let mut cpu = user_cpu();
    delivered(int(&machine, &mut cpu, 0x80));

    let frame = 0x20_0ff0 - 40;
    assert_eq!(cpu.regs.rsp, frame);
    assert_eq!(
        [0, 8, 16, 24, 32].map(|offset| machine.get(frame + offset)),
        [
            RETURN_RIP,
            u64::from(USER_CS),
            USER_FLAGS,
            USER_RSP,
            u64::from(USER_SS)
        ]
    );
    assert_eq!(cpu.regs.rip, HANDLER);
    assert_eq!(cpu.regs.rflags, RFLAGS_AC | 2);
    assert_eq!((cpu.sregs.cs.selector, cpu.sregs.cs.dpl), (KERNEL_CS, 0));
    assert_eq!((cpu.sregs.cs.l, cpu.sregs.cs.type_), (1, 0xb));
    assert_eq!((cpu.sregs.ss.selector, cpu.sregs.ss.unusable), (0, 1));
    assert_eq!(cpu.cpl(), 0);
    assert_eq!(machine.get(GDT + 8), KERNEL_CODE | (1 << 40));
}

/// A trap gate leaves IF set (SDM Vol. 3A 6.12.1.3).
#[test]
fn trap_gate_keeps_if() {
    let machine = Machine::new();
    machine.gate(0x81, GATE_TRAP, 3, true, 0);
    let mut cpu = user_cpu();
    delivered(int(&machine, &mut cpu, 0x81));
    assert_eq!(cpu.regs.rflags, RFLAGS_IF | RFLAGS_AC | 2);
}

/// SDM Vol. 3A 6.14.5: a non-zero IST field takes the stack from the TSS's IST entry,
/// whatever the privilege change.
#[test]
fn ist_gate_uses_the_ist_stack() {
    let machine = Machine::new();
    machine.gate(0x82, GATE_INTERRUPT, 3, true, 1);
    let mut cpu = user_cpu();
    delivered(int(&machine, &mut cpu, 0x82));
    assert_eq!(cpu.regs.rsp, IST1 - 40);
    assert_eq!(machine.get(IST1 - 16), USER_RSP);
    let mut cpu = kernel_cpu();
    delivered(int(&machine, &mut cpu, 0x82));
    assert_eq!(cpu.regs.rsp, IST1 - 40);
    assert_eq!(machine.get(IST1 - 16), 0x28_0008);
}

/// SDM Vol. 3A 6.14.2: without a privilege change the current stack is used, aligned
/// to 16, and SS stays.
#[test]
fn int_at_cpl0_stays_on_the_current_stack() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    let mut cpu = kernel_cpu();
    let ss = cpu.sregs.ss;
    delivered(int(&machine, &mut cpu, 0x80));
    assert_eq!(cpu.regs.rsp, 0x28_0000 - 40);
    assert_eq!(machine.get(0x28_0000 - 16), 0x28_0008);
    assert_eq!(cpu.sregs.ss.selector, ss.selector);
}

/// SDM Vol. 2A INT n: "IF software interrupt AND gate DPL < CPL THEN #GP(vector * 8 +
/// 2)"; an event that is not INT n (ICEBP, software = false) skips the check and
/// carries EXT in any error code.
#[test]
fn gate_dpl_below_cpl_raises_gp() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 0, true, 0);
    let mut cpu = user_cpu();
    assert_eq!(
        fault(int(&machine, &mut cpu, 0x80)),
        Fault::GeneralProtection(0x80 * 8 + 2)
    );
    assert_eq!(cpu.regs.rsp, USER_RSP);
    machine.gate(1, GATE_INTERRUPT, 0, true, 0);
    delivered(deliver(&mut cpu, &machine.memory(), 1, false, RETURN_RIP));
    assert_eq!(cpu.cpl(), 0);
}

/// SDM Vol. 2A INT n: a gate that is not present raises #NP(vector * 8 + 2), after
/// the DPL check.
#[test]
fn gate_not_present_raises_np() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, false, 0);
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::SegmentNotPresent(0x80 * 8 + 2)
    );
    machine.gate(0x80, GATE_INTERRUPT, 0, false, 0);
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::GeneralProtection(0x80 * 8 + 2)
    );
}

/// SDM Vol. 3A 6.14.1: IA-32e mode has only 64-bit interrupt and trap gates (a task
/// gate or a call gate type is #GP(vector * 8 + 2)); a vector beyond the IDT limit is
/// #GP(vector * 8 + 2) too (Vol. 2A INT n).
#[test]
fn invalid_gate_type_or_idt_limit_raises_gp() {
    let machine = Machine::new();
    for kind in [0x5, 0xc, 0x6] {
        machine.gate(0x80, kind, 3, true, 0);
        assert_eq!(
            fault(int(&machine, &mut user_cpu(), 0x80)),
            Fault::GeneralProtection(0x80 * 8 + 2),
            "type {kind:#x}"
        );
    }
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    let mut cpu = user_cpu();
    cpu.sregs.idt.limit = 0x80 * 16 + 14;
    assert_eq!(
        fault(int(&machine, &mut cpu, 0x80)),
        Fault::GeneralProtection(0x80 * 8 + 2)
    );
}

/// SDM Vol. 2A INT n: the gate's code segment must be a code segment with DPL <= CPL
/// (#GP(selector) otherwise), and 64-bit (L = 1, D = 0) in IA-32e mode.
#[test]
fn handler_segment_checks() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    machine.put(GDT + 8, USER_DATA & !(3 << 45));
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::GeneralProtection(u32::from(KERNEL_CS))
    );
    machine.put(GDT + 8, 0x00cf_9a00_0000_ffff); // 32-bit code
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::GeneralProtection(u32::from(KERNEL_CS))
    );
    machine.put(GDT + 8, KERNEL_CODE & !(1 << 47));
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::SegmentNotPresent(u32::from(KERNEL_CS))
    );
}

/// SDM Vol. 3A 7.7: RSP0 lies at offset 4 of the 64-bit TSS; a TSS too short to hold
/// it is #TS(TSS selector).
#[test]
fn tss_too_short_for_rsp0_raises_ts() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    let mut cpu = user_cpu();
    cpu.sregs.tr.limit = 10;
    assert_eq!(
        fault(int(&machine, &mut cpu, 0x80)),
        Fault::InvalidTss(u32::from(TSS_SELECTOR))
    );
}

/// SDM Vol. 2A INT n (IA-32e mode): a non-canonical new stack is #SS(0).
#[test]
fn non_canonical_rsp0_raises_ss() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    machine.put(TSS + 4, 0x8000_0000_0000_0000);
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::StackFault(0)
    );
}

/// The frame is written through the guest's page tables: a not-present RSP0 page is a
/// #PF with the supervisor write's error code (SDM Vol. 3A 4.7), nothing delivered.
#[test]
fn unmapped_rsp0_stack_raises_pf() {
    let machine = Machine::new();
    machine.gate(0x80, GATE_INTERRUPT, 3, true, 0);
    machine.put(TSS + 4, 0x60_0000);
    machine.put(0x3000 + 2 * 8, 0); // unmap 4-6 MiB
    assert_eq!(
        fault(int(&machine, &mut user_cpu(), 0x80)),
        Fault::PageFault {
            address: 0x60_0000 - 40,
            error_code: PF_WRITE
        }
    );
}

/// Flat 32-bit protected mode, paging off: kernel code/data at 0x08/0x10, user
/// code/data at 0x1b/0x23, a 32-bit TSS with SS0:ESP0 = 0x10:ESP0_32.
const ESP0_32: u32 = 0x20_0ffa;
const HANDLER_32: u32 = 0x0012_3456;

fn protected_mode_machine() -> Machine {
    let machine = Machine::new();
    machine.put(GDT + 0x08, 0x00cf_9a00_0000_ffff);
    machine.put(GDT + 0x10, 0x00cf_9300_0000_ffff);
    machine.put(GDT + 0x18, 0x00cf_fb00_0000_ffff);
    machine.put(GDT + 0x20, 0x00cf_f300_0000_ffff);
    machine.put32(TSS + 4, ESP0_32);
    machine.put32(TSS + 8, 0x10);
    machine
}

/// An 8-byte 32-bit gate (SDM Vol. 3A Figure 6-2).
fn gate32(machine: &Machine, vector: u8, kind: u64, dpl: u64) {
    let handler = u64::from(HANDLER_32);
    let gate = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | ((0x80 | (dpl << 5) | kind) << 40)
        | ((handler >> 16) << 48);
    machine.put(IDT + u64::from(vector) * 8, gate);
}

fn protected_mode() -> PagingMode {
    PagingMode {
        cr0: CR0_PE,
        cr3: 0,
        cr4: 0,
        efer: 0,
        physical_bits: 46,
    }
}

fn user_cpu_32() -> CpuState {
    let mut cpu = user_cpu();
    cpu.sregs.cs = segment_from_raw(0x00cf_fb00_0000_ffff, 0x1b);
    cpu.sregs.ss = segment_from_raw(0x00cf_f300_0000_ffff, 0x23);
    cpu.sregs.idt = table(IDT, 0x7ff);
    cpu.sregs.cr0 = CR0_PE;
    cpu.sregs.cr4 = 0;
    cpu.sregs.efer = 0;
    cpu.regs.rflags = RFLAGS_IF | RFLAGS_TF | 2;
    cpu
}

/// SDM Vol. 3A 6.12.1, Figure 6-4: INT n from CPL 3 in 32-bit protected mode loads
/// SS0:ESP0 from the TSS and pushes SS, ESP, EFLAGS, CS, EIP as doublewords.
#[test]
fn int_from_cpl3_in_protected_mode_switches_to_ss0_esp0() {
    let machine = protected_mode_machine();
    gate32(&machine, 0x80, GATE_INTERRUPT, 3);
    let mut cpu = user_cpu_32();
    let memory = machine.memory_with(protected_mode());
    delivered(deliver(&mut cpu, &memory, 0x80, true, RETURN_RIP));

    let esp = u64::from(ESP0_32) - 20;
    assert_eq!(cpu.regs.rsp, esp);
    assert_eq!(
        [0, 4, 8, 12, 16].map(|offset| machine.get32(esp + offset)),
        [
            RETURN_RIP as u32,
            0x1b,
            (RFLAGS_IF | RFLAGS_TF | 2) as u32,
            USER_RSP as u32,
            0x23
        ]
    );
    assert_eq!(cpu.regs.rip, u64::from(HANDLER_32));
    assert_eq!(cpu.regs.rflags, 2);
    assert_eq!((cpu.sregs.cs.selector, cpu.sregs.ss.selector), (0x08, 0x10));
    assert_eq!(cpu.cpl(), 0);
}

/// SDM Vol. 2A INT n: an SS0 whose RPL is not the new CPL, or that is not a writable
/// data segment, is #TS(SS0 selector).
#[test]
fn bad_ss0_in_the_tss_raises_ts() {
    let machine = protected_mode_machine();
    gate32(&machine, 0x80, GATE_INTERRUPT, 3);
    let memory = machine.memory_with(protected_mode());
    machine.put32(TSS + 8, 0x13);
    assert_eq!(
        fault(deliver(&mut user_cpu_32(), &memory, 0x80, true, RETURN_RIP)),
        Fault::InvalidTss(0x10)
    );
    machine.put32(TSS + 8, 0x08);
    assert_eq!(
        fault(deliver(&mut user_cpu_32(), &memory, 0x80, true, RETURN_RIP)),
        Fault::InvalidTss(0x08)
    );
}

/// SDM Vol. 3A 20.1.4: in real-address mode INT n pushes FLAGS, CS and IP and loads
/// CS:IP from the 4-byte IVT entry, clearing IF, TF and AC.
#[test]
fn int_in_real_mode_goes_through_the_ivt() {
    let machine = Machine::new();
    machine.put32(0x10 * 4, 0x1234_5678);
    let mut cpu = user_cpu();
    cpu.sregs.cr0 = 0;
    cpu.sregs.efer = 0;
    cpu.sregs.idt = table(0, 0x3ff);
    cpu.sregs.cs = kvm_segment {
        selector: 0x100,
        base: 0x1000,
        limit: 0xffff,
        ..Default::default()
    };
    cpu.sregs.ss = kvm_segment {
        selector: 0x2000,
        base: 0x2_0000,
        limit: 0xffff,
        ..Default::default()
    };
    cpu.regs.rsp = 0x1000;
    cpu.regs.rflags = RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | 2;
    let memory = machine.memory_with(PagingMode {
        cr0: 0,
        ..protected_mode()
    });
    delivered(deliver_real_mode(&mut cpu, &memory, 0x10, 0x0234));
    assert_eq!(cpu.regs.rsp, 0x1000 - 6);
    let mut frame = [0u8; 6];
    assert!(machine.ram.read_into(0x2_0000 + 0x1000 - 6, &mut frame));
    let words = [0, 2, 4].map(|i| u16::from_le_bytes([frame[i], frame[i + 1]]));
    assert_eq!(words, [0x0234, 0x100, (RFLAGS_IF | RFLAGS_TF | 2) as u16]);
    assert_eq!(
        (cpu.sregs.cs.selector, cpu.sregs.cs.base, cpu.regs.rip),
        (0x1234, 0x12340, 0x5678)
    );
    assert_eq!(cpu.regs.rflags, 2);
}
