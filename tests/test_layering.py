"""The layers: `nlrewrite_core` is the pure library and never imports `flows` or `tasks` (nor Prefect);
`tasks` never imports `flows`. Checked on the source (every import statement, also the lazy ones
inside functions) and by importing the library in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of `package` imports (absolute names; relative imports resolved)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        mods: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module)
        out[str(path.relative_to(ROOT))] = mods
    return out


def offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f}: {m}" for f, mods in imported_modules(package).items() for m in sorted(mods)
            if m.split(".")[0] in forbidden]


def test_core_never_imports_flows_tasks_or_prefect():
    assert offending("nlrewrite_core", ("flows", "tasks", "prefect")) == []


def test_tasks_never_import_flows():
    assert offending("tasks", ("flows",)) == []


def test_core_imports_without_prefect_loaded():
    code = ("import sys, nlrewrite_core, nlrewrite_core.config, nlrewrite_core.storage, nlrewrite_core.query\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flows', 'tasks', 'prefect'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
