"""``ContextExecutor``: one worker thread per ``mx.Context``, as an Executor.

Guarantees:
- Every future it hands out completes exactly once: with the task's result,
  its exception (any ``BaseException``), a cancellation, or
  ``BrokenContextExecutor``. A task's exception never ends its worker.
- No lock of this package is held while user code runs (tasks,
  initializers, done-callbacks).
- Workers hold no reference to the executor: when it is garbage-collected,
  they finish what was queued and their threads go back to ``_pool`` for
  the next executor. At interpreter exit ``_lifecycle``'s hook lets every
  worker finish its queue, before MXNet's own exit hook stops the engine; in
  a forked child, inherited executors fail clearly.

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
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

from . import _lazy_init, _lifecycle
from ._crew import BrokenContextExecutor, Crew
from ._future import MapFuture, TaskFuture
from ._mxnet import mx
from ._routing import Router, check_contexts
from ._state import TaskFlags, capture_flags
from ._stats import ExecutorStats, WorkerStats
from ._timeline import Timeline, TracedFuture, task_name
from ._worker import WorkItem

__all__ = ["BrokenContextExecutor", "ContextExecutor"]

_NO_KWARGS: Mapping[str, Any] = {}  # map's calls have none; shared, never written


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
        contexts = check_contexts(contexts)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable or None, got {initializer!r}")
        if not isinstance(thread_name_prefix, str):
            raise TypeError(f"thread_name_prefix must be a str, got {thread_name_prefix!r}")
        prefix = thread_name_prefix or f"ContextExecutor-{self._counter()}"
        _lazy_init.install()  # Gluon's lazy init is safe whenever a task triggers it
        _lifecycle.install()  # the exit and fork hooks, once
        self._crew = Crew(contexts, serial_init, prefix, initializer, initargs)
        self._slots = self._crew.slots
        self._router = Router(self._slots)
        _lifecycle.track(self._crew)

    @property
    def contexts(self) -> Tuple["mx.Context", ...]:
        """The contexts of the workers, in the order given."""
        return self._router.contexts

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
        item = _submit_item(self._crew, fn, args, kwargs, capture_flags())
        self._crew.enqueue_one(self._router.candidates_for(args, kwargs), item, self._router.pick)
        return item.future  # type: ignore[return-value]  # a TaskFuture: only map's items get a MapFuture

    def submit_to(self, context: "mx.Context", fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on a worker pinned to ``context``.

        Raises:
            TypeError: ``context`` is not an ``mx.Context`` or ``fn`` is not
                callable.
            ValueError: no worker is pinned to ``context``.
            RuntimeError, BrokenContextExecutor: as for ``submit``.
        """
        candidates = self._router.workers_of(context)
        item = _submit_item(self._crew, fn, args, kwargs, capture_flags())
        self._crew.enqueue_one(candidates, item, self._router.pick)
        return item.future  # type: ignore[return-value]

    def map(
        self, fn: Callable[..., Any], *iterables: Any, timeout: Optional[float] = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """``Executor.map``: ``fn`` over the iterables, results in input order.

        Each call is routed as ``submit`` routes it, so the shards of
        ``split_and_load`` run on their own devices' workers. All calls are
        queued at once, before the first result is waited for: with one
        flags capture and one lock acquisition, which is most of what
        dispatching a shard costs. Each call gets a ``MapFuture``, which
        only this iterator sees: a fifth of a ``Future``'s cost.

        Args:
            fn: called as ``fn(*args)`` for each tuple of the zipped iterables.
            timeout: seconds, from this call, to wait for all results.
            chunksize: ignored, as by ``ThreadPoolExecutor``.

        Returns:
            An iterator of the results. It raises a call's exception when that
            result is reached, ``TimeoutError`` past ``timeout``; closing it
            early cancels the calls that have not started.

        Raises:
            TypeError: ``fn`` is not callable (even with nothing to map).
            RuntimeError, BrokenContextExecutor: as for ``submit``.
        """
        end_time = None if timeout is None else time.monotonic() + timeout
        _check_callable(fn)
        flags = capture_flags()
        route = self._router.candidates_for
        new_future = _future_maker(self._crew.timeline, fn, MapFuture)  # only map's iterator sees its futures
        submit_ns = time.perf_counter_ns()  # one clock read for the batch
        routed = [(route(args, _NO_KWARGS), WorkItem(new_future(), fn, args, _NO_KWARGS, flags, submit_ns))
                  for args in zip(*iterables)]
        results = _results_in_order([item.future for _, item in routed], end_time)  # before the workers wake
        self._crew.enqueue(routed, self._router.pick)
        return results

    def stats(self) -> ExecutorStats:
        """Return a snapshot of every worker's statistics.

        Cheap enough to call every step. Each worker's counts are exact for
        every task whose future the caller has seen done.

        Returns:
            An immutable mapping ``(context, worker index) -> WorkerStats``;
            ``str()`` of it is a table.
        """
        return ExecutorStats([WorkerStats.snapshot(s.context, s.index, s.counters) for s in self._slots])

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
        self._crew.start_recording(timeline)
        try:
            yield timeline
        finally:
            self._crew.stop_recording()
            timeline._finish()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; workers end once their queue is done.

        Their threads then wait, idle, for the next executor on their
        context (``release_idle_threads`` ends them). Idempotent, and safe to
        call from any number of threads, tasks and done-callbacks at once: it
        never waits for a worker that is waiting for it (``_crew``).

        Args:
            wait: block until every worker has ended, except the caller's
                own (from a task or a done-callback) and workers that are
                themselves waiting for the caller.
            cancel_futures: cancel the tasks that have not started, those
                held at the serial-init gate included.
        """
        self._crew.shutdown(wait, cancel_futures=cancel_futures)


def _check_callable(fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")


def _future_maker(
    timeline: Optional[Timeline], fn: Callable[..., Any], untraced: Callable[[], Any]
) -> Callable[[], Any]:
    """What makes a call's future: a ``TracedFuture`` while a timeline records
    (it records the caller's waits too), else ``untraced`` (a ``TaskFuture``,
    or for ``map`` a ``MapFuture``: only its iterator sees it, a cheaper kind)."""
    if timeline is not None:
        return functools.partial(TracedFuture, timeline, task_name(fn))
    return untraced


def _submit_item(crew: Crew, fn: Callable[..., Any], args: Any, kwargs: Any, flags: TaskFlags) -> WorkItem:
    """The work item of a ``submit`` or ``submit_to`` call: a ``TaskFuture``,
    or a ``TracedFuture`` while a timeline records."""
    _check_callable(fn)
    new_future = _future_maker(crew.timeline, fn, TaskFuture)
    return WorkItem(new_future(), fn, args, kwargs, flags, time.perf_counter_ns())


def _results_in_order(futures: List["TaskFuture | MapFuture"], end_time: Optional[float]) -> Iterator[Any]:
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


def _result_or_cancel(future: "TaskFuture | MapFuture", timeout: Optional[float]) -> Any:
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()  # stops a timed-out call that has not started (a no-op once done)
        raise
    finally:
        del future  # break the cycle through a raised exception's traceback
