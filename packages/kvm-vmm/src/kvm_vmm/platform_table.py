"""The registry of the machine's devices: each one's windows, interrupt lines, and how the
firmware tables describe it.

One table, two readers (the model is Firecracker's device manager): the machine maps
every window into kvmfast's address map (:mod:`kvm_vmm.platform` pairs each window with
its device model), and :mod:`kvm_vmm.acpi` builds the FADT, MADT and DSDT from the same
entries. A device added later (``--device``, later PCI) goes through :meth:`PlatformTable.add`
too, which refuses a window or line already taken.

A window may sit inside another device's window (:attr:`Window.within`): the reset
register at 0xCF9 lies among the PCI host's configuration ports 0xCF8-0xCFF, as on
PIIX/ICH chipsets. The table describes it (the FADT names it), but only the enclosing
window is mapped (:meth:`PlatformTable.bus_windows`); its device passes the register's
accesses on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from kvm_devices.acpi_pm import PM1_CNT_LEN, PM1_EVT_LEN, PM_TMR_LEN
from kvm_devices.fw_cfg import FwCfg
from kvm_devices.i8042 import I8042
from kvm_devices.ioapic import Ioapic
from kvm_devices.pci.host_bridge import ConfigMechanism1
from kvm_devices.pic import PicPair
from kvm_devices.pit import Pit
from kvm_devices.port61 import Port61
from kvm_devices.reset_port import ResetPort
from kvm_devices.rtc import Rtc
from kvm_devices.uart import Uart16550
from kvm_vmm import board
from kvm_vmm.resources import IrqAllocator, ResourceConflict, WindowAllocator

AddressSpace = Literal["pio", "mmio"]


class Description(Enum):
    """How the guest learns of a device."""

    FADT = "fixed hardware the FADT points at"
    MADT = "an interrupt controller the MADT lists"
    # PC/AT devices at their fixed ports, announced as a class by the FADT's
    # IA-PC boot architecture flags (ACPI 6.5 table 5.11): LEGACY_DEVICES, 8042.
    LEGACY = "a PC/AT legacy device (FADT IAPC_BOOT_ARCH LEGACY_DEVICES)"
    I8042 = "the keyboard controller (FADT IAPC_BOOT_ARCH 8042)"
    # Configuration mechanism #1 is found by probing its ports; ECAM through the MCFG,
    # the bus's resources through the DSDT's PCI0.
    PCI_HOST = "the PCI host bridge (mechanism #1 probed; MCFG, DSDT PCI0)"
    # Found by probing (fw_cfg's signature) or told by the command line (test devices).
    NONE = "not described"


@dataclass(frozen=True)
class Window:
    """One decoded range: ``length`` bytes of port or physical address space."""

    space: AddressSpace
    base: int
    length: int
    name: str
    # The name of another device's window that holds this one and decodes its accesses;
    # such a window is described, never mapped on its own.
    within: str | None = None

    @property
    def end(self) -> int:
        return self.base + self.length

    def overlaps(self, other: Window) -> bool:
        return self.space == other.space and self.base < other.end and other.base < self.end

    def contains(self, space: AddressSpace, address: int, size: int = 1) -> bool:
        return self.space == space and self.base <= address and address + size <= self.end


@dataclass(frozen=True)
class DeviceEntry:
    name: str
    windows: tuple[Window, ...]
    irqs: tuple[int, ...] = ()
    description: Description = Description.NONE

    def window(self, name: str) -> Window:
        for window in self.windows:
            if window.name == name:
                return window
        raise KeyError(f"device {self.name} has no window {name!r}")


@dataclass
class PlatformTable:
    """Every device of the machine, with the allocators for those still to come."""

    irqs: IrqAllocator = field(
        default_factory=lambda: IrqAllocator(board.IOAPIC_PINS, board.ISA_IRQS)
    )
    bar_space: WindowAllocator = field(
        default_factory=lambda: WindowAllocator(
            board.PCI_MMIO_WINDOW.name, board.PCI_MMIO_WINDOW.start, board.PCI_MMIO_WINDOW.size
        )
    )
    io_bar_space: WindowAllocator = field(
        default_factory=lambda: WindowAllocator(
            board.PCI_IO_WINDOW.name, board.PCI_IO_WINDOW.start, board.PCI_IO_WINDOW.size
        )
    )
    entries: dict[str, DeviceEntry] = field(default_factory=dict)

    def add(
        self,
        name: str,
        windows: tuple[Window, ...],
        irqs: tuple[int, ...] = (),
        description: Description = Description.NONE,
    ) -> DeviceEntry:
        """Register a device; a name, window or line already taken is refused."""
        if name in self.entries:
            raise ResourceConflict(f"a device named {name!r} is already on the platform")
        for window in windows:
            if window.length <= 0:
                raise ValueError(f"{name}: window {window.name} has length {window.length}")
            if window.within is not None:
                self._check_enclosed(name, window)
            for other in self.windows():
                if window.within == other.name:
                    continue
                if window.overlaps(other):
                    raise ResourceConflict(
                        f"{name}: {window.space} [{window.base:#x}, {window.end:#x}) overlaps"
                        f" {other.name} [{other.base:#x}, {other.end:#x})"
                    )
        for line in irqs:
            if line in self.irqs.owners:
                raise ResourceConflict(f"{name}: IRQ {line} is already {self.irqs.owners[line]}'s")
        for line in irqs:
            self.irqs.claim(line, name)
        entry = DeviceEntry(name, windows, irqs, description)
        self.entries[name] = entry
        return entry

    def _check_enclosed(self, name: str, window: Window) -> None:
        enclosing = [w for w in self.bus_windows() if w.name == window.within]
        if not enclosing or not enclosing[0].contains(window.space, window.base, window.length):
            raise ValueError(
                f"{name}: window {window.name} is not inside a mapped window {window.within!r}"
            )

    def unused_name(self, name: str) -> str:
        """``name``, or ``name#2``, ``name#3``... for the second device of a kind."""
        candidate, count = name, 1
        while candidate in self.entries:
            count += 1
            candidate = f"{name}#{count}"
        return candidate

    def entry(self, name: str) -> DeviceEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"no device {name!r} on the platform") from None

    def windows(self) -> list[Window]:
        """Every window, those inside another window's too."""
        return [window for entry in self.entries.values() for window in entry.windows]

    def bus_windows(self) -> list[Window]:
        """The windows mapped on the bus: all but those inside another window."""
        return [window for window in self.windows() if window.within is None]

    def decoder(self, space: AddressSpace, address: int, size: int = 1) -> Window | None:
        """The mapped window that decodes ``size`` bytes at ``address``, if one does."""
        for window in self.bus_windows():
            if window.contains(space, address, size):
                return window
        return None

    def described_by(self, description: Description) -> list[DeviceEntry]:
        return [entry for entry in self.entries.values() if entry.description is description]


def pio(base: int, length: int, name: str) -> Window:
    return Window("pio", base, length, name)


def pc_board() -> PlatformTable:
    """The devices every PC guest of ours gets, at the places their guests expect."""
    table = PlatformTable()
    legacy = Description.LEGACY
    table.add(
        "pic",
        (
            pio(PicPair.MASTER_BASE, PicPair.MASTER_LENGTH, "pic-master"),
            pio(PicPair.SLAVE_BASE, PicPair.SLAVE_LENGTH, "pic-slave"),
            pio(PicPair.ELCR_BASE, PicPair.ELCR_LENGTH, "elcr"),
        ),
        (board.CASCADE_IRQ,),
        legacy,
    )
    table.add("pit", (pio(Pit.BASE, Pit.LENGTH, "pit"),), (board.PIT_IRQ,), legacy)
    table.add("port61", (pio(Port61.BASE, Port61.LENGTH, "port61"),), (), legacy)
    table.add("com1", (pio(Uart16550.COM1, Uart16550.SIZE, "com1"),), (Uart16550.COM1_IRQ,), legacy)
    table.add("rtc", (pio(Rtc.BASE, Rtc.LENGTH, "rtc"),), (board.RTC_IRQ,), legacy)
    table.add(
        "i8042",
        (
            pio(I8042.DATA_BASE, I8042.DATA_LENGTH, "i8042-data"),
            pio(I8042.COMMAND_BASE, I8042.COMMAND_LENGTH, "i8042-cmd"),
        ),
        (board.KEYBOARD_IRQ, board.MOUSE_IRQ),
        Description.I8042,
    )
    table.add(
        "acpi-pm",
        (
            pio(board.PM1A_EVT_BLK, PM1_EVT_LEN, "pm1a-evt"),
            pio(board.PM1A_CNT_BLK, PM1_CNT_LEN, "pm1a-cnt"),
            pio(board.PM_TMR_BLK, PM_TMR_LEN, "pm-tmr"),
        ),
        (board.SCI_IRQ,),
        Description.FADT,
    )
    table.add(
        "pci",
        (
            pio(ConfigMechanism1.BASE, ConfigMechanism1.LENGTH, "pci-conf"),
            Window("mmio", board.PCI_ECAM_WINDOW.start, board.PCI_ECAM_WINDOW.size, "pci-ecam"),
        ),
        (),
        Description.PCI_HOST,
    )
    table.add(
        "reset",
        (Window("pio", board.RESET_PORT, ResetPort.SIZE, "reset", within="pci-conf"),),
        (),
        Description.FADT,
    )
    table.add("fw_cfg", (pio(FwCfg.BASE, FwCfg.LENGTH, "fw_cfg"),))
    table.add(
        "ioapic",
        (Window("mmio", board.IOAPIC_ADDRESS, Ioapic.SIZE, "ioapic"),),
        (),
        Description.MADT,
    )
    for line in board.RESERVED_ISA_IRQS:
        table.irqs.claim(line, "the PC's reserved lines")
    return table
