"""Fixtures of the kvmfast tests: an open /dev/kvm, or a skip (a failure under
KVM_SPLIT_REQUIRE_KVM=1) where there is none; and, once per session, whether this
host's KVM emulates guest CPL-0 code, for the tests marked ``emulated_cpl0``."""

from __future__ import annotations

import pytest
from emulation_support import EMULATED_CPL0_DOC, HostEmulation, probe_host_emulation

from kvmfast import Kvm
from kvmfast.testing import require_kvm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"emulated_cpl0: {EMULATED_CPL0_DOC}")


@pytest.fixture
def kvm() -> Kvm:
    require_kvm()
    return Kvm()


@pytest.fixture(scope="session")
def host_emulation() -> HostEmulation:
    require_kvm()
    return probe_host_emulation(Kvm())


@pytest.fixture(autouse=True)
def _emulated_cpl0_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("emulated_cpl0") is None:
        return
    host: HostEmulation = request.getfixturevalue("host_emulation")
    if not host.emulates_cpl0:
        pytest.skip(host.skip_reason)
