"""Port and MMIO exits reach the owning handler with the access's offset, width and
value (KVM API doc 5: KVM_EXIT_IO, KVM_EXIT_MMIO); string I/O moves count elements
through data_offset; unmapped reads are all-ones (an undecoded ISA/PCI bus)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import pytest
from kvmfast_guest_support import (
    EXIT_SEQUENCE,
    MMIO_BASE,
    RecordingDevice,
    boot_guest,
)

from kvmfast import Kvm, NullSink

pytestmark = pytest.mark.kvm


def test_port_round_trips_of_every_width(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        mov dx, 0x61
        mov al, 0x11
        out dx, al
        mov ax, 0x2233
        out dx, ax
        mov eax, 0x44556677
        out dx, eax
        in al, dx
        mov [0x6000], al
        in ax, dx
        mov [0x6002], ax
        in eax, dx
        mov [0x6004], eax
        {EXIT_SEQUENCE}
        """,
    )
    device = RecordingDevice(answer=lambda offset, size: 0xA1B2C3D4 >> (8 * (4 - size)))
    guest.vm.add_pio(0x60, 8, device)
    exit = guest.vcpu.run()
    assert exit.reason == "device_exit"
    assert device.log == [
        ("write", 1, 1, 0x11),
        ("write", 1, 2, 0x2233),
        ("write", 1, 4, 0x44556677),
        ("read", 1, 1, 0xA1),
        ("read", 1, 2, 0xA1B2),
        ("read", 1, 4, 0xA1B2C3D4),
    ]
    assert guest.vm.read(0x6000, 1) == b"\xa1"
    assert guest.vm.read(0x6002, 2) == (0xA1B2).to_bytes(2, "little")
    assert guest.vm.read(0x6004, 4) == (0xA1B2C3D4).to_bytes(4, "little")


def test_mmio_round_trips_of_every_width_including_8(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        mov rbx, {MMIO_BASE + 0x10:#x}
        mov byte ptr [rbx], 0x11
        mov word ptr [rbx + 2], 0x2233
        mov dword ptr [rbx + 4], 0x44556677
        mov rax, 0x8899aabbccddeeff
        mov [rbx + 8], rax
        movzx eax, byte ptr [rbx]
        mov [0x6000], eax
        movzx eax, word ptr [rbx + 2]
        mov [0x6004], eax
        mov eax, [rbx + 4]
        mov [0x6008], eax
        mov rax, [rbx + 8]
        mov [0x6010], rax
        {EXIT_SEQUENCE}
        """,
    )
    device = RecordingDevice(answer=lambda offset, size: 0x0102030405060708 + offset)
    guest.vm.add_mmio(MMIO_BASE, 0x1000, device)
    assert guest.vcpu.run().reason == "device_exit"
    assert device.log[:4] == [
        ("write", 0x10, 1, 0x11),
        ("write", 0x12, 2, 0x2233),
        ("write", 0x14, 4, 0x44556677),
        ("write", 0x18, 8, 0x8899AABBCCDDEEFF),
    ]
    assert [(kind, offset, size) for kind, offset, size, _ in device.log[4:]] == [
        ("read", 0x10, 1),
        ("read", 0x12, 2),
        ("read", 0x14, 4),
        ("read", 0x18, 8),
    ]
    # Reads are cut to their width before the guest sees them.
    assert guest.vm.read(0x6000, 4) == (0x18).to_bytes(4, "little")
    assert guest.vm.read(0x6004, 4) == (0x071A).to_bytes(4, "little")
    assert guest.vm.read(0x6008, 4) == (0x0506071C).to_bytes(4, "little")
    assert guest.vm.read(0x6010, 8) == (0x0102030405060720).to_bytes(8, "little")


def test_string_io_rep_outsb_and_rep_insw(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        cld
        lea rsi, [rip + message]
        mov ecx, 5
        mov dx, 0x80
        rep outsb
        mov rdi, 0x6000
        mov ecx, 4
        mov dx, 0x82
        rep insw
        {EXIT_SEQUENCE}
    message:
        .ascii "hello"
        """,
    )
    sent = RecordingDevice()
    words = iter([0x1111, 0x2222, 0x3333, 0x4444])
    received = RecordingDevice(answer=lambda offset, size: next(words))
    guest.vm.add_pio(0x80, 1, sent)
    guest.vm.add_pio(0x82, 2, received)
    assert guest.vcpu.run().reason == "device_exit"
    assert [value for _, _, _, value in sent.log] == list(b"hello")
    assert {(kind, offset, size) for kind, offset, size, _ in sent.log} == {("write", 0, 1)}
    assert [(kind, size) for kind, _, size, _ in received.log] == [("read", 2)] * 4
    assert guest.vm.read(0x6000, 8) == bytes.fromhex("1111222233334444")
    # KVM's emulator reads string INs ahead (emulate.c, pio_in_emulated): the four
    # words arrive in one exit with count > 1, through data_offset.
    pio = guest.vcpu.counters()["pio"]
    assert pio[0x82] < 4


def test_unmapped_and_null_sink_reads_are_all_ones(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        mov dx, 0x300
        in eax, dx
        mov [0x6000], eax
        mov dx, 0x310
        in ax, dx
        mov [0x6004], ax
        out dx, ax
        mov rbx, {MMIO_BASE:#x}
        mov rax, [rbx]
        mov [0x6008], rax
        mov byte ptr [rbx], 1
        {EXIT_SEQUENCE}
        """,
    )
    guest.vm.add_pio(0x310, 2, NullSink())
    guest.vm.write(0x6000, bytes(16))
    assert guest.vcpu.run().reason == "device_exit"
    assert guest.vm.read(0x6000, 4) == b"\xff" * 4
    assert guest.vm.read(0x6004, 2) == b"\xff" * 2
    assert guest.vm.read(0x6008, 8) == b"\xff" * 8
    counters = guest.vcpu.counters()
    assert counters["unmapped_pio"] == 1
    assert counters["unmapped_mmio"] == 2
    assert counters["pio"][0x310] == 2


def test_a_handler_exception_propagates_and_the_vcpu_can_go_on(kvm: Kvm) -> None:
    guest = boot_guest(
        kvm,
        f"""
        mov dx, 0x70
        in al, dx
        mov [0x6000], al
        in al, dx
        mov [0x6001], al
        {EXIT_SEQUENCE}
        """,
    )
    answers: Iterator[RuntimeError | int] = iter([RuntimeError("device broke"), 0x5A])

    class FlakyDevice:
        def read(self, offset: int, size: int) -> int:
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    guest.vm.add_pio(0x70, 2, FlakyDevice())
    with pytest.raises(RuntimeError, match="device broke"):
        guest.vcpu.run()
    # The failed IN completes with all-ones; the next one gets the device's answer.
    assert guest.vcpu.run().reason == "device_exit"
    assert guest.vm.read(0x6000, 2) == b"\xff\x5a"


def test_run_once_reports_single_exits(kvm: Kvm) -> None:
    guest = boot_guest(kvm, f"mov al, 0x42\nout 0x80, al\n{EXIT_SEQUENCE}")
    device = RecordingDevice()
    guest.vm.add_pio(0x80, 1, device)
    first = guest.vcpu.run_once()
    assert (first.reason, first.value, first.data) == ("io", 0x80, [1, 1, 0x42])
    assert device.log == [("write", 0, 1, 0x42)]
    assert guest.vcpu.run_once().reason == "device_exit"


def test_overlapping_ranges_are_refused_and_removal_unmaps(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.add_pio(0x60, 4, NullSink())
    for base, length in [(0x5F, 2), (0x63, 1), (0x40, 0x40)]:
        with pytest.raises(ValueError, match="overlaps"):
            vm.add_pio(base, length, NullSink())
    vm.add_pio(0x64, 1, NullSink())
    with pytest.raises(ValueError):
        vm.add_pio(0xFFFF, 2, NullSink())
    with pytest.raises(ValueError):
        vm.add_pio(0x100, 0, NullSink())
    vm.add_mmio(MMIO_BASE, 0x1000, NullSink())
    with pytest.raises(ValueError, match="overlaps"):
        vm.add_mmio(MMIO_BASE + 0xFFF, 1, NullSink())
    with pytest.raises(ValueError):
        vm.remove_pio(0x61)
    vm.remove_pio(0x60)
    vm.add_pio(0x5F, 2, NullSink())
    vm.remove_mmio(MMIO_BASE)
    vm.add_mmio(MMIO_BASE + 0xFFF, 1, NullSink())


def test_handlers_must_be_devices_or_sinks(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    with pytest.raises(TypeError):
        vm.add_pio(0x60, 1, object())  # type: ignore[arg-type]


class _KeptWrite(Exception):
    """Used as a device's write(): BaseException keeps the very argument tuple it is
    called with as .args, and __init__ keeps the instance, so kvmfast's tuples stay
    referenced after each call."""

    kept: ClassVar[list[_KeptWrite]] = []

    def __init__(self, *args: int) -> None:
        # No BaseException.__init__: it would replace .args with this call's own tuple.
        _KeptWrite.kept.append(self)


class _DeviceKeepingItsArguments:
    write = _KeptWrite

    def read(self, offset: int, size: int) -> int:
        return 0


def test_argument_tuples_a_handler_keeps_are_never_refilled(kvm: Kvm) -> None:
    """kvmfast refills a handler's argument tuple for the next call only when nothing
    else holds it; one a handler kept must keep its values."""
    guest = boot_guest(
        kvm,
        f"""
        mov dx, 0x61
        mov al, 0x11
        out dx, al
        mov al, 0x22
        out dx, al
        mov al, 0x33
        out dx, al
        {EXIT_SEQUENCE}
        """,
    )
    _KeptWrite.kept.clear()
    guest.vm.add_pio(0x60, 8, _DeviceKeepingItsArguments())
    assert guest.vcpu.run().reason == "device_exit"
    assert [kept.args for kept in _KeptWrite.kept] == [(1, 1, 0x11), (1, 1, 0x22), (1, 1, 0x33)]
