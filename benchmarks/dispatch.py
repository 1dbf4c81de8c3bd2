"""Section 1: dispatch overhead of a trivial task, in microseconds per task.

The task returns its argument, so every microsecond measured is the cost of
handing work to a thread and getting the answer back. Each shard is an
NDArray on its own context, as in a real data-parallel step, so
``ContextExecutor`` pays for routing too.

The variants run in three groups, each in rounds of its own: ``submit``
one task at a time, ``map`` over one shard per context, and put/get. Every
ratio is taken within a group. Interleaved all together, one group's
threads moved another's figures: ``ThreadPoolExecutor.map``'s four threads
taking turns on one queue slowed ``ContextExecutor.submit`` in the next
measurement more than the contract floor's (RESULTS.md), which no user
running one of them sees.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Protocol, Sequence, TypeVar

import mxnet as mx

import parallel_exec as pe

from floors import ContractFloor, CorrectFloor, SharedQueue, SharedQueueContract, ThreadPerContext
from harness import Summary, close_gluonnlp_parallel, markdown_table, ratios, run_rounds

try:
    import gluonnlp.utils as gluonnlp_utils
except ImportError:  # the table then has no gluonnlp row
    gluonnlp_utils = None


# Stripped-down executors (floors.py): what the designs cost before any feature.
FLOOR_PINNED = "floor: a bare thread per context (queue + a lock per task)"
FLOOR_SHARED = "floor: one shared queue, put/get, no futures (gluonnlp's design)"
FLOOR_SHARED_FLAGS = "floor: one shared queue, put/get + the caller's flags and an outcome per call"
FLOOR_SHARED_CONTRACT = "floor: one shared queue, put/get, keeping every per-call promise of pe.Parallel"
FLOOR_CORRECT = "floor: a thread per context + the flags and routing correctness needs"
FLOOR_CORRECT_SUBMIT = "floor: a thread per context + the flags and routing, a Future per task, submit+result"
FLOOR_CONTRACT = "floor: a lean executor keeping every per-task promise, map"
FLOOR_CONTRACT_SUBMIT = "floor: a lean executor keeping every per-task promise, submit+result"
VARIANTS = 17  # measurements per round, for the progress bar

_T = TypeVar("_T")


def noop(x: _T) -> _T:
    return x


class Noop(pe.Parallelizable):
    def forward_backward(self, x: _T) -> _T:
        return x


# What each kind of measurement needs of the executor or floor it drives.
class _Submits(Protocol):
    def submit(self, fn: Callable[[Any], Any], shard: Any, /) -> "Future[Any]": ...


class _Maps(Protocol):
    def map(self, fn: Callable[[Any], Any], shards: Sequence[Any], /) -> Iterable[Any]: ...


class _PutsAndGets(Protocol):
    def put(self, x: Any) -> None: ...

    def get(self) -> Any: ...


# One measurement of each kind: ``tasks`` trivial tasks over ``shards`` (one per
# context), timed; floor_runs.py measures with these too.
def submit_result(ex: _Submits, shards: Sequence[Any], tasks: int) -> Callable[[], float]:
    """One task at a time: ``submit(noop, shard).result()``, ``tasks`` times."""
    n = len(shards)

    def run() -> float:
        start = time.perf_counter()
        for i in range(tasks):
            ex.submit(noop, shards[i % n]).result()
        return time.perf_counter() - start

    return run


def map_shards(ex: _Maps, shards: Sequence[Any], tasks: int) -> Callable[[], float]:
    """``map(noop, shards)``, one call per shard, about ``tasks`` calls in all."""
    per_shard_loops = range(tasks // len(shards))

    def run() -> float:
        start = time.perf_counter()
        for _ in per_shard_loops:
            list(ex.map(noop, shards))
        return time.perf_counter() - start

    return run


def put_get(parallel: _PutsAndGets, shards: Sequence[Any], tasks: int) -> Callable[[], float]:
    """``put`` of every shard, then as many ``get``s, about ``tasks`` calls in all."""
    per_shard_loops = range(tasks // len(shards))

    def run() -> float:
        start = time.perf_counter()
        for _ in per_shard_loops:
            for shard in shards:
                parallel.put(shard)
            for _ in shards:
                parallel.get()
        return time.perf_counter() - start

    return run


@dataclass
class DispatchResult:
    """Per-task microseconds of every variant at one N, plus in-round ratios."""

    n: int
    tasks_per_measurement: int
    us_per_task: Dict[str, Summary]
    ratio: Dict[str, Summary]  # "a / b" -> summary of per-round ratios


def measure(n: int, tasks: int, rounds: int, progress: Callable[[], object]) -> DispatchResult:
    """Measure every dispatch variant with ``n`` workers, interleaved in rounds."""
    contexts = [mx.cpu(i) for i in range(n)]
    shards = [mx.nd.zeros((1,), ctx=c) for c in contexts]
    executor = pe.ContextExecutor(contexts)
    pool = ThreadPoolExecutor(n)
    ours = pe.Parallel(n, Noop())
    theirs = gluonnlp_utils.Parallel(n, Noop()) if gluonnlp_utils is not None else None
    floor_pinned, floor_shared, floor_correct = ThreadPerContext(n), SharedQueue(n, noop), CorrectFloor(contexts)
    floor_shared_flags = SharedQueue(n, noop, carry_flags=True)
    floor_shared_contract = SharedQueueContract(n, noop)
    floor_contract = ContractFloor(contexts)
    trace_dir = tempfile.mkdtemp(prefix="bench_trace_")

    def recorded(run: Callable[[], float]) -> Callable[[], float]:
        # Timed inside the block: writing the file at the end is not dispatch.
        def run_recorded() -> float:
            with executor.record_timeline(os.path.join(trace_dir, "trace.json")):
                return run()

        return run_recorded

    def plain_loop() -> float:
        start = time.perf_counter()
        for i in range(tasks):
            noop(shards[i % n])
        return time.perf_counter() - start

    variants: Dict[str, Callable[[], float]] = {
        "plain call loop (floor)": plain_loop,
        "ThreadPoolExecutor submit+result": submit_result(pool, shards, tasks),
        "ContextExecutor submit+result": submit_result(executor, shards, tasks),
        "ContextExecutor submit+result, timeline on": recorded(submit_result(executor, shards, tasks)),
        "ThreadPoolExecutor map": map_shards(pool, shards, tasks),
        "ContextExecutor map": map_shards(executor, shards, tasks),
        "ContextExecutor map, timeline on": recorded(map_shards(executor, shards, tasks)),
        "pe.Parallel put/get": put_get(ours, shards, tasks),
        FLOOR_PINNED: map_shards(floor_pinned, shards, tasks),
        FLOOR_SHARED: put_get(floor_shared, shards, tasks),
        FLOOR_SHARED_FLAGS: put_get(floor_shared_flags, shards, tasks),
        FLOOR_SHARED_CONTRACT: put_get(floor_shared_contract, shards, tasks),
        FLOOR_CORRECT: map_shards(floor_correct, shards, tasks),
        FLOOR_CORRECT_SUBMIT: submit_result(floor_correct, shards, tasks),
        FLOOR_CONTRACT: map_shards(floor_contract, shards, tasks),
        FLOOR_CONTRACT_SUBMIT: submit_result(floor_contract, shards, tasks),
    }
    if theirs is not None:
        variants["gluonnlp Parallel put/get"] = put_get(theirs, shards, tasks)
    groups = (
        ("plain call loop (floor)", "ThreadPoolExecutor submit+result", "ContextExecutor submit+result",
         "ContextExecutor submit+result, timeline on", FLOOR_CORRECT_SUBMIT, FLOOR_CONTRACT_SUBMIT),
        ("ThreadPoolExecutor map", "ContextExecutor map", "ContextExecutor map, timeline on", FLOOR_PINNED,
         FLOOR_CORRECT, FLOOR_CONTRACT),
        ("pe.Parallel put/get", FLOOR_SHARED, FLOOR_SHARED_FLAGS, FLOOR_SHARED_CONTRACT, "gluonnlp Parallel put/get"),
    )
    assert sorted(name for group in groups for name in group if name in variants) == sorted(variants)
    try:
        for run in variants.values():  # warm-up, also passes the serial-init calls
            run()
        seconds: Dict[str, List[float]] = {}
        for group in groups:  # each group in rounds of its own (module docstring)
            seconds.update(run_rounds({name: variants[name] for name in group if name in variants}, rounds, progress))
    finally:
        executor.shutdown()
        pool.shutdown()
        ours.close()
        floor_pinned.close()
        floor_shared.close()
        floor_shared_flags.close()
        floor_shared_contract.close()
        floor_correct.close()
        floor_contract.close()
        if theirs is not None:
            close_gluonnlp_parallel(theirs)
        for name in os.listdir(trace_dir):
            os.remove(os.path.join(trace_dir, name))
        os.rmdir(trace_dir)

    done = (tasks // n) * n
    per_task = {
        name: [s / (tasks if "submit" in name or "plain" in name else done) * 1e6 for s in values]
        for name, values in seconds.items()
    }
    pairs = [
        ("ContextExecutor submit+result", "ThreadPoolExecutor submit+result"),
        ("ContextExecutor map", "ThreadPoolExecutor map"),
        ("ContextExecutor submit+result, timeline on", "ContextExecutor submit+result"),
        ("ContextExecutor map, timeline on", "ContextExecutor map"),
        (FLOOR_PINNED, "ThreadPoolExecutor map"),
        ("ContextExecutor map", FLOOR_PINNED),
        (FLOOR_CORRECT, "ThreadPoolExecutor map"),
        ("ContextExecutor map", FLOOR_CORRECT),
        (FLOOR_CORRECT_SUBMIT, "ThreadPoolExecutor submit+result"),
        ("ContextExecutor submit+result", FLOOR_CORRECT_SUBMIT),
        (FLOOR_CONTRACT, "ThreadPoolExecutor map"),
        ("ContextExecutor map", FLOOR_CONTRACT),
        (FLOOR_CONTRACT_SUBMIT, "ThreadPoolExecutor submit+result"),
        ("ContextExecutor submit+result", FLOOR_CONTRACT_SUBMIT),
    ]
    if theirs is not None:
        pairs += [
            ("pe.Parallel put/get", "gluonnlp Parallel put/get"),
            (FLOOR_SHARED, "gluonnlp Parallel put/get"),
            (FLOOR_SHARED_FLAGS, "gluonnlp Parallel put/get"),
            ("pe.Parallel put/get", FLOOR_SHARED_FLAGS),
            (FLOOR_SHARED_CONTRACT, "gluonnlp Parallel put/get"),
            ("pe.Parallel put/get", FLOOR_SHARED_CONTRACT),
        ]
    return DispatchResult(
        n=n,
        tasks_per_measurement=tasks,
        us_per_task={name: Summary.of(values) for name, values in per_task.items()},
        ratio={f"{a} / {b}": Summary.of(ratios(per_task, a, b)) for a, b in pairs},
    )


def pieces_table(pieces: Dict[str, float]) -> str:
    """Markdown table of ``floors.task_pieces``: what a task does besides the hand-off."""
    # "before:" rows time what a piece replaced, for comparison; the sum is a map call's.
    now = sum(us for name, us in pieces.items() if not name.startswith(("before:", "submit:")))
    rows = [(name, f"{us:.2f}") for name, us in [*pieces.items(), ("sum for a map call (no before:, submit:)", now)]]
    return markdown_table(["piece of a ContextExecutor task, timed in one thread", "us per call"], rows, "lr")


def table(results: Sequence[DispatchResult]) -> str:
    """Markdown table: one row per variant, one column per N."""
    align = "l" + "r" * len(results)
    per_task = markdown_table(
        ["variant", *(f"N={r.n}: us/task (median ± IQR/2)" for r in results)],
        [[name, *(r.us_per_task[name].fmt(1) for r in results)] for name in results[0].us_per_task], align,
    )
    ratios = markdown_table(
        ["ratio (within each round)", *(f"N={r.n}" for r in results)],
        [[name, *(r.ratio[name].fmt(2) for r in results)] for name in results[0].ratio], align,
    )
    return per_task + "\n\n" + ratios
