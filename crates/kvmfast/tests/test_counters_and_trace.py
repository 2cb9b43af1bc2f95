"""Counters count every exit exactly, per vCPU and summed per VM; the trace hook sees
each exit with its access (address, size, direction, value)."""

from __future__ import annotations

import pytest
from kvmfast_guest_support import EXIT_SEQUENCE, MMIO_BASE, RecordingDevice, boot_guest

from kvmfast import Kvm, NullSink

pytestmark = pytest.mark.kvm

PORT_80_VALUE = 0x5A  # a constant the guest loads, so the trace's value can be checked

GUEST = f"""
    mov al, {PORT_80_VALUE:#x}
    mov ecx, 10
writes:
    out 0x80, al
    dec ecx
    jnz writes
    mov dx, 0x90
    in al, dx
    in ax, dx
    out dx, eax
    mov rbx, {MMIO_BASE:#x}
    mov dword ptr [rbx], 0x12345678
    mov qword ptr [rbx + 8], rbx
    mov rax, [rbx + 0x10000]
    mov al, 3
    {EXIT_SEQUENCE}
"""


def test_counters_are_exact(kvm: Kvm) -> None:
    guest = boot_guest(kvm, GUEST)
    guest.vm.add_pio(0x80, 1, NullSink())
    guest.vm.add_mmio(MMIO_BASE, 0x1000, RecordingDevice())
    exit = guest.vcpu.run()
    assert (exit.reason, exit.value) == ("device_exit", 3)
    expected = {
        "exits": {"io": 14, "mmio": 3},
        "pio": {0x80: 10, 0xF4: 1},
        "mmio": {MMIO_BASE: 2},
        "unmapped_pio": 3,
        "unmapped_mmio": 1,
        "lint1_nmi": 0,
        "completions": {},
        "emulation_exceptions": {},
        "quirk_repairs": {},
    }
    assert guest.vcpu.counters() == expected
    assert guest.vm.counters() == expected


def test_trace_hook_sees_every_exit_and_can_be_turned_off(kvm: Kvm) -> None:
    guest = boot_guest(kvm, GUEST)
    guest.vm.add_mmio(MMIO_BASE, 0x1000, RecordingDevice(answer=lambda offset, size: 0))
    trace: list[tuple[str, int, int, bool, int]] = []
    guest.vcpu.set_trace(lambda *record: trace.append(record))
    guest.vcpu.run()
    assert len(trace) == 17
    assert trace[:10] == [("io", 0x80, 1, True, PORT_80_VALUE)] * 10
    assert trace[10:13] == [
        ("io", 0x90, 1, False, 0xFF),
        ("io", 0x90, 2, False, 0xFFFF),
        ("io", 0x90, 4, True, 0xFFFF),
    ]
    assert trace[13:16] == [
        ("mmio", MMIO_BASE, 4, True, 0x12345678),
        ("mmio", MMIO_BASE + 8, 8, True, MMIO_BASE),
        ("mmio", MMIO_BASE + 0x10000, 8, False, 0xFFFF_FFFF_FFFF_FFFF),
    ]
    assert trace[16] == ("io", 0xF4, 1, True, 3)

    again = boot_guest(kvm, GUEST)
    again.vcpu.set_trace(lambda *record: trace.append(record))
    again.vcpu.set_trace(None)
    again.vcpu.run()
    assert len(trace) == 17


def test_a_raising_trace_hook_stops_run(kvm: Kvm) -> None:
    guest = boot_guest(kvm, GUEST)

    def trace(*record: object) -> None:
        raise LookupError("trace failed")

    guest.vcpu.set_trace(trace)
    with pytest.raises(LookupError):
        guest.vcpu.run()
    assert guest.vcpu.counters()["exits"] == {"io": 1}
