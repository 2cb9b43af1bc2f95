"""The reader both sides of kvm_vmm.bench_disk run: bench_disk_io.c, built static with
``gcc -static -O2`` at run time, and the lines it prints.

The same binary reads the image on the host and /dev/vdX in the guest, so the two
measure the same loop; its checksum (the first 8 bytes of every 4 KiB read, folded in
order) says whether they read the same bytes.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvm_vmm.static_tool import ToolUnavailable, build_static_tool

READER_SOURCE = "bench_disk_io.c"
MARKER = "DISKBENCH"
PAGE_BYTES = 4096
SEQUENTIAL_BLOCK = 1 << 20

Mode = Literal["seq", "rand"]

_RESULT = re.compile(
    MARKER + r" RESULT (?P<label>\S+) (?P<mode>seq|rand) reads=(?P<reads>\d+) "
    r"bytes=(?P<bytes>\d+) seconds=(?P<seconds>[0-9.]+) checksum=(?P<checksum>[0-9a-f]{16})"
)
_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")


# What bench_disk catches when the reader cannot be built.
ReaderUnavailable = ToolUnavailable


@dataclass(frozen=True)
class ReadResult:
    """One run of the reader: ``reads`` requests of ``bytes`` in all, in ``seconds``."""

    label: str
    mode: Mode
    reads: int
    bytes: int
    seconds: float
    checksum: str

    @property
    def mb_per_s(self) -> float:
        """Decimal megabytes per second, as dd prints them."""
        return self.bytes / self.seconds / 1e6

    @property
    def iops(self) -> float:
        return self.reads / self.seconds

    @property
    def ns_per_read(self) -> float:
        return self.seconds * 1e9 / self.reads


def parse_result(line: str) -> ReadResult | None:
    """The RESULT line's figures; None for any other line."""
    match = _RESULT.search(line)
    if match is None or int(match["reads"]) == 0 or float(match["seconds"]) <= 0:
        return None
    mode: Mode = "seq" if match["mode"] == "seq" else "rand"
    return ReadResult(
        match["label"],
        mode,
        int(match["reads"]),
        int(match["bytes"]),
        float(match["seconds"]),
        match["checksum"],
    )


def build_reader(scratch: Path) -> Path:
    """The reader, a static executable (the guest's initramfs has no C library)."""
    return build_static_tool(READER_SOURCE, scratch, "diskio")


def checked_label(label: str) -> str:
    # Labels go into the guest's shell script and the reader's output lines.
    if not _LABEL.match(label):
        raise ValueError(f"label {label!r}: letters, digits, '_' and '-' only")
    return label


def sequential_args(path: str, label: str, pause_ms: int, *, buffered: bool = False) -> list[str]:
    args = ["seq", path, checked_label(label), str(SEQUENTIAL_BLOCK), str(pause_ms)]
    return args + (["buffered"] if buffered else [])


def random_args(
    path: str, label: str, count: int, seed: int, pause_ms: int, *, buffered: bool = False
) -> list[str]:
    args = ["rand", path, checked_label(label), str(count), str(seed), str(pause_ms)]
    return args + (["buffered"] if buffered else [])


def run_reader(binary: Path, args: list[str]) -> ReadResult:
    """The reader run on the host (no pause: nothing samples around it)."""
    output = subprocess.run(
        [str(binary), *args], capture_output=True, text=True, check=False
    ).stdout
    for line in output.splitlines():
        result = parse_result(line)
        if result is not None:
            return result
    raise RuntimeError(f"the reader printed no result for {' '.join(args)}: {output.strip()}")
