"""A timeline of what ran where, written as a Chrome trace-event file.

The file opens in Perfetto (ui.perfetto.dev) or ``chrome://tracing``: one
track per worker thread, named after the thread (which names its context),
with one span per task; the serial-init gate wait, when there was one, is a
span just before its task; the time a task spent queued is an async span; and
the submitting threads get their own tracks with a span wherever they waited
on a future's ``result()``.

Only ``ContextExecutor.record_timeline`` creates a ``Timeline``. While none
is active the workers read one attribute per task and do nothing else.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional


def task_name(fn: Callable[..., Any]) -> str:
    """A readable name for a task's function (``functools.partial`` unwrapped)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


class Timeline:
    """Collects trace events; ``write`` saves them as a Chrome trace JSON file.

    Events are appended from worker threads and callers without a lock
    (``list.append`` is atomic under the GIL).

    Args:
        path: the file ``write`` creates.
    """

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        self._origin_ns = time.perf_counter_ns()
        self._pid = os.getpid()
        self._events: List[Dict[str, Any]] = []
        self._thread_names: Dict[int, str] = {}
        self._ids = itertools.count(1)  # pairs async begin/end; next() is atomic

    def _us(self, ns: int) -> float:
        return max(0, ns - self._origin_ns) / 1e3

    def _track(self, name: str) -> int:
        tid = threading.get_native_id()
        self._thread_names.setdefault(tid, name)
        return tid

    def add_task(self, name: str, submit_ns: int, start_ns: int, run_ns: int, end_ns: int, succeeded: bool) -> None:
        """Record one task (called by the worker that ran it)."""
        tid = self._track(threading.current_thread().name)
        queued = {"cat": "queued", "name": f"queued {name}", "id": next(self._ids), "pid": self._pid, "tid": tid}
        self._events.append({**queued, "ph": "b", "ts": self._us(submit_ns)})
        self._events.append({**queued, "ph": "e", "ts": self._us(start_ns)})
        if run_ns > start_ns:
            self._events.append(self._span("gate", "serial-init gate", tid, start_ns, run_ns, {}))
        args = {"ok": succeeded, "queued_us": (start_ns - submit_ns) / 1e3, "gate_us": (run_ns - start_ns) / 1e3}
        self._events.append(self._span("task", name, tid, run_ns, end_ns, args))

    def add_wait(self, name: str, start_ns: int, end_ns: int) -> None:
        """Record a caller's wait on a future (called by the waiting thread)."""
        tid = self._track(f"{threading.current_thread().name} (caller)")
        self._events.append(self._span("wait", f"wait {name}", tid, start_ns, end_ns, {}))

    def _span(self, cat: str, name: str, tid: int, start_ns: int, end_ns: int, args: Dict[str, Any]) -> Dict[str, Any]:
        start = self._us(start_ns)
        return {"ph": "X", "cat": cat, "name": name, "pid": self._pid, "tid": tid, "ts": start, "dur": max(0.0, self._us(end_ns) - start), "args": args}

    def mean_concurrency(self) -> float:
        """How many tasks ran at once, on average, while any task ran.

        1.0 means the tasks never overlapped; with N devices fully busy in
        parallel it approaches N. 0.0 if no task was recorded. Answers "did
        my shards overlap?" without opening the trace.
        """
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in list(self._events) if e.get("cat") == "task")
        busy = covered_until = 0.0
        for start, end in spans:
            if end > covered_until:
                busy += end - max(start, covered_until)
                covered_until = end
        total = sum(end - start for start, end in spans)
        return total / busy if busy > 0 else 0.0

    def write(self) -> None:
        """Write the events recorded so far to ``path``."""
        meta = [
            {"ph": "M", "name": "thread_name", "pid": self._pid, "tid": tid, "args": {"name": name}}
            for tid, name in sorted(self._thread_names.items())
        ]
        meta.append({"ph": "M", "name": "process_name", "pid": self._pid, "args": {"name": "parallel_exec"}})
        with open(self.path, "w", encoding="utf-8") as file:
            json.dump({"traceEvents": meta + list(self._events), "displayTimeUnit": "ms"}, file)


class TracedFuture(Future):
    """A Future that records on the timeline how long callers wait in ``result()``."""

    def __init__(self, timeline: Timeline, name: str) -> None:
        super().__init__()
        self._timeline = timeline
        self._task_name = name

    def result(self, timeout: Optional[float] = None) -> Any:
        if self.done():
            return super().result(timeout)
        start = time.perf_counter_ns()
        try:
            return super().result(timeout)
        finally:
            self._timeline.add_wait(self._task_name, start, time.perf_counter_ns())
