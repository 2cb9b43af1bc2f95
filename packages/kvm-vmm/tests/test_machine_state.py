"""The platform's state, saved by name into one JSON document and restored all or nothing
into a platform built as the machine builds it (kvm_vmm.platform.build_platform)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

import kvmfast
from kvm_devices.ioapic import msi_message
from kvm_devices.pc_testdev import PcTestdev
from kvm_devices.snapshot import StateError
from kvm_devices.testing import MemorySink, VirtualClock
from kvm_vmm import board, layout
from kvm_vmm.clock import TimerThread
from kvm_vmm.machine_state import (
    platform_devices,
    restore_machine_state,
    save_machine_state,
)
from kvm_vmm.platform import Platform, PlatformEvents, build_platform
from kvmfast.testing import require_kvm, set_lint0_extint

IOREGSEL = 0x00
IOWIN = 0x10
PIN = 4
VECTOR = 0x44


@dataclass
class RecordingVm:
    """A RoutingVm that keeps every route written and every GSI fired."""

    routes: list[tuple[int, int, int]] = field(default_factory=list)
    fired: list[int] = field(default_factory=list)

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routes.append((gsi, address, data))

    def irq_line(self, gsi: int, level: bool) -> int:
        self.fired.append(gsi)
        return 1

    def table(self) -> dict[int, tuple[int, int]]:
        """What KVM would hold: the last route written for each GSI."""
        return {gsi: (address, data) for gsi, address, data in self.routes}


def make(vm: Any, clock: VirtualClock) -> Platform:
    return build_platform(
        vm,
        cast(TimerThread, clock),  # the Clock and Timer interfaces, on virtual time
        MemorySink(),
        PlatformEvents(power_off=lambda: None, reset=lambda: None, extint=lambda level: None),
        ram_size=64 * layout.MIB,
        cpus=1,
    )


def program_pin(platform: Platform, pin: int, low: int) -> None:
    platform.ioapic.write(IOREGSEL, 4, 0x10 + 2 * pin)
    platform.ioapic.write(IOWIN, 4, low)


def drive(platform: Platform, clock: VirtualClock) -> None:
    """Move every device away from its power-on state."""
    platform.pic.master_ports.write(1, 1, 0xE0)
    platform.pic.elcr_ports.write(1, 1, 0x0E)
    program_pin(platform, PIN, VECTOR)  # unmasked, edge, fixed, APIC 0
    program_pin(platform, 9, 0x8000 | 0x49)  # level (the SCI), unmasked
    platform.pit.write(3, 1, 0x34)
    platform.pit.write(0, 1, 0xA9)
    platform.pit.write(0, 1, 0x04)
    platform.port61.write(0, 1, 0x01)
    platform.uart.write(3, 1, 0x83)
    platform.uart.write(0, 1, 0x01)
    platform.uart.write(3, 1, 0x03)
    platform.uart.receive(b"typed ahead")
    platform.rtc.write(0, 1, 0x40)
    platform.rtc.write(1, 1, 0x5A)
    platform.i8042.keyboard_input([0x1C, 0xF0, 0x1C])
    platform.acpi_pm.pm1_event_ports.write(2, 2, 0x0100)
    platform.reset_port.write(0, 1, 0x02)
    platform.fw_cfg.write(0, 2, 0x01)
    platform.fw_cfg.read(1, 1)
    platform.pci.config_ports.write(0, 4, 0x8000_0004)  # the host bridge's COMMAND
    platform.pci.config_ports.write(4, 2, 0x0006)
    clock.advance(2_000_000)


def test_a_saved_platform_is_restored_whole_through_json() -> None:
    clock = VirtualClock(1_000_000_000)
    old_vm, new_vm = RecordingVm(), RecordingVm()
    old = make(old_vm, clock)
    drive(old, clock)
    saved = save_machine_state(old)
    assert set(saved) == set(platform_devices(old))
    text = json.dumps(saved)

    new = make(new_vm, clock)
    assert save_machine_state(new) != saved
    sent_at_power_on = len(new_vm.routes)
    restore_machine_state(new, json.loads(text))

    assert save_machine_state(new) == saved
    # The routes are not in the state: KVM gets them again from the restored IOAPIC,
    # and ends with the table the old VM had.
    assert new_vm.table() == old_vm.table()
    assert new_vm.table()[PIN] == msi_message(VECTOR)
    assert {gsi for gsi, _, _ in new_vm.routes[sent_at_power_on:]} == {PIN, 9}
    new.ioapic.set_irq(PIN, True)
    assert new_vm.fired == [PIN]


@pytest.mark.parametrize(
    ("device", "change", "message"),
    [
        ("fw_cfg", {"offset": 99}, r"^fw_cfg state: offset: 99 is past"),
        ("rtc", {"index": 200}, r"^RTC state: index: 0xc8 is outside"),
        ("ioapic", {"redirection": [0] * 23}, r"^IOAPIC state: .*"),
        ("pic", {"master": {}}, r"^PIC state: master: missing field"),
    ],
)
def test_one_bad_device_state_restores_nothing(
    device: str, change: dict[str, object], message: str
) -> None:
    clock = VirtualClock(1_000_000_000)
    old = make(RecordingVm(), clock)
    drive(old, clock)
    saved = save_machine_state(old)
    part = saved[device]
    assert isinstance(part, dict)
    saved[device] = part | change
    new_vm = RecordingVm()
    new = make(new_vm, clock)
    before = save_machine_state(new)
    new_vm.routes.clear()
    with pytest.raises(StateError, match=message):
        restore_machine_state(new, saved)
    assert save_machine_state(new) == before
    assert new_vm.routes == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("com1"), r"^machine state: <top>: no state for device\(s\) com1$"),
        (lambda s: s.update(gpu={}), r"^machine state: <top>: state for unknown device\(s\) gpu$"),
    ],
)
def test_missing_or_foreign_devices_are_refused(edit: Any, message: str) -> None:
    clock = VirtualClock()
    platform = make(RecordingVm(), clock)
    state = save_machine_state(platform)
    edit(state)
    with pytest.raises(StateError, match=message):
        restore_machine_state(platform, state)
    with pytest.raises(StateError, match=r"^machine state: <top>: list is not a mapping"):
        restore_machine_state(platform, [])


def test_optional_devices_travel_with_the_platform() -> None:
    clock = VirtualClock()
    old = make(RecordingVm(), clock)
    testdev = PcTestdev(lambda irq, level: None)
    testdev.iomem.write(0x10, 4, 0xFEEDBEEF)
    saved = save_machine_state(old, {"pc-testdev": testdev})
    twin = PcTestdev(lambda irq, level: None)
    restore_machine_state(
        make(RecordingVm(), clock), json.loads(json.dumps(saved)), {"pc-testdev": twin}
    )
    assert twin.iomem.read(0x10, 4) == 0xFEEDBEEF
    with pytest.raises(StateError, match=r"no state for device\(s\) pc-testdev"):
        restore_machine_state(old, save_machine_state(old), {"pc-testdev": twin})
    with pytest.raises(ValueError, match="'pic' is a platform device's"):
        platform_devices(old, {"pic": twin})


LAPIC_IRR = 0x200


def irr_has(vcpu: kvmfast.Vcpu, vector: int) -> bool:
    page = vcpu.get_lapic()
    (word,) = struct.unpack_from("<I", page, LAPIC_IRR + 0x10 * (vector // 32))
    return bool(word >> (vector % 32) & 1)


@pytest.mark.kvm
def test_restored_routes_reach_the_local_apic_of_a_new_vm() -> None:
    """KVM API: KVM_SET_GSI_ROUTING has no GET; the new VM's routes come from the restored
    IOAPIC, and a pin's delivery lands in the LAPIC's IRR (Intel SDM Vol. 3A 11.8.4)."""
    require_kvm()
    kvm = kvmfast.Kvm()
    clock = VirtualClock()
    old = make(kvm.create_vm("split", board.IOAPIC_PINS), clock)
    program_pin(old, PIN, VECTOR)
    saved = json.loads(json.dumps(save_machine_state(old)))

    new_vm = kvm.create_vm("split", board.IOAPIC_PINS)
    vcpu = new_vm.create_vcpu(0)
    set_lint0_extint(vcpu)  # software-enables the LAPIC, which then accepts fixed IRQs
    new = make(new_vm, clock)
    new.ioapic.set_irq(PIN, True)  # masked at power-on: nothing is delivered
    new.ioapic.set_irq(PIN, False)
    assert not irr_has(vcpu, VECTOR)
    restore_machine_state(new, saved)
    new.ioapic.set_irq(PIN, True)
    assert irr_has(vcpu, VECTOR)
