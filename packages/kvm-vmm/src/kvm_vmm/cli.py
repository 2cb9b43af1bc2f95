"""The ``kvm-vmm`` command: QEMU and Cloud Hypervisor habits, our split irqchip.

    kvm-vmm run [--kernel PATH] [--initrd PATH] [--cmdline STR] [--memory 512M]
                [--cpus N] [--serial stdio|file:PATH|null] [--device SPEC]...
                [--fast-boot] [--no-host-workarounds] [--stats] [--quiet] [--verbose]
                [--api-socket PATH]
    kvm-vmm demo [--tiny] [--cmdline STR] [--memory SIZE] [--cpus N] [--cold] ...
    kvm-vmm restore DIR [--force] [--restore-mode private|copy] [--serial ...]
                [--api-socket PATH] [--timeout S] [--stats] [--quiet] [--verbose]
    kvm-vmm remote --api-socket PATH info|pause|resume|snapshot DIR|counters|shutdown|stop
    kvm-vmm host-check [--refresh] [--json] [--verbose]
    kvm-vmm qemu QEMU-ARGS...   (also the script kvm-vmm-qemu-system-x86_64)

Without --kernel, ``run`` and ``demo`` boot the default guest: Debian's cloud
kernel and a busybox shell, fetched with apt-get the first time (cached);
``demo --tiny`` is the built-in assembly guest. Exit status: RUN_STATUSES
below (``kvm-vmm run --help`` prints it); host-check: 1 when a check FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import kvmfast
from kvm_devices.interfaces import ByteSink
from kvm_vmm.api_client import COMMANDS, remote
from kvm_vmm.api_socket import ApiServer
from kvm_vmm.boot import (
    BootDescription,
    BootReport,
    DemoBoot,
    LinuxBoot,
    default_guest,
    describe_kernel,
)
from kvm_vmm.console import (
    SerialSpecError,
    open_serial_sink,
    raw_terminal,
    start_stdin_reader,
)
from kvm_vmm.debian import AssetsUnavailable, default_progress
from kvm_vmm.device_options import DeviceSpecError
from kvm_vmm.disk_options import DiskSpecError
from kvm_vmm.fast_boot import with_switches
from kvm_vmm.hostcheck import HostReport, cache_file, host_identity, host_report
from kvm_vmm.loaders import LoaderError, default_cache_dir
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.machine import (
    STATUS_GUEST_CRASHED,
    STATUS_INTERRUPTED,
    STATUS_POWERED_OFF,
    STATUS_TIMED_OUT,
    Machine,
    MachineConfig,
    MachineConfigError,
    Outcome,
    kvm_vmm_version,
)
from kvm_vmm.net_options import NetSpecError, parse_net_spec
from kvm_vmm.profiler import DEFAULT_HZ, MAX_PROFILE_HZ, GuestProfiler, summarize
from kvm_vmm.qemu_frontend import (
    PROGRAM,
    QemuAnswer,
    QemuRun,
    QemuUsageError,
    host_cpu_note,
    kernel_load_error,
    translate,
)
from kvm_vmm.resources import ResourceError
from kvm_vmm.signals import Terminated, ending_run, raising_terminated, status_of_signal
from kvm_vmm.snapshot import SnapshotError
from kvm_vmm.snapshot.host_facts import cpu_model
from kvm_vmm.status_line import StatusLine, machine_status, showing, terminal_status_line
from kvm_vmm.vsock_options import VsockSpecError, parse_vsock_spec
from kvm_vmm.warm_start import WarmStartCache, snapshot_at_prompt, warm_start_key
from kvmfast.assembler import AssemblerMissing

USAGE_ERROR = 2
HOST_CHECK_FAILED = 1
DEMO_MEMORY = "64M"
LINUX_MEMORY = "512M"
_SIZE = re.compile(r"(?i)^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Every status is distinct from the others: a crash is even and no debug-exit write
# (always odd) nor power-off can produce it.
RUN_STATUSES = f"""exit status:
  {STATUS_POWERED_OFF}        the guest powered off or asked for a reset; stopped from the console
  (v<<1)|1 an isa-debug-exit write of v: always odd (v=0: 1, v=1: 3, ...)
  {USAGE_ERROR}        usage or input error: a bad option, an unreadable or unknown kernel
  {STATUS_GUEST_CRASHED}        the guest crashed the machine: a triple fault, an instruction nobody
           can complete, an unexpected exit, a device's failure
  {STATUS_TIMED_OUT}      --timeout fired
  128+n    ended by signal n, loading or running ({STATUS_INTERRUPTED}: Ctrl-C, 143: SIGTERM,
           129: SIGHUP)
"""


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

    run = commands.add_parser(
        "run",
        help="boot a kernel (Linux bzImage/vmlinux or Multiboot)",
        epilog=RUN_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--kernel",
        type=Path,
        help="bzImage, ELF vmlinux or Multiboot image (default: the default guest, "
        "Debian's cloud kernel with a busybox shell)",
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
    run.add_argument(
        "--fast-boot",
        action="store_true",
        help="Linux: add the switches that skip emulated boot work (docs/linux-boot.md)",
    )
    _add_common(run)

    demo = commands.add_parser(
        "demo", help="boot the default guest: Debian's cloud kernel to a busybox shell"
    )
    demo.add_argument(
        "--tiny", action="store_true", help="the built-in assembly guest instead (no download)"
    )
    demo.add_argument(
        "--cmdline",
        default="",
        help="words added to the kernel command line, e.g. "
        "ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off (the /init sets eth0 from ip=)",
    )
    demo.add_argument("--memory", help=f"guest RAM (default {LINUX_MEMORY}; --tiny {DEMO_MEMORY})")
    demo.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    demo.add_argument(
        "--cold",
        action="store_true",
        help="boot even if a snapshot of the demo's shell is cached (it is taken again)",
    )
    _add_common(demo)

    restore = commands.add_parser(
        "restore",
        help="continue a snapshot (kvm-vmm remote snapshot DIR) in this process",
        epilog=RUN_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    restore.add_argument("directory", type=Path, metavar="DIR", help="the snapshot's directory")
    restore.add_argument(
        "--force",
        action="store_true",
        help="restore even over a disk image that changed since the snapshot",
    )
    restore.add_argument(
        "--restore-mode",
        choices=("private", "copy"),
        default="private",
        help="guest RAM: map the memory file copy-on-write, pages loading as the guest "
        "touches them (private, default), or read it all in first (copy)",
    )
    _add_run_options(restore)

    check = commands.add_parser(
        "host-check", help="probe what this host's KVM does for guests (PASS/WARN/FAIL)"
    )
    check.add_argument("--refresh", action="store_true", help="probe again, ignore the cache")
    check.add_argument("--json", action="store_true", help="the report as JSON")
    check.add_argument(
        "--verbose", action="store_true", help="also the Linux switches and CPUID it implies"
    )
    control = commands.add_parser(
        "remote",
        help="control a running kvm-vmm through its --api-socket (docs/api-socket.md)",
        description="Send one command to the API socket of `kvm-vmm run --api-socket PATH` "
        "and print its JSON reply. Exit status 0: done; 1: an error reply (on stderr); "
        "2: a usage error or no server at PATH.",
    )
    control.add_argument("--api-socket", required=True, metavar="PATH", help="the socket")
    control.add_argument("remote_command", metavar="COMMAND", choices=tuple(COMMANDS))
    control.add_argument("argument", nargs="?", metavar="ARG", help="snapshot: the directory")
    # Listed for --help; main() hands its arguments to qemu_main before argparse,
    # which would take QEMU's single-dash options for its own.
    commands.add_parser(
        "qemu",
        help="QEMU's command line (kvm-unit-tests' x86/run), mapped onto run",
        add_help=False,
    ).add_argument("qemu_args", nargs=argparse.REMAINDER)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    _add_run_options(parser)
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra device in QEMU's spelling: pc-testdev, pci-testdev, "
        "isa-debug-exit[,iobase=0xf4][,iosize=0x4] (repeatable)",
    )
    parser.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="SPEC",
        help="a raw image as a virtio-blk disk (/dev/vda, vdb...): "
        "path=FILE[,readonly=on][,serial=ID][,direct=on], or FILE (repeatable)",
    )
    parser.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="SPEC",
        help="a virtio-net device on a TAP: tap=NAME[,mac=52:54:00:12:34:56][,queues=2]; "
        "without tap= the kernel makes one and its name is printed (repeatable)",
    )
    parser.add_argument(
        "--vsock",
        action="append",
        default=[],
        metavar="SPEC",
        help="a virtio-vsock device: cid=N,socket=PATH (a host client of PATH writes "
        "'CONNECT <port>' to reach the guest; the guest reaches PATH_<port> on the host)",
    )
    parser.add_argument(
        "--rng",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a virtio-rng device fed by the host's getrandom() (default: on for Linux guests)",
    )
    parser.add_argument(
        "--no-host-workarounds",
        action="store_true",
        help="Linux: do not add the switches or CPUID changes the host check asks for",
    )
    parser.add_argument(
        "--symbols",
        type=Path,
        metavar="FILE",
        help="System.map or /proc/kallsyms-format file: name the function of an "
        "instruction nobody can complete, of a stopped vCPU's RIP, of --profile's samples "
        "(default for a Linux kernel: the kallsyms tables in its own image, where found)",
    )
    parser.add_argument(
        "--no-emulation-fallback",
        action="store_true",
        help="stop at the first instruction the host's KVM cannot emulate, as QEMU does, "
        "instead of completing it in kvmfast",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """What run, demo and restore share: where the guest's console goes and how its
    run is watched and ended."""
    parser.add_argument(
        "--serial",
        default="stdio",
        help="where COM1 goes: stdio (default), file:PATH (truncated first) or null",
    )
    parser.add_argument("--timeout", type=float, help="stop the guest after this many seconds")
    parser.add_argument(
        "--api-socket",
        metavar="PATH",
        help="serve the control API (HTTP/JSON: kvm-vmm remote, curl --unix-socket) on a "
        "Unix socket at PATH, owner-only, for the run (docs/api-socket.md)",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print at exit: exits by reason and by device, the boot's milestones",
    )
    parser.add_argument(
        "--profile",
        type=_profile_rate,
        nargs="?",
        const=DEFAULT_HZ,
        metavar="HZ",
        help=f"sample each vCPU's RIP HZ times a second (default {DEFAULT_HZ:g}) and print, "
        "at exit, where the guest spent its time (by function with --symbols)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no live status line (elapsed time, milestone, guest function) on a terminal",
    )
    parser.add_argument("--verbose", action="store_true", help="say what the VMM is doing")


def _profile_rate(text: str) -> float:
    try:
        hz = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of samples a second") from None
    if not 0 < hz <= MAX_PROFILE_HZ:
        raise argparse.ArgumentTypeError(f"{text} Hz: between 0 and {MAX_PROFILE_HZ:g}")
    return hz


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["qemu"]:
        return qemu_main(argv[1:])
    args = build_parser().parse_args(argv)
    return _reporting_errors(lambda: _run(args))


def _reporting_errors(action: Callable[[], int]) -> int:
    """``action``'s status; a signal or a usage or input error as its status, in one line."""
    try:
        with raising_terminated():
            return action()
    except (KeyboardInterrupt, Terminated) as ended:
        # Before the guest ran, or while its run was being wound up (kvm_vmm.signals).
        number = ended.number if isinstance(ended, Terminated) else signal.SIGINT
        print(f"kvm-vmm: stopped by {signal.Signals(number).name}", file=sys.stderr)
        return status_of_signal(number)
    except (
        UsageError,
        SerialSpecError,
        DeviceSpecError,
        DiskSpecError,
        NetSpecError,
        VsockSpecError,
        kvmfast.VirtioError,
        ResourceError,
        MachineConfigError,
        LoaderError,
        AssetsUnavailable,
        SnapshotError,
    ) as error:
        print(f"kvm-vmm: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except AssemblerMissing as error:
        print(f"kvm-vmm: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as error:
        print(f"kvm-vmm: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def qemu_main(argv: Sequence[str] | None = None) -> int:
    """kvm-vmm-qemu-system-x86_64: a QEMU command line (kvm_vmm.qemu_frontend) run as
    ``kvm-vmm run`` runs it; what is not honoured is said in one warning line each."""
    try:
        translated = translate(sys.argv[1:] if argv is None else argv)
    except QemuUsageError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if isinstance(translated, QemuAnswer):
        # Harnesses read only the first line (kvm-unit-tests: `$qemu -h | head -1`):
        # a closed pipe ends the answer quietly, as it ends a C program.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        print(translated.text)
        return 0
    return _reporting_errors(lambda: _qemu_run(translated))


def _qemu_run(translated: QemuRun) -> int:
    if (load_error := kernel_load_error(translated)) is not None:
        print(f"{PROGRAM}: {load_error}", file=sys.stderr)
        return USAGE_ERROR
    notes = list(translated.notes)
    if translated.cpu is not None:
        note = host_cpu_note(translated.cpu, translated.cpus, default_cache_dir(os.environ))
        notes += [] if note is None else [note]
    for note in notes:
        print(f"{PROGRAM}: warning: {note}", file=sys.stderr)
    return _run(build_parser().parse_args(["run", *translated.run_args]))


def _stderr_fd() -> int:
    """sys.stderr's descriptor, or -1 (no terminal, so no status line) when a caller has
    replaced it with a stream of its own (contextlib.redirect_stderr in tests, embedding)."""
    try:
        return sys.stderr.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return -1


def _run(args: argparse.Namespace) -> int:
    if args.command == "host-check":
        return _host_check(args)
    if args.command == "remote":
        return remote(args.api_socket, args.remote_command, args.argument)
    if args.command == "restore":
        return _restore(args)
    tiny = args.command == "demo" and args.tiny
    if tiny and args.cmdline:
        raise UsageError("--cmdline: the --tiny guest has no kernel command line")
    default_memory = DEMO_MEMORY if tiny else LINUX_MEMORY
    memory = parse_size(getattr(args, "memory", None) or default_memory)
    cpus: int = args.cpus
    cache_dir = default_cache_dir(os.environ)
    status = terminal_status_line(_stderr_fd(), not args.quiet)
    warm: DemoSnapshot | None = None
    description: BootDescription | None = None
    if args.command == "demo" and not tiny and not args.disk and args.symbols is None:
        description = _describe_boot(args, cache_dir)
        warm = _demo_snapshot(args, description, memory, cache_dir)
        if warm is not None and not args.cold:
            restored = _warm_demo(args, warm, status)
            if restored is not None:
                return restored
    console = _console(args, status)
    machine = Machine(
        MachineConfig(
            memory_size=memory,
            cpus=cpus,
            console=console,
            emulation_fallback=not args.no_emulation_fallback,
        )
    )
    api: ApiServer | None = None
    try:
        api = _serve_api(args, machine)  # before the boot: a taken path fails at once
        if args.symbols is not None:
            try:
                count = machine.load_symbols(args.symbols)
            except OSError as error:
                raise UsageError(f"--symbols {args.symbols}: {error.strerror}") from None
            _say(args, f"{count} symbols from {args.symbols}")
        for spec in args.device:
            machine.add_device_option(spec)
        for spec in args.disk:
            machine.add_disk_option(spec)
        for spec in args.net:
            _add_net(machine, spec)
        if len(args.vsock) > 1:
            raise UsageError("--vsock: one device at most (a guest has one CID)")
        for spec in args.vsock:
            vsock = parse_vsock_spec(spec)
            machine.add_vsock(vsock.cid, vsock.socket)
        # Only input that is known good is worth a download.
        if description is None:
            description = DemoBoot() if tiny else _describe_boot(args, cache_dir)
        if args.rng or (args.rng is None and isinstance(description, LinuxBoot)):
            machine.add_rng()
        _tell_boot(args, machine.boot(description, cache_dir=cache_dir))
        _say(args, f"{cpus} vCPU(s), {memory >> 20} MiB, serial {args.serial}")
        if warm is not None:
            print(
                "kvm-vmm: booting the demo (minutes where guest kernel code is emulated);"
                " its shell is kept as a snapshot, and the next run starts there",
                file=sys.stderr,
            )
            destination = warm.cache.prepare(warm.key)
            snapshot_at_prompt(machine, destination, lambda line: _say(args, line))
        return _run_machine(args, machine, status)
    finally:
        if api is not None:
            api.close()  # a request still being answered gets its reply first
        machine.close()


def _console(args: argparse.Namespace, status: StatusLine | None) -> ByteSink:
    console: ByteSink = open_serial_sink(args.serial)
    if status is not None and args.serial == "stdio" and sys.stdout.isatty():
        console = status.guard(console)  # the guest's output erases the line first
    return console


def _serve_api(args: argparse.Namespace, machine: Machine) -> ApiServer | None:
    if args.api_socket is None:
        return None
    api = ApiServer(machine, args.api_socket)
    api.start()
    _say(args, f"API socket {args.api_socket}")
    return api


def _restore(args: argparse.Namespace) -> int:
    """``kvm-vmm restore DIR``: the snapshot's machine, run from where it was paused."""
    status = terminal_status_line(_stderr_fd(), not args.quiet)
    console = _console(args, status)
    started = time.monotonic()
    machine = Machine.restore(
        args.directory, console=console, force=args.force, copy=args.restore_mode == "copy"
    )
    _say(args, f"restored {args.directory} in {time.monotonic() - started:.3f} s")
    return _run_restored(args, machine, status)


def _run_restored(args: argparse.Namespace, machine: Machine, status: StatusLine | None) -> int:
    """Run a restored machine with its API socket (if asked) to its end; close both."""
    api: ApiServer | None = None
    try:
        api = _serve_api(args, machine)
        return _run_machine(args, machine, status)
    finally:
        if api is not None:
            api.close()
        machine.close()


@dataclass(frozen=True)
class DemoSnapshot:
    """Where the demo's snapshot of this guest on this host is kept (kvm_vmm.warm_start)."""

    cache: WarmStartCache
    key: str


def _demo_snapshot(
    args: argparse.Namespace, description: BootDescription, memory: int, cache_dir: Path | None
) -> DemoSnapshot | None:
    """The demo's snapshot for these options, or None where it keeps none (no cache
    directory). The caller keeps none with a disk (its contents change between runs) or
    a symbol file."""
    if cache_dir is None or not isinstance(description, LinuxBoot):
        return None
    key = warm_start_key(
        description,
        memory_size=memory,
        cpus=args.cpus,
        # A restore brings back the devices the snapshot has, not those asked for.
        devices=[
            *args.device,
            f"rng={args.rng}",
            *(f"net={spec}" for spec in args.net),
            *(f"vsock={spec}" for spec in args.vsock),
        ],
        emulation_fallback=not args.no_emulation_fallback,
        host={"cpu": cpu_model(), "kernel": os.uname().release},
        version=kvm_vmm_version(),
    )
    return DemoSnapshot(WarmStartCache(cache_dir), key)


def _warm_demo(
    args: argparse.Namespace, warm: DemoSnapshot, status: StatusLine | None
) -> int | None:
    """Run the demo from its snapshot; None when there is none or it does not fit (it is
    then discarded, with a one-line note, and the demo boots and takes a new one)."""
    path = warm.cache.usable(warm.key)
    if path is None:
        return None
    started = time.monotonic()
    try:
        machine = Machine.restore(path, console=_console(args, status))
    except SnapshotError as error:
        print(
            f"kvm-vmm: note: the demo's snapshot does not fit ({error.problem});"
            " booting and taking a new one",
            file=sys.stderr,
        )
        warm.cache.discard(warm.key)
        return None
    print(
        f"kvm-vmm: the demo's shell, restored from its snapshot in"
        f" {(time.monotonic() - started) * 1000:.0f} ms (--cold boots it again)",
        file=sys.stderr,
    )
    machine.serial.write(b"\n")  # the shell prints its prompt again
    return _run_restored(args, machine, status)


def _run_machine(args: argparse.Namespace, machine: Machine, status: StatusLine | None) -> int:
    """Run a built machine to its end, the console on stdin where it is stdio; its
    outcome reported; the exit status."""
    interactive = args.serial == "stdio" and sys.stdin.isatty()
    if args.serial == "stdio":
        start_stdin_reader(
            machine.serial.write,
            lambda: machine.finish(Outcome(0, "quit from the console (Ctrl-A x)")),
        )
    started = time.monotonic()
    profiler = GuestProfiler(machine.kickers, args.profile) if args.profile else None
    with (
        raw_terminal(interactive),
        ending_run(machine),
        _profiling(profiler),
        showing(status, machine_status(machine)),
    ):
        outcome = machine.run(args.timeout)
    _report(args, machine, outcome, time.monotonic() - started)
    return outcome.status


@contextlib.contextmanager
def _profiling(profiler: GuestProfiler | None) -> Iterator[None]:
    if profiler is None:
        yield
        return
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()


def _describe_boot(args: argparse.Namespace, cache_dir: Path | None) -> BootDescription:
    kernel: Path | None = getattr(args, "kernel", None)
    initrd: Path | None = getattr(args, "initrd", None)
    cmdline: str = getattr(args, "cmdline", "")
    fast_boot = args.command == "demo" or getattr(args, "fast_boot", False)
    host_workarounds = not args.no_host_workarounds
    if kernel is not None:
        return describe_kernel(
            kernel,
            initrd=initrd,
            cmdline=cmdline,
            boot_path=getattr(args, "boot_path", "vmlinux"),
            fast_boot=fast_boot,
            host_workarounds=host_workarounds,
        )
    if initrd is not None:
        read_boot_file(initrd, "initrd")  # a bad --initrd is worth no download
    progress = default_progress()
    try:
        guest = default_guest(
            cache_dir, fast_boot=fast_boot, progress=_announcing(progress, cache_dir)
        )
    finally:
        progress.finish()
    _say(args, f"default guest: {guest.kernel.name}")
    return replace(
        guest,
        initrd=guest.initrd if initrd is None else initrd,  # an --initrd of one's own wins
        cmdline=f"{guest.cmdline} {cmdline}".strip(),
        host_workarounds=host_workarounds,
    )


def _announcing(
    progress: Callable[[float, str], None], cache_dir: Path | None
) -> Callable[[float, str], None]:
    announced = False

    def report(fraction: float, description: str) -> None:
        nonlocal announced
        if not announced:
            print(
                "kvm-vmm: fetching the default guest (Debian's cloud kernel and busybox-static) "
                f"with apt-get download, once; kept in {cache_dir}",
                file=sys.stderr,
            )
            announced = True
        progress(fraction, description)

    return report


def _tell_boot(args: argparse.Namespace, report: BootReport) -> None:
    plan = report.plan
    if plan is not None:
        if plan.fast_boot:
            print(
                f"kvm-vmm: fast boot: adding {with_switches('', plan.fast_boot)} "
                "(docs/linux-boot.md)",
                file=sys.stderr,
            )
        if plan.host_switches or plan.hidden_cpuid:
            hidden = " ".join(bit.name for bit in plan.hidden_cpuid) or "none"
            _say(
                args,
                f"host workarounds (kvm-vmm host-check; off with --no-host-workarounds): "
                f"Linux switches {' '.join(plan.host_switches) or 'none'}; CPUID hidden: {hidden}",
            )
        for note in plan.notes:
            print(f"kvm-vmm: note: {note}", file=sys.stderr)
        _say(args, f"kernel command line: {plan.cmdline}")
    for note in report.notes:
        print(f"kvm-vmm: note: {note}", file=sys.stderr)
    if report.symbols:
        _say(args, report.symbols)


def _host_check(args: argparse.Namespace) -> int:
    cache_dir = default_cache_dir(os.environ)
    report = host_report(cache_dir, refresh=args.refresh)
    if args.json:
        print(report.to_json())
        return HOST_CHECK_FAILED if report.failures else 0
    where = "" if cache_dir is None else f"; cached in {cache_file(cache_dir, host_identity())}"
    how = "read from the cache" if report.from_cache else f"probed in {report.probe_seconds:.2f} s"
    print(f"kvm-vmm host-check: host kernel {report.identity.get('release', '?')}, {how}{where}")
    for line in report.lines():
        print(line)
    if args.verbose:
        _print_implications(report)
    return HOST_CHECK_FAILED if report.failures else 0


def _print_implications(report: HostReport) -> None:
    switches = " ".join(report.linux_switches()) or "none"
    hidden = " ".join(bit.name for bit in report.cpuid_bits_to_clear()) or "none"
    print(f"Linux switches the VMM adds on this host: {switches}")
    print(f"CPUID flags the VMM hides on this host: {hidden}")
    print("(kvm-vmm run/demo --no-host-workarounds boots without them)")


def _add_net(machine: Machine, spec: str) -> None:
    net = parse_net_spec(spec)
    attached = machine.add_net(tap=net.tap, mac=net.mac)
    if net.tap is None:
        # The user configures the host side: they need the name the kernel chose.
        print(
            f"kvm-vmm: virtio-net on TAP {attached.device.tap_name} (MAC {attached.device.mac})",
            file=sys.stderr,
        )


def _say(args: argparse.Namespace, message: str) -> None:
    if args.verbose:
        print(f"kvm-vmm: {message}", file=sys.stderr)


def _report(args: argparse.Namespace, machine: Machine, outcome: Outcome, elapsed: float) -> None:
    if outcome.error is not None or (outcome.status != 0 and args.verbose):
        print(f"\nkvm-vmm: {outcome.reason} (status {outcome.status})", file=sys.stderr)
    else:
        _say(args, f"{outcome.reason} after {elapsed:.2f} s")
    if outcome.stopped_from_outside:
        for position in machine.vcpu_positions():
            print(f"kvm-vmm: {position}", file=sys.stderr)
    error = outcome.error
    if isinstance(error, kvmfast.GuestStop):
        regs = " ".join(f"{name}={value:#x}" for name, value in error.regs.items())
        print(f"kvm-vmm: registers: {regs}", file=sys.stderr)
    if args.profile:
        _print_profile(machine)
    if args.stats:
        print(json.dumps(machine.stats(), indent=2, default=str), file=sys.stderr)


def _print_profile(machine: Machine) -> None:
    samples = machine.vm.rip_samples()
    print(f"kvm-vmm: profile: {sum(samples.values())} samples", file=sys.stderr)
    for line in summarize(samples, machine.vm.describe_address):
        print(f"  {line.share:6.1%} {line.samples:8d}  {line.where}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
