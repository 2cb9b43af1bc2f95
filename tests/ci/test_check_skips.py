""".ci/check_skips.py: CI fails on a skip whose reason is not a documented host limit,
and passes a log whose every skip is one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_skips", ROOT / ".ci" / "check_skips.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_skips = _checker()

DOCUMENTED = (
    "SKIPPED [1] tests/test_emulate_atomic_and_tsc.py:135: the host raises #UD for RDPID "
    "in its own emulator, before any exit"
)
UNDOCUMENTED = "SKIPPED [3] packages/kvm-vmm/tests/test_initramfs.py:140: GNU cpio is not installed"
NO_KVM = "SKIPPED [40] tests/test_lifecycle.py:12: no /dev/kvm (this host has no KVM)"
LOG = f"""
kvmfast: commands[0]> pytest crates/kvmfast/tests
........s..
=========================== short test summary info ============================
{DOCUMENTED}
\x1b[33mSKIPPED [3] test_emulate_interrupts.py:52: this host raises #UD for a guest user-mode \
INT n before any exit\x1b[0m
180 passed, 4 skipped in 80.1s
"""


def _run(tmp_path: Path, log: str) -> int:
    path = tmp_path / "ci.log"
    path.write_text(log)
    result: int = check_skips.main([str(path)])
    return result


def test_a_log_whose_skips_are_all_documented_host_limits_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, LOG) == 0
    out = capsys.readouterr().out
    assert "2 skip line(s)" in out
    # The run's skip list itself, each line as pytest printed it.
    plain = LOG.replace("\x1b[33m", "").replace("\x1b[0m", "")
    skipped = [line.strip() for line in plain.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 2 and all(line in out for line in skipped)


@pytest.mark.parametrize("line", [UNDOCUMENTED, NO_KVM])
def test_an_undocumented_skip_fails_and_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    assert _run(tmp_path, LOG + line + "\n") == 1
    err = capsys.readouterr().err
    assert line in err
    assert DOCUMENTED not in err


def test_a_limit_matches_from_the_start_of_the_reason_only(tmp_path: Path) -> None:
    hidden = "SKIPPED [1] t.py:1: cpio missing; the host processor has no AVX-512 to compare with"
    assert _run(tmp_path, hidden + "\n") == 1


def test_a_limits_table_without_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="no host limits"):
        check_skips.documented_limits("# Skips\n\nnothing here\n")


def test_every_documented_limit_compiles_and_says_why() -> None:
    doc = check_skips.DEFAULT_LIMITS.read_text()
    rows = [line for line in doc.splitlines() if check_skips.LIMIT_ROW.match(line)]
    assert len(rows) == len(check_skips.documented_limits(doc)) >= 5
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 3 and all(cells), row
        re.compile(cells[0].strip("`"))
