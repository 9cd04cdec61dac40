"""One-way layers, read from the source with `ast` (not by importing anything).

- The client distribution (`client/adaptive_worker_client`) imports nothing
  from the server's packages: it is installed alone inside agents.
- The learning engine (`worker/engine`) imports nothing from `storage`,
  `tasks` or `adaptive_worker_client`: it is pure computation on its own types.

Every import counts, including ones inside functions and under
TYPE_CHECKING, since a lazy import still breaks when the package is absent.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client" / "adaptive_worker_client"
ENGINE = ROOT / "worker" / "engine"
SERVER_PACKAGES = ("worker", "storage", "tasks")


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = package.split(".")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            # `from pkg import mod` may import a submodule: count pkg.mod too.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def sources(root: Path, package: str) -> list[tuple[Path, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((path, ".".join([package, *parts[:-1]]) if parts else package))
    return found


def violations(root: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path, pkg in sources(root, package):
        for name in sorted(imported_modules(path, pkg)):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_the_source_trees_exist() -> None:
    # Guards the tests below against passing vacuously on a moved tree.
    assert len(sources(CLIENT, "adaptive_worker_client")) >= 10
    assert len(sources(ENGINE, "worker.engine")) >= 5


def test_the_client_imports_nothing_from_the_server() -> None:
    assert violations(CLIENT, "adaptive_worker_client", SERVER_PACKAGES) == []


def test_the_engine_imports_nothing_from_storage_tasks_or_the_client() -> None:
    assert violations(ENGINE, "worker.engine", ("storage", "tasks", "adaptive_worker_client")) == []


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import storage.models\n", "worker.engine", "storage.models"),
        ("from tasks import jobs\n", "worker.engine", "tasks.jobs"),
        ("def f():\n    from storage.keys import Keys\n", "worker.engine", "storage.keys"),
        ("from . import keys\n", "storage", "storage.keys"),
        ("from .. import cli\n", "worker.engine", "worker.cli"),
    ],
)
def test_the_scanner_sees_every_kind_of_import(
    tmp_path: Path, source: str, package: str, expected: str
) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert expected in imported_modules(path, package)
