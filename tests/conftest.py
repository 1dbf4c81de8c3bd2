"""Shared fixtures and hooks; shared constants and runners are in ``helpers``."""

import gc
import threading
import time

import mxnet as mx
import pytest

import parallel_exec as pe

from helpers import CPU2, TIMEOUT


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a thread running (workers included).

    Worker threads outlive their executors, idle in parallel_exec's pool; a
    worker counts as left running if it does not go idle. The pool is
    emptied after each test, so each test starts its own worker threads
    (the tests of reuse make it happen inside one test).
    """
    before = set(threading.enumerate())
    yield
    gc.collect()  # a dropped executor's finalizer tells its workers to end
    deadline = time.monotonic() + TIMEOUT
    leaked = [t for t in threading.enumerate() if t not in before]
    while True:
        pe.release_idle_threads()  # ends the threads that have gone idle
        alive = [t for t in leaked if t.is_alive()]
        if not alive or time.monotonic() > deadline:
            break
        alive[0].join(0.05)  # one still serving a queue: give it time to go idle
    assert not alive, f"test leaked threads: {[t.name for t in alive]}"


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
