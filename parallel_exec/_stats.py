"""Per-worker statistics: counted by each worker, read as immutable snapshots.

Always on, so the per-task cost is a few integer additions and two deque
appends. A snapshot reads the counters without a lock: under the GIL it can
at worst miss the task that is finishing at that instant, and it reads them
in an order that keeps every snapshot consistent (``WorkerStats.snapshot``).
Counters are updated before the task's future completes, so once a caller
has seen a future done, its task is counted.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import threading
from typing import Deque, Iterator, Mapping, Sequence, Tuple

from ._mxnet import mx

_RECENT = 256  # tasks kept for the recent percentiles


class WorkerCounters:
    """The counters of one worker: the only per-worker counts there are.

    Each count has one writer, so none needs a lock on the hot path:
    ``submitted`` is written under the executor's lock, ``completed``,
    ``failed`` and the times by the worker thread. The two counts any thread
    may write (a ``cancel()`` and the tasks failed unrun when an initializer
    fails) take ``_lock``, a leaf lock held for one addition.

    Every count is added before the task's future completes, so a caller
    that has seen a future done sees its task counted.
    """

    __slots__ = (
        "submitted", "completed", "failed", "cancelled", "failed_unrun", "_lock",
        "queued_ns", "gate_ns", "running_ns", "recent_queued", "recent_running",
    )

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0  # by cancel() or shutdown(cancel_futures=True)
        self.failed_unrun = 0  # taken off the queue because an initializer failed
        self._lock = threading.Lock()
        self.queued_ns = 0
        self.gate_ns = 0
        self.running_ns = 0
        self.recent_queued: Deque[int] = collections.deque(maxlen=_RECENT)
        self.recent_running: Deque[int] = collections.deque(maxlen=_RECENT)

    @property
    def load(self) -> int:
        """Tasks queued or running: a stale read is harmless where it is used (routing)."""
        return self.submitted - self.completed - self.failed - self.cancelled - self.failed_unrun

    def add_task(self, queued_ns: int, gate_ns: int, running_ns: int, succeeded: bool) -> None:
        """Count one task that ran (called by the worker, before completing its future)."""
        if succeeded:
            self.completed += 1
        else:
            self.failed += 1
        self.queued_ns += queued_ns
        self.gate_ns += gate_ns
        self.running_ns += running_ns
        self.recent_queued.append(queued_ns)
        self.recent_running.append(running_ns)

    def count_cancelled(self) -> None:
        """Count one task cancelled before it started (from any thread)."""
        with self._lock:
            self.cancelled += 1

    def count_failed_unrun(self) -> None:
        """Count one task failed without running (from any thread)."""
        with self._lock:
            self.failed_unrun += 1


def _percentile(samples_ns: Sequence[int], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples_ns``, in seconds (0.0 if empty)."""
    if not samples_ns:
        return 0.0
    if len(samples_ns) == 1:
        return samples_ns[0] / 1e9
    cut = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return cut[round(fraction * 100) - 1] / 1e9


@dataclasses.dataclass(frozen=True)
class WorkerStats:
    """What one worker has done, at the moment of the snapshot.

    Attributes:
        context: the worker's context.
        index: the worker's position in ``ContextExecutor.contexts``.
        submitted: tasks routed to this worker.
        completed: tasks that returned.
        failed: tasks that raised, and tasks failed unrun because an
            initializer failed.
        cancelled: tasks cancelled before they started (by ``cancel()``,
            ``shutdown(cancel_futures=True)`` or ``map``), counted when
            cancelled.
        in_queue: tasks queued or running now: submitted minus completed,
            failed and cancelled.
        queued_seconds: total time tasks waited in the queue.
        gate_seconds: total time tasks waited at the serial-init gate.
        running_seconds: total time tasks ran (the Python function's time).
        queued_p50: median time queued, in seconds, over the last 256 tasks.
        queued_p95: 95th percentile of the same.
        running_p50: median running time, in seconds, over the last 256 tasks.
        running_p95: 95th percentile of the same.
    """

    context: "mx.Context"
    index: int
    submitted: int
    completed: int
    failed: int
    cancelled: int
    in_queue: int
    queued_seconds: float
    gate_seconds: float
    running_seconds: float
    queued_p50: float
    queued_p95: float
    running_p50: float
    running_p95: float

    @classmethod
    def snapshot(cls, context: "mx.Context", index: int, counters: WorkerCounters) -> "WorkerStats":
        """Freeze ``counters`` (copying the deques first: the worker appends).

        The outcomes are read before ``submitted``: every count only grows and
        a task is submitted before it can end, so ``in_queue`` is never
        negative, however the worker and submitters run meanwhile.
        """
        queued = list(counters.recent_queued)
        running = list(counters.recent_running)
        completed = counters.completed
        failed = counters.failed + counters.failed_unrun
        cancelled = counters.cancelled
        submitted = counters.submitted
        return cls(
            context=context,
            index=index,
            submitted=submitted,
            completed=completed,
            failed=failed,
            cancelled=cancelled,
            in_queue=submitted - completed - failed - cancelled,
            queued_seconds=counters.queued_ns / 1e9,
            gate_seconds=counters.gate_ns / 1e9,
            running_seconds=counters.running_ns / 1e9,
            queued_p50=_percentile(queued, 0.50),
            queued_p95=_percentile(queued, 0.95),
            running_p50=_percentile(running, 0.50),
            running_p95=_percentile(running, 0.95),
        )


class ExecutorStats(Mapping[Tuple["mx.Context", int], WorkerStats]):
    """An immutable snapshot of every worker's ``WorkerStats``.

    A mapping keyed by ``(context, worker index)``, in worker order; ``str``
    gives a small table.
    """

    _COLUMNS = (
        ("worker", lambda s: f"{s.index}:{s.context}"),
        ("submitted", lambda s: str(s.submitted)),
        ("ok", lambda s: str(s.completed)),
        ("failed", lambda s: str(s.failed)),
        ("cancelled", lambda s: str(s.cancelled)),
        ("in queue", lambda s: str(s.in_queue)),
        ("queued s", lambda s: f"{s.queued_seconds:.3f}"),
        ("gate s", lambda s: f"{s.gate_seconds:.3f}"),
        ("running s", lambda s: f"{s.running_seconds:.3f}"),
        ("run p50 ms", lambda s: f"{s.running_p50 * 1e3:.2f}"),
        ("run p95 ms", lambda s: f"{s.running_p95 * 1e3:.2f}"),
    )

    def __init__(self, workers: Sequence[WorkerStats]) -> None:
        self._workers = tuple(workers)
        self._by_key = {(w.context, w.index): w for w in self._workers}

    def __getitem__(self, key: Tuple["mx.Context", int]) -> WorkerStats:
        return self._by_key[key]

    def __iter__(self) -> Iterator[Tuple["mx.Context", int]]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._workers)

    def __str__(self) -> str:
        rows = [[name for name, _ in self._COLUMNS]]
        rows += [[cell(w) for _, cell in self._COLUMNS] for w in self._workers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ExecutorStats({list(self._workers)!r})"
