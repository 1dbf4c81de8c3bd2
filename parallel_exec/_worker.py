"""The worker side: one worker, one context, one queue of work items.

Modelled on CPython's ``concurrent/futures/thread.py`` (3.11): a tiny work
item that always completes its future, and a loop that holds no reference to
the executor, so dropping the executor ends its workers. A worker runs on a
thread of ``_pool``, which outlives it: ``WorkerJob`` is what the thread runs
while it serves one executor.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from ._forkguard import begin_task, end_task
from ._future import MapFuture, TaskFuture
from ._gate import SerialInitGate
from ._mxnet import mx
from ._state import TaskFlags, apply_flags, capture_flags, keep_default_context, restore_flags, set_worker_context
from ._stats import WorkerCounters
from ._timeline import Timeline, task_name

LOGGER = logging.getLogger("parallel_exec")

_now_ns = time.perf_counter_ns


class WorkItem:
    """One submitted call and the future it completes."""

    __slots__ = ("future", "fn", "args", "kwargs", "flags", "submit_ns")

    def __init__(
        self,
        future: "TaskFuture | MapFuture",
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Mapping[str, Any],
        flags: TaskFlags,
        submit_ns: int,
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.flags = flags
        self.submit_ns = submit_ns  # time.perf_counter_ns() when submitted

    def run(self, slot: "WorkerSlot", gate: Optional[SerialInitGate]) -> None:
        """Run the call on this thread and complete the future.

        A task waiting at the serial-init gate has not started: its future
        stays pending, and cancellable, until it passes the gate. The gate is
        left and MXNet's flags restored before the future is completed,
        so a caller woken by the result sees the worker ready for its next
        task.
        """
        future = self.future
        if gate is None:  # no gate, or one that lets every task through now
            first = counted = False
            start_ns = run_ns = _now_ns()
            if not future.set_running_or_notify_cancel():
                return  # counted by cancel()
        else:
            if future.cancelled():
                return  # counted by cancel(); not a first task (docs/gate.md)
            start_ns = _now_ns()
            first = not slot.initialized
            counted = gate.enter(first, slot.set_gated)
            slot.in_gate = counted
            if not future.set_running_or_notify_cancel():  # cancelled at the gate
                gate.leave(first, counted, succeeded=False)  # not a first task either
                slot.in_gate = False
                return
            run_ns = _now_ns() if counted else start_ns
        pinned = slot.pinned_context
        known = slot.known_flags
        slot.known_flags = None  # until the task is over and its flags put back
        try:
            if known is None:  # something else ran here since the last task: it may have entered a context
                keep_default_context(pinned)
            scope = apply_flags(self.flags, known)
            try:
                result = self.fn(*self.args, **self.kwargs)
            finally:
                keep_default_context(pinned)  # for done-callbacks, which run on this thread too
                restore_flags(slot.own_flags, scope)
        except BaseException as exc:  # any exception belongs to the future
            self._finish(slot, gate, first, counted, start_ns, run_ns, succeeded=False)
            future.set_exception(exc)
            # Break the cycle exception -> traceback -> this frame -> future.
            del self, future
        else:
            slot.initialized = True
            self._finish(slot, gate, first, counted, start_ns, run_ns, succeeded=True)
            future.set_result(result)
            if not future._done_callbacks:  # type: ignore[union-attr]  # Future's private list (_future)
                # Nothing ran on this thread since the flags were put back (a
                # done-callback runs here only if it was added before the
                # result: one added later runs in the thread adding it).
                slot.known_flags = slot.own_flags

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
        task, and its statistics with it. Never raises: whatever happens
        here, the future must still complete.
        """
        end_ns = _now_ns()
        try:
            if gate is not None:
                gate.leave(first, counted, succeeded)
                slot.in_gate = False
            slot.counters.add_task(start_ns - self.submit_ns, run_ns - start_ns, end_ns - run_ns, succeeded)
            timeline = slot.timeline
            if timeline is not None:
                timeline.add_task(task_name(self.fn), self.submit_ns, start_ns, run_ns, end_ns, succeeded)
        except Exception:  # a bug of this package; the future completes anyway
            LOGGER.critical("Exception accounting for a task in %s", threading.current_thread().name, exc_info=True)

    def fail_unrun(self, counters: WorkerCounters, exc: BaseException) -> None:
        """Complete the future of an item taken off a queue unrun with ``exc``.

        The one way such futures fail in this process, whatever took them off
        (shutdown with ``cancel_futures`` cancels them instead, through
        ``cancel()``; a forked child uses ``TaskFuture.fail_in_forked_child``).
        """
        if self.future.set_running_or_notify_cancel():  # False: cancelled, counted already
            counters.count_failed_unrun()
            self.future.set_exception(exc)


class WorkerSlot:
    """One worker's state.

    Shutdown's waiters (``_crew._wait_for_workers``) watch ``exited``, ``stopping``
    and ``gated`` under ``changed``, a condition shared by the executor's
    slots; the worker thread writes them, except ``stopping``, written by
    the worker's own thread from inside ``shutdown``.
    """

    __slots__ = (
        "index", "context", "pinned_context", "queue", "thread", "initialized", "running", "own_flags", "known_flags",
        "counters", "timeline", "changed", "exited", "stopping", "gated", "in_gate",
    )

    def __init__(self, index: int, context: "mx.Context", changed: threading.Condition) -> None:
        self.index = index
        self.context = context
        # The worker's default context between and during tasks: a private copy,
        # since a task's ``with mx.current_context():`` stores ``_old_ctx`` on it.
        self.pinned_context = mx.Context(context)
        self.queue: "queue.SimpleQueue[Optional[WorkItem]]" = queue.SimpleQueue()
        self.thread: Optional[threading.Thread] = None
        self.initialized = False  # its first task has finished without raising
        self.running: Optional[WorkItem] = None  # the item taken off the queue, until it is done
        self.own_flags = TaskFlags(False, False, False, False)  # the worker's flags between tasks
        self.known_flags: Optional[TaskFlags] = None  # the thread's C flags now, when nothing else can have set them
        self.counters = WorkerCounters()
        self.timeline: Optional[Timeline] = None  # set while a recording is active
        self.changed = changed  # notified whenever one of the three below changes
        self.exited = False  # the worker has left its loop and its thread is idle again
        self.stopping = 0  # calls to shutdown(wait=True) running in this worker's thread
        self.gated = False  # waiting at the serial-init gate
        self.in_gate = False  # its running task was counted by the gate

    @property
    def load(self) -> int:
        """Tasks queued or running on this worker."""
        return self.counters.load

    def set_gated(self, gated: bool) -> None:
        """Called by the gate when this worker starts and stops waiting there."""
        with self.changed:
            self.gated = gated
            self.changed.notify_all()


class WorkerJob:
    """One executor's worker, run by a pooled thread pinned to its context (``_pool``).

    Args:
        slot: this worker's state; its queue delivers work items, and a
            ``None`` sentinel ends the loop after what was queued before it.
        gate: the executor's serial-init gate, or ``None`` without one.
        initializer: called once with ``initargs`` after pinning.
        on_initializer_failure: marks the executor broken and fails what is
            pending; called if the initializer raises, and the loop ends.
    """

    __slots__ = ("slot", "gate", "initializer", "initargs", "on_initializer_failure")

    def __init__(
        self,
        slot: WorkerSlot,
        gate: Optional[SerialInitGate],
        initializer: Optional[Callable[..., Any]],
        initargs: Sequence[Any],
        on_initializer_failure: Callable[[], None],
    ) -> None:
        self.slot = slot
        self.gate = gate
        self.initializer = initializer
        self.initargs = initargs
        self.on_initializer_failure = on_initializer_failure

    def run(self) -> None:
        """Pin, initialise, then serve until ``None``; never raises."""
        slot = self.slot
        set_worker_context(slot.context, slot.pinned_context)
        if self.initializer is not None:
            try:
                with slot.pinned_context:
                    self.initializer(*self.initargs)
            except BaseException:
                LOGGER.critical("Exception in initializer of %s", threading.current_thread().name, exc_info=True)
                self.on_initializer_failure()
                return
        slot.own_flags = slot.known_flags = capture_flags()  # as the initializer left them
        try:
            _serve_queue(slot, self.gate)
        except BaseException:  # only a bug in this module can get here
            LOGGER.critical("Exception in worker %s", threading.current_thread().name, exc_info=True)

    def ended(self) -> None:
        """Mark the worker exited, for shutdown's waiters (its thread is idle again)."""
        slot = self.slot
        with slot.changed:
            slot.exited = True
            slot.changed.notify_all()


def _serve_queue(slot: WorkerSlot, gate: Optional[SerialInitGate]) -> None:
    """Run the slot's work items until the ``None`` sentinel."""
    work_queue = slot.queue
    ident = threading.get_ident()
    while True:
        item = work_queue.get()
        if item is None:
            return
        slot.running = item
        begin_task(ident)  # holds here while os.fork() runs
        try:
            item.run(slot, gate)
        except BaseException:
            # The future is complete by now: what escapes is a done-callback's
            # KeyboardInterrupt or SystemExit (Future catches and logs only
            # Exception from callbacks). Log it likewise and serve on;
            # ending the loop would strand every task queued here.
            LOGGER.critical("Exception in a done-callback, in worker %s", threading.current_thread().name,
                            exc_info=True)
        end_task(ident)
        slot.running = None
        del item  # do not keep the task's arguments alive while idle
        if gate is not None and gate.opened:
            gate = None  # it lets every task through from now on: skip it
