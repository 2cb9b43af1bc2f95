//! The VM handle: memory slots, the address map, GSI routing, irqfd and ioeventfd,
//! vCPU creation and the VM-wide counters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use kvm_bindings::{
    KVM_IRQFD_FLAG_DEASSIGN, KVM_IRQFD_FLAG_RESAMPLE, kvm_clock_data, kvm_enable_cap,
    kvm_ioeventfd, kvm_irqfd, kvm_msi, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use pyo3::PyTraverseError;
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::address_map::{AddressMap, RangeMap};
use crate::counters::Counters;
use crate::emulate::host_quirks::HostQuirks;
use crate::errors::{errno_error, kvm_error};
use crate::handlers::Handler;
use crate::ioctls;
use crate::kick::{KickState, REQUEST_KICK};
use crate::locks;
use crate::memory::{GuestMemory, GuestRam, Mapping, RamRegion, SharedRam};
use crate::routing::{MsiRoute, RoutingTable};
use crate::run_page::RunPage;
use crate::symbols::{SharedSymbols, SymbolTable};
use crate::vcpu::{Vcpu, VcpuShared};

const PAGE_SIZE: u64 = 4096;
const IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << kvm_bindings::kvm_ioeventfd_flag_nr_datamatch;
const IOEVENTFD_FLAG_PIO: u32 = 1 << kvm_bindings::kvm_ioeventfd_flag_nr_pio;
const IOEVENTFD_FLAG_DEASSIGN: u32 = 1 << kvm_bindings::kvm_ioeventfd_flag_nr_deassign;

/// What close() releases.
struct VmState {
    fd: Option<VmFd>,
    resources: VmResources,
}

/// What the VM's methods change beside the fd.
#[derive(Default)]
struct VmResources {
    routes: RoutingTable,
    vcpu_counters: Vec<Arc<Mutex<Counters>>>,
    /// Weak: close() kicks the vCPUs that still exist out of KVM_RUN.
    vcpu_kicks: Vec<Weak<KickState>>,
}

/// A virtual machine. close() (or dropping it) deletes its memory slots from KVM, stops
/// its vCPUs, closes the VM fd and releases its RAM unless a GuestMemory, an exported
/// buffer or a completion in progress still holds a slot's mapping (as plain memory:
/// KVM no longer reaches it).
#[pyclass(frozen, module = "kvmfast")]
pub struct Vm {
    irqchip: String,
    ioapic_routes: u32,
    run_size: usize,
    max_slots: usize,
    map: Arc<AddressMap<Handler>>,
    /// Shared with the vCPUs, which read guest memory when they complete an instruction.
    ram: Arc<SharedRam>,
    /// Set by close(); the vCPUs' run loops read it before every KVM_RUN.
    closed: Arc<AtomicBool>,
    symbols: SharedSymbols,
    quirks: HostQuirks,
    /// The emulation_fallback setting new vCPUs start with.
    emulation_fallback: AtomicBool,
    state: Mutex<VmState>,
}

impl Vm {
    pub fn new(
        fd: VmFd,
        irqchip: &str,
        ioapic_routes: u32,
        max_slots: usize,
        quirks: HostQuirks,
    ) -> Self {
        Self {
            irqchip: irqchip.to_string(),
            ioapic_routes,
            run_size: fd.run_size(),
            max_slots,
            map: Arc::new(AddressMap::default()),
            ram: Arc::default(),
            closed: Arc::new(AtomicBool::new(false)),
            symbols: SharedSymbols::default(),
            quirks,
            emulation_fallback: AtomicBool::new(true),
            state: Mutex::new(VmState {
                fd: Some(fd),
                resources: VmResources::default(),
            }),
        }
    }

    /// The RAM now: a virtio device reads its queues through it, keeping its mappings
    /// alive while it does.
    pub fn ram_snapshot(&self) -> Arc<GuestRam> {
        self.ram.snapshot()
    }

    fn state(&self) -> MutexGuard<'_, VmState> {
        locks::lock(&self.state)
    }

    /// Runs `call` with the open VM fd, or raises ValueError once the VM is closed.
    fn with_fd<T>(&self, call: impl FnOnce(&VmFd, &mut VmResources) -> PyResult<T>) -> PyResult<T> {
        let mut state = self.state();
        let VmState { fd, resources } = &mut *state;
        let fd = fd
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the VM is closed"))?;
        call(fd, resources)
    }

    /// Takes the VM out of KVM's hands; idempotent, needs no GIL and waits for no lock
    /// a vCPU thread holds while it waits for the GIL.
    ///
    /// Order: `closed` first and then the kicks (kick.rs), so that every vCPU leaves
    /// KVM_RUN and its run loop sees `closed` before it could enter again; then each
    /// slot is deleted (size 0, KVM API document 4.35), after which neither the VM fd
    /// nor any vCPU fd reaches the memory; only then may the mappings go.
    fn shut_down(&self) {
        let (fd, kicks) = {
            let mut state = self.state();
            self.closed.store(true, Ordering::SeqCst);
            let mut resources = std::mem::take(&mut state.resources);
            // Counters outlive close(): the vCPUs may still report.
            state.resources.vcpu_counters = std::mem::take(&mut resources.vcpu_counters);
            (state.fd.take(), resources.vcpu_kicks)
        };
        for kick in kicks.iter().filter_map(Weak::upgrade) {
            kick.post(REQUEST_KICK);
        }
        let Some(fd) = fd else {
            return;
        };
        for region in self.ram.snapshot().regions() {
            let delete = kvm_userspace_memory_region {
                slot: region.slot,
                flags: 0,
                guest_phys_addr: region.guest_phys_addr,
                memory_size: 0,
                userspace_addr: region.mapping.as_ptr() as u64,
            };
            // SAFETY: deleting a slot only makes KVM forget the memory.
            if unsafe { fd.set_user_memory_region(delete) }.is_err() {
                // KVM may still reach this memory: it must never be unmapped.
                std::mem::forget(region.mapping.clone());
            }
        }
        drop(fd);
        drop(self.ram.replace(GuestRam::default()));
    }

    /// Empties the address map; the handlers are returned so that they are dropped
    /// outside its locks.
    fn take_handlers(&self) -> [Vec<crate::address_map::Range<Handler>>; 2] {
        [self.take_ranges(true), self.take_ranges(false)]
    }

    fn add_range(
        space: &std::sync::RwLock<RangeMap<Handler>>,
        base: u64,
        length: u64,
        handler: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let handler = Handler::from_object(handler)?;
        let mut space = locks::write(space);
        space
            .insert(base, length, handler)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn remove_range(space: &std::sync::RwLock<RangeMap<Handler>>, base: u64) -> PyResult<()> {
        let removed = locks::write(space).remove(base);
        // The handler (perhaps a Python object) is dropped after the lock is released.
        removed
            .map(drop)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Empties one address space; the handlers are returned so that they are dropped
    /// outside the lock.
    fn take_ranges(&self, pio: bool) -> Vec<crate::address_map::Range<Handler>> {
        let space = if pio { &self.map.pio } else { &self.map.mmio };
        locks::write(space).take_all()
    }

    fn check_free(&self, guest_phys_addr: u64, size: u64) -> PyResult<()> {
        if self.ram.snapshot().overlaps(guest_phys_addr, size) {
            return Err(overlap_error(guest_phys_addr, size));
        }
        Ok(())
    }

    fn commit_routes(fd: &VmFd, routes: &RoutingTable) -> PyResult<()> {
        let table = routes
            .to_kvm()
            .map_err(|e| PyValueError::new_err(format!("GSI routing table: {e}")))?;
        fd.set_gsi_routing(&table)
            .map_err(|e| kvm_error("KVM_SET_GSI_ROUTING", e))
    }

    fn ioeventfd_request(
        fd: i32,
        address: u64,
        length: u32,
        pio: bool,
        datamatch: Option<u64>,
    ) -> kvm_ioeventfd {
        let mut flags = 0;
        if pio {
            flags |= IOEVENTFD_FLAG_PIO;
        }
        if datamatch.is_some() {
            flags |= IOEVENTFD_FLAG_DATAMATCH;
        }
        kvm_ioeventfd {
            datamatch: datamatch.unwrap_or(0),
            addr: address,
            len: length,
            fd,
            flags,
            ..Default::default()
        }
    }
}

fn overlap_error(guest_phys_addr: u64, size: u64) -> PyErr {
    PyValueError::new_err(format!(
        "guest memory {guest_phys_addr:#x}+{size:#x} overlaps an existing slot"
    ))
}

fn split_msi_address(address: u64) -> (u32, u32) {
    (address as u32, (address >> 32) as u32)
}

#[pymethods]
impl Vm {
    /// The VM fd (ValueError once closed).
    #[getter]
    fn fd(&self) -> PyResult<i32> {
        use std::os::fd::AsRawFd;
        self.with_fd(|fd, _| Ok(fd.as_raw_fd()))
    }

    #[getter]
    fn irqchip(&self) -> &str {
        &self.irqchip
    }

    #[getter]
    fn ioapic_routes(&self) -> u32 {
        self.ioapic_routes
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// KVM_CHECK_EXTENSION on the VM fd.
    fn check_extension(&self, cap: u32) -> PyResult<i32> {
        self.with_fd(|fd, _| Ok(fd.check_extension_raw(libc::c_ulong::from(cap))))
    }

    /// Raw KVM_ENABLE_CAP with up to four arguments.
    #[pyo3(signature = (cap, args = Vec::new()))]
    fn enable_cap(&self, cap: u32, args: Vec<u64>) -> PyResult<()> {
        let mut request = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        if args.len() > request.args.len() {
            return Err(PyValueError::new_err(
                "KVM_ENABLE_CAP takes at most 4 arguments",
            ));
        }
        request.args[..args.len()].copy_from_slice(&args);
        self.with_fd(|fd, _| {
            fd.enable_cap(&request)
                .map_err(|e| kvm_error(&format!("KVM_ENABLE_CAP({cap})"), e))
        })
    }

    /// KVM_SET_TSS_ADDR: three pages Intel VMX needs for real-mode guests.
    fn set_tss_address(&self, address: usize) -> PyResult<()> {
        self.with_fd(|fd, _| {
            fd.set_tss_address(address)
                .map_err(|e| kvm_error("KVM_SET_TSS_ADDR", e))
        })
    }

    /// KVM_SET_IDENTITY_MAP_ADDR: one page Intel VMX needs for real-mode guests.
    fn set_identity_map_address(&self, address: u64) -> PyResult<()> {
        self.with_fd(|fd, _| {
            fd.set_identity_map_address(address)
                .map_err(|e| kvm_error("KVM_SET_IDENTITY_MAP_ADDR", e))
        })
    }

    /// KVM_GET_CLOCK: kvmclock's base as {"clock": ns, "flags": KVM_CLOCK_* bits}.
    fn get_clock(&self) -> PyResult<BTreeMap<&'static str, u64>> {
        let data =
            self.with_fd(|fd, _| fd.get_clock().map_err(|e| kvm_error("KVM_GET_CLOCK", e)))?;
        Ok(BTreeMap::from([
            ("clock", data.clock),
            ("flags", u64::from(data.flags)),
        ]))
    }

    /// KVM_SET_CLOCK: kvmclock continues from `clock` ns (flags 0: no realtime fix-up).
    fn set_clock(&self, clock: u64) -> PyResult<()> {
        let data = kvm_clock_data {
            clock,
            ..Default::default()
        };
        self.with_fd(|fd, _| {
            fd.set_clock(&data)
                .map_err(|e| kvm_error("KVM_SET_CLOCK", e))
        })
    }

    /// Maps `size` bytes at `guest_phys_addr` in a new slot: fresh anonymous memory, or
    /// [backing_offset, +size) of the memory file `backing`, mapped copy-on-write (the
    /// file never changes) or, with `copy`, read into anonymous memory now.
    #[pyo3(signature = (
        guest_phys_addr, size, *, hugepages = false, backing = None, backing_offset = 0,
        copy = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn add_memory(
        &self,
        py: Python<'_>,
        guest_phys_addr: u64,
        size: u64,
        hugepages: bool,
        backing: Option<PathBuf>,
        backing_offset: u64,
        copy: bool,
    ) -> PyResult<GuestMemory> {
        if size == 0 || size % PAGE_SIZE != 0 || guest_phys_addr % PAGE_SIZE != 0 {
            return Err(PyValueError::new_err(format!(
                "guest memory must be whole 4 KiB pages: {guest_phys_addr:#x}+{size:#x}"
            )));
        }
        if guest_phys_addr.checked_add(size).is_none() {
            return Err(PyOverflowError::new_err("guest memory ends beyond 2^64"));
        }
        if backing.is_none() && (copy || backing_offset != 0) {
            return Err(PyValueError::new_err(
                "backing_offset and copy need a backing file",
            ));
        }
        let length =
            usize::try_from(size).map_err(|_| PyOverflowError::new_err("size too large"))?;
        // Checked before a file is read, and again when the slot is added.
        self.check_free(guest_phys_addr, size)?;
        let mapping = match backing {
            // Without the GIL: a copy reads the whole file.
            Some(path) => {
                py.detach(|| Mapping::from_backing(&path, backing_offset, length, hugepages, copy))?
            }
            None => Mapping::anonymous(length, hugepages)
                .map_err(|e| errno_error("mmap", e.raw_os_error().unwrap_or(libc::ENOMEM)))?,
        };
        let mapping = Arc::new(mapping);
        self.with_fd(|fd, _| {
            // A copy, installed whole once KVM has the slot: the vCPUs never see a slot
            // KVM does not know, nor wait for this to finish.
            let mut ram = GuestRam::clone(&self.ram.snapshot());
            if ram.overlaps(guest_phys_addr, size) {
                return Err(overlap_error(guest_phys_addr, size));
            }
            let used: Vec<u32> = ram.slots_in_use().collect();
            let slot = (0u32..)
                .take(self.max_slots)
                .find(|slot| !used.contains(slot))
                .ok_or_else(|| PyValueError::new_err("no free memory slot"))?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr,
                memory_size: size,
                userspace_addr: mapping.as_ptr() as u64,
            };
            // SAFETY: the mapping is ours, `size` bytes long, and stays mapped while KVM
            // can reach it: the VM's RamRegion holds it until shut_down() has deleted the
            // slot from KVM (or leaks it if KVM refuses); the vCPU fds, which outlive the
            // VM fd, reach guest memory only through the slots.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(|e| kvm_error("KVM_SET_USER_MEMORY_REGION", e))?;
            ram.insert(RamRegion {
                guest_phys_addr,
                slot,
                mapping: mapping.clone(),
            });
            self.ram.replace(ram);
            Ok(GuestMemory::new(mapping, guest_phys_addr, slot))
        })
    }

    /// Copies `length` bytes of guest RAM (across slots); ValueError outside RAM.
    fn read(
        &self,
        guest_phys_addr: u64,
        length: usize,
    ) -> PyResult<std::borrow::Cow<'static, [u8]>> {
        Ok(self.ram.snapshot().read(guest_phys_addr, length)?.into())
    }

    fn write(&self, guest_phys_addr: u64, data: &[u8]) -> PyResult<()> {
        self.ram.snapshot().write(guest_phys_addr, data)
    }

    /// Gives ports [base, base+length) to `handler` (a device, NullSink or ExitSink).
    fn add_pio(&self, base: u64, length: u64, handler: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::add_range(&self.map.pio, base, length, handler)
    }

    fn add_mmio(&self, base: u64, length: u64, handler: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::add_range(&self.map.mmio, base, length, handler)
    }

    fn remove_pio(&self, base: u64) -> PyResult<()> {
        Self::remove_range(&self.map.pio, base)
    }

    fn remove_mmio(&self, base: u64) -> PyResult<()> {
        Self::remove_range(&self.map.mmio, base)
    }

    /// Routes `gsi` to an MSI message and commits the whole table.
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> PyResult<()> {
        self.with_fd(|fd, resources| {
            let previous = resources.routes.set(gsi, MsiRoute { address, data });
            Self::commit_routes(fd, &resources.routes)
                .inspect_err(|_| resources.routes.restore(gsi, previous))
        })
    }

    fn remove_route(&self, gsi: u32) -> PyResult<()> {
        self.with_fd(|fd, resources| {
            let previous = resources
                .routes
                .remove(gsi)
                .ok_or_else(|| PyValueError::new_err(format!("GSI {gsi} has no route")))?;
            Self::commit_routes(fd, &resources.routes)
                .inspect_err(|_| resources.routes.restore(gsi, Some(previous)))
        })
    }

    /// KVM_IRQ_LINE_STATUS: drives a GSI and returns KVM's delivery status.
    fn irq_line(&self, gsi: u32, level: bool) -> PyResult<i32> {
        self.with_fd(|fd, _| {
            ioctls::irq_line_status(fd, gsi, level).map_err(|e| kvm_error("KVM_IRQ_LINE_STATUS", e))
        })
    }

    /// KVM_SIGNAL_MSI: >0 delivered, 0 blocked by the guest.
    fn signal_msi(&self, address: u64, data: u32) -> PyResult<i32> {
        let (address_lo, address_hi) = split_msi_address(address);
        let msi = kvm_msi {
            address_lo,
            address_hi,
            data,
            ..Default::default()
        };
        self.with_fd(|fd, _| {
            fd.signal_msi(msi)
                .map_err(|e| kvm_error("KVM_SIGNAL_MSI", e))
        })
    }

    /// KVM_IRQFD: writes to eventfd `fd` raise `gsi` (with a resample fd: level-triggered).
    #[pyo3(signature = (fd, gsi, resample_fd = None))]
    fn register_irqfd(&self, fd: u32, gsi: u32, resample_fd: Option<u32>) -> PyResult<()> {
        let request = kvm_irqfd {
            fd,
            gsi,
            flags: if resample_fd.is_some() {
                KVM_IRQFD_FLAG_RESAMPLE
            } else {
                0
            },
            resamplefd: resample_fd.unwrap_or(0),
            ..Default::default()
        };
        self.with_fd(|vm, _| ioctls::irqfd(vm, &request).map_err(|e| kvm_error("KVM_IRQFD", e)))
    }

    fn unregister_irqfd(&self, fd: u32, gsi: u32) -> PyResult<()> {
        let request = kvm_irqfd {
            fd,
            gsi,
            flags: KVM_IRQFD_FLAG_DEASSIGN,
            ..Default::default()
        };
        self.with_fd(|vm, _| ioctls::irqfd(vm, &request).map_err(|e| kvm_error("KVM_IRQFD", e)))
    }

    /// KVM_IOEVENTFD: guest writes to `address` signal eventfd `fd` without an exit.
    /// The kernel judges length and flags (length 0 matches any width).
    #[pyo3(signature = (fd, addr, length, *, pio = false, datamatch = None))]
    fn register_ioeventfd(
        &self,
        fd: i32,
        addr: u64,
        length: u32,
        pio: bool,
        datamatch: Option<u64>,
    ) -> PyResult<()> {
        let request = Self::ioeventfd_request(fd, addr, length, pio, datamatch);
        self.with_fd(|vm, _| {
            ioctls::ioeventfd(vm, &request).map_err(|e| kvm_error("KVM_IOEVENTFD", e))
        })
    }

    #[pyo3(signature = (fd, addr, length, *, pio = false, datamatch = None))]
    fn unregister_ioeventfd(
        &self,
        fd: i32,
        addr: u64,
        length: u32,
        pio: bool,
        datamatch: Option<u64>,
    ) -> PyResult<()> {
        let mut request = Self::ioeventfd_request(fd, addr, length, pio, datamatch);
        request.flags |= IOEVENTFD_FLAG_DEASSIGN;
        self.with_fd(|vm, _| {
            ioctls::ioeventfd(vm, &request).map_err(|e| kvm_error("KVM_IOEVENTFD", e))
        })
    }

    /// A new vCPU; it keeps this VM (and so its RAM) alive while it exists.
    fn create_vcpu(slf: &Bound<'_, Self>, vcpu_id: u64) -> PyResult<Vcpu> {
        let this = slf.get();
        this.with_fd(|fd, resources| {
            let vcpu = fd
                .create_vcpu(vcpu_id)
                .map_err(|e| kvm_error("KVM_CREATE_VCPU", e))?;
            let page = RunPage::map(&vcpu, this.run_size).map_err(|e| {
                errno_error("mmap kvm_run", e.raw_os_error().unwrap_or(libc::EINVAL))
            })?;
            let sync = kvm_bindings::KVM_SYNC_X86_VALID_FIELDS;
            let supported =
                fd.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_SYNC_REGS));
            let sync_regs = supported >= 0 && (supported as u32) & sync == sync;
            let counters = Arc::new(Mutex::new(Counters::default()));
            resources.vcpu_counters.push(counters.clone());
            let shared = VcpuShared {
                map: this.map.clone(),
                counters,
                ram: this.ram.clone(),
                vm_closed: this.closed.clone(),
                symbols: this.symbols.clone(),
                quirks: this.quirks,
                emulation_fallback: this.emulation_fallback.load(Ordering::Relaxed),
                sync_regs,
            };
            let vcpu = Vcpu::new(vcpu_id, vcpu, page, slf.clone().into_any().unbind(), shared);
            resources.vcpu_kicks.retain(|kick| kick.strong_count() > 0);
            resources.vcpu_kicks.push(vcpu.kick_state());
            Ok(vcpu)
        })
    }

    /// The emulation_fallback that vCPUs created from now on start with (default True).
    /// Each vCPU has its own switch too (Vcpu.emulation_fallback).
    #[getter]
    fn get_emulation_fallback(&self) -> bool {
        self.emulation_fallback.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_emulation_fallback(&self, enabled: bool) {
        self.emulation_fallback.store(enabled, Ordering::Relaxed);
    }

    /// Loads a System.map or /proc/kallsyms file: emulation failure reports then name
    /// the function at RIP. Returns the number of symbols.
    fn load_symbols(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<usize> {
        let table = py
            .detach(|| SymbolTable::load(&path))
            .map_err(crate::errors::io_error)?;
        let count = table.len();
        *locks::write(&self.symbols) = Some(Arc::new(table));
        Ok(count)
    }

    /// The symbol containing `address` ("name+0xoff/0xsize"), or None.
    fn describe_address(&self, address: u64) -> Option<String> {
        locks::read(&self.symbols)
            .as_ref()
            .and_then(|table| table.describe(address))
    }

    /// What the host-quirk probes found when this VM was created.
    fn host_quirks(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.quirks.to_map()
    }

    /// The counters of all vCPUs this VM created, summed.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut total = Counters::default();
        for counters in &self.state().resources.vcpu_counters {
            total.add(&locks::lock(counters));
        }
        total.to_dict(py)
    }

    /// The profiler's samples of all vCPUs (VcpuKicker.request_sample): {rip: count}.
    fn rip_samples<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut total = Counters::default();
        for counters in &self.state().resources.vcpu_counters {
            total.add(&locks::lock(counters));
        }
        total.samples_dict(py)
    }

    /// Deletes the memory slots from KVM, stops the vCPUs (a run() in progress, or any
    /// later one, raises ValueError), closes the VM fd and lets go of RAM and handlers.
    /// Idempotent. The vCPUs keep their own fds (and their state ioctls) until dropped.
    fn close(&self, py: Python<'_>) {
        // Without the GIL: deleting a slot waits for the vCPUs inside KVM_RUN to leave
        // KVM's read-side sections (an SRCU grace period), which other Python threads
        // (devices, vCPUs in device calls) need not wait for.
        py.detach(|| self.shut_down());
        // With the GIL: the handlers are mostly Python objects.
        drop(self.take_handlers());
    }

    /// The garbage collector sees the Python devices in the address map, so that a
    /// device referring back to its VM (or to a vCPU) does not keep both alive forever.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for space in [&self.map.pio, &self.map.mmio] {
            // Never block in a traversal: a map being changed is simply not reported.
            if let Ok(space) = space.try_read() {
                for range in space.iter() {
                    if let Handler::Python(device) = &range.handler {
                        device.traverse(&visit)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        self.shut_down();
        drop(self.take_handlers());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc_value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        format!("Vm(irqchip={:?}, closed={})", self.irqchip, self.closed())
    }
}

impl Drop for Vm {
    /// A VM dropped without close(): its vCPU fds may live on (a VcpuKicker keeps one's
    /// run page mapped), so the slots are deleted before the RAM goes here too.
    fn drop(&mut self) {
        self.shut_down();
    }
}
