"""``ContextExecutor``: one worker thread per ``mx.Context``, as an Executor.

Guarantees:
- Every future it hands out completes exactly once: with the task's result,
  its exception (any ``BaseException``), a cancellation, or
  ``BrokenContextExecutor``. A task's exception never ends its worker.
- No lock of this package is held while user code runs (tasks,
  initializers, done-callbacks).
- Workers hold no reference to the executor: when it is garbage-collected,
  they finish what was queued and exit. At interpreter exit an atexit hook
  does the same for every worker, before MXNet's own exit hook stops the
  engine.

Assumptions:
- MXNet's default context and autograd flags are per thread (``_state``).
- The GIL makes single-writer integer counters safe to read from any thread;
  reads are used only to balance load, where a stale value is harmless.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import queue
import threading
import weakref
from concurrent.futures import BrokenExecutor, Executor, Future
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._gate import SerialInitGate
from ._mxnet import mx
from ._routing import find_first_ndarray, pick_least_loaded
from ._state import capture_autograd
from ._worker import WorkItem, WorkerSlot, worker_loop


class BrokenContextExecutor(BrokenExecutor):
    """A worker's initializer failed; the executor accepts no more work."""


# Every executor not yet collected, for the exit and fork hooks.
_live_executors: "weakref.WeakSet[ContextExecutor]" = weakref.WeakSet()
# Every worker thread started, collected executors' included, for the exit
# hook. Weak, so finished threads do not pile up.
_all_workers: "weakref.WeakKeyDictionary[threading.Thread, WorkerSlot]" = weakref.WeakKeyDictionary()
# Set once by the exit hook; submit reads it to name the reason it refuses.
_interpreter_exiting = False
# Guards the three globals above; lock order: before an executor's lock.
_global_lock = threading.Lock()


def _stop_all_workers_at_exit() -> None:
    """Let every worker finish its queued tasks, then join it."""
    global _interpreter_exiting
    with _global_lock:
        _interpreter_exiting = True
        executors = list(_live_executors)
        workers = list(_all_workers.items())
    for executor in executors:
        executor.shutdown(wait=False)  # under its lock: no task lands after the sentinel
    for _, slot in workers:
        slot.queue.put(None)  # workers of collected executors (extra sentinels are harmless)
    for thread, _ in workers:
        thread.join()


# Registered after ``import mxnet`` (done by ``_mxnet``): atexit runs hooks
# last-in first-out, so this runs before mxnet's ``_notify_shutdown`` stops
# the engine that the tasks may still be using.
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


def _wake_workers_to_exit(slots: Sequence[WorkerSlot]) -> None:
    """Finalizer of a collected executor: workers exit after their queue."""
    for slot in slots:
        slot.queue.put(None)


def _check_contexts(contexts: Any) -> Tuple["mx.Context", ...]:
    """Validate the ``contexts`` argument; return it as a tuple."""
    if isinstance(contexts, mx.Context):
        raise TypeError(f"contexts must be a sequence of mx.Context, got a single Context; write [{contexts!r}]")
    if isinstance(contexts, (str, bytes)):
        raise TypeError(f"contexts must be a sequence of mx.Context, got a string: {contexts!r}")
    try:
        result = tuple(contexts)
    except TypeError:
        raise TypeError(f"contexts must be a sequence of mx.Context, got {type(contexts).__name__}: {contexts!r}") from None
    if not result:
        raise ValueError("contexts is empty: give at least one mx.Context, e.g. [mx.cpu(0)]")
    for i, context in enumerate(result):
        if not isinstance(context, mx.Context):
            raise TypeError(f"contexts[{i}] is not an mx.Context: {context!r}")
    return result


class ContextExecutor(Executor):
    """A ``concurrent.futures.Executor`` with one worker thread per context.

    Each worker is pinned to its context for life: inside a task,
    ``mx.current_context()`` and ``parallel_exec.current_context()`` return
    it. ``submit`` routes a call to a worker of the context of its first
    NDArray argument; ``submit_to`` names the context. The autograd flags of
    the submitting thread are in force while the task runs. With
    ``serial_init`` each worker's first task runs alone (Gluon's deferred
    initialisation is not thread-safe).

    Thread-safety:
        ``submit``, ``submit_to``, ``map`` and ``shutdown`` may be called from
        any thread, tasks included. Tasks and the initializer run in the
        worker threads; done-callbacks run in the thread that completes the
        future (the worker, or the thread calling ``cancel``/``shutdown``).
        MXNet is asynchronous: a future is done when the task's function
        returns, which may be before the NDArrays it returned are computed;
        engine errors surface where those are read (``wait_to_read()``,
        ``asnumpy()``).

    Args:
        contexts: a non-empty sequence of ``mx.Context``; a context listed
            several times gets several workers.
        serial_init: run each worker's first task alone.
        thread_name_prefix: worker thread names start with it.
        initializer: called once in each worker, after pinning, with
            ``initargs``. If it raises, the executor is broken.
        initargs: arguments for ``initializer``.

    Raises:
        TypeError: ``contexts`` is not a sequence of ``mx.Context``, or
            ``initializer`` is not callable.
        ValueError: ``contexts`` is empty.
    """

    _counter = itertools.count().__next__

    def __init__(
        self,
        contexts: Sequence["mx.Context"],
        *,
        serial_init: bool = True,
        thread_name_prefix: str = "",
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
    ) -> None:
        self._contexts = _check_contexts(contexts)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable or None, got {initializer!r}")
        if not isinstance(thread_name_prefix, str):
            raise TypeError(f"thread_name_prefix must be a str, got {thread_name_prefix!r}")
        prefix = thread_name_prefix or f"ContextExecutor-{self._counter()}"

        self._slots = [WorkerSlot(i, context) for i, context in enumerate(self._contexts)]
        self._slots_by_context: Dict["mx.Context", List[WorkerSlot]] = {}
        for slot in self._slots:
            self._slots_by_context.setdefault(slot.context, []).append(slot)
        self._round_robin = itertools.cycle(self._slots)
        # Guards _shutdown, _broken, the routing state (_round_robin, the
        # slots' ``submitted``) and putting items on the queues, so that no
        # item lands behind a worker's exit sentinel. Lock order: after
        # _global_lock; the gate's lock is never taken while holding it.
        self._lock = threading.Lock()
        self._shutdown = False
        self._broken: Optional[str] = None
        self._forked_away_from: Optional[int] = None  # parent's pid, in a forked child

        gate = SerialInitGate(len(self._slots)) if serial_init else None
        on_failure = functools.partial(_break_executor, weakref.ref(self), self._slots)
        with _global_lock:
            for slot in self._slots:
                slot.thread = threading.Thread(
                    name=f"{prefix}_{slot.index}[{slot.context}]",
                    target=worker_loop,
                    args=(slot, gate, initializer, initargs, on_failure),
                    daemon=True,  # exit is handled by _stop_all_workers_at_exit
                )
                slot.thread.start()
                _all_workers[slot.thread] = slot
            _live_executors.add(self)
        weakref.finalize(self, _wake_workers_to_exit, self._slots).atexit = False

    @property
    def contexts(self) -> Tuple["mx.Context", ...]:
        """The contexts of the workers, in the order given."""
        return self._contexts

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on the worker of its data's context.

        The first NDArray in the arguments (depth-first, positional before
        keyword, inside lists, tuples and dict values) picks the context; the
        least busy of its workers runs the call. Without one, or with an
        NDArray on a context no worker has, workers take turns.

        Returns:
            A ``Future`` for the call's result.

        Raises:
            RuntimeError: after ``shutdown`` or during interpreter exit.
            BrokenContextExecutor: an initializer failed.
            TypeError: ``fn`` is not callable.
        """
        ndarray = find_first_ndarray(args, kwargs)
        candidates = self._slots_by_context.get(ndarray.context) if ndarray is not None else None
        return self._enqueue(candidates, fn, args, kwargs)

    def submit_to(self, context: "mx.Context", fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on a worker pinned to ``context``.

        Raises:
            TypeError: ``context`` is not an ``mx.Context`` or ``fn`` is not
                callable.
            ValueError: no worker is pinned to ``context``.
            RuntimeError, BrokenContextExecutor: as for ``submit``.
        """
        if not isinstance(context, mx.Context):
            raise TypeError(f"context must be an mx.Context, got {context!r}")
        candidates = self._slots_by_context.get(context)
        if candidates is None:
            raise ValueError(f"no worker is pinned to {context}; this executor's contexts are {list(self._contexts)}")
        return self._enqueue(candidates, fn, args, kwargs)

    def _enqueue(self, candidates: Optional[List[WorkerSlot]], fn: Callable[..., Any], args: Any, kwargs: Any) -> Future:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        item = WorkItem(Future(), fn, args, kwargs, capture_autograd())
        with self._lock:
            if self._forked_away_from is not None:
                raise RuntimeError(_forked_message(self._forked_away_from))
            if self._broken:
                raise BrokenContextExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _interpreter_exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if candidates is None:
                slot = next(self._round_robin)
            elif len(candidates) == 1:
                slot = candidates[0]
            else:
                slot = candidates[pick_least_loaded([s.load for s in candidates])]
            slot.submitted += 1
            slot.queue.put(item)
        return item.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; workers exit once their queue is done.

        Idempotent, and safe to call from a task (a worker does not wait
        for itself).

        Args:
            wait: block until every worker has exited.
            cancel_futures: cancel the tasks that have not started.
        """
        with self._lock:
            self._shutdown = True
            drained = _drain_queues(self._slots) if cancel_futures else []
            for slot in self._slots:
                slot.queue.put(None)
        for item in drained:  # outside the lock: cancel() runs done-callbacks
            item.future.cancel()
        if wait:
            current = threading.current_thread()
            for slot in self._slots:
                if slot.thread is not current:
                    slot.thread.join()

    def _disable_after_fork(self) -> None:
        """Called in a forked child, where the workers do not exist."""
        self._lock = threading.Lock()  # the parent's may have been held at fork time
        self._forked_away_from = os.getppid()
        message = _forked_message(self._forked_away_from)
        stranded = _drain_queues(self._slots)
        stranded += [slot.running for slot in self._slots if slot.running is not None]
        for item in stranded:
            future = item.future
            if future.done():
                continue  # finished just before the fork
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(message))

    def _refuse_new_work(self, reason: str) -> None:
        with self._lock:
            self._broken = reason


def _forked_message(parent_pid: int) -> str:
    return (
        f"this ContextExecutor was created in process {parent_pid} before os.fork(); its worker "
        "threads do not exist in this child process. Create a new ContextExecutor in the child."
    )


def _drain_queues(slots: Sequence[WorkerSlot]) -> List[WorkItem]:
    """Take every queued work item off the workers' queues.

    Exit sentinels (``None``) are put back, so a worker told to exit still
    exits.
    """
    drained = []
    for slot in slots:
        sentinels = 0
        while True:
            try:
                item = slot.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                sentinels += 1
            else:
                drained.append(item)
        for _ in range(sentinels):
            slot.queue.put(None)
    return drained


def _break_executor(executor_ref: "weakref.ref[ContextExecutor]", slots: Sequence[WorkerSlot]) -> None:
    """An initializer failed: refuse new work and fail every pending task.

    Works on the slots, not the executor, so pending futures fail even if
    the executor was already collected.
    """
    reason = "a worker's initializer failed; the executor is not usable anymore"
    executor = executor_ref()
    if executor is not None:
        executor._refuse_new_work(reason)  # first, so nothing is queued after the drain
        del executor
    for item in _drain_queues(slots):
        if item.future.set_running_or_notify_cancel():  # skips cancelled ones
            item.future.set_exception(BrokenContextExecutor(reason))
