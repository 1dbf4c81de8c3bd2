"""An executor's workers as one group: started, fed, stopped, disabled.

``ContextExecutor`` decides what runs where (routing, futures, flags); a
``Crew`` owns its workers: it starts them on threads of ``_pool``, puts work
items on their queues under the one lock that orders queueing against
stopping (no item lands behind a worker's exit sentinel), shuts them down,
and disables them in a child made by ``os.fork()``. It holds no reference to
the executor, and the workers none to it: when the crew is collected, its
finalizer tells them to end after their queues.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import weakref
from concurrent.futures import BrokenExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple

from . import _lifecycle, _pool
from ._gate import SerialInitGate
from ._mxnet import mx
from ._timeline import Timeline
from ._worker import WorkerJob, WorkerSlot, WorkItem


class BrokenContextExecutor(BrokenExecutor):
    """A worker's initializer failed; the executor accepts no more work."""


class Crew:
    """The workers of one executor, one per context given.

    Args:
        contexts: the validated contexts, one worker each.
        serial_init: run each worker's first task alone.
        name_prefix: worker thread names start with it.
        initializer, initargs: called once in each worker, after pinning.
    """

    def __init__(
        self,
        contexts: Sequence["mx.Context"],
        serial_init: bool,
        name_prefix: str,
        initializer: Optional[Callable[..., Any]],
        initargs: Tuple[Any, ...],
    ) -> None:
        # Notified when a worker exits, starts or stops waiting at the gate or
        # inside shutdown. Lock order: after the gate's lock.
        changed = threading.Condition(threading.Lock())
        self.slots = [WorkerSlot(i, context, changed) for i, context in enumerate(contexts)]
        # Guards the state below, the routing state (the round-robin turn, the
        # slots' ``submitted``) and putting items on the queues. Lock order:
        # after _lifecycle._global_lock; the gate's lock is never taken while holding it.
        self.lock = threading.Lock()
        self._shutdown = False
        self._broken: Optional[str] = None
        self._forked_away_from: Optional[int] = None  # parent's pid, in a forked child
        self.timeline: Optional[Timeline] = None  # the active recording, read by submit

        gate = SerialInitGate(len(self.slots)) if serial_init else None
        on_failure = functools.partial(_break, weakref.ref(self), self.slots)
        try:
            for slot in self.slots:
                pinned = _pool.take(slot.context, f"{name_prefix}_{slot.index}[{slot.context}]")
                slot.thread = pinned.thread
                pinned.run(WorkerJob(slot, gate, initializer, initargs, on_failure))
        except BaseException:  # the pool closed at interpreter exit: end the workers started
            _end_workers(self.slots)
            raise
        weakref.finalize(self, _end_workers, self.slots).atexit = False

    def enqueue(self, routed: Sequence[Tuple[Optional[List[WorkerSlot]], WorkItem]],
                pick: Callable[[Optional[List[WorkerSlot]]], WorkerSlot]) -> None:
        """Put each item on the worker ``pick`` chooses among its candidates.

        Raises:
            RuntimeError: after shutdown, during interpreter exit, or in a
                forked child.
            BrokenContextExecutor: an initializer failed.
        """
        with self.lock:
            self._check_open()
            queues = [self._place(candidates, item, pick).queue for candidates, item in routed]
            # Each put wakes a worker, which then waits for the GIL this
            # thread holds until it blocks: nothing else between the puts
            # (with more workers than cores, each microsecond here costs
            # about two; benchmarks/RESULTS.md).
            for work_queue, (_, item) in zip(queues, routed):
                work_queue.put(item)

    def enqueue_one(self, candidates: Optional[List[WorkerSlot]], item: WorkItem,
                    pick: Callable[[Optional[List[WorkerSlot]]], WorkerSlot]) -> None:
        """``enqueue`` for ``submit``'s one item, with no lists to build."""
        with self.lock:
            self._check_open()
            self._place(candidates, item, pick).queue.put(item)

    @staticmethod
    def _place(candidates: Optional[List[WorkerSlot]], item: WorkItem,
               pick: Callable[[Optional[List[WorkerSlot]]], WorkerSlot]) -> WorkerSlot:
        """The worker ``item`` goes to, with the item counted there (called under ``lock``)."""
        slot = pick(candidates)
        slot.counters.submitted += 1
        item.future.counters = slot.counters
        return slot

    def _check_open(self) -> None:
        """Raise if no task may be queued now (called under ``lock``)."""
        if self._forked_away_from is not None:
            raise RuntimeError(_forked_message(self._forked_away_from))
        if self._broken:
            raise BrokenContextExecutor(self._broken)
        if _lifecycle.exiting:  # first: the exit hook also shuts executors down
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def start_recording(self, timeline: Timeline) -> None:
        """Record the tasks on ``timeline`` (submitted ones get a traced future).

        Raises:
            RuntimeError: a recording is already active.
        """
        with self.lock:
            if self.timeline is not None:
                raise RuntimeError("a timeline is already being recorded on this executor")
            self.timeline = timeline
        for slot in self.slots:
            slot.timeline = timeline

    def stop_recording(self) -> None:
        with self.lock:
            self.timeline = None
        for slot in self.slots:
            slot.timeline = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``ContextExecutor.shutdown``: stop taking work; the workers end after their queues."""
        with self.lock:
            self._shutdown = True
            drained = _drain_queues(self.slots) if cancel_futures else []
            for slot in self.slots:
                slot.queue.put(None)
        if cancel_futures:  # outside the lock: cancel() runs done-callbacks
            held = [slot.running for slot in self.slots]
            for item in [item for _, item in drained] + [item for item in held if item is not None]:
                item.future.cancel()  # False for a running task: it goes on
        if wait:
            _wait_for_workers(self.slots)

    def _disable_after_fork(self) -> None:
        """In a forked child, where the workers do not exist: refuse work, fail what is pending.

        Only marks state: takes no lock (a thread that does not exist here may
        hold one) and runs no done-callback (``TaskFuture.fail_in_forked_child``).
        """
        self.lock = threading.Lock()  # the parent's may have been held at the fork
        changed = threading.Condition(threading.Lock())  # likewise
        for slot in self.slots:
            slot.changed = changed
            slot.exited = True  # shutdown() has no worker to wait for
        self._forked_away_from = os.getppid()
        stranded = [item for _, item in _drain_queues(self.slots)]
        stranded += [slot.running for slot in self.slots if slot.running is not None]
        for item in stranded:
            item.future.fail_in_forked_child(RuntimeError(_forked_message(self._forked_away_from)))

    def _refuse_new_work(self, reason: str) -> None:
        with self.lock:
            self._broken = reason


def _wait_for_workers(slots: Sequence[WorkerSlot]) -> None:
    """Block until every worker that is not waiting for the caller has exited.

    Called by ``shutdown(wait=True)``. From a worker's own thread (a task or
    a done-callback calling shutdown) it does not wait for that worker, nor
    for workers inside ``shutdown`` themselves (each would wait for the
    other), nor, while the caller's task holds the serial-init gate, for
    workers waiting at it.
    """
    current = threading.current_thread()
    me = next((slot for slot in slots if slot.thread is current and not slot.exited), None)
    if me is None:
        with slots[0].changed:
            slots[0].changed.wait_for(lambda: all(slot.exited for slot in slots))
    else:
        with me.changed:
            me.stopping += 1
            me.changed.notify_all()
            try:
                me.changed.wait_for(lambda: all(
                    slot is me or slot.exited or slot.stopping or (slot.gated and me.in_gate) for slot in slots
                ))
            finally:
                me.stopping -= 1


def _drain_queues(slots: Sequence[WorkerSlot]) -> List[Tuple[WorkerSlot, WorkItem]]:
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


def _forked_message(parent_pid: int) -> str:
    return (
        f"this ContextExecutor was created in process {parent_pid} before os.fork(); its worker "
        "threads do not exist in this child process. Create a new ContextExecutor in the child."
    )


def _end_workers(slots: Sequence[WorkerSlot]) -> None:
    """Finalizer of a collected crew: its workers end after their queue."""
    for slot in slots:
        slot.queue.put(None)


def _break(crew_ref: "weakref.ref[Crew]", slots: Sequence[WorkerSlot]) -> None:
    """An initializer failed: refuse new work and fail every pending task.

    Works on the slots, not the crew, so pending futures fail even if the
    executor was already collected.
    """
    reason = "a worker's initializer failed; the executor is not usable anymore"
    crew = crew_ref()
    if crew is not None:
        crew._refuse_new_work(reason)  # first, so nothing is queued after the drain
        del crew
    for slot, item in _drain_queues(slots):
        item.fail_unrun(slot.counters, BrokenContextExecutor(reason))
