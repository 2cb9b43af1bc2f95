//! Vector computations (SSE..SSE4.1, AES-NI, PCLMULQDQ, AVX/AVX2/FMA/F16C, AVX-512,
//! VAES, VPCLMULQDQ, GFNI) performed by the host processor against the guest's vector
//! state: what a kernel runs between kernel_fpu_begin and kernel_fpu_end
//! (blake2s_compress_ssse3/avx512, the AVX copies and crypto of a stock kernel).
//!
//! `allow_list` decides what may run, `stub` builds and runs the host code, `state`
//! moves the guest's registers between its XSAVE area and the stub. Floating-point
//! exceptions run masked on the host; one the guest leaves unmasked becomes #XM (#UD
//! without CR4.OSXMMEXCPT) with no register changed.

pub mod allow_list;
mod memory;
pub mod state;
pub mod stub;

use iced_x86::{EncodingKind, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, Register};

pub use allow_list::allowed;
pub use stub::StubCache;

use super::completion::Completion;
use super::cpu::{CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, RFLAGS_STATUS, RFLAGS_TF};
use super::decode::{self, Decoded};
use super::exceptions::Fault;
use super::fpu_state::{XsaveArea, check_device_available, xcr0};
use super::linear::{Intent, alignment_check, data_access};
use super::operands::memory_operand;
use super::stop::Stop;
use allow_list::{alignment_required, is_vector, uses_avx512, writes_flags};
use stub::{Exchange, Width, gpr_operands};

fn writes(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
    )
}

fn reads(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Read | OpAccess::ReadWrite | OpAccess::CondRead | OpAccess::ReadCondWrite
    )
}

/// The SDM's exception-class checks before anything runs: legacy SSE #UD without
/// CR4.OSFXSR (or with CR0.EM); VEX/EVEX #UD without CR4.OSXSAVE or the XCR0 state
/// they use; #NM with CR0.TS.
fn check_enabled(
    c: &Completion<'_>,
    width: Width,
    legacy: bool,
    guest: &mut GuestVectorState,
) -> Result<(), Stop> {
    if legacy {
        if c.cpu.sregs.cr4 & CR4_OSFXSR == 0 {
            return Err(Stop::Fault(Fault::InvalidOpcode));
        }
        return check_device_available(&c.cpu);
    }
    let required = state::required_xcr0(width);
    if c.cpu.sregs.cr4 & CR4_OSXSAVE == 0 || guest.xcr0(c)? & required != required {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    if c.cpu.sregs.cr0 & CR0_TS != 0 {
        return Err(Stop::Fault(Fault::DeviceNotAvailable));
    }
    Ok(())
}

/// Most instructions completed on one exit. A kernel's vector code comes in long
/// straight runs (blake2s_compress_avx512: dozens between branches) and each exit's
/// KVM_GET/SET_XSAVE costs about as much as the exit itself on hosts like this one, so
/// a run goes on while the next instruction is another allowed vector computation.
/// Interrupts wait for the run as for one long instruction.
pub const MAX_RUN: usize = 64;

/// The guest's vector state for one exit: read from KVM once, written back once.
struct GuestVectorState {
    area: XsaveArea,
    xcr0: Option<u64>,
    changed: bool,
}

impl GuestVectorState {
    fn xcr0(&mut self, c: &Completion<'_>) -> Result<u64, Stop> {
        if let Some(value) = self.xcr0 {
            return Ok(value);
        }
        let value = xcr0(c.cpu.fd)?;
        self.xcr0 = Some(value);
        Ok(value)
    }
}

/// Completes the instruction, then the allowed vector instructions that follow it (up
/// to MAX_RUN in all; each one counted in `c.also`). A follower that would fault, or
/// that cannot be fetched or decoded, is left for its own exit with nothing changed.
pub fn complete(c: &mut Completion<'_>, stubs: &mut StubCache) -> Result<(), Stop> {
    let mut guest = GuestVectorState {
        area: XsaveArea::load(c.cpu.fd)?,
        xcr0: None,
        changed: false,
    };
    if let Err(stop) = complete_one(c, stubs, &mut guest) {
        // An unmasked SIMD exception leaves its flags in MXCSR (SDM Vol. 1 11.5.1).
        if guest.changed {
            guest.area.store(c.cpu.fd)?;
        }
        return Err(stop);
    }
    // TF: one instruction, then the single-step trap.
    if c.cpu.rflags() & RFLAGS_TF == 0 {
        while c.also.len() + 1 < MAX_RUN && c.memory.device_exit.get().is_none() {
            let Some(next) = next_vector_instruction(c) else {
                break;
            };
            let mnemonic = next.instruction.mnemonic();
            let before = (guest.area.clone(), guest.changed);
            let first = std::mem::replace(&mut c.decoded, next);
            let result = complete_one(c, stubs, &mut guest);
            c.decoded = first;
            if result.is_err() {
                (guest.area, guest.changed) = before;
                break;
            }
            c.also.push(mnemonic);
        }
    }
    if guest.changed {
        guest.area.store(c.cpu.fd)?;
    }
    Ok(())
}

/// The value of the instruction's opmask (all ones without one: nothing masked).
fn mask_value(instruction: &Instruction, exchange: &Exchange) -> u64 {
    match instruction.op_mask() {
        Register::None => u64::MAX,
        k => exchange.k[(k as usize - Register::K0 as usize) % 8],
    }
}

/// The instruction at RIP when it is one this module completes.
fn next_vector_instruction(c: &Completion<'_>) -> Option<Decoded> {
    let decoded = decode::decode(&c.cpu, &c.memory, &[]).ok()?;
    allowed(&decoded.instruction).then_some(decoded)
}

/// One instruction against `guest`'s state: nothing changes (registers, memory, the
/// state) unless it completes, except MXCSR's flags on an unmasked SIMD exception.
fn complete_one(
    c: &mut Completion<'_>,
    stubs: &mut StubCache,
    guest: &mut GuestVectorState,
) -> Result<(), Stop> {
    let instruction = c.decoded.instruction;
    let width = if uses_avx512(&instruction) {
        Width::Zmm
    } else if instruction.encoding() == EncodingKind::VEX {
        Width::Ymm
    } else {
        Width::Xmm
    };
    if !stubs.host_can_run(&instruction, width)? {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    check_enabled(c, width, width == Width::Xmm, guest)?;
    let mut info_factory = InstructionInfoFactory::new();
    let info = info_factory.info(&instruction);
    let used_memory = info.used_memory().first().copied();
    let mut written: Vec<usize> = info
        .used_registers()
        .iter()
        .filter(|used| is_vector(used.register()) && writes(used.access()))
        .map(|used| used.register().number() % 32)
        .collect();
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Vzeroupper | Mnemonic::Vzeroall
    ) {
        written = (0..16).collect();
    }
    let general = gpr_operands(&instruction);
    let written_general: Vec<(usize, Register)> = general
        .iter()
        .enumerate()
        .filter(|(_, (index, _))| writes(info.op_access(*index)))
        .map(|(slot, (_, guest))| (slot, *guest))
        .collect();

    let mut exchange = Exchange::default();
    let area = &mut guest.area;
    state::load(area, width, &mut exchange);
    for (slot, (_, guest)) in general.iter().enumerate() {
        exchange.gprs[slot] = c.cpu.read_register(guest.full_register()).unwrap_or(0);
    }
    let mut store = None;
    if let Some(used) = used_memory {
        let size = used.memory_size().size();
        if size == 0 || size > exchange.bounce.len() {
            return Err(Stop::Unsupported(format!(
                "a {size}-byte vector memory operand"
            )));
        }
        let operand = memory_operand(&c.cpu, &c.decoded)?;
        let (loads, stores) = (reads(used.access()), writes(used.access()));
        let intent = if stores { Intent::Write } else { Intent::Read };
        let linear = operand.linear(&c.cpu, 0, size, intent)?;
        if alignment_required(&instruction, size) && linear % size as u64 != 0 {
            return Err(Stop::Fault(Fault::GeneralProtection(0)));
        }
        alignment_check(&c.cpu, linear, 1).map_err(Stop::Fault)?;
        if loads && stores {
            // Read-modify-write: a read-only page is a write fault (error code W=1).
            c.memory
                .probe_write(linear, size, data_access(&c.cpu, true))?;
        }
        if loads {
            let k = mask_value(&instruction, &exchange);
            let selected =
                memory::read_bytes(&instruction, size, used.memory_size().element_size(), k);
            for run in memory::runs(&selected) {
                c.memory.read(
                    linear.wrapping_add(run.start as u64),
                    &mut exchange.bounce[run],
                    data_access(&c.cpu, false),
                )?;
            }
        }
        if stores {
            store = Some((linear, size, loads));
        }
    }

    let guest_mxcsr = area.mxcsr();
    // All exceptions masked on the host, flags cleared: what the instruction raises is
    // then exactly the flags it sets.
    exchange.mxcsr = (guest_mxcsr | 0x1f80) & !0x3f;
    let stored = match store {
        Some((linear, size, false)) => {
            let mut second = exchange.clone();
            exchange.bounce[..size].fill(memory::FIRST_FILL);
            second.bounce[..size].fill(memory::SECOND_FILL);
            stubs.run(&instruction, width, &mut exchange)?;
            stubs.run(&instruction, width, &mut second)?;
            let written = memory::written_bytes(&exchange.bounce[..size], &second.bounce[..size]);
            Some((linear, memory::runs(&written)))
        }
        Some((linear, size, true)) => {
            stubs.run(&instruction, width, &mut exchange)?;
            Some((linear, memory::runs(&vec![true; size])))
        }
        None => {
            stubs.run(&instruction, width, &mut exchange)?;
            None
        }
    };
    if let Some((linear, runs)) = &stored {
        // Memory faults come before the instruction's own SIMD exceptions, and only
        // for the elements it writes (masked-off ones are suppressed).
        for run in runs {
            c.memory.probe_write(
                linear.wrapping_add(run.start as u64),
                run.len(),
                data_access(&c.cpu, true),
            )?;
        }
    }

    let raised = exchange.mxcsr & 0x3f;
    let unmasked = raised & !(guest_mxcsr >> 7) & 0x3f;
    if unmasked != 0 {
        area.set_mxcsr(guest_mxcsr | raised);
        area.set_xstate_bv(area.xstate_bv() | super::fpu_state::FEATURE_SSE);
        guest.changed = true;
        let fault = if c.cpu.sregs.cr4 & CR4_OSXMMEXCPT != 0 {
            Fault::SimdFloatingPoint
        } else {
            Fault::InvalidOpcode
        };
        return Err(Stop::Fault(fault));
    }
    if let Some((linear, runs)) = stored {
        for run in runs {
            c.memory.write(
                linear.wrapping_add(run.start as u64),
                &exchange.bounce[run],
                data_access(&c.cpu, true),
            )?;
        }
    }
    let new_mxcsr = guest_mxcsr | raised;
    let mut changed = state::store(area, width, &exchange);
    if width == Width::Ymm {
        changed |= state::clear_above_ymm(area, &written);
    }
    if changed || new_mxcsr != guest_mxcsr {
        area.set_mxcsr(new_mxcsr);
        area.set_xstate_bv(area.xstate_bv() | super::fpu_state::FEATURE_SSE);
        guest.changed = true;
    }
    for (slot, guest) in written_general {
        c.cpu
            .write_register(guest, exchange.gprs[slot])
            .ok_or_else(|| Stop::Unsupported(format!("writing {guest:?}")))?;
    }
    if writes_flags(&instruction) {
        let flags = (c.cpu.rflags() & !RFLAGS_STATUS) | (exchange.rflags & RFLAGS_STATUS);
        c.cpu.set_rflags(flags);
    }
    c.advance();
    Ok(())
}
