"""The names kvm_vmm exports, and the README's library example, run as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import kvm_vmm
from kvmfast.testing import require_kvm

README = Path(__file__).parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_every_public_name_is_exported_and_documented_in_the_readme() -> None:
    readme = README.read_text()
    for name in kvm_vmm.__all__:
        assert getattr(kvm_vmm, name) is not None
        assert f"`{name}" in readme or f"{name}(" in readme, f"{name} is not in the README"
    expected = {"Machine", "MachineConfig", "Outcome", "LinuxBoot", "MultibootBoot"}
    expected |= {"default_guest", "MachineStateError", "ConsoleTimeout"}
    expected |= {"AddedDevice", "DeviceAccessError", "NotSnapshottable"}
    assert expected <= set(kvm_vmm.__all__)


def test_the_readme_examples_are_python() -> None:
    blocks = _python_blocks()
    assert len(blocks) == 2
    for block in blocks:
        compile(block, str(README), "exec")


@pytest.mark.kvm
def test_the_readmes_first_example_runs() -> None:
    require_kvm()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(_python_blocks()[0], {})
    assert printed.getvalue().startswith("guest powered off 0x")
    assert "'com1':" in printed.getvalue()
