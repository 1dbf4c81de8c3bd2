"""``TaskFuture``: the future every executor task gets.

It differs from ``concurrent.futures.Future`` in two respects: ``cancel()``
counts the cancellation in its worker's statistics and tells ``wait()`` and
``as_completed()`` at once (a plain ``Future`` cancelled while queued stays
invisible to them until a worker reaches it; ``ThreadPoolExecutor`` shares
that gap); and in a child made by ``os.fork()`` it can be failed without
taking its lock, which a thread that does not exist there may hold.

This reimplements ``Future.cancel`` on the private ``_state``,
``_condition`` and ``_invoke_callbacks`` of ``concurrent/futures/_base.py``,
unchanged from CPython 3.8 to 3.13 (checked against 3.11);
``tests/reliability/test_reliability_lifecycle.py`` (section 8) checks the
behaviour it relies on.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, _base
from typing import Optional, Protocol


class CancelCounter(Protocol):
    """Where a cancellation is counted (``_stats.WorkerCounters``)."""

    def count_cancelled(self) -> None: ...


class TaskFuture(Future):
    """A ``Future`` whose cancellation is counted and seen by waiters at once.

    Attributes:
        counters: the statistics of the worker the task was routed to; set
            by the executor before anyone else can see the future.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counters: Optional[CancelCounter] = None

    def cancel(self) -> bool:
        """Cancel the call if it has not started; return whether it is cancelled."""
        with self._condition:
            if self._state != _base.PENDING:
                return self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED)
            self._state = _base.CANCELLED
            self._condition.notify_all()
        if self.counters is not None:
            self.counters.count_cancelled()  # before anyone can see it done
        self.set_running_or_notify_cancel()  # wakes wait() and as_completed() now
        self._invoke_callbacks()  # type: ignore[attr-defined]  # private, see the module docstring
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """As ``Future``'s, but a second call on a cancelled future returns False.

        ``cancel`` already notified the waiters, so the worker that reaches
        the item later must not fail with "Future in unexpected state".
        """
        with self._condition:  # an RLock: the base method takes it again
            if self._state == _base.CANCELLED_AND_NOTIFIED:
                return False
            return super().set_running_or_notify_cancel()

    def fail_in_forked_child(self, exc: BaseException) -> None:
        """Complete this future with ``exc`` in a forked child, taking no lock.

        Only the forking thread exists in the child, so the future's lock
        may be held forever by a thread that was completing or cancelling it
        at the fork: a fresh lock replaces it. Done-callbacks are not run;
        they were added for the parent's threads.
        """
        self._condition = threading.Condition()
        if self._state in (_base.PENDING, _base.RUNNING):
            self._exception = exc
            self._state = _base.FINISHED
        elif self._state == _base.CANCELLED:  # cancel() was between its two steps
            self._state = _base.CANCELLED_AND_NOTIFIED
