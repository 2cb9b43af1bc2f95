//! What the run ends with when nobody can complete an instruction: where (RIP, CPL,
//! the symbol), what (Intel syntax and bytes), why, and the registers.

use iced_x86::{Formatter, IntelFormatter};

use super::cpu::Cpu;
use super::decode::Decoded;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rip: u64,
    pub cpl: u8,
    pub bitness: u32,
    /// Intel syntax, or "(undecodable)".
    pub instruction: String,
    pub bytes: Vec<u8>,
    pub reason: String,
    pub registers: String,
}

impl Report {
    pub fn new(cpu: &Cpu<'_>, decoded: Option<&Decoded>, bytes: &[u8], reason: String) -> Self {
        let instruction = decoded.map_or_else(
            || "(undecodable)".to_string(),
            |decoded| intel_syntax(&decoded.instruction),
        );
        let bytes = decoded.map_or_else(|| bytes.to_vec(), |decoded| decoded.bytes.clone());
        Self {
            rip: cpu.regs.rip,
            cpl: cpu.cpl(),
            bitness: cpu.bitness(),
            instruction,
            bytes,
            reason,
            registers: registers(cpu),
        }
    }

    /// The message of the EmulationFailure, with the symbol when one is known.
    pub fn message(&self, symbol: Option<&str>) -> String {
        let at = symbol.map_or_else(String::new, |symbol| format!(" <{symbol}>"));
        format!(
            "cannot complete `{}` ({}) at RIP {:#x}{at}, CPL {}, {}-bit code: {}\n{}",
            self.instruction,
            hex_bytes(&self.bytes),
            self.rip,
            self.cpl,
            self.bitness,
            self.reason,
            self.registers
        )
    }
}

pub fn intel_syntax(instruction: &iced_x86::Instruction) -> String {
    let mut formatter = IntelFormatter::new();
    let mut text = String::new();
    formatter.format(instruction, &mut text);
    text
}

pub fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn registers(cpu: &Cpu<'_>) -> String {
    let r = &cpu.regs;
    let s = &cpu.sregs;
    format!(
        "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n\
         RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
         R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n\
         R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
         RIP={:016x} RFLAGS={:08x} CS={:04x} SS={:04x} DS={:04x} ES={:04x} FS={:04x} GS={:04x}\n\
         CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:x} FS.base={:x} GS.base={:x}",
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.rsp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rip,
        r.rflags,
        s.cs.selector,
        s.ss.selector,
        s.ds.selector,
        s.es.selector,
        s.fs.selector,
        s.gs.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.fs.base,
        s.gs.base
    )
}
