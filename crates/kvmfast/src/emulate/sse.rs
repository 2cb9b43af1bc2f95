//! SSE, SSE2, SSE3, SSSE3 and SSE4.1 computations (what a kernel runs between
//! kernel_fpu_begin and kernel_fpu_end, e.g. blake2s_compress_ssse3), performed by the
//! host processor itself against the guest's vector state.
//!
//! Only an allow-list runs: legacy-encoded instructions of those CPUID features whose
//! operands are XMM registers, at most one memory operand and an 8-bit immediate -- pure
//! computations, no control flow, no system state, no other memory. The instruction is
//! re-encoded by iced-x86 from its decoded form with the memory operand replaced by
//! [RDI], which points at a bounce buffer, and the result is decoded again and checked
//! before it goes into an executable stub: no guest byte is ever executed as such.
//! Floating-point exceptions run masked on the host; one the guest leaves unmasked
//! becomes #XM (#UD without CR4.OSXMMEXCPT) with the registers unchanged.

use std::collections::HashMap;

use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, Encoder, EncodingKind, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};

use super::cpu::{CR4_OSFXSR, CR4_OSXMMEXCPT, RFLAGS_STATUS};
use super::exceptions::Fault;
use super::fpu_state::{FEATURE_SSE, XsaveArea, check_device_available};
use super::linear::{Intent, alignment_check, data_access};
use super::operands::memory_operand;
use super::{Completion, Stop};

const FEATURES: [CpuidFeature; 5] = [
    CpuidFeature::SSE,
    CpuidFeature::SSE2,
    CpuidFeature::SSE3,
    CpuidFeature::SSSE3,
    CpuidFeature::SSE4_1,
];

/// Whether the instruction is a pure SSE..SSE4.1 computation this module may run.
pub fn allowed(instruction: &Instruction) -> bool {
    if instruction.encoding() != EncodingKind::Legacy {
        return false;
    }
    let features = instruction.cpuid_features();
    if features.is_empty() || !features.iter().all(|f| FEATURES.contains(f)) {
        return false;
    }
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Ldmxcsr
            | Mnemonic::Stmxcsr
            | Mnemonic::Maskmovdqu
            | Mnemonic::Monitor
            | Mnemonic::Mwait
            | Mnemonic::Lfence
            | Mnemonic::Mfence
            | Mnemonic::Sfence
            | Mnemonic::Clflush
            | Mnemonic::Prefetchnta
            | Mnemonic::Prefetcht0
            | Mnemonic::Prefetcht1
            | Mnemonic::Prefetcht2
            | Mnemonic::Pause
    ) {
        return false;
    }
    let mut memory = 0;
    let mut xmm = 0;
    for index in 0..instruction.op_count() {
        match instruction.op_kind(index) {
            OpKind::Register if instruction.op_register(index).is_xmm() => xmm += 1,
            OpKind::Memory => memory += 1,
            OpKind::Immediate8 => {}
            _ => return false,
        }
    }
    xmm >= 1 && memory <= 1
}

/// The instructions whose 16-byte memory operand may be misaligned (SDM Vol. 1 11.4.1:
/// the others raise #GP(0)).
fn unaligned_ok(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Lddqu
    )
}

/// What the stubs exchange with Rust: the XMM registers, MXCSR, RFLAGS, the host's
/// MXCSR, and the bounce buffer the memory operand is redirected to.
#[repr(C, align(16))]
struct Exchange {
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    host_mxcsr: u32,
    rflags: u64,
    bounce: [u8; 16],
}

const XMM_AT: i32 = 0;
const MXCSR_AT: i32 = 256;
const HOST_MXCSR_AT: i32 = 260;
const RFLAGS_AT: i32 = 264;
const BOUNCE_AT: i32 = 272;
const _: () = {
    assert!(std::mem::offset_of!(Exchange, xmm) == XMM_AT as usize);
    assert!(std::mem::offset_of!(Exchange, mxcsr) == MXCSR_AT as usize);
    assert!(std::mem::offset_of!(Exchange, host_mxcsr) == HOST_MXCSR_AT as usize);
    assert!(std::mem::offset_of!(Exchange, rflags) == RFLAGS_AT as usize);
    assert!(std::mem::offset_of!(Exchange, bounce) == BOUNCE_AT as usize);
};
const STUB_CACHE_LIMIT: usize = 4096;
const PAGE: usize = 4096;

/// Executable stubs, one page each, keyed by the re-encoded instruction.
#[derive(Default)]
pub struct StubCache {
    stubs: HashMap<Vec<u8>, ExecutablePage>,
}

struct ExecutablePage {
    address: *mut u8,
}

// SAFETY: the page is immutable once made executable and owned by its cache.
unsafe impl Send for ExecutablePage {}

impl Drop for ExecutablePage {
    fn drop(&mut self) {
        // SAFETY: one page mapped by ExecutablePage::new, used by nothing else now.
        unsafe { libc::munmap(self.address.cast(), PAGE) };
    }
}

impl ExecutablePage {
    fn new(code: &[u8]) -> Result<Self, Stop> {
        if code.len() > PAGE {
            return Err(Stop::Unsupported("an SSE stub larger than a page".into()));
        }
        // SAFETY: a fresh private anonymous page; written, then made read+execute only.
        unsafe {
            let address = libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if address == libc::MAP_FAILED {
                return Err(Stop::Unsupported("mmap for an SSE stub failed".into()));
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), address.cast::<u8>(), code.len());
            let page = Self {
                address: address.cast(),
            };
            if libc::mprotect(address, PAGE, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return Err(Stop::Unsupported("mprotect for an SSE stub failed".into()));
            }
            Ok(page)
        }
    }
}

/// movdqu xmmN, [rsi + disp32] (load) or movdqu [rsi + disp32], xmmN (store).
fn movdqu(register: usize, displacement: i32, load: bool) -> Vec<u8> {
    let mut bytes = vec![0xf3];
    if register >= 8 {
        bytes.push(0x44);
    }
    bytes.extend_from_slice(&[0x0f, if load { 0x6f } else { 0x7f }]);
    bytes.push(0x80 | (((register & 7) as u8) << 3) | 0x06);
    bytes.extend_from_slice(&displacement.to_le_bytes());
    bytes
}

/// ldmxcsr/stmxcsr [rsi + disp32].
fn mxcsr_access(displacement: i32, load: bool) -> Vec<u8> {
    let reg = if load { 2 } else { 3 };
    let mut bytes = vec![0x0f, 0xae, 0x80 | (reg << 3) | 0x06];
    bytes.extend_from_slice(&displacement.to_le_bytes());
    bytes
}

/// The stub: host MXCSR saved, guest registers in, the instruction, guest registers
/// and flags out, host MXCSR back. RSI = &Exchange, RDI = &Exchange.bounce.
fn stub_code(instruction_bytes: &[u8]) -> Vec<u8> {
    let mut code = Vec::new();
    code.extend(mxcsr_access(HOST_MXCSR_AT, false));
    for register in 0..16 {
        code.extend(movdqu(register, XMM_AT + 16 * register as i32, true));
    }
    code.extend(mxcsr_access(MXCSR_AT, true));
    code.extend_from_slice(instruction_bytes);
    // pushfq; pop qword ptr [rsi + RFLAGS_AT]
    code.push(0x9c);
    code.extend_from_slice(&[0x8f, 0x86]);
    code.extend_from_slice(&RFLAGS_AT.to_le_bytes());
    code.extend(mxcsr_access(MXCSR_AT, false));
    for register in 0..16 {
        code.extend(movdqu(register, XMM_AT + 16 * register as i32, false));
    }
    code.extend(mxcsr_access(HOST_MXCSR_AT, true));
    code.push(0xc3);
    code
}

/// The instruction re-encoded for the host with its memory operand at [RDI], checked
/// by decoding it back.
fn host_encoding(instruction: &Instruction) -> Result<Vec<u8>, Stop> {
    let mut host = *instruction;
    let has_memory = (0..host.op_count()).any(|i| host.op_kind(i) == OpKind::Memory);
    if has_memory {
        host.set_memory_base(Register::RDI);
        host.set_memory_index(Register::None);
        host.set_memory_index_scale(1);
        host.set_memory_displacement64(0);
        host.set_memory_displ_size(0);
        host.set_segment_prefix(Register::None);
    }
    let mut encoder = Encoder::new(64);
    encoder
        .encode(&host, 0)
        .map_err(|e| Stop::Unsupported(format!("re-encoding {:?}: {e}", instruction.code())))?;
    let bytes = encoder.take_buffer();
    let mut decoder = Decoder::with_ip(64, &bytes, 0, DecoderOptions::NONE);
    let check = decoder.decode();
    let same_registers = (0..check.op_count()).all(|i| match check.op_kind(i) {
        OpKind::Register => check.op_register(i) == instruction.op_register(i),
        OpKind::Memory => {
            check.memory_base() == Register::RDI
                && check.memory_index() == Register::None
                && check.memory_displacement64() == 0
        }
        OpKind::Immediate8 => check.immediate8() == instruction.immediate8(),
        _ => false,
    });
    if check.code() != instruction.code()
        || check.code() == Code::INVALID
        || check.len() != bytes.len()
        || check.op_count() != instruction.op_count()
        || !same_registers
    {
        return Err(Stop::Unsupported(format!(
            "re-encoding {:?} did not give back the same instruction",
            instruction.code()
        )));
    }
    Ok(bytes)
}

impl StubCache {
    fn stub(&mut self, instruction: &Instruction) -> Result<*const u8, Stop> {
        let key = host_encoding(instruction)?;
        if !self.stubs.contains_key(&key) {
            if self.stubs.len() >= STUB_CACHE_LIMIT {
                self.stubs.clear();
            }
            let page = ExecutablePage::new(&stub_code(&key))?;
            self.stubs.insert(key.clone(), page);
        }
        Ok(self.stubs[&key].address.cast_const())
    }
}

pub fn complete(c: &mut Completion<'_>, stubs: &mut StubCache) -> Result<(), Stop> {
    // SDM Vol. 2 SSE exception class: #UD when CR0.EM or !CR4.OSFXSR, #NM when CR0.TS.
    if c.cpu.sregs.cr4 & CR4_OSFXSR == 0 {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    check_device_available(&c.cpu)?;
    let instruction = c.decoded.instruction;
    let mut info_factory = InstructionInfoFactory::new();
    let info = info_factory.info(&instruction);
    let used_memory = info.used_memory().first().copied();
    let mut exchange = Exchange {
        xmm: [[0; 16]; 16],
        mxcsr: 0,
        host_mxcsr: 0,
        rflags: 0,
        bounce: [0; 16],
    };
    let mut memory_target = None;
    if let Some(used) = used_memory {
        let size = used.memory_size().size();
        if size == 0 || size > 16 {
            return Err(Stop::Unsupported(format!(
                "a {size}-byte SSE memory operand"
            )));
        }
        let operand = memory_operand(&c.cpu, &c.decoded)?;
        let reads = matches!(
            used.access(),
            OpAccess::Read | OpAccess::ReadWrite | OpAccess::CondRead | OpAccess::ReadCondWrite
        );
        let writes = matches!(
            used.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        );
        let intent = if writes { Intent::Write } else { Intent::Read };
        let linear = operand.linear(&c.cpu, 0, size, intent)?;
        if size == 16 && !unaligned_ok(instruction.mnemonic()) && linear % 16 != 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(0)));
        }
        alignment_check(&c.cpu, linear, 1).map_err(Stop::Fault)?;
        if reads {
            c.memory.read(
                linear,
                &mut exchange.bounce[..size],
                data_access(&c.cpu, false),
            )?;
        }
        if writes {
            c.memory
                .probe_write(linear, size, data_access(&c.cpu, true))?;
            memory_target = Some((linear, size));
        }
    }
    let mut area = XsaveArea::load(c.cpu.fd)?;
    for (n, register) in exchange.xmm.iter_mut().enumerate() {
        *register = area.xmm(n);
    }
    let guest_mxcsr = area.mxcsr();
    // All exceptions masked on the host, flags cleared: what the instruction raises is
    // then exactly the flags it sets.
    exchange.mxcsr = (guest_mxcsr | 0x1f80) & !0x3f;
    let stub = stubs.stub(&instruction)?;
    let exchange_pointer: *mut Exchange = &mut exchange;
    // SAFETY: the stub was generated above from an allow-listed instruction re-encoded
    // and verified by iced-x86; it reads and writes only the Exchange (RSI) and the
    // bounce buffer inside it (RDI), uses the stack only for one pushfq/pop pair, and
    // restores the host's MXCSR before it returns. Every XMM register and the flags
    // are declared clobbered through the C ABI.
    unsafe {
        std::arch::asm!(
            "call {stub}",
            stub = in(reg) stub,
            in("rsi") exchange_pointer,
            in("rdi") std::ptr::addr_of_mut!((*exchange_pointer).bounce),
            clobber_abi("C"),
        );
    }
    let raised = exchange.mxcsr & 0x3f;
    let unmasked = raised & !(guest_mxcsr >> 7) & 0x3f;
    if unmasked != 0 {
        area.set_mxcsr(guest_mxcsr | raised);
        area.set_xstate_bv(area.xstate_bv() | FEATURE_SSE);
        area.store(c.cpu.fd)?;
        let fault = if c.cpu.sregs.cr4 & CR4_OSXMMEXCPT != 0 {
            Fault::SimdFloatingPoint
        } else {
            Fault::InvalidOpcode
        };
        return Err(Stop::Fault(fault));
    }
    if let Some((linear, size)) = memory_target {
        c.memory
            .write(linear, &exchange.bounce[..size], data_access(&c.cpu, true))?;
    }
    let new_mxcsr = guest_mxcsr | raised;
    let registers_changed = (0..16).any(|n| area.xmm(n) != exchange.xmm[n]);
    if registers_changed || new_mxcsr != guest_mxcsr {
        for (n, register) in exchange.xmm.iter().enumerate() {
            area.set_xmm(n, register);
        }
        area.set_mxcsr(new_mxcsr);
        area.set_xstate_bv(area.xstate_bv() | FEATURE_SSE);
        area.store(c.cpu.fd)?;
    }
    if instruction_writes_flags(&instruction) {
        let flags = (c.cpu.rflags() & !RFLAGS_STATUS) | (exchange.rflags & RFLAGS_STATUS);
        c.cpu.set_rflags(flags);
    }
    c.advance();
    Ok(())
}

/// COMISS/UCOMISS/COMISD/UCOMISD and PTEST set status flags; nothing else here does.
fn instruction_writes_flags(instruction: &Instruction) -> bool {
    matches!(
        instruction.mnemonic(),
        Mnemonic::Comiss
            | Mnemonic::Ucomiss
            | Mnemonic::Comisd
            | Mnemonic::Ucomisd
            | Mnemonic::Ptest
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn allow_list_takes_pure_computations_only() {
        assert!(allowed(&decode(&[0x66, 0x0f, 0x38, 0x00, 0xc1]))); // pshufb xmm0, xmm1
        assert!(allowed(&decode(&[0x66, 0x0f, 0xfe, 0x06]))); // paddd xmm0, [rsi]
        assert!(allowed(&decode(&[0x66, 0x0f, 0x70, 0xc1, 0x93]))); // pshufd xmm0, xmm1, 0x93
        assert!(!allowed(&decode(&[0x0f, 0x38, 0x00, 0xc1]))); // pshufb mm0, mm1 (MMX)
        assert!(!allowed(&decode(&[0x66, 0x0f, 0xd7, 0xc1]))); // pmovmskb eax, xmm1 (GPR)
        assert!(!allowed(&decode(&[0x0f, 0xae, 0x16]))); // ldmxcsr [rsi]
        assert!(!allowed(&decode(&[0x66, 0x0f, 0xf7, 0xc1]))); // maskmovdqu (implicit [rdi])
        assert!(!allowed(&decode(&[0xc5, 0xf9, 0xfe, 0xc1]))); // vpaddd (VEX)
        assert!(!allowed(&decode(&[0xf2, 0x0f, 0x38, 0xf1, 0xc3]))); // crc32 (SSE4.2)
    }

    #[test]
    fn memory_operands_are_redirected_to_rdi() {
        // paddd xmm9, [rbx + rcx*4 + 0x40]
        let instruction = decode(&[0x66, 0x44, 0x0f, 0xfe, 0x4c, 0x8b, 0x40]);
        let Ok(bytes) = host_encoding(&instruction) else {
            panic!("re-encoding failed");
        };
        let host = decode(&bytes);
        assert_eq!(host.code(), instruction.code());
        assert_eq!(host.op0_register(), Register::XMM9);
        assert_eq!(host.memory_base(), Register::RDI);
        assert_eq!(host.memory_index(), Register::None);
    }
}
