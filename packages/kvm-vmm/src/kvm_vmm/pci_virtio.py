"""Virtio devices on the PCI bus: kvmfast's queues behind kvm-devices' virtio-pci transport.

The transport (:mod:`kvm_devices.virtio`) is the guest-visible register model; the queues
and the requests run in kvmfast (:class:`kvmfast.VirtioDevice`) on the event loop's thread.
This module joins them to KVM:

* each queue's doorbell is a zero-length MMIO ioeventfd at the queue's notify address
  (``KVM_CAP_IOEVENTFD_ANY_LENGTH``), else a 2-byte datamatch ioeventfd on the queue's
  index (what a driver without VIRTIO_F_NOTIFICATION_DATA stores), else the transport's
  notify register (an MMIO exit) rings the same eventfd; the event loop hands the
  eventfd's rings to the device's native queue handler;
* each interrupt source (a queue, or the configuration) has an eventfd the device writes.
  While the transport binds the source to an unmasked MSI-X vector, that eventfd is a KVM
  irqfd on the vector's own GSI, above the GSIs the IOAPIC's pins hold
  (``KVM_CAP_SPLIT_IRQCHIP``'s routes), whose MSI route is the vector's table entry: no
  Python on the path. Otherwise (vector masked, MSI-X off) the event loop calls
  ``transport.interrupt(source)``, which sets the PBA bit or the ISR bit and INTx.
* INTx is a level line into our IOAPIC, active low as PCI's is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import kvm_abi
import kvmfast
from kvm_devices.pci.host_bridge import PciBus
from kvm_devices.virtio.constants import BAR0_SIZE, CONFIG_SOURCE
from kvm_devices.virtio.pci_transport import BAR0, VirtioPciFunction
from kvm_vmm.added_devices import GuardedDevice
from kvm_vmm.interrupts import PciIntxLine, PciIntxWires
from kvm_vmm.platform_table import PlatformTable, Window


class VirtioHost(Protocol):
    """What a virtio-pci device needs of the machine."""

    vm: kvmfast.Vm

    @property
    def event_loop(self) -> kvmfast.EventLoop: ...


@dataclass
class GsiAllocator:
    """GSIs for MSI-X vectors, from the first one the IOAPIC's routes leave free."""

    first: int
    limit: int = 1024  # KVM_MAX_IRQ_ROUTES is 4096; a few devices need far fewer
    _next: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allocate(self, owner: str) -> int:
        with self._lock:
            gsi = self.first if self._next is None else self._next
            if gsi >= self.limit:
                raise ValueError(f"{owner}: no GSI left for an MSI-X vector (limit {self.limit})")
            self._next = gsi + 1
            return gsi


@dataclass
class NativeBackend:
    """kvm-devices' VirtioBackend over a kvmfast.VirtioDevice bound to one VM."""

    device: kvmfast.VirtioDevice
    vm: kvmfast.Vm

    @property
    def device_type(self) -> int:
        return self.device.device_type

    @property
    def num_queues(self) -> int:
        return self.device.num_queues

    @property
    def max_queue_size(self) -> int:
        return self.device.max_queue_size

    @property
    def device_features(self) -> int:
        return self.device.device_features

    @property
    def config_size(self) -> int:
        return self.device.config_size

    @property
    def needs_reset(self) -> bool:
        return self.device.needs_reset

    def read_config(self, offset: int, size: int) -> int:
        return self.device.read_config(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.device.write_config(offset, size, value)

    def activate(self, driver_features: int, queues: list[tuple[int, int, int, int, bool]]) -> None:
        try:
            self.device.activate(self.vm, driver_features, queues)
        except kvmfast.VirtioError as error:
            raise ValueError(str(error)) from None

    def reset(self) -> None:
        self.device.reset()

    def notify(self, queue: int) -> None:
        if 0 <= queue < self.device.num_queues:
            self.device.queue_notifier(queue).write(1)


DoorbellKind = Literal["zero-length ioeventfd", "datamatch ioeventfd", "mmio exit"]
DOORBELL_KINDS: tuple[DoorbellKind, ...] = get_args(DoorbellKind)


def best_doorbell(vm: kvmfast.Vm) -> DoorbellKind:
    """The fastest doorbell this host's KVM offers."""
    if vm.check_extension(kvm_abi.KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0:
        return "zero-length ioeventfd"
    if vm.check_extension(kvm_abi.KVM_CAP_IOEVENTFD) > 0:
        return "datamatch ioeventfd"
    return "mmio exit"


class Doorbells:
    """The notify addresses' ioeventfds of one device, moved with its BAR. With
    ``kind`` "mmio exit" there are none: the transport's notify register rings the
    device's eventfd from the vCPU's exit instead."""

    def __init__(self, vm: kvmfast.Vm, device: kvmfast.VirtioDevice, kind: DoorbellKind) -> None:
        self._vm = vm
        self._device = device
        self.kind = kind
        self._registered: list[tuple[int, int, int, int | None]] = []

    def _request(self, queue: int, address: int) -> tuple[int, int, int, int | None]:
        fd = self._device.queue_notifier(queue).fd
        if self.kind == "zero-length ioeventfd":
            return (fd, address, 0, None)
        return (fd, address, 2, queue)

    def place(self, addresses: list[int | None]) -> None:
        """Register each queue's doorbell at its address (None: BAR not decoded)."""
        self.remove()
        if self.kind == "mmio exit":
            return
        for queue, address in enumerate(addresses):
            if address is None:
                continue
            fd, addr, length, datamatch = self._request(queue, address)
            self._vm.register_ioeventfd(fd, addr, length, datamatch=datamatch)
            self._registered.append((fd, addr, length, datamatch))

    def remove(self) -> None:
        for fd, addr, length, datamatch in self._registered:
            if not self._vm.closed:
                self._vm.unregister_ioeventfd(fd, addr, length, datamatch=datamatch)
        self._registered.clear()


class InterruptWiring:
    """kvm-devices' VirtioInterruptSink: MSI-X vectors to GSIs and irqfds, INTx to a pin."""

    def __init__(
        self,
        host: VirtioHost,
        device: kvmfast.VirtioDevice,
        gsis: GsiAllocator,
        intx: PciIntxLine,
        name: str,
    ) -> None:
        self._host = host
        self._device = device
        self._gsis = gsis
        self._intx = intx
        self._name = name
        self.transport: VirtioPciFunction | None = None
        self._lock = threading.Lock()
        self._vector_gsi: dict[int, int] = {}
        self._messages: dict[int, tuple[int, int]] = {}
        # source -> ("msix", gsi) or ("python", None) as wired now
        self._wired: dict[int, tuple[str, int | None]] = {}
        self._closed = False

    def sources(self) -> list[int]:
        return [*range(self._device.num_queues), CONFIG_SOURCE]

    def _eventfd(self, source: int) -> kvmfast.EventFd:
        if source == CONFIG_SOURCE:
            return self._device.config_interrupt()
        return self._device.queue_interrupt(source)

    def _gsi(self, vector: int) -> int:
        gsi = self._vector_gsi.get(vector)
        if gsi is None:
            gsi = self._gsis.allocate(f"{self._name} MSI-X vector {vector}")
            self._vector_gsi[vector] = gsi
        return gsi

    # -- VirtioInterruptSink --------------------------------------------------------

    def intx(self, asserted: bool) -> None:
        self._intx.set_asserted(asserted)

    def msix_vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._messages[vector] = (address, data)
            gsi = self._gsi(vector)
            self._host.vm.set_msi_route(gsi, address, data)

    def msix_fire(self, vector: int) -> None:
        with self._lock:
            message = self._messages.get(vector)
            if self._closed or message is None:
                return
        self._host.vm.signal_msi(*message)

    def bindings_changed(self) -> None:
        transport = self.transport
        if transport is None:
            return
        with self._lock:
            if self._closed:
                return
            for source in self.sources():
                kind, vector = transport.binding(source)
                wanted: tuple[str, int | None] = (
                    ("msix", self._gsi(vector))
                    if kind == "msix" and vector is not None
                    else ("python", None)
                )
                if self._wired.get(source) != wanted:
                    self._unwire(source)
                    self._wire(source, wanted)

    def _wire(self, source: int, wanted: tuple[str, int | None]) -> None:
        eventfd = self._eventfd(source)
        kind, gsi = wanted
        if kind == "msix" and gsi is not None:
            # KVM injects at once if the eventfd was signalled before it became an irqfd.
            self._host.vm.register_irqfd(eventfd.fd, gsi, None)
        else:
            self._host.event_loop.add(eventfd, self._python_path(source))
        self._wired[source] = wanted

    def _unwire(self, source: int) -> None:
        previous = self._wired.pop(source, None)
        if previous is None:
            return
        eventfd = self._eventfd(source)
        kind, gsi = previous
        if kind == "msix" and gsi is not None:
            if not self._host.vm.closed:
                self._host.vm.unregister_irqfd(eventfd.fd, gsi)
        else:
            self._host.event_loop.remove(eventfd)

    def _python_path(self, source: int) -> Callable[[int], None]:
        transport = self.transport

        def interrupt(count: int) -> None:
            if transport is not None:
                transport.interrupt(source)

        return interrupt

    def close(self) -> None:
        with self._lock:
            for source in list(self._wired):
                self._unwire(source)
            self._closed = True

    @property
    def vector_gsis(self) -> dict[int, int]:
        with self._lock:
            return dict(self._vector_gsi)


@dataclass
class Bar0:
    """BAR0 of a virtio function as a Device (offsets within the BAR)."""

    function: VirtioPciFunction

    def read(self, offset: int, size: int) -> int:
        return self.function.bar_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(offset, size, value)


class VirtioPciDevice:
    """One virtio device on bus 0: the transport, its kvmfast device, its wiring.

    BAR0 is decoded (an MMIO range in kvmfast, the doorbells' ioeventfds at their
    addresses) while the function's memory decode is on and the BAR holds an address
    in the PCI memory window; the guest may move it (Linux sizes BARs with decode off).
    """

    def __init__(
        self,
        host: VirtioHost,
        device: kvmfast.VirtioDevice,
        *,
        name: str,
        slot: int,
        bar0_address: int,
        gsis: GsiAllocator,
        intx: PciIntxLine,
        window: Window,
        doorbell: DoorbellKind,
    ) -> None:
        self.name = name
        self.slot = slot
        self.device = device
        self._host = host
        self._window = window
        self.wiring = InterruptWiring(host, device, gsis, intx, name)
        self.transport = VirtioPciFunction(
            NativeBackend(device, host.vm),
            msix_vectors=device.num_queues + 1,
            interrupt_sink=self.wiring,
            bar0_address=bar0_address,
        )
        self.wiring.transport = self.transport
        self.doorbells = Doorbells(host.vm, device, doorbell)
        self._bar = GuardedDevice(name, window, Bar0(self.transport))
        self._mapped_at: int | None = None
        self._map_lock = threading.Lock()
        self.unmapped_bars = 0  # BAR addresses the bus could not decode (overlap, outside)
        loop = host.event_loop
        for queue in range(device.num_queues):
            loop.add(device.queue_notifier(queue), device.queue_handler(queue))
        # What the device reads besides its doorbells (a virtio-net device's TAP).
        self._loop = loop
        self._readable = device.readable_handler()
        if self._readable is not None:
            loop.add_readable(self._readable)
        self.wiring.bindings_changed()
        self.transport.config.on_bars_changed = self._bars_changed

    def _wanted_address(self) -> int | None:
        config = self.transport.config
        address = config.bar_address(BAR0)
        if not config.memory_enabled or address is None:
            return None
        if address + BAR0_SIZE > 1 << 32:
            return None  # above the 32-bit window: nothing of ours decodes there
        return address

    def _bars_changed(self) -> None:
        with self._map_lock:
            wanted = self._wanted_address()
            if wanted == self._mapped_at:
                return
            vm = self._host.vm
            if self._mapped_at is not None:
                self.doorbells.remove()
                vm.remove_mmio(self._mapped_at)
                self._mapped_at = None
            if wanted is None:
                return
            try:
                vm.add_mmio(wanted, BAR0_SIZE, self._bar)
            except ValueError:
                self.unmapped_bars += 1  # over RAM or another device: undecoded, as on a bus
                return
            self._mapped_at = wanted
            addresses = [self.transport.notify_address(q) for q in range(self.device.num_queues)]
            self.doorbells.place(addresses)

    @property
    def bar0(self) -> int | None:
        """Where BAR0 is decoded now (None: not decoded)."""
        return self._mapped_at

    def counters(self) -> dict[str, int]:
        return {**self.device.counters(), **self.transport.counters}

    def close(self) -> None:
        """Stop the device for good (a disk's image is unlocked) and take its eventfds
        out of KVM and the loop."""
        if self._readable is not None:
            # The loop holds the TAP open while it watches it.
            self._loop.remove_readable(self._readable)
            self._readable = None
        self.device.close()
        self.wiring.close()
        self.doorbells.remove()
        self.transport.config.on_bars_changed = None


@dataclass
class PciSlots:
    """What the machine gives virtio devices: bus 0, its INTx wires, BAR space, GSIs."""

    bus: PciBus
    table: PlatformTable
    intx: PciIntxWires
    gsis: GsiAllocator
    # None: the best the host has (best_doorbell); a test may ask for a slower one.
    doorbell: DoorbellKind | None = None
    devices: list[VirtioPciDevice] = field(default_factory=list)

    def attach(self, host: VirtioHost, device: kvmfast.VirtioDevice, name: str) -> VirtioPciDevice:
        """``device`` in the first free slot, BAR0 from the PCI memory window, its INTA#
        on the slot's wire; ``name`` (or ``name#n``) in the platform table."""
        name = self.table.unused_name(name)
        slot = self.bus.free_slot()
        address = self.table.bar_space.allocate(BAR0_SIZE, name)
        window = Window("mmio", address, BAR0_SIZE, name)
        self.table.add(name, (window,), ())
        attached = VirtioPciDevice(
            host,
            device,
            name=name,
            slot=slot,
            bar0_address=address,
            gsis=self.gsis,
            intx=self.intx.line(slot, 0),
            window=window,
            doorbell=self.doorbell if self.doorbell is not None else best_doorbell(host.vm),
        )
        self.bus.add(slot, attached.transport)
        self.devices.append(attached)
        return attached

    def pause(self) -> None:
        """No device touches guest RAM until resume()."""
        for attached in self.devices:
            attached.device.pause()

    def resume(self) -> None:
        for attached in self.devices:
            attached.device.resume()

    def close(self) -> None:
        for attached in self.devices:
            attached.close()
