//! Operands of the decoded instruction: the effective address of a memory operand
//! (base + index*scale + displacement, RIP-relative, truncated to the address size),
//! its segment, and the values of register, immediate and memory operands.

use iced_x86::{Instruction, OpKind, Register};

use super::cpu::{Cpu, truncate};
use super::decode::Decoded;
use super::exceptions::Fault;
use super::linear::{GuestView, Intent, alignment_check, data_access, linear_address};
use super::stop::Stop;

/// A memory operand resolved to its segment and offset.
#[derive(Debug, Clone, Copy)]
pub struct MemoryOperand {
    pub segment: Register,
    pub offset: u64,
}

/// The memory operand of `decoded` (the instruction has exactly one).
pub fn memory_operand(cpu: &Cpu<'_>, decoded: &Decoded) -> Result<MemoryOperand, Stop> {
    let instruction = &decoded.instruction;
    let offset = effective_address(cpu, instruction, decoded.address_size)?;
    Ok(MemoryOperand {
        segment: instruction.memory_segment(),
        offset,
    })
}

fn effective_address(
    cpu: &Cpu<'_>,
    instruction: &Instruction,
    address_size: u32,
) -> Result<u64, Stop> {
    let base = instruction.memory_base();
    let displacement = instruction.memory_displacement64();
    if matches!(base, Register::RIP | Register::EIP) {
        // iced-x86 has already added the next instruction's address.
        return Ok(truncate(displacement, address_size as usize));
    }
    let register = |register: Register| -> Result<u64, Stop> {
        if register == Register::None {
            return Ok(0);
        }
        cpu.read_register(register)
            .ok_or_else(|| Stop::Unsupported(format!("address register {register:?}")))
    };
    let index = register(instruction.memory_index())?;
    let scale = u64::from(instruction.memory_index_scale());
    let sum = register(base)?
        .wrapping_add(index.wrapping_mul(scale))
        .wrapping_add(displacement);
    Ok(truncate(sum, address_size as usize))
}

impl MemoryOperand {
    /// The linear address of an access of `size` bytes at this operand (+`skip`).
    pub fn linear(
        &self,
        cpu: &Cpu<'_>,
        skip: u64,
        size: usize,
        intent: Intent,
    ) -> Result<u64, Stop> {
        linear_address(
            cpu,
            self.segment,
            self.offset.wrapping_add(skip),
            size,
            intent,
        )
        .map_err(Stop::Fault)
    }

    /// Reads `size` (1..8) bytes as a value, with the #AC check of a data access.
    pub fn read_value(
        &self,
        cpu: &Cpu<'_>,
        memory: &GuestView<'_>,
        size: usize,
    ) -> Result<u64, Stop> {
        let linear = self.linear(cpu, 0, size, Intent::Read)?;
        alignment_check(cpu, linear, size as u64).map_err(Stop::Fault)?;
        memory.read_value(linear, size, data_access(cpu, false))
    }

    pub fn read_bytes(
        &self,
        cpu: &Cpu<'_>,
        memory: &GuestView<'_>,
        out: &mut [u8],
    ) -> Result<(), Stop> {
        let linear = self.linear(cpu, 0, out.len(), Intent::Read)?;
        memory.read(linear, out, data_access(cpu, false))
    }

    pub fn write_bytes(
        &self,
        cpu: &Cpu<'_>,
        memory: &GuestView<'_>,
        data: &[u8],
    ) -> Result<(), Stop> {
        let linear = self.linear(cpu, 0, data.len(), Intent::Write)?;
        memory.write(linear, data, data_access(cpu, true))
    }

    /// #GP(0) unless the operand is aligned on `alignment` bytes (the rule of FXSAVE,
    /// XSAVE, CMPXCHG16B and aligned SSE loads, checked on the effective address as
    /// the SDM words it for these instructions).
    pub fn require_alignment(
        &self,
        cpu: &Cpu<'_>,
        alignment: u64,
        size: usize,
    ) -> Result<u64, Stop> {
        let linear = self.linear(cpu, 0, size, Intent::Read)?;
        if linear % alignment != 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(0)));
        }
        Ok(linear)
    }
}

/// The value of source operand `index` (register, immediate or memory of `size` bytes).
pub fn source_value(
    cpu: &Cpu<'_>,
    memory: &GuestView<'_>,
    decoded: &Decoded,
    index: u32,
    size: usize,
) -> Result<u64, Stop> {
    let instruction = &decoded.instruction;
    match instruction.op_kind(index) {
        OpKind::Register => {
            let register = instruction.op_register(index);
            cpu.read_register(register)
                .ok_or_else(|| Stop::Unsupported(format!("register operand {register:?}")))
        }
        OpKind::Memory => memory_operand(cpu, decoded)?.read_value(cpu, memory, size),
        OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate64 => {
            Ok(truncate(instruction.immediate(index), size))
        }
        OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Ok(truncate(instruction.immediate(index), size)),
        other => Err(Stop::Unsupported(format!("operand kind {other:?}"))),
    }
}
