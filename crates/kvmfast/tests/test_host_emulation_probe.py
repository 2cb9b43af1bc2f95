"""The session's probe of whether this host's KVM emulates guest CPL-0 code agrees
with the KVM module the host loaded, and its skip reason says what it saw."""

from __future__ import annotations

from pathlib import Path

import pytest
from emulation_support import HostEmulation

# kvm_pvm runs guests without VMX/SVM, through KVM's instruction emulator
# (../shared/HOST-KVM.md); kvm_intel and kvm_amd run them on the processor.
EMULATING_MODULES = ("kvm_pvm",)
HARDWARE_MODULES = ("kvm_intel", "kvm_amd")


def _loaded(names: tuple[str, ...]) -> bool:
    return any(Path("/sys/module", name).is_dir() for name in names)


@pytest.mark.kvm
def test_the_probe_agrees_with_the_loaded_kvm_module(host_emulation: HostEmulation) -> None:
    if not _loaded(EMULATING_MODULES + HARDWARE_MODULES):
        pytest.skip("none of kvm_pvm, kvm_intel, kvm_amd is loaded: nothing to compare with")
    assert host_emulation.emulates_cpl0 == _loaded(EMULATING_MODULES), host_emulation
    if host_emulation.emulates_cpl0:
        assert host_emulation.completions == {"clac": 1, "popcnt": 1}
        assert host_emulation.vector == 0


def test_the_skip_reason_names_the_hardware_and_what_the_probe_saw() -> None:
    seen = HostEmulation(emulates_cpl0=False, completions={}, vector=6)
    assert "VMX/SVM" in seen.skip_reason
    assert "vector 6" in seen.skip_reason
    assert "no exception" in HostEmulation(False, {}, 0).skip_reason
