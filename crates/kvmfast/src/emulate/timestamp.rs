//! RDTSCP and RDPID (SDM Vol. 2B): the guest's TSC and IA32_TSC_AUX through
//! KVM_GET_MSRS.

use iced_x86::Mnemonic;
use kvm_bindings::{Msrs, kvm_msr_entry};

use super::cpu::{CR4_TSD, Cpu};
use super::exceptions::Fault;
use super::{Completion, Stop};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_AUX: u32 = 0xc000_0103;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    if c.decoded.instruction.mnemonic() == Mnemonic::Rdtscp {
        // "#GP(0) If the TSD flag in register CR4 is set and the CPL is greater than 0."
        if c.cpu.sregs.cr4 & CR4_TSD != 0 && c.cpu.cpl() > 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(0)));
        }
        let values = read_msrs(&c.cpu, &[MSR_IA32_TSC, MSR_IA32_TSC_AUX])?;
        let (tsc, aux) = (values[0], values[1]);
        let regs = c.cpu.regs_mut();
        regs.rax = tsc & 0xffff_ffff;
        regs.rdx = tsc >> 32;
        regs.rcx = aux & 0xffff_ffff;
    } else {
        let aux = read_msrs(&c.cpu, &[MSR_IA32_TSC_AUX])?[0];
        let destination = c.decoded.instruction.op0_register();
        // RDPID r64 stores the whole MSR in 64-bit mode; r32 elsewhere (its high half is
        // zero in practice).
        c.cpu
            .write_register(destination, aux)
            .ok_or_else(|| Stop::Unsupported(format!("RDPID into {destination:?}")))?;
    }
    c.advance();
    Ok(())
}

fn read_msrs(cpu: &Cpu<'_>, indices: &[u32]) -> Result<Vec<u64>, Stop> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| Stop::Unsupported(format!("MSR list: {e:?}")))?;
    let read = cpu
        .fd
        .get_msrs(&mut msrs)
        .map_err(|e| Stop::ioctl("KVM_GET_MSRS", e))?;
    if read < indices.len() {
        return Err(Stop::Unsupported(format!(
            "KVM cannot read MSR {:#x}",
            indices[read]
        )));
    }
    Ok(msrs.as_slice().iter().map(|entry| entry.data).collect())
}

/// One MSR of the guest (LSTAR, STAR, FMASK for the SYSCALL repair).
pub fn read_msr(cpu: &Cpu<'_>, index: u32) -> Result<u64, Stop> {
    Ok(read_msrs(cpu, &[index])?[0])
}
