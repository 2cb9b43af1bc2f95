"""SIGINT, SIGTERM and SIGHUP end a VMM cleanly in each phase: loading (``kvm-vmm run``
blocked reading its kernel from a FIFO), running (``kvm-vmm run`` of a spinning guest on
a pseudo-terminal in raw mode) and paused (a script pausing a library Machine, as the
CLI has no pause): exit status 128 + n, no traceback, the terminal as it was."""

from __future__ import annotations

import errno
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_cli import _multiboot_kernel

from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.signals import ending_run
from kvmfast.testing import require_kvm

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
TRACEBACK = "Traceback"


def _wait_for_reader(fifo: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """A write end of ``fifo`` once ``process`` has opened it for reading (ENXIO until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
        assert process.poll() is None and time.monotonic() < deadline, "never opened the FIFO"
        time.sleep(0.02)


@pytest.mark.parametrize("number", SIGNALS, ids=lambda n: signal.Signals(n).name)
def test_a_signal_while_loading_the_kernel_ends_with_128_plus_n(
    tmp_path: Path, number: int
) -> None:
    """The kernel is a FIFO nobody writes: kvm-vmm waits inside its kernel read."""
    fifo = tmp_path / "kernel"
    os.mkfifo(fifo)
    process = subprocess.Popen(
        [sys.executable, "-m", "kvm_vmm.cli", "run", "--kernel", str(fifo), "--serial", "null"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Where it hangs, if it ever does (seen once in CI under load): SIGABRT makes
        # faulthandler print every thread's stack.
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    writer = _wait_for_reader(fifo, process)
    try:
        time.sleep(0.2)  # from open() into read(): either way it is loading
        process.send_signal(number)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, stuck = process.communicate(timeout=30)
            pytest.fail(f"still running 30 s after {number!r}:\n{stuck.decode()[-6000:]}")
    finally:
        os.close(writer)
        if process.poll() is None:
            process.kill()
            process.wait()
    text = stderr.decode()
    assert process.returncode == 128 + number, text
    assert TRACEBACK not in text
    assert f"stopped by {signal.Signals(number).name}" in text


RUNNING_BODY = """
        movw $0x3f8, %dx
        movl $running, %esi
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      jmp 2b
running: .asciz "running\\n"
"""


@pytest.mark.kvm
@pytest.mark.parametrize("stderr_on_pty", [False, True], ids=["stderr-pipe", "stderr-pty"])
@pytest.mark.parametrize("number", SIGNALS, ids=lambda n: signal.Signals(n).name)
def test_a_signal_while_running_ends_with_128_plus_n_and_restores_the_terminal(
    tmp_path: Path, number: int, stderr_on_pty: bool
) -> None:
    """With stderr on the terminal too, the status line is up when the signal comes,
    and gone (erased) before kvm-vmm's last words."""
    require_kvm()
    kernel = _multiboot_kernel(tmp_path, RUNNING_BODY)
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    process = subprocess.Popen(
        [sys.executable, "-m", "kvm_vmm.cli", "run", "--kernel", str(kernel), "--memory", "32M"],
        stdin=slave,
        stdout=slave,
        stderr=slave if stderr_on_pty else subprocess.PIPE,
    )
    try:
        output = b""
        wanted = b"milestone: first console byte" if stderr_on_pty else b"running"
        deadline = time.monotonic() + 30
        while wanted not in output:
            assert process.poll() is None and time.monotonic() < deadline, output
            if select.select([master], [], [], 0.2)[0]:
                output += os.read(master, 4096)
        assert termios.tcgetattr(slave) != before  # raw mode while the guest runs
        process.send_signal(number)
        _, stderr = process.communicate(timeout=30)
        while select.select([master], [], [], 0.2)[0]:
            output += os.read(master, 4096)
        text = stderr.decode() if stderr is not None else output.decode(errors="replace")
        assert process.returncode == 128 + number, text
        assert TRACEBACK not in text
        assert "vCPU 0: RIP" in text  # ended from outside: where the guest was
        assert termios.tcgetattr(slave) == before
        if stderr_on_pty:
            last_line = output.rindex(b"milestone: ")
            assert output.index(b"\r\x1b[K", last_line) < output.index(b"vCPU 0: RIP"), output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)


# A library user's script: a Machine looping in long mode, paused from another thread
# while the main thread waits in run() with kvm_vmm.signals.ending_run, as the CLI does.
# The start both scripts share: a Machine looping in long mode, not yet running.
SPINNING_MACHINE = textwrap.dedent(
    """
    import signal, sys, threading, time
    from kvm_vmm import layout
    from kvm_vmm.loaders.image import EntryState
    from kvm_vmm.machine import Machine, MachineConfig, MachineState
    from kvm_vmm.signals import ending_run
    from kvmfast.testing import assemble_program

    program = assemble_program(".global spin\\nspin:\\n inc rax\\n jmp spin\\n", origin=0x100000)
    with Machine(MachineConfig(memory_size=4 * layout.MIB)) as machine:
        machine.write_memory(0x100000, program.code)
        machine.enter(EntryState("long64", program.symbols["spin"]))
    """
)
PAUSED_SCRIPT = SPINNING_MACHINE + textwrap.dedent(
    """
        def pause() -> None:
            while machine.state is MachineState.CREATED:
                time.sleep(0.01)
            machine.pause()
            print(machine.state.value, flush=True)

        threading.Thread(target=pause).start()
        with ending_run(machine):
            outcome = machine.run()
        print(outcome.reason, flush=True)
    sys.exit(outcome.status)
    """
)


@pytest.mark.kvm
@pytest.mark.parametrize("number", SIGNALS, ids=lambda n: signal.Signals(n).name)
def test_a_signal_while_paused_ends_the_run_with_128_plus_n(number: int) -> None:
    require_kvm()
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSED_SCRIPT],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        # A pause that never comes fails the test rather than hanging the suite.
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "the machine did not report 'paused' within 120 s"
        assert process.stdout.readline() == "paused\n"
        process.send_signal(number)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + number, stderr
    assert TRACEBACK not in stderr
    expected = "interrupted" if number == signal.SIGINT else "terminated by"
    assert stdout.startswith(expected), stdout


# A library user's script: the main thread waits in run() with ending_run while a
# SIGTERM is delivered to another thread, as the kernel may deliver a process's
# signal to any thread that does not block it (seen as a hang in CI under load).
OTHER_THREAD_SCRIPT = SPINNING_MACHINE + textwrap.dedent(
    """
        def signal_this_thread() -> None:
            while machine.state is not MachineState.RUNNING:
                time.sleep(0.01)
            time.sleep(0.5)  # the main thread is in wait() by now
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        threading.Thread(target=signal_this_thread).start()
        with ending_run(machine):
            outcome = machine.run(timeout=60)
        print(outcome.reason, flush=True)
    sys.exit(outcome.status)
    """
)


@pytest.mark.kvm
def test_a_signal_another_thread_takes_still_ends_the_run() -> None:
    require_kvm()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", OTHER_THREAD_SCRIPT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 128 + signal.SIGTERM, (done.stdout, done.stderr)
    assert done.stdout.startswith("terminated by SIGTERM"), done.stdout
    assert time.monotonic() - started < 50  # not the run's own 60 s timeout


@pytest.mark.kvm
def test_a_sigterm_landing_while_the_main_thread_holds_the_finished_events_lock_ends_the_run() -> (
    None
):
    """Python runs a signal's handler between two bytecodes of the main thread, which
    may then be inside Event.wait() holding the machine's finished event's lock: the
    handler must not take it itself (seen as a hang under load: finish() waiting on the
    main thread's own lock, the vCPUs never kicked)."""
    require_kvm()
    with Machine(MachineConfig()) as machine, ending_run(machine):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        finished_lock = machine._finished._cond  # what Event.wait() holds between bytecodes
        returned = threading.Event()
        deadlocked: list[bool] = []

        def watchdog() -> None:  # a plain Lock may be released by another thread
            if not returned.wait(3):
                deadlocked.append(True)
                finished_lock.release()

        threading.Thread(target=watchdog, daemon=True).start()
        finished_lock.acquire()
        handler(signal.SIGTERM, None)
        returned.set()
        if not deadlocked:
            finished_lock.release()
        assert not deadlocked, "the handler waited for a lock its own thread held"
        assert machine._finished.wait(10)
        outcome = machine.outcome
        assert outcome is not None and outcome.reason == "terminated by SIGTERM"
