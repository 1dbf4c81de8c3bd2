"""What the tests share besides fixtures: constants, scripts and runners.

Every wait in a test uses TIMEOUT: hit only on deadlock. ``tests/`` is on
``sys.path`` (pyproject's ``pythonpath``), so tests import ``helpers``.
"""

from pathlib import Path

import mxnet as mx

# The repository's root.
ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent

TIMEOUT = 30

CPU2 = [mx.cpu(0), mx.cpu(1)]

# Prepended to the exit tests' fresh-interpreter scripts: ``say`` writes a
# line in one call, so lines from several threads never interleave (print
# writes the text and the newline apart). ``notice_exit()``, called after
# the first executor or Parallel is created (parallel_exec's names, and its
# exit hook, load on first use), sets ``exiting`` from an atexit hook that runs
# before parallel_exec's (last in, first out): a task waiting on it is
# certainly still running when the interpreter starts to exit. A script still
# running after 50 s (the runners' timeout is 60 s) prints every thread's
# stack and exits, so a hang in CI shows where it hung.
SCRIPT_PRELUDE = """
import atexit
import faulthandler
import sys
import threading

faulthandler.dump_traceback_later(50, exit=True)

exiting = threading.Event()

def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

def notice_exit():
    atexit.register(exiting.set)
"""


def left_their_executor(workers):
    """Whether every worker thread has ended or gone back, idle, to parallel_exec's pool."""
    return all(not t.is_alive() or t.name.startswith("parallel_exec-idle") for t in workers)


def wait_until_workers_end(slots):
    """Wait until the workers of ``slots`` (an executor's ``_slots``) have ended; False on TIMEOUT."""
    with slots[0].changed:
        return slots[0].changed.wait_for(lambda: all(slot.exited for slot in slots), TIMEOUT)


def make_restore_fail_once(module, monkeypatch):
    """Make ``module.restore_flags`` raise once, leaving the flags as the task left them, then work."""
    real_restore = module.restore_flags
    failures = []

    def restore_fails_once(own, scope):
        if not failures:
            failures.append(1)
            raise RuntimeError("MXNet refused a flag")
        real_restore(own, scope)

    monkeypatch.setattr(module, "restore_flags", restore_fails_once)
