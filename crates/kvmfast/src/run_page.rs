//! The vCPU's shared `kvm_run` page, mapped by kvmfast itself.
//!
//! The run loop reads exit data from it and the kicker writes `immediate_exit` into it
//! from other threads, so it is reached only through raw pointers (never a `&kvm_run`
//! that another thread or the kernel could change underneath).

use std::os::fd::AsRawFd;
use std::ptr::{NonNull, addr_of, addr_of_mut};
use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events};

use crate::volatile_copy;

/// An I/O exit as KVM describes it.
#[derive(Debug, Clone, Copy)]
pub struct IoExit {
    pub is_write: bool,
    pub size: usize,
    pub port: u16,
    pub count: usize,
    pub data_offset: usize,
}

/// An MMIO exit.
#[derive(Debug, Clone, Copy)]
pub struct MmioExit {
    pub phys_addr: u64,
    pub data: [u8; 8],
    pub len: usize,
    pub is_write: bool,
}

#[derive(Debug)]
pub struct RunPage {
    run: NonNull<kvm_run>,
    size: usize,
}

// SAFETY: the page is shared with the kernel by design; the fields other threads touch
// (immediate_exit) are accessed atomically, and the rest only by the thread inside
// Vcpu.run(), which the vCPU guards against concurrent runs.
unsafe impl Send for RunPage {}
// SAFETY: as above.
unsafe impl Sync for RunPage {}

impl RunPage {
    /// Maps the first `size` bytes (KVM_GET_VCPU_MMAP_SIZE) of a vCPU fd.
    pub fn map(vcpu: &impl AsRawFd, size: usize) -> std::io::Result<Self> {
        if size < std::mem::size_of::<kvm_run>() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new shared mapping of the vCPU fd at an address of the kernel's
        // choosing; it aliases no Rust memory.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let run = NonNull::new(address.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { run, size })
    }

    fn raw(&self) -> *mut kvm_run {
        self.run.as_ptr()
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the field is a u8 inside the live mapping; AtomicU8 has the same layout
        // and the kernel only reads it at KVM_RUN entry.
        unsafe { AtomicU8::from_ptr(addr_of_mut!((*self.raw()).immediate_exit)) }
    }

    pub fn set_immediate_exit(&self, value: bool) {
        self.immediate_exit()
            .store(u8::from(value), Ordering::SeqCst);
    }

    pub fn exit_reason(&self) -> u32 {
        // SAFETY: reading a u32 field of the live mapping.
        unsafe { addr_of!((*self.raw()).exit_reason).read_volatile() }
    }

    pub fn ready_for_interrupt_injection(&self) -> bool {
        // SAFETY: reading a u8 field of the live mapping.
        unsafe { addr_of!((*self.raw()).ready_for_interrupt_injection).read_volatile() != 0 }
    }

    pub fn if_flag(&self) -> bool {
        // SAFETY: reading a u8 field of the live mapping.
        unsafe { addr_of!((*self.raw()).if_flag).read_volatile() != 0 }
    }

    pub fn request_interrupt_window(&self) -> bool {
        // SAFETY: reading a u8 field of the live mapping.
        unsafe { addr_of!((*self.raw()).request_interrupt_window).read_volatile() != 0 }
    }

    pub fn set_request_interrupt_window(&self, value: bool) {
        // SAFETY: writing a u8 field of the live mapping; the kernel reads it at entry.
        unsafe {
            addr_of_mut!((*self.raw()).request_interrupt_window).write_volatile(u8::from(value))
        }
    }

    pub fn io(&self) -> IoExit {
        // SAFETY: the union member for KVM_EXIT_IO, read by value from the live mapping.
        let io = unsafe { addr_of!((*self.raw()).__bindgen_anon_1.io).read_volatile() };
        IoExit {
            is_write: u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_OUT,
            size: usize::from(io.size),
            port: io.port,
            count: io.count as usize,
            data_offset: io.data_offset as usize,
        }
    }

    /// Where element `index` of an I/O exit lies, or None if KVM's offsets leave the page.
    fn io_element(&self, io: &IoExit, index: usize) -> Option<*mut u8> {
        let start = io.data_offset.checked_add(index.checked_mul(io.size)?)?;
        if io.size == 0 || io.size > 8 || start.checked_add(io.size)? > self.size {
            return None;
        }
        // SAFETY: start + size was checked to lie inside the mapping.
        Some(unsafe { self.raw().cast::<u8>().add(start) })
    }

    /// The value a guest OUT wrote (element `index` of a string OUT), little-endian.
    pub fn io_value(&self, io: &IoExit, index: usize) -> u64 {
        let mut bytes = [0u8; 8];
        if let Some(element) = self.io_element(io, index) {
            // SAFETY: io_element checked the range inside the live mapping; the page is
            // the kernel's too, so it is read as shared memory.
            unsafe { volatile_copy::read(element, &mut bytes[..io.size]) };
        }
        u64::from_le_bytes(bytes)
    }

    /// Stores the value a guest IN reads (element `index` of a string IN).
    pub fn set_io_value(&self, io: &IoExit, index: usize, value: u64) {
        if let Some(element) = self.io_element(io, index) {
            // SAFETY: as in io_value, in the other direction.
            unsafe { volatile_copy::write(element, &value.to_le_bytes()[..io.size]) };
        }
    }

    pub fn mmio(&self) -> MmioExit {
        // SAFETY: the union member for KVM_EXIT_MMIO, read by value.
        let mmio = unsafe { addr_of!((*self.raw()).__bindgen_anon_1.mmio).read_volatile() };
        MmioExit {
            phys_addr: mmio.phys_addr,
            data: mmio.data,
            len: (mmio.len as usize).min(8),
            is_write: mmio.is_write != 0,
        }
    }

    /// Stores the result of an MMIO read for KVM to complete the load with.
    pub fn set_mmio_data(&self, data: [u8; 8]) {
        // SAFETY: writing the data array of the MMIO union member in the live mapping.
        unsafe { addr_of_mut!((*self.raw()).__bindgen_anon_1.mmio.data).write_volatile(data) }
    }

    /// (suberror, data[..ndata]) of KVM_EXIT_INTERNAL_ERROR.
    pub fn internal_error(&self) -> (u32, Vec<u64>) {
        // SAFETY: the union member for KVM_EXIT_INTERNAL_ERROR, read by value.
        let internal = unsafe { addr_of!((*self.raw()).__bindgen_anon_1.internal).read_volatile() };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..ndata].to_vec())
    }

    /// (hardware_entry_failure_reason, cpu) of KVM_EXIT_FAIL_ENTRY.
    pub fn fail_entry(&self) -> (u64, u32) {
        // SAFETY: the union member for KVM_EXIT_FAIL_ENTRY, read by value.
        let fail = unsafe { addr_of!((*self.raw()).__bindgen_anon_1.fail_entry).read_volatile() };
        (fail.hardware_entry_failure_reason, fail.cpu)
    }

    /// (type, data[..ndata]) of KVM_EXIT_SYSTEM_EVENT.
    pub fn system_event(&self) -> (u32, Vec<u64>) {
        // SAFETY: the union member for KVM_EXIT_SYSTEM_EVENT, read by value; its data
        // array is valid for ndata entries (KVM_CAP_SYSTEM_EVENT_DATA) and zero otherwise.
        let event =
            unsafe { addr_of!((*self.raw()).__bindgen_anon_1.system_event).read_volatile() };
        // SAFETY: both members of the inner union are plain integers.
        let data = unsafe { event.__bindgen_anon_1.data };
        let ndata = (event.ndata as usize).min(data.len());
        (event.type_, data[..ndata].to_vec())
    }

    /// KVM_CAP_SYNC_REGS: the register sets KVM copies into the page at every exit.
    pub fn set_valid_regs(&self, mask: u64) {
        // SAFETY: writing a u64 field of the live mapping; KVM reads it at exit.
        unsafe { addr_of_mut!((*self.raw()).kvm_valid_regs).write_volatile(mask) }
    }

    pub fn valid_regs(&self) -> u64 {
        // SAFETY: reading a u64 field of the live mapping.
        unsafe { addr_of!((*self.raw()).kvm_valid_regs).read_volatile() }
    }

    /// The register sets written into the page that KVM loads at the next entry.
    pub fn dirty_regs(&self) -> u64 {
        // SAFETY: reading a u64 field of the live mapping.
        unsafe { addr_of!((*self.raw()).kvm_dirty_regs).read_volatile() }
    }

    pub fn set_dirty_regs(&self, mask: u64) {
        // SAFETY: writing a u64 field of the live mapping; KVM reads it at entry.
        unsafe { addr_of_mut!((*self.raw()).kvm_dirty_regs).write_volatile(mask) }
    }

    pub fn sync_regs(&self) -> kvm_regs {
        // SAFETY: the synced register block of the live mapping, read by value; KVM
        // wrote it at the exit (kvm_valid_regs) and does not touch it outside KVM_RUN.
        unsafe { addr_of!((*self.raw()).s.regs.regs).read_volatile() }
    }

    pub fn sync_sregs(&self) -> kvm_sregs {
        // SAFETY: as in sync_regs.
        unsafe { addr_of!((*self.raw()).s.regs.sregs).read_volatile() }
    }

    pub fn sync_events(&self) -> kvm_vcpu_events {
        // SAFETY: as in sync_regs.
        unsafe { addr_of!((*self.raw()).s.regs.events).read_volatile() }
    }

    /// Stores registers for KVM to load at the next entry.
    pub fn put_sync_regs(&self, regs: &kvm_regs) {
        // SAFETY: writing the synced block of the live mapping, outside KVM_RUN.
        unsafe { addr_of_mut!((*self.raw()).s.regs.regs).write_volatile(*regs) }
        self.set_dirty_regs(self.dirty_regs() | u64::from(kvm_bindings::KVM_SYNC_X86_REGS));
    }

    pub fn put_sync_sregs(&self, sregs: &kvm_sregs) {
        // SAFETY: as in put_sync_regs.
        unsafe { addr_of_mut!((*self.raw()).s.regs.sregs).write_volatile(*sregs) }
        self.set_dirty_regs(self.dirty_regs() | u64::from(kvm_bindings::KVM_SYNC_X86_SREGS));
    }

    pub fn put_sync_events(&self, events: &kvm_vcpu_events) {
        // SAFETY: as in put_sync_regs.
        unsafe { addr_of_mut!((*self.raw()).s.regs.events).write_volatile(*events) }
        self.set_dirty_regs(self.dirty_regs() | u64::from(kvm_bindings::KVM_SYNC_X86_EVENTS));
    }

    pub fn eoi_vector(&self) -> u8 {
        // SAFETY: the union member for KVM_EXIT_IOAPIC_EOI, read by value.
        unsafe { addr_of!((*self.raw()).__bindgen_anon_1.eoi.vector).read_volatile() }
    }
}

#[cfg(test)]
impl RunPage {
    /// A page not backed by a vCPU, for unit tests of what reads and writes exit data;
    /// the tests put in the exits KVM would have.
    pub fn anonymous() -> Self {
        let size = 4096;
        // SAFETY: a new private anonymous mapping; it aliases no Rust memory.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED, "an anonymous page");
        let run = NonNull::new(address.cast()).expect("mmap gives a non-null address");
        Self { run, size }
    }

    /// KVM_EXIT_IO as KVM fills it in.
    pub fn put_io(&self, io: &IoExit) {
        let direction = if io.is_write {
            kvm_bindings::KVM_EXIT_IO_OUT
        } else {
            kvm_bindings::KVM_EXIT_IO_IN
        };
        let raw = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_4 {
            direction: direction as u8,
            size: io.size as u8,
            port: io.port,
            count: io.count as u32,
            data_offset: io.data_offset as u64,
        };
        // SAFETY: writing the KVM_EXIT_IO union member of the live mapping.
        unsafe { addr_of_mut!((*self.raw()).__bindgen_anon_1.io).write_volatile(raw) }
    }

    /// KVM_EXIT_MMIO as KVM fills it in.
    pub fn put_mmio(&self, mmio: &MmioExit) {
        let raw = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_6 {
            phys_addr: mmio.phys_addr,
            data: mmio.data,
            len: mmio.len as u32,
            is_write: u8::from(mmio.is_write),
        };
        // SAFETY: writing the KVM_EXIT_MMIO union member of the live mapping.
        unsafe { addr_of_mut!((*self.raw()).__bindgen_anon_1.mmio).write_volatile(raw) }
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in RunPage::map, which nothing uses
        // any more (its owners are gone).
        unsafe { libc::munmap(self.raw().cast(), self.size) };
    }
}
