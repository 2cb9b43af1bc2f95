"""examples/custom_vmm.py runs as a user would run it, and its guest talks to its device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmfast.testing import require_kvm

EXAMPLE = Path(__file__).parents[2] / "examples" / "custom_vmm.py"


@pytest.mark.kvm
def test_the_custom_vmm_example_prints_what_its_device_capitalised() -> None:
    require_kvm()
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    # Only the device's answers are in capitals: the guest's message is lower-case.
    assert result.stdout == (
        "HELLO FROM THE GUEST OF A CUSTOM VMM\nthe guest left through device_exit\n"
    )
