"""Multiboot (v1) test kernels of our own, built with GNU binutils at test time.

A kernel is ``boot.S`` (Multiboot header, 32-bit entry, long mode, AP
trampoline, helpers) linked at 4 MiB (or where a test asks) with one body
from this directory that defines ``main``. It leaves through isa-debug-exit:
``main`` returning 0 gives the VMM status 1, a failed check prints ``FAIL: ...``
on COM1 and exits with its own code.

Image layouts, the two a Multiboot loader must handle (Multiboot
Specification 0.6.96, section 3.1.3) and how a newcomer links:

* ``"elf32"``: linked as ELF64, converted by ``objcopy -O elf32-i386``, the way
  kvm-unit-tests builds its x86 ``.flat`` files; loaded from program headers.
* ``"aout"``: a flat binary whose header has flags bit 16 and the address
  fields (header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr).
* ``"plain-ld"``: ``ld -Ttext=ADDRESS`` with binutils' default linker script,
  then ``objcopy -O elf32-i386``: the ELF and program headers land in a
  PT_LOAD of their own just below the text (0xFF000 for text at 1 MiB).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvm_vmm.cli import main
from kvmfast.testing import require_kvm

GUEST_DIR = Path(__file__).parent
BOOT_SOURCE = GUEST_DIR / "boot.S"
LINKER_SCRIPT = GUEST_DIR / "kernel.ld"
LOAD_ADDRESS = 0x400000
TOOLS = ("as", "ld", "objcopy")
# kvm-unit-tests' x86/run passes these two devices to every test.
QEMU_TEST_DEVICES = ("--device", "pc-testdev", "--device", "isa-debug-exit,iobase=0xf4,iosize=0x4")
RUN_TIMEOUT_SECONDS = 30

ImageLayout = Literal["elf32", "aout", "plain-ld"]


class BinutilsMissing(RuntimeError):
    """as, ld or objcopy is not installed (Debian: apt-get install binutils)."""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


@dataclass
class KernelBuilder:
    """Builds kernels into ``work_dir``, each (body, layout) once."""

    work_dir: Path
    built: dict[tuple[str, ImageLayout, int], Path] = field(default_factory=dict)

    def build(
        self, body: str, layout: ImageLayout = "elf32", load_address: int = LOAD_ADDRESS
    ) -> Path:
        """The kernel image of ``<body>.S`` in the given layout, its text at ``load_address``."""
        key = (body, layout, load_address)
        if key not in self.built:
            self.built[key] = self._build(body, layout, load_address)
        return self.built[key]

    def _build(self, body: str, layout: ImageLayout, load_address: int) -> Path:
        missing = missing_tools()
        if missing:
            raise BinutilsMissing(f"building Multiboot test kernels needs {', '.join(missing)}")
        stem = self.work_dir / f"{body}-{layout}-{load_address:x}"
        defines = {
            "elf32": [],
            "aout": ["--defsym", "AOUT_KLUDGE=1"],
            "plain-ld": ["--defsym", "MULTIBOOT_IN_TEXT=1"],
        }[layout]
        boot_object = stem.with_name(f"{stem.name}-boot.o")
        body_object = stem.with_name(f"{stem.name}-body.o")
        assemble = ["as", "--64", "-I", str(GUEST_DIR)]
        _run([*assemble, *defines, "-o", str(boot_object), str(BOOT_SOURCE)])
        _run([*assemble, "-o", str(body_object), str(GUEST_DIR / f"{body}.S")])
        elf = stem.with_suffix(".elf")
        link = ["ld", "-m", "elf_x86_64", "-nostdlib", "-z", "max-page-size=0x1000"]
        if layout == "plain-ld":
            link += [f"-Ttext={load_address:#x}", "-e", "mb_entry"]
        else:
            link += ["--build-id=none", "-T", str(LINKER_SCRIPT)]
            link += [f"--defsym=KERNEL_LOAD_ADDRESS={load_address:#x}"]
        _run([*link, "-o", str(elf), str(boot_object), str(body_object)])
        if layout in ("elf32", "plain-ld"):
            image = stem.with_suffix(".flat")
            _run(["objcopy", "-O", "elf32-i386", str(elf), str(image)])
        else:
            image = stem.with_suffix(".bin")
            _run(["objcopy", "-O", "binary", str(elf), str(image)])
        return image


@dataclass(frozen=True)
class KernelRun:
    """What one ``kvm-vmm run`` of a test kernel gave: exit status, COM1 output, stderr."""

    status: int
    serial: str
    stderr: str

    @property
    def passed(self) -> bool:
        """``main`` returned 0: PASS on COM1, isa-debug-exit with 0, so status (0 << 1) | 1
        (a crash is status 4; the serial and stderr checks say the kernel got that far)."""
        return (
            self.status == 1 and "PASS" in self.serial and "isa-debug-exit: status 1" in self.stderr
        )

    def describe(self) -> str:
        return f"status {self.status}\n--- COM1 ---\n{self.serial}\n--- stderr ---\n{self.stderr}"


@dataclass
class KernelRunner:
    """Runs kernels through the kvm-vmm command in this process, with QEMU's test devices."""

    work_dir: Path
    runs: itertools.count[int] = field(default_factory=itertools.count)

    def run(
        self, kernel: Path, *options: str, devices: Sequence[str] = QEMU_TEST_DEVICES
    ) -> KernelRun:
        require_kvm()
        serial = self.work_dir / f"com1-{next(self.runs)}.txt"
        argv = ["run", "--kernel", str(kernel), *devices, "--serial", f"file:{serial}"]
        argv += ["--timeout", str(RUN_TIMEOUT_SECONDS), "--verbose", *options]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(argv)
        text = serial.read_text(errors="replace") if serial.exists() else ""
        return KernelRun(status, text, stderr.getvalue())
