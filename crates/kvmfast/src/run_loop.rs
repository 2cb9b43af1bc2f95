//! What a vCPU owns (`VcpuCore`) and its run loop: requests, ExtINT injection, KVM_RUN,
//! what to do with each exit (`exit_action`). `vcpu::Vcpu` is the Python handle around it.
//!
//! It runs on the thread that called Vcpu.run(), without the GIL; the GIL is taken
//! only to call a Python handler, the EOI handler, the PIC's acknowledge() or the
//! trace hook.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO,
    KVM_EXIT_IOAPIC_EOI, KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT, KVM_INTERNAL_ERROR_EMULATION, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::VcpuFd;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use vmm_sys_util::errno;

use crate::address_map::AddressMap;
use crate::counters::{Counters, exit_name};
use crate::dispatch::{self, Access, Dispatched};
use crate::emulate::syscall_quirk::{PendingRepair, RepairState};
use crate::emulate::{CompletionOutcome, Emulator, Failure, Report};
use crate::errors::kvm_error;
use crate::exits::{ExitInfo, GuestFailure, RunError, emulation_insn_bytes};
use crate::extint::{ExtintInjector, InjectionPort};
use crate::handlers::Handler;
use crate::ioctls;
use crate::kick::{
    BeforeEntry, KickState, REQUEST_LINT1, REQUEST_NMI, REQUEST_PAUSE, REQUEST_SAMPLE,
    before_entry, with_kick_signal_blocked,
};
use crate::lapic;
use crate::locks;
use crate::memory::SharedRam;
use crate::run_page::RunPage;
use crate::symbols::SharedSymbols;

/// Counted in quirk_repairs when KVM lost a SYSCALL repair and it was applied again.
const REPAIR_REAPPLIED: &str = "syscall_repair_reapplied";

/// Python callables the run loop may call; Arc so the loop can take one without the GIL.
#[derive(Debug, Default)]
pub struct Hooks {
    pub eoi: Option<Arc<Py<PyAny>>>,
    pub extint: Option<Arc<Py<PyAny>>>,
    pub trace: Option<Arc<Py<PyAny>>>,
}

/// Everything a vCPU owns; shared by reference with the run loop.
pub struct VcpuCore {
    pub id: u64,
    pub fd: VcpuFd,
    pub page: Arc<RunPage>,
    pub kick: Arc<KickState>,
    pub map: Arc<AddressMap<Handler>>,
    pub counters: Arc<Mutex<Counters>>,
    pub hooks: Mutex<Hooks>,
    /// Mirrors `hooks.trace.is_some()` so that an untraced exit costs one load.
    pub trace_enabled: AtomicBool,
    /// Locked for the whole of run(): the injector's state, and the guard against two
    /// threads running one vCPU.
    pub injector: Mutex<ExtintInjector>,
    /// Guest RAM, read and written when an instruction is completed here.
    pub ram: Arc<SharedRam>,
    /// Set when the VM is closed: its RAM is no longer guest memory, so the vCPU must
    /// not run again (checked before every KVM_RUN; close() kicks it out of one).
    pub vm_closed: Arc<AtomicBool>,
    /// Whether emulation failures are completed here (else they end the run).
    pub emulation_fallback: AtomicBool,
    pub emulator: Mutex<Emulator>,
    /// The VM's symbol table, for failure reports.
    pub symbols: SharedSymbols,
    /// Whether KVM can sync registers through the run page (turned on at the first
    /// completion: it costs every exit a little, and saves a completion three ioctls).
    pub sync_regs: bool,
    /// A SYSCALL-quirk repair the guest has not yet run from (emulate::syscall_quirk).
    pub pending_repair: Mutex<Option<PendingRepair>>,
    /// Mirrors `pending_repair.is_some()`, so that an ordinary exit costs one load.
    pub repair_pending: AtomicBool,
    /// The last KVM_RUN ended in an I/O or MMIO exit that only the next KVM_RUN
    /// completes (see `complete_pending_io`).
    pub io_pending: AtomicBool,
}

impl VcpuCore {
    pub fn hooks(&self) -> MutexGuard<'_, Hooks> {
        locks::lock(&self.hooks)
    }

    /// ValueError once the VM is closed (as Vm's own methods raise).
    pub fn check_vm_open(&self) -> PyResult<()> {
        if self.vm_closed.load(Ordering::SeqCst) {
            return Err(PyValueError::new_err(format!(
                "vCPU {} cannot run: its VM is closed",
                self.id
            )));
        }
        Ok(())
    }
}

/// The injector's view of the vCPU.
struct KvmInjectionPort<'a> {
    page: &'a RunPage,
    fd: &'a VcpuFd,
}

impl InjectionPort for KvmInjectionPort<'_> {
    fn window_open(&self) -> bool {
        self.page.ready_for_interrupt_injection() && self.page.if_flag()
    }

    fn set_window_request(&mut self, requested: bool) {
        self.page.set_request_interrupt_window(requested);
    }

    fn interrupt(&mut self, vector: u8) -> Result<(), errno::Error> {
        ioctls::interrupt(self.fd, u32::from(vector))
    }
}

impl VcpuCore {
    /// Runs until an exit that the caller must see (`single`: after one KVM_RUN).
    pub fn run_loop(
        &self,
        injector: &mut ExtintInjector,
        single: bool,
    ) -> Result<ExitInfo, RunError> {
        let result = self.run_until_stop(injector, single);
        // Registers a completion left in the run page for the next entry must reach
        // KVM now: the caller may read or set them before it runs the vCPU again.
        match (self.flush_synced_registers(), result) {
            (Ok(()), result) => result,
            (Err(err), Ok(_)) => Err(err.into()),
            (Err(_), Err(err)) => Err(err),
        }
    }

    fn flush_synced_registers(&self) -> PyResult<()> {
        let dirty = self.page.dirty_regs();
        if dirty == 0 {
            return Ok(());
        }
        self.page.set_dirty_regs(0);
        if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_SREGS) != 0 {
            self.fd
                .set_sregs(&self.page.sync_sregs())
                .map_err(|e| kvm_error("KVM_SET_SREGS", e))?;
        }
        if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) != 0 {
            self.fd
                .set_regs(&self.page.sync_regs())
                .map_err(|e| kvm_error("KVM_SET_REGS", e))?;
        }
        if dirty & u64::from(kvm_bindings::KVM_SYNC_X86_EVENTS) != 0 {
            self.fd
                .set_vcpu_events(&self.page.sync_events())
                .map_err(|e| kvm_error("KVM_SET_VCPU_EVENTS", e))?;
        }
        Ok(())
    }

    fn run_until_stop(
        &self,
        injector: &mut ExtintInjector,
        single: bool,
    ) -> Result<ExitInfo, RunError> {
        loop {
            let requests = self.kick.take_requests();
            if requests & REQUEST_NMI != 0 {
                self.fd.nmi().map_err(|e| kvm_error("KVM_NMI", e))?;
            }
            if requests & REQUEST_LINT1 != 0 {
                self.raise_lint1()?;
            }
            if requests & REQUEST_SAMPLE != 0 {
                self.sample_rip()?;
            }
            // Before service_extint: a pause must not acknowledge the PIC.
            match before_entry(
                requests,
                self.repair_pending.load(Ordering::Relaxed),
                injector.holds_acknowledged(),
            ) {
                BeforeEntry::Stop => return Ok(ExitInfo::new("stopped", 0)),
                BeforeEntry::Pause => {
                    return Ok(self
                        .complete_pending_io(injector)?
                        .unwrap_or_else(|| ExitInfo::new("paused", 0)));
                }
                BeforeEntry::DeferPause => self.kick.defer(REQUEST_PAUSE),
                BeforeEntry::Enter => {}
            }
            // After take_requests: close() sets the flag before its kick, so a flag not
            // seen here means the kick's immediate_exit ends the next KVM_RUN at once.
            self.check_vm_open()?;
            self.service_extint(injector)?;

            let entered = if self.repair_pending.load(Ordering::Relaxed) {
                // The first entry after a SYSCALL repair must not be cut short by a
                // kick (emulate::syscall_quirk::PendingRepair): the kick waits for the
                // guest's next exit.
                with_kick_signal_blocked(|| ioctls::run(&self.fd))
            } else {
                ioctls::run(&self.fd)
            };
            injector.exited();
            self.watch_pending_repair()?;
            let reason = self.exit_reason(entered)?;
            if let Some(exit) = self.handle_exit(reason, injector, single)? {
                return Ok(exit);
            }
        }
    }

    /// The exit a KVM_RUN ended with (KVM_EXIT_INTR for EINTR); notes whether an I/O
    /// exit now waits for the next KVM_RUN to complete it.
    fn exit_reason(&self, entered: Result<(), errno::Error>) -> Result<u32, RunError> {
        let reason = match entered {
            Ok(()) => self.page.exit_reason(),
            Err(err) if err.errno() == libc::EINTR => KVM_EXIT_INTR,
            Err(err) => return Err(kvm_error("KVM_RUN", err).into()),
        };
        self.io_pending.store(
            exit_action(reason) == ExitAction::Dispatch,
            Ordering::Relaxed,
        );
        Ok(reason)
    }

    /// Before run() returns "paused": KVM puts an IN's or MMIO read's value in its
    /// register and moves RIP past the instruction only at the next KVM_RUN (KVM API
    /// doc 5, kvm_run: such operations "are complete (and guest state is consistent)
    /// only after userspace has re-entered the kernel with KVM_RUN"; `immediate_exit`
    /// completes them "without allowing any further instructions to be executed").
    /// Left pending, the paused state is not the whole state: registers copied to
    /// another vCPU would make it read the device again. A completion may need another
    /// exit (a string I/O's next element), which is handled as any; Some(exit) when
    /// that one is for the caller, the pause then being kept for the next run().
    fn complete_pending_io(
        &self,
        injector: &mut ExtintInjector,
    ) -> Result<Option<ExitInfo>, RunError> {
        while self.io_pending.load(Ordering::Relaxed) {
            self.page.set_immediate_exit(true);
            let entered = ioctls::run(&self.fd);
            injector.exited();
            let reason = self.exit_reason(entered)?;
            if let Some(exit) = self.handle_exit(reason, injector, false)? {
                self.kick.defer(REQUEST_PAUSE);
                return Ok(Some(exit));
            }
        }
        Ok(None)
    }

    /// After each KVM_RUN that follows a SYSCALL-quirk repair: applies the repair again
    /// if KVM lost it (emulate::syscall_quirk::PendingRepair), forgets it once the
    /// guest has run from it.
    fn watch_pending_repair(&self) -> PyResult<()> {
        if !self.repair_pending.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut pending = locks::lock(&self.pending_repair);
        let Some(repair) = *pending else {
            return Ok(());
        };
        let synced = u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS);
        let (rip, cs) = if self.page.valid_regs() & synced == synced {
            (
                self.page.sync_regs().rip,
                self.page.sync_sregs().cs.selector,
            )
        } else {
            let regs = self
                .fd
                .get_regs()
                .map_err(|e| kvm_error("KVM_GET_REGS", e))?;
            let sregs = self
                .fd
                .get_sregs()
                .map_err(|e| kvm_error("KVM_GET_SREGS", e))?;
            (regs.rip, sregs.cs.selector)
        };
        match repair.state_after(rip, cs) {
            RepairState::Ran => {
                *pending = None;
                self.repair_pending.store(false, Ordering::Relaxed);
            }
            RepairState::Waiting => {}
            RepairState::Lost => {
                if self.page.valid_regs() & synced == synced {
                    self.page.put_sync_regs(&repair.regs);
                    self.page.put_sync_sregs(&repair.sregs);
                } else {
                    self.fd
                        .set_sregs(&repair.sregs)
                        .map_err(|e| kvm_error("KVM_SET_SREGS", e))?;
                    self.fd
                        .set_regs(&repair.regs)
                        .map_err(|e| kvm_error("KVM_SET_REGS", e))?;
                }
                locks::lock(&self.counters).count_quirk_repair(REPAIR_REAPPLIED);
            }
        }
        Ok(())
    }

    /// LINT1 rose: the vCPU is out of KVM_RUN (paused) on its own thread, so its LVT is
    /// current; KVM_NMI only if LINT1 is programmed to deliver one.
    fn raise_lint1(&self) -> PyResult<()> {
        let state = self
            .fd
            .get_lapic()
            .map_err(|e| kvm_error("KVM_GET_LAPIC", e))?;
        if lapic::lint1_queues_nmi(lapic::register(&state.regs, lapic::LVT_LINT1)) {
            self.fd.nmi().map_err(|e| kvm_error("KVM_NMI", e))?;
            locks::lock(&self.counters).count_lint1_nmi();
        }
        Ok(())
    }

    /// A profiler tick: the RIP the guest was at when the kick took it out.
    fn sample_rip(&self) -> PyResult<()> {
        // The run page's copy is the newest once KVM fills it (and a completion may have
        // moved RIP there since); else one KVM_GET_REGS.
        let rip = if self.page.valid_regs() & u64::from(KVM_SYNC_X86_REGS) != 0 {
            self.page.sync_regs().rip
        } else {
            self.fd
                .get_regs()
                .map_err(|e| kvm_error("KVM_GET_REGS", e))?
                .rip
        };
        locks::lock(&self.counters).count_sample(rip);
        Ok(())
    }

    /// Dispatches one exit; Some(exit) when run() must return it.
    fn handle_exit(
        &self,
        reason: u32,
        injector: &mut ExtintInjector,
        single: bool,
    ) -> Result<Option<ExitInfo>, RunError> {
        let name = exit_name(reason);
        let mut access = Access::default();
        let action = exit_action(reason);
        if action != ExitAction::Dispatch {
            // I/O exits are counted with their range by dispatch_access.
            self.count(reason, |_| {});
        }
        let stop = match action {
            ExitAction::Dispatch => {
                let dispatched = self.dispatch_access(reason)?;
                access = dispatched.access;
                dispatched
                    .device_exit
                    .map(|value| ExitInfo::new("device_exit", value))
                    .or_else(|| single.then(|| access_exit(name, &access)))
            }
            ExitAction::CheckSignals => {
                // The signal may have been Python's (Ctrl-C reaching a vCPU run on the
                // main thread): let Python's handlers run, and raise what they raise.
                Python::attach(|py| py.check_signals())?;
                single.then(|| ExitInfo::new(name, 0))
            }
            ExitAction::ServiceExtint => {
                self.service_extint(injector)?;
                single.then(|| ExitInfo::new(name, 0))
            }
            ExitAction::CallEoiHandler => {
                let vector = self.page.eoi_vector();
                access.value = u64::from(vector);
                self.call_eoi_handler(vector)?;
                single.then(|| ExitInfo::new(name, u64::from(vector)))
            }
            ExitAction::TripleFault => return Err(RunError::Guest(GuestFailure::TripleFault)),
            ExitAction::Complete => {
                let (suberror, data) = self.page.internal_error();
                if suberror != KVM_INTERNAL_ERROR_EMULATION {
                    return Err(RunError::Guest(GuestFailure::Emulation {
                        suberror,
                        data,
                        report: None,
                        symbol: None,
                    }));
                }
                self.complete_instruction(suberror, data)?
                    .or_else(|| single.then(|| ExitInfo::new(name, u64::from(suberror))))
            }
            ExitAction::EntryFailure => {
                let (hardware_entry_failure_reason, cpu) = self.page.fail_entry();
                return Err(RunError::Guest(GuestFailure::Entry {
                    hardware_entry_failure_reason,
                    cpu,
                }));
            }
            ExitAction::SystemEvent => {
                let (event_type, data) = self.page.system_event();
                access.value = u64::from(event_type);
                Some(ExitInfo {
                    reason: name,
                    value: u64::from(event_type),
                    data,
                })
            }
            ExitAction::Halt => Some(ExitInfo::new(name, 0)),
            ExitAction::Return => Some(ExitInfo::new(name, u64::from(reason))),
        };
        if self.trace_enabled.load(Ordering::Relaxed) {
            self.call_trace(name, &access)?;
        }
        Ok(stop)
    }

    /// An instruction KVM could not emulate: completed here unless the fallback is off.
    /// Some(exit) when a store of the instruction reached an ExitSink.
    fn complete_instruction(
        &self,
        suberror: u32,
        data: Vec<u64>,
    ) -> Result<Option<ExitInfo>, RunError> {
        let bytes = emulation_insn_bytes(&data);
        let mut emulator = locks::lock(&self.emulator);
        if starts_syncing_registers(self.sync_regs, self.page.valid_regs()) {
            // From the next exit on, registers come in the run page: a guest that needs
            // one completion needs thousands, and each state ioctl costs about as much
            // as an exit on hosts like this one.
            self.page
                .set_valid_regs(u64::from(kvm_bindings::KVM_SYNC_X86_VALID_FIELDS));
            return self.complete_with(&mut emulator, None, suberror, data, &bytes);
        }
        self.complete_with(&mut emulator, Some(&self.page), suberror, data, &bytes)
    }

    fn complete_with(
        &self,
        emulator: &mut Emulator,
        page: Option<&RunPage>,
        suberror: u32,
        data: Vec<u64>,
        bytes: &[u8],
    ) -> Result<Option<ExitInfo>, RunError> {
        // A snapshot, not a lock: the completion may wait for the GIL in a device call.
        let ram = self.ram.snapshot();
        if !self.emulation_fallback.load(Ordering::Relaxed) {
            let report = emulator.describe(
                &self.fd,
                page,
                &ram,
                &self.map.mmio,
                bytes,
                "the emulation fallback is off",
            );
            return Err(self.emulation_failure(suberror, data, report.map(Box::new)));
        }
        match emulator.complete(&self.fd, page, &ram, &self.map.mmio, bytes) {
            Ok(CompletionOutcome::Completed {
                mnemonic,
                device_exit,
                also,
            }) => {
                let mut counters = locks::lock(&self.counters);
                counters.count_completion(mnemonic);
                for mnemonic in also {
                    counters.count_completion(mnemonic);
                }
                drop(counters);
                Ok(device_exit.map(|value| ExitInfo::new("device_exit", value)))
            }
            Ok(CompletionOutcome::Raised { fault, .. }) => {
                locks::lock(&self.counters).count_emulation_exception(fault.name());
                Ok(None)
            }
            Ok(CompletionOutcome::Repaired(quirk)) => {
                locks::lock(&self.counters).count_quirk_repair(quirk);
                *locks::lock(&self.pending_repair) = Some(self.repaired_state(page)?);
                self.repair_pending.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Err(Failure::Unsupported(report)) => {
                Err(self.emulation_failure(suberror, data, Some(report)))
            }
            Err(Failure::Host(err)) => Err(RunError::Python(err)),
        }
    }

    /// The registers a repair left for the next entry: in the run page when synced,
    /// else already set in KVM.
    fn repaired_state(&self, page: Option<&RunPage>) -> Result<PendingRepair, RunError> {
        Ok(match page {
            Some(page) => PendingRepair {
                regs: page.sync_regs(),
                sregs: page.sync_sregs(),
            },
            None => PendingRepair {
                regs: self
                    .fd
                    .get_regs()
                    .map_err(|e| kvm_error("KVM_GET_REGS", e))?,
                sregs: self
                    .fd
                    .get_sregs()
                    .map_err(|e| kvm_error("KVM_GET_SREGS", e))?,
            },
        })
    }

    fn emulation_failure(
        &self,
        suberror: u32,
        data: Vec<u64>,
        report: Option<Box<Report>>,
    ) -> RunError {
        let symbol = report.as_ref().and_then(|report| {
            locks::read(&self.symbols)
                .as_ref()
                .and_then(|table| table.describe(report.rip))
        });
        RunError::Guest(GuestFailure::Emulation {
            suberror,
            data,
            report,
            symbol,
        })
    }

    fn count(&self, reason: u32, also: impl FnOnce(&mut Counters)) {
        let mut counters = locks::lock(&self.counters);
        counters.count_exit(reason);
        also(&mut counters);
    }

    fn dispatch_access(&self, reason: u32) -> Result<Dispatched, RunError> {
        let is_pio = reason == KVM_EXIT_IO;
        let (base, result) = if is_pio {
            dispatch::io(&self.page, &self.map.pio)
        } else {
            dispatch::mmio(&self.page, &self.map.mmio)
        };
        self.count(reason, |counters| {
            if is_pio {
                counters.count_pio(base);
            } else {
                counters.count_mmio(base);
            }
        });
        Ok(result?)
    }

    fn service_extint(&self, injector: &mut ExtintInjector) -> PyResult<()> {
        let mut port = KvmInjectionPort {
            page: &self.page,
            fd: &self.fd,
        };
        injector.service(
            &mut port,
            || self.kick.extint_level(),
            || self.acknowledge(),
        )
    }

    /// The PIC's INTA cycle: controller.acknowledge() -> vector.
    fn acknowledge(&self) -> PyResult<Option<u8>> {
        let Some(controller) = self.hooks().extint.clone() else {
            return Ok(None);
        };
        Python::attach(|py| {
            let vector = controller.call_method0(py, intern!(py, "acknowledge"))?;
            vector.extract::<u8>(py).map(Some)
        })
    }

    fn call_eoi_handler(&self, vector: u8) -> PyResult<()> {
        let Some(handler) = self.hooks().eoi.clone() else {
            return Ok(());
        };
        Python::attach(|py| handler.call1(py, (vector,)).map(drop))
    }

    fn call_trace(&self, name: &'static str, access: &Access) -> PyResult<()> {
        let Some(trace) = self.hooks().trace.clone() else {
            return Ok(());
        };
        Python::attach(|py| {
            trace
                .call1(
                    py,
                    (
                        name,
                        access.address,
                        access.size,
                        access.is_write,
                        access.value,
                    ),
                )
                .map(drop)
        })
    }
}

/// What the loop does with an exit, by its KVM_EXIT_* reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitAction {
    /// IN/OUT or MMIO: the owner of the address answers; counted with its range.
    Dispatch,
    /// KVM_RUN was interrupted by a signal, perhaps Python's: its handlers run.
    CheckSignals,
    /// The guest can take an interrupt: the ExtINT injector may queue one.
    ServiceExtint,
    /// The guest ended a level-triggered interrupt: the EOI handler is told.
    CallEoiHandler,
    /// A triple fault: the run ends with TripleFault.
    TripleFault,
    /// KVM's emulator gave up: the instruction is completed here (other internal
    /// errors end the run with EmulationFailure).
    Complete,
    /// VM entry failed: the run ends with EntryFailure.
    EntryFailure,
    /// Reset, shutdown or crash asked for by the guest: run() returns it.
    SystemEvent,
    /// HLT, which KVM hands out only without an in-kernel LAPIC: run() returns it.
    Halt,
    /// An exit the loop does not handle: run() returns it rather than enter again.
    Return,
}

fn exit_action(reason: u32) -> ExitAction {
    match reason {
        KVM_EXIT_IO | KVM_EXIT_MMIO => ExitAction::Dispatch,
        KVM_EXIT_INTR => ExitAction::CheckSignals,
        KVM_EXIT_IRQ_WINDOW_OPEN => ExitAction::ServiceExtint,
        KVM_EXIT_IOAPIC_EOI => ExitAction::CallEoiHandler,
        KVM_EXIT_SHUTDOWN => ExitAction::TripleFault,
        KVM_EXIT_INTERNAL_ERROR => ExitAction::Complete,
        KVM_EXIT_FAIL_ENTRY => ExitAction::EntryFailure,
        KVM_EXIT_SYSTEM_EVENT => ExitAction::SystemEvent,
        KVM_EXIT_HLT => ExitAction::Halt,
        _ => ExitAction::Return,
    }
}

/// Whether the exit about to be completed is the one to turn register syncing on: the
/// first completion of a vCPU whose KVM can sync (KVM_CAP_SYNC_REGS).
fn starts_syncing_registers(sync_supported: bool, valid_regs: u64) -> bool {
    sync_supported && valid_regs == 0
}

/// run_once's report of an I/O or MMIO exit: value is the address, data is
/// [size, is_write, value of the first element].
fn access_exit(name: &'static str, access: &Access) -> ExitInfo {
    ExitInfo {
        reason: name,
        value: access.address,
        data: vec![access.size as u64, u64::from(access.is_write), access.value],
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{
        KVM_EXIT_DEBUG, KVM_EXIT_EXCEPTION, KVM_EXIT_MEMORY_FAULT, KVM_EXIT_UNKNOWN,
        KVM_EXIT_X86_RDMSR,
    };

    use super::*;
    use crate::counters::EXIT_NAMES;

    const HANDLED: [(u32, ExitAction); 10] = [
        (KVM_EXIT_IO, ExitAction::Dispatch),
        (KVM_EXIT_MMIO, ExitAction::Dispatch),
        (KVM_EXIT_INTR, ExitAction::CheckSignals),
        (KVM_EXIT_IRQ_WINDOW_OPEN, ExitAction::ServiceExtint),
        (KVM_EXIT_IOAPIC_EOI, ExitAction::CallEoiHandler),
        (KVM_EXIT_SHUTDOWN, ExitAction::TripleFault),
        (KVM_EXIT_INTERNAL_ERROR, ExitAction::Complete),
        (KVM_EXIT_FAIL_ENTRY, ExitAction::EntryFailure),
        (KVM_EXIT_SYSTEM_EVENT, ExitAction::SystemEvent),
        (KVM_EXIT_HLT, ExitAction::Halt),
    ];

    #[test]
    fn each_handled_exit_has_its_action() {
        for (reason, action) in HANDLED {
            assert_eq!(exit_action(reason), action, "{}", exit_name(reason));
        }
    }

    #[test]
    fn an_exit_the_loop_does_not_handle_goes_back_to_the_caller() {
        // Entering again after an exit nobody handled would loop on it (a debug exit,
        // an MSR exit) or lose it; run() returns it instead.
        for reason in [
            KVM_EXIT_UNKNOWN,
            KVM_EXIT_EXCEPTION,
            KVM_EXIT_DEBUG,
            KVM_EXIT_X86_RDMSR,
            KVM_EXIT_MEMORY_FAULT,
            1000,
        ] {
            assert_eq!(exit_action(reason), ExitAction::Return, "{reason}");
        }
        let all = 0..=u32::try_from(EXIT_NAMES.len()).unwrap() + 1;
        for reason in all.filter(|r| HANDLED.iter().all(|(handled, _)| handled != r)) {
            assert_eq!(
                exit_action(reason),
                ExitAction::Return,
                "{}",
                exit_name(reason)
            );
        }
    }

    #[test]
    fn only_port_and_mmio_exits_are_counted_by_their_range() {
        let dispatched: Vec<u32> = (0..=u32::try_from(EXIT_NAMES.len()).unwrap())
            .filter(|&reason| exit_action(reason) == ExitAction::Dispatch)
            .collect();
        assert_eq!(dispatched, vec![KVM_EXIT_IO, KVM_EXIT_MMIO]);
    }

    #[test]
    fn register_syncing_starts_at_the_first_completion_where_kvm_can_sync() {
        assert!(starts_syncing_registers(true, 0));
        // Already on: the valid mask stays as the loop set it.
        assert!(!starts_syncing_registers(
            true,
            u64::from(kvm_bindings::KVM_SYNC_X86_VALID_FIELDS)
        ));
        assert!(!starts_syncing_registers(false, 0));
    }

    #[test]
    fn run_once_reports_an_access_as_address_then_size_direction_value() {
        let access = Access {
            address: 0x3f8,
            size: 1,
            is_write: true,
            value: 0x41,
        };
        let exit = access_exit("io", &access);
        assert_eq!(
            exit,
            ExitInfo {
                reason: "io",
                value: 0x3f8,
                data: vec![1, 1, 0x41],
            }
        );
    }
}
