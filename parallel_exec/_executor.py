"""``ContextExecutor``: one worker thread per ``mx.Context``, as an Executor.

Guarantees:
- Every future it hands out completes exactly once: with the task's result,
  its exception (any ``BaseException``), a cancellation, or
  ``BrokenContextExecutor``. A task's exception never ends its worker.
- No lock of this package is held while user code runs (tasks,
  initializers, done-callbacks).
- Workers hold no reference to the executor: when it is garbage-collected,
  they finish what was queued and exit. At interpreter exit ``_lifecycle``'s
  hook does the same for every worker, before MXNet's own exit hook stops
  the engine; in a forked child, inherited executors fail clearly.

Assumptions:
- MXNet's default context, autograd and NumPy flags are per thread (``_state``).
- The GIL makes single-writer integer counters safe to read from any thread;
  reads are used only to balance load, where a stale value is harmless.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import BrokenExecutor, Executor, Future
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import _lazy_init, _lifecycle
from ._future import TaskFuture
from ._gate import SerialInitGate
from ._held import device_of
from ._mxnet import mx
from ._routing import UnknownContextWarner, find_first_ndarray, pick_least_loaded
from ._state import TaskFlags, capture_flags
from ._stats import ExecutorStats, WorkerStats
from ._timeline import Timeline, TracedFuture, task_name
from ._worker import WorkerSlot, WorkItem, drain_queues, wait_for_workers, worker_loop


class BrokenContextExecutor(BrokenExecutor):
    """A worker's initializer failed; the executor accepts no more work."""


def _check_contexts(contexts: Any) -> Tuple["mx.Context", ...]:
    """Validate the ``contexts`` argument; return it as a tuple."""
    if isinstance(contexts, mx.Context):
        raise TypeError(f"contexts must be a sequence of mx.Context, got a single Context; write [{contexts!r}]")
    if isinstance(contexts, (str, bytes)):
        raise TypeError(f"contexts must be a sequence of mx.Context, got a string: {contexts!r}")
    try:
        result = tuple(contexts)
    except TypeError:
        got = f"{type(contexts).__name__}: {contexts!r}"
        raise TypeError(f"contexts must be a sequence of mx.Context, got {got}") from None
    if not result:
        raise ValueError(
            "contexts is empty: give at least one mx.Context, e.g. [mx.cpu(0)]; a list built from "
            "mx.context.num_gpus() is empty where MXNet sees no GPU"
        )
    for i, context in enumerate(result):
        if not isinstance(context, mx.Context):
            raise TypeError(f"contexts[{i}] is not an mx.Context: {context!r}")
    gpus = [(i, c) for i, c in enumerate(result) if c.device_type == "gpu"]
    if gpus:
        # Caught here rather than at the first task, where a CPU-only build
        # says only "Operator ... is not implemented for GPU".
        visible = mx.context.num_gpus()
        for i, context in gpus:
            if context.device_id >= visible:
                seen = "no GPU" if visible == 0 else f"only {visible} GPU(s), gpu(0) to gpu({visible - 1})"
                raise ValueError(
                    f"contexts[{i}] is {context}, but MXNet sees {seen} (a CPU-only mxnet build, no CUDA "
                    "driver, or CUDA_VISIBLE_DEVICES hides it); use CPU contexts such as "
                    "[mx.cpu(0), mx.cpu(1)], or install the mxnet build for your CUDA (e.g. mxnet-cu112)"
                )
    return result


class ContextExecutor(Executor):
    """A ``concurrent.futures.Executor`` with one worker thread per context.

    Each worker is pinned to its context for life: inside a task,
    ``mx.current_context()`` and ``parallel_exec.current_context()`` return
    it. ``submit`` routes a call to a worker of the context of its first
    NDArray argument; ``submit_to`` names the context. The autograd and NumPy flags
    of the submitting thread are in force while the task runs. With
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
        ValueError: ``contexts`` is empty, or names a GPU that MXNet does
            not see (``mx.context.num_gpus()``).
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
        _lazy_init.install()  # Gluon's lazy init is safe whenever a task triggers it

        # Notified when a worker exits, starts or stops waiting at the gate or
        # inside shutdown. Lock order: after the gate's lock.
        changed = threading.Condition(threading.Lock())
        self._slots = [WorkerSlot(i, context, changed) for i, context in enumerate(self._contexts)]
        self._slots_by_context: Dict["mx.Context", List[WorkerSlot]] = {}
        for slot in self._slots:
            self._slots_by_context.setdefault(slot.context, []).append(slot)
        # The same lists by (device_typeid, device_id): routing reads an NDArray's
        # device with one GIL-keeping call instead of building its mx.Context.
        self._slots_by_device = {(c.device_typeid, c.device_id): slots for c, slots in self._slots_by_context.items()}
        self._round_robin = itertools.cycle(self._slots)
        self._unknown_context_warner = UnknownContextWarner(self._contexts)
        # Guards _shutdown, _broken, the routing state (_round_robin, the
        # slots' ``submitted``) and putting items on the queues, so that no
        # item lands behind a worker's exit sentinel. Lock order: after
        # _lifecycle._global_lock; the gate's lock is never taken while holding it.
        self._lock = threading.Lock()
        self._shutdown = False
        self._broken: Optional[str] = None
        self._forked_away_from: Optional[int] = None  # parent's pid, in a forked child
        self._timeline: Optional[Timeline] = None  # the active recording, if any

        gate = SerialInitGate(len(self._slots)) if serial_init else None
        on_failure = functools.partial(_break_executor, weakref.ref(self), self._slots)
        for slot in self._slots:
            slot.thread = threading.Thread(
                name=f"{prefix}_{slot.index}[{slot.context}]",
                target=worker_loop,
                args=(slot, gate, initializer, initargs, on_failure),
                daemon=True,  # _lifecycle's exit hook ends them in order
            )
            slot.thread.start()
        _lifecycle.track(self, self._slots)
        weakref.finalize(self, _lifecycle.wake_workers_to_exit, self._slots).atexit = False

    @property
    def contexts(self) -> Tuple["mx.Context", ...]:
        """The contexts of the workers, in the order given."""
        return self._contexts

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on the worker of its data's context.

        The first NDArray in the arguments (depth-first, positional before
        keyword, inside lists, tuples and dict values) picks the context; the
        least busy of its workers runs the call. Without one, or with an
        NDArray on a context no worker has, workers take turns; the latter is
        logged as a warning once per context.

        Returns:
            A ``Future`` for the call's result.

        Raises:
            RuntimeError: after ``shutdown`` or during interpreter exit.
            BrokenContextExecutor: an initializer failed.
            TypeError: ``fn`` is not callable.
        """
        item = self._new_item(fn, args, kwargs, capture_flags())
        self._enqueue([(self._candidates_for(args, kwargs), item)])
        return item.future

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
        item = self._new_item(fn, args, kwargs, capture_flags())
        self._enqueue([(candidates, item)])
        return item.future

    def map(
        self, fn: Callable[..., Any], *iterables: Any, timeout: Optional[float] = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """``Executor.map``: ``fn`` over the iterables, results in input order.

        Each call is routed as ``submit`` routes it, so the shards of
        ``split_and_load`` run on their own devices' workers. All calls are
        queued at once, before the first result is waited for: with one
        flags capture and one lock acquisition, which is most of what
        dispatching a shard costs.

        Args:
            fn: called as ``fn(*args)`` for each tuple of the zipped iterables.
            timeout: seconds, from this call, to wait for all results.
            chunksize: ignored, as by ``ThreadPoolExecutor``.

        Returns:
            An iterator of the results. It raises a call's exception when that
            result is reached, ``TimeoutError`` past ``timeout``; closing it
            early cancels the calls that have not started.
        """
        end_time = None if timeout is None else time.monotonic() + timeout
        flags = capture_flags()
        routed = [(self._candidates_for(args, {}), self._new_item(fn, args, {}, flags)) for args in zip(*iterables)]
        self._enqueue(routed)
        return _results_in_order([item.future for _, item in routed], end_time)

    def _candidates_for(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[List[WorkerSlot]]:
        """The workers of the first NDArray's context; ``None`` for round-robin."""
        ndarray = find_first_ndarray(args, kwargs)
        if ndarray is None:
            return None
        candidates = self._slots_by_device.get(device_of(ndarray))
        if candidates is None:
            self._unknown_context_warner.warn_once(ndarray.context)
        return candidates

    def _new_item(self, fn: Callable[..., Any], args: Any, kwargs: Any, flags: TaskFlags) -> WorkItem:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        timeline = self._timeline
        future = TaskFuture() if timeline is None else TracedFuture(timeline, task_name(fn))
        return WorkItem(future, fn, args, kwargs, flags)

    def _enqueue(self, routed: Sequence[Tuple[Optional[List[WorkerSlot]], WorkItem]]) -> None:
        """Put each item on a worker of its candidates (``None``: any, in turn)."""
        with self._lock:
            if self._forked_away_from is not None:
                raise RuntimeError(_forked_message(self._forked_away_from))
            if self._broken:
                raise BrokenContextExecutor(self._broken)
            if _lifecycle.exiting:  # first: the exit hook also shuts executors down
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            for candidates, item in routed:
                if candidates is None:
                    slot = next(self._round_robin)
                elif len(candidates) == 1:
                    slot = candidates[0]
                else:
                    slot = candidates[pick_least_loaded([s.load for s in candidates])]
                slot.counters.submitted += 1
                item.future.counters = slot.counters
                slot.queue.put(item)

    def stats(self) -> ExecutorStats:
        """Return a snapshot of every worker's statistics.

        Cheap enough to call every step. Each worker's counts are exact for
        every task whose future the caller has seen done.

        Returns:
            An immutable mapping ``(context, worker index) -> WorkerStats``;
            ``str()`` of it is a table.
        """
        return ExecutorStats(
            [WorkerStats.snapshot(s.context, s.index, s.counters) for s in self._slots]
        )

    @contextlib.contextmanager
    def record_timeline(self, path: "os.PathLike[str] | str") -> Iterator[Timeline]:
        """Record what runs where inside the ``with`` block; write a trace file.

        The file, written when the block is left (by an exception too), is
        Chrome trace-event JSON: open it in Perfetto or ``chrome://tracing``.
        It has a track per worker named after its thread and context, a span
        per task (plus its serial-init gate wait and its queued time), and a
        track per submitting thread with its waits in ``Future.result()``
        (``map`` waits that way). The tasks recorded are those that finish
        inside the block, whenever they were submitted: a task submitted
        inside and waited for after the block is not in the trace (a warning
        is logged if that leaves the trace without any task). One recording
        at a time per executor.

        Args:
            path: where to write the trace.

        Yields:
            The ``Timeline`` being recorded (``mean_concurrency()``,
            ``events()``).

        Raises:
            RuntimeError: a recording is already active on this executor.
        """
        timeline = Timeline(path)
        with self._lock:
            if self._timeline is not None:
                raise RuntimeError("a timeline is already being recorded on this executor")
            self._timeline = timeline
        for slot in self._slots:
            slot.timeline = timeline
        try:
            yield timeline
        finally:
            with self._lock:
                self._timeline = None
            for slot in self._slots:
                slot.timeline = None
            timeline._finish()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; workers exit once their queue is done.

        Idempotent, and safe to call from any number of threads, tasks and
        done-callbacks at once: it never waits for a worker that is waiting
        for it (``_worker.wait_for_workers``).

        Args:
            wait: block until every worker has exited, except the caller's
                own (from a task or a done-callback) and workers that are
                themselves waiting for the caller.
            cancel_futures: cancel the tasks that have not started, those
                held at the serial-init gate included.
        """
        with self._lock:
            self._shutdown = True
            drained = drain_queues(self._slots) if cancel_futures else []
            for slot in self._slots:
                slot.queue.put(None)
        if cancel_futures:  # outside the lock: cancel() runs done-callbacks
            held = [slot.running for slot in self._slots]
            for item in [item for _, item in drained] + [item for item in held if item is not None]:
                item.future.cancel()  # False for a running task: it goes on
        if wait:
            wait_for_workers(self._slots)

    def _disable_after_fork(self) -> None:
        """Called in a forked child, where the workers do not exist."""
        self._lock = threading.Lock()  # the parent's may have been held at fork time
        changed = threading.Condition(threading.Lock())  # likewise
        for slot in self._slots:
            slot.changed = changed
            slot.exited = True  # shutdown() has no worker to wait for
        self._forked_away_from = os.getppid()
        message = _forked_message(self._forked_away_from)
        stranded = [item for _, item in drain_queues(self._slots)]
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


def _results_in_order(futures: List[Future], end_time: Optional[float]) -> Iterator[Any]:
    """Yield the futures' results in order, as ``Executor.map``'s iterator does.

    Keeps no reference to a future or result once yielded, and cancels the
    futures not reached when closed early or when a result raises.
    """
    futures.reverse()  # pop() from the end keeps input order
    try:
        while futures:
            remaining = None if end_time is None else end_time - time.monotonic()
            yield _result_or_cancel(futures.pop(), remaining)
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(future: Future, timeout: Optional[float]) -> Any:
    try:
        return future.result(timeout)
    finally:
        future.cancel()  # no-op once done; stops a timed-out call that has not started
        del future  # break the cycle through a raised exception's traceback


def _forked_message(parent_pid: int) -> str:
    return (
        f"this ContextExecutor was created in process {parent_pid} before os.fork(); its worker "
        "threads do not exist in this child process. Create a new ContextExecutor in the child."
    )


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
    for slot, item in drain_queues(slots):
        item.fail_unrun(slot.counters, BrokenContextExecutor(reason))
