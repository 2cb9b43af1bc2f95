"""PCI bus 0 and the two ways a guest reaches its configuration space.

References: PCI Local Bus Specification 3.0 §3.2.2.3.2 "Configuration Mechanism #1"
(CONFIG_ADDRESS at 0xCF8: enable bit 31, bus 23:16, device 15:11, function 10:8, register
7:2; CONFIG_DATA at 0xCFC-0xCFF; only dword accesses to 0xCF8 reach CONFIG_ADDRESS, others
"pass through" as ordinary I/O); PCI Express Base Specification 3.0 §7.2.2 "Enhanced
Configuration Access Mechanism" (offset = bus << 20 | device << 15 | function << 12 |
register; accesses naturally aligned, not crossing a dword); §6.1 "configuration read
... to a non-existent device ... returns all 1's" (the master abort a PC's host bridge
turns into 0xFFFFFFFF); Intel 82371AB PIIX4 datasheet, the reset control register at
0xCF9 decoded for byte accesses beside CONFIG_ADDRESS.

Choices:

* CONFIG_ADDRESS keeps bits 1:0 as written, and a CONFIG_DATA access at 0xCFC + n acts on
  register (CONFIG_ADDRESS[7:0] | n), as QEMU's host bridges do (hw/pci/pci_host.c:
  ``config_reg | (addr & 3)``). The specification wants the register dword-aligned;
  kvm-unit-tests reads a device ID with CONFIG_ADDRESS = ... | 2 and a word at 0xCFC
  (lib/x86/asm/pci.h ``PCI_CONF1_ADDRESS(dev, reg)``), which finds nothing otherwise.
* One bus (0), 32 slots, function 0 of each (no multi-function devices). Slot 0 holds the
  host bridge: vendor 0x8086, device 0x29C0, class 0x060000, as QEMU's q35 machine
  presents its MCH, a host bridge Linux knows and asks nothing of.
* A bad access reads all ones and writes nothing, and is counted in
  :class:`PciConfigCounters`: a size other than 1, 2 or 4; an offset not a multiple of
  the size (which covers every access crossing a dword); a register beyond the 256 bytes
  of a conventional function (ECAM's extended space); another bus; an empty slot; a
  function other than 0; mechanism #1's data port with the enable bit clear; and a
  non-dword access to 0xCF8-0xCFB other than a byte at 0xCF9 (the reset register). None
  raises.

Thread-safety: the bus's lock guards its slots and counters; mechanism #1's lock guards
CONFIG_ADDRESS. Neither is held while a function, or the reset register, is called.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Annotated, Protocol

from kvm_devices.interfaces import Device
from kvm_devices.pci.config_space import SIZE as CONFIG_SIZE
from kvm_devices.pci.config_space import PciConfigSpace, PciConfigState
from kvm_devices.snapshot import (
    Mask,
    Snapshotting,
    StateError,
    detached,
    state_from_data,
    state_to_data,
)

SLOTS = 32
FUNCTIONS = 8
BUSES = 256

HOST_BRIDGE_VENDOR_ID = 0x8086
HOST_BRIDGE_DEVICE_ID = 0x29C0
HOST_BRIDGE_CLASS = 0x060000

CONFIG_ENABLE = 1 << 31
# Bits 30:24 are reserved; bits 1:0 are kept, as QEMU keeps them (module docstring).
CONFIG_ADDRESS_BITS = CONFIG_ENABLE | 0x00FF_FFFF

ECAM_BUS_SHIFT = 20
ECAM_BUS_SIZE = 1 << ECAM_BUS_SHIFT


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if size > 0 else 0


class PciFunction(Protocol):
    """What the bus needs of a function: its configuration space."""

    @property
    def config(self) -> PciConfigSpace: ...


class BadAccess(enum.Enum):
    """Why a configuration access reads all ones; each value names a counter."""

    BAD_SIZE = "bad_size"
    UNALIGNED = "unaligned"
    BEYOND_SPACE = "beyond_space"
    ABSENT_BUS = "absent_bus"
    ABSENT_DEVICE = "absent_device"
    ABSENT_FUNCTION = "absent_function"
    DISABLED = "disabled"
    UNDECODED = "undecoded"


@dataclass
class PciConfigCounters:
    """Configuration accesses that reached a function, and every bad one by kind."""

    reads: int = 0
    writes: int = 0
    bad_size: int = 0
    unaligned: int = 0
    beyond_space: int = 0
    absent_bus: int = 0
    absent_device: int = 0
    absent_function: int = 0
    disabled: int = 0
    undecoded: int = 0


@dataclass
class HostBridge:
    """Function 0 of slot 0: the host bridge, with no BARs and no interrupt."""

    config: PciConfigSpace


def host_bridge() -> HostBridge:
    return HostBridge(
        PciConfigSpace(
            vendor_id=HOST_BRIDGE_VENDOR_ID,
            device_id=HOST_BRIDGE_DEVICE_ID,
            class_code=HOST_BRIDGE_CLASS,
        )
    )


class PciBus:
    """Bus 0: slot 0 the host bridge, slots 1-31 for the functions :meth:`add` puts there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.host_bridge = host_bridge()
        self._slots: dict[int, PciFunction] = {0: self.host_bridge}
        self._counters = PciConfigCounters()

    def add(self, slot: int, function: PciFunction) -> None:
        """Put ``function`` in ``slot`` as its function 0; a taken slot is refused."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"PCI slot {slot} out of range 0..{SLOTS - 1}")
        with self._lock:
            if slot in self._slots:
                raise ValueError(f"PCI slot {slot} is taken")
            self._slots[slot] = function

    def free_slot(self) -> int:
        """The lowest empty slot (ValueError when all 32 are taken)."""
        with self._lock:
            for slot in range(SLOTS):
                if slot not in self._slots:
                    return slot
        raise ValueError("every PCI slot of bus 0 is taken")

    def function(self, slot: int) -> PciFunction | None:
        with self._lock:
            return self._slots.get(slot)

    def counters(self) -> PciConfigCounters:
        with self._lock:
            return detached(self._counters)

    def count(self, kind: BadAccess) -> None:
        """Count a bad access (the mechanisms' own kinds: disabled, undecoded...)."""
        with self._lock:
            setattr(self._counters, kind.value, getattr(self._counters, kind.value) + 1)

    def config_read(self, bus: int, device: int, function: int, register: int, size: int) -> int:
        target = self._target(bus, device, function, register, size, write=False)
        return _all_ones(size) if target is None else target.config.read(register, size)

    def config_write(
        self, bus: int, device: int, function: int, register: int, size: int, value: int
    ) -> None:
        target = self._target(bus, device, function, register, size, write=True)
        if target is not None:
            target.config.write(register, size, value & _all_ones(size))

    def _target(
        self, bus: int, device: int, function: int, register: int, size: int, *, write: bool
    ) -> PciFunction | None:
        kind: BadAccess | None = None
        target: PciFunction | None = None
        with self._lock:
            if size not in (1, 2, 4):
                kind = BadAccess.BAD_SIZE
            elif register % size:
                kind = BadAccess.UNALIGNED
            elif not 0 <= register < CONFIG_SIZE:
                kind = BadAccess.BEYOND_SPACE
            elif bus != 0:
                kind = BadAccess.ABSENT_BUS
            elif (target := self._slots.get(device)) is None:
                kind = BadAccess.ABSENT_DEVICE
            elif function != 0:
                kind, target = BadAccess.ABSENT_FUNCTION, None
            counters = self._counters
            if kind is not None:
                setattr(counters, kind.value, getattr(counters, kind.value) + 1)
            elif write:
                counters.writes += 1
            else:
                counters.reads += 1
        return target


@dataclass
class ConfigMechanism1State:
    address: Annotated[int, Mask(CONFIG_ADDRESS_BITS)] = 0


class ConfigMechanism1(Snapshotting[ConfigMechanism1State]):
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS, the reset register's byte at 0xCF9, CONFIG_DATA."""

    BASE = 0xCF8
    LENGTH = 8
    RESET_OFFSET = 1  # 0xCF9
    DATA_OFFSET = 4  # 0xCFC

    def __init__(self, bus: PciBus, reset_register: Device) -> None:
        self._bus = bus
        self._reset = reset_register
        self._lock = threading.Lock()
        self._state = ConfigMechanism1State()

    def read(self, offset: int, size: int) -> int:
        if offset == self.RESET_OFFSET and size == 1:
            return self._reset.read(0, 1)
        if offset == 0 and size == 4:
            with self._lock:
                return self._state.address
        target = self._data_target(offset, size)
        if target is None:
            return _all_ones(size)
        return self._bus.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == self.RESET_OFFSET and size == 1:
            self._reset.write(0, 1, value & 0xFF)
            return
        if offset == 0 and size == 4:
            with self._lock:
                self._state.address = value & CONFIG_ADDRESS_BITS
            return
        target = self._data_target(offset, size)
        if target is not None:
            self._bus.config_write(*target, size, value)

    def _data_target(self, offset: int, size: int) -> tuple[int, int, int, int] | None:
        """(bus, device, function, register) of a CONFIG_DATA access, or None (counted)."""
        if not self.DATA_OFFSET <= offset < self.LENGTH:
            self._bus.count(BadAccess.UNDECODED)
            return None
        with self._lock:
            address = self._state.address
        if not address & CONFIG_ENABLE:
            self._bus.count(BadAccess.DISABLED)
            return None
        register = (address & 0xFF) | (offset - self.DATA_OFFSET)
        return (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7, register

    def save_state(self) -> ConfigMechanism1State:
        with self._lock:
            return detached(self._state)

    def check_state(self, data: object) -> ConfigMechanism1State:
        return state_from_data(ConfigMechanism1State, data, "PCI configuration mechanism #1")

    def restore_state(self, state: ConfigMechanism1State) -> None:
        with self._lock:
            self._state = detached(state)


class Ecam:
    """The memory-mapped configuration space of buses 0..``buses - 1`` (1 MiB each)."""

    def __init__(self, bus: PciBus, buses: int = BUSES) -> None:
        if not 1 <= buses <= BUSES:
            raise ValueError(f"ECAM covers 1..{BUSES} buses, not {buses}")
        self._bus = bus
        self.length = buses * ECAM_BUS_SIZE

    def read(self, offset: int, size: int) -> int:
        target = self._decode(offset)
        if target is None:
            return _all_ones(size)
        return self._bus.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        target = self._decode(offset)
        if target is not None:
            self._bus.config_write(*target, size, value)

    def _decode(self, offset: int) -> tuple[int, int, int, int] | None:
        if not 0 <= offset < self.length:
            self._bus.count(BadAccess.ABSENT_BUS)
            return None
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF


@dataclass
class PciHostState:
    """What the host itself keeps: CONFIG_ADDRESS and the host bridge's configuration.
    The other functions on the bus are their owners' to save."""

    config_address: ConfigMechanism1State
    host_bridge: PciConfigState


class PciHost(Snapshotting[PciHostState]):
    """Bus 0 with its host bridge, behind mechanism #1 and ECAM."""

    def __init__(self, reset_register: Device, ecam_buses: int = BUSES) -> None:
        self.bus = PciBus()
        self.config_ports = ConfigMechanism1(self.bus, reset_register)
        self.ecam = Ecam(self.bus, ecam_buses)

    def save_state(self) -> PciHostState:
        return PciHostState(
            self.config_ports.save_state(), self.bus.host_bridge.config.save_state()
        )

    def check_state(self, data: object) -> PciHostState:
        state = state_from_data(PciHostState, data, "PCI host")
        try:
            self.bus.host_bridge.config.check_state(state_to_data(state.host_bridge))
        except StateError as error:
            raise StateError(f"host_bridge.{error.path}", error.problem, "PCI host") from None
        return state

    def restore_state(self, state: PciHostState) -> None:
        self.config_ports.restore_state(state.config_address)
        self.bus.host_bridge.config.restore_state(state.host_bridge)
