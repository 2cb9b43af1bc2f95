"""kvm_vmm.bench_disk without a boot: the reader (built and run on the host against a
small file), the lines the guest prints, the report's arithmetic, the guest's /init."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from kvm_vmm.bench_disk import (
    Sample,
    ThreadTimes,
    bench_init,
    host_ratios,
    host_reference,
    parse_dd,
    parse_disk,
    phase_report,
    thread_times,
)
from kvm_vmm.bench_disk_reader import (
    PAGE_BYTES,
    ReaderUnavailable,
    ReadResult,
    build_reader,
    parse_result,
    random_args,
    run_reader,
    sequential_args,
)

MASK = (1 << 64) - 1
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def fold(checksum: int, data: bytes) -> int:
    """The reader's checksum: the first 8 bytes (little-endian) of every 4 KiB, in order."""
    for at in range(0, len(data) - 7, PAGE_BYTES):
        checksum = ((checksum ^ int.from_bytes(data[at : at + 8], "little")) * FNV_PRIME) & MASK
    return checksum


def splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_reader(tmp_path_factory.mktemp("reader"))
    except ReaderUnavailable as error:
        pytest.skip(f"the reader cannot be built here: {error}")


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * (1 << 20) + 5 * PAGE_BYTES)  # not a whole number of 1 MiB blocks
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    with path.open("rb") as written:
        os.fsync(written.fileno())
    return path, data


def _direct_or_skip(binary: Path, args: list[str]) -> ReadResult:
    output = subprocess.run([str(binary), *args], capture_output=True, text=True, check=False)
    if "ERROR" in output.stdout and "open: Invalid argument" in output.stdout:
        pytest.skip("the temporary directory's file system refuses O_DIRECT")
    result = parse_result(output.stdout)
    assert result is not None, output
    return result


def test_the_reader_reads_the_whole_file_in_1_mib_requests_direct_and_buffered(
    reader: Path, image: tuple[Path, bytes]
) -> None:
    path, data = image
    direct = _direct_or_skip(reader, sequential_args(str(path), "host", 0))
    assert (direct.label, direct.mode) == ("host", "seq")
    assert direct.bytes == len(data)
    assert direct.reads == 4  # three whole MiB and the 20 KiB tail
    assert direct.seconds > 0
    assert int(direct.checksum, 16) == fold(FNV_OFFSET, data)
    buffered = run_reader(reader, sequential_args(str(path), "host", 0, buffered=True))
    assert buffered.checksum == direct.checksum


def test_the_readers_random_reads_are_4_kib_at_aligned_offsets_from_the_seed(
    reader: Path, image: tuple[Path, bytes]
) -> None:
    path, data = image
    count, seed = 300, 12345
    result = _direct_or_skip(reader, random_args(str(path), "r", count, seed, 0))
    assert (result.reads, result.bytes) == (count, count * PAGE_BYTES)
    state, expected = seed, FNV_OFFSET
    for _ in range(count):
        state, value = splitmix64(state)
        at = value % (len(data) // PAGE_BYTES) * PAGE_BYTES
        expected = fold(expected, data[at : at + PAGE_BYTES])
    assert int(result.checksum, 16) == expected
    other = run_reader(reader, random_args(str(path), "r", count, seed + 1, 0, buffered=True))
    assert other.checksum != result.checksum


def test_the_reader_says_what_failed(reader: Path, tmp_path: Path) -> None:
    output = subprocess.run(
        [str(reader), *sequential_args(str(tmp_path / "absent"), "x", 0)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert output.returncode == 1
    assert output.stdout.startswith("DISKBENCH ERROR x open: No such file or directory")
    usage = subprocess.run([str(reader), "seq"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_result_lines_parse_and_others_do_not() -> None:
    line = (
        "\rDISKBENCH RESULT direct rand reads=2000 bytes=8192000 seconds=4.000000000 "
        "checksum=00ff00ff00ff00ff"
    )
    result = parse_result(line)
    assert result == ReadResult("direct", "rand", 2000, 8192000, 4.0, "00ff00ff00ff00ff")
    assert result.iops == 500.0
    assert result.ns_per_read == 2_000_000.0
    assert result.mb_per_s == pytest.approx(2.048)
    assert parse_result("DISKBENCH READY direct rand") is None
    assert parse_result(line.replace("seconds=4.000000000", "seconds=0.000000000")) is None
    assert parse_result(line.replace("reads=2000", "reads=0")) is None


def test_disk_and_dd_lines_parse() -> None:
    assert parse_disk("DISKBENCH DISK direct vda 524288 1280 254") == {
        "label": "direct",
        "name": "vda",
        "bytes": 256 << 20,
        "max_sectors_kb": 1280,
        "max_segments": 254,
    }
    assert parse_disk("DISKBENCH DISK direct vda 524288 1280") is None
    assert parse_disk("DISKBENCH DISK direct vda 524288 x 254") is None
    assert parse_dd("DISKBENCH DD direct 0 812.34 830.01") == {
        "label": "direct",
        "status": 0,
        "seconds": 17.67,
    }
    assert parse_dd("DISKBENCH DD direct 0 812.34") is None
    assert parse_dd("DISKBENCH DD direct zero 1 2") is None


def _sample(requests: int, read_bytes: int, io_ns: int, vcpu_ns: int, exits: int) -> Sample:
    return Sample(
        io=ThreadTimes(io_ns // 2, io_ns // 2, 0, io_ns),
        vcpu=ThreadTimes(vcpu_ns // 4, vcpu_ns // 2, vcpu_ns // 4, vcpu_ns),
        device={"requests": requests, "read_bytes": read_bytes},
        exits={"mmio": exits // 2, "io": exits - exits // 2, "hlt": 0},
        completions={"clac": exits // 4},
    )


def test_a_phase_is_reported_per_device_request_with_the_time_shares() -> None:
    guest = ReadResult("direct", "seq", 256, 256 << 20, 2.0, "0" * 16)
    begin = _sample(10, 4096, 1_000_000, 50_000_000, 100)
    # The block layer split each 1 MiB read in two: 512 device requests.
    end = _sample(10 + 512, 4096 + (256 << 20), 1_000_000 + 512_000_000, 1_050_000_000, 612)
    report = phase_report(guest, begin, end)
    assert report["device_requests"] == 512
    assert report["bytes_per_request"] == 512 << 10
    assert report["ns_per_request"] == pytest.approx(2e9 / 512)
    assert report["io_thread_ns_per_request"] == pytest.approx(1e6)
    assert report["vcpu_thread_ns_per_request"] == pytest.approx(1e9 / 512)
    assert report["vcpu_thread_user_system_guest_ns"] == [250_000_000, 500_000_000, 250_000_000]
    assert report["exits_per_request"] == 1.0
    assert report["exits"] == {"io": 256, "mmio": 256}  # nothing new: left out
    assert report["completions"] == {"clac": 128}
    assert report["share_vcpu_thread"] == pytest.approx(0.5)
    assert report["share_io_thread"] == pytest.approx(0.256)
    assert report["share_other"] == pytest.approx(0.244)
    assert report["mb_per_s"] == pytest.approx((256 << 20) / 2.0 / 1e6)
    assert "iops" not in report


def test_ratios_are_to_the_mean_of_the_hosts_runs_and_check_the_bytes() -> None:
    guest = ReadResult("direct", "rand", 100, 409600, 1.0, "ab" * 8)
    host = [
        ReadResult("host", "rand", 100, 409600, 0.01, "ab" * 8),
        ReadResult("host", "rand", 100, 409600, 0.02, "ab" * 8),
    ]
    ratios = host_ratios(guest, host)
    assert ratios["host_iops"] == pytest.approx(7500.0)
    assert ratios["ratio_to_host"] == pytest.approx(100 / 7500)
    assert ratios["same_bytes_as_host"] is True
    host[1] = ReadResult("host", "rand", 100, 409600, 0.02, "cd" * 8)
    assert host_ratios(guest, host)["same_bytes_as_host"] is False
    seq = ReadResult("direct", "seq", 4, 4 << 20, 2.0, "00" * 8)
    ratios = host_ratios(seq, [ReadResult("host", "seq", 4, 4 << 20, 0.5, "00" * 8)])
    assert ratios["ratio_to_host"] == pytest.approx(0.25)


def test_each_disk_is_compared_with_the_host_reading_the_same_way() -> None:
    def run(mode: str) -> ReadResult:
        return ReadResult(mode, "seq" if "seq" in mode else "rand", 1, 4096, 1.0, "0" * 16)

    host = {
        key: run(key)
        for key in (
            "before_seq_direct",
            "before_seq_buffered",
            "after_seq_direct",
            "before_rand_buffered",
        )
    }
    seq = ReadResult("direct", "seq", 1, 4096, 1.0, "0" * 16)
    assert [r.label for r in host_reference(host, seq, True)] == [
        "before_seq_direct",
        "after_seq_direct",
    ]
    assert [r.label for r in host_reference(host, seq, False)] == ["before_seq_buffered"]
    rand = ReadResult("cached", "rand", 1, 4096, 1.0, "0" * 16)
    assert [r.label for r in host_reference(host, rand, False)] == ["before_rand_buffered"]


def test_the_guest_init_is_valid_sh_and_runs_the_reader_on_each_disk() -> None:
    init = bench_init(["virtio", "virtio_blk"], {0x1042: ["virtio", "virtio_blk"]}, 2000, 7)
    shell = shutil.which("sh")
    assert shell is not None
    checked = subprocess.run([shell, "-n"], input=init, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert init.startswith("#!/bin/sh\n") and init.rstrip().endswith("poweroff -f")
    assert '/bin/diskio seq "/dev/$name" "$label" 1048576 1000\n' in init
    assert '/bin/diskio rand "/dev/$name" "$label" 2000 7 1000\n' in init
    assert 'dd if="/dev/$name" of=/dev/null bs=1M iflag=direct' in init


def test_a_threads_times_grow_with_its_cpu_use() -> None:
    tid = threading.get_native_id()
    before = thread_times(tid)
    end = before.run_ns + 50_000_000
    while thread_times(tid).run_ns < end:
        pass
    after = thread_times(tid)
    assert after.run_ns - before.run_ns >= 50_000_000
    # utime/stime are in clock ticks: 50 ms of spinning moves their sum by a few.
    assert after.user_ns + after.system_ns > before.user_ns + before.system_ns
