"""Small C programs of this package built static at run time (``gcc -static -O2``): the
guest's busybox initramfs has no C library, and the host runs the same binary so that
both ends of a measurement run the same loop."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path


class ToolUnavailable(RuntimeError):
    """No gcc, or no static C library to link with; the message says which."""


def tool_source(name: str) -> str:
    """The text of the package's C file ``name``."""
    return resources.files("kvm_vmm").joinpath(name).read_text()


def build_static_tool(source_name: str, scratch: Path, binary_name: str) -> Path:
    """``scratch/binary_name``, built from the package's C file ``source_name``."""
    compiler = shutil.which("gcc")
    if compiler is None:
        raise ToolUnavailable("gcc is not installed (Debian: apt-get install gcc libc6-dev)")
    source = scratch / source_name
    source.write_text(tool_source(source_name))
    binary = scratch / binary_name
    built = subprocess.run(
        [compiler, "-static", "-O2", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise ToolUnavailable(
            "gcc -static failed (no static C library? Debian: apt-get install libc6-dev): "
            + built.stderr.strip()[-500:]
        )
    return binary
