//! RDTSCP and RDPID (SDM Vol. 2B): the guest's TSC and IA32_TSC_AUX through
//! KVM_GET_MSRS.

use iced_x86::{Instruction, Mnemonic, Register};
use kvm_bindings::{Msrs, kvm_msr_entry};

use super::completion::Completion;
use super::cpu::{CR4_TSD, Cpu, truncate};
use super::exceptions::Fault;
use super::stop::Stop;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_AUX: u32 = 0xc000_0103;

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    let instruction = c.decoded.instruction;
    let indices = msrs_to_read(&instruction, c.cpu.sregs.cr4, c.cpu.cpl()).map_err(Stop::Fault)?;
    let values = read_msrs(&c.cpu, indices)?;
    for (register, value) in results(&instruction, &values) {
        c.cpu.write_register(register, value).ok_or_else(|| {
            Stop::Unsupported(format!("{:?} into {register:?}", instruction.mnemonic()))
        })?;
    }
    c.advance();
    Ok(())
}

/// The MSRs the instruction reads, once its privilege check has passed. RDTSCP: "#GP(0)
/// If the TSD flag in register CR4 is set and the CPL is greater than 0" (SDM Vol. 2B
/// RDTSCP); RDPID has no such check (SDM Vol. 2B RDPID, protected-mode exceptions).
fn msrs_to_read(instruction: &Instruction, cr4: u64, cpl: u8) -> Result<&'static [u32], Fault> {
    if instruction.mnemonic() == Mnemonic::Rdtscp {
        if cr4 & CR4_TSD != 0 && cpl > 0 {
            return Err(Fault::GeneralProtection(0));
        }
        Ok(&[MSR_IA32_TSC, MSR_IA32_TSC_AUX])
    } else {
        Ok(&[MSR_IA32_TSC_AUX])
    }
}

/// The registers written from the MSR values read, in the order of `msrs_to_read`.
/// RDTSCP: EDX:EAX = TSC, ECX = IA32_TSC_AUX[31:0], as 32-bit writes (which clear the
/// high halves of RAX, RDX and RCX in 64-bit mode). RDPID: the whole MSR into r64 in
/// 64-bit mode, its low half into r32 elsewhere.
fn results(instruction: &Instruction, values: &[u64]) -> Vec<(Register, u64)> {
    if instruction.mnemonic() == Mnemonic::Rdtscp {
        let (tsc, aux) = (values[0], values[1]);
        vec![
            (Register::EAX, tsc & 0xffff_ffff),
            (Register::EDX, tsc >> 32),
            (Register::ECX, aux & 0xffff_ffff),
        ]
    } else {
        let destination = instruction.op0_register();
        vec![(destination, truncate(values[0], destination.size()))]
    }
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

#[cfg(test)]
mod tests;
