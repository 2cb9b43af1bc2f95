"""The device lock rule (docs/architecture.md, "Device locks"): a device never calls out
(an interrupt line, the IOAPIC sink, a byte sink, a callback) while holding its own lock.

Each fake below, when the device calls it, asks another thread to enter the same device
(a ``save()``, which takes the device's lock). If the device still held its lock, that
thread would wait: under the old rule (callouts under a re-entrant lock) it did, which is
how a VMM thread serving a line could deadlock against a vCPU inside the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kvm_devices.acpi_pm import PWRBTN_EN, SLP_EN, AcpiPm
from kvm_devices.i8042 import I8042
from kvm_devices.ioapic import Ioapic
from kvm_devices.outbox import Outbox
from kvm_devices.pc_testdev import PcTestdev
from kvm_devices.pci.config_space import PciConfigSpace
from kvm_devices.pci.host_bridge import PciHost
from kvm_devices.pci.msix import MsixTable
from kvm_devices.pic import PicPair
from kvm_devices.pit import Pit
from kvm_devices.port61 import Port61
from kvm_devices.reset_port import ResetPort
from kvm_devices.rtc import Rtc
from kvm_devices.testing import VirtualClock
from kvm_devices.uart import Uart16550

WAIT_S = 2.0


@dataclass
class Probe:
    """Records, for each call out of the device, whether another thread could enter it."""

    enter: Callable[[], object] = lambda: None
    results: list[bool] = field(default_factory=list)

    def __call__(self, *args: object) -> None:
        entered = threading.Event()

        def run() -> None:
            self.enter()
            entered.set()

        threading.Thread(target=run, daemon=True).start()
        self.results.append(entered.wait(WAIT_S))

    # The interfaces' method names, so that one probe serves as any of them.
    def set_level(self, level: bool) -> None:
        self(level)

    def pulse(self) -> None:
        self()

    def write_bytes(self, data: bytes) -> None:
        self(data)

    def route_changed(self, pin: int, address: int, data: int, masked: bool) -> None:
        self(pin)

    def deliver(self, pin: int) -> None:
        self(pin)


def pic(probe: Probe) -> None:
    device = PicPair(probe)
    probe.enter = device.save
    device.master_ports.write(1, 1, 0x00)  # OCW1: unmask everything
    device.set_irq(1, True)  # INTR rises


def pit(probe: Probe) -> None:
    clock = VirtualClock()
    device = Pit(clock, clock, probe)
    probe.enter = device.save
    device.write(3, 1, 0x30)  # counter 0, mode 0
    device.write(0, 1, 0x10)
    device.write(0, 1, 0x00)
    clock.advance(1_000_000)  # OUT0 rises


def port61(probe: Probe) -> None:
    @dataclass
    class Counters:
        def set_gate(self, channel: int, level: bool) -> None:
            probe(channel, level)

        def out(self, channel: int) -> bool:
            probe(channel)
            return False

    clock = VirtualClock()
    device = Port61(clock, Counters())
    probe.enter = device.save
    device.write(0, 1, 0x01)
    device.read(0, 1)


def ioapic(probe: Probe) -> None:
    device = Ioapic(probe)
    probe.enter = device.save
    device.write(0, 4, 0x10 + 2 * 5)
    device.write(0x10, 4, 0x0031)  # unmask pin 5, edge, vector 0x31: a route change
    device.set_irq(5, True)  # a delivery


def uart(probe: Probe) -> None:
    device = Uart16550(probe, probe)
    probe.enter = device.save
    device.write(4, 1, 0x08)  # OUT2
    device.write(1, 1, 0x02)  # THRE interrupt: the line rises
    device.write(0, 1, ord("x"))  # a byte to the sink


def rtc(probe: Probe) -> None:
    clock = VirtualClock()
    device = Rtc(clock, clock, probe, wall_time_ns=clock.now_ns)
    probe.enter = device.save
    device.write(0, 1, 0x0B)
    device.write(1, 1, 0x42)  # PIE
    clock.advance(10_000_000)  # a periodic interrupt raises IRQ8


def i8042(probe: Probe) -> None:
    device = I8042(probe, irq1=probe)
    probe.enter = device.save
    device.keyboard_input([0x1C])  # IRQ1 rises
    device.command_port.write(0, 1, 0xFE)  # pulse the reset line


def acpi_pm(probe: Probe) -> None:
    clock = VirtualClock()
    device = AcpiPm(clock, clock, probe, probe)
    probe.enter = device.save
    device.pm1_event_ports.write(2, 2, PWRBTN_EN)
    device.press_power_button()  # SCI rises
    device.pm1_control_ports.write(0, 2, SLP_EN | (5 << 10))  # on_sleep(5)


def pc_testdev(probe: Probe) -> None:
    device = PcTestdev(probe)
    probe.enter = device.save
    device.irq_ports.write(3, 1, 1)


def reset_port(probe: Probe) -> None:
    device = ResetPort(probe)
    probe.enter = device.save
    device.write(0, 1, 0x06)


def pci_config_space(probe: Probe) -> None:
    device = PciConfigSpace(vendor_id=0x1AF4, device_id=0x1042, class_code=0x010000)
    device.add_memory_bar(0, 0x1000)
    device.on_bars_changed = probe
    probe.enter = device.save
    device.write(0x10, 4, 0xC000_0000)  # the BAR moves
    device.write(0x04, 2, 0x0002)  # memory decode on


def msix(probe: Probe) -> None:
    @dataclass
    class Sink:
        def vector_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
            probe(vector)

        def fire(self, vector: int) -> None:
            probe(vector)

    device = MsixTable(2, 0, 0, 0, 0x800, Sink())
    probe.enter = device.save
    device.table_write(0, 8, 0xFEE0_0000)  # a message change
    device.write_capability(0, 2, 0x8000)  # enable: vector 1 stays masked
    device.signal(1)  # held pending
    device.table_write(0x1C, 4, 0)  # unmasked: changed, then fired
    device.signal(1)  # fired at once


def pci_host(probe: Probe) -> None:
    @dataclass
    class ResetRegister:
        def read(self, offset: int, size: int) -> int:
            probe(offset)
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            probe(value)

    device = PciHost(ResetRegister())
    probe.enter = device.save
    device.config_ports.write(0, 4, 0x8000_0000)
    device.config_ports.write(1, 1, 0x06)  # the reset register at 0xCF9
    device.config_ports.read(1, 1)


@pytest.mark.parametrize(
    "drive",
    [
        pic,
        pit,
        port61,
        ioapic,
        uart,
        rtc,
        i8042,
        acpi_pm,
        pc_testdev,
        reset_port,
        pci_config_space,
        msix,
        pci_host,
    ],
)
def test_no_device_calls_out_while_holding_its_lock(drive: Callable[[Probe], None]) -> None:
    probe = Probe()
    drive(probe)
    assert probe.results, "the device made no call out: the test drove nothing"
    assert all(probe.results), f"calls made under the device's lock: {probe.results}"


# -- the outbox ------------------------------------------------------------------------


def test_outbox_makes_calls_in_post_order_including_ones_posted_by_a_call() -> None:
    lock = threading.Lock()
    outbox = Outbox(lock)
    made: list[int] = []

    def first() -> None:
        made.append(1)
        with lock:
            outbox.post(lambda: made.append(3))
        outbox.flush()  # re-entrant: the loop below makes it, after 2
        made.append(2)

    with lock:
        outbox.post(first)
    outbox.flush()
    assert made == [1, 2, 3]


def test_a_second_thread_leaves_its_calls_to_the_flushing_one_in_order() -> None:
    lock = threading.Lock()
    outbox = Outbox(lock)
    made: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def slow() -> None:
        inside.set()
        release.wait(WAIT_S)
        made.append("slow")

    with lock:
        outbox.post(slow)
    flusher = threading.Thread(target=outbox.flush)
    flusher.start()
    assert inside.wait(WAIT_S)
    with lock:
        outbox.post(lambda: made.append("later"))
    outbox.flush()  # returns at once: the other thread is flushing
    assert made == []
    release.set()
    flusher.join(WAIT_S)
    assert made == ["slow", "later"]


def test_a_failing_call_leaves_the_outbox_usable() -> None:
    lock = threading.Lock()
    outbox = Outbox(lock)
    made: list[int] = []

    def boom() -> None:
        raise RuntimeError("line failed")

    with lock:
        outbox.post(boom)
        outbox.post(lambda: made.append(1))
    with pytest.raises(RuntimeError):
        outbox.flush()
    outbox.flush()
    assert made == [1]
