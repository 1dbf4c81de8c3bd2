"""The serial-init gate: the only code that knows the serial-init rule.

Gluon initialises deferred parameters and builds hybridized graphs on the
first forward pass, and that is not thread-safe (gluon-nlp's ``Parallel``
ran its first ``num_workers`` calls inline for the same reason).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional


class SerialInitGate:
    """Lets each worker's first task run alone.

    The rule (docs/gate.md): the first task that runs on each worker runs alone: no
    other task of the executor runs while it does. Once a worker's first task
    has finished without raising, that worker's later tasks run concurrently
    with the others. If the first task raises, the worker's next task again
    runs alone.

    Invariant the tests check: while a first task is inside the gate, no other
    task is. First tasks waiting to enter go before later tasks, so a busy
    executor cannot starve a worker's initialisation.

    The condition is held only while counters change, never across the
    user's task. Once every worker has opened, ``enter`` and ``leave`` take
    no lock at all.
    """

    def __init__(self, num_workers: int) -> None:
        # Guards every counter below. Lock order: taken alone, never while
        # holding the executor's submit lock (workers never hold that one).
        self._cond = threading.Condition(threading.Lock())
        self._running = 0  # tasks inside the gate that were counted
        self._solo = False  # a first task is inside the gate
        self._first_waiting = 0  # first tasks waiting to enter
        # Workers whose first task has not yet succeeded. Read without the
        # lock on the fast path: it only ever decreases, and once it is 0 no
        # first task can arrive, so there is nothing left to keep apart.
        self._closed_workers = num_workers

    @property
    def opened(self) -> bool:
        """Every worker's first task has succeeded: the gate lets every task through from now on."""
        return self._closed_workers == 0

    def enter(self, first: bool, on_wait: Optional[Callable[[bool], None]] = None) -> bool:
        """Block until the task may run.

        Args:
            first: True if this is the worker's first task (no earlier task of
                that worker has finished without raising).
            on_wait: called with True before blocking and False after, if the
                task has to wait (shutdown's waiters need to know who waits
                here). Called under the gate's lock; it may take a lock that
                is never held while taking the gate's.

        Returns:
            A token to hand to ``leave``: whether the task was counted.
        """
        if self.opened:
            return False
        with self._cond:
            if first:
                self._first_waiting += 1
                self._wait(lambda: not self._solo and self._running == 0, on_wait)
                self._first_waiting -= 1
                self._solo = True
            else:
                self._wait(lambda: not self._solo and self._first_waiting == 0, on_wait)
            self._running += 1
            return True

    def _wait(self, ready: Callable[[], bool], on_wait: Optional[Callable[[bool], None]]) -> None:
        if ready():
            return
        if on_wait is not None:
            on_wait(True)
        try:
            self._cond.wait_for(ready)
        finally:
            if on_wait is not None:
                on_wait(False)

    def leave(self, first: bool, counted: bool, succeeded: bool) -> None:
        """Record that a task left the gate; wakes the tasks it held back.

        Args:
            first: the value given to ``enter``.
            counted: the token ``enter`` returned.
            succeeded: the task finished without raising.
        """
        if not counted:
            return
        with self._cond:
            self._running -= 1
            if first:
                self._solo = False
                if succeeded:
                    self._closed_workers -= 1
            self._cond.notify_all()
