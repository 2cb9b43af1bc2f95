"""--vsock's words (Cloud Hypervisor's spelling), and what is refused."""

from __future__ import annotations

import pytest

from kvm_vmm.vsock_options import VsockSpec, VsockSpecError, parse_vsock_spec


def test_cid_and_socket() -> None:
    assert parse_vsock_spec("cid=3,socket=/tmp/v.sock") == VsockSpec(3, "/tmp/v.sock")
    assert parse_vsock_spec("socket=v.sock,cid=4294967295") == VsockSpec(2**32 - 1, "v.sock")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cid=2,socket=v", "reserved"),
        ("cid=0,socket=v", "reserved"),
        ("cid=4294967296,socket=v", "too large"),
        ("cid=-3,socket=v", "not a number"),
        ("cid=٣,socket=v", "not a number"),
        ("cid=3,socket=", "not a Unix socket path"),
        ("cid=3,socket=" + "s" * 108, "1 to 107 bytes"),
        ("cid=3", "no socket="),
        ("socket=v", "no cid="),
        ("", "no cid="),
        ("cid=3,socket=v,iommu=on", "unknown option 'iommu'"),
        ("cid", "is not KEY=VALUE"),
    ],
)
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(VsockSpecError, match=message):
        parse_vsock_spec(text)
