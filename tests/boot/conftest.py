"""Whole-Linux boots: the default guest's kernel with a test initramfs.

The kernel and busybox come from the default guest's cache (fetched with
apt-get the first time), or from $KVM_VMM_TEST_KERNEL and $KVM_VMM_TEST_BUSYBOX.
Boots take minutes where KVM emulates guest kernel code: these tests have
their own tox env and generous time bounds. They drive the library's Machine
(:func:`boot_linux`); only the kvm-vmm command's own tests run the command.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvm_vmm import LinuxBoot, Machine, MachineConfig, Outcome
from kvm_vmm.debian import AssetsUnavailable, GuestAssets, fetch_guest_assets
from kvm_vmm.hostcheck import HostReport, host_report
from kvm_vmm.initramfs import TEST_INIT, busybox_initramfs
from kvm_vmm.loaders import default_cache_dir
from kvm_vmm.profiler import GuestProfiler, ProfileLine, summarize
from kvmfast.testing import REQUIRE_KVM_ENV, require_kvm

KERNEL_ENV = "KVM_VMM_TEST_KERNEL"
BUSYBOX_ENV = "KVM_VMM_TEST_BUSYBOX"
# A boot to power-off takes ~3-10 minutes where KVM emulates guest kernel code; a
# host shared with other work may need more ($KVM_VMM_TEST_BOOT_TIMEOUT, seconds).
BOOT_TIMEOUT_ENV = "KVM_VMM_TEST_BOOT_TIMEOUT"
DEFAULT_BOOT_TIMEOUT = 900.0
LINUX_MEMORY = 512 << 20  # what kvm-vmm gives a Linux guest by default


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path  # the test initramfs: /proc/interrupts, nproc, poweroff -f


def boot_timeout() -> float:
    """Seconds a boot may take before it is stopped and the test fails."""
    return float(os.environ.get(BOOT_TIMEOUT_ENV) or DEFAULT_BOOT_TIMEOUT)


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
def guest_assets() -> GuestAssets:
    """The default guest's kernel with its own modules (the virtio tests load them:
    they must match the kernel, so $KVM_VMM_TEST_KERNEL, which has none, is no use)."""
    if os.environ.get(KERNEL_ENV):
        pytest.skip(f"the virtio tests load the default guest's modules; ${KERNEL_ENV} has none")
    cache = default_cache_dir(os.environ)
    if cache is None:
        _unavailable("no cache directory ($HOME) for the default guest's kernel and modules")
        raise AssertionError("unreachable")
    try:
        return fetch_guest_assets(cache)
    except AssetsUnavailable as error:
        _unavailable(f"no default guest to boot ({error})")
        raise AssertionError("unreachable") from error


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


@dataclass(frozen=True)
class Boot:
    """A finished boot: how it ended, the console, ``machine.stats()``, and the
    profile by function (empty unless sampled); ``positions`` says where each vCPU
    was when a timeout stopped the run."""

    outcome: Outcome
    console: str
    stats: dict[str, object]
    samples: int
    profile: list[ProfileLine]
    positions: list[str]

    def tail(self) -> str:
        """What a failed assertion shows: the end, where it stopped, the console's end."""
        ended = f"{self.outcome.reason} after {self.stats['seconds']} s"
        milestones = f"milestones: {self.stats['milestones']}"
        return "\n".join([ended, milestones, *self.positions, self.console[-3000:]])


def boot_linux(
    files: BootFiles, *, cpus: int, cmdline: str, profile_hz: float | None = None
) -> Boot:
    """Boot ``files`` with the fast-boot preset and the host's workarounds (what
    ``kvm-vmm run --fast-boot`` does) until the guest ends the run or boot_timeout()
    seconds pass; ``profile_hz``: sample every vCPU's RIP that often, as --profile does."""
    # panic=-1: a panic resets the guest at once, ending the run, instead of hanging.
    description = LinuxBoot(
        files.kernel,
        files.initrd,
        f"console=ttyS0 panic=-1 {cmdline}".strip(),
        fast_boot=True,
    )
    with Machine(MachineConfig(memory_size=LINUX_MEMORY, cpus=cpus)) as machine:
        machine.boot(description)
        profiler = None if profile_hz is None else GuestProfiler(machine.kickers, profile_hz)
        if profiler is not None:
            profiler.start()
        try:
            outcome = machine.run(boot_timeout())
        finally:
            if profiler is not None:
                profiler.stop()
        samples = machine.vm.rip_samples()
        return Boot(
            outcome,
            machine.serial.transcript().decode(errors="replace"),
            machine.stats(),
            sum(samples.values()),
            summarize(samples, machine.vm.describe_address, top=len(samples)),
            machine.vcpu_positions() if outcome.stopped_from_outside else [],
        )
