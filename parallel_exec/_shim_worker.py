"""The worker side of ``Parallel``: the calls put, and the loop that runs them.

Each of a ``Parallel``'s executor workers runs one long task, ``SharedCalls.serve``:
a loop taking calls from one shared queue, in ``put()`` order, as the
original's workers do. Per call it costs a queue hand-off each way and the
caller's autograd flags, and none of the executor's per-task machinery
(futures, routing, statistics).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional, Tuple

from ._forkguard import begin_task, end_task
from ._mxnet import mx
from ._state import TaskFlags, apply_flags, capture_flags, keep_default_context, restore_flags

Outcome = Tuple[bool, Any]  # (True, result) or (False, the exception raised)


class SharedCalls:
    """What the worker loops share with their ``Parallel``.

    Holds no reference to the ``Parallel``: dropping it must let its
    finalizer stop the loops.
    """

    __slots__ = ("inputs", "done", "__weakref__")

    def __init__(self) -> None:
        # Calls put, in put() order, taken by whichever loop is free (as in
        # the original's one shared queue); a None stops one loop.
        self.inputs: "queue.SimpleQueue[Optional[Call]]" = queue.SimpleQueue()
        # (succeeded, result or exception) per call, in completion order.
        self.done: "queue.SimpleQueue[Outcome]" = queue.SimpleQueue()

    def serve(self) -> None:
        """A worker's one long task: run calls from ``inputs`` until a ``None``.

        One task per worker for the Parallel's whole life, so a call costs a
        queue hand-off and nothing of the executor's per-task machinery
        (futures, routing, statistics). Waiting for a call counts as being
        between tasks for ``os.fork()`` (``_forkguard``).
        """
        ident = threading.get_ident()
        own = capture_flags()
        # Nothing but this loop runs on its thread between calls, so after a
        # call the flags are known to be ``own`` again, unless restoring failed.
        known: Optional[TaskFlags] = own
        pinned = mx.Context(mx.current_context())  # private: a call's ``with`` on it stores state on it
        end_task(ident)
        try:
            while True:
                call = self.inputs.get()
                if call is None:
                    return
                outcome = None
                begin_task(ident)  # holds here while os.fork() runs
                try:
                    if call.claim.acquire(False):  # False: its put() failed and took it back
                        outcome, restored = run_call(call, own, known, pinned)
                        known = own if restored else None
                        self.done.put(outcome)  # read after the call: a call that forks finds the child's
                finally:
                    end_task(ident)
                del call, outcome  # do not keep the shard or its result alive while waiting
        finally:
            begin_task(ident)  # balanced by the worker, which began this task

    def report(self, forward_backward: Callable[[Any], Any], x: Any) -> None:
        """Run ``forward_backward(x)`` inline and put its outcome on ``done``.

        ``done`` is read after the call: a call that forks finds the child's.
        """
        try:
            outcome: Outcome = (True, forward_backward(x))
        except BaseException as exc:  # kept for the matching get()
            outcome = (False, exc)
        self.done.put(outcome)

    def stop(self, loops: int) -> None:
        """Tell ``loops`` worker loops to end after the calls put before."""
        for _ in range(loops):
            self.inputs.put(None)


class Call:
    """One call put for a worker loop, with the caller's autograd flags."""

    __slots__ = ("forward_backward", "x", "flags", "claim")

    def __init__(self, forward_backward: Callable[[Any], Any], x: Any, flags: TaskFlags) -> None:
        self.forward_backward = forward_backward
        self.x = x
        self.flags = flags
        # Taken once: by the loop that runs the call, or by a put() that
        # failed after queueing it and takes it back.
        self.claim = threading.Lock()


def run_call(call: Call, own: TaskFlags, known: Optional[TaskFlags], pinned: "mx.Context") -> Tuple[Outcome, bool]:
    """Run one call with its caller's flags; whatever happens is its outcome.

    The worker's context is made the default again before the call,
    undoing one an earlier call left entered (nothing else runs on the
    loop's thread between calls); the worker's ``own`` flags are restored
    after. ``known`` is what the flags are now, if known: the caller's flags
    are then set only if they differ (a call from a thread that is not
    recording, the usual case, costs three MXNet calls instead of six).

    Returns:
        The outcome, and whether the flags are ``own`` again.
    """
    try:
        keep_default_context(pinned)
        scope = apply_flags(call.flags, known)
        try:
            outcome: Outcome = (True, call.forward_backward(call.x))
        except BaseException as exc:  # kept for the matching get()
            outcome = (False, exc)
        restore_flags(own, scope)
        return outcome, True
    except BaseException as exc:  # setting a flag failed: they are unknown now
        return (False, exc), False
