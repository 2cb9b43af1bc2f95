"""Assembling small x86 guests from source with GNU as and ld.

The demo guest, the host check's probes, the benchmarks and the tests all write their
guests as assembly; :func:`assemble_program` turns one into a flat image and the
addresses of its global labels.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


class AssemblerMissing(RuntimeError):
    """GNU as or ld is not installed (Debian: apt-get install binutils)."""


class AssemblyError(ValueError):
    """The assembler or linker rejected the source; the message has their output."""


@dataclass(frozen=True)
class GuestProgram:
    """An assembled guest: its flat image and the addresses of its global labels."""

    code: bytes
    origin: int
    symbols: dict[str, int]


def assemble(source: str, *, bits: int = 64, origin: int = 0x1000) -> bytes:
    """Assemble ``source`` into a flat binary loaded at ``origin``.

    The source starts in Intel syntax without register prefixes and in ``bits``-bit
    mode; it may switch with ``.att_syntax`` or ``.code16``/``.code32``/``.code64``.
    Results are cached per (source, bits, origin) for the life of the process.
    """
    return assemble_program(source, bits=bits, origin=origin).code


def assemble_program(source: str, *, bits: int = 64, origin: int = 0x1000) -> GuestProgram:
    """Like :func:`assemble`, and also return the address of every label the source
    declares ``.global``."""
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits}")
    return _assemble_cached(source, bits, origin)


@functools.cache
def _assemble_cached(source: str, bits: int, origin: int) -> GuestProgram:
    tools = {name: shutil.which(name) for name in ("as", "ld", "nm")}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        raise AssemblerMissing(
            f"GNU binutils ({', '.join(missing)}) are needed to build test guests; install binutils"
        )
    prelude = f".intel_syntax noprefix\n.code{bits}\n.text\n"
    with tempfile.TemporaryDirectory(prefix="kvmfast-asm-") as scratch:
        work = Path(scratch)
        (work / "guest.s").write_text(prelude + source + "\n")
        _run_tool([str(tools["as"]), "--64", "-o", str(work / "guest.o"), str(work / "guest.s")])
        link = [str(tools["ld"]), "-m", "elf_x86_64", f"-Ttext={origin:#x}", "-e", f"{origin:#x}"]
        _run_tool(
            [*link, "--oformat", "binary", "-o", str(work / "guest.bin"), str(work / "guest.o")]
        )
        _run_tool([*link, "-o", str(work / "guest.elf"), str(work / "guest.o")])
        listing = _run_tool([str(tools["nm"]), "--defined-only", str(work / "guest.elf")])
        return GuestProgram(
            code=(work / "guest.bin").read_bytes(),
            origin=origin,
            symbols=_global_symbols(listing),
        )


def _global_symbols(nm_listing: str) -> dict[str, int]:
    symbols = {}
    for line in nm_listing.splitlines():
        fields = line.split()
        # Upper-case types are global symbols: "0000000000001000 T entry".
        if len(fields) == 3 and fields[1].isupper():
            symbols[fields[2]] = int(fields[0], 16)
    return symbols


def _run_tool(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tool = Path(command[0]).name
        raise AssemblyError(f"{tool} failed:\n{result.stderr.strip()}")
    return result.stdout
