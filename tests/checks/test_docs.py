"""The documentation site builds cleanly, documents every public name, and its
code examples run (Sphinx's doctest builder runs each ``testcode`` block).

Both builds run as subprocesses, as CI's ``sphinx-build`` would, with
warnings as errors.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import parallel_exec as pe
from parallel_exec import dist

from helpers import ROOT

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="the pinned Sphinx needs Python 3.11+")


def sphinx_build(builder: str, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
               "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / builder)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)


@pytest.mark.timeout(300)
def test_docs_build_without_warnings_and_document_every_public_name(tmp_path):
    proc = sphinx_build("html", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    documented = set(re.findall(r'<dt class="sig sig-object py" id="([\w.]+)">', api))
    public = {f"parallel_exec.{name}" for name in pe.__all__}
    public |= {f"parallel_exec.dist.{name}" for name in dist.__all__}
    assert public - documented == set(), "public names missing from docs/api.md"


@pytest.mark.timeout(300)
def test_docs_code_examples_run(tmp_path):
    proc = sphinx_build("doctest", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "doctest" / "output.txt").read_text(encoding="utf-8")
    ran = int(re.search(r"^ +(\d+) tests$", summary, re.MULTILINE).group(1))
    assert ran >= 4, summary
    assert " 0 failures in tests" in summary, summary
