"""The one error a snapshot that cannot be taken or restored raises."""

from __future__ import annotations

SNAPSHOT_ERROR_STATUS = 2  # the CLI's exit status for a refused snapshot (a usage error's)


class SnapshotError(ValueError):
    """A snapshot refused: what is wrong, named; nothing the user had was changed."""

    status = SNAPSHOT_ERROR_STATUS

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"snapshot {path}: {problem}")
