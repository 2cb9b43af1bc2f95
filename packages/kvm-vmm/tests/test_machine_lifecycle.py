"""Machine's lifecycle: start, pause, resume, stop, wait, the context manager, and the
errors of calls made in the wrong state. Small long-mode guests counting in a register
and in memory, so that a pause can be checked to lose or repeat nothing."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvm_vmm import cpu_setup, layout
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig, MachineState, MachineStateError, Outcome
from kvmfast.testing import GuestProgram, assemble_program, require_kvm

LOAD_ADDRESS = 0x100000
LIMIT = 300_000
DEBUG_EXIT_VALUE = 0x21
KVM_MP_STATE_RUNNABLE = 0

# The BSP counts RCX to LIMIT, storing each value, then leaves through isa-debug-exit;
# an AP, when started, counts RDX forever.
COUNTERS = f"""
.global bsp, ap, count, ap_count, spin
bsp:
    xor ecx, ecx
again:
    inc rcx
    mov [rip + count], rcx
    cmp rcx, {LIMIT}
    jne again
    mov al, {DEBUG_EXIT_VALUE}
    out 0xf4, al
    hlt
ap:
    inc rdx
    mov [rip + ap_count], rdx
    jmp ap
spin:
    jmp spin
    .balign 64
count: .quad 0
ap_count: .quad 0
"""


@pytest.fixture
def program() -> GuestProgram:
    require_kvm()
    return assemble_program(COUNTERS, origin=LOAD_ADDRESS)


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    """Machines a test builds, closed even when it fails."""
    built: list[Machine] = []
    yield built
    for machine in built:
        machine.close()


def _machine(
    machines: list[Machine],
    program: GuestProgram,
    *,
    cpus: int = 1,
    bsp: str = "bsp",
    ap: str | None = None,
) -> Machine:
    machine = Machine(MachineConfig(memory_size=16 * layout.MIB, cpus=cpus))
    machines.append(machine)
    machine.add_device_option("isa-debug-exit,iobase=0xf4,iosize=0x4")
    machine.write_memory(LOAD_ADDRESS, program.code)
    machine.enter(EntryState("long64", program.symbols[bsp]))
    if ap is not None:
        # Started as firmware would leave it after INIT/SIPI: running, in long mode.
        cpu_setup.enter(machine.vcpus[1], machine, EntryState("long64", program.symbols[ap]))
        machine.vcpus[1].set_mp_state(KVM_MP_STATE_RUNNABLE)
    return machine


def _read_u64(machine: Machine, address: int) -> int:
    value: int = struct.unpack("<Q", machine.read_memory(address, 8))[0]
    return value


def _finished_by_the_guest(outcome: Outcome | None) -> bool:
    return outcome is not None and outcome.status == DEBUG_EXIT_VALUE << 1 | 1


def test_the_lifecycle_in_order_and_each_call_in_the_wrong_state(
    machines: list[Machine], program: GuestProgram
) -> None:
    machine = _machine(machines, program, bsp="spin")
    assert machine.state is MachineState.CREATED
    for call in (machine.pause, machine.resume, machine.wait, machine.stop):
        with pytest.raises(MachineStateError, match=r"\(it is created\)"):
            call()
    machine.start()
    assert machine.state is MachineState.RUNNING
    with pytest.raises(MachineStateError, match=r"^start\(\) on a machine that is not created"):
        machine.start()
    with pytest.raises(
        MachineStateError, match=r"^resume\(\) on a machine that is not paused \(it is running\)"
    ):
        machine.resume()
    machine.pause()
    assert machine.state is MachineState.PAUSED
    assert machine.timers.paused
    with pytest.raises(MachineStateError, match=r"^pause\(\) on a machine that is not running"):
        machine.pause()
    machine.resume()
    assert machine.state is MachineState.RUNNING
    assert not machine.timers.paused
    outcome = machine.stop()
    assert outcome.reason == "stopped" and outcome.stopped_from_outside
    assert machine.state is MachineState.FINISHED
    assert machine.stop() == outcome  # the guest may end a run first: stop() is not a race
    assert machine.wait(0) == outcome
    with pytest.raises(MachineStateError, match=r"\(it is finished\)"):
        machine.pause()
    machine.close()
    assert machine.state is MachineState.CLOSED
    with pytest.raises(MachineStateError, match=r"^start\(\) .* \(it is closed\)"):
        machine.start()
    machine.close()  # a second close does nothing


def test_a_paused_counter_stands_still_and_continues_from_where_it_was(
    machines: list[Machine], program: GuestProgram
) -> None:
    machine = _machine(machines, program)
    count_at = program.symbols["count"]
    machine.start()
    seen: list[int] = []
    for _ in range(3):
        time.sleep(0.05)
        machine.pause()
        if machine.state is MachineState.FINISHED:
            break  # the guest was faster than three pauses
        counter = machine.vcpus[0].get_regs()["rcx"]
        stored = _read_u64(machine, count_at)
        assert stored in (counter, counter - 1)
        time.sleep(0.05)
        assert _read_u64(machine, count_at) == stored, "the guest ran while paused"
        assert not seen or counter >= seen[-1]
        seen.append(counter)
        machine.resume()
    outcome = machine.wait(60)
    assert _finished_by_the_guest(outcome), outcome
    # Each increment happened once: no pause lost or repeated one.
    assert machine.vcpus[0].get_regs()["rcx"] == LIMIT
    assert _read_u64(machine, count_at) == LIMIT
    assert seen


def test_two_vcpus_pause_together_and_both_continue(
    machines: list[Machine], program: GuestProgram
) -> None:
    machine = _machine(machines, program, cpus=2, bsp="spin", ap="ap")
    ap_count_at = program.symbols["ap_count"]
    machine.start()
    assert machine.wait(0.2) is None
    machine.pause()
    rips = [vcpu.get_regs()["rip"] for vcpu in machine.vcpus]
    counted = _read_u64(machine, ap_count_at)
    assert counted > 0
    assert machine.vcpus[1].get_regs()["rdx"] in (counted, counted + 1)
    time.sleep(0.1)
    assert _read_u64(machine, ap_count_at) == counted
    assert [vcpu.get_regs()["rip"] for vcpu in machine.vcpus] == rips
    machine.resume()
    time.sleep(0.1)
    machine.pause()
    assert _read_u64(machine, ap_count_at) > counted
    machine.resume()
    assert machine.stop().reason == "stopped"


def test_an_ap_waiting_for_its_sipi_pauses_too(
    machines: list[Machine], program: GuestProgram
) -> None:
    """The AP sits in KVM_RUN until a SIPI that never comes; the kick takes it out."""
    machine = _machine(machines, program, cpus=2)
    machine.start()
    machine.pause()
    assert machine.state is MachineState.PAUSED
    machine.resume()
    assert _finished_by_the_guest(machine.wait(60))


def test_stop_while_paused_ends_the_run(machines: list[Machine], program: GuestProgram) -> None:
    machine = _machine(machines, program, bsp="spin")
    machine.start()
    machine.pause()
    outcome = machine.stop()
    assert outcome.reason == "stopped"
    assert machine.state is MachineState.FINISHED
    assert not any(thread.is_alive() for thread in machine._threads)


def test_wait_returns_none_while_running_and_the_outcome_after(
    machines: list[Machine], program: GuestProgram
) -> None:
    machine = _machine(machines, program, bsp="spin")
    machine.start()
    started = time.monotonic()
    assert machine.wait(0.2) is None
    assert time.monotonic() - started >= 0.2
    assert machine.state is MachineState.RUNNING
    machine.pause()
    assert machine.wait(0.1) is None  # paused is not finished either
    outcome = machine.stop()
    assert machine.wait() == outcome


def test_the_context_manager_stops_and_closes(program: GuestProgram) -> None:
    with Machine(MachineConfig(memory_size=16 * layout.MIB)) as machine:
        machine.write_memory(LOAD_ADDRESS, program.code)
        machine.enter(EntryState("long64", program.symbols["spin"]))
        machine.start()
    assert machine.state is MachineState.CLOSED
    assert not any(thread.is_alive() for thread in machine._threads)


@dataclass
class SlowExitDevice:
    """Ends the run from the vCPU's thread, then keeps that thread a while."""

    machine: Machine | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        assert self.machine is not None
        self.machine.finish(Outcome(7, "done"))
        time.sleep(0.3)


def test_close_right_after_the_guest_ended_the_run_waits_for_the_vcpu_threads(
    machines: list[Machine], program: GuestProgram
) -> None:
    guest = assemble_program(".global entry\nentry:\n    out 0x80, al\n    hlt\n", origin=0x200000)
    machine = _machine(machines, program)
    machine.write_memory(0x200000, guest.code)
    machine.enter(EntryState("long64", guest.symbols["entry"]))
    machine.add_pio_device(0x80, 1, SlowExitDevice(machine), "slow-exit")
    machine.start()
    deadline = time.monotonic() + 60
    while machine.state is MachineState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert machine.state is MachineState.FINISHED
    machine.close()
    assert not any(thread.is_alive() for thread in machine._threads)


@dataclass
class PausingDevice:
    """A device model that asks its machine to pause, from the vCPU's thread."""

    machine: Machine | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        assert self.machine is not None
        self.machine.pause()


def test_pause_from_a_vcpu_thread_is_an_error_not_a_hang(
    machines: list[Machine], program: GuestProgram
) -> None:
    guest = assemble_program(".global entry\nentry:\n    out 0x80, al\n    hlt\n", origin=0x200000)
    machine = _machine(machines, program)
    machine.write_memory(0x200000, guest.code)
    machine.enter(EntryState("long64", guest.symbols["entry"]))
    machine.add_pio_device(0x80, 1, PausingDevice(machine), "pausing")
    outcome = machine.run(30)
    assert outcome.error is not None, outcome
    assert isinstance(outcome.error.__cause__, MachineStateError), outcome
    assert "'pausing' failed on a 1-byte write" in outcome.reason
    assert "from a vCPU's thread" in outcome.reason


def test_ctrl_c_while_start_is_starting_the_vcpus_is_an_interrupted_run(
    machines: list[Machine], program: GuestProgram, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT may land while start() is still starting vCPU threads (the first vCPU's
    guest already printing): run() ends as for any Ctrl-C, status 130, the threads
    started joined and the one never started skipped."""
    machine = _machine(machines, program, cpus=2, bsp="spin", ap="spin")
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start_then_interrupt(thread: threading.Thread) -> None:
        if thread.name.startswith("vcpu"):
            if started:
                raise KeyboardInterrupt
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    outcome = machine.run(timeout=30)
    assert (outcome.status, outcome.reason) == (130, "interrupted")
    assert len(started) == 1 and not started[0].is_alive()
