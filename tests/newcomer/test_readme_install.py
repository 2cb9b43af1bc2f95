"""The README's first command, as a newcomer runs it on a fresh machine.

A fresh venv with nothing of ours in it, the README's install line run
verbatim (read from README.md, so the test follows the README), then
`kvm-vmm demo --tiny` and the default guest loaded and entered: a short
`--timeout` run that must end by its timeout, not by an error. Before
lz4 and zstandard became dependencies this failed on the default guest's
LZ4 payload ("decompressing it needs the PyPI package 'lz4'").

The Rust build reuses $CARGO_TARGET_DIR when tox sets one: the build's
result does not depend on it, only its time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATUS_TIMED_OUT = 124  # kvm-vmm's status for --timeout, as timeout(1)'s
INSTALL_TIMEOUT = 1800.0  # seconds: builds kvmfast from source
DEFAULT_GUEST_SECONDS = 20
# Where a Linux boot starts (vmlinux PVH note, 64-bit and 32-bit boot protocols).
ENTRY_POINTS = {"pvh_start_xen", "startup_64", "startup_32"}
POSITION = re.compile(r"vCPU 0: RIP 0x[0-9a-f]+ \((\w+)\+0x[0-9a-f]+/0x[0-9a-f]+\) CPL 0")


def readme_install_line() -> str:
    """The first `pip install` line of the README's first shell block."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert block is not None, "README.md has no ```sh block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    installs = [line for line in lines if line.startswith("pip install ")]
    assert installs, "README.md's first shell block has no `pip install` line"
    return installs[0]


@pytest.fixture(scope="module")
def newcomer_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: the README's commands run guests")
    root = tmp_path_factory.mktemp("newcomer") / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    line = readme_install_line()
    result = subprocess.run(
        ["bash", "-c", line],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        f"`{line}` failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return env


def kvm_vmm(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvm-vmm", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_the_install_line_brings_no_package_from_elsewhere(newcomer_env: dict[str, str]) -> None:
    shown = subprocess.run(
        ["python", "-c", "import kvm_vmm, kvmfast, kvm_devices, kvm_abi; print(kvm_vmm.__file__)"],
        env=newcomer_env,
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    # Installed into the fresh venv, not picked up from the tree or the caller's env.
    assert "site-packages" in shown.stdout and str(REPO) not in shown.stdout
    assert sys.prefix not in shown.stdout


def test_demo_tiny_runs(newcomer_env: dict[str, str]) -> None:
    result = kvm_vmm(newcomer_env, "demo", "--tiny", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Hello from a split-irqchip guest" in result.stdout
    assert "powering off via ACPI S5" in result.stdout


def test_the_default_guest_is_loaded_and_entered(newcomer_env: dict[str, str]) -> None:
    result = kvm_vmm(
        newcomer_env,
        "demo",
        "--cold",  # a boot: a demo snapshot an earlier run kept would start at the shell
        "--serial",
        "null",
        "--stats",
        "--timeout",
        str(DEFAULT_GUEST_SECONDS),
        timeout=DEFAULT_GUEST_SECONDS + 600,  # + the first fetch of the Debian packages
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == STATUS_TIMED_OUT, result.stderr[-3000:]
    # Entered: vCPU 0 stopped by the timeout inside a kernel function past the
    # entry point (named from the image's own kallsyms).
    position = POSITION.search(result.stderr)
    assert position is not None, result.stderr[-3000:]
    assert position.group(1) not in ENTRY_POINTS, result.stderr[-3000:]
    stats = json.loads(result.stderr[result.stderr.rfind("\n{") :])
    assert stats["outcome"].startswith("timed out"), stats
