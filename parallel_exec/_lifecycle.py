"""Process-wide lifecycle: interpreter exit and ``os.fork()``.

The executors' process-wide state (``parallel_exec.dist`` keeps its own, for
the multi-process side). Executors register here so that:
- at interpreter exit every worker, a collected executor's included, finishes
  the tasks already submitted and is joined (workers are daemon threads, so
  this hook is what makes exit orderly);
- in a child process made by ``os.fork()``, where only the forking thread
  exists, every inherited executor is disabled instead of hanging.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Any, Iterable, Sequence

from . import _forkguard, _mxnet  # noqa: F401  mxnet first: see the atexit comment below
from ._worker import WorkerSlot

# Every executor not yet collected (duck-typed: ``shutdown`` and
# ``_disable_after_fork``).
_live_executors: "weakref.WeakSet[Any]" = weakref.WeakSet()
# Every worker thread started, collected executors' included. Weak, so
# finished threads do not pile up.
_all_workers: "weakref.WeakKeyDictionary[threading.Thread, WorkerSlot]" = weakref.WeakKeyDictionary()
# Set once by the exit hook; submit reads it to name the reason it refuses.
exiting = False
# Guards the globals above; lock order: before an executor's lock.
_global_lock = threading.Lock()


def track(executor: Any, slots: Iterable[WorkerSlot]) -> None:
    """Register a new executor and its started worker threads."""
    with _global_lock:
        _live_executors.add(executor)
        for slot in slots:
            if slot.thread is not None:  # None only before the thread exists
                _all_workers[slot.thread] = slot


def wake_workers_to_exit(slots: Sequence[WorkerSlot]) -> None:
    """Finalizer of a collected executor: workers exit after their queue."""
    for slot in slots:
        slot.queue.put(None)


def _stop_all_workers_at_exit() -> None:
    """Let every worker finish its queued tasks, then join it."""
    global exiting
    with _global_lock:
        exiting = True
        executors = list(_live_executors)
        workers = list(_all_workers.items())
    for executor in executors:
        executor.shutdown(wait=False)  # under its lock: no task lands after the sentinel
    for _, slot in workers:
        slot.queue.put(None)  # workers of collected executors (extra sentinels are harmless)
    for thread, _ in workers:
        thread.join()


# Registered after ``import mxnet``: atexit runs hooks last-in first-out, so
# this runs before mxnet's ``_notify_shutdown`` stops the engine that the
# tasks may still be using.
atexit.register(_stop_all_workers_at_exit)


def _disable_executors_in_forked_child() -> None:
    """After ``os.fork()`` only the forking thread exists in the child.

    Locks held by other threads at fork time would stay held forever, and no
    worker would ever serve a queue, so every inherited executor is disabled:
    its pending futures fail and ``submit`` raises a clear error.
    """
    global _global_lock
    _global_lock = threading.Lock()
    _all_workers.clear()
    for executor in list(_live_executors):
        executor._disable_after_fork()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_disable_executors_in_forked_child)
_forkguard.install()
