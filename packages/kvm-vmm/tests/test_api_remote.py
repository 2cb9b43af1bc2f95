"""``kvm-vmm run --api-socket`` end to end and ``kvm-vmm remote``, its client: a Multiboot
guest that polls PM1_STS and powers off when the ACPI power button is pressed, run in a
subprocess and driven by ``kvm-vmm remote`` subprocesses, snapshotted and continued by
``kvm-vmm restore``; the client's exit statuses (0 done, 1 an error reply, 2 usage or no
server) and one-line messages."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import _multiboot_kernel

from kvm_devices.acpi_pm import PWRBTN_STS, SLP_EN, SLP_TYP_SHIFT
from kvm_vmm import board
from kvm_vmm.api_client import ApiUnavailable, remote, request
from kvmfast.testing import require_kvm

TRACEBACK = "Traceback"
# 32-bit AT&T: poll PM1_STS until PWRBTN_STS, then SLP_TYP=S5 with SLP_EN (soft-off).
POWER_BUTTON_BODY = f"""
        movw ${board.PM1A_EVT_BLK}, %dx
7:      inw %dx, %ax
        testw ${PWRBTN_STS}, %ax
        jz 7b
        movw ${board.PM1A_CNT_BLK}, %dx
        movw ${board.SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN}, %ax
        outw %ax, %dx
8:      hlt
        jmp 8b
"""


def kvm_vmm_remote(
    path: Path, *command: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", "remote", "--api-socket", str(path), *command],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def _wait_until_running(process: subprocess.Popen[str], path: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the API socket never said running"
        try:
            reply = request(path, "GET", "vm.info", timeout=5)
        except ApiUnavailable:
            reply = None
        if reply is not None and isinstance(reply.body, dict) and reply.body["state"] == "running":
            return
        time.sleep(0.05)


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``kvm-vmm run --api-socket`` of the power-button guest, running once the fixture
    returns."""
    require_kvm()
    path = tmp_path / "api.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvm_vmm.cli",
            "run",
            "--kernel",
            str(_multiboot_kernel(tmp_path, POWER_BUTTON_BODY)),
            "--serial",
            "null",
            "--api-socket",
            str(path),
            "--verbose",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_running(process, path)
        yield process, path
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _ended(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


@pytest.mark.kvm
def test_pause_info_resume_stop_through_kvm_vmm_remote(
    vmm: tuple[subprocess.Popen[str], Path],
) -> None:
    process, path = vmm
    paused = kvm_vmm_remote(path, "pause")
    assert (paused.returncode, json.loads(paused.stdout)) == (0, {"state": "paused"})
    info = kvm_vmm_remote(path, "info")
    assert info.returncode == 0
    assert json.loads(info.stdout)["state"] == "paused"
    assert json.loads(info.stdout)["config"]["memory_size"] == 512 << 20

    again = kvm_vmm_remote(path, "pause")
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr == (
        "kvm-vmm remote: pause: pause() on a machine that is not running (it is paused)"
        " (HTTP 409)\n"
    )

    resumed = kvm_vmm_remote(path, "resume")
    assert (resumed.returncode, json.loads(resumed.stdout)) == (0, {"state": "running"})
    counters = kvm_vmm_remote(path, "counters")
    assert counters.returncode == 0
    assert json.loads(counters.stdout)["exits_by_device"]["acpi-pm"] > 0

    stopped = kvm_vmm_remote(path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["outcome"] == {"status": 0, "reason": "stopped"}
    status, stderr = _ended(process)
    assert status == 0, stderr
    assert "kvm-vmm: stopped after" in stderr
    assert TRACEBACK not in stderr
    assert not path.exists()  # the socket goes with the run
    gone = kvm_vmm_remote(path, "info")
    assert gone.returncode == 2
    assert gone.stderr == (
        f"kvm-vmm remote: {path}: no API server answers (No such file or directory)\n"
    )


@pytest.mark.kvm
def test_shutdown_presses_the_power_button_and_the_guest_powers_off(
    vmm: tuple[subprocess.Popen[str], Path],
) -> None:
    process, path = vmm
    shutdown = kvm_vmm_remote(path, "shutdown")
    assert shutdown.returncode == 0, shutdown.stderr
    status, stderr = _ended(process)
    assert status == 0, stderr
    assert "kvm-vmm: guest powered off after" in stderr
    assert TRACEBACK not in stderr
    assert not path.exists()


@pytest.mark.kvm
def test_run_refuses_a_path_where_a_server_answers(tmp_path: Path) -> None:
    require_kvm()
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvm_vmm.cli",
                "run",
                "--kernel",
                str(_multiboot_kernel(tmp_path, "")),
                "--serial",
                "null",
                "--api-socket",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 2
    assert result.stderr == f"kvm-vmm: error: API socket {path}: a server already answers there\n"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["reboot"], "argument COMMAND: invalid choice: 'reboot'"),
        (["pause", "now"], "kvm-vmm remote: pause takes no argument"),
    ],
)
def test_usage_errors_are_status_2_without_a_traceback(
    tmp_path: Path, command: list[str], message: str
) -> None:
    result = kvm_vmm_remote(tmp_path / "api.sock", *command)
    assert result.returncode == 2
    assert message in result.stderr
    assert TRACEBACK not in result.stderr


def test_no_api_socket_option_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", "remote", "info"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "the following arguments are required: --api-socket" in result.stderr


def _remote(path: Path, command: str, argument: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = remote(path, command, argument, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_a_stale_socket_is_no_server(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert _remote(path, "info") == (
        2,
        "",
        f"kvm-vmm remote: {path}: no API server answers (Connection refused)\n",
    )


def test_a_server_that_hangs_up_without_a_reply_is_status_2(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as rude:
        rude.bind(str(path))
        rude.listen()

        def hang_up() -> None:
            connection, _ = rude.accept()
            connection.recv(65536)
            connection.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        status, out, err = _remote(path, "info")
        thread.join()
    assert (status, out) == (2, "")
    assert err.startswith(f"kvm-vmm remote: {path}: the server sent no whole reply")
    assert err.count("\n") == 1


def test_a_reply_that_is_not_json_is_still_an_error_reply(tmp_path: Path) -> None:
    """A server that is not ours: its status decides, the message says what came."""
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()

        def answer() -> None:
            connection, _ = other.accept()
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n"
                b"Connection: close\r\n\r\nnot here\n"
            )
            connection.close()

        thread = threading.Thread(target=answer)
        thread.start()
        status, out, err = _remote(path, "info")
        thread.join()
    assert (status, out) == (1, "")
    assert err == "kvm-vmm remote: info: HTTP 404 without an error message (HTTP 404)\n"


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["private", "copy"])
def test_snapshot_through_remote_then_kvm_vmm_restore_continues_the_guest(
    vmm: tuple[subprocess.Popen[str], Path], tmp_path: Path, mode: str
) -> None:
    """The guest only powers off if it runs after the restore: it polls PM1_STS for the
    power button that ``remote shutdown`` presses in the restored process."""
    process, path = vmm
    running = kvm_vmm_remote(path, "snapshot", "snap", cwd=tmp_path)
    assert running.returncode == 1
    assert "(it is running) (HTTP 409)" in running.stderr
    assert kvm_vmm_remote(path, "pause").returncode == 0
    taken = kvm_vmm_remote(path, "snapshot", "snap", cwd=tmp_path)  # relative to the client
    assert taken.returncode == 0, taken.stderr
    assert json.loads(taken.stdout) == {"state": "paused", "destination": str(tmp_path / "snap")}
    assert kvm_vmm_remote(path, "stop").returncode == 0
    assert _ended(process)[0] == 0

    second = tmp_path / "restored.sock"
    restored = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvm_vmm.cli",
            "restore",
            str(tmp_path / "snap"),
            "--restore-mode",
            mode,
            "--serial",
            "null",
            "--api-socket",
            str(second),
            "--verbose",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_running(restored, second)
        info = json.loads(kvm_vmm_remote(second, "info").stdout)
        assert info["config"]["memory_size"] == 512 << 20
        assert kvm_vmm_remote(second, "shutdown").returncode == 0
        status, stderr = _ended(restored)
    finally:
        if restored.poll() is None:
            restored.kill()
            restored.communicate()
    assert status == 0, stderr
    assert f"kvm-vmm: restored {tmp_path / 'snap'} in" in stderr
    assert "kvm-vmm: guest powered off after" in stderr
    assert TRACEBACK not in stderr
    assert not second.exists()


@pytest.mark.kvm
@pytest.mark.parametrize("what", ["missing", "empty", "not a snapshot"])
def test_restore_of_something_that_is_no_snapshot_is_status_2_in_one_line(
    tmp_path: Path, what: str
) -> None:
    require_kvm()
    directory = tmp_path / "snap"
    if what != "missing":
        directory.mkdir()
    if what == "not a snapshot":
        (directory / "state.json").write_text('{"schema": "something else"}')
    result = subprocess.run(
        [sys.executable, "-m", "kvm_vmm.cli", "restore", str(directory), "--serial", "null"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"kvm-vmm: error: snapshot {directory}")
    assert result.stderr.count("\n") == 1, result.stderr
