//! Completing, in userspace, the instructions this host's KVM cannot emulate.
//!
//! On KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION the run loop hands the
//! exit to [`Emulator::complete`]: it decodes the instruction at RIP, performs it with
//! its architectural effect on registers, flags and guest memory (or raises in the
//! guest the exception the CPU would), and the loop re-enters the guest. What nobody
//! can complete becomes a [`Report`] with everything needed to see why.
//!
//! One file per family of instructions; `completion`, `stop`, `cpu`, `decode`,
//! `operands`, `linear`, `paging`, `descriptors`, `exceptions` and `delivery` are the
//! machinery they share. The families depend on that machinery, never on this file:
//! only `Emulator` and what it returns live here.

pub mod bitcount;
pub mod cmpxchg16b;
pub mod completion;
pub mod cpu;
pub mod decode;
pub mod delivery;
pub mod descriptors;
pub mod exceptions;
pub mod fpu_state;
pub mod fxsave;
pub mod host_features;
pub mod host_quirks;
pub mod iret;
pub mod linear;
pub mod operands;
pub mod paging;
pub mod probe;
pub mod report;
pub mod segment_checks;
pub mod smap;
pub mod soft_interrupt;
pub mod stop;
pub mod syscall_quirk;
pub mod timestamp;
pub mod vector;
pub mod x87;
pub mod xsave;
pub mod xstate_layout;

use std::cell::Cell;
use std::sync::RwLock;

use iced_x86::Mnemonic;
use kvm_ioctls::VcpuFd;
use pyo3::PyErr;

use crate::address_map::RangeMap;
use crate::handlers::Handler;
use crate::memory::GuestRam;
use crate::run_page::RunPage;
use completion::Completion;
use cpu::Cpu;
use decode::{DecodeFailure, Decoded};
use exceptions::Fault;
use host_quirks::HostQuirks;
use linear::GuestView;
use paging::PagingMode;
pub use report::Report;
use stop::Stop;

/// What happened to an instruction the run loop handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionOutcome {
    /// Completed; RIP is past it. A store to an ExitSink asks run() to end.
    Completed {
        mnemonic: Mnemonic,
        device_exit: Option<u64>,
        /// The instructions completed after it on the same exit (vector runs).
        also: Vec<Mnemonic>,
    },
    /// The instruction raised `fault` in the guest, as the CPU would have.
    Raised { mnemonic: Mnemonic, fault: Fault },
    /// A host quirk was recognised and repaired (its name).
    Repaired(&'static str),
}

/// Why the run must end.
pub enum Failure {
    Unsupported(Box<Report>),
    Host(PyErr),
}

/// Per-vCPU completion state: host facts and the vector stubs built so far.
pub struct Emulator {
    physical_bits: u32,
    quirks: HostQuirks,
    vector_stubs: vector::StubCache,
}

impl Emulator {
    pub fn new(quirks: HostQuirks) -> Self {
        Self {
            physical_bits: paging::host_physical_bits(),
            quirks,
            vector_stubs: vector::StubCache::default(),
        }
    }

    pub fn quirks(&self) -> &HostQuirks {
        &self.quirks
    }

    /// Completes the instruction of an emulation-failure exit; `exit_bytes` are the
    /// bytes KVM reported (possibly none).
    pub fn complete(
        &mut self,
        fd: &VcpuFd,
        page: Option<&RunPage>,
        ram: &GuestRam,
        mmio: &RwLock<RangeMap<Handler>>,
        exit_bytes: &[u8],
    ) -> Result<CompletionOutcome, Failure> {
        let mut cpu = Cpu::load(fd, page).map_err(host_failure)?;
        let memory = self.memory(&cpu, ram, mmio);
        if self.quirks.syscall_keeps_user_cs {
            match syscall_quirk::repair(&mut cpu, &memory) {
                Ok(true) => return Ok(CompletionOutcome::Repaired(syscall_quirk::NAME)),
                Ok(false) => {}
                Err(stop) => return Err(self.unfinished(&cpu, None, exit_bytes, stop)),
            }
        }
        let decoded = match decode::decode(&cpu, &memory, exit_bytes) {
            Ok(decoded) => decoded,
            Err(DecodeFailure::Stop(Stop::Fault(fault))) => {
                delivery::inject(&mut cpu, fault).map_err(host_stop)?;
                return Ok(CompletionOutcome::Raised {
                    mnemonic: Mnemonic::INVALID,
                    fault,
                });
            }
            Err(DecodeFailure::Stop(stop)) => {
                return Err(self.unfinished(&cpu, None, exit_bytes, stop));
            }
            Err(DecodeFailure::Invalid(bytes)) => {
                return Err(Failure::Unsupported(Box::new(Report::new(
                    &cpu,
                    None,
                    &bytes,
                    "the bytes at RIP do not decode to an instruction this VMM knows".into(),
                ))));
            }
        };
        let mnemonic = decoded.instruction.mnemonic();
        let saved = (cpu.regs, cpu.sregs);
        let mut completion = Completion {
            cpu,
            memory,
            decoded,
            quirks: &self.quirks,
            also: Vec::new(),
        };
        let result = dispatch(&mut completion, &mut self.vector_stubs);
        let Completion {
            mut cpu,
            memory,
            decoded,
            also,
            ..
        } = completion;
        match result {
            Ok(()) => {
                cpu.store().map_err(host_stop)?;
                Ok(CompletionOutcome::Completed {
                    mnemonic,
                    device_exit: memory.device_exit.get(),
                    also,
                })
            }
            Err(Stop::Fault(fault)) => {
                // Nothing of a faulting instruction is kept: registers as they were.
                let mut cpu = cpu.from_state(saved.0, saved.1);
                delivery::inject(&mut cpu, fault).map_err(host_stop)?;
                Ok(CompletionOutcome::Raised { mnemonic, fault })
            }
            Err(stop) => {
                let cpu = cpu.from_state(saved.0, saved.1);
                Err(self.unfinished(&cpu, Some(&decoded), &decoded.bytes, stop))
            }
        }
    }

    /// The report of an instruction left to fail (the fallback is off): decoded, not
    /// completed.
    pub fn describe(
        &self,
        fd: &VcpuFd,
        page: Option<&RunPage>,
        ram: &GuestRam,
        mmio: &RwLock<RangeMap<Handler>>,
        exit_bytes: &[u8],
        reason: &str,
    ) -> Option<Report> {
        let cpu = Cpu::load(fd, page).ok()?;
        let memory = self.memory(&cpu, ram, mmio);
        let decoded = decode::decode(&cpu, &memory, exit_bytes).ok();
        Some(Report::new(
            &cpu,
            decoded.as_ref(),
            exit_bytes,
            reason.to_string(),
        ))
    }

    fn memory<'m>(
        &self,
        cpu: &Cpu<'_>,
        ram: &'m GuestRam,
        mmio: &'m RwLock<RangeMap<Handler>>,
    ) -> GuestView<'m> {
        GuestView {
            ram,
            mmio,
            paging: PagingMode {
                cr0: cpu.sregs.cr0,
                cr3: cpu.sregs.cr3,
                cr4: cpu.sregs.cr4,
                efer: cpu.sregs.efer,
                physical_bits: self.physical_bits,
            },
            device_exit: Cell::new(None),
        }
    }

    fn unfinished(
        &self,
        cpu: &Cpu<'_>,
        decoded: Option<&Decoded>,
        bytes: &[u8],
        stop: Stop,
    ) -> Failure {
        match stop {
            Stop::Host(err) => Failure::Host(err),
            Stop::Unsupported(reason) => {
                Failure::Unsupported(Box::new(Report::new(cpu, decoded, bytes, reason)))
            }
            Stop::Fault(fault) => Failure::Unsupported(Box::new(Report::new(
                cpu,
                decoded,
                bytes,
                format!("{} while the VMM repaired a host quirk", fault.name()),
            ))),
        }
    }
}

fn host_failure(stop: Stop) -> Failure {
    match stop {
        Stop::Host(err) => Failure::Host(err),
        Stop::Unsupported(reason) => {
            Failure::Host(pyo3::exceptions::PyRuntimeError::new_err(reason))
        }
        Stop::Fault(fault) => Failure::Host(pyo3::exceptions::PyRuntimeError::new_err(format!(
            "unexpected {}",
            fault.name()
        ))),
    }
}

fn host_stop(stop: Stop) -> Failure {
    host_failure(stop)
}

/// The family that completes each instruction.
fn dispatch(c: &mut Completion<'_>, vector_stubs: &mut vector::StubCache) -> Result<(), Stop> {
    use Mnemonic as M;
    match c.decoded.instruction.mnemonic() {
        M::Clac | M::Stac => smap::complete(c),
        M::Int3 | M::Int | M::Into | M::Int1 => soft_interrupt::complete(c),
        M::Iret | M::Iretd => iret::complete(c),
        M::Popcnt | M::Lzcnt | M::Tzcnt => bitcount::complete(c),
        M::Wait => x87::complete_fwait(c),
        M::Ldmxcsr | M::Stmxcsr => fxsave::complete_mxcsr(c),
        M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64 => fxsave::complete(c),
        M::Xsave
        | M::Xsave64
        | M::Xsaveopt
        | M::Xsaveopt64
        | M::Xsavec
        | M::Xsavec64
        | M::Xsaves
        | M::Xsaves64
        | M::Xrstor
        | M::Xrstor64
        | M::Xrstors
        | M::Xrstors64
        | M::Xgetbv
        | M::Xsetbv => xsave::complete(c),
        M::Cmpxchg16b => cmpxchg16b::complete(c),
        M::Lar | M::Lsl | M::Verr | M::Verw => segment_checks::complete(c),
        M::Rdtscp | M::Rdpid => timestamp::complete(c),
        _ if vector::allowed(&c.decoded.instruction) => vector::complete(c, vector_stubs),
        other => Err(Stop::Unsupported(format!(
            "no completion for {other:?} (KVM's emulator cannot run it either)"
        ))),
    }
}
