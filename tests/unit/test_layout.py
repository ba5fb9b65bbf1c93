"""The layout's rules that a linter does not check (import-linter checks the layers, the independence of the CLI
leaves and the absence of cycles): few imports inside functions in jobs/, each with its reason; no module in jobs/
over 400 lines unless its docstring says why; every CLI command is `python -m jobs.<module>` with a JobSpec."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from jobs import cli

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs").rglob("*.py"))


def _function_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out.append((node.lineno, lines[node.lineno - 1]))
    return out


def test_few_imports_inside_functions_in_jobs_each_with_a_reason() -> None:
    found = [(p.relative_to(ROOT), n, line) for p in JOBS for n, line in _function_imports(p)]
    assert len(found) < 10, "\n".join(f"{p}:{n}: {line.strip()}" for p, n, line in found)
    unexplained = [(p, n) for p, n, line in found if "#" not in line]
    assert not unexplained, f"an import inside a function needs a comment saying why (optional dependency, " \
                            f"start-up cost): {unexplained}"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_jobs_modules_stay_small_or_say_why(path: Path) -> None:
    n = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert n <= 400 or "longer than 400 lines" in doc.lower(), f"{path}: {n} lines and no reason in its docstring"


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - cli.NOT_JOBS))
def test_every_job_is_a_module_with_a_jobspec(command: str) -> None:
    module = importlib.import_module(cli.COMMANDS[command][0])
    assert isinstance(module.JOB, cli.JobSpec) and callable(module.main)
