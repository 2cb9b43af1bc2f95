"""The network namespace kvm_vmm.bench_net runs in: made with ``ip netns add`` (root,
iproute2), its loopback brought up, deleted at the end whatever happened, so that the
TAP, the guest's address and every socket of the benchmark live in it and nothing it
sends reaches the host's network. The benchmark itself runs inside under
``ip netns exec``, which also mounts a /sys of the namespace (the TAP's statistics)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class NamespaceUnavailable(RuntimeError):
    """This host cannot give the benchmark a namespace and a TAP; the message says why."""


def unavailable_reason() -> str | None:
    """Why there can be no namespace and TAP here (None: there can)."""
    if os.geteuid() != 0:
        return "network namespaces and TAPs need root (CAP_NET_ADMIN)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun on this host"
    if shutil.which("ip") is None:
        return "no ip(8) (iproute2) to make a network namespace"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespaceUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class NetNamespace:
    name: str

    def exec_command(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace (with its own /sys)."""
        return ["ip", "netns", "exec", self.name, *command]


@contextmanager
def network_namespace(name: str) -> Iterator[NetNamespace]:
    """A new namespace ``name`` with its loopback up; deleted on the way out (with every
    interface in it: the TAP goes when the VMM closes it, or with the namespace)."""
    reason = unavailable_reason()
    if reason is not None:
        raise NamespaceUnavailable(reason)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield NetNamespace(name)
    finally:
        _ip("netns", "delete", name)


def current_namespace() -> str | None:
    """The name of the namespace this process is in (``ip netns identify``), None
    when it is not a named one (the host's own)."""
    name = _ip("netns", "identify", str(os.getpid())).strip()
    return name or None


def interface_statistics(
    interface: str, sys_class_net: Path = Path("/sys/class/net")
) -> dict[str, int]:
    """An interface's counters (rx_packets, tx_bytes, ...) as /sys shows them; inside
    ``ip netns exec`` that /sys is the namespace's."""
    directory = sys_class_net / interface / "statistics"
    return {entry.name: int(entry.read_text()) for entry in sorted(directory.iterdir())}
