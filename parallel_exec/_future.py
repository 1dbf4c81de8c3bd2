"""``TaskFuture``: the future every executor task gets.

It differs from ``concurrent.futures.Future`` in two respects: ``cancel()``
counts the cancellation in its worker's statistics and tells ``wait()`` and
``as_completed()`` at once (a plain ``Future`` cancelled while queued stays
invisible to them until a worker reaches it; ``ThreadPoolExecutor`` shares
that gap); and in a child made by ``os.fork()`` it can be failed without
taking its lock, which a thread that does not exist there may hold.

This reimplements ``Future.cancel``, ``cancelled`` and the common path of
``set_running_or_notify_cancel`` on the private ``_state``,
``_condition`` and ``_invoke_callbacks`` of ``concurrent/futures/_base.py``
(the worker also reads ``_done_callbacks``: the callbacks it ran),
unchanged from CPython 3.8 to 3.13 (checked against 3.11);
``tests/reliability/test_reliability_lifecycle.py`` (section 8) checks the
behaviour it relies on.
"""

from __future__ import annotations

import threading
from _thread import allocate_lock as _allocate_lock
from concurrent.futures import CancelledError, Future, _base
from typing import Any, Optional, Protocol

_CANCELLED = (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED)


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

    def cancelled(self) -> bool:
        """Return True if the future was cancelled.

        Reads the state without taking the lock (``Future``'s takes it, 0.7 us
        on the worker's path): one attribute read is atomic under the GIL,
        and a state read under the lock is as stale once the lock is released.
        """
        return self._state in _CANCELLED

    def set_running_or_notify_cancel(self) -> bool:
        """As ``Future``'s, but a second call on a cancelled future returns False.

        ``cancel`` already notified the waiters, so the worker that reaches
        the item later must not fail with "Future in unexpected state". The
        common case, a pending future, takes the lock once.
        """
        with self._condition:  # an RLock: the base method takes it again
            if self._state == _base.PENDING:
                self._state = _base.RUNNING
                return True
            if self._state == _base.CANCELLED_AND_NOTIFIED:
                return False
            return super().set_running_or_notify_cancel()  # CANCELLED: tells wait()'s waiters

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


class MapFuture:
    """The future of one ``map`` call: what the worker and ``map``'s iterator use, and no more.

    No user ever holds it (``map`` returns results, not futures), so it needs
    no ``Condition``, done-callbacks, ``wait()`` or ``as_completed()``
    support: two plain locks replace them. ``_claim`` is taken by whoever
    first starts or cancels the call (so exactly one of them wins);
    ``_done`` is held from creation until the call is finished or cancelled.
    A ``Future``'s life (create, start, set, read) costs about 5 us here;
    this one, a fraction of it (benchmarks/RESULTS.md).

    Attributes:
        counters: as ``TaskFuture.counters``.
    """

    __slots__ = ("counters", "_claim", "_done", "_cancelled", "_result", "_exception")
    _done_callbacks = ()  # none ever: read by the worker as it reads a Future's

    def __init__(self) -> None:
        self.counters: Optional[CancelCounter] = None
        self._claim = _allocate_lock()
        self._done = _allocate_lock()
        self._done.acquire()
        self._cancelled = False
        self._result: Any = None
        self._exception: Optional[BaseException] = None

    def cancelled(self) -> bool:
        return self._cancelled

    def set_running_or_notify_cancel(self) -> bool:
        """Claim the call for running; False if it was cancelled first."""
        return self._claim.acquire(False)

    def cancel(self) -> bool:
        """Cancel the call if nobody started it; return whether it is cancelled."""
        if not self._claim.acquire(False):
            return self._cancelled
        self._cancelled = True
        if self.counters is not None:
            self.counters.count_cancelled()
        self._done.release()
        return True

    def set_result(self, result: Any) -> None:
        self._result = result
        self._done.release()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._done.release()

    def result(self, timeout: Optional[float] = None) -> Any:
        """The call's result, as ``Future.result``."""
        if not self._done.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError()
        self._done.release()  # done stays done for a later reader
        if self._cancelled:
            raise CancelledError()
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment]  # break the cycle through the traceback
        return self._result

    def fail_in_forked_child(self, exc: BaseException) -> None:
        """As ``TaskFuture``'s: only the forking thread runs, so nothing races this."""
        if self._done.locked():  # neither finished nor cancelled
            self._exception = exc
            self._done.release()
