"""``Parallel`` and ``Parallelizable``: a drop-in for gluonnlp 0.10.0's.

The original's design (``gluonnlp/utils/parallel.py``): worker threads take
calls from one shared queue and put outcomes on another. It loses a worker
when ``forward_backward`` raises, so ``get()`` hangs forever; here the
exception travels to the matching ``get()``, which re-raises it. The threads
are a ``ContextExecutor``'s, each running one long task, a loop over the
shared queue (``_shim_worker``), so a call costs a queue hand-off each way,
as in the original, and the executor still owns the threads' life: reuse,
exit, fork.

Guarantees:
- Every ``put()`` that returns gets exactly one outcome (a result or an
  exception) for a ``get()``, in completion order; in a child made by
  ``os.fork()``, calls that were queued or running in the parent's workers
  fail at once, naming ``os.fork()``.
- Calls start in ``put()`` order: one FIFO, whichever worker takes a call.
- The loops end after the calls put before ``close()``, the ``Parallel``'s
  collection, or interpreter exit (the executors' exit hook tells them to,
  through ``_lifecycle.call_before_exit``, before it waits for every worker
  task to end).
"""

from __future__ import annotations

import operator
import os
import queue
import threading
import weakref
from typing import Any, Callable, Optional

from . import _lifecycle
from ._executor import ContextExecutor
from ._mxnet import mx
from ._shim_worker import Call, Outcome, SharedCalls
from ._state import capture_flags

# Every Parallel not yet collected, for the fork and exit hooks.
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


class Parallel:
    """Runs ``parallizable.forward_backward`` on worker threads, put/get style.

    ``put(x)`` schedules ``forward_backward(x)``; ``get()`` returns one
    result, in completion order, and re-raises the exception of a call that
    raised. Calls start in ``put()`` order. With ``serial_init`` the first
    ``num_workers`` calls run inline in ``put``, one at a time, as gluonnlp's
    does, so Gluon's deferred initialisation never runs on two threads at
    once. ``num_workers=0`` runs every call inline.

    As in the original, free workers take calls from one shared queue and
    are not pinned to the data's devices: each is a ``ContextExecutor``
    worker on ``mx.cpu(0)``, and the data's context decides where the
    computation runs. Worker calls run with the autograd flags the caller
    had at ``put()``; the original's always run with both off.

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
        self._calls = SharedCalls()
        # Guards _pending, _closed and queueing a call (no call lands behind
        # the loops' stop signals). Lock order: after _serial_lock.
        self._lock = threading.Lock()
        # Guards _num_serial and serialises the serial-init calls (see put).
        # Reentrant: a serial call that puts runs that call inline too, as
        # the original does.
        self._serial_lock = threading.RLock()
        self._num_serial = num_workers if serial_init else 0
        self._serial_done = self._num_serial == 0  # every serial call has returned
        self._pending = 0  # put() calls whose result no get() has taken yet
        self._closed: Optional[str] = None  # why put() is refused: close(), or interpreter exit
        self._forked_from: Optional[int] = None  # the parent's pid, in a forked child
        self._executor: Optional[ContextExecutor] = None
        self._stop_loops: Optional[weakref.finalize] = None
        if num_workers > 0:
            # The shim does its serial init inline, so the executor needs no gate.
            self._executor = ContextExecutor(
                [mx.cpu(0)] * num_workers, serial_init=False, thread_name_prefix="Parallel"
            )
            for _ in range(num_workers):
                self._executor.submit(self._calls.serve)  # round-robin: one loop per worker
            # Runs once: at close(), at the exit hook, or when this Parallel is collected.
            self._stop_loops = weakref.finalize(self, _stop, self._calls, num_workers, self._executor)
            self._stop_loops.atexit = False  # _stop_all_at_exit does it, before the executors stop
        _lifecycle.install()
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
        call = Call(forward_backward, x, capture_flags()) if self._executor is not None else None
        with self._lock:
            self._check_open()
            self._pending += 1
            if call is not None:
                try:
                    self._calls.inputs.put(call)
                except BaseException:
                    # Interrupted (a KeyboardInterrupt, say) during or just
                    # after queueing: take the call back unless a loop has
                    # taken it already, in which case its outcome is coming.
                    if call.claim.acquire(False):
                        self._pending -= 1
                    raise
                return
        self._calls.report(forward_backward, x)  # num_workers=0: outside the lock, a call may put() too

    def _check_open(self) -> None:
        """Raise ``RuntimeError`` if this Parallel takes no more calls (called under ``_lock``)."""
        if self._forked_from is not None:
            raise RuntimeError(_FORKED.format(pid=self._forked_from))
        if self._closed is not None:
            raise RuntimeError(f"cannot put() on a Parallel after {self._closed}")

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
                self._check_open()
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
        self._refuse_puts("close()")
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _refuse_puts(self, reason: str) -> None:
        """Refuse further calls and tell the loops to end after the ones put."""
        with self._lock:
            if self._closed is None:
                self._closed = reason
        _call_once(self._stop_loops)

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
        self._calls.inputs = queue.SimpleQueue()  # never run here; their get() raises
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


_FORKED = (
    "this Parallel was created in process {pid} before os.fork(); its worker threads do not exist in this "
    "child process. Create a new Parallel in the child."
)


def _stop(calls: SharedCalls, loops: int, executor: ContextExecutor) -> None:
    """End a Parallel's worker loops after the calls put, without waiting."""
    calls.stop(loops)
    executor.shutdown(wait=False)


def _call_once(finalizer: Optional[weakref.finalize]) -> None:
    """Call what ``finalizer`` would call, once only, whoever gets it first.

    Not ``finalizer()``: at interpreter exit, weakref's own exit hook has run
    by then and turned every finalizer into a no-op; ``detach`` still hands
    over what it would have called.
    """
    stop = finalizer.detach() if finalizer is not None else None
    if stop is not None:
        _, func, args, _ = stop
        func(*args)


def _stop_all_at_exit() -> None:
    """Refuse puts and end every loop after its calls: the executors' exit
    hook calls this before it waits for every worker task to end."""
    for parallel in list(_live):
        parallel._refuse_puts("interpreter exit began")


def _disable_in_forked_child() -> None:
    for parallel in list(_live):
        parallel._after_fork_in_child()


# Lists the executors' own exit and fork hooks run through; the hooks
# themselves are registered by the first executor or Parallel made
# (``_lifecycle.install``), not by importing the package.
_lifecycle.call_before_exit(_stop_all_at_exit)
_lifecycle.call_after_fork_in_child(_disable_in_forked_child)
