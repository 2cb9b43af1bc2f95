"""kvm_vmm.bench_snapshot: the whole benchmark on an 8 MiB guest with two runs (its
report's shape, and that every restored guest, in this process and in new ones, ran to
its debug exit), and the pieces that need no KVM: which pages are written, the child's
timestamps, the demo's answer and its skip. No figure is judged: times vary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvm_vmm import layout
from kvm_vmm.bench_snapshot import (
    DIRTY_FROM,
    EXIT_STATUS,
    GROUP,
    PAGE,
    demo_warm_starts,
    dirty_pages,
    main,
    page_data,
    parse_sizes,
)
from kvm_vmm.bench_snapshot_process import (
    DEMO_ANSWER,
    NO_DEMO_SNAPSHOT,
    Spawned,
    demo_snapshots,
    demo_warm_start,
    script_steps,
)
from kvmfast.testing import require_kvm

TINY = 8 * layout.MIB
SUMMARY = {"median", "min", "max"}


@pytest.mark.kvm
def test_the_benchmark_runs_a_tiny_guest_and_every_restore_reaches_the_debug_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_kvm()
    output = tmp_path / "report.json"
    status = main(["--sizes", "8M", "--runs", "2", "--no-demo", "--output", str(output)])
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(output.read_text())
    assert printed == report
    assert status == 0, report["errors"]
    assert report["errors"] == []
    assert report["runs"] == 2
    assert report["demo_warm_start"] == {"skipped": "--no-demo"}
    assert report["targets"] == {"restore_to_running_vcpu_ms": 50.0, "demo_answer_s": 1.0}
    (size,) = report["sizes"]
    assert size["memory_bytes"] == TINY
    assert size["dirtied_pages"] == (TINY - DIRTY_FROM) // PAGE // GROUP
    assert set(size["snapshot"]["pause_to_written_ms"]) == SUMMARY
    memory = size["memory_file"]
    assert memory["length_bytes"] == TINY
    assert memory["dirtied_bytes"] == size["dirtied_pages"] * PAGE
    # The written pages, the code and the boot page tables: a few pages more, no hole filled.
    assert (
        memory["dirtied_bytes"]
        <= memory["allocated_bytes"]
        <= memory["dirtied_bytes"] + (64 * PAGE)
    )
    in_process = size["restore_in_process"]
    assert set(in_process) == {
        "floor",
        "private",
        "copy",
        "private_cold_cache",
        "copy_cold_cache",
    }
    for mode in ("private", "copy", "private_cold_cache", "copy_cold_cache"):
        assert in_process[mode]["exit_statuses"] == [EXIT_STATUS], mode
        assert set(in_process[mode]["ratio_to_floor"]) == SUMMARY
        assert len(in_process[mode]["each_total_ms"]) == 2
        assert len(in_process[mode]["each_floor_total_ms"]) == 2
        assert in_process[mode]["target_ms"] == 50.0
    command = size["restore_command"]
    assert command["floor"]["command"] == ["python", "-c", "import kvm_vmm.machine"]
    restored = command["python_c_restore"]
    assert restored["exit_statuses"] == [EXIT_STATUS]  # the new process's guest ran
    assert set(restored["steps_ms"]) == {
        "startup",
        "import",
        "restore",
        "start_to_debug_exit",
        "close_and_exit",
        "spawn_to_debug_exit",
    }
    if "skipped" not in command["kvm_vmm_restore"]:
        assert command["kvm_vmm_restore"]["exit_statuses"] == [EXIT_STATUS]


def test_a_quarter_of_the_pages_above_2_mib_are_written_one_per_group() -> None:
    pages = list(dirty_pages(TINY, seed=1))
    assert len(pages) == (TINY - DIRTY_FROM) // PAGE // GROUP
    assert [page // (GROUP * PAGE) for page in pages] == list(
        range(DIRTY_FROM // (GROUP * PAGE), TINY // (GROUP * PAGE))
    )
    assert all(page % PAGE == 0 for page in pages)
    assert len({page // PAGE % GROUP for page in pages}) == GROUP  # not a fixed stride
    assert pages == list(dirty_pages(TINY, seed=1))
    assert pages != list(dirty_pages(TINY, seed=2))


def test_pages_above_the_pci_hole_are_written_too() -> None:
    pages = list(dirty_pages(layout.PCI_HOLE_START + 8 * layout.MIB, seed=1))
    above = [page for page in pages if page >= layout.FOUR_GIB]
    assert len(above) == 8 * layout.MIB // PAGE // GROUP
    assert not [page for page in pages if layout.PCI_HOLE_START <= page < layout.FOUR_GIB]


def test_every_written_page_is_non_zero_and_its_own() -> None:
    first, second = page_data(0x200000, 1), page_data(0x201000, 1)
    assert len(first) == PAGE and any(first) and any(second)
    assert first != second


def test_sizes_are_parsed_and_a_size_without_room_for_the_pages_refused() -> None:
    import argparse

    assert parse_sizes("256M,2G") == [256 * layout.MIB, 2048 * layout.MIB]
    for bad in ("2M", "5M", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sizes(bad)


def test_the_childs_timestamps_split_its_time_and_junk_gives_none() -> None:
    stamps = {"began": 10.02, "imported": 10.40, "restored": 10.41, "ran": 10.412}
    spawned = Spawned(0.45, EXIT_STATUS, "note\n" + json.dumps(stamps) + "\n", "")
    steps = script_steps(spawned, began=10.0)
    assert steps is not None
    assert steps["startup"] == pytest.approx(0.02)
    assert steps["import"] == pytest.approx(0.38)
    assert steps["restore"] == pytest.approx(0.01)
    assert steps["start_to_debug_exit"] == pytest.approx(0.002)
    assert steps["close_and_exit"] == pytest.approx(0.038)
    assert steps["spawn_to_debug_exit"] == pytest.approx(0.412)
    assert script_steps(Spawned(0.1, 1, "", "Traceback"), began=0.0) is None
    assert script_steps(Spawned(0.1, 1, "{}", ""), began=0.0) is None


def test_the_demos_answer_is_the_echos_output_not_the_typed_line() -> None:
    assert DEMO_ANSWER.search(b"/ # echo ok\r\nok\r\n/ # ")
    assert not DEMO_ANSWER.search(b"/ # echo ok\r\n")
    assert not DEMO_ANSWER.search(b"/ # echo ok\r\nokay\r\n")


def test_without_a_demo_snapshot_the_demo_is_skipped_with_the_reason(tmp_path: Path) -> None:
    assert demo_warm_start(tmp_path, timeout=1.0) == {"skipped": NO_DEMO_SNAPSHOT}
    assert demo_warm_start(None, timeout=1.0) == {"skipped": NO_DEMO_SNAPSHOT}
    (tmp_path / "snapshots" / "other").mkdir(parents=True)
    assert demo_snapshots(tmp_path) == []
    (tmp_path / "snapshots" / "demo-0123").mkdir()
    assert demo_snapshots(tmp_path) == [tmp_path / "snapshots" / "demo-0123"]


# Stand-ins for the demo: a shell that answers the typed line, and one that never does
# and leaves only on the console's Ctrl-A x.
ANSWERS = "import sys; line = sys.stdin.readline(); print('ok' if line == 'echo ok\\n' else line)"
SILENT = "import os\nseen = b''\nwhile b'\\x01x' not in seen:\n    seen += os.read(0, 64)"


def test_the_demo_is_timed_to_its_answer_and_one_that_never_answers_is_reported(
    tmp_path: Path,
) -> None:
    (tmp_path / "snapshots" / "demo-0123").mkdir(parents=True)
    answered = demo_warm_start(tmp_path, timeout=30.0, argv=[sys.executable, "-c", ANSWERS])
    assert "error" not in answered
    assert isinstance(answered["spawn_to_answer_s"], float)
    assert answered["snapshots_in_cache"] == ["demo-0123"]
    silent = demo_warm_start(tmp_path, timeout=0.5, argv=[sys.executable, "-c", SILENT])
    assert "spawn_to_answer_s" not in silent
    assert "no answer within 0.5 s" in str(silent["error"])


def test_the_demo_is_timed_as_many_times_as_the_runs(tmp_path: Path) -> None:
    (tmp_path / "snapshots" / "demo-0123").mkdir(parents=True)
    timed = demo_warm_starts(tmp_path, 30.0, 3, argv=[sys.executable, "-c", ANSWERS])
    assert "errors" not in timed
    assert len(timed["each_spawn_to_answer_s"]) == 3  # type: ignore[arg-type]
    assert set(timed["spawn_to_answer_s"]) == SUMMARY  # type: ignore[arg-type]
    silent = demo_warm_starts(tmp_path, 0.5, 2, argv=[sys.executable, "-c", SILENT])
    assert silent["each_spawn_to_answer_s"] == [] and len(silent["errors"]) == 2  # type: ignore[arg-type]
