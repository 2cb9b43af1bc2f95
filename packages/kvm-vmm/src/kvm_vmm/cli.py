"""The ``kvm-vmm`` command: QEMU and Cloud Hypervisor habits, our split irqchip.

    kvm-vmm run --kernel PATH [--initrd PATH] [--cmdline STR] [--memory 512M]
                [--cpus N] [--serial stdio|file:PATH|null] [--device SPEC]...
                [--stats] [--verbose]
    kvm-vmm demo

Exit status: the guest's (0 for a power-off, (v << 1) | 1 for an
isa-debug-exit write of v), 1 when the guest crashed the machine, 2 for a
usage or input error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import kvmfast
from kvm_vmm.console import (
    SerialSpecError,
    open_serial_sink,
    raw_terminal,
    start_stdin_reader,
)
from kvm_vmm.devices import DeviceSpecError
from kvm_vmm.loaders import LoaderError, load_kernel
from kvm_vmm.loaders.image import EntryState
from kvm_vmm.machine import Machine, MachineConfig, MachineConfigError, Outcome
from kvmfast.testing import AssemblerMissing, assemble

USAGE_ERROR = 2
DEMO_LOAD_ADDRESS = 0x100000
DEMO_MEMORY = "64M"
_SIZE = re.compile(r"(?i)^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


def parse_size(text: str) -> int:
    """Bytes from '512M', '2G', '65536K' or a plain number of bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"size {text!r}: expected a number with an optional K, M, G or T suffix")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvm-vmm",
        description="A split-irqchip KVM virtual machine monitor: the LAPIC in the kernel, "
        "the IOAPIC, 8259 PIC pair and 8254 PIT in Python.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="boot a kernel (Linux bzImage/vmlinux or Multiboot)")
    run.add_argument(
        "--kernel", required=True, type=Path, help="bzImage, ELF vmlinux or Multiboot image"
    )
    run.add_argument("--initrd", type=Path, help="initramfs (Linux) or module 0 (Multiboot)")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--memory", default="512M", help="guest RAM, e.g. 512M or 2G (default 512M)")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument(
        "--boot-path",
        choices=("vmlinux", "bzimage"),
        default="vmlinux",
        help="Linux: decompress the payload on the host (vmlinux, default) or let the "
        "kernel decompress itself (bzimage)",
    )
    _add_common(run)

    demo = commands.add_parser("demo", help="boot the built-in demo guest")
    _add_common(demo)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serial",
        default="stdio",
        help="where COM1 goes: stdio (default), file:PATH or null",
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra device in QEMU's spelling: pc-testdev, "
        "isa-debug-exit[,iobase=0xf4][,iosize=0x4] (repeatable)",
    )
    parser.add_argument("--timeout", type=float, help="stop the guest after this many seconds")
    parser.add_argument("--stats", action="store_true", help="print exit counters at the end")
    parser.add_argument("--verbose", action="store_true", help="say what the VMM is doing")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, SerialSpecError, DeviceSpecError, MachineConfigError, LoaderError) as error:
        print(f"kvm-vmm: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except AssemblerMissing as error:
        print(f"kvm-vmm: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as error:
        print(f"kvm-vmm: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _run(args: argparse.Namespace) -> int:
    memory = parse_size(getattr(args, "memory", DEMO_MEMORY))
    cpus: int = getattr(args, "cpus", 1)
    console = open_serial_sink(args.serial)
    machine = Machine(MachineConfig(memory_size=memory, cpus=cpus, console=console))
    try:
        for spec in args.device:
            machine.add_device(spec)
        rsdp = machine.install_acpi_tables()
        if args.command == "demo":
            _load_demo(machine)
        else:
            image = load_kernel(
                args.kernel, memory, args.cmdline, args.initrd, args.boot_path, rsdp
            )
            for note in image.notes:
                print(f"kvm-vmm: note: {note}", file=sys.stderr)
            machine.load(image)
        _say(args, f"{cpus} vCPU(s), {memory >> 20} MiB, serial {args.serial}")
        interactive = args.serial == "stdio" and sys.stdin.isatty()
        if args.serial == "stdio":
            start_stdin_reader(
                machine.platform.uart.receive,
                lambda: machine.finish(Outcome(0, "quit from the console (Ctrl-A x)")),
            )
        started = time.monotonic()
        with raw_terminal(interactive):
            outcome = machine.run(args.timeout)
        elapsed = time.monotonic() - started
        _report(args, machine, outcome, elapsed)
        return outcome.status
    finally:
        machine.close()


def _load_demo(machine: Machine) -> None:
    source = resources.files("kvm_vmm.guests").joinpath("demo.S").read_text()
    code = assemble(source, bits=64, origin=DEMO_LOAD_ADDRESS)
    machine.write_memory(DEMO_LOAD_ADDRESS, code)
    machine.enter(EntryState("long64", DEMO_LOAD_ADDRESS))


def _say(args: argparse.Namespace, message: str) -> None:
    if args.verbose:
        print(f"kvm-vmm: {message}", file=sys.stderr)


def _report(args: argparse.Namespace, machine: Machine, outcome: Outcome, elapsed: float) -> None:
    if outcome.error is not None or (outcome.status != 0 and args.verbose):
        print(f"\nkvm-vmm: {outcome.reason} (status {outcome.status})", file=sys.stderr)
    else:
        _say(args, f"{outcome.reason} after {elapsed:.2f} s")
    error = outcome.error
    if isinstance(error, kvmfast.GuestStop):
        regs = " ".join(f"{name}={value:#x}" for name, value in error.regs.items())
        print(f"kvm-vmm: registers: {regs}", file=sys.stderr)
    if args.stats:
        stats = {"seconds": round(elapsed, 3), "outcome": outcome.reason, **machine.counters()}
        print(json.dumps(stats, indent=2, default=str), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
