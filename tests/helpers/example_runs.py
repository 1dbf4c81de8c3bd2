"""Run the examples as a user does: ``python`` in a subprocess, with a timeout."""

import subprocess
import sys
from pathlib import Path

from helpers import ROOT

EXAMPLES = ROOT / "examples"
# One short epoch, small batches: enough steps for the loss to fall.
TINY = ["--epochs", "1", "--batch-size", "32", "--seed", "3"]
SUBPROCESS_TIMEOUT = 100


def run_all(commands, cwd):
    """Run every ``python *args`` of ``commands`` at the same time, in ``cwd``.

    Running them side by side uses both cores while each imports MXNet.
    Output goes to files, so a chatty process never blocks on a full pipe.

    Returns:
        A dict: name -> ``subprocess.CompletedProcess`` with its output.
    """
    cwd = Path(cwd)
    procs = {}
    try:
        for name, args in commands.items():
            with open(cwd / f"{name}.out", "w") as out, open(cwd / f"{name}.err", "w") as err:
                procs[name] = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=out, stderr=err)
        for proc in procs.values():
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        for proc in procs.values():  # only after a timeout or an error
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        name: subprocess.CompletedProcess(
            proc.args, proc.returncode, (cwd / f"{name}.out").read_text(), (cwd / f"{name}.err").read_text()
        )
        for name, proc in procs.items()
    }


def run(args, cwd):
    """Run ``python *args`` in ``cwd``; fail with its output unless it exits 0."""
    return check_ok(run_all({"run": args}, cwd)["run"])


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc
