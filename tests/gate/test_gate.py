"""The serial-init gate: each worker's first task runs alone.

The executor tests observe two things:

- a lock-protected count of running tasks (``RunningTasks``), whose maximum
  while any first task runs must be 1;
- when a task reaches the gate (``GateArrivals``, a gate subclass patched
  into the executor). A task waits until the other worker's task is at the
  gate, so the two would overlap if the gate let them; then it waits on a
  Barrier. With the gate the barrier can only time out, so it gets a short
  timeout (``SHORT``): a slow machine can make this miss a broken gate, but
  never fail a correct one. Where tasks must overlap, the barrier gets
  ``TIMEOUT`` and is hit only on deadlock.
"""

import collections
import contextlib
import threading

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec import _crew
from parallel_exec._gate import SerialInitGate

from helpers import CPU2, TIMEOUT

# Bounded wait for something that must NOT happen (another task starting
# while a first task runs). Only ever spent in full when the gate works.
SHORT = 0.3


class RunningTasks:
    """Counts running tasks; remembers the most that ran while a first task did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards every counter below
        self._running = 0
        self._first_running = 0
        self.max_while_first = 0

    @contextlib.contextmanager
    def task(self, first: bool):
        with self._lock:
            self._running += 1
            self._first_running += first
            if self._first_running:
                self.max_while_first = max(self.max_while_first, self._running)
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._first_running -= first


class GateArrivals:
    """How many tasks of each worker (by context) have reached the gate."""

    def __init__(self) -> None:
        self._cond = threading.Condition()  # guards _counts
        self._counts = collections.Counter()

    def record(self, context) -> None:
        with self._cond:
            self._counts[context] += 1
            self._cond.notify_all()

    def wait_for(self, context, count: int) -> None:
        """Block until ``count`` tasks of ``context``'s worker reached the gate."""
        with self._cond:
            assert self._cond.wait_for(lambda: self._counts[context] >= count, TIMEOUT)


@pytest.fixture
def arrivals(monkeypatch):
    """Record each task's arrival at the gate of executors made in the test."""
    log = GateArrivals()

    class RecordingGate(SerialInitGate):
        def enter(self, first, on_wait=None):
            log.record(pe.current_context())
            return super().enter(first, on_wait)

    monkeypatch.setattr(_crew, "SerialInitGate", RecordingGate)
    return log


def met_at(barrier: threading.Barrier) -> bool:
    """Wait on ``barrier``; return whether the other party came."""
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        return False
    return True


def contend(ex, arrivals, tracker, first, second, arrivals_before):
    """Run one task on each of two workers, each waiting for the other.

    Each task waits until the other worker's task is at the gate, then on a
    Barrier(2, timeout=SHORT). ``first`` is the worker that has not finished
    a first task; ``second`` is already open.

    Args:
        first, second: the two workers' contexts.
        arrivals_before: tasks of each context that reached the gate before.

    Returns:
        Whether each task met the other at the barrier.
    """
    barrier = threading.Barrier(2, timeout=SHORT)

    def task(is_first, other):
        with tracker.task(first=is_first):
            arrivals.wait_for(other, arrivals_before[other] + 1)
            return met_at(barrier)

    futures = [ex.submit_to(first, task, True, second), ex.submit_to(second, task, False, first)]
    return [f.result(TIMEOUT) for f in futures]


def noop():
    return None


# --- the gate inside the executor ---------------------------------------------


def test_first_tasks_never_overlap_any_task(arrivals):
    tracker = RunningTasks()
    barrier = threading.Barrier(2, timeout=SHORT)

    def first_task(other):
        with tracker.task(first=True):
            arrivals.wait_for(other, 1)  # the other first task is at the gate
            return met_at(barrier)

    def later_task():
        with tracker.task(first=False):
            pass

    with pe.ContextExecutor(CPU2) as ex:
        firsts = [ex.submit_to(CPU2[0], first_task, CPU2[1]), ex.submit_to(CPU2[1], first_task, CPU2[0])]
        laters = [ex.submit_to(c, later_task) for c in CPU2 for _ in range(3)]
        assert [f.result(TIMEOUT) for f in firsts] == [False, False]
        for f in laters:
            f.result(TIMEOUT)
    assert tracker.max_while_first == 1


def test_without_gate_first_tasks_overlap():
    # The measurement above would see an overlap: without the gate the same
    # two first tasks meet at a barrier.
    tracker = RunningTasks()
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def first_task():
        with tracker.task(first=True):
            return met_at(barrier)

    with pe.ContextExecutor(CPU2, serial_init=False) as ex:
        futures = [ex.submit_to(c, first_task) for c in CPU2]
        assert [f.result(TIMEOUT) for f in futures] == [True, True]
    assert tracker.max_while_first == 2


def test_serial_init_false_lets_a_first_task_wait_for_another():
    # With the gate this would deadlock (see the rule in docs/gate.md); without
    # it a first task may wait for another worker's first task.
    other_done = threading.Event()
    with pe.ContextExecutor(CPU2, serial_init=False) as ex:
        waiter = ex.submit_to(CPU2[0], other_done.wait, TIMEOUT)
        ex.submit_to(CPU2[1], other_done.set).result(TIMEOUT)
        assert waiter.result(TIMEOUT) is True


def test_later_tasks_overlap(executor):
    for context in CPU2:
        executor.submit_to(context, noop).result(TIMEOUT)
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    futures = [executor.submit_to(c, met_at, barrier) for c in CPU2]
    assert [f.result(TIMEOUT) for f in futures] == [True, True]


def test_failed_first_task_keeps_the_gate_closed(arrivals):
    tracker = RunningTasks()
    with pe.ContextExecutor(CPU2) as ex:
        ex.submit_to(CPU2[1], noop).result(TIMEOUT)  # cpu(1) is open
        failed = ex.submit_to(CPU2[0], int, "not a number")
        with pytest.raises(ValueError):
            failed.result(TIMEOUT)
        # cpu(0)'s next task is again a first task: it runs alone.
        met = contend(ex, arrivals, tracker, CPU2[0], CPU2[1], {CPU2[0]: 1, CPU2[1]: 1})
        assert met == [False, False]
        assert tracker.max_while_first == 1
        # It succeeded, so now both workers are open and overlap.
        barrier = threading.Barrier(2, timeout=TIMEOUT)
        futures = [ex.submit_to(c, met_at, barrier) for c in CPU2]
        assert [f.result(TIMEOUT) for f in futures] == [True, True]


def test_cancelled_task_is_not_a_first_task(arrivals):
    tracker = RunningTasks()
    release = threading.Event()

    def hold_cpu0_worker():
        # cpu(0)'s worker starts serving only once the test has queued and
        # cancelled a task on it.
        if pe.current_context() == CPU2[0]:
            assert release.wait(TIMEOUT)

    ran = []
    with pe.ContextExecutor(CPU2, initializer=hold_cpu0_worker) as ex:
        ex.submit_to(CPU2[1], noop).result(TIMEOUT)  # cpu(1) is open
        cancelled = ex.submit_to(CPU2[0], ran.append, "cancelled task")
        assert cancelled.cancel()
        release.set()
        # The cancelled task never ran, so the next one is cpu(0)'s first.
        met = contend(ex, arrivals, tracker, CPU2[0], CPU2[1], {CPU2[0]: 0, CPU2[1]: 1})
    assert met == [False, False]
    assert tracker.max_while_first == 1
    assert ran == []


def test_waiting_first_task_goes_before_later_tasks(arrivals):
    # Later tasks that reach the gate while a first task waits there do not
    # start before it, so a stream of them cannot starve it.
    contexts = [mx.cpu(0), mx.cpu(1), mx.cpu(2)]
    first_ctx, busy_ctx, other_ctx = contexts
    started = []  # list.append is atomic
    busy_started = threading.Event()
    release_busy = threading.Event()

    def busy():
        busy_started.set()
        assert release_busy.wait(TIMEOUT)

    with pe.ContextExecutor(contexts) as ex:
        for context in (busy_ctx, other_ctx):
            ex.submit_to(context, noop).result(TIMEOUT)
        busy_future = ex.submit_to(busy_ctx, busy)
        assert busy_started.wait(TIMEOUT)
        first = ex.submit_to(first_ctx, started.append, "first")
        arrivals.wait_for(first_ctx, 1)  # waits: a later task is running
        later = [ex.submit_to(other_ctx, started.append, f"later {i}") for i in range(3)]
        arrivals.wait_for(other_ctx, 2)  # the first of the stream is at the gate
        release_busy.set()
        for future in [busy_future, first, *later]:
            future.result(TIMEOUT)
    assert started == ["first", "later 0", "later 1", "later 2"]


# --- SerialInitGate on its own ----------------------------------------------


class GateUser:
    """A thread that enters the gate, signals, and leaves when told to."""

    def __init__(self, gate: SerialInitGate, first: bool, succeeded: bool = True) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._gate = gate
        self._first = first
        self._succeeded = succeeded
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        counted = self._gate.enter(self._first)
        self.entered.set()
        self.release.wait(TIMEOUT)
        self._gate.leave(self._first, counted, self._succeeded)

    def finish(self) -> None:
        """Let it leave the gate; wait for that."""
        self.release.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


@pytest.fixture
def gate_users():
    """Make GateUser threads; release any left inside at the end."""
    users = []

    def make(*args, **kwargs):
        users.append(GateUser(*args, **kwargs))
        return users[-1]

    yield make
    for user in users:
        user.finish()


def test_gate_first_task_excludes_every_other_task(gate_users):
    gate = SerialInitGate(3)
    first = gate_users(gate, first=True)
    assert first.entered.wait(TIMEOUT)
    other_first = gate_users(gate, first=True)
    later = gate_users(gate, first=False)
    assert not other_first.entered.wait(SHORT)
    assert not later.entered.wait(SHORT)
    first.finish()
    # A waiting first task goes before later tasks.
    assert other_first.entered.wait(TIMEOUT)
    assert not later.entered.wait(SHORT)
    other_first.finish()
    assert later.entered.wait(TIMEOUT)


def test_gate_first_task_waits_for_running_later_tasks(gate_users):
    gate = SerialInitGate(2)
    later_tasks = [gate_users(gate, first=False) for _ in range(2)]
    for later in later_tasks:  # later tasks run together
        assert later.entered.wait(TIMEOUT)
    first = gate_users(gate, first=True)
    newcomer = gate_users(gate, first=False)
    later_tasks[0].finish()
    assert not first.entered.wait(SHORT)
    later_tasks[1].finish()
    assert first.entered.wait(TIMEOUT)
    assert not newcomer.entered.wait(SHORT)
    first.finish()
    assert newcomer.entered.wait(TIMEOUT)


def test_gate_stays_closed_after_a_failed_first_task(gate_users):
    gate = SerialInitGate(2)
    failing = gate_users(gate, first=True, succeeded=False)
    assert failing.entered.wait(TIMEOUT)
    failing.finish()
    retry = gate_users(gate, first=True)
    assert retry.entered.wait(TIMEOUT)
    later = gate_users(gate, first=False)
    assert not later.entered.wait(SHORT)
    retry.finish()
    assert later.entered.wait(TIMEOUT)


def test_gate_opens_once_every_worker_succeeded():
    gate = SerialInitGate(2)
    for _ in range(2):
        counted = gate.enter(first=True)
        assert counted
        gate.leave(True, counted, succeeded=True)
    # Nothing left to keep apart: later tasks are not counted, and any
    # number of them enter from one thread without blocking.
    tokens = [gate.enter(first=False) for _ in range(3)]
    assert tokens == [False, False, False]
    for token in tokens:
        gate.leave(False, token, succeeded=True)
