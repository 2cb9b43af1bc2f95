"""kvm_vmm.boot: boot descriptions as values, the default guest from its cache, and
Machine.boot() loading each kind (Linux only up to "loaded and entered")."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from test_cli import _multiboot_kernel
from test_linux_loader import PHYS, VMLINUX, ZERO_PAGE

from kvm_vmm import layout
from kvm_vmm.boot import (
    DEFAULT_GUEST_CMDLINE,
    DemoBoot,
    LinuxBoot,
    MultibootBoot,
    default_guest,
    describe_kernel,
)
from kvm_vmm.console import CaptureSink
from kvm_vmm.debian import MANIFEST_FORMAT, MANIFEST_NAME, SUBDIRECTORY, AssetsUnavailable
from kvm_vmm.fast_boot import FAST_BOOT_PRESET
from kvm_vmm.initramfs import busybox_initramfs, demo_init, module_entries
from kvm_vmm.loaders import ImageFormatError
from kvm_vmm.machine import Machine, MachineConfig, MachineStateError
from kvm_vmm.testing import fake_module
from kvmfast.testing import require_kvm

# struct boot_params (Documentation/arch/x86/zero-page.rst, boot.rst)
BOOT_PARAMS_ACPI_RSDP = 0x070
BOOT_PARAMS_CMD_LINE_PTR = 0x228


def _cached_assets(cache: Path) -> Path:
    """A cache as fetch_guest_assets leaves it; returns its directory."""
    directory = cache / SUBDIRECTORY
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"MZ kernel bytes")
    (directory / "busybox").write_bytes(b"\x7fELF busybox")
    (directory / "modules").mkdir()
    (directory / "modules/virtio_ring.ko").write_bytes(fake_module("virtio_ring"))
    (directory / "modules/virtio.ko").write_bytes(fake_module("virtio", "virtio_ring"))
    manifest = {
        "format": MANIFEST_FORMAT,
        "kernel": "vmlinuz",
        "busybox": "busybox",
        "kernel_package": "linux-image-6.1.0-9-cloud-amd64",
        "busybox_package": "busybox-static_1:1.35.0-4_amd64",
        "modules": ["modules/virtio_ring.ko", "modules/virtio.ko"],
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def test_the_default_guest_is_the_cached_kernel_and_a_shell_initramfs_written_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-apt-here"))  # a fetch would fail
    directory = _cached_assets(tmp_path / "cache")
    guest = default_guest(tmp_path / "cache")
    assert guest.kernel == directory / "vmlinuz"
    assert guest.cmdline == DEFAULT_GUEST_CMDLINE and guest.fast_boot
    assert guest.initrd is not None and guest.initrd.parent == directory
    modules = [
        ("virtio_ring", fake_module("virtio_ring")),
        ("virtio", fake_module("virtio", "virtio_ring")),
    ]
    assert guest.initrd.read_bytes() == busybox_initramfs(
        b"\x7fELF busybox", demo_init(["virtio_ring", "virtio"], {}), module_entries(modules)
    )
    written = guest.initrd.stat().st_mtime_ns
    assert default_guest(tmp_path / "cache", fast_boot=False) == LinuxBoot(
        guest.kernel, guest.initrd, DEFAULT_GUEST_CMDLINE, fast_boot=False
    )
    assert guest.initrd.stat().st_mtime_ns == written  # unchanged: not written again


def test_the_default_guest_without_a_cache_directory_says_what_to_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with pytest.raises(AssetsUnavailable, match="--kernel PATH"):
        default_guest()


def test_a_kernel_is_described_as_linux_or_multiboot_by_its_contents(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(VMLINUX)
    initrd = tmp_path / "initrd"
    assert describe_kernel(vmlinux, initrd=initrd, cmdline="quiet", fast_boot=True) == LinuxBoot(
        vmlinux, initrd, "quiet", fast_boot=True
    )
    multiboot = _multiboot_kernel(tmp_path, "")
    assert describe_kernel(multiboot, initrd=initrd, cmdline="a b") == MultibootBoot(
        multiboot, "a b", (initrd,)
    )
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ImageFormatError, match=r"not a bzImage .* nor a Multiboot image"):
        describe_kernel(junk)


@pytest.mark.kvm
def test_a_linux_boot_is_planned_loaded_and_entered_with_acpi_tables(tmp_path: Path) -> None:
    require_kvm()
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(VMLINUX)
    with Machine(MachineConfig(memory_size=64 * layout.MIB)) as machine:
        report = machine.boot(
            LinuxBoot(vmlinux, cmdline="console=ttyS0", fast_boot=True), cache_dir=tmp_path
        )
        assert report.plan is not None
        assert report.plan.cmdline.startswith("console=ttyS0 ")
        assert report.plan.fast_boot == tuple(switch.text for switch in FAST_BOOT_PRESET)
        assert report.symbols.startswith("no symbols from the kernel image")
        regs = machine.vcpus[0].get_regs()
        assert regs["rip"] == PHYS and regs["rsi"] == ZERO_PAGE
        zero_page = machine.read_memory(ZERO_PAGE, 0x1000)
        rsdp = struct.unpack_from("<Q", zero_page, BOOT_PARAMS_ACPI_RSDP)[0]
        assert machine.read_memory(rsdp, 8) == b"RSD PTR "
        cmdline_at = struct.unpack_from("<I", zero_page, BOOT_PARAMS_CMD_LINE_PTR)[0]
        assert machine.read_memory(cmdline_at, len(report.plan.cmdline)) == (
            report.plan.cmdline.encode()
        )


@pytest.mark.kvm
def test_a_multiboot_kernel_boots_and_runs_to_its_debug_exit(tmp_path: Path) -> None:
    require_kvm()
    kernel = _multiboot_kernel(tmp_path, "")
    with Machine(MachineConfig(memory_size=32 * layout.MIB)) as machine:
        machine.add_device_option("isa-debug-exit,iobase=0xf4,iosize=0x4")
        report = machine.boot(MultibootBoot(kernel, "x"), cache_dir=tmp_path)
        assert report.plan is None
        outcome = machine.run(30)
    assert outcome.status == (0x20 << 1) | 1, outcome


@pytest.mark.kvm
def test_the_tiny_demo_boots_and_powers_off(tmp_path: Path) -> None:
    require_kvm()
    console = CaptureSink()
    with Machine(MachineConfig(memory_size=64 * layout.MIB, console=console)) as machine:
        machine.boot(DemoBoot(), cache_dir=tmp_path)
        outcome = machine.run(60)
    assert outcome.reason == "guest powered off", outcome
    assert b"Hello from a split-irqchip guest" in console.data


@pytest.mark.kvm
def test_boot_after_start_is_a_state_error(tmp_path: Path) -> None:
    require_kvm()
    with Machine(MachineConfig(memory_size=64 * layout.MIB)) as machine:
        machine.boot(DemoBoot(), cache_dir=tmp_path)
        machine.start()
        with pytest.raises(MachineStateError, match=r"^boot\(\) on a machine that is not created"):
            machine.boot(DemoBoot(), cache_dir=tmp_path)
