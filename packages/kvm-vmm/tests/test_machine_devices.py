"""The machine's devices by name, devices of the user's own at a port or MMIO range with
an ISA IRQ, the error a raising device ends the run with, and save_state/restore_state.

Small long-mode guests: they enable the LAPIC, route ISA IRQ 3 through the IOAPIC to a
vector of their own (Intel SDM Vol. 3A 11.4.7.1 SVR; 82093AA IOAPIC datasheet 3.2.4
redirection table), print on COM1 and leave through isa-debug-exit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kvm_devices.debug_exit import DebugExit
from kvm_devices.interfaces import InterruptLine
from kvm_devices.pc_testdev import PcTestdev
from kvm_devices.snapshot import Snapshotting, state_from_data
from kvm_vmm import layout
from kvm_vmm.added_devices import DeviceAccessError
from kvm_vmm.interrupts import IsaIrqLine
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import (
    STATUS_GUEST_CRASHED,
    Machine,
    MachineConfig,
    MachineConfigError,
    MachineState,
    MachineStateError,
)
from kvm_vmm.machine_state import NotSnapshottable
from kvm_vmm.resources import ResourceConflict, ResourceError
from kvmfast.testing import assemble_program, require_kvm

LOAD_ADDRESS = 0x100000
BELL_PORT = 0x3E0
REGS_BASE = 0xD000_0000
VECTOR = 0x33
FREE_ISA_IRQ = 3  # the lowest ISA IRQ that no board device, the cascade or a reserve holds
DEBUG_EXIT_STATUS = 1  # the guests write 0: isa-debug-exit's (0 << 1) | 1

# Sets up IRQ 3 -> IOAPIC pin 3 -> VECTOR (edge, fixed, APIC 0), whose handler prints
# "!" on COM1 and sets `rung`, then jumps to the test's `main`.
PRELUDE = f"""
.global entry
entry:
    lea rsp, [rip + stack_top]
    lea rax, [rip + on_bell]
    lea rdi, [rip + idt + {VECTOR} * 16]
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], cs
    mov word ptr [rdi + 4], 0x8E00
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    lidt [rip + idt_descriptor]
    mov al, 0xFF
    out 0x21, al
    out 0xA1, al
    mov eax, 0xFEE000F0
    mov dword ptr [rax], 0x1FF
    mov ebx, 0xFEC00000
    mov dword ptr [rbx], 0x10 + 2 * {FREE_ISA_IRQ}
    mov dword ptr [rbx + 0x10], {VECTOR}
    mov dword ptr [rbx], 0x11 + 2 * {FREE_ISA_IRQ}
    mov dword ptr [rbx + 0x10], 0
    sti
    jmp main
on_bell:
    push rax
    push rdx
    mov dx, 0x3F8
    mov al, '!'
    out dx, al
    mov byte ptr [rip + rung], 1
    mov eax, 0xFEE000B0
    mov dword ptr [rax], 0
    pop rdx
    pop rax
    iretq
finish:
    xor eax, eax
    out 0xF4, al
    hlt
    .balign 16
idt: .fill 512, 8, 0
idt_descriptor:
    .word 256 * 16 - 1
    .quad idt
rung: .byte 0
    .balign 16
    .fill 4096, 1, 0
stack_top:
"""

# Stores a word in the register device and prints it back, then rings the bell and
# waits for its interrupt.
RING_ONCE = """
main:
    mov ebx, 0xD0000000
    mov dword ptr [rbx + 8], 0x41424344
    mov eax, dword ptr [rbx + 8]
    mov dx, 0x3F8
    mov ecx, 4
1:  out dx, al
    shr eax, 8
    loop 1b
    mov dx, 0x3E0
    out dx, al
2:  cmp byte ptr [rip + rung], 0
    je 2b
    jmp finish
"""

ITERATIONS = 40_000
# Prints 'a' + n % 26 for each count n the counter device gives; every 64th count rings
# the bell and waits for its "!".
COUNT = f"""
main:
    mov ebx, 0xD0000000
    mov r12d, {ITERATIONS}
1:  mov eax, dword ptr [rbx]
    mov ecx, eax
    xor edx, edx
    mov esi, 26
    div esi
    lea eax, [rdx + 'a']
    mov dx, 0x3F8
    out dx, al
    test ecx, 63
    jnz 3f
    mov byte ptr [rip + rung], 0
    mov dx, 0x3E0
    out dx, al
2:  cmp byte ptr [rip + rung], 0
    je 2b
3:  dec r12d
    jnz 1b
    jmp finish
"""


@dataclass
class Registers:
    """A few registers, each read back as written (0 until then)."""

    values: dict[int, int] = field(default_factory=dict)

    def read(self, offset: int, size: int) -> int:
        return self.values.get(offset, 0) & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.values[offset] = value


@dataclass
class NoState:
    pass


class Bell(Snapshotting[NoState]):
    """Any write pulses the device's IRQ line (given once the device is added)."""

    def __init__(self) -> None:
        self.line: InterruptLine | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        assert self.line is not None
        self.line.pulse()

    def save_state(self) -> NoState:
        return NoState()

    def check_state(self, data: object) -> NoState:
        return state_from_data(NoState, data, "bell")

    def restore_state(self, state: NoState) -> None:
        """Nothing to restore."""


@dataclass
class CounterState:
    count: int


class Counter(Snapshotting[CounterState]):
    """Each read returns the count, then counts one more."""

    def __init__(self) -> None:
        self.count = 0

    def read(self, offset: int, size: int) -> int:
        self.count += 1
        return self.count - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def save_state(self) -> CounterState:
        return CounterState(self.count)

    def check_state(self, data: object) -> CounterState:
        return state_from_data(CounterState, data, "counter")

    def restore_state(self, state: CounterState) -> None:
        self.count = state.count


@dataclass
class Flaky:
    """Raises on every access, as a buggy device of the user's might."""

    answer: object = None
    error: BaseException = field(default_factory=lambda: ValueError("boom"))

    def read(self, offset: int, size: int) -> int:
        if self.answer is None:
            raise self.error
        return self.answer  # type: ignore[return-value]

    def write(self, offset: int, size: int, value: int) -> None:
        raise self.error


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    require_kvm()
    built: list[Machine] = []
    yield built
    for machine in built:
        machine.close()


def _machine(machines: list[Machine], main: str | None = None, *, cpus: int = 1) -> Machine:
    machine = Machine(MachineConfig(memory_size=16 * layout.MIB, cpus=cpus))
    machines.append(machine)
    if main is not None:
        program = assemble_program(PRELUDE + main, origin=LOAD_ADDRESS)
        machine.write_memory(LOAD_ADDRESS, program.code)
        machine.enter(EntryState("long64", program.symbols["entry"]))
    return machine


def _add_bell_and_counter(machine: Machine) -> tuple[Bell, Counter]:
    machine.add_device_option("isa-debug-exit")
    bell, counter = Bell(), Counter()
    bell.line = machine.add_device(bell, name="bell", pio=(BELL_PORT, 1), irq="auto").line
    machine.add_device(counter, name="counter", mmio=(REGS_BASE, 0x1000))
    return bell, counter


def test_every_device_is_there_by_its_platform_table_name(machines: list[Machine]) -> None:
    machine = _machine(machines)
    platform = machine.platform
    assert machine.devices["com1"] is platform.uart
    assert machine.devices["pic"] is platform.pic
    assert machine.devices["ioapic"] is platform.ioapic
    assert machine.devices["acpi-pm"] is platform.acpi_pm
    assert set(machine.devices) == set(platform.table.entries)
    assert machine.add_device_option("isa-debug-exit") is machine.devices["isa-debug-exit"]
    machine.add_device_option("isa-debug-exit,iobase=0x501,iosize=1")
    testdev = machine.add_device_option("pc-testdev")
    assert isinstance(testdev, PcTestdev)
    assert machine.devices["pc-testdev"] is testdev
    # pc-testdev's five windows are one device in the table, as in the mapping.
    assert len(platform.table.entry("pc-testdev").windows) == 5
    assert isinstance(machine.devices["isa-debug-exit#2"], DebugExit)
    assert set(machine.devices) == set(platform.table.entries)
    with pytest.raises(TypeError):
        machine.devices["com1"] = object()  # type: ignore[index]


def test_a_device_of_the_users_own_raises_an_irq_the_guest_takes_through_the_ioapic(
    machines: list[Machine],
) -> None:
    machine = _machine(machines, RING_ONCE)
    machine.add_device_option("isa-debug-exit")
    bell, registers = Bell(), Registers()
    added = machine.add_device(bell, name="bell", pio=(BELL_PORT, 1), irq="auto")
    assert added.irq == FREE_ISA_IRQ and isinstance(added.line, IsaIrqLine)
    assert machine.platform.table.entry("bell").irqs == (FREE_ISA_IRQ,)
    bell.line = added.line
    plain = machine.add_device(registers, name="regs", mmio=(REGS_BASE, 0x1000))
    assert plain.irq is None and plain.line is None
    assert machine.devices["bell"] is bell and machine.devices["regs"] is registers

    outcome = machine.run(60)

    assert outcome.status == DEBUG_EXIT_STATUS, outcome
    assert machine.serial.transcript() == b"DCBA!"
    assert registers.values == {8: 0x41424344}
    by_device = machine.stats()["exits_by_device"]
    assert isinstance(by_device, dict)
    # Every access is counted under the name of the device that took it; every device
    # is named, with 0 when the guest never reached it.
    touched = {"ioapic": 4, "pic": 2, "regs": 2, "com1": 5, "bell": 1, "isa-debug-exit": 1}
    assert by_device == touched | dict.fromkeys(set(machine.devices) - set(touched), 0)


def test_a_taken_name_range_or_line_is_refused_and_nothing_is_added(
    machines: list[Machine],
) -> None:
    machine = _machine(machines)
    registers = Registers()
    table = machine.platform.table
    with pytest.raises(ResourceConflict, match=r"^mine: pio \[0x3f8, 0x3f9\) overlaps com1"):
        machine.add_device(registers, name="mine", pio=(0x3F8, 1))
    with pytest.raises(ResourceConflict, match=r"^a device named 'com1' is already"):
        machine.add_device(registers, name="com1", pio=(0x3E0, 1))
    with pytest.raises(ResourceConflict, match=r"^mine: IRQ 4 is already com1's"):
        machine.add_device(registers, name="mine", pio=(0x3E0, 1), irq=4)
    with pytest.raises(ResourceError, match=r"^mine: IRQ 16 is not an ISA IRQ"):
        machine.add_device(registers, name="mine", pio=(0x3E0, 1), irq=16)
    with pytest.raises(MachineConfigError, match="exactly one of pio= and mmio="):
        machine.add_device(registers, name="mine", pio=(0x3E0, 1), mmio=(REGS_BASE, 4))
    with pytest.raises(MachineConfigError, match="exactly one of pio= and mmio="):
        machine.add_device(registers, name="mine")
    # Where KVM would never exit to the device: RAM, the in-kernel LAPIC, past port 0xFFFF.
    with pytest.raises(
        ResourceConflict, match=r"^mine: mmio \[0xfff000, 0x1001000\) overlaps guest"
    ):
        machine.add_device(registers, name="mine", mmio=(0xFFF000, 0x2000))
    with pytest.raises(ResourceConflict, match=r"overlaps the local APICs \[0xfee00000, "):
        machine.add_device(registers, name="mine", mmio=(0xFEE00800, 4))
    with pytest.raises(ResourceError, match=r"^mine: pio \[0xfffe, 0x10002\) is outside the port"):
        machine.add_device(registers, name="mine", pio=(0xFFFE, 4))
    assert "mine" not in machine.devices and "mine" not in table.entries
    assert FREE_ISA_IRQ not in table.irqs.owners
    machine.add_device(registers, name="mine", mmio=(REGS_BASE, 0x1000), irq=FREE_ISA_IRQ)
    with pytest.raises(ResourceConflict, match=r"^other: mmio \[0xd0000ff0, 0xd0001000\) over"):
        machine.add_device(Registers(), name="other", mmio=(REGS_BASE + 0xFF0, 0x10))
    assert machine.add_device(Registers(), name="other", pio=(0x3E0, 1), irq="auto").irq == 5


def test_devices_are_added_before_start_only(machines: list[Machine]) -> None:
    machine = _machine(machines, "main:\n    jmp main\n")
    machine.start()
    with pytest.raises(MachineStateError, match=r"^add_device\(\) .* \(it is running\)"):
        machine.add_device(Registers(), name="late", pio=(0x3E0, 1))
    with pytest.raises(MachineStateError, match=r"\(it is running\)"):
        machine.add_device_option("pc-testdev")
    assert "late" not in machine.devices and "pc-testdev" not in machine.devices
    machine.stop()


ACCESSES = {
    "pio write": (
        "mov dx, 0x3E0\n    mov ax, 0xBEEF\n    out dx, ax",
        "2-byte write of 0xbeef to port 0x3e0 (offset 0x0)",
    ),
    "pio read": ("mov dx, 0x3E1\n    in eax, dx", "4-byte read of port 0x3e1 (offset 0x1)"),
    "mmio write": (
        "mov ebx, 0xD0000000\n    mov dword ptr [rbx + 4], 0x12345678",
        "4-byte write of 0x12345678 to MMIO address 0xd0000004 (offset 0x4)",
    ),
    "mmio read": (
        "mov ebx, 0xD0000000\n    mov rax, qword ptr [rbx + 8]",
        "8-byte read of MMIO address 0xd0000008 (offset 0x8)",
    ),
}


@pytest.mark.parametrize("access", list(ACCESSES))
def test_a_raising_device_ends_the_run_with_an_error_naming_it_and_the_access(
    machines: list[Machine], access: str
) -> None:
    instruction, described = ACCESSES[access]
    # A second vCPU (waiting for its SIPI) must not keep the run going either.
    machine = _machine(machines, f"main:\n    {instruction}\n    jmp finish\n", cpus=2)
    machine.add_device_option("isa-debug-exit")
    space = {"pio": (0x3E0, 4)} if access.startswith("pio") else {"mmio": (REGS_BASE, 0x1000)}
    machine.add_device(Flaky(), name="flaky", **space)  # type: ignore[arg-type]

    outcome = machine.run(60)

    assert outcome.status == STATUS_GUEST_CRASHED, outcome
    assert outcome.reason == f"vCPU 0: device 'flaky' failed on a {described}: ValueError: boom"
    assert isinstance(outcome.error, DeviceAccessError)
    assert isinstance(outcome.error.__cause__, ValueError)
    assert outcome.error.device == "flaky"
    assert outcome.error.is_write == access.endswith("write")
    assert machine.state is MachineState.FINISHED


def test_a_device_that_calls_sys_exit_ends_the_run_too(machines: list[Machine]) -> None:
    """SystemExit is no Exception: unguarded, it would end the vCPU's thread and leave
    the machine running without a vCPU."""
    machine = _machine(machines, "main:\n    mov dx, 0x3E0\n    out dx, al\n    jmp finish\n")
    machine.add_device_option("isa-debug-exit")
    machine.add_device(Flaky(error=SystemExit(3)), name="quitter", pio=(BELL_PORT, 1))
    outcome = machine.run(30)
    assert outcome.status == STATUS_GUEST_CRASHED, outcome
    assert outcome.reason.startswith("vCPU 0: device 'quitter' failed on a 1-byte write")
    assert outcome.reason.endswith("(offset 0x0): SystemExit: 3")


def test_a_read_that_answers_no_int_is_the_devices_error_too(machines: list[Machine]) -> None:
    machine = _machine(machines, "main:\n    mov dx, 0x3E0\n    in al, dx\n    jmp finish\n")
    machine.add_device_option("isa-debug-exit")
    machine.add_device(Flaky(answer="7"), name="flaky", pio=(BELL_PORT, 1))
    outcome = machine.run(60)
    assert outcome.status == STATUS_GUEST_CRASHED, outcome
    assert outcome.reason == (
        "vCPU 0: device 'flaky' failed on a 1-byte read of port 0x3e0 (offset 0x0):"
        " TypeError: read() returned str, not an int"
    )


def _copy_vcpus_and_ram(source: Machine, target: Machine) -> None:
    """What save_state() leaves out: RAM and the vCPUs, the LAPIC included."""
    for region in layout.ram_regions(source.config.memory_size):
        target.write_memory(region.start, source.read_memory(region.start, region.size))
    for old, new in zip(source.vcpus, target.vcpus, strict=True):
        new.set_sregs(old.get_sregs())
        new.set_regs(old.get_regs())
        new.set_lapic(old.get_lapic())
        new.set_vcpu_events(old.get_vcpu_events())
        new.set_mp_state(old.get_mp_state())


def test_a_paused_machines_state_restored_into_a_second_one_continues_the_same(
    machines: list[Machine],
) -> None:
    first = _machine(machines, COUNT)
    _, counter = _add_bell_and_counter(first)
    first.start()
    for _ in range(3):
        first.serial.expect(b"!", timeout=60)
    first.pause()
    assert first.state is MachineState.PAUSED, first.outcome
    state = json.loads(json.dumps(first.save_state()))
    assert set(state) == set(first.devices) - {"port61"}  # port 61h is the PIT's
    assert state["counter"] == {"count": counter.count} and counter.count > 64
    printed = len(first.serial.transcript())

    second = _machine(machines)
    _, twin = _add_bell_and_counter(second)
    _copy_vcpus_and_ram(first, second)
    second.restore_state(state)
    assert twin.count == counter.count
    clocked = {"pit", "acpi-pm", "rtc"}  # their counts follow each machine's clock
    restored = second.save_state()
    assert {name: restored[name] for name in set(state) - clocked} == {
        name: state[name] for name in set(state) - clocked
    }

    first.resume()
    second.start()
    outcomes = [machine.wait(120) for machine in (first, second)]
    assert all(o is not None and o.status == DEBUG_EXIT_STATUS for o in outcomes), outcomes
    rest = first.serial.transcript()[printed:]
    assert second.serial.transcript() == rest
    # The restored counter and IOAPIC route carried on: the counts went on from the
    # pause, and the bell's interrupts were taken after it.
    assert counter.count == twin.count == ITERATIONS
    assert rest.count(b"!") >= 2


def test_save_state_names_a_device_that_cannot_save_its_own(machines: list[Machine]) -> None:
    machine = _machine(machines)
    machine.add_device_option("pc-testdev")
    assert "pc-testdev" in machine.save_state()
    machine.add_device(Registers(), name="regs", mmio=(REGS_BASE, 0x1000))
    with pytest.raises(NotSnapshottable, match=r"^save_state\(\): device\(s\) 'regs' cannot"):
        machine.save_state()
    with pytest.raises(NotSnapshottable, match=r"^restore_state\(\): device\(s\) 'regs'"):
        machine.restore_state({})


def test_state_is_saved_only_while_nothing_runs(machines: list[Machine]) -> None:
    machine = _machine(machines, "main:\n    jmp main\n")
    machine.start()
    with pytest.raises(MachineStateError, match=r"^save_state\(\) .* \(it is running\)"):
        machine.save_state()
    with pytest.raises(MachineStateError, match=r"^restore_state\(\) .* \(it is running\)"):
        machine.restore_state({})
    machine.pause()
    machine.restore_state(machine.save_state())
    machine.stop()
    with pytest.raises(MachineStateError, match=r"\(it is finished\)"):
        machine.restore_state({})


def test_a_device_timer_that_raises_makes_the_run_a_crash(machines: list[Machine]) -> None:
    """A timer callback's exception (a device bug) overrides a clean ending: status 4,
    never the 0 of the stop that followed it."""
    machine = _machine(machines, "main:\n    pause\n    jmp main\n")

    def broken() -> None:
        raise RuntimeError("PIT model bug")

    machine.timers.schedule(machine.timers.now_ns(), broken)
    machine.start()
    deadline = time.monotonic() + 30
    while not machine.timers.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    outcome = machine.stop()
    assert outcome.status == 4, outcome  # STATUS_GUEST_CRASHED: even, not a debug exit
    assert outcome.reason == "device timer failed: RuntimeError('PIT model bug')"
