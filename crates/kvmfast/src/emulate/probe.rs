//! Start-up probes: small guests that show whether this host's KVM has a quirk the
//! completions must repair. Each runs on a VM of its own, in Rust, before the caller's
//! VM exists; a probe that cannot run reports "no quirk".

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::fpu_state::host_mxcsr_mask;
use super::host_quirks::HostQuirks;
use crate::memory::Mapping;

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_FMASK: u32 = 0xc000_0084;

/// Runs every probe.
pub fn probe(kvm: &Kvm) -> HostQuirks {
    HostQuirks {
        syscall_keeps_user_cs: syscall_keeps_user_cs(kvm).unwrap_or(false),
        mxcsr_mask: host_mxcsr_mask(),
    }
}

const RAM: usize = 4 << 20;
const PML4: u64 = 0x1000;
const GDT: u64 = 0x4000;
const TSS: u64 = 0x5000;
const IDT: u64 = 0x6000;
const PF_HANDLER: u64 = 0x7000;
const SYSCALL_ENTRY: u64 = 0x7100;
const KERNEL_STACK: u64 = 0x9000;
const USER_CODE: u64 = 0x20_0000;
const USER_STACK: u64 = 0x3f_f000;
const PORT_PAGE_FAULT: u16 = 0xf5;
const PORT_SYSCALL_ENTRY: u16 = 0xf6;

/// A user-mode SYSCALL whose kernel entry is on a supervisor page: a correct KVM
/// arrives at LSTAR in CPL 0 (OUT to 0xF6); the quirk arrives at the #PF handler with
/// CR2 = LSTAR and a CPL-3 frame whose RIP is LSTAR (OUT to 0xF5).
fn syscall_keeps_user_cs(kvm: &Kvm) -> Option<bool> {
    // RAM first, so that it is dropped after the VM on every return.
    let ram = Mapping::anonymous(RAM, false).ok()?;
    let vm = kvm.create_vm().ok()?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: ram.as_ptr() as u64,
    };
    // SAFETY: the mapping outlives the VM fd (declared before it, dropped after it).
    unsafe { vm.set_user_memory_region(region) }.ok()?;
    // Every address used below lies inside the 4 MiB mapping (else a panic, not a stray
    // access: Mapping checks).
    let write = |address: u64, bytes: &[u8]| ram.write_from(address as usize, bytes);
    let read_u64 = |address: u64| -> u64 {
        let mut bytes = [0u8; 8];
        ram.read_into(address as usize, &mut bytes);
        u64::from_le_bytes(bytes)
    };
    // Page tables: the first 2 MiB supervisor-only, the second user-accessible.
    write(PML4, &(0x2000u64 | 7).to_le_bytes());
    write(0x2000, &(0x3000u64 | 7).to_le_bytes());
    write(0x3000, &(0x83u64).to_le_bytes());
    write(0x3008, &(USER_CODE | 0x87).to_le_bytes());
    // GDT: null, kernel code/data, user code32/data/code64, 64-bit TSS.
    let tss_low = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40);
    let gdt: [u64; 8] = [
        0,
        0x00AF_9B00_0000_FFFF,
        0x00CF_9300_0000_FFFF,
        0x00CF_FB00_0000_FFFF,
        0x00CF_F300_0000_FFFF,
        0x00AF_FB00_0000_FFFF,
        tss_low,
        0,
    ];
    for (i, descriptor) in gdt.iter().enumerate() {
        write(GDT + 8 * i as u64, &descriptor.to_le_bytes());
    }
    write(TSS + 4, &KERNEL_STACK.to_le_bytes());
    // IDT[14]: a 64-bit interrupt gate to the #PF handler.
    let gate_low = (PF_HANDLER & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((PF_HANDLER >> 16) << 48);
    write(IDT + 14 * 16, &gate_low.to_le_bytes());
    write(IDT + 14 * 16 + 8, &0u64.to_le_bytes());
    write(PF_HANDLER, &[0xe6, PORT_PAGE_FAULT as u8, 0xf4]);
    write(SYSCALL_ENTRY, &[0xe6, PORT_SYSCALL_ENTRY as u8, 0xf4]);
    write(USER_CODE, &[0x0f, 0x05, 0xf4]);

    let mut vcpu = vm.create_vcpu(0).ok()?;
    if let Ok(cpuid) = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
        vcpu.set_cpuid2(&cpuid).ok()?;
    }
    enter_user_mode(&vcpu)?;
    let mut verdict = None;
    for _ in 0..16 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_PAGE_FAULT, _)) => {
                let sregs = vcpu.get_sregs().ok()?;
                let rsp = vcpu.get_regs().ok()?.rsp;
                // The frame: error code, RIP, CS, RFLAGS, RSP, SS.
                let rip = read_u64(rsp + 8);
                let cs = read_u64(rsp + 16);
                verdict = Some(sregs.cr2 == SYSCALL_ENTRY && rip == SYSCALL_ENTRY && cs & 3 == 3);
                break;
            }
            Ok(VcpuExit::IoOut(PORT_SYSCALL_ENTRY, _)) => {
                verdict = Some(false);
                break;
            }
            Ok(VcpuExit::Intr) => {}
            _ => break,
        }
    }
    drop(vcpu);
    drop(vm);
    drop(ram);
    verdict
}

fn flat(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn enter_user_mode(vcpu: &VcpuFd) -> Option<()> {
    let mut sregs = vcpu.get_sregs().ok()?;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8001_0011; // PG | WP | ET | PE
    sregs.efer = (1 << 10) | (1 << 8) | 1; // LMA | LME | SCE
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 8 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cs = flat(0x2b, true, 3);
    let data = flat(0x23, false, 3);
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x30,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    vcpu.set_sregs(&sregs).ok()?;
    let mut regs = vcpu.get_regs().ok()?;
    regs.rip = USER_CODE;
    regs.rsp = USER_STACK;
    regs.rflags = 0x202;
    vcpu.set_regs(&regs).ok()?;
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_STAR,
            data: (0x18 << 48) | (0x08 << 32),
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_LSTAR,
            data: SYSCALL_ENTRY,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_FMASK,
            data: 0x4700,
            ..Default::default()
        },
    ])
    .ok()?;
    (vcpu.set_msrs(&msrs).ok()? == 3).then_some(())
}
