"""TCP over virtio-net (a TAP) and streams over virtio-vsock, host <-> Linux guest,
next to the same tool over the host's own loopback TCP and a Unix socket.

``python -m kvm_vmm.bench_net [--bytes B] [--count N] [--json FILE]`` (root) makes a
network namespace, runs itself inside it (``ip netns exec``) and deletes it at the end:
the TAP, both addresses and every socket live there. Inside, it builds sock_tool
(kvm_vmm.sock_tool) and boots the default guest's kernel (Debian's cloud kernel, fast
boot) with an initramfs of busybox, the virtio modules and the same sock_tool; the VM
has a virtio-net device on a TAP (host 10.78.0.1, guest 10.78.0.2) and a virtio-vsock
device (guest CID 3, Firecracker's host side on a Unix socket). In one boot the guest
listens for six phases in turn and the host connects: a stream of B bytes host->guest
and guest->host, and N 1-byte round trips (host pings, guest echoes), over TCP and over
vsock. The floors are the same tool on the host alone, before and after the boot: TCP
over 127.0.0.1 (TCP's floor) and a Unix socket (vsock's: its host side is one).

Around each phase the host samples the CPU time of the vCPU thread (the guest: its
kernel code emulated by KVM on a host without VMX/SVM, as system time), of the VMM's
event-loop thread (ours: the virtio queues, the TAP, the vsock sockets), of the whole
process and of the host's peer, the device's counters, the TAP's statistics and the
VM's exits, and reports them per packet. It prints a table; ``--json FILE`` writes
everything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvm_vmm.bench_disk import ThreadTimes, machine_facts, thread_times
from kvm_vmm.bench_net_netns import (
    NamespaceUnavailable,
    current_namespace,
    interface_statistics,
    network_namespace,
    unavailable_reason,
)
from kvm_vmm.bench_net_phases import (
    GUEST_CID,
    GUEST_LINE,
    GUEST_MAC,
    HOST_IP,
    PHASES,
    PREFIX,
    TOOL_IN_GUEST,
    Phase,
    actions,
    bench_init,
    floor_addresses,
    host_address,
    parse_guest_line,
)
from kvm_vmm.bench_net_report import (
    Floor,
    Sample,
    cpu_report,
    mb_per_s,
    net_packets,
    phase_figure,
    process_times,
    ratio_to_floor,
    table,
    us_per_round_trip,
    vsock_packets,
    waiting_ns,
)
from kvm_vmm.boot import DEFAULT_GUEST_CMDLINE, LinuxBoot
from kvm_vmm.debian import fetch_guest_assets
from kvm_vmm.initramfs import (
    INIT_REACHED_MARKER,
    busybox_initramfs,
    module_entries,
    regular_file,
)
from kvm_vmm.kernel_modules import driver_modules
from kvm_vmm.loaders import default_cache_dir
from kvm_vmm.loaders.files import read_boot_file
from kvm_vmm.machine import Machine, MachineConfig
from kvm_vmm.pci_virtio import VirtioPciDevice
from kvm_vmm.serial_console import ConsoleTimeout
from kvm_vmm.sock_tool import build_sock_tool, ping_result, stream_ends
from kvm_vmm.static_tool import ToolUnavailable
from kvmfast.bench_host import threads_named

IO_THREAD = "kvmfast-ioevent"  # kvmfast's EventLoop thread (ioevent_loop.rs)
VCPU_THREAD = "vcpu0"  # Machine.start()'s thread for vCPU 0
TAP = "nbtap0"
FLOOR_PORT = 5201
DEFAULT_BYTES = 4 << 20
DEFAULT_COUNT = 200
DEFAULT_FLOOR_BYTES = 256 << 20
DEFAULT_FLOOR_COUNT = 20000
DEFAULT_FLOOR_RUNS = 3
DEFAULT_PHASE_TIMEOUT = 900
DEFAULT_TIMEOUT = 3600.0
SKIPPED = 77


# -- the host's runs -------------------------------------------------------------------


def run_pair(
    tool: Path,
    listen: Sequence[str],
    connect: Sequence[str],
    seconds: int,
) -> tuple[str, str]:
    """sock_tool listening (``listen``: address and action) and, once it listens,
    sock_tool connecting; what each printed."""
    listener = subprocess.Popen(
        [str(tool), "-t", str(seconds), "listen", *listen],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert listener.stdout is not None
    first = listener.stdout.readline()
    connector = subprocess.run(
        [str(tool), "-t", str(seconds), "connect", *connect],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    rest, _ = listener.communicate(timeout=seconds + 30)
    return first + rest, connector.stdout + connector.stderr


def floor_once(
    tool: Path,
    floor_name: str,
    scratch: Path,
    stream_bytes: int,
    count: int,
    seconds: int,
    port: int = FLOOR_PORT,
) -> float:
    """One host-only run: the listener receives a stream (MB/s) or echoes (us per round
    trip); the same actions as a guest phase's."""
    listen_at, connect_to = floor_addresses(floor_name, port, str(scratch / "floor.sock"))
    ping = floor_name.endswith("ping")
    listen_action, connect_action = actions(
        "ping" if ping else "host_to_guest", stream_bytes, count
    )
    listened, connected = run_pair(
        tool, [listen_at, *listen_action], [connect_to, *connect_action], seconds
    )
    if ping:
        result = ping_result(connected)
        if result is None:
            raise RuntimeError(f"floor {floor_name}: no PING line: {connected.strip()}")
        return us_per_round_trip(result.count, result.seconds)
    ends = stream_ends(listened)
    if len(ends) != 1 or ends[0].received != stream_bytes:
        raise RuntimeError(f"floor {floor_name}: {listened.strip()} / {connected.strip()}")
    return mb_per_s(ends[0].received, ends[0].seconds)


FLOOR_NAMES = ("tcp_stream", "tcp_ping", "unix_stream", "unix_ping")


def floor_runs(
    tool: Path, scratch: Path, stream_bytes: int, count: int, runs: int, seconds: int
) -> dict[str, list[float]]:
    return {
        name: [floor_once(tool, name, scratch, stream_bytes, count, seconds) for _ in range(runs)]
        for name in FLOOR_NAMES
    }


def host_link() -> None:
    """The host's end of the TAP: its address, up (inside the benchmark's namespace)."""
    for args in (
        ["addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP],
        ["link", "set", TAP, "up"],
    ):
        subprocess.run(["ip", *args], check=True, capture_output=True)


# -- sampling around a guest phase ------------------------------------------------------


def _vcpu_tid() -> int:
    for thread in threading.enumerate():
        if thread.name == VCPU_THREAD and thread.native_id is not None:
            return thread.native_id
    raise RuntimeError(f"no thread named {VCPU_THREAD}: did Machine.start() rename it?")


def _summed(tids: Sequence[int]) -> ThreadTimes:
    times = [thread_times(tid) for tid in tids]
    return ThreadTimes(
        sum(t.user_ns for t in times),
        sum(t.system_ns for t in times),
        sum(t.guest_ns for t in times),
        sum(t.run_ns for t in times),
    )


def _children_ns() -> int:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def take_sample(
    machine: Machine, device: VirtioPciDevice, tap: bool, vcpu_tid: int, io_tids: Sequence[int]
) -> Sample:
    counters = machine.counters()
    return Sample(
        time.monotonic_ns(),
        thread_times(vcpu_tid),
        waiting_ns(vcpu_tid),
        _summed(io_tids),
        process_times(_children_ns()),
        dict(device.counters()),
        interface_statistics(TAP) if tap else {},
        dict(counters["exits"]),
        dict(counters["completions"]),
    )


@dataclass
class GuestRun:
    boot_seconds: float = 0.0
    outcome: str = ""
    guest_link: str = ""
    # The virtio devices' IDs and the feature bits the guest's drivers accepted (one
    # character per bit, bit 0 first: /sys/bus/virtio/devices/*/features).
    virtio_features: list[str] = field(default_factory=list)
    phases: dict[str, dict[str, object]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    device_counters: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestOptions:
    tool: Path  # sock_tool, the host's build of the guest's binary
    stream_bytes: int
    count: int
    phase_seconds: int
    timeout: float


def run_guest(
    initrd: Path, kernel: Path, scratch: Path, options: GuestOptions, console: Path | None
) -> GuestRun:
    """Boot; at each phase's LISTENING line sample, run the host's end, and sample again
    at the guest's PHASE-END (its tool has exited; it then pauses)."""
    run = GuestRun()
    vsock_socket = scratch / "vsock.sock"
    by_name = {phase.name: phase for phase in PHASES}
    with Machine(MachineConfig(memory_size=512 << 20, cpus=1)) as machine:
        devices = {
            "tcp": machine.add_net(tap=TAP, mac=GUEST_MAC),
            "vsock": machine.add_vsock(GUEST_CID, vsock_socket),
        }
        host_link()
        machine.boot(
            LinuxBoot(kernel, initrd=initrd, cmdline=DEFAULT_GUEST_CMDLINE, fast_boot=True)
        )
        started = time.monotonic()
        machine.start()
        deadline = started + options.timeout
        try:
            machine.serial.expect(INIT_REACHED_MARKER.encode(), timeout=options.timeout)
            run.boot_seconds = round(time.monotonic() - started, 1)
            _progress(f"/init reached after {run.boot_seconds} s")
            phase: Phase | None = None
            begin: Sample | None = None
            guest_from = 0
            host_output = ""
            io_tids: list[int] = []
            while True:
                found = machine.serial.expect(GUEST_LINE, deadline - time.monotonic())
                text = found[0].decode(errors="replace").strip()
                line = parse_guest_line(text)
                if line.kind == "END":
                    break
                if line.kind == "NET":
                    run.guest_link = " ".join(line.words)
                elif line.kind == "VIRTIO":
                    run.virtio_features.append(" ".join(line.words))
                elif line.kind == "PHASE" and line.words and line.words[0] in by_name:
                    phase, begin, guest_from = by_name[line.words[0]], None, found.end()
                    _progress(f"{phase.name}: the guest starts its end")
                elif line.kind == "LISTENING" and phase is not None:
                    io_tids = sorted(threads_named(IO_THREAD))
                    device, tap = devices[phase.transport], phase.transport == "tcp"
                    begin = take_sample(machine, device, tap, _vcpu_tid(), io_tids)
                    host_output = host_end(phase, str(vsock_socket), options)
                elif line.kind == "PHASE-END" and phase is not None:
                    device, tap = devices[phase.transport], phase.transport == "tcp"
                    end = take_sample(machine, device, tap, _vcpu_tid(), io_tids)
                    guest_output = machine.serial.transcript()[guest_from : found.start()]
                    report = phase_report(
                        phase,
                        host_output,
                        guest_output.decode(errors="replace"),
                        line.words[1] if len(line.words) > 1 else "",
                        (begin, end),
                        options,
                    )
                    run.phases[phase.name] = report
                    _progress(f"{phase.name}: {report.get('figure')} {report.get('unit')}")
                    phase, begin, host_output = None, None, ""
                elif line.kind != "TOOL-ERROR":  # a tool's ERROR is in its phase's report
                    run.errors.append(text)
        except ConsoleTimeout as error:
            run.errors.append(str(error)[-2000:])
        outcome = machine.wait(timeout=120)
        if outcome is None:
            outcome = machine.stop()
        run.outcome = outcome.reason
        run.device_counters = {name: dict(device.counters()) for name, device in devices.items()}
        if console is not None:
            console.write_bytes(machine.serial.transcript())
    return run


def phase_report(
    phase: Phase,
    host_output: str,
    guest_output: str,
    guest_status: str,
    samples: tuple[Sample | None, Sample],
    options: GuestOptions,
) -> dict[str, object]:
    """A phase's figure and where its time went; ``errors`` lists what went wrong."""
    report, problems = phase_figure(
        phase.kind, host_output, guest_output, options.stream_bytes, options.count
    )
    report["guest_status"] = guest_status
    if guest_status != "0":
        problems.append(f"the guest's sock_tool exited with status {guest_status!r}")
    begin, end = samples
    if begin is None:
        problems.append("the guest's sock_tool never listened")
    else:
        tcp = phase.transport == "tcp"
        packets = net_packets(begin, end) if tcp else vsock_packets(begin, end)
        report.update(cpu_report(begin, end, packets))
    report["errors"] = problems
    return report


def _progress(message: str) -> None:
    """A line on stderr while the run goes on (a boot here takes minutes)."""
    print(f"bench_net {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)


def host_end(phase: Phase, vsock_socket: str, options: GuestOptions) -> str:
    """The host's sock_tool for a phase, connecting to the guest; what it printed."""
    _, action = actions(phase.kind, options.stream_bytes, options.count)
    address = host_address(phase, vsock_socket)
    done = subprocess.run(
        [str(options.tool), "-t", str(options.phase_seconds), "connect", address, *action],
        capture_output=True,
        text=True,
        timeout=options.phase_seconds + 30,
        check=False,
    )
    return done.stdout + done.stderr


# -- the whole run -------------------------------------------------------------------------


def with_floors(
    phases: dict[str, dict[str, object]], floors: dict[str, Floor]
) -> dict[str, dict[str, object]]:
    """Each phase's report with its floor's figure and the ratio to it."""
    by_name = {phase.name: phase for phase in PHASES}
    for name, report in phases.items():
        floor = floors[by_name[name].floor_name]
        report["floor_name"] = floor.name
        report["floor"] = floor.figure
        figure = report.get("figure")
        report["ratio_to_floor"] = (
            ratio_to_floor(figure, floor) if isinstance(figure, float) else None
        )
    return phases


def build_initrd(
    scratch: Path,
    assets_modules: Sequence[Path],
    busybox: Path,
    tool: Path,
    args: argparse.Namespace,
) -> Path:
    modules = [(path.stem, read_boot_file(path, "module")) for path in assets_modules]
    init = bench_init(
        [name for name, _ in modules],
        driver_modules(modules),
        PHASES,
        args.bytes,
        args.count,
        args.phase_timeout + 120,
    )
    initrd = scratch / "initramfs.cpio"
    initrd.write_bytes(
        busybox_initramfs(
            read_boot_file(busybox, "busybox"),
            init,
            [
                *module_entries(modules),
                regular_file(TOOL_IN_GUEST.lstrip("/"), tool.read_bytes(), 0o755),
            ],
        )
    )
    return initrd


def run_inside(args: argparse.Namespace) -> int:
    """The benchmark proper, in the namespace the outer run made."""
    inside = current_namespace()
    if inside != args.in_netns:
        print(
            f"bench_net: in network namespace {inside!r}, not {args.in_netns!r}: refusing "
            "to make a TAP or open sockets outside the benchmark's namespace",
            file=sys.stderr,
        )
        return 1
    cache_dir = default_cache_dir(os.environ)
    if cache_dir is None:
        print("bench_net: no cache directory for the default guest: set $HOME", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-net-", dir=os.environ.get("TMPDIR")) as tmp:
        scratch = Path(tmp)
        try:
            tool = build_sock_tool(scratch)
        except ToolUnavailable as error:
            print(f"bench_net: skipped: {error}", file=sys.stderr)
            return SKIPPED
        assets = fetch_guest_assets(cache_dir)
        initrd = build_initrd(scratch, assets.modules, assets.busybox, tool, args)
        floor_args = (args.floor_bytes, args.floor_count, args.floor_runs, args.phase_timeout)
        before = floor_runs(tool, scratch, *floor_args)
        options = GuestOptions(tool, args.bytes, args.count, args.phase_timeout, args.timeout)
        guest = run_guest(initrd, assets.kernel, scratch, options, args.console)
        after = floor_runs(tool, scratch, *floor_args)
    units = {"stream": "MB/s", "ping": "us"}
    floors = {
        name: Floor(name, units[name.split("_")[1]], tuple(before[name] + after[name]))
        for name in FLOOR_NAMES
    }
    phases = with_floors(guest.phases, floors)
    report = {
        "benchmark": "python -m kvm_vmm.bench_net",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_facts(cache_dir),
        "guest_kernel": assets.kernel_package,
        "options": {
            "bytes": args.bytes,
            "count": args.count,
            "floor_bytes": args.floor_bytes,
            "floor_count": args.floor_count,
            "floor_runs": f"{args.floor_runs} before and {args.floor_runs} after the boot",
        },
        "tool": "sock_tool.c (gcc -static -O2), the same binary on both ends",
        "floors": {
            name: {"unit": floor.unit, "median": floor.figure, "runs": list(floor.runs)}
            for name, floor in floors.items()
        },
        "guest": {
            "boot_seconds": guest.boot_seconds,
            "outcome": guest.outcome,
            "link": guest.guest_link,
            "virtio_features": guest.virtio_features,
            "errors": guest.errors,
            "device_counters": guest.device_counters,
            "phases": phases,
        },
    }
    print(table(phases, list(floors.values())))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, phase in phases.items() if phase.get("errors")]
    complete = len(phases) == len(PHASES) and not failed and not guest.errors
    if not complete:
        print(f"bench_net: incomplete: failed {failed}, errors {guest.errors}", file=sys.stderr)
    return 0 if complete else 1


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvm_vmm.bench_net", description=__doc__)
    parser.add_argument("--bytes", type=int, default=DEFAULT_BYTES, help="each guest stream")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="guest round trips")
    parser.add_argument("--floor-bytes", type=int, default=DEFAULT_FLOOR_BYTES)
    parser.add_argument("--floor-count", type=int, default=DEFAULT_FLOOR_COUNT)
    parser.add_argument(
        "--floor-runs", type=int, default=DEFAULT_FLOOR_RUNS, help="each, before and after"
    )
    parser.add_argument(
        "--phase-timeout", type=int, default=DEFAULT_PHASE_TIMEOUT, help="seconds, each phase"
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="whole guest run")
    parser.add_argument("--json", type=Path, help="write the whole report here")
    parser.add_argument("--console", type=Path, help="write the guest's console output here")
    parser.add_argument("--in-netns", help=argparse.SUPPRESS)  # the run inside (run_inside)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    for name in ("bytes", "count", "floor_bytes", "floor_count", "floor_runs", "phase_timeout"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')}: at least 1")
    if args.in_netns is not None:
        return run_inside(args)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_net: skipped: {reason}", file=sys.stderr)
        return SKIPPED
    namespace = f"kvm-vmm-bench-net-{os.getpid()}"
    try:
        with network_namespace(namespace) as netns:
            command = [sys.executable, "-m", "kvm_vmm.bench_net", *argv, "--in-netns", namespace]
            return subprocess.run(netns.exec_command(command), check=False).returncode
    except NamespaceUnavailable as error:
        print(f"bench_net: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
