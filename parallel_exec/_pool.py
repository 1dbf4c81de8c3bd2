"""Worker threads that outlive executors: a process-wide pool of pinned threads.

MXNet 1.9.1 keeps about 4.9 MiB in every thread that has run a reduction and
never frees it, not even when the thread ends, so an executor that started
fresh threads would cost that much per thread each time one is opened (100
executors on 2 contexts: +980 MiB). Here a thread is pinned to one context
for life and serves one executor at a time: when that executor's worker loop
ends, the thread resets its per-thread state and waits, idle, for the next
executor on its context, which takes it before a new thread is started.

Guarantees:
- Executors alive at the same time never share a thread: a thread becomes
  idle only after its executor's loop has ended.
- An idle thread keeps nothing of the executor it served alive (no task,
  argument, result, initializer or executor reference), and starts the next
  executor's work with MXNet's per-thread state as a new thread has it
  (``_state.reset_thread_state``).
- Idle threads per context never outnumber the threads that served that
  context at once: a thread is started only when none is idle.
  ``release_idle_threads`` ends them.
- The pool holds a thread only while it runs: an ended thread leaves it.
- In a child made by ``os.fork()`` the pool starts empty (the threads do
  not exist there); at interpreter exit ``close`` ends every thread once
  its executor's queue is done.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Dict, List, Optional, Protocol, Set

from ._mxnet import mx
from ._state import reset_thread_state

LOGGER = logging.getLogger("parallel_exec")


class Job(Protocol):
    """One executor's worker, as a pinned thread runs it (``_worker.WorkerJob``)."""

    def run(self) -> None:
        """Serve the executor until its queue ends; never raises."""

    def ended(self) -> None:
        """Called once the thread is idle again (or ending): shutdown's waiters may go on."""


class PinnedThread:
    """A daemon thread pinned to ``context`` that runs the jobs it is given, one at a time."""

    __slots__ = ("context", "thread", "_jobs", "__weakref__")

    def __init__(self, context: "mx.Context") -> None:
        self.context = context
        self._jobs: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        # Daemon: _lifecycle's exit hook ends it in order, after its queue.
        self.thread = threading.Thread(name=_idle_name(context), target=_serve, args=(self,), daemon=True)

    def run(self, job: Optional[Job]) -> None:
        """Hand the thread its next job (``None``: end)."""
        self._jobs.put(job)


_lock = threading.Lock()  # guards the three below; a leaf lock
_idle: Dict["mx.Context", List[PinnedThread]] = {}  # by context, most recently idle last
_alive: Set[PinnedThread] = set()  # every thread started here that has not ended
_closed = False  # set at interpreter exit: threads end instead of going idle


def take(context: "mx.Context", name: str) -> PinnedThread:
    """Return an idle thread pinned to ``context``, or start one; name it ``name``.

    The caller must hand it a job with ``run``.
    """
    with _lock:
        if _closed:
            raise RuntimeError("cannot start workers after interpreter shutdown")
        idle = _idle.get(context)
        if idle:
            pinned = idle.pop()
            pinned.thread.name = name
            return pinned
        pinned = PinnedThread(context)
        pinned.thread.name = name
        _alive.add(pinned)
    pinned.thread.start()
    return pinned


def release_idle_threads() -> int:
    """End the idle worker threads kept for later executors; return how many.

    ``ContextExecutor`` keeps its worker threads after ``shutdown`` for the
    next executor on the same context, because MXNet keeps about 4.9 MiB in
    every thread that has run an operator and never gives it back, not even
    when the thread ends: reusing threads is what keeps opening executors
    free. Ending them lowers the thread count, not the memory. Threads
    serving a live executor are left alone. Returns once the released
    threads have ended.
    """
    with _lock:
        released = _take_all_idle()
    for pinned in released:
        pinned.run(None)
    for pinned in released:
        pinned.thread.join()
    return len(released)


def idle_count() -> int:
    """The number of idle threads kept, all contexts together."""
    with _lock:
        return sum(len(idle) for idle in _idle.values())


def close() -> None:
    """At interpreter exit: idle threads end now, the others after their job; join all.

    The caller has already told every live executor's workers to stop.
    """
    global _closed
    with _lock:
        _closed = True
        threads = list(_alive)
        idle = _take_all_idle()
    for pinned in idle:
        pinned.run(None)
    current = threading.current_thread()
    for pinned in threads:
        if pinned.thread is not current:
            pinned.thread.join()


def _take_all_idle() -> List[PinnedThread]:
    """Empty the pool of idle threads (called under ``_lock``)."""
    idle = [pinned for threads in _idle.values() for pinned in threads]
    _idle.clear()
    return idle


def _serve(pinned: PinnedThread) -> None:
    """Body of a pinned thread: run each job, reset, go idle; until told to end."""
    try:
        while True:
            job = pinned._jobs.get()
            if job is None:
                return
            try:
                job.run()
                reset_thread_state()
            except BaseException:  # a bug of this package: retire the thread rather than reuse it
                LOGGER.critical("Exception in worker %s", pinned.thread.name, exc_info=True)
                went_idle = False
            else:
                went_idle = _go_idle(pinned)
            job.ended()  # after _go_idle: shutdown(wait=True) returns with the thread reusable
            del job  # nothing of the executor stays with an idle thread
            if not went_idle:
                return
    finally:
        with _lock:
            _alive.discard(pinned)


def _go_idle(pinned: PinnedThread) -> bool:
    """Put ``pinned`` back in the pool; False if the pool is closed."""
    with _lock:
        if _closed:
            return False
        pinned.thread.name = _idle_name(pinned.context)
        _idle.setdefault(pinned.context, []).append(pinned)
        return True


def _idle_name(context: "mx.Context") -> str:
    return f"parallel_exec-idle[{context}]"


def _empty_in_forked_child() -> None:
    """Only the forking thread exists in a child: no thread of the pool does."""
    global _lock, _idle, _alive
    _lock = threading.Lock()
    _idle = {}
    _alive = set()


def install_fork_hook() -> None:
    """Register the fork hook (once, by ``_lifecycle``)."""
    if hasattr(os, "register_at_fork"):  # POSIX only
        os.register_at_fork(after_in_child=_empty_in_forked_child)
