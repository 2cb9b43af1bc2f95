"""Production code never imports test helpers (the project's rules, brief "Python").

Production is every module under packages/*/src and crates/kvmfast/python except
kvmfast/testing.py itself. Test helpers are the ``testing`` modules of kvmfast and
kvm-devices and every module under a tests/ directory of the repository (helpers such
as emulation_support or tests.guests reach sys.path when pytest runs, so an import of
one would work in the tests and break for users).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_ROOTS = [*sorted(REPO.glob("packages/*/src")), REPO / "crates/kvmfast/python"]
ALLOWED_TO_IMPORT_TEST_HELPERS = {REPO / "crates/kvmfast/python/kvmfast/testing.py"}
TEST_HELPER_PACKAGES = {"kvmfast.testing", "kvm_devices.testing", "kvm_vmm.testing"}
TEST_DIRECTORIES = [
    REPO / "tests",
    *sorted(REPO.glob("packages/*/tests")),
    REPO / "crates/kvmfast/tests",
]


def names_of_test_modules() -> set[str]:
    """Top-level names a module under a tests/ directory can be imported as."""
    names = {"tests", "conftest"}
    for directory in TEST_DIRECTORIES:
        for path in directory.rglob("*.py"):
            names.add(path.stem)
            names.update(part for part in path.relative_to(directory).parts[:-1])
    names.discard("__init__")
    return names


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import; ``from a import b`` gives both
    ``a`` and ``a.b`` since b may be a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def forbidden_imports(source: str, test_modules: set[str]) -> list[tuple[int, str]]:
    bad = []
    for line, name in imported_modules(source):
        helper = any(name == p or name.startswith(p + ".") for p in TEST_HELPER_PACKAGES)
        if helper or name.split(".")[0] in test_modules:
            bad.append((line, name))
    return bad


def production_sources() -> list[Path]:
    sources = [path for root in PRODUCTION_ROOTS for path in sorted(root.rglob("*.py"))]
    return [path for path in sources if path not in ALLOWED_TO_IMPORT_TEST_HELPERS]


def test_production_code_imports_no_test_helper() -> None:
    test_modules = names_of_test_modules()
    sources = production_sources()
    assert any(path.name == "cli.py" for path in sources)  # the scan found the VMM
    violations = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in sources
        for line, name in forbidden_imports(path.read_text(), test_modules)
    ]
    assert violations == []


@pytest.mark.parametrize(
    "source",
    [
        "from kvmfast.testing import assemble\n",
        "import kvmfast.testing\n",
        "from kvmfast import testing\n",
        "def f() -> None:\n    from kvm_devices.testing import FakeClock\n",
        "import emulation_support\n",
        "from tests.guests import multiboot\n",
        "from conftest import kvm\n",
    ],
)
def test_the_scan_finds_each_form_of_test_helper_import(source: str) -> None:
    assert forbidden_imports(source, names_of_test_modules()) != []


def test_the_scan_passes_production_imports() -> None:
    source = "from kvmfast.assembler import assemble\nimport kvm_devices.pic\nfrom . import x86\n"
    assert forbidden_imports(source, names_of_test_modules()) == []
