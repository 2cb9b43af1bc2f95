"""Fixtures of the kvmfast tests: an open /dev/kvm, or a skip (a failure under
KVM_SPLIT_REQUIRE_KVM=1) where there is none."""

from __future__ import annotations

import pytest

from kvmfast import Kvm
from kvmfast.testing import require_kvm


@pytest.fixture
def kvm() -> Kvm:
    require_kvm()
    return Kvm()
