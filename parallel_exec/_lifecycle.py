"""Process-wide lifecycle: interpreter exit and ``os.fork()``.

The executors' process-wide hooks (``parallel_exec.dist`` keeps its own
state, for the multi-process side), registered when the first executor
(or ``Parallel``) starts, not at import; ``Parallel`` adds its own steps
through ``call_before_exit`` and ``call_after_fork_in_child``. They make
sure that:
- at interpreter exit every worker, a collected executor's included, finishes
  the tasks already submitted and its thread is joined (worker threads are
  daemons, so this hook is what makes exit orderly);
- in a child process made by ``os.fork()``, where only the forking thread
  exists, every inherited executor is disabled instead of hanging, and the
  pool of threads (``_pool``) starts empty.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any, Callable, List

from . import _forkguard, _mxnet, _pool  # noqa: F401  mxnet first: see install()

# The workers of every executor not yet collected (``_crew.Crew``, duck-typed:
# ``shutdown`` and ``_disable_after_fork``). Weak: it keeps none alive. The
# threads are ``_pool``'s, which holds each only while it runs.
_live_crews: "weakref.WeakSet[Any]" = weakref.WeakSet()
# Set once by the exit hook; submit reads it to name the reason it refuses.
exiting = False
# Called first by the exit hook, before any worker is told to end: whatever
# must end before the workers can (``Parallel``'s loops, long tasks that end
# only when told).
_before_exit: List[Callable[[], None]] = []
# Called in a forked child after every executor is disabled (``Parallel``'s).
_after_fork_in_child: List[Callable[[], None]] = []
# Guards the globals above; lock order: before an executor's lock.
_global_lock = threading.Lock()
_installed = False
LOGGER = logging.getLogger("parallel_exec")


def install() -> None:
    """Register the exit and fork hooks; called by every new executor and ``Parallel``, acts once."""
    global _installed
    with _global_lock:
        if _installed:
            return
        _installed = True
    # Registered after ``import mxnet``: atexit runs hooks last-in first-out,
    # so this runs before mxnet's ``_notify_shutdown`` stops the engine that
    # the tasks may still be using.
    atexit.register(_stop_all_workers_at_exit)
    _pool.install_fork_hook()
    _forkguard.install()
    if hasattr(os, "register_at_fork"):  # POSIX only
        os.register_at_fork(after_in_child=_disable_executors_in_forked_child)


def track(crew: Any) -> None:
    """Register a new executor's workers."""
    with _global_lock:
        _live_crews.add(crew)


def call_before_exit(fn: Callable[[], None]) -> None:
    """Have the exit hook call ``fn`` before it tells any worker to end."""
    with _global_lock:
        _before_exit.append(fn)


def call_after_fork_in_child(fn: Callable[[], None]) -> None:
    """Have the fork hook call ``fn`` in the child, after it disabled the executors."""
    with _global_lock:
        _after_fork_in_child.append(fn)


def _stop_all_workers_at_exit() -> None:
    """Let every worker finish its queued tasks, then join every thread."""
    global exiting
    with _global_lock:
        exiting = True
        crews = list(_live_crews)
        first = list(_before_exit)
    for fn in first:
        try:
            fn()
        except Exception:  # a bug of this package: the workers must still be stopped
            LOGGER.critical("Exception in an exit callback", exc_info=True)
    for crew in crews:
        crew.shutdown(wait=False)  # under its lock: no task lands after the sentinel
    # A collected executor's finalizer has already told its workers to end.
    _pool.close()


def _disable_executors_in_forked_child() -> None:
    """After ``os.fork()`` only the forking thread exists in the child.

    Locks held by other threads at fork time would stay held forever, and no
    worker would ever serve a queue, so every inherited executor is disabled:
    its pending futures fail and ``submit`` raises a clear error.
    """
    global _global_lock
    _global_lock = threading.Lock()
    for crew in list(_live_crews):
        crew._disable_after_fork()
    for fn in list(_after_fork_in_child):
        fn()
