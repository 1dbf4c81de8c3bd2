"""A timeline of what ran where, written as a Chrome trace-event file.

The file opens in Perfetto (ui.perfetto.dev) or ``chrome://tracing``: one
track per worker thread, named after the thread (which names its context),
with one span per task; the serial-init gate wait, when there was one, is a
span just before its task; the time a task spent queued is an async span; and
the submitting threads get their own tracks with a span wherever they waited
on a future's ``result()``.

Only ``ContextExecutor.record_timeline`` creates a ``Timeline``. While none
is active the workers read one attribute per task and do nothing else.

A task is recorded by the worker when it finishes, so a recording holds the
tasks that finish while it is active, whenever they were submitted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._future import TaskFuture

LOGGER = logging.getLogger("parallel_exec")


def task_name(fn: Callable[..., Any]) -> str:
    """A readable name for a task's function (``functools.partial`` unwrapped).

    Never raises: a callable's ``__getattr__`` may raise anything (a
    dict-backed proxy raises ``KeyError``), and naming a task must not fail
    the task or ``submit``.
    """
    try:
        while isinstance(fn, functools.partial):
            fn = fn.func
        for attribute in ("__qualname__", "__name__"):
            try:
                name = getattr(fn, attribute, None)
            except Exception:
                continue
            if isinstance(name, str) and name:
                return name
    except Exception:
        pass
    return type(fn).__name__


class Timeline:
    """A recording of what ran where, as ``ContextExecutor.record_timeline`` yields it.

    It holds the tasks that finished while the recording was active (those
    still running when the ``with`` block ends are not in it: wait for their
    results inside the block, as ``ex.map`` does) and the callers' waits in
    ``Future.result()``. Users read it; the executor fills it and writes it
    to ``path`` when the block ends. Not constructed directly.

    Attributes:
        path: the trace file, as a string.

    Thread-safety:
        Workers and callers record without a lock (``list.append`` is atomic
        under the GIL); the trace events are built only when read or
        written, off the dispatch path. Reading it while tasks run gives
        the tasks recorded so far.
    """

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        self._origin_ns = time.perf_counter_ns()
        self._pid = os.getpid()
        # Tasks submitted while recording (counted by TracedFuture), to tell
        # an empty recording that missed them from one with nothing to record.
        self._submitted = 0
        # (thread id, name, submit_ns, start_ns, run_ns, end_ns, succeeded)
        self._tasks: List[Tuple[int, str, int, int, int, int, bool]] = []
        self._waits: List[Tuple[int, str, int, int]] = []  # (thread id, name, start_ns, end_ns)
        self._thread_names: Dict[int, str] = {}

    def _thread_id(self, suffix: str = "") -> int:
        tid = threading.get_native_id()
        if tid not in self._thread_names:
            self._thread_names[tid] = threading.current_thread().name + suffix
        return tid

    def add_task(self, name: str, submit_ns: int, start_ns: int, run_ns: int, end_ns: int, succeeded: bool) -> None:
        """Record one task (called by the worker that ran it)."""
        self._tasks.append((self._thread_id(), name, submit_ns, start_ns, run_ns, end_ns, succeeded))

    def add_wait(self, name: str, start_ns: int, end_ns: int) -> None:
        """Record a caller's wait on a future (called by the waiting thread)."""
        self._waits.append((self._thread_id(" (caller)"), name, start_ns, end_ns))

    def _us(self, ns: int) -> float:
        return max(0, ns - self._origin_ns) / 1e3

    def _span(self, cat: str, name: str, tid: int, start_ns: int, end_ns: int, args: Dict[str, Any]) -> Dict[str, Any]:
        start = self._us(start_ns)
        duration = max(0.0, self._us(end_ns) - start)
        return {"ph": "X", "cat": cat, "name": name, "pid": self._pid, "tid": tid, "ts": start, "dur": duration,
                "args": args}

    def events(self) -> List[Dict[str, Any]]:
        """The trace events recorded so far, thread-name metadata first."""
        events = [
            {"ph": "M", "name": "thread_name", "pid": self._pid, "tid": tid, "args": {"name": name}}
            for tid, name in sorted(self._thread_names.items())
        ]
        events.append({"ph": "M", "name": "process_name", "pid": self._pid, "args": {"name": "parallel_exec"}})
        for async_id, (tid, name, submit_ns, start_ns, run_ns, end_ns, succeeded) in enumerate(list(self._tasks), 1):
            queued = {"cat": "queued", "name": f"queued {name}", "id": async_id, "pid": self._pid, "tid": tid}
            events.append({**queued, "ph": "b", "ts": self._us(submit_ns)})
            events.append({**queued, "ph": "e", "ts": self._us(start_ns)})
            if run_ns > start_ns:
                events.append(self._span("gate", "serial-init gate", tid, start_ns, run_ns, {}))
            args = {"ok": succeeded, "queued_us": (start_ns - submit_ns) / 1e3, "gate_us": (run_ns - start_ns) / 1e3}
            events.append(self._span("task", name, tid, run_ns, end_ns, args))
        for tid, name, start_ns, end_ns in list(self._waits):
            events.append(self._span("wait", f"wait {name}", tid, start_ns, end_ns, {}))
        return events

    def mean_concurrency(self) -> float:
        """How many tasks ran at once, on average, while any task ran.

        1.0 means the tasks never overlapped; with N devices fully busy in
        parallel it approaches N. 0.0 if no task was recorded. Answers "did
        my shards overlap?" without opening the trace.
        """
        spans = sorted((task[4], task[5]) for task in list(self._tasks))
        busy = covered_until = 0
        for start, end in spans:
            if end > covered_until:
                busy += end - max(start, covered_until)
                covered_until = end
        total = sum(end - start for start, end in spans)
        return total / busy if busy > 0 else 0.0

    def write(self) -> None:
        """Write the events recorded so far to ``path`` (Chrome trace-event JSON)."""
        with open(self.path, "w", encoding="utf-8") as file:
            json.dump({"traceEvents": self.events(), "displayTimeUnit": "ms"}, file)

    def _finish(self) -> None:
        """Write the file at the end of the block; warn if it missed every task."""
        self.write()
        if self._submitted and not self._tasks:
            LOGGER.warning(
                "record_timeline(%r): %d task(s) were submitted inside the block but none finished inside it, "
                "so the trace has no task; wait for their results (future.result(), ex.map) inside the block.",
                self.path, self._submitted,
            )


class TracedFuture(TaskFuture):
    """A Future that records on the timeline how long callers wait in ``result()``."""

    def __init__(self, timeline: Timeline, name: str) -> None:
        super().__init__()
        self._timeline = timeline
        self._task_name = name
        # Unlocked: a lost increment under a race cannot make a non-zero count zero.
        timeline._submitted += 1

    def result(self, timeout: Optional[float] = None) -> Any:
        if self.done():
            return super().result(timeout)
        start = time.perf_counter_ns()
        try:
            return super().result(timeout)
        finally:
            self._timeline.add_wait(self._task_name, start, time.perf_counter_ns())
