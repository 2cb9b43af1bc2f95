"""Small assembly guests for whole-VM tests, assembled at test time.

A guest is the shared prelude (64-bit long mode, IDT, LAPIC and IOAPIC
helpers), the test's own body defining ``main``, and the epilogue with the
IDT. It is loaded at 1 MiB and entered as the Linux 64-bit boot protocol
enters a kernel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from kvm_devices.debug_exit import DebugExit
from kvm_vmm import layout
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig, Outcome
from kvmfast.testing import assemble

GUEST_DIR = Path(__file__).parent
LOAD_ADDRESS = 0x100000
REPORT_PORT = 0x98
EXIT_PORT = 0xF4
DEBUG_EXIT_REASON = "debug exit"


UNEXPECTED_VECTOR_REPORT = 0xBAD00000


def default_gates() -> str:
    """Every vector reports 0xBAD000vv and fails the guest unless the test installs its own gate."""
    lines = ["install_default_gates:"]
    lines += [f"        SET_GATE {vector}, unexpected_{vector}" for vector in range(256)]
    lines.append("        ret")
    for vector in range(256):
        lines.append(f"unexpected_{vector}:\n        push {vector}\n        jmp unexpected_vector")
    return "\n".join(lines)


def guest_source(body: str) -> str:
    prelude = (GUEST_DIR / "prelude64.S").read_text()
    epilogue = (GUEST_DIR / "epilogue64.S").read_text()
    return f"{prelude}\n        .text\n{default_gates()}\n{body}\n{epilogue}"


def build_guest(body: str) -> bytes:
    return assemble(guest_source(body), bits=64, origin=LOAD_ADDRESS)


@dataclass
class ReportPort:
    """The guest's REPORT port: every 4-byte write is kept, in order."""

    values: list[int] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        with self.changed:
            self.values.append(value)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.values) >= count, timeout)


def passed(outcome: Outcome) -> bool:
    """A guest's main returning 0 exits through isa-debug-exit with status 1."""
    return outcome.error is None and outcome.reason == DEBUG_EXIT_REASON and outcome.status == 1


class GuestMachine:
    """A Machine with a flat test guest loaded, a report port and isa-debug-exit."""

    def __init__(
        self,
        body: str,
        *,
        cpus: int = 1,
        memory: int = 64 * layout.MIB,
        devices: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.machine = Machine(MachineConfig(memory_size=memory, cpus=cpus))
        for spec in devices:
            self.machine.add_device_option(spec)
        self.report = ReportPort()
        self.machine.add_pio_device(REPORT_PORT, 4, self.report, "report")
        exit_device = DebugExit(
            lambda status: self.machine.finish(Outcome(status, DEBUG_EXIT_REASON))
        )
        self.machine.add_pio_device(EXIT_PORT, 4, exit_device, "isa-debug-exit")
        self.machine.write_memory(LOAD_ADDRESS, build_guest(body))
        self.machine.enter(EntryState("long64", LOAD_ADDRESS))

    def run(self, timeout: float = 30.0) -> Outcome:
        return self.machine.run(timeout)

    def run_in_background(self) -> tuple[threading.Thread, list[Outcome]]:
        result: list[Outcome] = []
        thread = threading.Thread(target=lambda: result.append(self.run()), daemon=True)
        thread.start()
        return thread, result

    def close(self) -> None:
        self.machine.close()
