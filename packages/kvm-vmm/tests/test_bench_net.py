"""kvm_vmm.bench_net without a boot: the phases as sock_tool command lines, the guest's
/init (it parses, and run with stand-ins for its commands it does its steps in order),
the lines the host follows, the arithmetic per packet and against the floors, the
table, and a floor run with the real sock_tool on the host."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from kvm_vmm.bench_disk import ThreadTimes
from kvm_vmm.bench_net import FLOOR_NAMES, floor_once, main, take_sample, with_floors
from kvm_vmm.bench_net_phases import (
    GUEST_IP,
    GUEST_LINE,
    MARKER,
    PAUSE_SECONDS,
    PHASES,
    Phase,
    actions,
    bench_init,
    floor_addresses,
    host_address,
    parse_guest_line,
    receiver_listens,
)
from kvm_vmm.bench_net_report import (
    Floor,
    Packets,
    ProcessTimes,
    Sample,
    cpu_report,
    net_packets,
    phase_figure,
    ratio_to_floor,
    table,
    vsock_packets,
    waiting_ns,
)
from kvm_vmm.machine import Machine
from kvm_vmm.pci_virtio import VirtioPciDevice
from kvm_vmm.sock_tool import build_sock_tool
from kvm_vmm.static_tool import ToolUnavailable

# -- the phases ----------------------------------------------------------------------


def test_each_phase_has_its_own_port_and_name_and_a_floor_of_its_transport() -> None:
    assert len({phase.port for phase in PHASES}) == len(PHASES)
    assert [phase.name for phase in PHASES] == [
        "tcp_host_to_guest",
        "tcp_guest_to_host",
        "tcp_ping",
        "vsock_host_to_guest",
        "vsock_guest_to_host",
        "vsock_ping",
    ]
    assert {phase.floor_name for phase in PHASES} == set(FLOOR_NAMES)
    assert Phase("vsock", "ping", 1).floor_name == "unix_ping"
    assert Phase("tcp", "guest_to_host", 1).floor_name == "tcp_stream"


def test_the_sending_end_streams_the_bytes_and_the_other_sends_none() -> None:
    assert actions("host_to_guest", 4096, 9) == (["stream", "1", "0"], ["stream", "1", "4096"])
    assert actions("guest_to_host", 4096, 9) == (["stream", "1", "4096"], ["stream", "1", "0"])
    assert actions("ping", 4096, 9) == (["echo"], ["ping", "9"])
    assert receiver_listens("host_to_guest") and not receiver_listens("guest_to_host")


def test_the_host_connects_to_the_guests_ip_or_through_the_vsock_socket() -> None:
    assert host_address(Phase("tcp", "ping", 5003), "/s") == f"tcp:{GUEST_IP}:5003"
    assert host_address(Phase("vsock", "ping", 5103), "/run/v.sock") == "fc:/run/v.sock:5103"
    assert floor_addresses("tcp_stream", 7, "/p") == ("tcp:127.0.0.1:7", "tcp:127.0.0.1:7")
    assert floor_addresses("unix_ping", 7, "/p") == ("unix:/p", "unix:/p")


# -- the guest's /init ---------------------------------------------------------------


def _init(tool: str = "/bin/sock_tool", modules: tuple[str, ...] = ()) -> str:
    needed = {0x1041: list(modules)} if modules else {}
    return bench_init(list(modules), needed, PHASES, 1 << 20, 50, 999, tool)


def test_the_guest_init_is_valid_sh_and_ends_with_a_power_off() -> None:
    init = _init(modules=("virtio_pci", "virtio_net"))
    shell = shutil.which("sh")
    assert shell is not None
    checked = subprocess.run([shell, "-n"], input=init, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert init.startswith("#!/bin/sh\n") and init.rstrip().endswith("poweroff -f")
    assert "insmod /lib/modules/$module.ko" in init


STAND_IN = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
{extra}
"""


def _stand_ins(tmp_path: Path, failing: str = "") -> tuple[Path, Path, Path]:
    """A PATH of commands that log their arguments (``failing`` exits 1), and a
    sock_tool that does the same, prints LISTENING, and fails for port 5003."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for name in ("mount", "ip", "sleep", "poweroff", "insmod"):
        extra = "exit 1" if name == failing else "exit 0"
        (bin_dir / name).write_text(STAND_IN.format(log=log, extra=extra))
        (bin_dir / name).chmod(0o755)
    tool = tmp_path / "sock_tool"
    tool.write_text(
        STAND_IN.format(
            log=log, extra='echo "SOCKTOOL LISTENING $4"\ncase "$4" in *5003) exit 1 ;; esac'
        )
    )
    tool.chmod(0o755)
    return bin_dir, log, tool


def _run_init(init: str, bin_dir: Path) -> list[str]:
    shell = shutil.which("sh")
    assert shell is not None
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        [shell], input=init, capture_output=True, text=True, env=environment, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_guest_init_configures_eth0_then_runs_each_phase_in_order(tmp_path: Path) -> None:
    bin_dir, log, tool = _stand_ins(tmp_path)
    output = _run_init(_init(str(tool)), bin_dir)
    calls = log.read_text().splitlines()
    assert calls[:3] == [
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
    ]
    assert calls[3:5] == [f"ip addr add {GUEST_IP}/24 dev eth0", "ip link set eth0 up"]
    expected = []
    for phase in PHASES:
        listen_action, _ = actions(phase.kind, 1 << 20, 50)
        address = f"{phase.transport}:{phase.port}"
        expected += [
            f"sock_tool -t 999 listen {address} {' '.join(listen_action)}",
            f"sleep {PAUSE_SECONDS}",
        ]
    assert calls[5:] == [*expected, "poweroff -f"]
    assert output[0] == "KVM-VMM-INIT"
    # (The host running the test may have virtio devices of its own: their lines vary.)
    markers = [line for line in output if line.startswith(MARKER) and " VIRTIO " not in line]
    assert markers[0].startswith(f"{MARKER} NET")
    assert markers[1:] == [
        *(
            line
            for phase in PHASES
            for line in (
                f"{MARKER} PHASE {phase.name}",
                # The stand-in fails on port 5003 (tcp_ping): the status is reported.
                f"{MARKER} PHASE-END {phase.name} {1 if phase.port == 5003 else 0}",
            )
        ),
        f"{MARKER} END",
    ]
    assert "SOCKTOOL LISTENING tcp:5001" in output


def test_an_eth0_that_cannot_be_configured_is_reported_and_the_phases_still_run(
    tmp_path: Path,
) -> None:
    bin_dir, log, tool = _stand_ins(tmp_path, failing="ip")
    output = _run_init(_init(str(tool)), bin_dir)
    assert f"{MARKER} ERROR eth0 could not be configured" in output
    assert "ip link set eth0 up" not in log.read_text()
    assert output[-1] == f"{MARKER} END"


def test_the_host_follows_whole_guest_lines_only() -> None:
    text = (
        b"noise\r\nSOCKTOOL LISTENING tcp:5001\r\nNETBENCH VIRTIO 0x0001 0110\n"
        b"NETBENCH PHASE-END tcp_ping 0\nNETBENCH EN"
    )
    lines = [m[0].decode().strip() for m in GUEST_LINE.finditer(text)]
    assert lines == [
        "SOCKTOOL LISTENING tcp:5001",
        "NETBENCH VIRTIO 0x0001 0110",
        "NETBENCH PHASE-END tcp_ping 0",
    ]
    parsed = [parse_guest_line(line) for line in lines]
    assert [(p.kind, p.words) for p in parsed] == [
        ("LISTENING", ("tcp:5001",)),
        ("VIRTIO", ("0x0001", "0110")),
        ("PHASE-END", ("tcp_ping", "0")),
    ]
    error = parse_guest_line("SOCKTOOL ERROR accept vsock:5101: timeout")
    assert error.kind == "TOOL-ERROR"


# -- the arithmetic --------------------------------------------------------------------


def _sample(
    wall_s: float,
    vcpu: tuple[int, int, int, int],
    waiting: int,
    io: tuple[int, int, int, int],
    process_ns: int,
    device: dict[str, int],
    interface: dict[str, int],
) -> Sample:
    return Sample(
        int(wall_s * 1e9),
        ThreadTimes(*vcpu),
        waiting,
        ThreadTimes(*io),
        ProcessTimes(process_ns, 1_000_000),
        device,
        interface,
        {"mmio": 10, "io": 5},
        {"clac": 7},
    )


def test_net_packets_come_from_the_taps_statistics_and_vsocks_from_the_devices_chains() -> None:
    begin = _sample(
        0, (0,) * 4, 0, (0,) * 4, 0, {"requests": 10, "tx_packets": 4}, {"tx_packets": 100}
    )
    end = _sample(
        1,
        (0,) * 4,
        0,
        (0,) * 4,
        0,
        {"requests": 310, "tx_packets": 104},
        {"tx_packets": 150, "rx_packets": 7},
    )
    assert net_packets(begin, end) == Packets(50, 7, net_packets(begin, end).source)
    assert "TAP" in net_packets(begin, end).source
    vsock = vsock_packets(begin, end)
    assert (vsock.to_guest, vsock.from_guest, vsock.total) == (200, 100, 300)


def test_cpu_time_is_reported_per_packet_and_as_shares_of_the_guest_and_ours() -> None:
    ms = 1_000_000
    begin = _sample(10.0, (0,) * 4, 7 * ms, (0,) * 4, 0, {"interrupts": 3, "notifications": 1}, {})
    # 2 s of wall time; the vCPU thread ran 1.5 s: 200 ms user of which 100 ms in guest
    # user mode, 1300 ms system (KVM emulating the guest's kernel), and waited 0.3 s for
    # a CPU; the I/O thread ran 0.3 s.
    end = _sample(
        12.0,
        (200 * ms, 1300 * ms, 100 * ms, 1500 * ms),
        307 * ms,
        (100 * ms, 200 * ms, 0, 300 * ms),
        2100 * ms,
        {"interrupts": 53, "notifications": 41},
        {},
    )
    end = Sample(
        end.wall_ns, end.vcpu, end.vcpu_waiting_ns, end.io, end.process, end.device,
        end.interface,
        {"mmio": 310, "io": 5, "hlt": 0}, {"clac": 207, "stac": 3},
    )  # fmt: skip
    report = cpu_report(begin, end, Packets(60, 40, "test"))
    assert report["wall_seconds"] == pytest.approx(2.0)
    assert report["vcpu_thread_us_per_packet"] == pytest.approx(15_000.0)
    assert report["io_thread_us_per_packet"] == pytest.approx(3_000.0)
    assert report["exits_per_packet"] == pytest.approx(3.0)
    assert report["exits"] == {"mmio": 300}
    assert report["completions"] == {"clac": 200, "stac": 3}
    assert report["device_interrupts"] == 50
    assert report["device_doorbells"] == 40
    assert report["share_vcpu_thread"] == pytest.approx(0.75)
    assert report["vcpu_thread_waiting_ns"] == 300 * ms
    assert report["share_vcpu_waiting"] == pytest.approx(0.15)
    assert report["share_vcpu_idle"] == pytest.approx(0.10)
    assert report["share_io_thread"] == pytest.approx(0.15)
    # The process's 2100 ms less the vCPU's 1500 and the I/O thread's 300.
    assert report["other_threads_ns"] == 300 * ms
    assert report["host_peer_ns"] == 0
    # Of the vCPU's 1500 ms: ours is user time outside the guest (100 ms).
    assert report["vcpu_guest_share"] == pytest.approx(1400 / 1500)
    assert report["packets_to_guest"] == 60 and report["packets_from_guest"] == 40


def test_no_packets_and_no_time_divide_by_nothing() -> None:
    same = _sample(1.0, (0,) * 4, 0, (0,) * 4, 0, {}, {})
    report = cpu_report(same, same, Packets(0, 0, "test"))
    assert report["vcpu_thread_us_per_packet"] == 0.0
    assert report["share_vcpu_thread"] == 0.0
    assert report["vcpu_guest_share"] == 0.0
    assert report["share_vcpu_idle"] == 0.0


def test_the_floor_is_the_median_of_its_runs_and_the_ratio_is_in_the_figures_unit() -> None:
    floor = Floor("tcp_stream", "MB/s", (100.0, 400.0, 200.0))
    assert floor.figure == 200.0
    assert ratio_to_floor(2.0, floor) == pytest.approx(0.01)
    ping = Floor("tcp_ping", "us", (20.0, 30.0))
    assert ratio_to_floor(25_000.0, ping) == pytest.approx(1000.0)
    phases: dict[str, dict[str, object]] = {
        "tcp_ping": {"figure": 25_000.0},
        "vsock_ping": {"figure": None},
    }
    floors = {"tcp_ping": ping, "unix_ping": Floor("unix_ping", "us", (10.0,))}
    with_floors(phases, floors)
    assert phases["tcp_ping"]["ratio_to_floor"] == pytest.approx(1000.0)
    assert phases["tcp_ping"]["floor"] == 25.0
    assert phases["vsock_ping"]["floor_name"] == "unix_ping"
    assert phases["vsock_ping"]["ratio_to_floor"] is None


def _conn(sent: int, sent_crc: int, received: int, received_crc: int, seconds: float) -> str:
    return (
        f"SOCKTOOL CONN index=0 sent={sent} sent_crc={sent_crc:08x} received={received} "
        f"received_crc={received_crc:08x} seconds={seconds:.6f}\n"
    )


def test_a_streams_figure_is_the_receivers_and_both_ends_must_agree() -> None:
    host = _conn(4_000_000, 0xAB, 0, 0, 1.0) + "SOCKTOOL DONE connections=1 seconds=1.0\n"
    guest = "SOCKTOOL LISTENING tcp:5001\n" + _conn(0, 0, 4_000_000, 0xAB, 2.0)
    report, problems = phase_figure("host_to_guest", host, guest, 4_000_000, 1)
    assert problems == []
    assert (report["figure"], report["unit"], report["seconds"]) == (2.0, "MB/s", 2.0)
    # guest -> host: the host's end received, and times it.
    sent, received = _conn(4_000_000, 0xAB, 0, 0, 3.0), _conn(0, 0, 4_000_000, 0xAB, 1.0)
    report, problems = phase_figure("guest_to_host", received, sent, 4_000_000, 1)
    assert (report["figure"], problems) == (4.0, [])
    bad_crc = _conn(0, 0, 4_000_000, 0xAC, 2.0)
    report, problems = phase_figure("host_to_guest", host, bad_crc, 4_000_000, 1)
    assert report["figure"] is None and "disagree" in problems[0]
    short = _conn(0, 0, 1000, 0xAB, 2.0)
    report, problems = phase_figure(
        "host_to_guest", _conn(1000, 0xAB, 0, 0, 1.0), short, 4_000_000, 1
    )
    assert report["figure"] is None and "received 1000 bytes" in problems[0]
    report, problems = phase_figure(
        "host_to_guest", "SOCKTOOL ERROR connect tcp:10.78.0.2:5001: errno=113", "", 4, 1
    )
    assert report["figure"] is None
    assert problems[0] == "host: connect tcp:10.78.0.2:5001: errno=113"
    assert "CONN lines: host 0, guest 0" in problems[1]


def test_a_pings_figure_is_microseconds_per_round_trip_and_the_guest_echoed_each() -> None:
    host = "SOCKTOOL PING count=200 seconds=5.000000\n"
    report, problems = phase_figure("ping", host, "SOCKTOOL ECHO bytes=200\n", 1, 200)
    assert problems == []
    assert (report["figure"], report["unit"], report["echoed_bytes"]) == (25_000.0, "us", 200)
    report, problems = phase_figure("ping", host, "SOCKTOOL ECHO bytes=199\n", 1, 200)
    assert report["figure"] is None and "echoed [199]" in problems[0]
    report, problems = phase_figure("ping", "", "SOCKTOOL ECHO bytes=200\n", 1, 200)
    assert report["figure"] is None and "no PING line" in problems[0]


def test_the_table_has_a_line_per_phase_with_its_ratio_and_the_floors() -> None:
    phases: dict[str, dict[str, object]] = {
        "tcp_ping": {
            "figure": 25_000.0,
            "unit": "us",
            "floor": 25.0,
            "ratio_to_floor": 1000.0,
            "packets_to_guest": 200,
            "packets_from_guest": 200,
            "vcpu_thread_us_per_packet": 12_000.0,
            "vcpu_guest_share": 0.99,
            "io_thread_us_per_packet": 30.0,
            "exits_per_packet": 2.5,
        },
        "vsock_ping": {"figure": None, "errors": ["x"]},
    }
    lines = table(phases, [Floor("tcp_ping", "us", (25.0,))]).splitlines()
    assert lines[0].split()[:4] == ["phase", "figure", "floor", "ratio"]
    assert lines[1].split() == [
        "tcp_ping", "2.5e+04", "us", "25", "us", "1e+03", "400", "12000.0", "99.0%", "30.0",
        "2.50",
    ]  # fmt: skip
    assert lines[2].split()[0] == "vsock_ping" and "nan" in lines[2]
    assert lines[3].startswith("floors") and "tcp_ping 1 runs: 25 us" in lines[3]


# -- on the host -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_sock_tool(tmp_path_factory.mktemp("sock-tool"))
    except ToolUnavailable as error:
        pytest.fail(f"CI installs gcc and libc6-dev: {error}")


@pytest.mark.parametrize("name", FLOOR_NAMES)
def test_a_floor_run_measures_the_same_tool_on_the_host(
    tool: Path, tmp_path: Path, name: str
) -> None:
    with socket.socket() as probe:  # a free port: parallel test runs each get their own
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    figure = floor_once(tool, name, tmp_path, 1 << 20, 100, 20, port)
    assert figure > 0


def test_the_run_inside_refuses_a_namespace_it_is_not_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("ip netns identify needs ip(8) and root")
    assert main(["--in-netns", "kvm-vmm-no-such-namespace"]) == 1
    assert "refusing" in capsys.readouterr().err


def test_a_threads_run_queue_wait_is_read_from_its_schedstat() -> None:
    tid = threading.get_native_id()
    waited = waiting_ns(tid)
    assert waited >= 0
    assert waiting_ns(tid) >= waited  # it only grows


@dataclass
class _Counted:
    values: dict[str, int]

    def counters(self) -> dict[str, int]:
        return self.values


@dataclass
class _FakePciDevice:
    """As VirtioPciDevice: its counters() lays the transport's over the device's."""

    device: _Counted

    def counters(self) -> dict[str, int]:
        return {**self.device.counters(), "notify_register_writes": 0}


@dataclass
class _FakeMachine:
    def counters(self) -> dict[str, dict[str, int]]:
        return {"exits": {"io": 3}, "completions": {"clac": 2}}


def test_a_sample_takes_the_kvmfast_devices_own_doorbell_count() -> None:
    tid = threading.get_native_id()
    device = _FakePciDevice(_Counted({"notifications": 869, "interrupts": 940}))
    sample = take_sample(
        cast(Machine, _FakeMachine()), cast(VirtioPciDevice, device), False, tid, [tid]
    )
    assert sample.device == {"notifications": 869, "interrupts": 940, "notify_register_writes": 0}
    assert sample.interface == {}
    assert (sample.exits, sample.completions) == ({"io": 3}, {"clac": 2})
    assert sample.io.run_ns >= sample.vcpu.run_ns > 0  # the same thread, read in turn
