//! kvmfast: the Rust core of a split-irqchip VMM, exposed to Python as `kvmfast._native`.
//!
//! One module per concern: `kvm` (/dev/kvm), `vm` (memory, routing, irqfd/ioeventfd),
//! `vcpu` (the Python handle: state ioctls, hooks), `run_loop` (what a vCPU owns and its
//! KVM_RUN loop) + `dispatch` + `exits` (what follows an exit, how a run ends), `regs`
//! (register structures as dicts), `address_map` (who owns a port or MMIO range),
//! `kick` (leaving KVM_RUN from other threads), `extint` (PIC interrupts through
//! KVM_INTERRUPT), `ioevent_loop` (the eventfd thread), `emulate` (instructions KVM
//! cannot complete), `symbols`, `memory`, `volatile_copy` (bytes to and from guest RAM
//! and the run page), `virtio` (blk, rng and net queues served on the event loop thread),
//! `fd_watch` (readable fds the loop serves natively), `counters`, `errors`. Dependencies
//! run one way, from `kvm` down (`module_graph`, a unit test, fails on a cycle).

use pyo3::prelude::*;

pub mod address_map;
pub mod counters;
pub mod dispatch;
pub mod emulate;
pub mod errors;
pub mod eventfd;
pub mod exits;
pub mod extint;
pub mod fd_watch;
pub mod handlers;
pub mod ioctls;
pub mod ioevent_loop;
pub mod kick;
pub mod kvm;
pub mod lapic;
pub mod locks;
pub mod memory;
pub mod memory_file;
#[cfg(test)]
mod module_graph;
pub mod regs;
pub mod routing;
pub mod run_loop;
pub mod run_page;
pub mod symbols;
pub mod timerfd;
pub mod vcpu;
pub mod vcpu_snapshot;
pub mod virtio;
pub mod vm;
pub mod volatile_copy;

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(module)?;
    module.add_class::<kvm::Kvm>()?;
    module.add_class::<vm::Vm>()?;
    module.add_class::<vcpu::Vcpu>()?;
    module.add_class::<kick::VcpuKicker>()?;
    module.add_class::<exits::Exit>()?;
    module.add_class::<memory::GuestMemory>()?;
    module.add_class::<handlers::NullSink>()?;
    module.add_class::<handlers::ExitSink>()?;
    module.add_class::<eventfd::EventFd>()?;
    module.add_class::<ioevent_loop::EventLoop>()?;
    module.add_class::<ioevent_loop::IrqfdTrigger>()?;
    module.add_class::<fd_watch::FdHandler>()?;
    virtio::python::register(module)?;
    module.add("EXIT_REASON_NAMES", counters::EXIT_NAMES.to_vec())?;
    Ok(())
}
