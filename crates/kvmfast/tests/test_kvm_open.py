"""Opening the KVM device: a missing node is a FileNotFoundError naming it, anything
else a KvmError naming the open (KVM API doc 2: the /dev/kvm system fd)."""

from __future__ import annotations

import errno

import pytest

from kvmfast import Kvm, KvmError


def test_missing_device_is_file_not_found_with_a_clear_message() -> None:
    with pytest.raises(FileNotFoundError, match="/nonexistent/kvm does not exist") as e:
        Kvm(path="/nonexistent/kvm")
    assert e.value.errno == errno.ENOENT


def test_a_node_that_is_not_kvm_is_a_kvm_error() -> None:
    with pytest.raises(KvmError, match="open /proc") as e:
        Kvm(path="/proc")
    assert e.value.errno in (errno.EISDIR, errno.EACCES, errno.EINVAL, errno.ENOTTY)
