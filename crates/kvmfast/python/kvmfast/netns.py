"""A network namespace of a test's own, for the tests of virtio-net (in every package):
the TAPs they make and the sockets they open live in it, and nothing they send reaches
the host's network. Made with ``ip netns add`` (root, iproute2) and entered one thread
at a time with setns(2), which moves only the calling thread; production code never
imports this module."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def netns_unavailable_reason() -> str | None:
    """Why a test cannot have a namespace and a TAP here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces and TAPs need root (CAP_NET_ADMIN)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun on this host"
    if shutil.which("ip") is None:
        return "no ip(8) (iproute2) to make a network namespace"
    return None


@dataclass(frozen=True)
class Namespace:
    name: str

    def ip(self, *args: str) -> None:
        """``ip -n NAME ARGS...``; CalledProcessError (with ip's words) if it fails."""
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def links(self) -> str:
        """``ip -o link`` inside: one line per interface."""
        return subprocess.run(
            ["ip", "-n", self.name, "-o", "link"], check=True, capture_output=True, text=True
        ).stdout

    def link_mac(self, interface: str) -> bytes:
        line = next(line for line in self.links().splitlines() if f" {interface}:" in line)
        return bytes.fromhex(line.split("link/ether ")[1].split()[0].replace(":", ""))

    @contextmanager
    def inside(self) -> Iterator[None]:
        """This thread in the namespace for the block (TAPs created and sockets opened
        in it stay there after it)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)


@contextmanager
def private_netns(prefix: str) -> Iterator[Namespace]:
    """A new namespace, deleted (with every interface in it) at the end."""
    name = f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield Namespace(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
