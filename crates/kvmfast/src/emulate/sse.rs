//! SSE..SSE4.1, AES-NI, PCLMULQDQ and their AVX/AVX2 (VEX) forms: what a kernel runs
//! between kernel_fpu_begin and kernel_fpu_end (blake2s_compress_ssse3, the AVX copies
//! and crypto of a stock kernel on an AVX processor), performed by the host processor
//! itself against the guest's vector state.
//!
//! Only an allow-list runs: legacy- or VEX-encoded instructions of those CPUID features
//! whose operands are XMM/YMM registers, at most one memory operand and an 8-bit
//! immediate, and that use no other register (iced-x86's register usage is checked, so
//! implicit GPR or flag users such as PCMPISTRI stay out) -- pure computations, no
//! control flow, no system state, no other memory. The instruction is
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

use super::cpu::{CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, RFLAGS_STATUS};
use super::exceptions::Fault;
use super::fpu_state::{FEATURE_AVX, FEATURE_SSE, XsaveArea, check_device_available, xcr0};
use super::linear::{Intent, alignment_check, data_access};
use super::operands::memory_operand;
use super::{Completion, Stop};

const LEGACY_FEATURES: [CpuidFeature; 7] = [
    CpuidFeature::SSE,
    CpuidFeature::SSE2,
    CpuidFeature::SSE3,
    CpuidFeature::SSSE3,
    CpuidFeature::SSE4_1,
    CpuidFeature::AES,
    CpuidFeature::PCLMULQDQ,
];
const VEX_FEATURES: [CpuidFeature; 8] = [
    CpuidFeature::AVX,
    CpuidFeature::AVX2,
    CpuidFeature::FMA,
    CpuidFeature::F16C,
    CpuidFeature::AES,
    CpuidFeature::PCLMULQDQ,
    CpuidFeature::VAES,
    CpuidFeature::VPCLMULQDQ,
];

/// Whether the instruction is a pure vector computation this module may run.
pub fn allowed(instruction: &Instruction) -> bool {
    let features = instruction.cpuid_features();
    let known = match instruction.encoding() {
        EncodingKind::Legacy => &LEGACY_FEATURES[..],
        EncodingKind::VEX => &VEX_FEATURES[..],
        _ => return false,
    };
    if features.is_empty() || !features.iter().all(|f| known.contains(f)) {
        return false;
    }
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Vzeroupper | Mnemonic::Vzeroall
    ) {
        return true;
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
            | Mnemonic::Vldmxcsr
            | Mnemonic::Vstmxcsr
            | Mnemonic::Vmaskmovps
            | Mnemonic::Vmaskmovpd
            | Mnemonic::Vpmaskmovd
            | Mnemonic::Vpmaskmovq
            | Mnemonic::Vmaskmovdqu
    ) {
        return false;
    }
    let mut memory = 0;
    let mut vector = 0;
    let mut general = Vec::new();
    for index in 0..instruction.op_count() {
        match instruction.op_kind(index) {
            OpKind::Register if is_vector(instruction.op_register(index)) => vector += 1,
            OpKind::Register if instruction.op_register(index).is_gpr() => {
                general.push(instruction.op_register(index).full_register());
            }
            OpKind::Memory => memory += 1,
            OpKind::Immediate8 => {}
            _ => return false,
        }
    }
    if vector == 0 || memory > 1 || general.len() > HOST_GPRS.len() {
        return false;
    }
    if is_vector(instruction.memory_index()) {
        return false;
    }
    // Nothing but vector registers, the explicit general-register operands and the
    // memory operand's own address and segment registers.
    let address = [instruction.memory_base(), instruction.memory_index()]
        .map(|register| register.full_register());
    InstructionInfoFactory::new()
        .info(instruction)
        .used_registers()
        .iter()
        .all(|used| {
            // A VEX destination shows as the whole ZMM register (its upper bits are
            // zeroed): still vector state.
            is_vector(used.register())
                || used.register().is_zmm()
                || general.contains(&used.register().full_register())
                || (memory == 1
                    && (address.contains(&used.register().full_register())
                        || used.register().is_segment_register()))
        })
}

/// The host registers a vector instruction's general-register operands are moved to
/// (first operand to RAX, second to RDX): never RSI/RDI, which the stub uses.
const HOST_GPRS: [[Register; 4]; 2] = [
    [Register::AL, Register::AX, Register::EAX, Register::RAX],
    [Register::DL, Register::DX, Register::EDX, Register::RDX],
];

fn host_gpr(slot: usize, guest: Register) -> Register {
    let width = match guest.size() {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    };
    HOST_GPRS[slot][width]
}

/// The general-register operands: (operand index, guest register), in order.
fn gpr_operands(instruction: &Instruction) -> Vec<(u32, Register)> {
    (0..instruction.op_count())
        .filter(|&i| {
            instruction.op_kind(i) == OpKind::Register && instruction.op_register(i).is_gpr()
        })
        .map(|i| (i, instruction.op_register(i)))
        .collect()
}

/// Whether this processor has every feature the instruction needs: one it lacks would
/// fault in the stub, so the guest (which sees this processor's CPUID) gets #UD.
fn host_supports(features: &[CpuidFeature]) -> bool {
    features.iter().all(|feature| match feature {
        CpuidFeature::SSE | CpuidFeature::SSE2 => true,
        CpuidFeature::SSE3 => std::arch::is_x86_feature_detected!("sse3"),
        CpuidFeature::SSSE3 => std::arch::is_x86_feature_detected!("ssse3"),
        CpuidFeature::SSE4_1 => std::arch::is_x86_feature_detected!("sse4.1"),
        CpuidFeature::AES => std::arch::is_x86_feature_detected!("aes"),
        CpuidFeature::PCLMULQDQ => std::arch::is_x86_feature_detected!("pclmulqdq"),
        CpuidFeature::AVX => std::arch::is_x86_feature_detected!("avx"),
        CpuidFeature::AVX2 => std::arch::is_x86_feature_detected!("avx2"),
        CpuidFeature::FMA => std::arch::is_x86_feature_detected!("fma"),
        CpuidFeature::F16C => std::arch::is_x86_feature_detected!("f16c"),
        CpuidFeature::VAES => std::arch::is_x86_feature_detected!("vaes"),
        CpuidFeature::VPCLMULQDQ => std::arch::is_x86_feature_detected!("vpclmulqdq"),
        _ => false,
    })
}

fn is_vector(register: Register) -> bool {
    register.is_xmm() || register.is_ymm()
}

/// Whether a misaligned operand raises #GP(0): legacy SSE 16-byte operands except the
/// unaligned moves (SDM Vol. 1 11.4.1), and VEX only for the explicitly aligned moves
/// (Vol. 1 14.9).
fn alignment_required(instruction: &Instruction, size: usize) -> bool {
    let mnemonic = instruction.mnemonic();
    if instruction.encoding() == EncodingKind::VEX {
        return matches!(
            mnemonic,
            Mnemonic::Vmovdqa
                | Mnemonic::Vmovaps
                | Mnemonic::Vmovapd
                | Mnemonic::Vmovntdq
                | Mnemonic::Vmovntps
                | Mnemonic::Vmovntpd
                | Mnemonic::Vmovntdqa
        );
    }
    size == 16
        && !matches!(
            mnemonic,
            Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Lddqu
        )
}

/// What the stubs exchange with Rust: the YMM registers (XMM in the low 16 bytes),
/// MXCSR, RFLAGS, the host's MXCSR, and the bounce buffer the memory operand is
/// redirected to.
/// The bounce buffer is 32-byte aligned: the aligned moves (VMOVDQA ymm) fault on the
/// host otherwise, and their guest operand was checked to be aligned.
#[repr(C, align(64))]
struct Exchange {
    ymm: [[u8; 32]; 16],
    bounce: [u8; 32],
    mxcsr: u32,
    host_mxcsr: u32,
    rflags: u64,
    gprs: [u64; 2],
}

const YMM_AT: i32 = 0;
const BOUNCE_AT: i32 = 512;
const MXCSR_AT: i32 = 544;
const HOST_MXCSR_AT: i32 = 548;
const RFLAGS_AT: i32 = 552;
const GPRS_AT: i32 = 560;
const _: () = {
    assert!(std::mem::offset_of!(Exchange, ymm) == YMM_AT as usize);
    assert!(std::mem::offset_of!(Exchange, mxcsr) == MXCSR_AT as usize);
    assert!(std::mem::offset_of!(Exchange, host_mxcsr) == HOST_MXCSR_AT as usize);
    assert!(std::mem::offset_of!(Exchange, rflags) == RFLAGS_AT as usize);
    assert!(std::mem::offset_of!(Exchange, bounce) == BOUNCE_AT as usize);
    assert!(BOUNCE_AT % 32 == 0);
    assert!(std::mem::offset_of!(Exchange, gprs) == GPRS_AT as usize);
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

/// vmovdqu ymmN, [rsi + disp32] (load) or vmovdqu [rsi + disp32], ymmN (store): VEX.256.F3.0F 6F/7F.
fn vmovdqu(register: usize, displacement: i32, load: bool) -> Vec<u8> {
    let inverted_r: u8 = if register >= 8 { 0 } else { 0x80 };
    let mut bytes = vec![0xc5, inverted_r | 0x78 | 0x04 | 0x02];
    bytes.push(if load { 0x6f } else { 0x7f });
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
/// and flags out, host MXCSR back. RSI = &Exchange, RDI = &Exchange.bounce. `wide`
/// moves whole YMM registers (VEX instructions) and ends with VZEROUPPER; otherwise
/// only the XMM halves move, so that legacy SSE leaves the upper halves alone as the
/// processor does.
fn stub_code(instruction_bytes: &[u8], wide: bool) -> Vec<u8> {
    let mut code = Vec::new();
    let register_move = |register: usize, load: bool| {
        let displacement = YMM_AT + 32 * register as i32;
        if wide {
            vmovdqu(register, displacement, load)
        } else {
            movdqu(register, displacement, load)
        }
    };
    code.extend(mxcsr_access(HOST_MXCSR_AT, false));
    for register in 0..16 {
        code.extend(register_move(register, true));
    }
    code.extend(mxcsr_access(MXCSR_AT, true));
    // mov rax, [rsi + GPRS_AT]; mov rdx, [rsi + GPRS_AT + 8]
    code.extend_from_slice(&[0x48, 0x8b, 0x86]);
    code.extend_from_slice(&GPRS_AT.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x8b, 0x96]);
    code.extend_from_slice(&(GPRS_AT + 8).to_le_bytes());
    code.extend_from_slice(instruction_bytes);
    // mov [rsi + GPRS_AT], rax; mov [rsi + GPRS_AT + 8], rdx
    code.extend_from_slice(&[0x48, 0x89, 0x86]);
    code.extend_from_slice(&GPRS_AT.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0x96]);
    code.extend_from_slice(&(GPRS_AT + 8).to_le_bytes());
    // pushfq; pop qword ptr [rsi + RFLAGS_AT]
    code.push(0x9c);
    code.extend_from_slice(&[0x8f, 0x86]);
    code.extend_from_slice(&RFLAGS_AT.to_le_bytes());
    code.extend(mxcsr_access(MXCSR_AT, false));
    for register in 0..16 {
        code.extend(register_move(register, false));
    }
    if wide {
        code.extend_from_slice(&[0xc5, 0xf8, 0x77]);
    }
    code.extend(mxcsr_access(HOST_MXCSR_AT, true));
    code.push(0xc3);
    code
}

/// The instruction re-encoded for the host with its memory operand at [RDI], checked
/// by decoding it back.
fn host_encoding(instruction: &Instruction) -> Result<Vec<u8>, Stop> {
    let mut host = *instruction;
    for (slot, (index, guest)) in gpr_operands(instruction).into_iter().enumerate() {
        host.set_op_register(index, host_gpr(slot, guest));
    }
    let expected = host;
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
        OpKind::Register => check.op_register(i) == expected.op_register(i),
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
            let wide = instruction.encoding() == EncodingKind::VEX;
            let page = ExecutablePage::new(&stub_code(&key, wide))?;
            self.stubs.insert(key.clone(), page);
        }
        Ok(self.stubs[&key].address.cast_const())
    }
}

pub fn complete(c: &mut Completion<'_>, stubs: &mut StubCache) -> Result<(), Stop> {
    let instruction = c.decoded.instruction;
    if !host_supports(instruction.cpuid_features()) {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    let vex = instruction.encoding() == EncodingKind::VEX;
    // SDM Vol. 2 exception classes: legacy SSE #UD when CR0.EM or !CR4.OSFXSR; VEX #UD
    // when !CR4.OSXSAVE or XCR0 lacks SSE|AVX; both #NM when CR0.TS.
    if vex {
        if c.cpu.sregs.cr4 & CR4_OSXSAVE == 0 || xcr0(c.cpu.fd)? & AVX_STATE != AVX_STATE {
            return Err(Stop::Fault(Fault::InvalidOpcode));
        }
        if c.cpu.sregs.cr0 & CR0_TS != 0 {
            return Err(Stop::Fault(Fault::DeviceNotAvailable));
        }
    } else {
        if c.cpu.sregs.cr4 & CR4_OSFXSR == 0 {
            return Err(Stop::Fault(Fault::InvalidOpcode));
        }
        check_device_available(&c.cpu)?;
    }
    let mut info_factory = InstructionInfoFactory::new();
    let info = info_factory.info(&instruction);
    let used_memory = info.used_memory().first().copied();
    let mut written: Vec<usize> = info
        .used_registers()
        .iter()
        .filter(|used| {
            (is_vector(used.register()) || used.register().is_zmm())
                && matches!(
                    used.access(),
                    OpAccess::Write
                        | OpAccess::ReadWrite
                        | OpAccess::CondWrite
                        | OpAccess::ReadCondWrite
                )
        })
        .map(|used| used.register().number() % 32)
        .collect();
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Vzeroupper | Mnemonic::Vzeroall
    ) {
        written = (0..16).collect();
    }
    let mut exchange = Exchange {
        ymm: [[0; 32]; 16],
        mxcsr: 0,
        host_mxcsr: 0,
        rflags: 0,
        bounce: [0; 32],
        gprs: [0; 2],
    };
    let mut memory_target = None;
    if let Some(used) = used_memory {
        let size = used.memory_size().size();
        if size == 0 || size > 32 {
            return Err(Stop::Unsupported(format!(
                "a {size}-byte vector memory operand"
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
        if alignment_required(&instruction, size) && linear % size as u64 != 0 {
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
    let upper_at = avx_upper_offset();
    for (n, register) in exchange.ymm.iter_mut().enumerate() {
        register[..16].copy_from_slice(&area.xmm(n));
        if vex {
            register[16..].copy_from_slice(&area.bytes[upper_at + 16 * n..upper_at + 16 * n + 16]);
        }
    }
    let before = exchange.ymm;
    let general = gpr_operands(&instruction);
    for (slot, (_, guest)) in general.iter().enumerate() {
        exchange.gprs[slot] = c.cpu.read_register(guest.full_register()).unwrap_or(0);
    }
    let written_general: Vec<(usize, Register)> = general
        .iter()
        .enumerate()
        .filter(|(_, (index, _))| {
            matches!(
                info_factory.info(&instruction).op_access(*index),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            )
        })
        .map(|(slot, (_, guest))| (slot, *guest))
        .collect();
    let guest_mxcsr = area.mxcsr();
    // All exceptions masked on the host, flags cleared: what the instruction raises is
    // then exactly the flags it sets.
    exchange.mxcsr = (guest_mxcsr | 0x1f80) & !0x3f;
    let stub = stubs.stub(&instruction)?;
    let exchange_pointer: *mut Exchange = &mut exchange;
    // SAFETY: the stub was generated above from an allow-listed instruction re-encoded
    // and verified by iced-x86; it reads and writes only the Exchange (RSI) and the
    // bounce buffer inside it (RDI), uses the stack only for one pushfq/pop pair, and
    // restores the host's MXCSR before it returns. Every vector register and the flags
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
    // A VEX instruction zeroes its destination above bit 255 (SDM Vol. 1 14.1.3), in
    // the ZMM_Hi256 component when the guest has AVX-512 state.
    let zmm_cleared = vex && clear_zmm_upper(&mut area, &written);
    if exchange.ymm != before || new_mxcsr != guest_mxcsr || zmm_cleared {
        let mut bv = area.xstate_bv() | FEATURE_SSE;
        for (n, register) in exchange.ymm.iter().enumerate() {
            let lower: [u8; 16] = register[..16].try_into().unwrap_or([0; 16]);
            area.set_xmm(n, &lower);
            if vex {
                area.bytes[upper_at + 16 * n..upper_at + 16 * n + 16]
                    .copy_from_slice(&register[16..]);
            }
        }
        if vex {
            bv |= FEATURE_AVX;
        }
        area.set_mxcsr(new_mxcsr);
        area.set_xstate_bv(bv);
        area.store(c.cpu.fd)?;
    }
    for (slot, guest) in written_general {
        c.cpu
            .write_register(guest, exchange.gprs[slot])
            .ok_or_else(|| Stop::Unsupported(format!("writing {guest:?}")))?;
    }
    if instruction_writes_flags(&instruction) {
        let flags = (c.cpu.rflags() & !RFLAGS_STATUS) | (exchange.rflags & RFLAGS_STATUS);
        c.cpu.set_rflags(flags);
    }
    c.advance();
    Ok(())
}

const AVX_STATE: u64 = FEATURE_SSE | FEATURE_AVX;
const ZMM_HI256: u32 = 6;

/// Where the upper halves of YMM0-15 live in the standard XSAVE area (component 2).
fn avx_upper_offset() -> usize {
    std::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize
}

/// Zeroes bits 511:256 of the written registers; true when that changed the area.
fn clear_zmm_upper(area: &mut XsaveArea, written: &[usize]) -> bool {
    if area.xstate_bv() & (1 << ZMM_HI256) == 0 {
        return false;
    }
    let component = std::arch::x86_64::__cpuid_count(0xd, ZMM_HI256);
    let base = component.ebx as usize;
    let mut changed = false;
    for &n in written.iter().filter(|&&n| n < 16) {
        let slot = base + 32 * n;
        if slot + 32 <= area.bytes.len() && area.bytes[slot..slot + 32].iter().any(|&b| b != 0) {
            area.bytes[slot..slot + 32].fill(0);
            changed = true;
        }
    }
    changed
}

/// (V)COMIS*, (V)UCOMIS*, (V)PTEST and VTESTP* set status flags; nothing else here does.
fn instruction_writes_flags(instruction: &Instruction) -> bool {
    matches!(
        instruction.mnemonic(),
        Mnemonic::Comiss
            | Mnemonic::Ucomiss
            | Mnemonic::Comisd
            | Mnemonic::Ucomisd
            | Mnemonic::Ptest
            | Mnemonic::Vcomiss
            | Mnemonic::Vucomiss
            | Mnemonic::Vcomisd
            | Mnemonic::Vucomisd
            | Mnemonic::Vptest
            | Mnemonic::Vtestps
            | Mnemonic::Vtestpd
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
        assert!(allowed(&decode(&[0x66, 0x0f, 0xd7, 0xc1]))); // pmovmskb eax, xmm1
        assert!(allowed(&decode(&[0xc5, 0xf9, 0x6e, 0xe9]))); // vmovd xmm5, ecx
        assert!(!allowed(&decode(&[0x0f, 0xae, 0x16]))); // ldmxcsr [rsi]
        assert!(!allowed(&decode(&[0x66, 0x0f, 0xf7, 0xc1]))); // maskmovdqu (implicit [rdi])
        assert!(allowed(&decode(&[0xc5, 0xf9, 0xfe, 0xc1]))); // vpaddd xmm0, xmm0, xmm1
        assert!(allowed(&decode(&[0xc5, 0xfa, 0x6f, 0x07]))); // vmovdqu xmm0, [rdi]
        assert!(allowed(&decode(&[0xc5, 0xf8, 0x77]))); // vzeroupper
        assert!(!allowed(&decode(&[0x62, 0xf1, 0x7d, 0x48, 0xfe, 0xc1]))); // vpaddd zmm (EVEX)
        assert!(!allowed(&decode(&[0x66, 0x0f, 0x3a, 0x63, 0xc1, 0x00]))); // pcmpistri (ECX)
        assert!(!allowed(&decode(&[0xf2, 0x0f, 0x38, 0xf1, 0xc3]))); // crc32 (SSE4.2)
    }

    #[test]
    fn vector_register_numbers_index_the_area() {
        assert_eq!(Register::XMM9.number() % 32, 9);
        assert_eq!(Register::YMM15.number() % 32, 15);
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
