"""The checks CI keeps clean, run here so that `pytest` covers them.

ruff (lint and import order) over the project and mypy over the package, with
the configuration in pyproject.toml and the versions pinned by the ``dev``
extra. Each runs as a subprocess from the repository root.
"""

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
