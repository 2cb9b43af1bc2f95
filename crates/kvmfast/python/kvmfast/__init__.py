"""kvmfast: the Rust core of a split-irqchip KVM virtual machine monitor.

VM and vCPU handles, the vCPU run loop (in Rust, GIL released around KVM_RUN), the
guest address map, the ExtINT injector, the ioeventfd event loop and counters, and
virtio-blk / virtio-rng / virtio-net devices whose queues that loop serves in Rust.
:mod:`kvmfast.assembler` builds small guests from assembly and :mod:`kvmfast.flat_guest`
enters them; :mod:`kvmfast.testing` has the helpers the KVM-backed tests of every
package share.
"""

from kvmfast._native import (
    EXIT_REASON_NAMES,
    BadInterruptPointer,
    EmulationFailure,
    EntryFailure,
    EventFd,
    EventLoop,
    Exit,
    ExitSink,
    FdHandler,
    GuestMemory,
    GuestStop,
    InterruptAlreadyQueued,
    InvalidInterrupt,
    IrqfdTrigger,
    Kvm,
    KvmError,
    NullSink,
    PicInKernel,
    TripleFault,
    Vcpu,
    VcpuKicker,
    VirtioDevice,
    VirtioError,
    VirtioQueueHandler,
    Vm,
)

__all__ = [
    "EXIT_REASON_NAMES",
    "BadInterruptPointer",
    "EmulationFailure",
    "EntryFailure",
    "EventFd",
    "EventLoop",
    "Exit",
    "ExitSink",
    "FdHandler",
    "GuestMemory",
    "GuestStop",
    "InterruptAlreadyQueued",
    "InvalidInterrupt",
    "IrqfdTrigger",
    "Kvm",
    "KvmError",
    "NullSink",
    "PicInKernel",
    "TripleFault",
    "Vcpu",
    "VcpuKicker",
    "VirtioDevice",
    "VirtioError",
    "VirtioQueueHandler",
    "Vm",
]
