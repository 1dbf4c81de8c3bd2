"""``Parallel`` and ``Parallelizable``: a drop-in for gluonnlp 0.10.0's.

A thin adapter over ``ContextExecutor`` with no worker loop of its own. The
original (``gluonnlp/utils/parallel.py``) loses a worker when
``forward_backward`` raises, so ``get()`` hangs forever; here the exception
travels on a future and ``get()`` re-raises it.
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from typing import Any, Callable, Optional, Tuple

from ._executor import ContextExecutor
from ._mxnet import mx

Outcome = Tuple[bool, Any]  # (True, result) or (False, the exception raised)


class Parallelizable:
    """Base class for a unit of work that ``Parallel`` runs on threads.

    Subclasses implement ``forward_backward(x)``, typically a forward pass
    under ``autograd.record()`` followed by ``backward()``, returning the loss.
    """

    def forward_backward(self, x: Any) -> Any:
        """Forward and backward computation on one shard ``x``."""
        raise NotImplementedError()


class Parallel:
    """Runs ``parallizable.forward_backward`` on worker threads, put/get style.

    ``put(x)`` schedules ``forward_backward(x)``; ``get()`` returns one
    result, in completion order, and re-raises the exception of a call that
    raised. With ``serial_init`` the first ``num_workers`` calls run inline
    in ``put``, one at a time, as gluonnlp's does, so Gluon's deferred
    initialisation never runs on two threads at once. ``num_workers=0`` runs
    every call inline.

    The workers are not pinned to the data's devices (the original's were
    not either): each is a ``ContextExecutor`` worker on ``mx.cpu(0)``, the
    default context of a fresh thread, and the data's own context decides
    where the computation runs. Calls take the workers in turn, so ``N``
    puts in a row run on ``N`` different workers.

    Thread-safety:
        ``put``, ``get`` and ``close`` may be called from any thread.
        ``forward_backward`` runs in a worker thread (inline calls: in the
        thread calling ``put``). As with MXNet generally, a returned NDArray
        may still be computing; read it to see the engine's errors.

    Args:
        num_workers: number of worker threads, ``>= 0``.
        parallizable: an object with a ``forward_backward(x)`` method. The
            misspelling is the original's, kept so keyword calls still work.
        serial_init: run the first ``num_workers`` calls inline.

    Raises:
        TypeError: ``num_workers`` is not an int, or ``parallizable`` has no
            callable ``forward_backward``.
        ValueError: ``num_workers`` is negative.
    """

    def __init__(self, num_workers: int, parallizable: Any, serial_init: bool = True) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int):
            raise TypeError(f"num_workers must be an int, got {num_workers!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not callable(getattr(parallizable, "forward_backward", None)):
            raise TypeError(f"parallizable must have a callable forward_backward(x) method, got {parallizable!r}")
        self._parallizable = parallizable
        self._num_serial = num_workers if serial_init else 0
        # (succeeded, result or exception) per call, in completion order.
        self._done: "queue.SimpleQueue[Outcome]" = queue.SimpleQueue()
        # Guards _pending and _closed. Lock order: after _serial_lock.
        self._lock = threading.Lock()
        # Guards _num_serial and serialises the serial-init calls (see put).
        self._serial_lock = threading.Lock()
        self._pending = 0  # put() calls whose result no get() has taken yet
        self._closed = False
        self._executor: Optional[ContextExecutor] = None
        if num_workers > 0:
            # The shim does its serial init inline, so the executor needs no gate.
            self._executor = ContextExecutor(
                [mx.cpu(0)] * num_workers, serial_init=False, thread_name_prefix="Parallel"
            )
            weakref.finalize(self, self._executor.shutdown, wait=False)

    def put(self, x: Any) -> None:
        """Schedule ``parallizable.forward_backward(x)``.

        Never raises for an error of ``forward_backward``: the matching
        ``get()`` does.

        Raises:
            RuntimeError: after ``close()``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot put() on a Parallel after close()")
            self._pending += 1
        forward_backward = self._parallizable.forward_backward
        if self._executor is None:
            _call_and_report(self._done, forward_backward, x)
            return
        # Held across the user's call on purpose: serial-init calls must run
        # one at a time and before any worker call, even when several threads
        # put. Once the serial calls are done it is only ever held briefly.
        with self._serial_lock:
            if self._num_serial > 0:
                self._num_serial -= 1
                _call_and_report(self._done, forward_backward, x)
                return
        try:
            # Bound in a partial, the data is not routed: calls take the workers
            # in turn. Routing by the data's context would pick "the least busy"
            # worker, and a worker's load drops only after its result is
            # reported, so the next round of puts could pile onto one worker.
            self._executor.submit(functools.partial(_call_and_report, self._done, forward_backward, x))
        except BaseException:
            # close() can run between the check above and this submit. Undo
            # the count, or a later get() would wait forever for this call.
            with self._lock:
                self._pending -= 1
                closed = self._closed
            if closed:
                raise RuntimeError("cannot put() on a Parallel after close()") from None
            raise

    def get(self) -> Any:
        """Return the result of a ``forward_backward`` call, in completion order.

        Blocks until one is ready.

        Raises:
            RuntimeError: no ``put()`` is waiting for its ``get()`` (the
                original would block forever).
            BaseException: whatever that ``forward_backward`` call raised.
        """
        with self._lock:
            if self._pending == 0:
                raise RuntimeError("get() called with no pending put(): it would block forever")
            self._pending -= 1
        succeeded, outcome = self._done.get()
        if succeeded:
            return outcome
        try:
            raise outcome
        finally:
            del outcome  # break the cycle exception -> traceback -> this frame

    def close(self) -> None:
        """Stop the workers after the calls already put; idempotent."""
        with self._lock:
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> "Parallel":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _call_and_report(done: "queue.SimpleQueue[Outcome]", fn: Callable[[Any], Any], x: Any) -> None:
    """Run ``fn(x)`` and put its outcome on ``done``.

    Reporting from inside the call (rather than from a done-callback added
    after ``submit``) keeps ``get()`` in exact completion order.
    """
    try:
        outcome: Outcome = (True, fn(x))
    except BaseException as exc:  # kept for the matching get()
        outcome = (False, exc)
    done.put(outcome)
