"""Boot descriptions as values, and what it takes to put one into a machine.

A description names what to boot (:class:`LinuxBoot`, :class:`MultibootBoot`,
:class:`DemoBoot`); :func:`load_boot` does the rest before the first run: for
Linux the host check and the fast-boot plan (kvm_vmm.fast_boot), the CPUID the
host check hides, the ACPI tables (their address goes into the boot
parameters), the image, and the kernel's own kallsyms for failure reports and
profiles. Nothing here prints: what was decided comes back in a
:class:`BootReport` for a front end to tell.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import kvmfast
from kvm_vmm import board
from kvm_vmm.debian import AssetsUnavailable, ProgressCallback, fetch_guest_assets
from kvm_vmm.fast_boot import LinuxBootPlan, hide_cpuid_flags, plan_linux_boot
from kvm_vmm.hostcheck import host_report
from kvm_vmm.initramfs import busybox_initramfs, demo_init, module_entries
from kvm_vmm.kernel_modules import driver_modules
from kvm_vmm.kernel_symbols import KallsymsNotFound, read_kallsyms, system_map
from kvm_vmm.loaders import (
    ImageFormatError,
    LinuxBootPath,
    LoaderError,
    default_cache_dir,
    kernel_elf,
    load_linux_image,
)
from kvm_vmm.loaders.elf import ELFCLASS64, elf_class, is_elf
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.loaders.image import EntryState, LoadedImage
from kvm_vmm.loaders.linux_header import is_bzimage
from kvm_vmm.loaders.multiboot import load_multiboot
from kvm_vmm.loaders.multiboot_header import find_multiboot_header
from kvmfast.assembler import assemble

# panic=-1: a guest panic resets, which ends the run, instead of leaving it hanging.
DEFAULT_GUEST_CMDLINE = "console=ttyS0 panic=-1"
DEFAULT_GUEST_INITRD = "demo-initramfs.cpio"
DEMO_LOAD_ADDRESS = 0x100000


@dataclass(frozen=True)
class LinuxBoot:
    """A Linux kernel (bzImage or ELF vmlinux), its initramfs and command line.

    ``boot_path``: decompress a bzImage's payload on the host ("vmlinux") or let the
    kernel do it ("bzimage"). ``fast_boot`` adds the switches that skip emulated boot
    work (docs/linux-boot.md); ``host_workarounds`` the switches and CPUID changes
    this host's check asks for (kvm-vmm host-check)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    boot_path: LinuxBootPath = "vmlinux"
    fast_boot: bool = False
    host_workarounds: bool = True


@dataclass(frozen=True)
class MultibootBoot:
    """A Multiboot (v1) kernel. It gets GRUB's command line, its own path then
    ``cmdline``; each module's string is its path."""

    kernel: Path
    cmdline: str = ""
    modules: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DemoBoot:
    """The built-in assembly guest (kvm_vmm/guests/demo.S): a greeting on COM1, ten
    PIT ticks through the IOAPIC, an ACPI power-off."""


BootDescription = LinuxBoot | MultibootBoot | DemoBoot


@dataclass(frozen=True)
class BootReport:
    """What loading decided: the Linux plan (None for other kernels), the loader's
    notes, and where function names came from (empty when none were looked for)."""

    plan: LinuxBootPlan | None = None
    notes: tuple[str, ...] = ()
    symbols: str = ""


def describe_boot(description: BootDescription) -> dict[str, object]:
    """What was booted, as JSON-able data (a snapshot records it for people)."""
    fields = {
        name: [str(item) for item in value] if isinstance(value, tuple) else value
        for name, value in dataclasses.asdict(description).items()
    }
    plain = {name: str(v) if isinstance(v, Path) else v for name, v in fields.items()}
    return {"kind": type(description).__name__, **plain}


def is_linux_image(image: bytes) -> bool:
    """What load_kernel boots as Linux: a bzImage, or an ELF64 without a Multiboot header."""
    if is_bzimage(image):
        return True
    return find_multiboot_header(image) is None and is_elf(image) and elf_class(image) == ELFCLASS64


def describe_kernel(
    kernel: Path,
    *,
    initrd: Path | None = None,
    cmdline: str = "",
    boot_path: LinuxBootPath = "vmlinux",
    fast_boot: bool = False,
    host_workarounds: bool = True,
) -> LinuxBoot | MultibootBoot:
    """The description of whatever ``kernel`` holds, as QEMU's -kernel decides: a
    bzImage or ELF64 boots as Linux, an image with a Multiboot header as Multiboot
    (``initrd`` becomes module 0)."""
    image = read_boot_file(kernel, "kernel")
    if is_linux_image(image):
        return LinuxBoot(kernel, initrd, cmdline, boot_path, fast_boot, host_workarounds)
    if find_multiboot_header(image) is not None:
        return MultibootBoot(kernel, cmdline, () if initrd is None else (initrd,))
    raise ImageFormatError(
        f"kernel {str(kernel)!r} is not a bzImage ('HdrS' at offset 0x202), an ELF64 "
        "vmlinux, nor a Multiboot image (magic 0x1BADB002 in its first 8192 bytes); "
        f"it starts with {image[:8].hex(' ')}"
    )


def default_guest(
    cache_dir: Path | None = None,
    *,
    fast_boot: bool = True,
    progress: ProgressCallback | None = None,
) -> LinuxBoot:
    """Debian's cloud kernel with a busybox shell as /init, fetched with apt-get the
    first time and kept in ``cache_dir`` (None: $XDG_CACHE_HOME/kvm-vmm or
    ~/.cache/kvm-vmm), with its initramfs written there too: the kernel's virtio
    modules, loaded by /init, which mounts the first virtio disk at /mnt. Raises
    AssetsUnavailable when there is no cache directory or no apt."""
    directory = cache_dir if cache_dir is not None else default_cache_dir(os.environ)
    if directory is None:
        raise AssetsUnavailable(
            "the default guest is kept in the user's cache directory, and neither $HOME nor "
            "$XDG_CACHE_HOME is set: pass --kernel PATH (and --initrd PATH)"
        )
    assets = fetch_guest_assets(directory, progress)
    # The cache names each module <name>.ko (kvm_vmm.debian).
    modules = [(path.stem, read_boot_file(path, "module")) for path in assets.modules]
    initrd = busybox_initramfs(
        read_boot_file(assets.busybox, "busybox"),
        demo_init([name for name, _ in modules], driver_modules(modules)),
        module_entries(modules),
    )
    initrd_path = assets.busybox.parent / DEFAULT_GUEST_INITRD
    _write_if_changed(initrd_path, initrd)
    return LinuxBoot(
        assets.kernel, initrd=initrd_path, cmdline=DEFAULT_GUEST_CMDLINE, fast_boot=fast_boot
    )


def _write_if_changed(path: Path, data: bytes) -> None:
    """Two runs may build the same file at once: each renames a whole file of its own."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, delete=False) as out:
        out.write(data)
    os.replace(out.name, path)


class BootTarget(Protocol):
    """What loading needs of a machine (kvm_vmm.machine.Machine)."""

    @property
    def vcpus(self) -> Sequence[kvmfast.Vcpu]: ...
    @property
    def kvm(self) -> kvmfast.Kvm: ...
    @property
    def vm(self) -> kvmfast.Vm: ...
    def install_acpi_tables(self) -> int: ...
    def load(self, image: LoadedImage) -> None: ...
    def leave_bios_state(self, image: LoadedImage) -> None: ...
    def write_memory(self, gpa: int, data: bytes) -> None: ...
    def enter(self, entry: EntryState) -> None: ...
    def load_symbol_map(self, text: str) -> int: ...


def load_boot(
    target: BootTarget,
    description: BootDescription,
    ram_size: int,
    *,
    cache_dir: Path | None,
    kernel_symbols: bool = True,
) -> BootReport:
    """Put ``description`` into ``target`` (not yet run). ``cache_dir`` keeps the host
    check and host-decompressed kernels (None: no cache); ``kernel_symbols`` reads a
    Linux kernel's kallsyms into the VM's symbol table."""
    if isinstance(description, DemoBoot):
        target.install_acpi_tables()
        _load_demo(target)
        return BootReport()
    if isinstance(description, MultibootBoot):
        target.install_acpi_tables()
        cmdline = multiboot_command_line(description.kernel, description.cmdline)
        image = load_multiboot(description.kernel, ram_size, cmdline, description.modules)
        target.load(image)
        target.leave_bios_state(image)  # what QEMU's SeaBIOS leaves (kvm_vmm.bios_state)
        return BootReport(notes=tuple(image.notes))
    return _load_linux(target, description, ram_size, cache_dir, kernel_symbols)


def _load_linux(
    target: BootTarget,
    boot: LinuxBoot,
    ram_size: int,
    cache_dir: Path | None,
    kernel_symbols: bool,
) -> BootReport:
    kernel = read_boot_file(boot.kernel, "kernel")
    initrd = None if boot.initrd is None else read_boot_file(boot.initrd, "initrd")
    plan = plan_linux_boot(
        boot.cmdline,
        fast_boot=boot.fast_boot,
        host=host_report(cache_dir),
        host_workarounds=boot.host_workarounds,
    )
    if plan.hidden_cpuid:
        hide_cpuid_flags(target.vcpus, target.kvm.supported_cpuid(), plan.hidden_cpuid)
    rsdp = target.install_acpi_tables()
    image = load_linux_image(
        kernel, ram_size, plan.cmdline, initrd, boot.boot_path, rsdp, cache_dir
    )
    symbols = _load_kernel_symbols(target, kernel, ram_size, cache_dir) if kernel_symbols else ""
    target.load(image)
    return BootReport(plan=plan, notes=tuple(image.notes), symbols=symbols)


def multiboot_command_line(kernel_path: Path, cmdline: str) -> str:
    """The command line a Multiboot kernel gets: its own path, a space, then ``cmdline``.

    GRUB and QEMU's ``-kernel`` both put the kernel's path first, and kernels
    built for them (kvm-unit-tests among them) take that first word as argv[0]
    and their arguments after it.
    """
    return f"{kernel_path} {cmdline}"


def _load_kernel_symbols(
    target: BootTarget, image: bytes, ram_size: int, cache_dir: Path | None
) -> str:
    """The kernel's own kallsyms name functions in failure reports, stopped vCPUs and
    profiles (docs/linux-boot.md); a kernel whose tables are not found boots all the
    same."""
    try:
        symbols = read_kallsyms(kernel_elf(image, ram_size, cache_dir))
    except (KallsymsNotFound, LoaderError) as reason:
        return f"no symbols from the kernel image ({reason}); --symbols FILE names them"
    count = target.load_symbol_map(system_map(symbols))
    return f"{count} symbols from the kernel image's kallsyms"


def _load_demo(target: BootTarget) -> None:
    source = resources.files("kvm_vmm.guests").joinpath("demo.S").read_text()
    # The board's facts the demo uses, from the one platform table.
    symbols = (
        f".set IOAPIC_BASE, {board.IOAPIC_ADDRESS:#x}\n"
        f".set PM1A_CNT_BLK, {board.PM1A_CNT_BLK:#x}\n"
        f".set SLP_TYP_S5, {board.SLP_TYP_S5}\n"
    )
    code = assemble(symbols + source, bits=64, origin=DEMO_LOAD_ADDRESS)
    target.write_memory(DEMO_LOAD_ADDRESS, code)
    target.enter(EntryState("long64", DEMO_LOAD_ADDRESS))
