"""Devices added to a machine by its user: the handle add_device() returns, and the guard
that turns an exception of the device into an error naming the device and the access.

A user's device is any object with ``read(offset, size)`` and ``write(offset, size,
value)``. kvmfast calls it on the vCPU's thread; what it raises ends that vCPU's run.
The guard re-raises it as :class:`DeviceAccessError`, which says which device, at which
port or address, on which access, so that the machine's outcome tells the user where
their device failed (the original exception is its ``__cause__``). The platform's own
devices are mapped unguarded: they never raise on guest input (kvm_devices.interfaces).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from kvm_devices.interfaces import Device, InterruptLine
from kvm_vmm import board
from kvm_vmm.layout import Region
from kvm_vmm.platform_table import AddressSpace, Window
from kvm_vmm.resources import ResourceConflict, ResourceError

AutoIrq = Literal["auto"]
PORT_SPACE = 0x10000
LAPIC_SIZE = 0x1000  # the xAPIC register page (Intel SDM Vol. 3A 11.4.1)


class DeviceAccessError(RuntimeError):
    """A user's device raised (or answered a read with something not an int)."""

    def __init__(
        self, device: str, window: Window, offset: int, size: int, value: int | None
    ) -> None:
        self.device = device
        self.space: AddressSpace = window.space
        self.address = window.base + offset
        self.offset = offset
        self.size = size
        self.is_write = value is not None
        self.value = value
        where = "port" if window.space == "pio" else "MMIO address"
        if value is None:
            access = f"{size}-byte read of {where} {self.address:#x}"
        else:
            access = f"{size}-byte write of {value:#x} to {where} {self.address:#x}"
        super().__init__(f"device {device!r} failed on a {access} (offset {offset:#x})")

    def __str__(self) -> str:
        cause = self.__cause__
        if cause is None:
            return super().__str__()
        return f"{super().__str__()}: {type(cause).__name__}: {cause}"


@dataclass(frozen=True)
class GuardedDevice:
    """One window of a user's device, as kvmfast sees it."""

    name: str
    window: Window
    device: Device

    def read(self, offset: int, size: int) -> int:
        try:
            value = self.device.read(offset, size)
        except BaseException as error:  # sys.exit() in a device too: the run must end
            raise DeviceAccessError(self.name, self.window, offset, size, None) from error
        if not isinstance(value, int) or isinstance(value, bool):
            wrong = TypeError(f"read() returned {type(value).__name__}, not an int")
            raise DeviceAccessError(self.name, self.window, offset, size, None) from wrong
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        try:
            self.device.write(offset, size, value)
        except BaseException as error:  # sys.exit() in a device too: the run must end
            raise DeviceAccessError(self.name, self.window, offset, size, value) from error


@dataclass(frozen=True)
class AddedDevice:
    """What Machine.add_device() returns: where the device answers and its interrupt line.

    ``line`` (None without an IRQ) drives ISA IRQ ``irq``: the PIC input and the IOAPIC
    pin of that IRQ together, as the platform's own ISA devices are wired.
    """

    name: str
    device: Device
    window: Window
    irq: int | None
    line: InterruptLine | None


def check_decodable(window: Window, ram: Iterable[Region]) -> None:
    """Refuse a window whose accesses would never reach its device: past the 64 KiB port
    space, or where KVM answers MMIO itself (guest RAM, the in-kernel LAPICs)."""
    if window.space == "pio":
        if window.base < 0 or window.end > PORT_SPACE:
            raise ResourceError(
                f"{window.name}: pio [{window.base:#x}, {window.end:#x}) is outside"
                f" the port space [0, {PORT_SPACE:#x})"
            )
        return
    taken = [(region.start, region.end, "guest RAM") for region in ram]
    taken.append((board.LAPIC_ADDRESS, board.LAPIC_ADDRESS + LAPIC_SIZE, "the local APICs"))
    for start, end, what in taken:
        if window.base < end and start < window.end:
            raise ResourceConflict(
                f"{window.name}: mmio [{window.base:#x}, {window.end:#x}) overlaps {what}"
                f" [{start:#x}, {end:#x})"
            )
