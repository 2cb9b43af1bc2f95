"""Measure what each --fast-boot switch saves: boot the default guest's kernel with
the test initramfs and the host's workarounds, with the whole preset, with the
preset less each of its switches, and with the preset plus each other candidate;
print one JSON line per boot: how long it ran to its end (power-off, or with
``panic=-1`` a reset when init dies, e.g. at the host's SYSCALL quirk), its
milestones, exits and completed instructions.

    python tests/boot/measure_fast_boot.py [--timeout 900] [--repeat 1] [CANDIDATE ...]

Results go to docs/linux-boot.md by hand, with the date and the host check's verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from kvm_vmm.debian import fetch_guest_assets
from kvm_vmm.fast_boot import FAST_BOOT_PRESET
from kvm_vmm.initramfs import TEST_INIT, busybox_initramfs
from kvm_vmm.loaders import default_cache_dir

OTHER_CANDIDATES = ("mitigations=off", "no_timer_check", "audit=0")


def boot(
    kernel: Path, initrd: Path, cmdline: str, timeout: float, log: Path, cpus: int
) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "kvm_vmm.cli",
        "run",
        "--kernel",
        str(kernel),
        "--initrd",
        str(initrd),
        "--cmdline",
        cmdline,
        "--serial",
        f"file:{log}",
        "--stats",
        "--timeout",
        str(timeout),
        "--cpus",
        str(cpus),
    ]
    log.unlink(missing_ok=True)
    # CPU time, unlike wall time, hardly changes when other work shares the host.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    stats_start = result.stderr.rfind("\n{")
    if stats_start < 0:
        return {"status": result.returncode, "error": result.stderr[-500:], "cpu_seconds": cpu}
    stats: dict[str, object] = json.loads(result.stderr[stats_start:])
    stats["status"] = result.returncode
    stats["cpu_seconds"] = cpu
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("candidates", nargs="*", default=list(OTHER_CANDIDATES))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--base", default="console=ttyS0 panic=-1")
    parser.add_argument(
        "--only", action="append", default=[], help="run only these variants (repeatable)"
    )
    args = parser.parse_args()
    cache = default_cache_dir(os.environ)
    assert cache is not None, "needs $HOME or $XDG_CACHE_HOME"
    assets = fetch_guest_assets(cache)
    with tempfile.TemporaryDirectory() as scratch:
        initrd = Path(scratch) / "test.cpio"
        initrd.write_bytes(busybox_initramfs(assets.busybox.read_bytes(), TEST_INIT))
        preset = [switch.text for switch in FAST_BOOT_PRESET]
        variants = [("preset", preset)]
        variants += [(f"preset - {s}", [p for p in preset if p != s]) for s in preset]
        variants += [(f"preset + {c}", [*preset, c]) for c in args.candidates]
        if args.only:
            variants = [(name, switches) for name, switches in variants if name in args.only]
        for name, switches in variants:
            for attempt in range(args.repeat):
                log = Path(scratch) / "console.log"
                cmdline = " ".join([args.base, *switches])
                stats = boot(assets.kernel, initrd, cmdline, args.timeout, log, args.cpus)
                console = log.read_bytes() if log.exists() else b""
                row = {
                    "variant": name,
                    "cpus": args.cpus,
                    "attempt": attempt,
                    "seconds": stats.get("seconds"),
                    "cpu_seconds": stats.get("cpu_seconds"),
                    "outcome": str(stats.get("outcome", ""))[:60],
                    "exits": stats.get("exits"),
                    "completions": stats.get("completions"),
                    "milestones": stats.get("milestones"),
                    "console_bytes": len(console),
                    "error": stats.get("error"),
                }
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
