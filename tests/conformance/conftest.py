"""The conformance suite needs /dev/kvm: skip with the reason where it is absent,
fail instead where KVM_SPLIT_REQUIRE_KVM=1 (CI on a machine that has it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmfast.testing import require_kvm


@pytest.fixture(autouse=True)
def _needs_kvm() -> Iterator[None]:
    require_kvm()
    yield
