"""Lifecycle under attack (issue 20): shutdown from several tasks and
callbacks at once, shutdown from a first task, fork while workers run MXNet,
tasks held at the gate, task names that raise, exact statistics, and
cancelled futures seen by waiters at once.

Each numbered repro of the issue has a test here, with 2 and 4 workers where
the number matters. Every wait is bounded: a regression fails, never hangs.
"""

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec import _crew, _forkguard, _lifecycle
from parallel_exec._gate import SerialInitGate

from helpers import SCRIPT_PRELUDE, TIMEOUT

CONTEXTS = {2: [mx.cpu(0), mx.cpu(1)], 4: [mx.cpu(0), mx.cpu(1), mx.cpu(0), mx.cpu(1)]}


def run_script(source: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT_PRELUDE + textwrap.dedent(source)], capture_output=True, text=True, timeout=60
    )


def warmed_up(contexts, **kwargs):
    """An executor whose workers have all passed the serial-init gate."""
    ex = pe.ContextExecutor(contexts, **kwargs)
    list(ex.map(abs, range(len(contexts)), timeout=TIMEOUT))  # round-robin: one per worker
    return ex


@pytest.fixture
def gate_waits(monkeypatch):
    """A Condition-guarded count of tasks blocked at the gate of new executors."""
    state = {"blocked": 0}
    cond = threading.Condition()

    class SignallingGate(SerialInitGate):
        def enter(self, first, on_wait=None):
            def signal(waiting):
                if on_wait is not None:
                    on_wait(waiting)
                with cond:
                    state["blocked"] += 1 if waiting else -1
                    cond.notify_all()

            return super().enter(first, signal)

    def wait_for_blocked(count):
        with cond:
            assert cond.wait_for(lambda: state["blocked"] >= count, TIMEOUT), "no task reached the gate"

    monkeypatch.setattr(_crew, "SerialInitGate", SignallingGate)
    return wait_for_blocked


# --- 1. shutdown(wait=True) from several tasks and callbacks at once ---------------


@pytest.mark.parametrize("n", [2, 4])
def test_tasks_on_every_worker_shutting_down_at_once_all_return(n):
    ex = warmed_up(CONTEXTS[n])
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    futures = [ex.submit_to(c, lambda: (barrier.wait(), ex.shutdown(wait=True))) for c in ex.contexts[:n]]
    # submit_to picks the least loaded worker of a context: one task each.
    done, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT)
    assert not not_done, "workers calling shutdown(wait=True) waited for each other"
    for future in done:
        future.result()
    ex.shutdown(wait=True)


@pytest.mark.parametrize("n", [2, 4])
def test_done_callbacks_of_failures_shutting_down_at_once_all_return(n):
    ex = warmed_up(CONTEXTS[n])
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    returned = threading.Semaphore(0)

    def fail():
        barrier.wait()
        raise ValueError("planned")

    def stop_on_failure(future):
        if future.exception() is not None:
            ex.shutdown(wait=True)
        returned.release()

    futures = [ex.submit_to(c, fail) for c in ex.contexts]
    for future in futures:
        future.add_done_callback(stop_on_failure)
    for _ in futures:
        assert returned.acquire(timeout=TIMEOUT), "a done-callback calling shutdown() never returned"
    ex.shutdown(wait=True)


def test_interpreter_exits_after_callbacks_shut_down_at_once():
    result = run_script(
        """
        import mxnet as mx
        import parallel_exec as pe

        ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)])
        list(ex.map(abs, range(4)))
        barrier = threading.Barrier(2, timeout=30)
        def fail():
            barrier.wait()
            raise ValueError("planned")
        for c in ex.contexts:
            ex.submit_to(c, fail).add_done_callback(lambda f: f.exception() and ex.shutdown())
        say("submitted")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "submitted\n"


# --- 2. shutdown from a first task; fork while workers run MXNet -------------------


@pytest.mark.parametrize("n", [2, 4])
def test_first_task_shutting_down_does_not_deadlock_with_the_gate(n, gate_waits):
    ex = pe.ContextExecutor(CONTEXTS[n])
    others = threading.Event()

    inside = threading.Event()

    def first_task():
        inside.set()
        others.wait(TIMEOUT)
        ex.shutdown(wait=True)
        return "stopped"

    stopper = ex.submit_to(ex.contexts[0], first_task)
    assert inside.wait(TIMEOUT)  # it holds the gate before the others are submitted
    held = [ex.submit_to(c, int, 7) for c in ex.contexts[1:]]  # their first tasks wait at the gate
    gate_waits(n - 1)
    others.set()
    assert stopper.result(TIMEOUT) == "stopped"
    assert [f.result(TIMEOUT) for f in held] == [7] * (n - 1)
    ex.shutdown(wait=True)


@pytest.fixture
def fork_probe():
    """Run ``on_fork`` from a before-fork hook registered by the test module.

    Registered hooks cannot be removed, so one hook serves every test and is
    armed only while a test needs it. It runs before parallel_exec's own
    before-fork hook (hooks run last registered first).
    """
    return _FORK_PROBE


class _ForkProbe:
    def __init__(self):
        self.on_fork = None
        _lifecycle.install()  # parallel_exec's hooks first, so that this one runs before them
        os.register_at_fork(before=self._before)

    def _before(self):
        if self.on_fork is not None:
            self.on_fork()


_FORK_PROBE = _ForkProbe()


def fork_and_reap():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0


@pytest.mark.parametrize("n", [2, 4])
def test_fork_waits_for_running_tasks_and_holds_workers_until_done(n, fork_probe):
    ex = warmed_up(CONTEXTS[n], serial_init=False)
    running = threading.Barrier(n + 1, timeout=TIMEOUT)
    fork_started = threading.Event()

    def task():
        running.wait()
        fork_started.wait(TIMEOUT)
        return "finished"

    futures = [ex.submit_to(c, task) for c in ex.contexts]
    running.wait()  # every worker is inside a task
    queued = [ex.submit_to(c, int, 1) for c in ex.contexts]
    fork_probe.on_fork = fork_started.set
    try:
        fork_and_reap()
    finally:
        fork_probe.on_fork = None
    # The fork went ahead only once every running task had ended.
    assert all(f.done() for f in futures)
    assert [f.result(TIMEOUT) for f in futures] == ["finished"] * n
    assert [f.result(TIMEOUT) for f in queued] == [1] * n  # the held workers go on
    ex.shutdown(wait=True)


def test_fork_goes_ahead_after_a_bounded_wait_for_a_task_that_waits_on_it(monkeypatch, caplog, fork_probe):
    monkeypatch.setattr(_forkguard, "FORK_WAIT_SECONDS", 0.05)
    ex = warmed_up([mx.cpu(0)], serial_init=False)
    started, forked = threading.Event(), threading.Event()
    task = ex.submit(lambda: started.set() or forked.wait(TIMEOUT))
    assert started.wait(TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="parallel_exec"):
        fork_and_reap()
    forked.set()
    assert task.result(TIMEOUT) is True
    assert "os.fork() went ahead while 1 parallel_exec task(s) still ran" in caplog.text
    ex.shutdown(wait=True)


def test_a_child_forked_while_a_worker_held_a_futures_lock_does_not_deadlock(monkeypatch):
    # The child's hook fails the inherited futures: it must not take their
    # locks, which a thread that does not exist in the child may hold.
    monkeypatch.setattr(_forkguard, "FORK_WAIT_SECONDS", 0.05)  # both workers stay busy
    ex = warmed_up([mx.cpu(0), mx.cpu(1)], serial_init=False)
    release, holding = threading.Event(), threading.Event()
    victim = ex.submit_to(mx.cpu(0), release.wait, TIMEOUT)

    def hold_the_victims_lock():
        with victim._condition:  # as a thread completing or cancelling it does
            holding.set()
            release.wait(TIMEOUT)

    holder = ex.submit_to(mx.cpu(1), hold_the_victims_lock)
    assert holding.wait(TIMEOUT)
    pid = os.fork()
    if pid == 0:
        exc = victim.exception(TIMEOUT)
        os._exit(0 if isinstance(exc, RuntimeError) and "os.fork()" in str(exc) else 1)
    try:
        status = wait_for_child(pid)
    finally:
        release.set()
    assert status == 0
    assert victim.result(TIMEOUT) is True and holder.result(TIMEOUT) is None
    ex.shutdown(wait=True)


def wait_for_child(pid):
    """The child's exit status; a child still running after TIMEOUT is killed and fails the test."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child {pid} hung")


def test_repeated_fork_while_workers_run_mxnet_tasks_never_hangs():
    # Without the hold, 3 of 6 such runs hung inside os.fork() (MXNet 1.9.1's
    # fork handler racing a thread inside an MXNet call). Only the tasks call
    # MXNet while the forks run.
    result = run_script(
        """
        import os
        import mxnet as mx
        import parallel_exec as pe

        ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)])
        stop = threading.Event()
        def step(a):
            return mx.nd.dot(a, a).asnumpy().sum()
        # The arrays are made here, not in the feeders: the hold covers the
        # executor's tasks, and a feeder's own MXNet call racing a fork can
        # hang it (CI saw that: a feeder inside mx.nd.ones at the first fork).
        arrays = [mx.nd.ones((100, 100), ctx=c) for c in ex.contexts]
        mx.nd.waitall()
        def feed(a):
            while not stop.is_set():
                ex.submit(step, a).result(30)
        feeders = [threading.Thread(target=feed, args=(a,)) for a in arrays]
        for t in feeders:
            t.start()
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        stop.set()
        for t in feeders:
            t.join(30)
        ex.shutdown()
        say("forked 40 times")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "forked 40 times\n"


# --- 3. tasks held at the gate have not started -------------------------------------


def gate_holder(ex, release):
    """Submit a first task to cpu(0) that holds the gate until ``release``.

    Returns once it is inside the gate, so that a task submitted next
    certainly waits there (otherwise it could pass the gate first).
    """
    inside = threading.Event()
    blocker = ex.submit_to(mx.cpu(0), lambda: inside.set() or release.wait(TIMEOUT))
    assert inside.wait(TIMEOUT)
    return blocker


def held_at_gate(gate_waits):
    """An executor whose cpu(1) first task is held at the gate by cpu(0)'s."""
    ex = pe.ContextExecutor(CONTEXTS[2])
    release = threading.Event()
    blocker = gate_holder(ex, release)
    held = ex.submit_to(mx.cpu(1), int, 5)
    gate_waits(1)
    return ex, release, blocker, held


def test_a_task_held_at_the_gate_is_pending_and_cancel_works(gate_waits):
    ex, release, blocker, held = held_at_gate(gate_waits)
    try:
        assert not held.running()
        assert held.cancel()
    finally:
        release.set()
    assert held.cancelled()
    assert blocker.result(TIMEOUT) is True
    # The cancelled task was not cpu(1)'s first task: the next one is, and runs.
    assert ex.submit_to(mx.cpu(1), int, 6).result(TIMEOUT) == 6
    ex.shutdown(wait=True)


def test_shutdown_cancel_futures_cancels_a_task_held_at_the_gate(gate_waits):
    ex, release, blocker, held = held_at_gate(gate_waits)
    try:
        ex.shutdown(wait=False, cancel_futures=True)
        assert held.cancelled()
    finally:
        release.set()
    ex.shutdown(wait=True)
    assert blocker.result(TIMEOUT) is True
    assert ex.stats()[(mx.cpu(1), 1)].cancelled == 1


def test_map_timeout_cancels_a_call_held_at_the_gate(gate_waits):
    ex = pe.ContextExecutor(CONTEXTS[2])
    release = threading.Event()
    blocker = gate_holder(ex, release)
    calls = ex.map(lambda x: x, [mx.nd.ones(1, ctx=mx.cpu(1))], timeout=0.05)
    gate_waits(1)
    try:
        with pytest.raises(concurrent.futures.TimeoutError):
            next(calls)
        assert ex.stats()[(mx.cpu(1), 1)].cancelled == 1
    finally:
        release.set()
    assert blocker.result(TIMEOUT) is True
    ex.shutdown(wait=True)


# --- 4. naming a task can never fail it ---------------------------------------------


class Handler:
    """A callable whose ``__getattr__`` raises KeyError (a dict-backed proxy)."""

    def __init__(self):
        self.registry = {}

    def __call__(self, x):
        return x + 1

    def __getattr__(self, name):
        return self.registry[name]


def test_a_callable_whose_attributes_raise_completes_while_recording(tmp_path):
    ex = warmed_up(CONTEXTS[2])
    release = threading.Event()
    ex.submit_to(mx.cpu(0), lambda: release.wait(TIMEOUT))
    before = ex.submit_to(mx.cpu(0), Handler(), 1)  # submitted before the recording, run inside
    with ex.record_timeline(tmp_path / "t.json"):
        release.set()
        assert before.result(TIMEOUT) == 2
        inside = ex.submit(Handler(), 2)  # submitted inside the recording
        assert inside.result(TIMEOUT) == 3
    assert "Handler" in (tmp_path / "t.json").read_text()
    ex.shutdown(wait=True)


# --- 7. statistics exact and consistent ----------------------------------------------


def test_a_cancelled_future_is_counted_at_once():
    ex = warmed_up([mx.cpu(0)])
    release = threading.Event()
    try:
        ex.submit(lambda: release.wait(TIMEOUT))
        queued = ex.submit(int)
        assert queued.cancel()
        stats = ex.stats()[(mx.cpu(0), 0)]
        assert (stats.submitted, stats.cancelled, stats.in_queue) == (3, 1, 1)
    finally:
        release.set()
    ex.shutdown(wait=True)
    stats = ex.stats()[(mx.cpu(0), 0)]
    assert (stats.submitted, stats.completed, stats.cancelled, stats.in_queue) == (3, 2, 1, 0)


def test_every_snapshot_is_consistent_under_concurrent_submission():
    ex = warmed_up(CONTEXTS[2], serial_init=False)
    stop = threading.Event()

    def submit_many():
        while not stop.is_set():
            ex.map(int, range(50))

    submitters = [threading.Thread(target=submit_many) for _ in range(2)]
    for thread in submitters:
        thread.start()
    bad = []
    try:
        for _ in range(3000):
            for worker in ex.stats().values():
                if worker.in_queue < 0 or worker.completed + worker.failed + worker.cancelled > worker.submitted:
                    bad.append(worker)
    finally:
        stop.set()
        for thread in submitters:
            thread.join(TIMEOUT)
        ex.shutdown(wait=True)
    assert not bad


# --- 8. a cancelled future reaches wait() and as_completed() at once -------------


def test_cancel_while_the_worker_is_busy_wakes_waiters_at_once():
    ex = warmed_up([mx.cpu(0)])
    release = threading.Event()
    try:
        ex.submit(lambda: release.wait(TIMEOUT))
        queued = ex.submit(int)
        waiter = concurrent.futures.ThreadPoolExecutor(1)
        waited = waiter.submit(concurrent.futures.wait, [queued], TIMEOUT)
        completed = waiter.submit(lambda: list(concurrent.futures.as_completed([queued], TIMEOUT)))
        assert queued.cancel()
        done, not_done = waited.result(TIMEOUT)
        assert done == {queued} and not not_done
        assert completed.result(TIMEOUT) == [queued]
        assert not release.is_set()  # the worker is still busy
        waiter.shutdown()
    finally:
        release.set()
    ex.shutdown(wait=True)
