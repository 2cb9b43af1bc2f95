"""Fixtures of kvm-abi's tests: a /dev/kvm handle for the ``kvm``-marked tests."""

import os
from collections.abc import Iterator

import pytest

from kvm_abi.ioctl import KvmSystem

KVM_DEVICE = "/dev/kvm"
REQUIRE_KVM_VARIABLE = "KVM_SPLIT_REQUIRE_KVM"


def require_kvm() -> None:
    """Skip without /dev/kvm, or fail where KVM_SPLIT_REQUIRE_KVM=1 says it must be there."""
    if os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return
    reason = f"{KVM_DEVICE} is absent or not read-write for this user"
    if os.environ.get(REQUIRE_KVM_VARIABLE) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_KVM_VARIABLE}=1 requires it")
    pytest.skip(reason)


@pytest.fixture
def kvm() -> Iterator[KvmSystem]:
    require_kvm()
    with KvmSystem.open(KVM_DEVICE) as system:
        yield system
