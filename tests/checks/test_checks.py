"""The checks CI keeps clean, run here so that `pytest` covers them.

ruff (lint and import order) over the project and mypy over the package and
benchmarks/, with the configuration in pyproject.toml and the versions pinned
by the ``dev`` extra. Each runs as a subprocess from the repository root. And
the sizes of the package's modules, classes and functions.
"""

import ast
import subprocess
import sys

import pytest

from helpers import ROOT

# The dev extra installs the pinned checkers from Python 3.11 on; there they
# must be present.
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="the pinned checkers need Python 3.11+")


def run_tool(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.timeout(120)
def test_ruff_finds_nothing():
    proc = run_tool("ruff", "check", "--no-cache", "--output-format", "concise", timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_mypy_finds_nothing():
    proc = run_tool("mypy", timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_checks_the_package_and_the_benchmarks():
    # test_mypy_finds_nothing runs mypy without arguments: it checks what this list names.
    import tomllib  # Python 3.11+, as this module

    with open(ROOT / "pyproject.toml", "rb") as file:
        files = tomllib.load(file)["tool"]["mypy"]["files"]
    assert set(files) == {"parallel_exec", "benchmarks"}


# The sizes that keep each piece of the package readable in one sitting.
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 200, 60


@pytest.mark.timeout(60)
def test_no_module_class_or_function_of_the_package_is_over_its_size():
    too_long = []
    for path in sorted((ROOT / "parallel_exec").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    too_long.append(f"{name}: {node.name} {lines} lines")
    assert not too_long, too_long
