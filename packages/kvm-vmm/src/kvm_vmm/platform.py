"""The legacy PC platform of the machine: which device answers where, on which IRQ.

This module only builds the devices and says where they go; the machine maps
them into kvmfast's address map and owns their lifetimes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from kvm_devices.acpi_pm import AcpiPm
from kvm_devices.fw_cfg import FwCfg
from kvm_devices.i8042 import I8042
from kvm_devices.interfaces import ByteSink, Device
from kvm_devices.ioapic import Ioapic
from kvm_devices.pic import PicPair
from kvm_devices.pit import Pit
from kvm_devices.port61 import Port61
from kvm_devices.reset_port import ResetPort
from kvm_devices.rtc import Rtc
from kvm_devices.uart import Uart16550
from kvm_vmm.clock import TimerThread
from kvm_vmm.interrupts import IsaIrqLine, KvmIoapicSink, RoutingVm

SCI_IRQ = 9
RTC_IRQ = 8
KEYBOARD_IRQ = 1
MOUSE_IRQ = 12

AddressSpace = Literal["pio", "mmio"]


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
    mappings: list[Mapping] = field(default_factory=list)

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
    pic = PicPair(intr=events.extint)
    ioapic = Ioapic(KvmIoapicSink(vm), timer=timers, clock=timers)

    def isa_line(irq: int) -> IsaIrqLine:
        return IsaIrqLine(irq, pic, ioapic)

    pit = Pit(timers, timers, isa_line(0))
    port61 = pit.port61
    uart = Uart16550(isa_line(Uart16550.COM1_IRQ), console)
    rtc = Rtc(timers, timers, isa_line(RTC_IRQ), cmos=cmos_memory_size_bytes(ram_size))
    i8042 = I8042(
        reset_request=events.reset, irq1=isa_line(KEYBOARD_IRQ), irq12=isa_line(MOUSE_IRQ)
    )

    def on_sleep(sleep_type: int) -> None:
        if sleep_type == AcpiPm.SLP_TYP_S5:
            events.power_off()

    acpi_pm = AcpiPm(timers, timers, isa_line(SCI_IRQ), on_sleep)
    reset_port = ResetPort(events.reset)
    fw_cfg = FwCfg(ram_size, cpus)
    platform = Platform(pic, ioapic, pit, port61, uart, rtc, i8042, acpi_pm, reset_port, fw_cfg)
    platform.mappings = [
        Mapping("pio", PicPair.MASTER_BASE, PicPair.MASTER_LENGTH, pic.master_ports, "pic-master"),
        Mapping("pio", PicPair.SLAVE_BASE, PicPair.SLAVE_LENGTH, pic.slave_ports, "pic-slave"),
        Mapping("pio", PicPair.ELCR_BASE, PicPair.ELCR_LENGTH, pic.elcr_ports, "elcr"),
        Mapping("pio", Pit.BASE, Pit.LENGTH, pit, "pit"),
        Mapping("pio", Port61.BASE, Port61.LENGTH, port61, "port61"),
        Mapping("pio", Uart16550.COM1, Uart16550.SIZE, uart, "com1"),
        Mapping("pio", Rtc.BASE, Rtc.LENGTH, rtc, "rtc"),
        Mapping("pio", I8042.DATA_BASE, I8042.DATA_LENGTH, i8042.data_port, "i8042-data"),
        Mapping("pio", I8042.COMMAND_BASE, I8042.COMMAND_LENGTH, i8042.command_port, "i8042-cmd"),
        Mapping("pio", AcpiPm.PM1A_EVT_BLK, 4, acpi_pm.pm1_event_ports, "pm1a-evt"),
        Mapping("pio", AcpiPm.PM1A_CNT_BLK, 2, acpi_pm.pm1_control_ports, "pm1a-cnt"),
        Mapping("pio", AcpiPm.PM_TMR_BLK, 4, acpi_pm.pm_timer_ports, "pm-tmr"),
        Mapping("pio", ResetPort.BASE, 1, reset_port, "reset"),
        Mapping("pio", FwCfg.BASE, FwCfg.LENGTH, fw_cfg, "fw_cfg"),
        Mapping("mmio", Ioapic.BASE, Ioapic.SIZE, ioapic, "ioapic"),
    ]
    return platform


def cmos_memory_size_bytes(ram_size: int) -> dict[int, int]:
    """The CMOS memory-size fields a PC BIOS fills (extended memory in KiB and 64 KiB units)."""
    mib = 1 << 20
    extended_kib = min(max(ram_size - mib, 0) // 1024, 0xFFFF)
    above_16m = min(max(min(ram_size, 0xC000_0000) - 16 * mib, 0) // (64 * 1024), 0xFFFF)
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
