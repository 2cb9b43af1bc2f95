"""--net's words (Cloud Hypervisor's spelling), and what is refused."""

from __future__ import annotations

import pytest

from kvm_vmm.net_options import NetSpec, NetSpecError, parse_net_spec


def test_a_tap_by_name() -> None:
    assert parse_net_spec("tap=tap0") == NetSpec(tap="tap0")


def test_every_option() -> None:
    spec = parse_net_spec("tap=vmtap1,mac=52:54:00:AB:cd:01,queues=2")
    assert spec == NetSpec(tap="vmtap1", mac="52:54:00:ab:cd:01")


def test_no_tap_lets_the_kernel_name_one() -> None:
    assert parse_net_spec("mac=52:54:00:12:34:56") == NetSpec(mac="52:54:00:12:34:56")
    assert parse_net_spec("") == NetSpec()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tap=", "not an interface name"),
        ("tap=" + "t" * 16, "1 to 15 bytes"),
        ("tap=a/b", "not an interface name"),
        ("tap=t,mac=52:54:00:12:34", "six hex pairs"),
        ("tap=t,mac=52-54-00-12-34-56", "six hex pairs"),
        ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=t,queues=4", "no multi-queue"),
        ("tap=t,ip=10.0.0.1", "unknown option 'ip'"),
        ("tap0", "is not KEY=VALUE"),
    ],
)
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(NetSpecError, match=message):
        parse_net_spec(text)
