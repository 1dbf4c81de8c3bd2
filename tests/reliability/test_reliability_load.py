"""Reliability under load: nothing lost, nothing given to the wrong future,
nothing leaked.

``test_load_with_faults`` floods an executor with a seeded random mix of
tasks that return, raise (``Exception`` and ``BaseException`` kinds), sleep
or touch NDArrays, while the submitters cancel futures at random and another
thread shuts the executor down mid-flight; then it checks every future.
The memory tests check that RSS stays flat over many tasks and that the
executor keeps nothing of a finished task alive.

Sizes come from the environment, with bounded defaults so plain ``pytest``
stays fast (the ``slow`` marker only labels these tests; nothing deselects
them):

- ``PE_STRESS_TASKS``: tasks of the load test (default 20,000; the soak
  uses 1,000,000).
- ``PE_MEMORY_TASKS``: tasks measured by the RSS test (default 50,000; the
  soak uses 200,000).
- ``PE_STRESS_SEED``: replay a failed load run with the seed it printed.
"""

import collections
import concurrent.futures
import functools
import gc
import itertools
import os
import random
import threading
import time
import weakref

import mxnet as mx
import pytest

import parallel_exec as pe

from helpers import TIMEOUT, left_their_executor

STRESS_TASKS = int(os.environ.get("PE_STRESS_TASKS", "20000"))
MEMORY_TASKS = int(os.environ.get("PE_MEMORY_TASKS", "50000"))

# Four contexts, cpu(1) twice: routing picks the less busy of its workers.
CONTEXTS = [mx.cpu(0), mx.cpu(1), mx.cpu(2), mx.cpu(3), mx.cpu(1)]
UNKNOWN = mx.cpu(7)  # no worker: such tasks go round-robin

# Kind of task -> relative weight in the random mix.
KINDS = {
    "return": 40,
    "raise": 15,  # an Exception subclass
    "keyboard_interrupt": 5,
    "system_exit": 5,
    "sleep": 15,
    "ndarray": 20,
}


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size (or ``VmHWM``, its peak), from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class TaskError(Exception):
    """The Exception subclass the load test's tasks raise."""


# --- load with faults -------------------------------------------------------


class LoadRun:
    """The state of one load run: what each task was and what happened to it.

    Each index ``i`` is one task. Lists are indexed by ``i`` and each slot is
    written by one thread only (the submitter of ``i``, the worker running
    it, or the thread completing its future), so no lock is needed.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.kinds = [None] * n
        self.expected = [None] * n  # the result, or the exception object, task i must produce
        self.futures = [None] * n  # None: never submitted (refused after shutdown)
        self.runs = [0] * n  # times the task's function started
        self.completions = [0] * n  # times a done-callback saw the future complete
        self.cancel_won = [False] * n  # our cancel() returned True
        self.submitted = 0  # guarded by submitted_lock
        self.submitted_lock = threading.Lock()
        # The shutdown, whatever the machine's speed: once ``park_after``
        # futures are done, the shutter thread gives every worker a task that
        # parks it until ``resume``; once ``fire_at`` tasks are submitted (or
        # the submitters are done) it shuts down, then resumes. So it finds
        # tasks done, running and queued, and submitters still racing it.
        self.park_after = n  # set by the test
        self.start_parking = threading.Event()
        self.fire_at = None  # set by the shutter once it has parked the workers
        self.fire_shutdown = threading.Event()
        self.resume = threading.Event()
        self.park_futures = []
        self.active_submitters = 0  # guarded by submitted_lock
        self._done_count = itertools.count(1)  # next() is atomic in CPython

    def on_done(self, i: int, _future: concurrent.futures.Future) -> None:
        self.completions[i] += 1
        if next(self._done_count) == self.park_after:
            self.start_parking.set()

    def count_submission(self) -> None:
        with self.submitted_lock:
            self.submitted += 1
            if self.fire_at is not None and self.submitted >= self.fire_at:
                self.fire_shutdown.set()

    def submitter_done(self) -> None:
        with self.submitted_lock:
            self.active_submitters -= 1
            if self.active_submitters == 0:
                self.fire_shutdown.set()  # nothing more will be submitted


def load_task(run: LoadRun, i: int, kind: str, payload):
    """What task ``i`` does, by kind. ``payload`` was prepared at submit time."""
    run.runs[i] += 1
    if kind in ("raise", "keyboard_interrupt", "system_exit"):
        raise payload  # the very object the test expects on the future
    if kind == "sleep":
        time.sleep(payload)
        return ("slept", i)
    if kind == "ndarray":
        # Reads its output, so an engine error would land on this future.
        total = float((payload * 2).sum().asscalar())
        return ("ndarray", i, total, pe.current_context())
    return ("returned", i)


def submitter(ex, run: LoadRun, indices, rng: random.Random, arrays, refused) -> None:
    """Submit tasks ``indices``; cancel random recent ones; stop once refused."""
    try:
        submit_all(ex, run, indices, rng, arrays, refused)
    finally:
        run.submitter_done()


def submit_all(ex, run: LoadRun, indices, rng: random.Random, arrays, refused) -> None:
    kinds, weights = list(KINDS), list(KINDS.values())
    recent = collections.deque(maxlen=64)
    for i in indices:
        kind = rng.choices(kinds, weights)[0]
        run.kinds[i] = kind
        payload = None
        if kind == "raise":
            payload = TaskError(i)
        elif kind == "keyboard_interrupt":
            payload = KeyboardInterrupt(i)
        elif kind == "system_exit":
            payload = SystemExit(i)
        elif kind == "sleep":
            payload = rng.uniform(0, 2e-4)
        elif kind == "ndarray":
            context = rng.choice(CONTEXTS + [UNKNOWN])
            value = i % 1000
            payload = arrays[context] * value  # created in the submitter: not yet computed
            # The task runs on the array's context when a worker has it.
            where = context if context != UNKNOWN else None
            run.expected[i] = ("ndarray", i, float(2 * value * payload.size), where)
        if kind in ("raise", "keyboard_interrupt", "system_exit"):
            run.expected[i] = payload
        elif kind == "sleep":
            run.expected[i] = ("slept", i)
        elif kind == "return":
            run.expected[i] = ("returned", i)
        try:
            future = ex.submit(load_task, run, i, kind, payload)
        except RuntimeError:
            refused.append(i)  # shut down: this and every later task is refused
            continue
        future.add_done_callback(functools.partial(run.on_done, i))
        run.futures[i] = future
        recent.append(i)
        run.count_submission()
        if rng.random() < 0.03:
            victim = rng.choice(recent)
            if run.futures[victim].cancel():
                run.cancel_won[victim] = True


def check_load_run(run: LoadRun, refused) -> collections.Counter:
    """Check the invariants of a finished run; return counts by outcome."""
    figures = collections.Counter()
    assert set(refused) == {i for i in range(run.n) if run.futures[i] is None}
    for i in range(run.n):
        future = run.futures[i]
        if future is None:
            assert run.runs[i] == 0, f"task {i} was refused but ran"
            figures["refused"] += 1
            continue
        assert future.done(), f"task {i} ({run.kinds[i]}): future not done"
        assert run.completions[i] == 1, f"task {i}: completed {run.completions[i]} times"
        if future.cancelled():
            assert run.runs[i] == 0, f"task {i} was cancelled but ran"
            figures["cancelled by cancel()" if run.cancel_won[i] else "cancelled by shutdown"] += 1
            continue
        assert not run.cancel_won[i], f"task {i}: cancel() returned True but it was not cancelled"
        assert run.runs[i] == 1, f"task {i} ({run.kinds[i]}) ran {run.runs[i]} times"
        expected = run.expected[i]
        if isinstance(expected, BaseException):
            assert future.exception(0) is expected, f"task {i}: wrong exception {future.exception(0)!r}"
            figures[f"raised {type(expected).__name__}"] += 1
        else:
            result = future.result(0)
            if run.kinds[i] == "ndarray" and expected[3] is None:
                expected = expected[:3] + (result[3],)  # round-robin: any worker's context
            assert result == expected, f"task {i}: got {result!r}, expected {expected!r}"
            figures[f"returned ({run.kinds[i]})"] += 1
    return figures


@pytest.mark.slow
@pytest.mark.timeout(max(120, STRESS_TASKS // 1000))
def test_load_with_faults_loses_nothing():
    seed = int(os.environ.get("PE_STRESS_SEED", random.SystemRandom().randrange(2**32)))
    print(f"load test: PE_STRESS_TASKS={STRESS_TASKS} PE_STRESS_SEED={seed}")  # shown on failure
    rng = random.Random(seed)
    run = LoadRun(STRESS_TASKS, seed)
    run.park_after = rng.randint(STRESS_TASKS * 7 // 10, STRESS_TASKS * 9 // 10)
    run.active_submitters = 2
    arrays = {c: mx.nd.ones((4,), ctx=c) for c in CONTEXTS + [UNKNOWN]}
    before = set(threading.enumerate())
    start, rss_at_start = time.monotonic(), rss_bytes()
    ex = pe.ContextExecutor(CONTEXTS)
    workers = [t for t in threading.enumerate() if t not in before]
    refused = [[], []]
    threads = [
        threading.Thread(
            target=submitter, args=(ex, run, range(k, STRESS_TASKS, 2), random.Random(seed + k), arrays, refused[k])
        )
        for k in range(2)
    ]

    def shut_down_mid_flight():
        try:
            if not run.start_parking.wait(budget):
                return
            run.park_futures = [ex.submit_to(c, run.resume.wait, TIMEOUT) for c in CONTEXTS]
            with run.submitted_lock:
                run.fire_at = run.submitted + 50  # queued behind the parked workers
            if run.fire_shutdown.wait(budget):
                ex.shutdown(wait=False, cancel_futures=True)
        finally:
            run.resume.set()

    # Deadlock guard: generous, the run takes a fraction of it.
    budget = TIMEOUT + STRESS_TASKS / 500
    shutter = threading.Thread(target=shut_down_mid_flight)
    try:
        for thread in threads + [shutter]:
            thread.start()
        for thread in threads + [shutter]:
            thread.join(budget)
            assert not thread.is_alive(), f"{thread.name} hung (seed {seed})"
        submitted = [f for f in run.futures if f is not None]
        _, not_done = concurrent.futures.wait(submitted, timeout=budget)
        assert not not_done, f"{len(not_done)} futures never completed (seed {seed})"
    finally:
        run.fire_shutdown.set()
        run.resume.set()
        ex.shutdown(wait=True)
    assert left_their_executor(workers), f"worker left running (seed {seed})"
    try:
        figures = check_load_run(run, refused[0] + refused[1])
        # A parking task ran (and was released) or, queued behind a backlog, was cancelled.
        assert len(run.park_futures) == len(CONTEXTS)
        assert all(f.cancelled() or f.result(0) is True for f in run.park_futures)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nreplay with PE_STRESS_SEED={seed} PE_STRESS_TASKS={STRESS_TASKS}") from None
    # The run exercised what it claims to: faults of every kind, cancellation
    # by both routes, and a shutdown that came while work was queued.
    assert figures["raised TaskError"] and figures["raised KeyboardInterrupt"] and figures["raised SystemExit"]
    assert figures["returned (ndarray)"] and figures["returned (sleep)"]
    assert figures["cancelled by cancel()"] and figures["cancelled by shutdown"], (figures, seed)
    print(
        f"load test figures: tasks={STRESS_TASKS} submitted={len(submitted)} "
        f"futures checked={len(submitted) + len(run.park_futures)} wall={time.monotonic() - start:.1f}s "
        f"RSS at start={rss_at_start / 2**20:.0f} MiB peak RSS={rss_bytes('VmHWM') / 2**20:.0f} MiB {dict(figures)}"
    )


# --- memory -----------------------------------------------------------------


def memory_task(i: int):
    """A task whose result or exception would show up in RSS if kept."""
    if i % 5 == 0:
        raise TaskError(bytearray(1024))  # kept alive by the traceback if leaked
    if i % 50 == 1:
        return (mx.nd.ones((64,)) * i).asnumpy()  # on the worker's context
    return bytearray(1024)


def run_memory_tasks(ex, n: int, batch: int = 1000) -> None:
    """Run ``n`` tasks in batches, cancelling some; keep nothing afterwards."""
    for start in range(0, n, batch):
        futures = [ex.submit(memory_task, i) for i in range(start, min(n, start + batch))]
        for future in futures[::97]:
            future.cancel()
        _, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT)
        assert not not_done
        del futures


@pytest.mark.slow
@pytest.mark.timeout(max(120, MEMORY_TASKS // 1000))
def test_rss_stays_flat_over_many_tasks():
    with pe.ContextExecutor([mx.cpu(0), mx.cpu(1)]) as ex:
        # Warm up: allocator pools, MXNet's engine and the stats windows.
        run_memory_tasks(ex, 10_000)
        gc.collect()
        before = rss_bytes()
        run_memory_tasks(ex, MEMORY_TASKS)
        gc.collect()
        growth = rss_bytes() - before
    print(f"RSS growth over {MEMORY_TASKS} tasks: {growth / 2**20:.2f} MiB")
    # Leaking each task's 1 KiB result would cost ~50 MiB per 50,000 tasks.
    assert growth < 10 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {MEMORY_TASKS} tasks"


class Payload:
    """Something a weak reference can point to."""


def make_payload(*_args, **_kwargs):
    return Payload()


def raise_holding(arg, kwarg=None):
    raise TaskError("its traceback holds this frame, and so arg")


@pytest.mark.parametrize("outcome", ["result", "exception", "cancelled", "shutdown_cancelled"])
def test_executor_keeps_nothing_of_a_finished_task_alive(outcome):
    ex = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
    release = threading.Event()
    try:
        arg, kwarg = Payload(), Payload()
        refs = [weakref.ref(arg), weakref.ref(kwarg)]
        if outcome in ("cancelled", "shutdown_cancelled"):
            started = threading.Event()
            parked = ex.submit(lambda: started.set() or release.wait(TIMEOUT))  # keeps the next one queued
            assert started.wait(TIMEOUT)
            future = ex.submit(make_payload, arg, kwarg=kwarg)
            if outcome == "cancelled":
                assert future.cancel()
            else:
                ex.shutdown(wait=False, cancel_futures=True)
                assert future.cancelled()
            release.set()
            assert parked.result(TIMEOUT)
        else:
            fn = make_payload if outcome == "result" else raise_holding
            future = ex.submit(fn, arg, kwarg=kwarg)
            future.add_done_callback(lambda f: None)
            if outcome == "result":
                result = future.result(TIMEOUT)
                refs.append(weakref.ref(result))
                del result
            else:
                assert isinstance(future.exception(TIMEOUT), TaskError)
        refs.append(weakref.ref(future))
        if outcome != "shutdown_cancelled":
            # The worker has moved past the item once a later task finished.
            assert ex.submit(int).result(TIMEOUT) == 0
        else:
            ex.shutdown(wait=True)  # the worker passed the cancelled item and exited
        # Freed by reference counting alone: no cycle holds them either.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            del arg, kwarg, future
            alive = [r() for r in refs if r() is not None]
        finally:
            if gc_was_enabled:
                gc.enable()
        assert alive == [], f"kept alive after the task finished: {alive}"
    finally:
        release.set()
        ex.shutdown(wait=True)


# --- faults outside the task ----------------------------------------------------


def raise_from_callback(exc_type):
    def callback(_future):
        raise exc_type("raised by a done-callback")

    return callback


@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt, SystemExit])
def test_a_done_callback_that_raises_does_not_stop_its_worker(exc_type):
    # Future catches only Exception from done-callbacks; a KeyboardInterrupt
    # or SystemExit raised by one escapes set_result() in the worker. The
    # worker must serve on, or every task queued on it would hang.
    ex = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
    release = threading.Event()
    try:
        parked = ex.submit(release.wait, TIMEOUT)
        parked.add_done_callback(raise_from_callback(exc_type))  # runs in the worker
        failing = ex.submit(raise_from_callback(TaskError), None)
        failing.add_done_callback(raise_from_callback(exc_type))
        queued = [ex.submit(lambda i=i: (mx.nd.ones((2,)) * i).sum().asscalar()) for i in range(3)]
        release.set()
        assert parked.result(TIMEOUT) is True
        assert isinstance(failing.exception(TIMEOUT), TaskError)
        assert [f.result(TIMEOUT) for f in queued] == [0.0, 2.0, 4.0]
        assert ex.submit(lambda: "still serving").result(TIMEOUT) == "still serving"
    finally:
        release.set()
        ex.shutdown(wait=True)
