//! The vCPU handle: state ioctls, interrupt injection, hooks, and run()/run_once().

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError, Weak};

use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_lapic_state, kvm_mp_state, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use pyo3::PyTraverseError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::address_map::AddressMap;
use crate::counters::Counters;
use crate::emulate::Emulator;
use crate::emulate::fpu_state::{AREA_SIZE, XsaveArea};
use crate::emulate::host_quirks::HostQuirks;
use crate::emulate::stop::Stop;
use crate::errors::{KvmError, interrupt_error, kvm_error};
use crate::exits::{Exit, RunError};
use crate::extint::ExtintInjector;
use crate::handlers::Handler;
use crate::ioctls;
use crate::kick::{KickState, VcpuKicker};
use crate::locks;
use crate::memory::SharedRam;
use crate::regs::{self, CpuidTuple};
use crate::run_loop::{Hooks, VcpuCore};
use crate::run_page::RunPage;
use crate::symbols::SharedSymbols;
use crate::vcpu_snapshot::{self, MsrReadError};

/// What a vCPU shares with its VM.
pub struct VcpuShared {
    pub map: Arc<AddressMap<Handler>>,
    pub counters: Arc<Mutex<Counters>>,
    pub ram: Arc<SharedRam>,
    pub vm_closed: Arc<AtomicBool>,
    pub symbols: SharedSymbols,
    pub quirks: HostQuirks,
    pub emulation_fallback: bool,
    /// KVM_CAP_SYNC_REGS covers regs, sregs and events.
    pub sync_regs: bool,
}

/// One virtual CPU. Created on any thread, run on the thread that calls run().
#[pyclass(frozen, module = "kvmfast")]
pub struct Vcpu {
    /// The VM this vCPU belongs to, kept open (slots and RAM) while the vCPU exists,
    /// unless it is closed: run() is refused from then on. Only kept alive, never
    /// called, so it is held untyped: `vm` builds vCPUs, and `vcpu` need not know `vm`.
    vm: Py<PyAny>,
    core: VcpuCore,
}

impl Vcpu {
    pub fn new(id: u64, fd: VcpuFd, page: RunPage, vm: Py<PyAny>, shared: VcpuShared) -> Self {
        let VcpuShared {
            map,
            counters,
            ram,
            vm_closed,
            symbols,
            quirks,
            emulation_fallback,
            sync_regs,
        } = shared;
        let page = Arc::new(page);
        Self {
            vm,
            core: VcpuCore {
                id,
                fd,
                kick: Arc::new(KickState::new(page.clone())),
                page,
                map,
                counters,
                hooks: Mutex::new(Hooks::default()),
                trace_enabled: AtomicBool::new(false),
                injector: Mutex::new(ExtintInjector::default()),
                ram,
                vm_closed,
                emulation_fallback: AtomicBool::new(emulation_fallback),
                sync_regs,
                emulator: Mutex::new(Emulator::new(quirks)),
                symbols,
                pending_repair: Mutex::new(None),
                repair_pending: AtomicBool::new(false),
                io_pending: AtomicBool::new(false),
            },
        }
    }

    /// What close() kicks.
    pub fn kick_state(&self) -> Weak<KickState> {
        Arc::downgrade(&self.core.kick)
    }

    fn run_with(&self, py: Python<'_>, single: bool) -> PyResult<Exit> {
        let core = &self.core;
        // Refused before the injector is taken too: a closed VM has nothing to run.
        core.check_vm_open()?;
        let mut guard = match core.injector.try_lock() {
            Ok(guard) => guard,
            // A panic in an earlier run left the lock poisoned; the injector's state is
            // still a consistent value.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(PyRuntimeError::new_err(format!(
                    "vCPU {} is already running on another thread",
                    core.id
                )));
            }
        };
        let injector: &mut ExtintInjector = &mut guard;
        // A signal handled since the caller's last bytecode (Ctrl-C while this thread was
        // getting here) would not interrupt the KVM_RUN to come: raise it now. Only the
        // few instructions between here and KVM_RUN are left without that check.
        py.check_signals()?;
        let result = py.detach(|| {
            let _running = core.kick.enter();
            core.run_loop(injector, single)
        });
        match result {
            Ok(exit) => Ok(exit.into_exit()),
            Err(RunError::Python(err)) => Err(err),
            Err(RunError::Guest(failure)) => Err(failure.into_pyerr(py, &core.fd)),
        }
    }

    /// An ioctl on this vCPU without the GIL: it blocks while another thread is in KVM_RUN.
    fn ioctl<T: Send>(
        &self,
        py: Python<'_>,
        name: &str,
        call: impl FnOnce(&VcpuFd) -> Result<T, vmm_sys_util::errno::Error> + Send,
    ) -> PyResult<T> {
        py.detach(|| call(&self.core.fd))
            .map_err(|e| kvm_error(name, e))
    }
}

/// A Stop from the shared FPU-state helpers, outside a completion.
fn stop_error(stop: Stop) -> PyErr {
    match stop {
        Stop::Host(err) => err,
        Stop::Unsupported(text) => PyRuntimeError::new_err(text),
        Stop::Fault(fault) => PyRuntimeError::new_err(fault.name()),
    }
}

fn set_optional(slot: &mut Option<Arc<Py<PyAny>>>, value: Option<Bound<'_, PyAny>>) {
    *slot = value.map(|v| Arc::new(v.unbind()));
}

#[pymethods]
impl Vcpu {
    #[getter]
    fn id(&self) -> u64 {
        self.core.id
    }

    #[getter]
    fn vm(&self, py: Python<'_>) -> Py<PyAny> {
        self.vm.clone_ref(py)
    }

    fn get_regs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.ioctl(py, "KVM_GET_REGS", VcpuFd::get_regs)?;
        regs::regs_to_dict(py, &state)
    }

    /// Changes the registers named in `changes`; the others keep their values.
    fn set_regs(&self, py: Python<'_>, changes: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut state = self.ioctl(py, "KVM_GET_REGS", VcpuFd::get_regs)?;
        regs::update_regs(&mut state, changes)?;
        self.ioctl(py, "KVM_SET_REGS", |fd| fd.set_regs(&state))
    }

    fn get_sregs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.ioctl(py, "KVM_GET_SREGS", VcpuFd::get_sregs)?;
        regs::sregs_to_dict(py, &state)
    }

    /// Changes the named special registers; segment and table dicts may be partial too.
    fn set_sregs(&self, py: Python<'_>, changes: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut state = self.ioctl(py, "KVM_GET_SREGS", VcpuFd::get_sregs)?;
        regs::update_sregs(&mut state, changes)?;
        self.ioctl(py, "KVM_SET_SREGS", |fd| fd.set_sregs(&state))
    }

    fn get_fpu<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.ioctl(py, "KVM_GET_FPU", VcpuFd::get_fpu)?;
        regs::fpu_to_dict(py, &state)
    }

    fn set_fpu(&self, py: Python<'_>, changes: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut state = self.ioctl(py, "KVM_GET_FPU", VcpuFd::get_fpu)?;
        regs::update_fpu(&mut state, changes)?;
        self.ioctl(py, "KVM_SET_FPU", |fd| fd.set_fpu(&state))
    }

    /// The 4096-byte XSAVE area in the standard format (KVM_GET_XSAVE).
    fn get_xsave<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let area = py
            .detach(|| XsaveArea::load(&self.core.fd))
            .map_err(stop_error)?;
        Ok(PyBytes::new(py, &area.bytes))
    }

    /// KVM_SET_XSAVE with a 4096-byte standard-format area (KVM checks its header).
    fn set_xsave(&self, py: Python<'_>, area: &[u8]) -> PyResult<()> {
        if area.len() != AREA_SIZE {
            return Err(PyValueError::new_err(format!(
                "an XSAVE area is {AREA_SIZE} bytes, not {}",
                area.len()
            )));
        }
        let area = XsaveArea {
            bytes: area.to_vec(),
        };
        py.detach(|| area.store(&self.core.fd)).map_err(stop_error)
    }

    /// Extended control registers (KVM_GET_XCRS) as {xcr: value}.
    fn get_xcrs(&self, py: Python<'_>) -> PyResult<BTreeMap<u32, u64>> {
        let xcrs = self.ioctl(py, "KVM_GET_XCRS", VcpuFd::get_xcrs)?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(xcrs.xcrs[..count]
            .iter()
            .map(|x| (x.xcr, x.value))
            .collect())
    }

    /// KVM_SET_XCRS from {xcr: value}.
    fn set_xcrs(&self, py: Python<'_>, values: BTreeMap<u32, u64>) -> PyResult<()> {
        let mut xcrs = kvm_bindings::kvm_xcrs::default();
        if values.len() > xcrs.xcrs.len() {
            return Err(PyValueError::new_err("too many XCRs"));
        }
        xcrs.nr_xcrs = values.len() as u32;
        for (slot, (xcr, value)) in xcrs.xcrs.iter_mut().zip(values) {
            slot.xcr = xcr;
            slot.value = value;
        }
        self.ioctl(py, "KVM_SET_XCRS", |fd| fd.set_xcrs(&xcrs))
    }

    /// The local APIC's 1024-byte register page (KVM_GET_LAPIC).
    fn get_lapic<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let state = self.ioctl(py, "KVM_GET_LAPIC", VcpuFd::get_lapic)?;
        let bytes: Vec<u8> = state.regs.iter().map(|&b| b as u8).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    fn set_lapic(&self, py: Python<'_>, page: &[u8]) -> PyResult<()> {
        let mut state = kvm_lapic_state::default();
        if page.len() != state.regs.len() {
            return Err(PyValueError::new_err(format!(
                "a LAPIC page is {} bytes, not {}",
                state.regs.len(),
                page.len()
            )));
        }
        for (slot, &byte) in state.regs.iter_mut().zip(page) {
            *slot = byte as libc::c_char;
        }
        self.ioctl(py, "KVM_SET_LAPIC", |fd| fd.set_lapic(&state))
    }

    /// Reads the given MSRs; an MSR KVM cannot read is a KvmError naming it.
    fn get_msrs(&self, py: Python<'_>, indices: Vec<u32>) -> PyResult<BTreeMap<u32, u64>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| PyValueError::new_err(format!("too many MSRs: {e:?}")))?;
        let read = py.detach(|| self.core.fd.get_msrs(&mut msrs));
        let read = read.map_err(|e| kvm_error("KVM_GET_MSRS", e))?;
        if read < indices.len() {
            return Err(KvmError::new_err((
                libc::EINVAL,
                format!("KVM_GET_MSRS: MSR {:#x} cannot be read", indices[read]),
            )));
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// Every MSR of `indices` that KVM_GET_MSRS reads; one it refuses is left out.
    fn save_msrs(&self, py: Python<'_>, indices: Vec<u32>) -> PyResult<BTreeMap<u32, u64>> {
        let fd = &self.core.fd;
        let values =
            py.detach(|| vcpu_snapshot::read_readable_msrs(&indices, |msrs| fd.get_msrs(msrs)));
        match values {
            Ok(values) => Ok(values.into_iter().collect()),
            Err(MsrReadError::Ioctl(e)) => Err(kvm_error("KVM_GET_MSRS", e)),
            Err(MsrReadError::Batch) => Err(PyValueError::new_err("too many MSRs in one batch")),
        }
    }

    /// Writes MSRs in the dict's order; the first one KVM refuses is a KvmError naming it.
    fn set_msrs(&self, py: Python<'_>, values: &Bound<'_, PyDict>) -> PyResult<()> {
        let values: Vec<(u32, u64)> = values
            .iter()
            .map(|(index, data)| Ok((index.extract()?, data.extract()?)))
            .collect::<PyResult<_>>()?;
        let entries: Vec<kvm_msr_entry> = values
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| PyValueError::new_err(format!("too many MSRs: {e:?}")))?;
        let written = self.ioctl(py, "KVM_SET_MSRS", |fd| fd.set_msrs(&msrs))?;
        if written < values.len() {
            return Err(KvmError::new_err((
                libc::EINVAL,
                format!(
                    "KVM_SET_MSRS: MSR {:#x} cannot be set to {:#x}",
                    values[written].0, values[written].1
                ),
            )));
        }
        Ok(())
    }

    /// KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples.
    fn set_cpuid(&self, py: Python<'_>, entries: Vec<CpuidTuple>) -> PyResult<()> {
        let entries: Vec<kvm_cpuid_entry2> = entries
            .into_iter()
            .map(
                |(function, index, flags, eax, ebx, ecx, edx)| kvm_cpuid_entry2 {
                    function,
                    index,
                    flags,
                    eax,
                    ebx,
                    ecx,
                    edx,
                    ..Default::default()
                },
            )
            .collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| PyValueError::new_err(format!("too many CPUID entries: {e:?}")))?;
        self.ioctl(py, "KVM_SET_CPUID2", |fd| fd.set_cpuid2(&cpuid))
    }

    /// KVM_GET_CPUID2: the table set_cpuid gave (empty before any).
    fn get_cpuid(&self, py: Python<'_>) -> PyResult<Vec<CpuidTuple>> {
        self.ioctl(py, "KVM_GET_CPUID2", vcpu_snapshot::get_cpuid)
    }

    /// KVM_GET_DEBUGREGS as {"db": [DR0..DR3], "dr6", "dr7", "flags"}.
    fn get_debugregs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.ioctl(py, "KVM_GET_DEBUGREGS", VcpuFd::get_debug_regs)?;
        vcpu_snapshot::debugregs_to_dict(py, &state)
    }

    /// KVM_SET_DEBUGREGS with the given keys changed; the others keep their values.
    fn set_debugregs(&self, py: Python<'_>, changes: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut state = self.ioctl(py, "KVM_GET_DEBUGREGS", VcpuFd::get_debug_regs)?;
        vcpu_snapshot::update_debugregs(&mut state, changes)?;
        self.ioctl(py, "KVM_SET_DEBUGREGS", |fd| fd.set_debug_regs(&state))
    }

    /// KVM_GET_TSC_KHZ: the guest's TSC frequency.
    fn tsc_khz(&self, py: Python<'_>) -> PyResult<u32> {
        self.ioctl(py, "KVM_GET_TSC_KHZ", VcpuFd::get_tsc_khz)
    }

    /// KVM_KVMCLOCK_CTRL (tells the guest it was paused, against soft-lockup reports):
    /// False when KVM answers EINVAL, the guest having no kvmclock.
    fn kvmclock_ctrl(&self, py: Python<'_>) -> PyResult<bool> {
        self.ioctl(py, "KVM_KVMCLOCK_CTRL", vcpu_snapshot::kvmclock_ctrl)
    }

    fn get_vcpu_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let state = self.ioctl(py, "KVM_GET_VCPU_EVENTS", VcpuFd::get_vcpu_events)?;
        regs::events_to_dict(py, &state)
    }

    fn set_vcpu_events(&self, py: Python<'_>, changes: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut state = self.ioctl(py, "KVM_GET_VCPU_EVENTS", VcpuFd::get_vcpu_events)?;
        regs::update_events(&mut state, changes)?;
        self.ioctl(py, "KVM_SET_VCPU_EVENTS", |fd| fd.set_vcpu_events(&state))
    }

    fn get_mp_state(&self, py: Python<'_>) -> PyResult<u32> {
        Ok(self
            .ioctl(py, "KVM_GET_MP_STATE", VcpuFd::get_mp_state)?
            .mp_state)
    }

    fn set_mp_state(&self, py: Python<'_>, mp_state: u32) -> PyResult<()> {
        self.ioctl(py, "KVM_SET_MP_STATE", |fd| {
            fd.set_mp_state(kvm_mp_state { mp_state })
        })
    }

    /// Raw KVM_INTERRUPT; KVM's errors become InterruptAlreadyQueued, InvalidInterrupt,
    /// PicInKernel or BadInterruptPointer.
    fn interrupt(&self, vector: u32) -> PyResult<()> {
        ioctls::interrupt(&self.core.fd, vector).map_err(interrupt_error)
    }

    /// KVM_INTERRUPT with a pointer the kernel cannot read (a conformance probe: EFAULT).
    fn interrupt_with_invalid_pointer(&self) -> PyResult<()> {
        ioctls::interrupt_with_bad_pointer(&self.core.fd).map_err(interrupt_error)
    }

    /// KVM_NMI now (from the calling thread); see VcpuKicker.request_nmi for the run loop.
    fn nmi(&self, py: Python<'_>) -> PyResult<()> {
        self.ioctl(py, "KVM_NMI", VcpuFd::nmi)
    }

    /// handler(vector) is called on the vCPU thread at KVM_EXIT_IOAPIC_EOI.
    #[pyo3(signature = (handler))]
    fn set_eoi_handler(&self, handler: Option<Bound<'_, PyAny>>) {
        set_optional(&mut self.core.hooks().eoi, handler);
    }

    /// controller.acknowledge() -> vector is the PIC's INTA cycle for ExtINT injection.
    #[pyo3(signature = (controller))]
    fn set_extint_controller(&self, controller: Option<Bound<'_, PyAny>>) {
        set_optional(&mut self.core.hooks().extint, controller);
    }

    /// trace(reason, address, size, is_write, value) after every exit; None turns it off.
    #[pyo3(signature = (trace))]
    fn set_trace(&self, trace: Option<Bound<'_, PyAny>>) {
        let mut hooks = self.core.hooks();
        set_optional(&mut hooks.trace, trace);
        self.core
            .trace_enabled
            .store(hooks.trace.is_some(), Ordering::Relaxed);
    }

    fn kicker(&self) -> VcpuKicker {
        VcpuKicker::new(self.core.kick.clone())
    }

    /// Runs the vCPU on this thread until an exit the caller must see.
    fn run(&self, py: Python<'_>) -> PyResult<Exit> {
        self.run_with(py, false)
    }

    /// One KVM_RUN with the same dispatch; returns the exit's name.
    fn run_once(&self, py: Python<'_>) -> PyResult<Exit> {
        self.run_with(py, true)
    }

    /// Whether instructions KVM cannot emulate are completed here (default True); when
    /// False the first one ends run() with EmulationFailure, as QEMU does.
    #[getter]
    fn get_emulation_fallback(&self) -> bool {
        self.core.emulation_fallback.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_emulation_fallback(&self, enabled: bool) {
        self.core
            .emulation_fallback
            .store(enabled, Ordering::Relaxed);
    }

    #[getter]
    fn ready_for_interrupt_injection(&self) -> bool {
        self.core.page.ready_for_interrupt_injection()
    }

    #[getter]
    fn if_flag(&self) -> bool {
        self.core.page.if_flag()
    }

    #[getter]
    fn get_request_interrupt_window(&self) -> bool {
        self.core.page.request_interrupt_window()
    }

    #[setter]
    fn set_request_interrupt_window(&self, requested: bool) {
        self.core.page.set_request_interrupt_window(requested);
    }

    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snapshot = locks::lock(&self.core.counters).clone();
        snapshot.to_dict(py)
    }

    fn __repr__(&self) -> String {
        format!("Vcpu(id={})", self.core.id)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.vm)?;
        // Never block in a traversal: hooks being changed are simply not reported.
        if let Ok(hooks) = self.core.hooks.try_lock() {
            for hook in [&hooks.eoi, &hooks.extint, &hooks.trace]
                .into_iter()
                .flatten()
            {
                visit.call(&**hook)?;
            }
        }
        Ok(())
    }

    /// Breaks cycles through the hooks (a handler holding its vCPU).
    fn __clear__(&self) {
        let hooks = std::mem::take(&mut *self.core.hooks());
        self.core.trace_enabled.store(false, Ordering::Relaxed);
        drop(hooks);
    }
}
