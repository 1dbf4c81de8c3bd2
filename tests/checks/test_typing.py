"""Users' type checkers see the package: mypy finds it after README's install.

setuptools' default editable install of a flat layout hides the package
behind an import hook that mypy cannot follow; pyproject's ``package-dir``
makes it a plain path entry instead. The check runs mypy the way a user
would, on a script outside the repository, with no search path of its own.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = """\
import parallel_exec as pe

executor: int = pe.ContextExecutor([])  # a type error mypy can only see with the package's hints
timeline: pe.Timeline
"""


# The dev extra (inside test) installs mypy from Python 3.11 on; there it must be present.
@pytest.mark.skipif(sys.version_info < (3, 11), reason="the pinned mypy needs Python 3.11+")
@pytest.mark.timeout(200)
def test_mypy_finds_the_installed_package_and_its_types(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         "--python-executable", sys.executable, str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert "import-not-found" not in output, f"mypy cannot find the installed package; pip install -e . again\n{output}"
    assert 'has type "ContextExecutor", variable has type "int"' in output, output
