"""kvm_vmm.bench_net's arithmetic: what the host samples around a guest phase, the
phase's figures per packet and as shares of its time, the ratios to the floors, and
the table it prints."""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvm_vmm.bench_disk import ThreadTimes
from kvm_vmm.bench_net_phases import Kind, receiver_listens
from kvm_vmm.sock_tool import errors, ping_result, stream_ends, unmatched


@dataclass(frozen=True)
class ProcessTimes:
    """The whole VMM process's CPU time (ns, clock ticks: proc(5) fields 14 and 15 of
    /proc/self/stat, which keep the time of threads that have ended) and its children's
    (the host's sock_tool runs: getrusage(RUSAGE_CHILDREN))."""

    user_system_ns: int
    children_ns: int


def waiting_ns(tid: int) -> int:
    """How long one of this process's threads has waited on a run queue (ns)."""
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])


def process_times(children_ns: int) -> ProcessTimes:
    text = Path("/proc/self/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return ProcessTimes((int(fields[11]) + int(fields[12])) * tick, children_ns)


@dataclass(frozen=True)
class Sample:
    wall_ns: int  # CLOCK_MONOTONIC
    vcpu: ThreadTimes
    vcpu_waiting_ns: int  # runnable but not on a CPU (schedstat's second field)
    io: ThreadTimes  # the event-loop threads that run the virtio queues, summed
    process: ProcessTimes
    device: Mapping[str, int]  # the phase's kvmfast virtio device's own counters
    interface: Mapping[str, int]  # the TAP's statistics (empty for vsock)
    exits: Mapping[str, int]  # the VM's exits to userspace by reason
    completions: Mapping[str, int]  # instructions kvmfast completed for KVM, by mnemonic


def _grown(end: Mapping[str, int], begin: Mapping[str, int], key: str) -> int:
    return end.get(key, 0) - begin.get(key, 0)


@dataclass(frozen=True)
class Packets:
    """Packets each way in a phase, and what counted them."""

    to_guest: int
    from_guest: int
    source: str

    @property
    def total(self) -> int:
        return self.to_guest + self.from_guest


def net_packets(begin: Sample, end: Sample) -> Packets:
    """From the TAP's statistics, as the host's kernel sees them: what it transmits
    goes to the guest, what it receives came from it (a TSO/GSO frame counts once)."""
    return Packets(
        _grown(end.interface, begin.interface, "tx_packets"),
        _grown(end.interface, begin.interface, "rx_packets"),
        "TAP statistics (/sys/class/net/TAP/statistics)",
    )


def vsock_packets(begin: Sample, end: Sample) -> Packets:
    """From the vsock device's counters: every packet the driver sends is a transmit
    chain (tx_packets), and every chain the device completes is counted in
    ``requests``, so the packets it put into the receive queue are requests less
    tx_packets (the event queue's, a TRANSPORT_RESET after a restore, aside)."""
    sent = _grown(end.device, begin.device, "tx_packets")
    return Packets(
        _grown(end.device, begin.device, "requests") - sent,
        sent,
        "vsock device counters (requests - tx_packets, tx_packets)",
    )


def cpu_report(begin: Sample, end: Sample, packets: Packets) -> dict[str, object]:
    """Where the phase's time went: the vCPU thread (the guest: its kernel code
    emulated in KVM as system time, its user mode as guest time; and our exit handling
    as user time), the event-loop thread (ours: the virtio queues), the process's
    other threads (ours: the Python main thread, the console) and the host's peer,
    in total, per packet and as shares of the wall time."""
    vcpu, io = end.vcpu.since(begin.vcpu), end.io.since(begin.io)
    wall = end.wall_ns - begin.wall_ns
    waiting = end.vcpu_waiting_ns - begin.vcpu_waiting_ns
    ticks = end.process.user_system_ns - begin.process.user_system_ns
    other = ticks - (vcpu.user_ns + vcpu.system_ns) - (io.user_ns + io.system_ns)
    peer = end.process.children_ns - begin.process.children_ns
    per = max(packets.total, 1)
    exits = _counts(end.exits, begin.exits)
    completions = _counts(end.completions, begin.completions)
    return {
        "wall_seconds": wall / 1e9,
        "packets_to_guest": packets.to_guest,
        "packets_from_guest": packets.from_guest,
        "packets_counted_by": packets.source,
        "device_interrupts": _grown(end.device, begin.device, "interrupts"),
        "device_doorbells": _grown(end.device, begin.device, "notifications"),
        "vcpu_thread_ns": vcpu.run_ns,
        "vcpu_thread_user_system_guest_ns": [vcpu.user_ns, vcpu.system_ns, vcpu.guest_ns],
        "io_thread_ns": io.run_ns,
        "io_thread_user_system_ns": [io.user_ns, io.system_ns],
        "other_threads_ns": max(other, 0),
        "host_peer_ns": peer,
        "vcpu_thread_us_per_packet": vcpu.run_ns / per / 1e3,
        "io_thread_us_per_packet": io.run_ns / per / 1e3,
        "exits_per_packet": sum(exits.values()) / per,
        "exits": exits,
        "completions": completions,
        "share_vcpu_thread": vcpu.run_ns / wall if wall else 0.0,
        # The vCPU thread ready to run but waiting for one of the host's CPUs (other
        # work on them); the rest of the wall time it was idle (the guest halted,
        # waiting for a packet or a timer).
        "vcpu_thread_waiting_ns": waiting,
        "share_vcpu_waiting": waiting / wall if wall else 0.0,
        "share_vcpu_idle": (wall - vcpu.run_ns - waiting) / wall if wall else 0.0,
        "share_io_thread": io.run_ns / wall if wall else 0.0,
        # Of the vCPU thread's user + system ticks: the guest's (KVM running it: system
        # time, with native guest user mode counted as user and guest time alike) and
        # ours (user time that is not guest time: kvmfast's exit handling).
        "vcpu_guest_share": _guest_share(vcpu),
    }


def _counts(end: Mapping[str, int], begin: Mapping[str, int]) -> dict[str, int]:
    """What grew between two samples of a counter map, by key (none: left out)."""
    grown = {key: count - begin.get(key, 0) for key, count in end.items()}
    return {key: count for key, count in sorted(grown.items()) if count}


def _guest_share(vcpu: ThreadTimes) -> float:
    total = vcpu.user_ns + vcpu.system_ns
    if total == 0:
        return 0.0
    ours = max(vcpu.user_ns - vcpu.guest_ns, 0)
    return (total - ours) / total


# -- figures and floors ---------------------------------------------------------------


def mb_per_s(stream_bytes: int, seconds: float) -> float:
    """Decimal megabytes per second."""
    return stream_bytes / seconds / 1e6


def us_per_round_trip(count: int, seconds: float) -> float:
    return seconds * 1e6 / count


@dataclass(frozen=True)
class Floor:
    """A host-only measurement repeated: its figure is the median of the runs."""

    name: str
    unit: str  # "MB/s" or "us"
    runs: tuple[float, ...]

    @property
    def figure(self) -> float:
        return statistics.median(self.runs)


def ratio_to_floor(figure: float, floor: Floor) -> float:
    """The phase's figure over the floor's, in the figure's own unit: for throughput
    the fraction of the floor reached (below 1), for latency how many times the
    floor's round trip (above 1)."""
    return figure / floor.figure


# -- the table -------------------------------------------------------------------------


def table(phases: Mapping[str, Mapping[str, object]], floors: Sequence[Floor]) -> str:
    """One line per phase: its figure, its floor's and the ratio, packets, and the CPU
    per packet of the vCPU thread (the guest's share of it) and of the I/O thread."""
    lines = [
        f"{'phase':<20} {'figure':>14} {'floor':>14} {'ratio':>10} {'packets':>8} "
        f"{'vCPU us/pkt':>12} {'guest%':>7} {'I/O us/pkt':>11} {'exits/pkt':>10}"
    ]
    for name, report in phases.items():
        unit = str(report.get("unit", ""))
        figure = _float(report.get("figure"))
        floor = _float(report.get("floor"))
        ratio = _float(report.get("ratio_to_floor"))
        packets = _int(report.get("packets_to_guest")) + _int(report.get("packets_from_guest"))
        lines.append(
            f"{name:<20} {figure:>9.4g} {unit:<4} {floor:>9.4g} {unit:<4} {ratio:>10.3g} "
            f"{packets:>8} {_float(report.get('vcpu_thread_us_per_packet')):>12.1f} "
            f"{100 * _float(report.get('vcpu_guest_share')):>6.1f}% "
            f"{_float(report.get('io_thread_us_per_packet')):>11.1f} "
            f"{_float(report.get('exits_per_packet')):>10.2f}"
        )
    lines.append(
        "floors (host only, the same sock_tool; median of "
        + ", ".join(
            f"{floor.name} {len(floor.runs)} runs: {floor.figure:.4g} {floor.unit}"
            for floor in floors
        )
        + ")"
    )
    return "\n".join(lines)


def _float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


# -- a phase's figure from what both ends printed --------------------------------------

_ECHO = re.compile(r"SOCKTOOL ECHO bytes=(\d+)")


def phase_figure(
    kind: Kind, host_output: str, guest_output: str, stream_bytes: int, count: int
) -> tuple[dict[str, object], list[str]]:
    """The phase's figure (MB/s received, or us per round trip) from sock_tool's lines
    on both ends, and whether both ends agree: a stream's two CONN lines mirror each
    other (bytes and CRC-32s both ways) and carry ``stream_bytes``; the guest echoed
    every ping. ``figure`` is None, and the problems returned beside say why, when
    they do not."""
    problems = [f"host: {what}" for what in errors(host_output)]
    problems += [f"guest: {what}" for what in errors(guest_output)]
    report: dict[str, object] = {"figure": None}
    if kind == "ping":
        report["unit"] = "us"
        ping = ping_result(host_output)
        echoed = [int(m[1]) for m in _ECHO.finditer(guest_output)]
        report["echoed_bytes"] = echoed[0] if echoed else None
        if ping is None or ping.count != count:
            problems.append(f"no PING line for {count} round trips from the host")
        elif echoed != [count]:
            problems.append(f"the guest echoed {echoed} bytes, not [{count}]")
        else:
            report.update(count=ping.count, seconds=ping.seconds)
            report["figure"] = us_per_round_trip(ping.count, ping.seconds)
    else:
        report["unit"] = "MB/s"
        host_ends, guest_ends = stream_ends(host_output), stream_ends(guest_output)
        receiver = guest_ends if receiver_listens(kind) else host_ends
        if len(host_ends) != 1 or len(guest_ends) != 1:
            problems.append(
                f"CONN lines: host {len(host_ends)}, guest {len(guest_ends)}, not 1 each"
            )
        elif unmatched(host_ends, guest_ends):
            problems.append("the ends disagree on what was sent and received (bytes or CRC-32)")
        elif receiver[0].received != stream_bytes:
            problems.append(f"received {receiver[0].received} bytes, not {stream_bytes}")
        else:
            report.update(bytes=receiver[0].received, seconds=receiver[0].seconds)
            report["figure"] = mb_per_s(receiver[0].received, receiver[0].seconds)
    return report, problems
