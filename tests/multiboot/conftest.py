"""Fixtures of the Multiboot kernel tests: one build directory per session, a runner per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from guests.multiboot import KernelBuilder, KernelRunner, missing_tools


@pytest.fixture(scope="session")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> KernelBuilder:
    missing = missing_tools()
    if missing:
        pytest.skip(f"building Multiboot test kernels needs GNU binutils ({', '.join(missing)})")
    return KernelBuilder(tmp_path_factory.mktemp("multiboot-kernels"))


@pytest.fixture
def runner(tmp_path: Path) -> KernelRunner:
    return KernelRunner(tmp_path)
