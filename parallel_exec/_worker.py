"""The worker side: one thread, one context, one queue of work items.

Modelled on CPython's ``concurrent/futures/thread.py`` (3.11): a tiny work
item that always completes its future, and a module-level loop that holds no
reference to the executor, so dropping the executor stops the workers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from ._gate import SerialInitGate
from ._mxnet import mx
from ._state import AutogradState, apply_autograd, capture_autograd, restore_autograd, set_worker_context
from ._stats import WorkerCounters
from ._timeline import Timeline, task_name

LOGGER = logging.getLogger("parallel_exec")


class WorkItem:
    """One submitted call and the future it completes."""

    __slots__ = ("future", "fn", "args", "kwargs", "autograd", "submit_ns")

    def __init__(
        self,
        future: Future,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Mapping[str, Any],
        autograd: AutogradState,
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.autograd = autograd
        self.submit_ns = time.perf_counter_ns()

    def run(self, slot: "WorkerSlot", gate: Optional[SerialInitGate]) -> None:
        """Run the call on this thread and complete the future.

        The gate is left and the autograd flags restored before the future is
        completed, so a caller woken by the result sees the worker ready for
        its next task.
        """
        if not self.future.set_running_or_notify_cancel():
            slot.counters.cancelled += 1
            slot.finished += 1
            return  # cancelled while queued: not a first task (docs/gate.md)
        start_ns = time.perf_counter_ns()
        first = not slot.initialized
        counted = gate.enter(first) if gate is not None else False
        run_ns = time.perf_counter_ns() if counted else start_ns
        try:
            # A private Context copy: ``Context.__enter__`` stores ``_old_ctx``
            # on the object itself, so a shared one would break across threads.
            # Entering it per task also undoes a context an earlier task left.
            with slot.pinned_context:
                apply_autograd(self.autograd, slot.own_autograd)
                try:
                    result = self.fn(*self.args, **self.kwargs)
                finally:
                    restore_autograd(slot.own_autograd)
        except BaseException as exc:  # any exception belongs to the future
            self._finish(slot, gate, first, counted, start_ns, run_ns, succeeded=False)
            self.future.set_exception(exc)
            # Break the cycle exception -> traceback -> frame -> self.
            del self
        else:
            slot.initialized = True
            self._finish(slot, gate, first, counted, start_ns, run_ns, succeeded=True)
            self.future.set_result(result)

    def _finish(
        self,
        slot: "WorkerSlot",
        gate: Optional[SerialInitGate],
        first: bool,
        counted: bool,
        start_ns: int,
        run_ns: int,
        succeeded: bool,
    ) -> None:
        """Leave the gate and account for the task, before its future completes.

        So a caller woken by the future sees this worker's load without the
        task, and its statistics with it.
        """
        end_ns = time.perf_counter_ns()
        if gate is not None:
            gate.leave(first, counted, succeeded)
        slot.finished += 1
        slot.counters.add_task(start_ns - self.submit_ns, run_ns - start_ns, end_ns - run_ns, succeeded)
        timeline = slot.timeline
        if timeline is not None:
            timeline.add_task(task_name(self.fn), self.submit_ns, start_ns, run_ns, end_ns, succeeded)


class WorkerSlot:
    """One worker's state.

    ``submitted`` is written only by submitting threads (under the
    executor's lock) and ``finished`` only by the worker thread, before it
    completes the task's future; so each counter has a single writer, and
    their difference is the worker's load.
    """

    __slots__ = (
        "index", "context", "pinned_context", "queue", "thread", "submitted", "finished", "initialized", "running",
        "own_autograd", "counters", "timeline",
    )

    def __init__(self, index: int, context: "mx.Context") -> None:
        self.index = index
        self.context = context
        self.pinned_context = mx.Context(context)
        self.queue: "queue.SimpleQueue[Optional[WorkItem]]" = queue.SimpleQueue()
        self.thread: Optional[threading.Thread] = None
        self.submitted = 0
        self.finished = 0
        self.initialized = False  # its first task has finished without raising
        self.running: Optional[WorkItem] = None  # the item being run, for fork clean-up
        self.own_autograd = AutogradState(False, False)  # the worker's flags between tasks
        self.counters = WorkerCounters()
        self.timeline: Optional[Timeline] = None  # set while a recording is active

    @property
    def load(self) -> int:
        """Tasks queued or running on this worker."""
        return self.submitted - self.finished


def worker_loop(
    slot: WorkerSlot,
    gate: Optional[SerialInitGate],
    initializer: Optional[Callable[..., Any]],
    initargs: Sequence[Any],
    on_initializer_failure: Callable[[], None],
) -> None:
    """Body of a worker thread: pin, initialise, then serve until ``None``.

    Args:
        slot: this worker's state; its queue delivers work items, and a
            ``None`` sentinel ends the loop after what was queued before it.
        gate: the executor's serial-init gate, or ``None`` without one.
        initializer: called once with ``initargs`` after pinning.
        on_initializer_failure: marks the executor broken and fails what is
            pending; called if the initializer raises, and the worker exits.
    """
    set_worker_context(slot.context)
    if initializer is not None:
        try:
            with slot.pinned_context:
                initializer(*initargs)
        except BaseException:
            LOGGER.critical("Exception in initializer of %s", threading.current_thread().name, exc_info=True)
            on_initializer_failure()
            return
    slot.own_autograd = capture_autograd()  # as the initializer left them
    work_queue = slot.queue
    try:
        while True:
            item = work_queue.get()
            if item is None:
                return
            slot.running = item
            try:
                item.run(slot, gate)  # counts itself in slot.finished
            except BaseException:
                # The future is complete by now: what escapes is a done-callback's
                # KeyboardInterrupt or SystemExit (Future catches and logs only
                # Exception from callbacks). Log it likewise and serve on;
                # ending the loop would strand every task queued here.
                LOGGER.critical("Exception in a done-callback, in worker %s", threading.current_thread().name,
                                exc_info=True)
            slot.running = None
            del item  # do not keep the task's arguments alive while idle
    except BaseException:  # only a bug in this module can get here
        LOGGER.critical("Exception in worker %s", threading.current_thread().name, exc_info=True)


def drain_queues(slots: Sequence[WorkerSlot]) -> List[Tuple[WorkerSlot, WorkItem]]:
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
                drained.append((slot, item))
        for _ in range(sentinels):
            slot.queue.put(None)
    return drained
