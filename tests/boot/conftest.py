"""Whole-Linux boots: the default guest's kernel with a test initramfs.

The kernel and busybox come from the default guest's cache (fetched with
apt-get the first time), or from $KVM_VMM_TEST_KERNEL and $KVM_VMM_TEST_BUSYBOX.
Boots take minutes where KVM emulates guest kernel code: these tests have
their own tox env and generous time bounds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvm_vmm.debian import AssetsUnavailable, fetch_guest_assets
from kvm_vmm.hostcheck import HostReport, host_report
from kvm_vmm.initramfs import TEST_INIT, busybox_initramfs
from kvm_vmm.loaders import default_cache_dir
from kvmfast.testing import REQUIRE_KVM_ENV, require_kvm

KERNEL_ENV = "KVM_VMM_TEST_KERNEL"
BUSYBOX_ENV = "KVM_VMM_TEST_BUSYBOX"


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path  # the test initramfs: /proc/interrupts, nproc, poweroff -f


@pytest.fixture(autouse=True)
def _needs_kvm() -> Iterator[None]:
    require_kvm()
    yield


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_KVM_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_KVM_ENV}=1 requires the boot tests to run")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def boot_files(tmp_path_factory: pytest.TempPathFactory) -> BootFiles:
    kernel_env, busybox_env = os.environ.get(KERNEL_ENV), os.environ.get(BUSYBOX_ENV)
    if kernel_env and busybox_env:
        kernel, busybox = Path(kernel_env), Path(busybox_env)
    else:
        cache = default_cache_dir(os.environ)
        if cache is None:
            _unavailable("no cache directory ($HOME) for the default guest's kernel")
            raise AssertionError("unreachable")
        try:
            assets = fetch_guest_assets(cache)
        except AssetsUnavailable as error:
            _unavailable(f"no kernel to boot ({error}); or set {KERNEL_ENV} and {BUSYBOX_ENV}")
            raise AssertionError("unreachable") from error
        kernel, busybox = assets.kernel, assets.busybox
    initrd = tmp_path_factory.mktemp("boot") / "test-initramfs.cpio"
    initrd.write_bytes(busybox_initramfs(busybox.read_bytes(), TEST_INIT))
    return BootFiles(kernel, initrd)


@pytest.fixture(scope="session")
def host() -> HostReport:
    require_kvm()
    return host_report(default_cache_dir(os.environ))


@pytest.fixture
def boots_to_init(host: HostReport) -> None:
    """Skip where the host check says a stock kernel cannot reach /init here."""
    if host.failures:
        failing = "; ".join(f"{c.title}: {c.summary}" for c in host.failures)
        _unavailable(f"this host's KVM stops a stock Linux kernel before /init ({failing})")
