//! KVM ioctls that kvm-ioctls does not wrap in the form kvmfast needs.
//!
//! KVM_RUN is issued raw so that the run loop can work from a shared `&VcpuFd` (its
//! wrapper wants `&mut`); the others take plain fds or return what the wrapper drops
//! (the status of KVM_IRQ_LINE_STATUS).

use std::os::fd::AsRawFd;

use kvm_bindings::{KVMIO, kvm_interrupt, kvm_ioeventfd, kvm_irq_level, kvm_irqfd};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
ioctl_iowr_nr!(KVM_IRQ_LINE_STATUS, KVMIO, 0x67, kvm_irq_level);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

fn check(ret: libc::c_int) -> Result<libc::c_int, errno::Error> {
    if ret < 0 {
        Err(errno::Error::last())
    } else {
        Ok(ret)
    }
}

/// One KVM_RUN; Err(EINTR) when a kick or `immediate_exit` ended it before any exit.
pub fn run(vcpu: &impl AsRawFd) -> Result<(), errno::Error> {
    // SAFETY: KVM_RUN takes no argument; the fd is a vCPU fd owned by the caller.
    check(unsafe { ioctl(vcpu, KVM_RUN()) }).map(drop)
}

/// KVM_INTERRUPT: queue an external interrupt vector (userspace PIC / ExtINT).
pub fn interrupt(vcpu: &impl AsRawFd, vector: u32) -> Result<(), errno::Error> {
    let request = kvm_interrupt { irq: vector };
    // SAFETY: the kernel reads one kvm_interrupt from a valid reference.
    check(unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &request) }).map(drop)
}

/// KVM_INTERRUPT with a pointer the kernel cannot read: only for the EFAULT check.
pub fn interrupt_with_bad_pointer(vcpu: &impl AsRawFd) -> Result<(), errno::Error> {
    // SAFETY: the kernel validates the user pointer and answers EFAULT; nothing is
    // read or written in this process.
    check(unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_INTERRUPT(), 8usize as *const u8) }).map(drop)
}

/// KVM_IRQ_LINE_STATUS: set a GSI's level and return the delivery status.
pub fn irq_line_status(vm: &impl AsRawFd, gsi: u32, level: bool) -> Result<i32, errno::Error> {
    let mut irq_level = kvm_irq_level::default();
    irq_level.__bindgen_anon_1.irq = gsi;
    irq_level.level = u32::from(level);
    // SAFETY: the kernel reads and writes back one kvm_irq_level we own.
    check(unsafe { ioctl_with_mut_ref(vm, KVM_IRQ_LINE_STATUS(), &mut irq_level) })?;
    // SAFETY: on return the kernel has stored the status in the union.
    Ok(unsafe { irq_level.__bindgen_anon_1.status })
}

/// KVM_IRQFD with a raw request (assign, deassign, resample).
pub fn irqfd(vm: &impl AsRawFd, request: &kvm_irqfd) -> Result<(), errno::Error> {
    // SAFETY: the kernel reads one kvm_irqfd from a valid reference.
    check(unsafe { ioctl_with_ref(vm, KVM_IRQFD(), request) }).map(drop)
}

/// KVM_IOEVENTFD with a raw request, so that the kernel judges every length and flag.
pub fn ioeventfd(vm: &impl AsRawFd, request: &kvm_ioeventfd) -> Result<(), errno::Error> {
    // SAFETY: the kernel reads one kvm_ioeventfd from a valid reference.
    check(unsafe { ioctl_with_ref(vm, KVM_IOEVENTFD(), request) }).map(drop)
}
