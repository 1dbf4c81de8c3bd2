"""``Parallel`` and ``Parallelizable``: a drop-in for gluonnlp 0.10.0's.

A thin adapter over ``ContextExecutor`` with no worker loop of its own. The
original (``gluonnlp/utils/parallel.py``) loses a worker when
``forward_backward`` raises, so ``get()`` hangs forever; here the exception
travels to the matching ``get()``, which re-raises it.

Guarantees:
- Every ``put()`` that returns gets exactly one outcome (a result or an
  exception) for a ``get()``, in completion order; in a child made by
  ``os.fork()``, calls that were queued or running in the parent's workers
  fail at once, naming ``os.fork()``.
- Calls start in ``put()`` order, as with the original's one shared queue:
  each worker task takes the oldest input of the shim's own FIFO when it
  starts, whichever worker runs it.

Assumptions:
- ``collections.deque`` ``append``/``popleft`` are atomic (CPython, GIL).
- A task the executor accepted runs (the shim never cancels one), so there
  are always as many tasks to come as inputs in the FIFO.
"""

from __future__ import annotations

import collections
import operator
import os
import queue
import threading
import weakref
from typing import Any, Callable, Deque, Optional, Tuple

from ._executor import ContextExecutor
from ._mxnet import mx

Outcome = Tuple[bool, Any]  # (True, result) or (False, the exception raised)

# Every Parallel not yet collected, for the fork hook at the end of the module.
_live: "weakref.WeakSet[Parallel]" = weakref.WeakSet()


class Parallelizable:
    """Base class for a unit of work that ``Parallel`` runs on threads.

    Subclasses implement ``forward_backward(x)``, typically a forward pass
    under ``autograd.record()`` followed by ``backward()``, returning the loss.
    """

    def forward_backward(self, x: Any) -> Any:
        """Forward and backward computation on one shard ``x``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward_backward(self, x): run the forward pass on the "
            "shard x under autograd.record(), call backward() on the loss, and return the loss"
        )


class _Calls:
    """What the worker tasks share with their ``Parallel``.

    Holds no reference to the ``Parallel``: dropping it must let its
    finalizer stop the executor.
    """

    __slots__ = ("inputs", "done", "__weakref__")

    def __init__(self) -> None:
        # (forward_backward, x) per call handed to the executor, in put() order.
        self.inputs: Deque[Tuple[Callable[[Any], Any], Any]] = collections.deque()
        # (succeeded, result or exception) per call, in completion order.
        self.done: "queue.SimpleQueue[Outcome]" = queue.SimpleQueue()

    def run_next(self) -> None:
        """A worker task: run the oldest call put, whichever worker runs this."""
        try:
            forward_backward, x = self.inputs.popleft()
        except IndexError:
            # The put() of this task raised after its submit had queued it (a
            # KeyboardInterrupt, say) and took its input back: nothing to run.
            return
        self.report(forward_backward, x)

    def report(self, forward_backward: Callable[[Any], Any], x: Any) -> None:
        """Run ``forward_backward(x)`` and put its outcome on ``done``.

        Reporting from inside the call (rather than from a done-callback
        added after ``submit``) keeps ``get()`` in exact completion order.
        ``done`` is read after the call: a call that forks finds the child's.
        """
        try:
            outcome: Outcome = (True, forward_backward(x))
        except BaseException as exc:  # kept for the matching get()
            outcome = (False, exc)
        self.done.put(outcome)


class Parallel:
    """Runs ``parallizable.forward_backward`` on worker threads, put/get style.

    ``put(x)`` schedules ``forward_backward(x)``; ``get()`` returns one
    result, in completion order, and re-raises the exception of a call that
    raised. Calls start in ``put()`` order. With ``serial_init`` the first
    ``num_workers`` calls run inline in ``put``, one at a time, as gluonnlp's
    does, so Gluon's deferred initialisation never runs on two threads at
    once. ``num_workers=0`` runs every call inline.

    The workers are not pinned to the data's devices (the original's were
    not either): each is a ``ContextExecutor`` worker on ``mx.cpu(0)``, the
    default context of a fresh thread, and the data's own context decides
    where the computation runs. Worker calls run with the autograd flags
    (recording, training) the caller had at ``put()``, as inline calls do;
    the original's worker threads always run with both off.

    Thread-safety:
        ``put``, ``get`` and ``close`` may be called from any thread.
        ``forward_backward`` runs in a worker thread (inline calls: in the
        thread calling ``put``). As with MXNet generally, a returned NDArray
        may still be computing; read it to see the engine's errors.

    Args:
        num_workers: number of worker threads, ``>= 0``; any integer-like
            value (``operator.index``), as the original passes it to
            ``range()``.
        parallizable: an object with a ``forward_backward(x)`` method. The
            misspelling is the original's, kept so keyword calls still work.
        serial_init: run the first ``num_workers`` calls inline.

    Raises:
        TypeError: ``num_workers`` is not an integer, ``parallizable`` is a
            class instead of an instance, or has no ``forward_backward`` of
            its own.
        ValueError: ``num_workers`` is negative.
    """

    def __init__(self, num_workers: int, parallizable: Any, serial_init: bool = True) -> None:
        num_workers = _check_num_workers(num_workers)
        _check_parallizable(parallizable)
        self._parallizable = parallizable
        self._calls = _Calls()
        self._run_next = self._calls.run_next  # bound once: put() submits it
        # Guards _pending, _closed and handing a call to the executor (append
        # + submit, so a failed submit takes back its own input). Lock order:
        # after _serial_lock, before the executor's.
        self._lock = threading.Lock()
        # Guards _num_serial and serialises the serial-init calls (see put).
        # Reentrant: a serial call that puts runs that call inline too, as
        # the original does.
        self._serial_lock = threading.RLock()
        self._num_serial = num_workers if serial_init else 0
        self._serial_done = self._num_serial == 0  # every serial call has returned
        self._pending = 0  # put() calls whose result no get() has taken yet
        self._closed = False
        self._forked_from: Optional[int] = None  # the parent's pid, in a forked child
        self._executor: Optional[ContextExecutor] = None
        if num_workers > 0:
            # The shim does its serial init inline, so the executor needs no gate.
            self._executor = ContextExecutor(
                [mx.cpu(0)] * num_workers, serial_init=False, thread_name_prefix="Parallel"
            )
            weakref.finalize(self, self._executor.shutdown, wait=False)
        _live.add(self)

    def put(self, x: Any) -> None:
        """Schedule ``parallizable.forward_backward(x)``.

        Never raises for an error of ``forward_backward``: the matching
        ``get()`` does.

        Raises:
            RuntimeError: after ``close()``, or in a child made by
                ``os.fork()`` (the parent's workers do not exist there).
        """
        forward_backward = self._parallizable.forward_backward
        if not self._serial_done and self._put_inline(forward_backward, x):
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot put() on a Parallel after close()")
            if self._executor is None:
                self._pending += 1
                inline = True
            else:
                inline = False
                self._calls.inputs.append((forward_backward, x))
                try:
                    self._executor.submit(self._run_next)
                except BaseException:
                    # Take our input back: the rightmost, as the lock kept other
                    # puts out. Gone only if submit queued the task before it
                    # raised and a worker took the input: the call then runs,
                    # and its outcome must still be someone's get().
                    try:
                        self._calls.inputs.pop()
                    except IndexError:
                        self._pending += 1
                    raise
                self._pending += 1
        if inline:  # num_workers=0: outside the lock, a call may put() too
            self._calls.report(forward_backward, x)

    def _put_inline(self, forward_backward: Callable[[Any], Any], x: Any) -> bool:
        """Run a serial-init call inline; ``False`` once there are none left.

        Holds ``_serial_lock`` across the user's call on purpose: serial-init
        calls must run one at a time and before any worker call, even when
        several threads put.
        """
        with self._serial_lock:
            if self._num_serial == 0:
                return False
            with self._lock:
                if self._closed:
                    raise RuntimeError("cannot put() on a Parallel after close()")
                self._pending += 1
            self._num_serial -= 1
            try:
                self._calls.report(forward_backward, x)
            finally:
                self._serial_done = self._num_serial == 0  # read without the lock by put()
        return True

    def get(self) -> Any:
        """Return the result of a ``forward_backward`` call, in completion order.

        Blocks until one is ready.

        Raises:
            RuntimeError: no ``put()`` is waiting for its ``get()`` (the
                original would block forever), or, in a child made by
                ``os.fork()``, the call was queued or running in the parent
                at the fork and so never completes here.
            BaseException: whatever that ``forward_backward`` call raised.
        """
        with self._lock:
            if self._pending == 0:
                raise RuntimeError("get() called with no pending put(): it would block forever")
            self._pending -= 1
            forked_from = self._forked_from
        if forked_from is None:
            succeeded, outcome = self._calls.done.get()
        else:
            try:
                succeeded, outcome = self._calls.done.get_nowait()
            except queue.Empty:
                raise RuntimeError(
                    f"this Parallel was created in process {forked_from} before os.fork(), and the "
                    "forward_backward call of this get() was queued or running in a worker thread there; "
                    "that thread does not exist in this child process, so the call never completes here. "
                    "Create a new Parallel in the child."
                ) from None
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

    def _after_fork_in_child(self) -> None:
        """Only the forking thread exists in the child: no worker reports again.

        Locks other threads held at the fork would stay held, so they are
        replaced; the outcomes already reported stay, in order, and a ``get()``
        past them raises instead of blocking.
        """
        self._lock = threading.Lock()
        self._serial_lock = threading.RLock()
        self._forked_from = os.getppid()
        self._calls.inputs.clear()  # their tasks failed with the executor's own fork error
        done: "queue.SimpleQueue[Outcome]" = queue.SimpleQueue()
        while True:
            try:
                done.put(self._calls.done.get_nowait())
            except queue.Empty:
                break
        self._calls.done = done  # a fresh queue: the old one's lock may be held


def _check_num_workers(num_workers: Any) -> int:
    """``num_workers`` as an int: what ``range()`` accepts, as the original."""
    try:
        count = operator.index(num_workers)
    except TypeError:
        raise TypeError(
            f"num_workers must be an integer (an int or anything operator.index() accepts, such as "
            f"numpy.int64), got {type(num_workers).__name__}: {num_workers!r}"
        ) from None
    if count < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    return count


def _check_parallizable(parallizable: Any) -> None:
    if isinstance(parallizable, type):
        raise TypeError(
            f"parallizable must be an instance, got the class {parallizable.__name__} itself; "
            f"write Parallel(num_workers, {parallizable.__name__}(...))"
        )
    forward_backward = getattr(parallizable, "forward_backward", None)
    if not callable(forward_backward):
        raise TypeError(f"parallizable must have a callable forward_backward(x) method, got {parallizable!r}")
    if getattr(forward_backward, "__func__", None) is Parallelizable.forward_backward:
        raise TypeError(
            f"{type(parallizable).__name__} does not implement forward_backward(self, x): subclass "
            "Parallelizable and define it (forward pass under autograd.record(), backward(), return the loss)"
        )


def _disable_in_forked_child() -> None:
    for parallel in list(_live):
        parallel._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_disable_in_forked_child)
