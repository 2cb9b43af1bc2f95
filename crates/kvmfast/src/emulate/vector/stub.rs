//! The host side: an `Exchange` block the guest's vector state travels in, and per
//! instruction a stub -- built entirely by the iced-x86 encoder -- that loads that
//! state into the host's registers, runs the instruction, and stores it back.
//!
//! The guest's instruction is re-encoded from its decoded form with the memory operand
//! at [RDI] (the bounce buffer) and its general-register operands moved to RAX/RDX,
//! then decoded again and compared with what was meant before it is used.

use std::collections::HashMap;
use std::mem::offset_of;

use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, Encoder, Instruction, MemoryOperand, OpKind,
    Register,
};

use super::super::host_features::HostFeatures;
use super::super::stop::Stop;

/// How much of the vector state a stub moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Width {
    /// XMM0-15 (legacy SSE leaves the upper halves alone, as the processor does).
    Xmm,
    /// YMM0-15 (VEX).
    Ymm,
    /// ZMM0-31 and k0-7 (EVEX).
    Zmm,
}

/// What a stub exchanges with Rust. The bounce buffer is 64-byte aligned: the aligned
/// moves fault on the host otherwise, and their guest operand was checked to be aligned.
#[derive(Clone)]
#[repr(C, align(64))]
pub struct Exchange {
    pub zmm: [[u8; 64]; 32],
    pub bounce: [u8; 64],
    pub k: [u64; 8],
    pub gprs: [u64; 2],
    pub rflags: u64,
    pub mxcsr: u32,
    pub host_mxcsr: u32,
}

impl Default for Exchange {
    fn default() -> Self {
        Self {
            zmm: [[0; 64]; 32],
            bounce: [0; 64],
            k: [0; 8],
            gprs: [0; 2],
            rflags: 0,
            mxcsr: 0,
            host_mxcsr: 0,
        }
    }
}

const ZMM_AT: usize = offset_of!(Exchange, zmm);
const K_AT: usize = offset_of!(Exchange, k);
const GPRS_AT: usize = offset_of!(Exchange, gprs);
const RFLAGS_AT: usize = offset_of!(Exchange, rflags);
const MXCSR_AT: usize = offset_of!(Exchange, mxcsr);
const HOST_MXCSR_AT: usize = offset_of!(Exchange, host_mxcsr);
const _: () = assert!(offset_of!(Exchange, bounce) % 64 == 0);

/// The host registers the general-register operands travel in (first RAX, then RDX):
/// never RSI or RDI, which hold the Exchange and the bounce buffer.
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
pub fn gpr_operands(instruction: &Instruction) -> Vec<(u32, Register)> {
    (0..instruction.op_count())
        .filter(|&i| {
            instruction.op_kind(i) == OpKind::Register && instruction.op_register(i).is_gpr()
        })
        .map(|i| (i, instruction.op_register(i)))
        .collect()
}

/// The instruction re-encoded for the host, checked by decoding it back.
pub fn host_encoding(instruction: &Instruction) -> Result<Vec<u8>, Stop> {
    let mut host = *instruction;
    for (slot, (index, guest)) in gpr_operands(instruction).into_iter().enumerate() {
        host.set_op_register(index, host_gpr(slot, guest));
    }
    let has_memory = (0..host.op_count()).any(|i| host.op_kind(i) == OpKind::Memory);
    if has_memory {
        host.set_memory_base(Register::RDI);
        host.set_memory_index(Register::None);
        host.set_memory_index_scale(1);
        host.set_memory_displacement64(0);
        host.set_memory_displ_size(0);
        host.set_segment_prefix(Register::None);
    }
    let bytes = encode(&[host])?;
    let check = Decoder::with_ip(64, &bytes, 0, DecoderOptions::NONE).decode();
    let same_operands = check.op_count() == host.op_count()
        && (0..check.op_count()).all(|i| {
            check.op_kind(i) == host.op_kind(i)
                && match check.op_kind(i) {
                    OpKind::Register => check.op_register(i) == host.op_register(i),
                    OpKind::Memory => {
                        check.memory_base() == Register::RDI
                            && check.memory_index() == Register::None
                            && check.memory_displacement64() == 0
                    }
                    _ => check.immediate(i) == host.immediate(i),
                }
        });
    let same_masking = check.op_mask() == host.op_mask()
        && check.zeroing_masking() == host.zeroing_masking()
        && check.is_broadcast() == host.is_broadcast()
        && check.rounding_control() == host.rounding_control()
        && check.suppress_all_exceptions() == host.suppress_all_exceptions();
    if check.code() != instruction.code()
        || check.code() == Code::INVALID
        || check.len() != bytes.len()
        || !same_operands
        || !same_masking
    {
        return Err(Stop::Unsupported(format!(
            "re-encoding {:?} did not give back the same instruction",
            instruction.code()
        )));
    }
    Ok(bytes)
}

fn encode(instructions: &[Instruction]) -> Result<Vec<u8>, Stop> {
    let mut encoder = Encoder::new(64);
    for instruction in instructions {
        encoder
            .encode(instruction, 0)
            .map_err(|e| Stop::Unsupported(format!("encoding {:?}: {e}", instruction.code())))?;
    }
    Ok(encoder.take_buffer())
}

fn at(offset: usize) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RSI, offset as i64)
}

fn with_memory_register(
    code: Code,
    register: Register,
    offset: usize,
) -> Result<Instruction, Stop> {
    Instruction::with2(code, register, at(offset))
        .map_err(|e| Stop::Unsupported(format!("{code:?}: {e}")))
}

fn with_register_memory(
    code: Code,
    offset: usize,
    register: Register,
) -> Result<Instruction, Stop> {
    Instruction::with2(code, at(offset), register)
        .map_err(|e| Stop::Unsupported(format!("{code:?}: {e}")))
}

fn with_memory(code: Code, offset: usize) -> Result<Instruction, Stop> {
    Instruction::with1(code, at(offset)).map_err(|e| Stop::Unsupported(format!("{code:?}: {e}")))
}

fn register(base: Register, n: usize) -> Register {
    // XMM0..XMM31, YMM0..YMM31, ZMM0..ZMM31 and K0..K7 are consecutive in iced-x86.
    Register::try_from(base as usize + n).unwrap_or(Register::None)
}

/// Loads (`load`) or stores the vector state a stub of this width moves.
fn state_moves(width: Width, load: bool) -> Result<Vec<Instruction>, Stop> {
    let mut moves = Vec::new();
    let (count, base, load_code, store_code) = match width {
        Width::Xmm => (
            16,
            Register::XMM0,
            Code::Movdqu_xmm_xmmm128,
            Code::Movdqu_xmmm128_xmm,
        ),
        Width::Ymm => (
            16,
            Register::YMM0,
            Code::VEX_Vmovdqu_ymm_ymmm256,
            Code::VEX_Vmovdqu_ymmm256_ymm,
        ),
        Width::Zmm => (
            32,
            Register::ZMM0,
            Code::EVEX_Vmovdqu64_zmm_k1z_zmmm512,
            Code::EVEX_Vmovdqu64_zmmm512_k1z_zmm,
        ),
    };
    for n in 0..count {
        let offset = ZMM_AT + 64 * n;
        moves.push(if load {
            with_memory_register(load_code, register(base, n), offset)?
        } else {
            with_register_memory(store_code, offset, register(base, n))?
        });
    }
    if width == Width::Zmm {
        for n in 0..8 {
            let offset = K_AT + 8 * n;
            moves.push(if load {
                with_memory_register(Code::VEX_Kmovq_kr_km64, register(Register::K0, n), offset)?
            } else {
                with_register_memory(Code::VEX_Kmovq_m64_kr, offset, register(Register::K0, n))?
            });
        }
    }
    Ok(moves)
}

/// The stub's own instructions, before and after the guest's: host MXCSR saved, guest
/// state in; guest state and flags out, upper state cleared (VZEROUPPER), host MXCSR
/// back, RET. RSI = &Exchange, RDI = &Exchange.bounce.
fn stub_frame(width: Width) -> Result<(Vec<Instruction>, Vec<Instruction>), Stop> {
    let mut before = vec![with_memory(Code::Stmxcsr_m32, HOST_MXCSR_AT)?];
    before.extend(state_moves(width, true)?);
    before.push(with_memory(Code::Ldmxcsr_m32, MXCSR_AT)?);
    before.push(with_memory_register(
        Code::Mov_r64_rm64,
        Register::RAX,
        GPRS_AT,
    )?);
    before.push(with_memory_register(
        Code::Mov_r64_rm64,
        Register::RDX,
        GPRS_AT + 8,
    )?);
    let mut after = vec![
        with_register_memory(Code::Mov_rm64_r64, GPRS_AT, Register::RAX)?,
        with_register_memory(Code::Mov_rm64_r64, GPRS_AT + 8, Register::RDX)?,
        Instruction::with(Code::Pushfq),
        with_memory(Code::Pop_rm64, RFLAGS_AT)?,
        with_memory(Code::Stmxcsr_m32, MXCSR_AT)?,
    ];
    after.extend(state_moves(width, false)?);
    if width != Width::Xmm {
        after.push(Instruction::with(Code::VEX_Vzeroupper));
    }
    after.push(with_memory(Code::Ldmxcsr_m32, HOST_MXCSR_AT)?);
    after.push(Instruction::with(Code::Retnq));
    Ok((before, after))
}

fn stub_code(instruction_bytes: &[u8], width: Width) -> Result<Vec<u8>, Stop> {
    let (before, after) = stub_frame(width)?;
    let mut code = encode(&before)?;
    code.extend_from_slice(instruction_bytes);
    code.extend(encode(&after)?);
    Ok(code)
}

/// The processor features the stub of this width executes beyond the guest's
/// instruction (KMOVQ of the opmask moves: AVX512BW, even for an AVX512F-only one).
pub fn frame_features(width: Width) -> Result<Vec<CpuidFeature>, Stop> {
    let (before, after) = stub_frame(width)?;
    let mut features: Vec<CpuidFeature> = Vec::new();
    for instruction in before.iter().chain(&after) {
        for &feature in instruction.cpuid_features() {
            if !features.contains(&feature) {
                features.push(feature);
            }
        }
    }
    Ok(features)
}

const STUB_CACHE_LIMIT: usize = 4096;
const PAGE: usize = 4096;

/// Executable stubs, one page each, keyed by the re-encoded instruction and width,
/// and what the host processor can run.
pub struct StubCache {
    stubs: HashMap<(Vec<u8>, Width), ExecutablePage>,
    host: HostFeatures,
    frames: HashMap<Width, bool>,
}

impl Default for StubCache {
    fn default() -> Self {
        Self::for_host(HostFeatures::host().clone())
    }
}

struct ExecutablePage {
    address: *mut u8,
}

// SAFETY: the page is immutable once executable and owned by its cache.
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
            return Err(Stop::Unsupported("a vector stub larger than a page".into()));
        }
        // SAFETY: a fresh private anonymous page, written, then made read+execute only.
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
                return Err(Stop::Unsupported("mmap for a vector stub failed".into()));
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), address.cast::<u8>(), code.len());
            let page = Self {
                address: address.cast(),
            };
            if libc::mprotect(address, PAGE, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return Err(Stop::Unsupported(
                    "mprotect for a vector stub failed".into(),
                ));
            }
            Ok(page)
        }
    }
}

impl StubCache {
    pub fn for_host(host: HostFeatures) -> Self {
        Self {
            stubs: HashMap::new(),
            host,
            frames: HashMap::new(),
        }
    }

    /// Whether the host has every feature the stub for `instruction` executes: the
    /// instruction's own and its frame's. The guest gets #UD where it has not.
    pub fn host_can_run(&mut self, instruction: &Instruction, width: Width) -> Result<bool, Stop> {
        let frame = match self.frames.get(&width) {
            Some(&frame) => frame,
            None => {
                let frame = self.host.has_all(&frame_features(width)?);
                self.frames.insert(width, frame);
                frame
            }
        };
        Ok(frame && self.host.has_all(instruction.cpuid_features()))
    }

    /// Runs `instruction` on the host against `exchange`.
    pub fn run(
        &mut self,
        instruction: &Instruction,
        width: Width,
        exchange: &mut Exchange,
    ) -> Result<(), Stop> {
        let key = (host_encoding(instruction)?, width);
        if !self.stubs.contains_key(&key) {
            if self.stubs.len() >= STUB_CACHE_LIMIT {
                self.stubs.clear();
            }
            let page = ExecutablePage::new(&stub_code(&key.0, width)?)?;
            self.stubs.insert(key.clone(), page);
        }
        let stub = self.stubs[&key].address.cast_const();
        let exchange_pointer: *mut Exchange = exchange;
        // SAFETY: the stub was built above by the iced-x86 encoder around an
        // allow-listed instruction that was re-encoded and verified; it reads and
        // writes only the Exchange (RSI) and its bounce buffer (RDI), uses the stack
        // for one PUSHFQ/POP pair, clears the upper vector state and restores the
        // host's MXCSR before it returns. The vector, opmask and general registers it
        // touches are all caller-saved, declared clobbered through the C ABI.
        unsafe {
            std::arch::asm!(
                "call {stub}",
                stub = in(reg) stub,
                in("rsi") exchange_pointer,
                in("rdi") std::ptr::addr_of_mut!((*exchange_pointer).bounce),
                clobber_abi("C"),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn memory_operands_go_to_rdi_and_gprs_to_rax_rdx() {
        // paddd xmm9, [rbx + rcx*4 + 0x40]
        let instruction = decode(&[0x66, 0x44, 0x0f, 0xfe, 0x4c, 0x8b, 0x40]);
        let Ok(bytes) = host_encoding(&instruction) else {
            panic!("re-encoding failed");
        };
        let host = decode(&bytes);
        assert_eq!(host.code(), instruction.code());
        assert_eq!(host.op0_register(), Register::XMM9);
        assert_eq!(host.memory_base(), Register::RDI);
        // vmovd xmm5, ecx -> vmovd xmm5, eax
        let Ok(bytes) = host_encoding(&decode(&[0xc5, 0xf9, 0x6e, 0xe9])) else {
            panic!("re-encoding failed");
        };
        assert_eq!(decode(&bytes).op1_register(), Register::EAX);
    }

    #[test]
    fn the_zmm_frame_needs_avx512bw_for_its_opmask_moves() {
        let Ok(features) = frame_features(Width::Zmm) else {
            panic!("no frame");
        };
        assert!(features.contains(&CpuidFeature::AVX512F));
        assert!(features.contains(&CpuidFeature::AVX512BW));
        let Ok(ymm) = frame_features(Width::Ymm) else {
            panic!("no frame");
        };
        assert!(ymm.contains(&CpuidFeature::AVX) && !ymm.contains(&CpuidFeature::AVX512F));
    }

    #[test]
    fn a_host_without_a_frame_feature_cannot_run_the_stub() {
        // vpaddd zmm0, zmm0, zmm1: AVX512F only, but its frame moves opmasks by KMOVQ.
        let vpaddd = decode(&[0x62, 0xf1, 0x7d, 0x48, 0xfe, 0xc1]);
        assert_eq!(vpaddd.cpuid_features(), &[CpuidFeature::AVX512F]);
        let avx512f_only = [CpuidFeature::AVX, CpuidFeature::AVX512F];
        let mut cache = StubCache::for_host(HostFeatures::with(&avx512f_only));
        assert!(matches!(cache.host_can_run(&vpaddd, Width::Zmm), Ok(false)));
        let with_bw = [
            CpuidFeature::AVX,
            CpuidFeature::AVX512F,
            CpuidFeature::AVX512BW,
        ];
        let mut cache = StubCache::for_host(HostFeatures::with(&with_bw));
        assert!(matches!(cache.host_can_run(&vpaddd, Width::Zmm), Ok(true)));
        // paddb xmm0, xmm1 on a baseline processor; pshufb (SSSE3) not.
        let mut bare = StubCache::for_host(HostFeatures::with(&[]));
        let paddb = decode(&[0x66, 0x0f, 0xfc, 0xc1]);
        assert!(matches!(bare.host_can_run(&paddb, Width::Xmm), Ok(true)));
        let pshufb = decode(&[0x66, 0x0f, 0x38, 0x00, 0xc1]);
        assert!(matches!(bare.host_can_run(&pshufb, Width::Xmm), Ok(false)));
    }

    #[test]
    fn stubs_run_on_this_processor() {
        let mut cache = StubCache::default();
        let mut exchange = Exchange {
            mxcsr: 0x1f80,
            ..Exchange::default()
        };
        exchange.zmm[0][..16].copy_from_slice(&[1; 16]);
        exchange.zmm[1][..16].copy_from_slice(&[2; 16]);
        // paddb xmm0, xmm1
        let Ok(()) = cache.run(
            &decode(&[0x66, 0x0f, 0xfc, 0xc1]),
            Width::Xmm,
            &mut exchange,
        ) else {
            panic!("the stub did not run");
        };
        assert_eq!(exchange.zmm[0][..16], [3; 16]);
        assert_eq!(exchange.mxcsr, 0x1f80);
    }
}
