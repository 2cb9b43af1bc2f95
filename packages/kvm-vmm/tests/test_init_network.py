"""The demo /init's network lines (kvm_vmm.init_network) run by the host's sh over a
fake /proc/cmdline and /sys/class/net. ``ip`` and ``hostname`` are shell functions
that record their arguments: a function wins over a PATH entry and over a busybox
applet alike, so no shell can reach the host's real network configuration."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvm_vmm.init_network import IP_EXAMPLE, network_setup, vsock_note
from kvm_vmm.initramfs import demo_init

MAC = "52:54:00:12:34:56"
AFTER = "after the network lines"  # printed by the test script's last line


@dataclass(frozen=True)
class Ran:
    lines: list[str]  # what the script printed, the last line (AFTER) removed
    calls: list[str]  # the ip and hostname commands, in order


def run_setup(tmp_path: Path, cmdline: str, devices: tuple[str, ...] = ("lo", "eth0")) -> Ran:
    net = tmp_path / "net"
    for name in devices:
        (net / name).mkdir(parents=True)
        (net / name / "address").write_text((MAC if name != "lo" else "00:00:00:00:00:00") + "\n")
    net.mkdir(exist_ok=True)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    calls = tmp_path / "calls"
    stubs = (
        f'ip() {{ echo "ip $*" >> {calls}; }}\nhostname() {{ echo "hostname $*" >> {calls}; }}\n'
    )
    script = stubs + network_setup(str(tmp_path / "cmdline"), str(net)) + f'echo "{AFTER}"\n'
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[-1] == AFTER  # nothing in ip= stops /init
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return Ran(lines[:-1], recorded)


@pytest.mark.parametrize(
    ("argument", "address", "commands"),
    [
        (
            "ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off",
            "10.0.2.15/24, gateway 10.0.2.1",
            [
                "ip addr add 10.0.2.15/24 dev eth0",
                "ip link set eth0 up",
                "ip route add default via 10.0.2.1 dev eth0",
            ],
        ),
        (  # the fields left out: device eth0, no gateway, no autoconf
            "ip=192.168.7.2:::255.255.254.0",
            "192.168.7.2/23",
            ["ip addr add 192.168.7.2/23 dev eth0", "ip link set eth0 up"],
        ),
        (  # a prefix on the client address, autoconf none
            "ip=10.1.2.3/28::10.1.2.1:::eth0:none",
            "10.1.2.3/28, gateway 10.1.2.1",
            [
                "ip addr add 10.1.2.3/28 dev eth0",
                "ip link set eth0 up",
                "ip route add default via 10.1.2.1 dev eth0",
            ],
        ),
        (  # no netmask: the class mask, as the kernel derives it
            "ip=10.0.2.15",
            "10.0.2.15/8",
            ["ip addr add 10.0.2.15/8 dev eth0", "ip link set eth0 up"],
        ),
        (
            "ip=172.16.0.9::::",
            "172.16.0.9/16",
            ["ip addr add 172.16.0.9/16 dev eth0", "ip link set eth0 up"],
        ),
        (
            "ip=192.0.2.9:::0.0.0.0:guest:eth0:",
            "192.0.2.9/0",
            ["ip addr add 192.0.2.9/0 dev eth0", "ip link set eth0 up", "hostname guest"],
        ),
    ],
)
def test_ip_sets_the_address_the_link_and_the_route(
    tmp_path: Path, argument: str, address: str, commands: list[str]
) -> None:
    ran = run_setup(tmp_path, f"console=ttyS0 {argument} panic=-1")
    assert ran.calls == ["ip link set lo up", *commands]
    assert ran.lines == [f"eth0 ({MAC}) is {address} (ip= on the kernel command line)"]


def test_the_last_ip_word_is_the_one_taken(tmp_path: Path) -> None:
    ran = run_setup(tmp_path, "ip=10.0.0.1/8 ip=10.0.2.15/24")
    assert "ip addr add 10.0.2.15/24 dev eth0" in ran.calls
    assert "ip addr add 10.0.0.1/8 dev eth0" not in ran.calls


def test_without_ip_eth0_is_up_without_an_address_and_the_line_says_how(tmp_path: Path) -> None:
    for number, cmdline in enumerate(("console=ttyS0 panic=-1", "console=ttyS0 ip=off", "ip=none")):
        ran = run_setup(tmp_path / str(number), cmdline)
        assert ran.calls == ["ip link set lo up", "ip link set eth0 up"]
        assert ran.lines == [
            f"eth0 ({MAC}) is up without an address: kvm-vmm demo --cmdline "
            f"'{IP_EXAMPLE}' gives one, or 'ip addr add' here"
        ]


@pytest.mark.parametrize(
    ("argument", "complaint"),
    [
        ("ip=10.0.2.300::10.0.2.1:255.255.255.0", "'10.0.2.300' is not a client address"),
        ("ip=10.0.2", "'10.0.2' is not a client address"),
        ("ip=::::", "'' is not a client address"),
        ("ip=*", "'*' is not a client address"),
        ("ip=$(reboot)", "'$(reboot)' is not a client address"),
        ("ip=a\\cb", "'a\\cb' is not a client address"),
        ("ip=10.0.2.15:::255.0.255.0", "'255.0.255.0' is not a netmask"),
        ("ip=10.0.2.15:::255.255.255.1", "'255.255.255.1' is not a netmask"),
        ("ip=10.0.2.15/33", "'/33' is not a prefix length (0-32)"),
        ("ip=10.0.2.15/x", "'/x' is not a prefix length (0-32)"),
        ("ip=10.0.2.15::gateway", "'gateway' is not a gateway address"),
        ("ip=dhcp", "autoconf 'dhcp' is not supported (no DHCP client here)"),
        ("ip=10.0.2.15::::::bootp", "autoconf 'bootp' is not supported"),
        ("ip=10.0.2.15:::::eth1", "no network device 'eth1' (the guest has: eth0 lo)"),
    ],
)
def test_an_ip_that_cannot_be_used_is_said_and_eth0_still_comes_up(
    tmp_path: Path, argument: str, complaint: str
) -> None:
    ran = run_setup(tmp_path, f"console=ttyS0 {argument}")
    assert ran.calls == ["ip link set lo up", "ip link set eth0 up"]
    assert len(ran.lines) == 2
    assert ran.lines[0].startswith(f"ip=: {complaint}")
    assert ran.lines[1] == f"eth0 ({MAC}) is up without an address: {argument} was not used"


def test_a_failing_ip_command_leaves_eth0_up_without_an_address(tmp_path: Path) -> None:
    net = tmp_path / "net" / "eth0"
    net.mkdir(parents=True)
    (net / "address").write_text(MAC + "\n")
    (tmp_path / "cmdline").write_text("ip=10.0.2.15/24\n")
    refusing = (
        'ip() { case "$*" in "addr add"*) echo "ip: RTNETLINK answers: File exists"; '
        "return 2;; esac; }\n"
    )
    script = refusing + network_setup(str(tmp_path / "cmdline"), str(tmp_path / "net"))
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "ip: RTNETLINK answers: File exists",
        f"eth0 ({MAC}) is up without an address: ip=10.0.2.15/24 was not used",
    ]


def test_a_guest_without_a_network_device_brings_up_lo_and_says_nothing(tmp_path: Path) -> None:
    ran = run_setup(tmp_path, "console=ttyS0", devices=("lo",))
    assert ran.calls == ["ip link set lo up"]
    assert ran.lines == []
    ran = run_setup(tmp_path / "with-ip", "ip=10.0.2.15/24", devices=("lo",))
    assert ran.calls == ["ip link set lo up"]
    assert ran.lines == ["ip=: no network device 'eth0' (the guest has: lo)"]


def test_the_vsock_line_appears_only_with_the_device(tmp_path: Path) -> None:
    absent = subprocess.run(
        ["sh", "-c", vsock_note(str(tmp_path / "vsock"))], capture_output=True, text=True
    )
    assert absent.stdout == ""
    present = subprocess.run(["sh", "-c", vsock_note("/dev/null")], capture_output=True, text=True)
    assert present.stdout.startswith("vsock: /dev/null is here; this guest's CID is ")
    assert "--vsock cid=" in present.stdout and "'CONNECT P'" in present.stdout


def test_paths_that_would_not_be_shell_words_are_refused() -> None:
    with pytest.raises(ValueError, match="path"):
        network_setup("/proc/cmdline; reboot")
    with pytest.raises(ValueError, match="path"):
        vsock_note("/dev/$(reboot)")


def test_the_demo_brings_the_network_up_after_the_modules_and_before_the_shell() -> None:
    script = demo_init(["virtio_ring", "virtio_net"], {0x1041: ["virtio_ring", "virtio_net"]})
    subprocess.run(["sh", "-n", "-c", script], check=True)
    order = [
        "insmod",
        "ip link set lo up",
        "for net_word in $(cat /proc/cmdline)",
        "[ -c /dev/vsock ]",
        "setsid cttyhack sh",
    ]
    positions = [script.index(text) for text in order]
    assert positions == sorted(positions)
