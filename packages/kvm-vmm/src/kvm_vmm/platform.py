"""The legacy PC platform of the machine: the device models, wired to each other.

Where each device answers and on which IRQ is the platform table's
(:mod:`kvm_vmm.platform_table`); this module builds the models and pairs each window
of the table with the model behind it. The machine maps those pairs into kvmfast's
address map and owns the devices' lifetimes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvm_devices.acpi_pm import AcpiPm
from kvm_devices.fw_cfg import FwCfg
from kvm_devices.i8042 import I8042
from kvm_devices.interfaces import ByteSink, Device
from kvm_devices.ioapic import Ioapic
from kvm_devices.pci.host_bridge import ECAM_BUS_SHIFT, PciBus, PciHost
from kvm_devices.pic import PicPair
from kvm_devices.pit import Pit
from kvm_devices.port61 import Port61
from kvm_devices.reset_port import ResetPort
from kvm_devices.rtc import Rtc
from kvm_devices.uart import Uart16550
from kvm_vmm import board, layout
from kvm_vmm.clock import TimerThread
from kvm_vmm.interrupts import IsaIrqLine, KvmIoapicSink, RoutingVm
from kvm_vmm.platform_table import AddressSpace, PlatformTable, pc_board


@dataclass(frozen=True)
class Mapping:
    """One device window: address space, base, length, the device seeing offsets."""

    space: AddressSpace
    base: int
    length: int
    device: Device
    name: str


@dataclass
class PlatformEvents:
    """What the platform's devices ask of the machine."""

    power_off: Callable[[], None]
    reset: Callable[[], None]
    extint: Callable[[bool], None]


@dataclass
class Platform:
    """The chips every PC guest expects, wired to each other."""

    pic: PicPair
    ioapic: Ioapic
    pit: Pit
    port61: Port61
    uart: Uart16550
    rtc: Rtc
    i8042: I8042
    acpi_pm: AcpiPm
    reset_port: ResetPort
    fw_cfg: FwCfg
    pci: PciHost
    table: PlatformTable
    mappings: list[Mapping] = field(default_factory=list)

    @property
    def pci_bus(self) -> PciBus:
        """Bus 0, where PCI functions are added (slot 0 is the host bridge)."""
        return self.pci.bus

    def models(self) -> dict[str, object]:
        """Each device of the platform table under its table name."""
        return {
            "pic": self.pic,
            "pit": self.pit,
            "port61": self.port61,
            "com1": self.uart,
            "rtc": self.rtc,
            "i8042": self.i8042,
            "acpi-pm": self.acpi_pm,
            "reset": self.reset_port,
            "fw_cfg": self.fw_cfg,
            "ioapic": self.ioapic,
            "pci": self.pci,
        }

    def isa_line(self, irq: int) -> IsaIrqLine:
        return IsaIrqLine(irq, self.pic, self.ioapic)


def build_platform(
    vm: RoutingVm,
    timers: TimerThread,
    console: ByteSink,
    events: PlatformEvents,
    *,
    ram_size: int,
    cpus: int,
) -> Platform:
    table = pc_board()
    pic = PicPair(intr=events.extint)
    ioapic = Ioapic(KvmIoapicSink(vm), timer=timers, clock=timers, pins=board.IOAPIC_PINS)

    def line_of(device: str, index: int = 0) -> IsaIrqLine:
        return IsaIrqLine(table.entry(device).irqs[index], pic, ioapic)

    pit = Pit(timers, timers, line_of("pit"))
    port61 = pit.port61
    uart = Uart16550(line_of("com1"), console)
    rtc = Rtc(timers, timers, line_of("rtc"), cmos=cmos_memory_size_bytes(ram_size))
    i8042 = I8042(reset_request=events.reset, irq1=line_of("i8042"), irq12=line_of("i8042", 1))

    def on_sleep(sleep_type: int) -> None:
        if sleep_type == board.SLP_TYP_S5:
            events.power_off()

    acpi_pm = AcpiPm(timers, timers, line_of("acpi-pm"), on_sleep)
    reset_port = ResetPort(events.reset)
    fw_cfg = FwCfg(ram_size, cpus)
    ecam = table.entry("pci").window("pci-ecam")
    # The reset register answers among the configuration ports (it has no window of its
    # own on the bus: see the platform table).
    pci = PciHost(reset_port, ecam_buses=ecam.length >> ECAM_BUS_SHIFT)
    platform = Platform(
        pic, ioapic, pit, port61, uart, rtc, i8042, acpi_pm, reset_port, fw_cfg, pci, table
    )
    models: dict[str, Device] = {
        "pic-master": pic.master_ports,
        "pic-slave": pic.slave_ports,
        "elcr": pic.elcr_ports,
        "pit": pit,
        "port61": port61,
        "com1": uart,
        "rtc": rtc,
        "i8042-data": i8042.data_port,
        "i8042-cmd": i8042.command_port,
        "pm1a-evt": acpi_pm.pm1_event_ports,
        "pm1a-cnt": acpi_pm.pm1_control_ports,
        "pm-tmr": acpi_pm.pm_timer_ports,
        "pci-conf": pci.config_ports,
        "pci-ecam": pci.ecam,
        "fw_cfg": fw_cfg,
        "ioapic": ioapic,
    }
    # A window (or a table entry) without its model, or a model without one, is a bug
    # here: fail while the machine is built, not at the guest's first access.
    if set(platform.models()) != set(table.entries):
        raise AssertionError(
            f"platform table devices {sorted(table.entries)} != models {sorted(platform.models())}"
        )
    windows = table.bus_windows()
    if {window.name for window in windows} != set(models):
        raise AssertionError(
            f"platform table windows {sorted(w.name for w in windows)}"
            f" != device models {sorted(models)}"
        )
    platform.mappings = [
        Mapping(window.space, window.base, window.length, models[window.name], window.name)
        for window in windows
    ]
    return platform


def cmos_memory_size_bytes(ram_size: int) -> dict[int, int]:
    """The CMOS memory-size fields a PC BIOS fills (extended memory in KiB and 64 KiB units)."""
    mib = 1 << 20
    extended_kib = min(max(ram_size - mib, 0) // 1024, 0xFFFF)
    above_16m = min(max(min(ram_size, layout.PCI_HOLE_START) - 16 * mib, 0) // (64 * 1024), 0xFFFF)
    return {
        0x15: 640 & 0xFF,
        0x16: 640 >> 8,
        0x17: extended_kib & 0xFF,
        0x18: extended_kib >> 8,
        0x30: extended_kib & 0xFF,
        0x31: extended_kib >> 8,
        0x34: above_16m & 0xFF,
        0x35: above_16m >> 8,
    }
