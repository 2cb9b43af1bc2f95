"""The machine: guest RAM, vCPUs and the platform, put together over kvmfast.

It is the only module that knows both KVM (through kvmfast) and the device
models. Guests are loaded by :mod:`kvm_vmm.loaders` (or written raw by tests),
entered with :mod:`kvm_vmm.cpu_setup`, and run with one thread per vCPU until
the first event that ends the run: power-off, reset, a debug-exit write, a
triple fault, an instruction nobody can complete, an exception of a device the
user added (kvm_vmm.added_devices), or a stop from the host.

Lifecycle: ``created --start()--> running --pause()--> paused --resume()-->
running``; ``stop()`` (or the guest) ends the run: ``finished``; ``close()``:
``closed``. A call in another state raises :class:`MachineStateError`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from collections.abc import Mapping as ReadOnlyMapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import kvmfast
from kvm_devices.debug_exit import DebugExit
from kvm_devices.interfaces import ByteSink, Device, Snapshottable
from kvm_devices.pc_testdev import PcTestdev
from kvm_devices.pci.host_bridge import PciFunction
from kvm_devices.pci_testdev import PciTestdev
from kvm_devices.snapshot import StateError
from kvm_vmm import board, cpu_setup, layout
from kvm_vmm.acpi_placement import place_acpi_tables
from kvm_vmm.added_devices import (
    AddedDevice,
    AutoIrq,
    DeviceAccessError,
    GuardedDevice,
    check_decodable,
)
from kvm_vmm.bios_state import bios_memory, start_timer
from kvm_vmm.boot import BootDescription, BootReport, describe_boot, load_boot
from kvm_vmm.clock import TimerThread
from kvm_vmm.console import DiscardSink
from kvm_vmm.cpuid import cpuid_for_vcpu
from kvm_vmm.device_options import DeviceSpecError, add_device_option
from kvm_vmm.disk_options import parse_disk_spec
from kvm_vmm.interrupts import PciIntxWires
from kvm_vmm.lapic import LINT0_EXTINT, LINT1_NMI, with_lvt
from kvm_vmm.layout import Region
from kvm_vmm.loaders import default_cache_dir
from kvm_vmm.loaders.image import EntryState, LoadedImage, check_fits
from kvm_vmm.machine_state import (
    NotSnapshottable,
    restore_machine_state,
    save_machine_state,
    snapshottable,
)
from kvm_vmm.milestones import POWER_OFF, MilestoneSink
from kvm_vmm.pci_function import BarDevice, MappedFunction, attach_function
from kvm_vmm.pci_virtio import GsiAllocator, PciSlots, VirtioPciDevice
from kvm_vmm.platform import Mapping, Platform, PlatformEvents, build_platform
from kvm_vmm.platform_table import AddressSpace, Window
from kvm_vmm.resources import ResourceError
from kvm_vmm.serial_console import SerialConsole
from kvm_vmm.snapshot.disks import disk_identity, rebuild_records
from kvm_vmm.snapshot.errors import SnapshotError
from kvm_vmm.snapshot.host_facts import host_facts, host_problem, missing_features
from kvm_vmm.snapshot.memory_file import MEMORY_FILE, RamBacking, slots_for, write_memory_file
from kvm_vmm.snapshot.shape import ShapeError, check_u64
from kvm_vmm.snapshot.state_file import (
    SYMBOLS_FILE,
    SnapshotFile,
    read_snapshot,
    snapshot_directory,
    write_state,
)
from kvm_vmm.snapshot.vcpu_state import check_vcpu, restore_vcpu, save_vcpu
from kvm_vmm.statistics import run_statistics
from kvm_vmm.virtio_state import virtio_snapshottables

if TYPE_CHECKING:
    from kvmfast._native import Counters

MIN_MEMORY = 2 * layout.MIB


def kvm_vmm_version() -> str:
    return version("kvm-vmm")


KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2


def run_until_exit(vcpu: kvmfast.Vcpu) -> kvmfast.Exit:
    """``vcpu.run()``, entered again when KVM_RUN fails with EAGAIN.

    An AP waits for its SIPI inside KVM_RUN (mp_state UNINITIALIZED, with
    the LAPIC in the kernel); once INIT/SIPI have been accepted KVM returns
    EAGAIN without running the guest, and the VMM is to call KVM_RUN again
    (kvm_arch_vcpu_ioctl_run; QEMU's kvm_cpu_exec does the same).
    """
    while True:
        try:
            return vcpu.run()
        except kvmfast.KvmError as error:
            if error.errno != errno.EAGAIN:
                raise


# How long the main thread waits at a time for the run to end. Python runs a signal's
# handler in the main thread, and only once that thread runs bytecode again: a
# process's signal the kernel gave to another thread (a vCPU's, say) would otherwise
# wait for the run's end, or for ever (kvm_vmm.signals).
SIGNAL_POLL_SECONDS = 0.2


def _next_slice(deadline: float | None) -> float:
    if deadline is None:
        return SIGNAL_POLL_SECONDS
    return max(0.0, min(SIGNAL_POLL_SECONDS, deadline - time.monotonic()))


class MachineConfigError(ValueError):
    """A machine that cannot be built as asked (memory too small, no vCPU...)."""


class MachineStateError(RuntimeError):
    """A lifecycle call the machine's state does not allow (pause() before start()...)."""


class MachineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    CLOSED = "closed"


# Exit statuses a harness can tell apart: a power-off is 0 and an isa-debug-exit
# write of v is (v << 1) | 1, always odd, so a crash gets an even status of its own
# (1 would read as "debug-exit 0", which kvm-unit-tests counts as a pass).
STATUS_POWERED_OFF = 0
STATUS_GUEST_CRASHED = 4  # triple fault, instruction nobody completes, device failure
STATUS_TIMED_OUT = 124  # timeout(1)'s status
STATUS_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
STOPPED = "stopped"
INTERRUPTED = "interrupted"
POWERED_OFF = "guest powered off"


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``status`` is the process exit status the CLI returns."""

    status: int
    reason: str
    error: BaseException | None = None
    # Ended from outside (a timeout, Ctrl-C, a signal), not by the guest or a fault:
    # the guest's position is then worth reporting.
    stopped_from_outside: bool = False


@dataclass
class MachineConfig:
    memory_size: int = 256 * layout.MIB
    cpus: int = 1
    console: ByteSink = field(default_factory=DiscardSink)
    # Complete in kvmfast what the host's KVM cannot emulate (False: stop, as QEMU does).
    emulation_fallback: bool = True


def _finisher(machine: Machine, outcome: Outcome) -> Callable[[], None]:
    """``machine.finish(outcome)`` for the platform's devices, holding the machine only
    weakly: the machine holds the devices, and through a cycle the machine's vCPU and
    /dev/kvm fds and the kernel's VM (its threads) would stay until a garbage collection,
    not go when the last reference to the machine does."""
    reference = weakref.ref(machine)

    def finish() -> None:
        alive = reference()
        if alive is not None:
            alive.finish(outcome)

    return finish


def _intr_line(machine: Machine) -> Callable[[bool], None]:
    """The PIC's INTR output to the BSP's ExtINT input, holding the machine weakly (as
    _finisher does): a kicker keeps the vCPU's run page mapped, and with it the kernel's
    VM and its threads."""
    reference = weakref.ref(machine)

    def set_level(level: bool) -> None:
        alive = reference()
        if alive is not None:
            alive.kickers[0].set_extint(level)

    return set_level


class Machine:
    """A split-irqchip PC: in-kernel LAPICs, our IOAPIC, PIC pair, PIT and the rest."""

    def __init__(
        self,
        config: MachineConfig,
        kvm: kvmfast.Kvm | None = None,
        *,
        ram: RamBacking | None = None,
    ) -> None:
        """``ram``: guest RAM from a snapshot's memory file (what restore() passes);
        None: zeroed memory."""
        if config.memory_size < MIN_MEMORY:
            raise MachineConfigError(
                f"memory {config.memory_size} bytes is too small: at least {MIN_MEMORY >> 20} MiB"
            )
        if not 1 <= config.cpus <= board.MAX_CPUS:
            raise MachineConfigError(f"--cpus {config.cpus}: between 1 and {board.MAX_CPUS}")
        self.config = config
        self.kvm = kvm if kvm is not None else kvmfast.Kvm()
        self.vm = self.kvm.create_vm("split", board.IOAPIC_PINS)
        self.vm.emulation_fallback = config.emulation_fallback  # vCPUs inherit it
        self.ram = [
            self._add_ram(region.start, region.size, ram)
            for region in layout.ram_regions(config.memory_size)
        ]
        self.timers = TimerThread()
        self.vcpus = [self.vm.create_vcpu(index) for index in range(config.cpus)]
        self.kickers = [vcpu.kicker() for vcpu in self.vcpus]
        self._outcome: Outcome | None = None
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []
        # Guards the state, the outcome and the vCPU threads' parking.
        self._cond = threading.Condition()
        self._state = MachineState.CREATED
        self._parked: set[int] = set()  # vCPU threads out of run() after a pause
        self._ended: set[int] = set()  # vCPU threads that have returned
        self._resumes = 0  # bumped by resume(): a parked thread runs again
        self._symbols_loaded = False
        # The System.map text that names the guest's functions (a snapshot keeps it).
        self._symbol_map: str | None = None
        # How to rebuild each device a snapshot restores before its state (in order),
        # None for one that cannot be rebuilt from a state file; what was booted.
        self._rebuild: dict[str, dict[str, object] | None] = {}
        self._booted: dict[str, object] | None = None
        self._started_at: float | None = None  # time.monotonic() at start()
        self._finished_at: float | None = None
        # COM1's output passes through it on its way to config.console.
        self.serial = SerialConsole(MilestoneSink(config.console))
        self._event_loop: kvmfast.EventLoop | None = None
        self.acpi_tables: list[Region] = []
        self.platform: Platform = build_platform(
            self.vm,
            self.timers,
            self.serial,
            PlatformEvents(
                power_off=_finisher(self, Outcome(STATUS_POWERED_OFF, POWERED_OFF)),
                reset=_finisher(self, Outcome(0, "guest requested a reset")),
                extint=_intr_line(self),
            ),
            ram_size=config.memory_size,
            cpus=config.cpus,
        )
        self.serial.connect(self.platform.uart.receive)
        self._devices: dict[str, object] = self.platform.models()
        self._added: dict[str, object] = {}  # add_device()'s and --device's, in order
        self.devices: ReadOnlyMapping[str, object] = MappingProxyType(self._devices)
        for mapping in self.platform.mappings:
            self.map_device(mapping)
        # Bus 0's functions: INTx wires pulled high before the guest can program a pin,
        # MSI-X vectors on GSIs above the IOAPIC's routes.
        self.pci = PciSlots(
            self.platform.pci_bus,
            self.platform.table,
            PciIntxWires(self.platform.ioapic),
            GsiAllocator(first=self.vm.ioapic_routes),
        )
        supported = self.kvm.supported_cpuid()
        for index, vcpu in enumerate(self.vcpus):
            vcpu.set_cpuid(cpuid_for_vcpu(supported, index, config.cpus))
            vcpu.set_eoi_handler(self.platform.ioapic.eoi)
            # Firmware leaves LINT0 as ExtINT on the BSP (the PIC's path) and
            # LINT1 as NMI everywhere; a reset LAPIC has both masked.
            lint0 = LINT0_EXTINT if index == 0 else None
            vcpu.set_lapic(with_lvt(vcpu.get_lapic(), lint0=lint0, lint1=LINT1_NMI))
        self.vcpus[0].set_extint_controller(self.platform.pic)

    # -- building -----------------------------------------------------------------

    def _add_ram(self, start: int, size: int, backing: RamBacking | None) -> kvmfast.GuestMemory:
        if backing is None:
            return self.vm.add_memory(start, size)
        slot = backing.slot_for(start, size)
        return self.vm.add_memory(
            start,
            size,
            backing=backing.path,
            backing_offset=slot.file_offset,
            copy=backing.copy,
        )

    def map_device(self, mapping: Mapping) -> None:
        if mapping.space == "pio":
            self.vm.add_pio(mapping.base, mapping.length, mapping.device)
        else:
            self.vm.add_mmio(mapping.base, mapping.length, mapping.device)

    def add_device(
        self,
        device: Device,
        *,
        name: str,
        pio: tuple[int, int] | None = None,
        mmio: tuple[int, int] | None = None,
        irq: int | AutoIrq | None = None,
    ) -> AddedDevice:
        """Put ``device`` (anything with read(offset, size) and write(offset, size,
        value)) at ``pio=(port, length)`` or ``mmio=(address, length)`` under ``name``,
        before start(). ``irq``: an ISA IRQ (0-15) of its own, "auto" for the lowest free
        one, or None. A name, range or IRQ already taken is refused
        (:class:`~kvm_vmm.resources.ResourceConflict`) and nothing is added.

        The device is then ``machine.devices[name]``, named in stats(), and saved by
        save_state() if it has the Snapshottable methods. An exception it raises ends
        the run: the outcome (status 4, STATUS_GUEST_CRASHED) names the device, the address and
        the access.
        """
        space: AddressSpace
        if pio is not None and mmio is None:
            space, (base, length) = "pio", pio
        elif mmio is not None and pio is None:
            space, (base, length) = "mmio", mmio
        else:
            raise MachineConfigError(f"device {name!r}: give exactly one of pio= and mmio=")
        window = Window(space, base, length, name)
        with self._cond:
            self._require("add_device()", MachineState.CREATED)
        if irq == "auto":
            irq = self.platform.table.irqs.free_isa(name)
        elif irq is not None and not 0 <= irq < board.ISA_IRQS:
            raise ResourceError(f"{name}: IRQ {irq} is not an ISA IRQ (0-{board.ISA_IRQS - 1})")
        self._attach(device, name, [(window, device)], () if irq is None else (irq,))
        line = None if irq is None else self.platform.isa_line(irq)
        return AddedDevice(name, device, window, irq, line)

    def add_device_windows(
        self, model: object, name: str, windows: Sequence[tuple[Window, Device]]
    ) -> str:
        """A device of several windows (one model per window, ``model`` the whole), under
        ``name`` or the first free ``name#n``; its name is returned."""
        with self._cond:
            self._require("add_device_windows()", MachineState.CREATED)
        name = self.platform.table.unused_name(name)
        self._attach(model, name, windows, ())
        return name

    def add_pio_device(self, base: int, length: int, device: Device, name: str) -> None:
        self.add_device_windows(device, name, [(Window("pio", base, length, name), device)])

    def add_mmio_device(self, base: int, length: int, device: Device, name: str) -> None:
        self.add_device_windows(device, name, [(Window("mmio", base, length, name), device)])

    def _attach(
        self,
        model: object,
        name: str,
        windows: Sequence[tuple[Window, Device]],
        irqs: tuple[int, ...],
    ) -> None:
        """Register the windows in the platform table (which refuses a taken name, range
        or line), then map each window, guarded (kvm_vmm.added_devices)."""
        for window, _ in windows:
            check_decodable(window, layout.ram_regions(self.config.memory_size))
        self.platform.table.add(name, tuple(window for window, _ in windows), irqs)
        for window, device in windows:
            guarded = GuardedDevice(name, window, device)
            self.map_device(Mapping(window.space, window.base, window.length, guarded, name))
        self._devices[name] = model
        self._added[name] = model
        self._rebuild[name] = None  # a device object of the user's: not in a state file

    def add_device_option(self, spec: str) -> DebugExit | PcTestdev | PciTestdev:
        """An optional device in QEMU's --device spelling (see kvm_vmm.device_options)."""
        name, device = add_device_option(self, spec)
        self._rebuild[name] = {"kind": "device-option", "spec": spec}
        return device

    def add_pci_function(
        self, function: PciFunction, name: str, bars: Sequence[BarDevice]
    ) -> MappedFunction:
        """A plain PCI function on bus 0, before start(): the first free slot, each BAR
        in the PCI memory or I/O window with decode on, as firmware leaves it
        (kvm_vmm.pci_function). It is then ``machine.devices[name]`` (or ``name#2``...)."""
        with self._cond:
            self._require("add_pci_function()", MachineState.CREATED)
        mapped = attach_function(
            self, self.platform.pci_bus, self.platform.table, function, name, bars
        )
        self._devices[mapped.name] = function
        self._added[mapped.name] = function
        self._rebuild[mapped.name] = None  # a function object of the caller's
        return mapped

    def add_virtio_device(self, device: kvmfast.VirtioDevice, name: str) -> VirtioPciDevice:
        """Put a kvmfast virtio device on PCI bus 0 (virtio-pci, modern), before start():
        the first free slot, BAR0 from the PCI memory window, MSI-X with one vector per
        queue and one for the configuration, INTx on the slot's INTA# wire. It is then
        ``machine.devices[name]`` (its transport; ``name#2``... for a second one)."""
        with self._cond:
            self._require("add_virtio_device()", MachineState.CREATED)
        attached = self.pci.attach(self, device, name)
        self._devices[attached.name] = attached.transport
        self._rebuild[attached.name] = None  # a kvmfast device of the user's
        return attached

    def add_disk(
        self,
        path: Path | str,
        *,
        readonly: bool = False,
        serial: str | None = None,
        direct: bool = False,
    ) -> VirtioPciDevice:
        """A raw image as a virtio-blk disk (/dev/vda, then vdb... in the guest).

        The image is locked (shared when read-only, exclusive otherwise): a second VMM on
        the same writable image is refused. A missing, unreadable, empty or locked image
        raises :class:`kvmfast.VirtioError` naming it.
        """
        device = kvmfast.VirtioDevice.block(
            str(path), readonly=readonly, direct=direct, serial=serial
        )
        attached = self.add_virtio_device(device, "virtio-blk")
        self._rebuild[attached.name] = {
            "kind": "virtio-blk",
            "path": str(Path(path).absolute()),
            "readonly": readonly,
            "serial": serial,
            "direct": direct,
        }
        return attached

    def add_disk_option(self, spec: str) -> VirtioPciDevice:
        """A disk in ``--disk``'s spelling (see kvm_vmm.disk_options)."""
        disk = parse_disk_spec(spec)
        return self.add_disk(
            disk.path, readonly=disk.readonly, serial=disk.serial, direct=disk.direct
        )

    def add_rng(self) -> VirtioPciDevice:
        """A virtio-rng device: entropy from the host's getrandom()."""
        attached = self.add_virtio_device(kvmfast.VirtioDevice.rng(), "virtio-rng")
        self._rebuild[attached.name] = {"kind": "virtio-rng"}
        return attached

    def add_net(self, tap: str | None = None, mac: str | None = None) -> VirtioPciDevice:
        """A virtio-net device on the TAP ``tap`` (attached, or created if there is
        none), or on a new TAP the kernel names (``device.tap_name``); ``mac`` the
        guest's address, random under 52:54:00 when None. The host side of the link is
        the caller's to configure. :class:`kvmfast.VirtioError` names a TAP that cannot
        be attached (no permission, no /dev/net/tun) or a bad MAC."""
        device = kvmfast.VirtioDevice.net(tap, mac)
        attached = self.add_virtio_device(device, "virtio-net")
        # The names in use, not those asked for: a restore brings back the same TAP
        # name and the MAC the guest knows.
        self._rebuild[attached.name] = {
            "kind": "virtio-net",
            "tap": device.tap_name,
            "mac": device.mac,
        }
        return attached

    def add_vsock(self, cid: int, socket: Path | str) -> VirtioPciDevice:
        """A virtio-vsock device for guest CID ``cid`` (3 to 2**32-1) with
        Firecracker's host side: a Unix socket listening at ``socket`` (made 0600,
        removed at close()); a client writes ``CONNECT <port>\\n`` to reach the guest's
        port, and a guest connecting to the host (CID 2) on port P reaches the socket
        ``<socket>_P``. Streams are not part of a snapshot: a restored guest is told
        TRANSPORT_RESET. :class:`kvmfast.VirtioError` for a bad CID or a path in use."""
        device = kvmfast.VirtioDevice.vsock(cid, str(socket))
        attached = self.add_virtio_device(device, "virtio-vsock")
        self._rebuild[attached.name] = {
            "kind": "virtio-vsock",
            "cid": cid,
            "socket": str(Path(socket).absolute()),
        }
        return attached

    def set_isa_irq(self, irq: int, level: bool) -> None:
        self.platform.isa_line(irq).set_level(level)

    def debug_exit(self, status: int) -> None:
        self.finish(Outcome(status, f"isa-debug-exit: status {status}"))

    @property
    def event_loop(self) -> kvmfast.EventLoop:
        """kvmfast's ioeventfd loop, started the first time a doorbell needs it."""
        if self._event_loop is None:
            self._event_loop = kvmfast.EventLoop()
            self._event_loop.start()
        return self._event_loop

    def write_memory(self, gpa: int, data: bytes) -> None:
        self.vm.write(gpa, data)

    def read_memory(self, gpa: int, size: int) -> bytes:
        return bytes(self.vm.read(gpa, size))

    def install_acpi_tables(self, occupied: Sequence[tuple[int, int]] = ()) -> int:
        """Write the ACPI tables where a legacy scan finds their RSDP, around ``occupied``
        (start, size; see kvm_vmm.acpi_placement); return the RSDP. Tables written
        before are cleared, so that the scan finds only these."""
        for region in self.acpi_tables:
            self.write_memory(region.start, bytes(region.size))
        placed = place_acpi_tables(self.platform.table, self.config.cpus, occupied)
        for gpa, data in placed.pieces:
            self.write_memory(gpa, data)
        self.acpi_tables = [Region("ACPI tables", gpa, len(data)) for gpa, data in placed.pieces]
        return placed.rsdp

    def load(self, image: LoadedImage) -> None:
        """Write a loader's image into RAM and put the boot vCPU at its entry."""
        check_fits(image, self.config.memory_size)
        occupied = [(gpa, len(data)) for gpa, data in image.segments]
        if any(region.overlaps(gpa, size) for region in self.acpi_tables for gpa, size in occupied):
            # Only a Multiboot kernel loads there (the Linux loader refuses the BIOS
            # area), and Multiboot hands out no RSDP address: the scan finds it moved.
            self.install_acpi_tables(occupied)
        for gpa, data in image.segments:
            self.write_memory(gpa, data)
        self.enter(image.entry_state)

    def leave_bios_state(self, image: LoadedImage) -> None:
        """What SeaBIOS leaves for a kernel QEMU boots, around ``image``'s segments: the
        PIT ticking at 18.2 Hz into the master 8259, open to it, and real-mode vector 08h
        on a handler that EOIs (kvm_vmm.bios_state)."""
        for gpa, data in bios_memory([(gpa, len(data)) for gpa, data in image.segments]):
            self.write_memory(gpa, data)
        start_timer(self.platform.pit, self.platform.pic.master_ports)

    def enter(self, entry: EntryState) -> None:
        cpu_setup.enter(self.vcpus[0], self, entry)

    def write(self, gpa: int, data: bytes) -> None:
        """cpu_setup's memory interface."""
        self.write_memory(gpa, data)

    def load_symbols(self, path: Path) -> int:
        """Name guest functions from a System.map or /proc/kallsyms-format file (failure
        reports, vcpu_positions(), profiles); a Linux boot then keeps these."""
        count = self.vm.load_symbols(str(path))
        self._symbol_map = Path(path).read_text(errors="replace")
        self._symbols_loaded = True
        return count

    def load_symbol_map(self, text: str) -> int:
        """Name guest functions from System.map-format ``text`` (what a Linux boot reads
        from the kernel's own kallsyms); a snapshot keeps it."""
        with tempfile.NamedTemporaryFile("w", prefix="kvm-vmm-symbols-", suffix=".map") as table:
            table.write(text)
            table.flush()
            count = self.vm.load_symbols(table.name)
        self._symbol_map = text
        return count

    def boot(self, description: BootDescription, *, cache_dir: Path | None = None) -> BootReport:
        """Load a kernel (kvm_vmm.boot) before start(). ``cache_dir`` keeps the host
        check and host-decompressed kernels (None: $XDG_CACHE_HOME/kvm-vmm or
        ~/.cache/kvm-vmm). A Linux kernel's own kallsyms name its functions unless
        load_symbols() was called."""
        with self._cond:
            self._require("boot()", MachineState.CREATED)
        if cache_dir is None:
            cache_dir = default_cache_dir(os.environ)
        self._booted = describe_boot(description)
        return load_boot(
            self,
            description,
            self.config.memory_size,
            cache_dir=cache_dir,
            kernel_symbols=not self._symbols_loaded,
        )

    # -- running ------------------------------------------------------------------

    @property
    def state(self) -> MachineState:
        with self._cond:
            return self._state

    def _require(self, call: str, *allowed: MachineState) -> None:
        """Raise unless the state (the caller holds _cond) is one of ``allowed``."""
        if self._state not in allowed:
            wanted = " or ".join(state.value for state in allowed)
            raise MachineStateError(
                f"{call} on a machine that is not {wanted} (it is {self._state.value})"
            )

    def finish(self, outcome: Outcome) -> None:
        """End the run (thread-safe; the first outcome wins)."""
        with self._cond:
            first = self._outcome is None
            if first:
                self._outcome = outcome
                self._finished_at = time.monotonic()
            if self._state in (MachineState.RUNNING, MachineState.PAUSED):
                self._state = MachineState.FINISHED
            self._cond.notify_all()  # parked vCPU threads leave
        if first:
            if outcome.reason == POWERED_OFF:
                self.serial.mark(POWER_OFF)
            self.serial.end(outcome.reason)
        self._finished.set()
        for kicker in self.kickers:
            kicker.stop()

    def press_power_button(self) -> None:
        """Press the ACPI power button (PM1_STS.PWRBTN_STS, an SCI where the guest enabled
        it): a guest with ACPI shuts down in its own way, as on QEMU's system_powerdown."""
        with self._cond:
            self._require("press_power_button()", MachineState.RUNNING, MachineState.PAUSED)
        self.platform.acpi_pm.press_power_button()

    def raise_lint1(self) -> None:
        """Drive every LAPIC's LINT1 input: an NMI where LVT LINT1 says NMI, unmasked.

        As api.rst asks of KVM_NMI users: the LVT is read on the vCPU's own
        thread (the vCPU is paused there) and KVM_NMI issued only if it queues one.
        """
        for kicker in self.kickers:
            kicker.request_lint1()

    def start(self) -> None:
        """Start the device timers and one thread per vCPU; returns at once."""
        with self._cond:
            self._require("start()", MachineState.CREATED)
            self._state = MachineState.RUNNING
            self._started_at = time.monotonic()
        self.timers.start()
        self._threads = [
            threading.Thread(target=self._vcpu_main, args=(index,), name=f"vcpu{index}")
            for index in range(len(self.vcpus))
        ]
        for thread in self._threads:
            thread.start()

    def pause(self) -> None:
        """Stop every vCPU, the device timers and the virtio devices' queues (a request
        in flight completes first); returns when every vCPU is out of
        KVM_RUN at a clean point (kvmfast's VcpuKicker.pause: no SYSCALL repair, no
        acknowledged ExtINT vector and no I/O completion in flight), registers readable
        and settable.

        The devices' clock stands still meanwhile (kvm_vmm.clock); the guest's TSC
        and in-kernel LAPIC timer do not. If the run ends while the vCPUs are being
        paused (the guest powered off), pause() returns and the state is finished."""
        if threading.current_thread() in self._threads:
            raise MachineStateError("pause() from a vCPU's thread would wait for itself")
        with self._cond:
            self._require("pause()", MachineState.RUNNING)
            self._state = MachineState.PAUSED
        self.timers.pause()
        for kicker in self.kickers:
            kicker.pause()
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    len(self._parked | self._ended) == len(self.vcpus)
                    or self._state is MachineState.FINISHED
                )
            )
        # The guest can ring no doorbell now; a request in flight completes first.
        self.pci.pause()
        for vcpu in self.vcpus:
            # Tells a kvmclock guest it was stopped, so that its watchdogs do not
            # take the pause for a lockup (a guest without kvmclock: nothing to do).
            vcpu.kvmclock_ctrl()

    def resume(self) -> None:
        """Continue every vCPU exactly where pause() left it, and the timers."""
        with self._cond:
            self._require("resume()", MachineState.PAUSED)
        self.pci.resume()  # before the vCPUs: what was rung before the pause is served
        with self._cond:
            self._require("resume()", MachineState.PAUSED)
            self._state = MachineState.RUNNING
            self._parked.clear()
            self._resumes += 1
            self._cond.notify_all()
        self.timers.resume()

    def stop(self) -> Outcome:
        """End the run (running or paused) with Outcome "stopped", unless the guest
        ended it first; returns the outcome once every vCPU thread has returned. On a
        finished machine it returns the outcome: a script need not race the guest."""
        with self._cond:
            self._require(
                "stop()", MachineState.RUNNING, MachineState.PAUSED, MachineState.FINISHED
            )
        self.finish(Outcome(0, STOPPED, stopped_from_outside=True))
        return self._join()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The run's outcome once it has ended, or None if it is still running (or
        paused) after ``timeout`` seconds (None: wait as long as it takes)."""
        with self._cond:
            self._require(
                "wait()", MachineState.RUNNING, MachineState.PAUSED, MachineState.FINISHED
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.wait(_next_slice(deadline)):
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return self._join()

    def run(self, timeout: float | None = None) -> Outcome:
        """start() and wait(): run every vCPU until the machine finishes (or ``timeout``
        seconds pass: Outcome status 124, or Ctrl-C: status 130)."""
        try:
            # Inside the try: a Ctrl-C may come as soon as the first vCPU runs, while
            # start() is still starting the others.
            self.start()
            if self.wait(timeout) is None:
                self.finish(
                    Outcome(
                        STATUS_TIMED_OUT, f"timed out after {timeout} s", stopped_from_outside=True
                    )
                )
        except KeyboardInterrupt:
            self.finish(Outcome(STATUS_INTERRUPTED, INTERRUPTED, stopped_from_outside=True))
        return self._join()

    def _join(self) -> Outcome:
        """After finish(): wait for the vCPU threads, stop the timers, the outcome."""
        for kicker in self.kickers:
            kicker.stop()
        for thread in self._threads:
            # (one never started: start() was interrupted before it)
            if thread is not threading.current_thread() and thread.ident is not None:
                thread.join()
        self.timers.stop()
        outcome = self.outcome
        assert outcome is not None
        return outcome

    @property
    def outcome(self) -> Outcome | None:
        """How the run ended (None while it has not): a device timer's failure
        overrides an outcome that carries no error of its own."""
        with self._cond:
            outcome = self._outcome
        if outcome is None:
            return None
        if self.timers.errors and outcome.error is None:
            error = self.timers.errors[0]
            return Outcome(STATUS_GUEST_CRASHED, f"device timer failed: {error!r}", error)
        return outcome

    def _vcpu_main(self, index: int) -> None:
        try:
            self._run_vcpu(index)
        finally:
            with self._cond:
                self._ended.add(index)
                self._cond.notify_all()

    def _run_vcpu(self, index: int) -> None:
        vcpu = self.vcpus[index]
        while True:
            try:
                result = run_until_exit(vcpu)
            except kvmfast.TripleFault as error:
                self.finish(Outcome(STATUS_GUEST_CRASHED, f"vCPU {index}: triple fault", error))
                return
            except (kvmfast.GuestStop, DeviceAccessError) as error:
                self.finish(Outcome(STATUS_GUEST_CRASHED, f"vCPU {index}: {error}", error))
                return
            except Exception as error:
                self.finish(
                    Outcome(
                        STATUS_GUEST_CRASHED,
                        f"vCPU {index}: {type(error).__name__}: {error}",
                        error,
                    )
                )
                return
            if result.reason != "paused" or not self._park(index):
                self._vcpu_exit(index, result)
                return

    def _park(self, index: int) -> bool:
        """A paused vCPU's thread waits here; True when it is to run again.

        One "paused" return answers one pause(): pause() waits for every vCPU to
        park before it returns, so a later pause() posts a request of its own, which
        the next run() of a thread woken by resume() returns at once."""
        ended = (MachineState.FINISHED, MachineState.CLOSED)
        with self._cond:
            if self._state is not MachineState.PAUSED:
                return self._state not in ended
            resumes = self._resumes
            self._parked.add(index)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._resumes != resumes or self._state in ended)
            return self._state not in ended

    def _vcpu_exit(self, index: int, result: kvmfast.Exit) -> None:
        if result.reason in ("stopped", "paused"):
            return
        if result.reason == "device_exit":
            self.finish(Outcome(result.value, f"debug exit 0x{result.value:x}"))
        elif result.reason == "system_event" and result.value == KVM_SYSTEM_EVENT_SHUTDOWN:
            self.finish(Outcome(STATUS_POWERED_OFF, POWERED_OFF))
        elif result.reason == "system_event" and result.value == KVM_SYSTEM_EVENT_RESET:
            self.finish(Outcome(0, "guest requested a reset"))
        else:
            self.finish(
                Outcome(
                    STATUS_GUEST_CRASHED,
                    f"vCPU {index}: unexpected exit {result.reason} {result.value}",
                )
            )

    def vcpu_positions(self) -> list[str]:
        """Where each vCPU is, "vCPU n: RIP 0x... (symbol) CPL c", once the run has ended.

        What a timed-out or interrupted run prints, so that a guest that stopped making
        progress says where it was."""
        positions = []
        for index, vcpu in enumerate(self.vcpus):
            try:
                rip, cs = vcpu.get_regs()["rip"], vcpu.get_sregs()["cs"]["selector"]
            except OSError as error:
                positions.append(f"vCPU {index}: registers unreadable ({error.strerror})")
                continue
            symbol = self.vm.describe_address(rip)
            where = f" ({symbol})" if symbol else ""
            positions.append(f"vCPU {index}: RIP {rip:#x}{where} CPL {cs & 3}")
        return positions

    def save_state(self) -> dict[str, object]:
        """Every device's state by its name in ``devices`` (the interrupt controllers'
        included: the wiring has no state of its own, kvm_vmm.machine_state), as data
        ``json.dumps`` takes; before start(), while paused, or after the run.

        A device added with add_device() is saved if it has the Snapshottable methods
        (kvm_devices.interfaces); one without them is refused with
        :class:`NotSnapshottable` naming it, rather than left out of a state that would
        then not restore the machine. A virtio device's state is its transport's and
        its queues' positions (kvm_vmm.virtio_state). The vCPUs and RAM are not part of
        it: snapshot() writes the whole machine."""
        with self._cond:
            self._require(
                "save_state()", MachineState.CREATED, MachineState.PAUSED, MachineState.FINISHED
            )
        return save_machine_state(self.platform, self._snapshottables("save_state()"))

    def _snapshottables(self, call: str) -> dict[str, Snapshottable[Any]]:
        return {
            **snapshottable(self._added, call),
            **virtio_snapshottables(self.pci.devices),
        }

    def restore_state(self, state: object) -> None:
        """Restore what save_state() gave, on a machine built with the same config and
        devices, before start() or while paused: all or nothing (a
        :class:`~kvm_devices.snapshot.StateError` naming the device and field changes
        nothing). The IOAPIC's routes reach KVM again from the restored IOAPIC."""
        with self._cond:
            self._require("restore_state()", MachineState.CREATED, MachineState.PAUSED)
            paused = self._state is MachineState.PAUSED
        # A virtio device serves nothing while its queues are put back (kvm_vmm.virtio_state);
        # a paused machine's devices stay paused until resume().
        self.pci.pause()
        try:
            restore_machine_state(self.platform, state, self._snapshottables("restore_state()"))
        finally:
            if not paused:
                self.pci.resume()

    # -- snapshots ----------------------------------------------------------------

    def snapshot(self, path: Path | str) -> None:
        """Write the whole machine to the directory ``path``: state.json (every vCPU,
        kvmclock, every device, what to rebuild) and the guest RAM as a sparse
        memory.bin (docs/snapshots.md). Before start() or while paused.

        The directory is written beside ``path`` and renamed into place when complete;
        an existing snapshot there is replaced, anything else refused
        (:class:`SnapshotError`). A device the state file cannot rebuild (an object
        given to add_device() or add_virtio_device()) is refused with
        :class:`NotSnapshottable` naming it. A disk's identity is recorded: restore
        refuses an image changed since, so the guest should not write to its disks
        after a snapshot it is to be restored from."""
        with self._cond:
            self._require("snapshot()", MachineState.CREATED, MachineState.PAUSED)
        unable = [name for name, record in self._rebuild.items() if record is None]
        if unable:
            raise NotSnapshottable(
                f"snapshot(): device(s) {', '.join(map(repr, unable))} cannot be rebuilt"
                " from a state file (only add_disk(), add_net(), add_rng(), add_vsock() and"
                " add_device_option() devices can)"
            )
        supported = self.kvm.supported_cpuid()
        msr_indices = self.kvm.msr_index_list()
        state: dict[str, object] = {
            "kvm_vmm": kvm_vmm_version(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": host_facts(supported, self.vcpus[0].tsc_khz()),
            "config": {
                "memory_size": self.config.memory_size,
                "cpus": self.config.cpus,
                "emulation_fallback": self.config.emulation_fallback,
            },
            "boot": self._booted,
            "memory": {
                "file": MEMORY_FILE,
                "size": self.config.memory_size,
                "slots": [
                    dataclasses.asdict(slot)
                    for slot in slots_for([(ram.guest_phys_addr, ram.size) for ram in self.ram])
                ],
            },
            "devices": [self._device_record(name) for name in self._rebuild],
            "clock": self.vm.get_clock(),
            "vcpus": [save_vcpu(vcpu, msr_indices) for vcpu in self.vcpus],
            "platform": self.save_state(),
        }
        with snapshot_directory(Path(path)) as directory:
            write_memory_file(directory / MEMORY_FILE, self.ram)
            if self._symbol_map is not None:
                (directory / SYMBOLS_FILE).write_text(self._symbol_map)
            write_state(directory, state)

    def _device_record(self, name: str) -> dict[str, object]:
        record = self._rebuild[name]
        assert record is not None
        if record["kind"] == "virtio-blk":
            record = {**record, "identity": disk_identity(Path(str(record["path"])))}
        return {"name": name, **record}

    @classmethod
    def restore(
        cls,
        path: Path | str,
        *,
        console: ByteSink | None = None,
        force: bool = False,
        copy: bool = False,
        kvm: kvmfast.Kvm | None = None,
    ) -> Machine:
        """A new machine, not yet started, holding the snapshot at ``path``: start()
        continues the guest where snapshot() found it paused.

        RAM maps the memory file copy-on-write (pages load as the guest touches them;
        the file never changes, and two machines restored from it do not see each
        other); ``copy`` reads it in instead. ``force`` restores over a disk image
        that changed since the snapshot. Anything that does not fit (a malformed or
        foreign state file, a schema from a newer kvm-vmm, a truncated memory file, a
        host whose CPU lacks a feature the guest used) raises :class:`SnapshotError`
        (``.status`` 2) naming it, with nothing changed."""
        directory = Path(path)
        snapshot = read_snapshot(directory)
        records = rebuild_records(directory, snapshot.state["devices"], force)
        shape = snapshot.shape
        config = MachineConfig(
            memory_size=shape.memory_size,
            cpus=shape.cpus,
            console=console if console is not None else DiscardSink(),
            emulation_fallback=shape.emulation_fallback,
        )
        expected = [(region.start, region.size) for region in layout.ram_regions(shape.memory_size)]
        if [(slot.guest_phys_addr, slot.size) for slot in snapshot.slots] != expected:
            raise SnapshotError(directory, "its RAM slots are not this kvm-vmm's layout")
        try:
            machine = cls(config, kvm, ram=RamBacking(snapshot.memory_path, snapshot.slots, copy))
        except (MachineConfigError, OSError, ValueError) as error:
            raise SnapshotError(directory, str(error)) from None
        try:
            machine._restore_from(snapshot, records)
        except BaseException:
            machine.close()
            raise
        return machine

    def _restore_from(self, snapshot: SnapshotFile, records: list[dict[str, object]]) -> None:
        directory, state = snapshot.directory, snapshot.state
        here = host_facts(self.kvm.supported_cpuid(), self.vcpus[0].tsc_khz())
        problem = host_problem(state["host"] if isinstance(state["host"], dict) else {}, here)
        if problem is not None:
            raise SnapshotError(directory, problem)
        vcpus = state["vcpus"]
        if not isinstance(vcpus, list) or len(vcpus) != len(self.vcpus):
            raise SnapshotError(directory, f"vcpus is not a list of {len(self.vcpus)} vCPUs")
        try:
            checked = [
                check_vcpu(data, vcpu, f"vcpus[{index}]")
                for index, (data, vcpu) in enumerate(zip(vcpus, self.vcpus, strict=True))
            ]
            clock = check_u64(
                state["clock"].get("clock") if isinstance(state["clock"], dict) else None,
                "clock.clock",
            )
        except ShapeError as error:
            raise SnapshotError(directory, f"state.json: {error}") from None
        for index, vcpu_state in enumerate(checked):
            # What this host shows a vCPU (KVM reads back what the guest would see: on
            # some hosts more than KVM_GET_SUPPORTED_CPUID lists, HOST-KVM.md).
            fresh = self.vcpus[index].get_cpuid()
            lacking = missing_features([tuple(e) for e in vcpu_state["cpuid"]], fresh)
            if lacking:
                raise SnapshotError(
                    directory,
                    f"vCPU {index} was using CPU features this host lacks: {', '.join(lacking)}",
                )
        try:
            for record in records:
                self._rebuild_device(record)
            if list(self._rebuild) != [record["name"] for record in records]:
                raise SnapshotError(directory, f"its devices came back as {list(self._rebuild)}")
            self.restore_state(state["platform"])
        except (StateError, DeviceSpecError, kvmfast.VirtioError, ResourceError) as error:
            raise SnapshotError(directory, str(error)) from None
        self._booted = state["boot"] if isinstance(state["boot"], dict) else None
        symbols = directory / SYMBOLS_FILE
        if symbols.is_file():
            # Failure reports and profiles of the restored guest name its functions.
            self.load_symbols(symbols)
        try:
            self.vm.set_clock(clock)
            for index, (vcpu, vcpu_state) in enumerate(zip(self.vcpus, checked, strict=True)):
                try:
                    restore_vcpu(vcpu, vcpu_state)
                except (kvmfast.KvmError, ValueError, OverflowError) as error:
                    raise SnapshotError(directory, f"vCPU {index}: KVM refused {error}") from None
        except kvmfast.KvmError as error:
            raise SnapshotError(directory, f"KVM refused the clock: {error}") from None

    def _rebuild_device(self, record: dict[str, object]) -> None:
        kind = record["kind"]
        if kind == "device-option":
            self.add_device_option(str(record["spec"]))
        elif kind == "virtio-blk":
            serial = record["serial"]
            self.add_disk(
                str(record["path"]),
                readonly=record["readonly"] is True,
                serial=serial if isinstance(serial, str) else None,
                direct=record["direct"] is True,
            )
        elif kind == "virtio-net":
            self.add_net(tap=str(record["tap"]), mac=str(record["mac"]))
        elif kind == "virtio-vsock":
            cid = record["cid"]
            assert isinstance(cid, int)  # rebuild_records checked it
            self.add_vsock(cid, str(record["socket"]))
        else:
            self.add_rng()

    def counters(self) -> Counters:
        return self.vm.counters()

    def stats(self) -> dict[str, object]:
        """The run as data (``kvm-vmm --stats``): seconds since start() (to the end of
        the run once it has ended), the outcome's reason (None while running), exits by
        reason and by device, kvmfast's other counters, the console's milestones, and
        each virtio device's requests, bytes, errors and interrupts by its name."""
        with self._cond:
            started, finished = self._started_at, self._finished_at
        now = time.monotonic()
        started = now if started is None else started
        outcome = self.outcome
        statistics = run_statistics(
            self.counters(),
            {
                (window.space, window.base): entry.name
                for entry in self.platform.table.entries.values()
                for window in entry.windows
            },
            None if outcome is None else outcome.reason,
            (now if finished is None else finished) - started,
            self.serial.milestones(started),
        )
        if self.pci.devices:
            statistics["virtio"] = {
                attached.name: dict(sorted(attached.counters().items()))
                for attached in self.pci.devices
            }
        return statistics

    def close(self) -> None:
        """Stop a run still going, then free the VM (a second close does nothing)."""
        with self._cond:
            state = self._state
            self._state = MachineState.CLOSED
        if state is MachineState.CLOSED:
            return
        if state in (MachineState.RUNNING, MachineState.PAUSED):
            self.finish(Outcome(0, STOPPED, stopped_from_outside=True))
        if state is not MachineState.CREATED:
            self._join()  # the vCPU threads leave KVM_RUN before the VM goes
        self.timers.stop()
        self.pci.close()  # no request in flight, no eventfd left in KVM or the loop
        if self._event_loop is not None:
            self._event_loop.stop()
            self._event_loop = None
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
