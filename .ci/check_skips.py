#!/usr/bin/env python3
"""Fails on a test skipped for a reason that is not a documented host limit.

``check_skips.py LOG [--limits DOC]`` reads pytest's short summary lines
(``SKIPPED [n] file:line: reason``, printed for every skip under ``-ra``) from
LOG, and the documented host limits from the table of docs/host-limits.md (a
regular expression per row, in backquotes, matched at the start of a reason).
It prints each skip whose reason no row matches and exits 1 if there is one;
otherwise it prints every skip line (the run's skip list) and exits 0.
Standard library only: CI runs it with the system's Python, outside tox.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_LIMITS = Path(__file__).resolve().parent.parent / "docs" / "host-limits.md"
SKIP_LINE = re.compile(r"^SKIPPED \[\d+\] (?P<where>.+?): (?P<reason>.*)$")
LIMIT_ROW = re.compile(r"^\| `(?P<pattern>[^`]+)` \|")
# tox or pytest may colour their output even into a pipe.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def documented_limits(doc: str) -> list[re.Pattern[str]]:
    """The patterns of the limits table; a doc with none is an error, not an empty list
    (which would fail every skip for a reason unrelated to the skips)."""
    patterns = [re.compile(m["pattern"]) for m in map(LIMIT_ROW.match, doc.splitlines()) if m]
    if not patterns:
        raise ValueError("no host limits found (rows of the form | `pattern` | ...)")
    return patterns


def skip_lines(log: str) -> list[tuple[str, str]]:
    """(line, reason) of every skip in the log's short test summaries."""
    found = []
    for raw in log.splitlines():
        line = ANSI_ESCAPE.sub("", raw).rstrip()
        match = SKIP_LINE.match(line)
        if match:
            found.append((line, match["reason"]))
    return found


def undocumented(log: str, limits: Sequence[re.Pattern[str]]) -> list[str]:
    return [line for line, reason in skip_lines(log) if not any(p.match(reason) for p in limits)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the test run's output")
    parser.add_argument("--limits", type=Path, default=DEFAULT_LIMITS, help="the limits table")
    args = parser.parse_args(argv)
    limits = documented_limits(args.limits.read_text())
    log = args.log.read_text(errors="replace")
    offending = undocumented(log, limits)
    if offending:
        print(
            f"CI: {len(offending)} skip(s) for a reason that is not a host limit documented "
            f"in {args.limits}:",
            file=sys.stderr,
        )
        for line in offending:
            print(f"  {line}", file=sys.stderr)
        return 1
    skips = skip_lines(log)
    print(f"CI: {len(skips)} skip line(s), each a documented host limit:")
    for line, _ in skips:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
