"""Shared fixtures. Every wait in a test uses TIMEOUT: hit only on deadlock."""

import gc
import threading
import time

import mxnet as mx
import pytest

import parallel_exec as pe

TIMEOUT = 30

CPU2 = [mx.cpu(0), mx.cpu(1)]

# Prepended to the exit tests' fresh-interpreter scripts: ``say`` writes a
# line in one call, so lines from several threads never interleave (print
# writes the text and the newline apart). ``notice_exit()``, called after
# the first executor or Parallel is created (parallel_exec's names, and its
# exit hook, load on first use), sets ``exiting`` from an atexit hook that runs
# before parallel_exec's (last in, first out): a task waiting on it is
# certainly still running when the interpreter starts to exit.
SCRIPT_PRELUDE = """
import atexit
import sys
import threading

exiting = threading.Event()

def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

def notice_exit():
    atexit.register(exiting.set)
"""


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a thread running (workers included)."""
    before = set(threading.enumerate())
    yield
    gc.collect()  # a dropped executor's finalizer tells its workers to exit
    deadline = time.monotonic() + TIMEOUT
    leaked = [t for t in threading.enumerate() if t not in before]
    for thread in leaked:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in leaked if t.is_alive()]
    assert not alive, f"test leaked threads: {alive}"


@pytest.fixture
def executor():
    """A two-worker executor on cpu(0), cpu(1), shut down after the test."""
    ex = pe.ContextExecutor(CPU2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests where MXNet sees no GPU."""
    if mx.context.num_gpus() > 0:
        return
    skip = pytest.mark.skip(reason="needs a GPU; MXNet sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
