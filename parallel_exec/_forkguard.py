"""Workers hold between tasks while ``os.fork()`` runs.

MXNet 1.9.1's own fork handler (``pthread_atfork``: it stops and restarts the
engine) can hang the forking process when another thread is inside an MXNet
call at that moment: ``os.fork()`` repeated while a plain thread runs
``dot`` + ``asnumpy`` in a loop hangs within seconds. So before a fork, this
module waits until every worker thread is between tasks (at most
``FORK_WAIT_SECONDS``), and keeps them there until the fork is done. A
worker that took a task meanwhile holds it until then.

Guarantees:
- While a fork proceeds, no worker runs a task, unless one still ran after
  ``FORK_WAIT_SECONDS`` (logged as a warning: the fork then goes ahead, so a
  task that waits on the forking thread delays a fork, never hangs it).
- The forking thread never waits for itself (a task may fork).

Assumptions:
- The GIL orders plain reads and writes: a worker adds itself to ``_busy``
  before it reads ``_forks``, and a fork increments ``_forks`` before it
  reads ``_busy``, so at least one of them sees the other.
"""

from __future__ import annotations

import logging
import threading
from typing import Set

LOGGER = logging.getLogger("parallel_exec")

# How long a fork waits for running tasks to end before it goes ahead.
FORK_WAIT_SECONDS = 2.0

# Guards _forks; waited on by forks (for _busy to empty) and by held workers
# (for _forks to drop to 0). A leaf lock: nothing else is taken under it.
_cond = threading.Condition(threading.Lock())
_forks = 0  # forks in progress in this process
_busy: Set[int] = set()  # idents of workers between taking a task and finishing it


def begin_task(ident: int) -> None:
    """Called by a worker before it runs a task: holds it while a fork runs."""
    _busy.add(ident)
    if _forks:
        with _cond:
            _busy.discard(ident)
            _cond.notify_all()
            _cond.wait_for(lambda: _forks == 0)
            _busy.add(ident)


def end_task(ident: int) -> None:
    """Called by a worker after its task's future completed."""
    _busy.discard(ident)
    if _forks:
        with _cond:
            _cond.notify_all()


def _before_fork() -> None:
    global _forks
    me = threading.get_ident()
    with _cond:
        _forks += 1
        if not _cond.wait_for(lambda: not (_busy - {me}), timeout=FORK_WAIT_SECONDS):
            LOGGER.warning(
                "os.fork() went ahead while %d parallel_exec task(s) still ran after %.1f s; if one is inside "
                "an MXNet call, MXNet's fork handler can hang. Fork between tasks, or use the 'spawn' or "
                "'forkserver' start method.", len(_busy - {me}), FORK_WAIT_SECONDS,
            )


def _after_fork_in_parent() -> None:
    global _forks
    with _cond:
        _forks -= 1
        _cond.notify_all()


def _after_fork_in_child() -> None:
    """Only the forking thread exists in the child: start from nothing."""
    global _cond, _forks, _busy
    _cond = threading.Condition(threading.Lock())
    _forks = 0
    _busy = set()


def install() -> None:
    """Register the fork hooks (once, by ``_lifecycle``)."""
    import os

    if hasattr(os, "register_at_fork"):  # POSIX only
        os.register_at_fork(
            before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
        )
