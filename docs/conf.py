"""Sphinx configuration: Markdown pages (MyST), API reference from the docstrings.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``; the code
blocks marked ``testcode`` run with ``-b doctest``. tests/checks/test_docs.py does both.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy

import parallel_exec  # noqa: E402

# The launcher's --help, as a user sees it, for the API reference.
_help = subprocess.run(
    [sys.executable, "-m", "parallel_exec.launch", "--help"],
    capture_output=True, text=True, check=True, cwd=ROOT,
    env={**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)},
).stdout
_GENERATED = Path(__file__).parent / "_generated"
_GENERATED.mkdir(exist_ok=True)
(_GENERATED / "launch-help.txt").write_text(_help, encoding="utf-8")


def _module_table() -> str:
    """A Markdown table: each module of the package, its size and its docstring's first paragraph."""
    rows = ["| module | lines | its one job |", "|---|--:|---|"]
    package = ROOT / "parallel_exec"
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        docstring = ast.get_docstring(ast.parse(source)) or ""
        summary = " ".join(docstring.split("\n\n")[0].split()).replace("|", "\\|")
        rows.append(f"| `{path.relative_to(ROOT).as_posix()}` | {source.count(chr(10))} | {summary} |")
    return "\n".join(rows) + "\n"


(_GENERATED / "modules.md").write_text(_module_table(), encoding="utf-8")

project = "parallel_exec"
author = "parallel_exec contributors"
copyright = "parallel_exec contributors"
release = version = parallel_exec.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

myst_heading_anchors = 3  # links such as executor.md#routing

# Google-style docstrings (STYLE.md), signatures in the order written.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# Every ``testcode`` block runs in a fresh temporary directory, so examples
# that write files (a trace) leave nothing behind.
doctest_global_setup = """
import os as _os
import tempfile as _tempfile
_doc_cwd = _os.getcwd()
_doc_tmp = _tempfile.TemporaryDirectory()
_os.chdir(_doc_tmp.name)
"""
doctest_global_cleanup = """
_os.chdir(_doc_cwd)
_doc_tmp.cleanup()
"""

html_theme = "furo"
html_title = f"parallel_exec {release}"
