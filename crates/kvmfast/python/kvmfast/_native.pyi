"""Type stubs of the Rust extension kvmfast._native."""

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Protocol, TypedDict, final

EXIT_REASON_NAMES: list[str]

# ---- exceptions ---------------------------------------------------------------------

class KvmError(OSError):
    """An ioctl failed; the message names it and .errno is set."""

class InterruptAlreadyQueued(KvmError):
    """KVM_INTERRUPT: EEXIST, an interrupt is already enqueued."""

class InvalidInterrupt(KvmError):
    """KVM_INTERRUPT: EINVAL, the irq number is invalid."""

class PicInKernel(KvmError):
    """KVM_INTERRUPT: ENXIO, the PIC is in the kernel."""

class BadInterruptPointer(KvmError):
    """KVM_INTERRUPT: EFAULT, the pointer is invalid."""

class GuestStop(Exception):
    """The guest stopped in a way the VMM cannot continue from."""

    regs: Regs
    sregs: Sregs

class EmulationFailure(GuestStop):
    """KVM_EXIT_INTERNAL_ERROR that nothing completed (or the fallback was off)."""

    suberror: int
    data: list[int]
    insn_bytes: bytes
    """The bytes KVM reported (up to 15 from RIP, not one instruction)."""
    rip: int
    instruction: str | None
    """Intel syntax of the decoded instruction, when it decoded."""
    instruction_bytes: bytes
    cpl: int | None
    reason: str | None
    symbol: str | None
    """``name+0xoff/0xsize`` from Vm.load_symbols, when a table names RIP."""

class EntryFailure(GuestStop):
    """KVM_EXIT_FAIL_ENTRY."""

    hardware_entry_failure_reason: int
    cpu: int

class TripleFault(GuestStop):
    """KVM_EXIT_SHUTDOWN."""

# ---- state dicts --------------------------------------------------------------------

Regs = dict[str, int]
"""rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15, rip, rflags."""

class Segment(TypedDict, total=False):
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int
    unusable: int

class DescriptorTable(TypedDict, total=False):
    base: int
    limit: int

class Sregs(TypedDict, total=False):
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: list[int]

class Fpu(TypedDict, total=False):
    fpr: list[bytes]
    xmm: list[bytes]
    fcw: int
    fsw: int
    ftwx: int
    last_opcode: int
    last_ip: int
    last_dp: int
    mxcsr: int

class ExceptionEvent(TypedDict, total=False):
    injected: int
    nr: int
    has_error_code: int
    pending: int
    error_code: int

class InterruptEvent(TypedDict, total=False):
    injected: int
    nr: int
    soft: int
    shadow: int

class NmiEvent(TypedDict, total=False):
    injected: int
    pending: int
    masked: int

class SmiEvent(TypedDict, total=False):
    smm: int
    pending: int
    smm_inside_nmi: int
    latched_init: int

class TripleFaultEvent(TypedDict, total=False):
    pending: int

class VcpuEvents(TypedDict, total=False):
    exception: ExceptionEvent
    interrupt: InterruptEvent
    nmi: NmiEvent
    smi: SmiEvent
    triple_fault: TripleFaultEvent
    sipi_vector: int
    flags: int
    exception_has_payload: int
    exception_payload: int

class Counters(TypedDict):
    exits: dict[str, int]
    pio: dict[int, int]
    mmio: dict[int, int]
    unmapped_pio: int
    unmapped_mmio: int
    lint1_nmi: int
    completions: dict[str, int]
    """Instructions KVM could not emulate that kvmfast completed, by lower-case mnemonic."""
    emulation_exceptions: dict[str, int]
    """Exceptions those instructions raised in the guest ("#GP", "#PF", ...)."""
    quirk_repairs: dict[str, int]

CpuidEntry = tuple[int, int, int, int, int, int, int]
"""(function, index, flags, eax, ebx, ecx, edx)."""

class DebugRegs(TypedDict, total=False):
    """KVM_GET/SET_DEBUGREGS (api.rst 4.32/4.33)."""

    db: list[int]
    """DR0..DR3."""
    dr6: int
    dr7: int
    flags: int

class ClockData(TypedDict):
    """KVM_GET_CLOCK (api.rst 4.48)."""

    clock: int
    """kvmclock's current value, ns."""
    flags: int
    """KVM_CLOCK_* bits (TSC_STABLE, REALTIME, HOST_TSC)."""

# ---- handlers -----------------------------------------------------------------------

class Device(Protocol):
    """What a Python range handler provides (kvm_devices.interfaces.Device)."""

    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...

class ExtintController(Protocol):
    """The PIC as the ExtINT injector sees it: acknowledge() is the INTA cycle."""

    def acknowledge(self) -> int: ...

@final
class NullSink:
    """Reads all-ones, drops writes, in Rust."""

    def __init__(self) -> None: ...

@final
class ExitSink:
    """A write ends run() with Exit("device_exit", value)."""

    def __init__(self) -> None: ...

Handler = Device | NullSink | ExitSink

# ---- core objects -------------------------------------------------------------------

@final
class Exit:
    reason: str
    value: int
    data: list[int]
    def __init__(self, reason: str, value: int = 0, data: list[int] = ...) -> None: ...

@final
class GuestMemory:
    """One memory slot: a writable, zero-copy buffer (memoryview(mem))."""

    @property
    def guest_phys_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def slot(self) -> int: ...
    def __len__(self) -> int: ...
    def save_to(self, fd: int, file_offset: int) -> int:
        """pwrite every 4 KiB page of the slot that is not all zeros to ``fd`` at
        ``file_offset`` + the page's offset; zero pages are skipped (holes of a file the
        caller has ftruncated to its full size). Returns the bytes written. Runs without
        the GIL; the caller keeps the vCPUs paused. OSError when a write fails."""
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

@final
class VcpuKicker:
    """Interrupts one vCPU from any thread."""

    def kick(self) -> None: ...
    def stop(self) -> None: ...
    def pause(self) -> None: ...
    def set_extint(self, level: bool) -> None: ...
    @property
    def extint(self) -> bool: ...
    def request_nmi(self) -> None: ...
    def request_lint1(self) -> None: ...
    def request_sample(self) -> None: ...

@final
class Vcpu:
    @property
    def id(self) -> int: ...
    @property
    def vm(self) -> Vm: ...
    def get_regs(self) -> Regs: ...
    def set_regs(self, changes: Regs) -> None: ...
    def get_sregs(self) -> Sregs: ...
    def set_sregs(self, changes: Sregs) -> None: ...
    def get_fpu(self) -> Fpu: ...
    def set_fpu(self, changes: Fpu) -> None: ...
    def get_xsave(self) -> bytes: ...
    def set_xsave(self, area: bytes) -> None: ...
    def get_xcrs(self) -> dict[int, int]: ...
    def set_xcrs(self, values: dict[int, int]) -> None: ...
    def get_lapic(self) -> bytes: ...
    def set_lapic(self, page: bytes) -> None: ...
    def get_msrs(self, indices: list[int]) -> dict[int, int]: ...
    def save_msrs(self, indices: list[int]) -> dict[int, int]:
        """Every MSR of ``indices`` KVM_GET_MSRS reads; one it refuses is left out (the
        others are still read). KvmError only when the ioctl itself fails."""
    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS in the dict's order; KvmError naming the first MSR KVM refused
        (those before it are set)."""
    def set_cpuid(self, entries: list[CpuidEntry]) -> None: ...
    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the table set_cpuid gave (empty before any)."""
    def get_debugregs(self) -> DebugRegs:
        """KVM_GET_DEBUGREGS: every key present."""
    def set_debugregs(self, changes: DebugRegs) -> None:
        """KVM_SET_DEBUGREGS with the given keys changed; the others keep their values."""
    def tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ."""
    def kvmclock_ctrl(self) -> bool:
        """KVM_KVMCLOCK_CTRL: True when done, False when KVM answers EINVAL (the guest has
        not enabled kvmclock)."""
    def get_vcpu_events(self) -> VcpuEvents: ...
    def set_vcpu_events(self, changes: VcpuEvents) -> None: ...
    def get_mp_state(self) -> int: ...
    def set_mp_state(self, mp_state: int) -> None: ...
    def interrupt(self, vector: int) -> None: ...
    def interrupt_with_invalid_pointer(self) -> None: ...
    def nmi(self) -> None: ...
    def set_eoi_handler(self, handler: Callable[[int], object] | None) -> None: ...
    def set_extint_controller(self, controller: ExtintController | None) -> None: ...
    def set_trace(self, trace: Callable[[str, int, int, bool, int], object] | None) -> None: ...
    def kicker(self) -> VcpuKicker: ...
    def run(self) -> Exit: ...
    def run_once(self) -> Exit: ...
    @property
    def ready_for_interrupt_injection(self) -> bool: ...
    @property
    def if_flag(self) -> bool: ...
    @property
    def request_interrupt_window(self) -> bool: ...
    @request_interrupt_window.setter
    def request_interrupt_window(self, requested: bool) -> None: ...
    @property
    def emulation_fallback(self) -> bool: ...
    @emulation_fallback.setter
    def emulation_fallback(self, enabled: bool) -> None: ...
    def counters(self) -> Counters: ...

@final
class Vm:
    @property
    def fd(self) -> int: ...
    @property
    def irqchip(self) -> str: ...
    @property
    def ioapic_routes(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def check_extension(self, cap: int) -> int: ...
    def enable_cap(self, cap: int, args: list[int] = ...) -> None: ...
    def set_tss_address(self, address: int) -> None: ...
    def set_identity_map_address(self, address: int) -> None: ...
    def add_memory(
        self,
        guest_phys_addr: int,
        size: int,
        *,
        hugepages: bool = False,
        backing: str | PathLike[str] | None = None,
        backing_offset: int = 0,
        copy: bool = False,
    ) -> GuestMemory:
        """A new slot of ``size`` bytes at ``guest_phys_addr``: fresh zeroed memory, or
        [backing_offset, +size) of the memory file ``backing``. ``copy=False`` maps the
        file MAP_PRIVATE (opened read-only: pages load on demand, guest writes are
        copied on write, the file never changes); ``copy=True`` reads it now into
        anonymous memory (holes skipped). A file shorter than backing_offset + size or
        an offset not page aligned is a ValueError, a missing or unreadable file an
        OSError; both name the file, and nothing is mapped."""
    def read(self, guest_phys_addr: int, length: int) -> bytes: ...
    def write(self, guest_phys_addr: int, data: bytes) -> None: ...
    def get_clock(self) -> ClockData:
        """KVM_GET_CLOCK."""
    def set_clock(self, clock: int) -> None:
        """KVM_SET_CLOCK: kvmclock continues from ``clock`` ns (flags 0)."""
    def add_pio(self, base: int, length: int, handler: Handler) -> None: ...
    def add_mmio(self, base: int, length: int, handler: Handler) -> None: ...
    def remove_pio(self, base: int) -> None: ...
    def remove_mmio(self, base: int) -> None: ...
    def set_msi_route(self, gsi: int, address: int, data: int) -> None: ...
    def remove_route(self, gsi: int) -> None: ...
    def irq_line(self, gsi: int, level: bool) -> int: ...
    def signal_msi(self, address: int, data: int) -> int: ...
    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None: ...
    def unregister_irqfd(self, fd: int, gsi: int) -> None: ...
    def register_ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool = False, datamatch: int | None = None
    ) -> None: ...
    def unregister_ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool = False, datamatch: int | None = None
    ) -> None: ...
    def create_vcpu(self, vcpu_id: int) -> Vcpu: ...
    @property
    def emulation_fallback(self) -> bool: ...
    @emulation_fallback.setter
    def emulation_fallback(self, enabled: bool) -> None: ...
    def load_symbols(self, path: str | PathLike[str]) -> int: ...
    def describe_address(self, address: int) -> str | None: ...
    def host_quirks(self) -> dict[str, int]: ...
    def counters(self) -> Counters: ...
    def rip_samples(self) -> dict[int, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Vm: ...
    def __exit__(self, *exc_info: object) -> None: ...

@final
class Kvm:
    def __init__(self, *, path: str = "/dev/kvm") -> None: ...
    @property
    def api_version(self) -> int: ...
    def check_extension(self, cap: int) -> int: ...
    @property
    def vcpu_mmap_size(self) -> int: ...
    def supported_cpuid(self) -> list[CpuidEntry]: ...
    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (api.rst 4.3), in KVM's order."""
    def create_vm(self, irqchip: str = "split", ioapic_routes: int = 24) -> Vm: ...
    def host_quirks(self) -> dict[str, int]: ...

# ---- eventfds and the event loop ----------------------------------------------------

@final
class EventFd:
    def __init__(self, nonblocking: bool = True) -> None: ...
    @property
    def fd(self) -> int: ...
    def fileno(self) -> int: ...
    @property
    def nonblocking(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def write(self, n: int = 1) -> None: ...
    def read(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> EventFd: ...
    def __exit__(self, *exc_info: object) -> None: ...

@final
class IrqfdTrigger:
    """An event-loop handler that writes 1 to an irqfd's eventfd, without Python."""

    def __init__(self, irq_eventfd: EventFd) -> None: ...

@final
class EventLoop:
    def __init__(self, coalesce_us: int = 50) -> None: ...
    @property
    def coalesce_us(self) -> int: ...
    def add(
        self,
        eventfd: EventFd,
        handler: Callable[[int], object] | IrqfdTrigger | VirtioQueueHandler,
    ) -> None: ...
    def remove(self, eventfd: EventFd) -> None: ...
    def add_readable(self, handler: FdHandler) -> None:
        """Watches a non-blocking fd for input (one-shot); its native handler runs on the
        loop thread and either has it watched again or parks it until the handler's
        owner re-arms it."""
    def remove_readable(self, handler: FdHandler) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def counters(self) -> dict[int, int]: ...
    def __enter__(self) -> EventLoop: ...
    def __exit__(self, *exc_info: object) -> None: ...

class FdHandler:
    """A readable fd with a native handler (a virtio-net device's TAP), for
    EventLoop.add_readable."""

    @property
    def fd(self) -> int: ...

# ---- virtio devices served in Rust --------------------------------------------------

class VirtioError(ValueError):
    """A bad, missing, empty or locked image, a TAP that cannot be attached, a bad MAC
    address, or a queue setup the device refuses."""

class QueueState(TypedDict):
    """One virtqueue's ring state (virtio-queue's QueueState)."""

    ready: bool
    """False for a queue never activated (every other field then 0 / False / None)."""
    size: int
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    event_idx: bool
    signalled_used: int | None
    """next_used at the device's last interrupt decision; None when unknown (the next
    completion then interrupts)."""

@final
class VirtioQueueHandler:
    """An event-loop handler that serves one queue of a VirtioDevice on the loop thread."""

    @property
    def queue(self) -> int: ...

@final
class VirtioDevice:
    @staticmethod
    def block(
        path: str | PathLike[str],
        *,
        readonly: bool = False,
        direct: bool = False,
        serial: str | None = None,
    ) -> VirtioDevice: ...
    @staticmethod
    def rng() -> VirtioDevice: ...
    @staticmethod
    def net(tap: str | None = None, mac: str | None = None) -> VirtioDevice:
        """virtio-net on the TAP ``tap`` (attached, or created if there is none), or on
        a new TAP the kernel names (see ``tap_name``); ``mac`` the guest's address,
        random under 52:54:00 when None. VirtioError names the TAP (no permission, no
        /dev/net/tun) or the bad MAC."""
    @staticmethod
    def vsock(cid: int, uds_path: str | PathLike[str]) -> VirtioDevice:
        """virtio-vsock for guest CID ``cid`` (3 to 2**32-1) with Firecracker's host
        side: a Unix socket listening at ``uds_path`` (made 0600, removed by close());
        a client writes ``CONNECT <port>\\n`` to reach the guest's port and reads
        ``OK <host port>\\n``; a guest connecting to CID 2 port P reaches the socket
        ``<uds_path>_P``. Streams are not kept in a snapshot: after
        restore_queue_states() the device sends the driver TRANSPORT_RESET. VirtioError
        for a bad CID or a path in use."""
    @property
    def guest_cid(self) -> int | None:
        """A virtio-vsock device's guest CID; None for other devices."""
    @property
    def uds_path(self) -> Path | None:
        """A virtio-vsock device's listening socket; None for other devices."""
    @property
    def tap_name(self) -> str | None:
        """A virtio-net device's TAP; None for other devices."""
    @property
    def mac(self) -> str | None:
        """A virtio-net device's MAC address (lower-case hex pairs); None for others."""
    def readable_handler(self) -> FdHandler | None:
        """What the event loop watches besides the doorbells (a virtio-net device's
        TAP, a virtio-vsock device's host sockets); None for devices with nothing to
        read."""
    @property
    def device_type(self) -> int: ...
    @property
    def num_queues(self) -> int: ...
    @property
    def max_queue_size(self) -> int: ...
    @property
    def device_features(self) -> int: ...
    @property
    def config_size(self) -> int: ...
    @property
    def needs_reset(self) -> bool: ...
    def read_config(self, offset: int, size: int) -> int: ...
    def write_config(self, offset: int, size: int, value: int) -> None: ...
    def queue_notifier(self, queue: int) -> EventFd: ...
    def queue_interrupt(self, queue: int) -> EventFd: ...
    def config_interrupt(self) -> EventFd: ...
    def queue_handler(self, queue: int) -> VirtioQueueHandler: ...
    def activate(
        self, vm: Vm, driver_features: int, queues: list[tuple[int, int, int, int, bool]]
    ) -> None: ...
    def reset(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def queue_states(self) -> list[QueueState]:
        """One per queue; meaningful while the device is paused or not served."""
    def restore_queue_states(self, states: list[QueueState]) -> None:
        """After activate() and before the device serves anything (pause() it before
        activate(), resume() after this): each ready queue continues from the given
        next_avail / next_used / event_idx / signalled_used. VirtioError, nothing
        changed, for a list of the wrong length, a missing or extra key, a wrong type,
        a size or ring address other than activate()'s, an index not u16, or a queue
        already served."""
