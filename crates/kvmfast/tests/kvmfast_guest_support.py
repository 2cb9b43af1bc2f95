"""Small 64-bit guests for the kvmfast tests: one VM, 4 MiB of RAM at 0, code at 0x1000,
an ExitSink on port 0xF4, and an IDT built from the program's labels."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kvmfast import Exit, ExitSink, GuestMemory, Kvm, Vcpu, Vm
from kvmfast.testing import GuestProgram, assemble_program, install_idt, setup_long_mode

RAM_SIZE = 4 << 20
CODE_AT = 0x1000
STACK_TOP = 0x8000
IDT_AT = 0x10000
EXIT_PORT = 0xF4
MMIO_BASE = 0x1000_0000
LAPIC_BASE = 0xFEE0_0000

# Ends the guest with Exit("device_exit", al).
EXIT_SEQUENCE = f"out {EXIT_PORT:#x}, al"
# The LAPIC registers lie above 2 GiB, out of reach of a 32-bit displacement.
LAPIC_SOFTWARE_ENABLE = f"""
    push rbx
    mov rbx, {LAPIC_BASE + 0xF0:#x}
    mov dword ptr [rbx], 0x1ff
    pop rbx
"""
LAPIC_EOI = f"""
    push rbx
    mov rbx, {LAPIC_BASE + 0xB0:#x}
    mov dword ptr [rbx], 0
    pop rbx
"""


@dataclass
class Guest:
    vm: Vm
    vcpu: Vcpu
    memory: GuestMemory
    program: GuestProgram


def boot_guest(
    kvm: Kvm,
    source: str,
    *,
    irqchip: str = "split",
    vectors: Mapping[int, str] | None = None,
    vcpu_id: int = 0,
) -> Guest:
    """A VM running ``source`` from its ``entry`` label (or its first byte) in long mode;
    ``vectors`` maps interrupt vectors to labels of the program."""
    vm = kvm.create_vm(irqchip=irqchip)
    memory = vm.add_memory(0, RAM_SIZE)
    program = assemble_program(source, origin=CODE_AT)
    vm.write(CODE_AT, program.code)
    vm.add_pio(EXIT_PORT, 1, ExitSink())
    vcpu = vm.create_vcpu(vcpu_id)
    setup_long_mode(vm, vcpu, memory, entry=program.symbols.get("entry", CODE_AT), stack=STACK_TOP)
    if vectors:
        handlers = {vector: program.symbols[label] for vector, label in vectors.items()}
        install_idt(vm, vcpu, base=IDT_AT, handlers=handlers)
    return Guest(vm=vm, vcpu=vcpu, memory=memory, program=program)


@dataclass
class RecordingDevice:
    """A Device that logs every access and answers reads from ``answer``."""

    answer: Callable[[int, int], int] = lambda offset, size: 0
    log: list[tuple[str, int, int, int]] = field(default_factory=list)

    def read(self, offset: int, size: int) -> int:
        value = self.answer(offset, size)
        self.log.append(("read", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("write", offset, size, value))


class VcpuThread:
    """vcpu.run() on a worker thread, as kvm-vmm runs each vCPU."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self._outcome: list[Exit | BaseException] = []
        self._thread = threading.Thread(target=self._work, name=f"vcpu{vcpu.id}")
        self._thread.start()

    def _work(self) -> None:
        try:
            self._outcome.append(self.vcpu.run())
        except BaseException as error:  # handed to the test thread
            self._outcome.append(error)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 20.0) -> Exit:
        """The Exit run() returned (its exception is raised here); a vCPU still running
        after ``timeout`` is stopped and fails the test instead of hanging it."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.vcpu.kicker().stop()
            self._thread.join()
            raise AssertionError(f"vCPU {self.vcpu.id} did not stop within {timeout} s")
        result = self._outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result


def run_with_timeout(vcpu: Vcpu, timeout: float = 20.0) -> Exit:
    return VcpuThread(vcpu).join(timeout)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def wait_until_in_kvm_run(vcpu: Vcpu, timeout: float = 10.0) -> None:
    """Returns once ``vcpu`` is in its run loop: kicks until a kick has made an exit
    (a kick that comes before run() starts is consumed without one)."""
    kicker = vcpu.kicker()

    def kicked_out_of_kvm_run() -> bool:
        kicker.kick()
        return vcpu.counters()["exits"].get("intr", 0) > 0

    if not wait_until(kicked_out_of_kvm_run, timeout):
        raise AssertionError(f"vCPU {vcpu.id} did not enter KVM_RUN within {timeout} s")
