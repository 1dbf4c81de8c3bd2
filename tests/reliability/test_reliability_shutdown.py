"""Shutdown races: nothing accepted is lost, nothing hangs.

test_executor.py has the basic shutdown contract (idempotent, from a task,
cancel_futures, ``with``); here are the races around it: submit against
shutdown from several threads (and with the window forced open), shutdown
from two threads at once, from a done-callback, from another executor's
task, from the atexit path, and ``with`` blocks left by an exception.
"""

import concurrent.futures
import subprocess
import sys
import textwrap
import threading

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec import _routing

from helpers import CPU2, TIMEOUT, left_their_executor


def workers_of(ex):
    return [slot.thread for slot in ex._slots]


def parked_executor(contexts=CPU2):
    """An executor without gate, and an Event that parks tasks until set."""
    return pe.ContextExecutor(contexts, serial_init=False), threading.Event()


# --- cancelled futures stay visible to wait() and as_completed() -------------


def test_a_future_cancelled_while_queued_is_done_for_wait_after_shutdown_cancels():
    # Regression: shutdown(cancel_futures=True) drained a future the user had
    # already cancelled without notifying its waiters, so it stayed in state
    # CANCELLED: done() said True, but wait() and as_completed() never saw it.
    ex, release = parked_executor([mx.cpu(0)])
    started = threading.Event()
    try:
        running = ex.submit(lambda: started.set() or release.wait(TIMEOUT))
        assert started.wait(TIMEOUT)
        cancelled_by_user = ex.submit(int)
        still_queued = ex.submit(int)
        assert cancelled_by_user.cancel()
        ex.shutdown(wait=False, cancel_futures=True)
        futures = [cancelled_by_user, still_queued]
        done, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT)
        assert not not_done and all(f.cancelled() for f in done)
        assert set(concurrent.futures.as_completed(futures, timeout=TIMEOUT)) == set(futures)
    finally:
        release.set()
        ex.shutdown(wait=True)
    assert running.result(TIMEOUT) is True


# --- submit racing shutdown -------------------------------------------------


@pytest.mark.parametrize("cancel_futures", [False, True])
def test_submit_racing_shutdown_from_several_threads_loses_nothing(cancel_futures):
    for round_ in range(5):  # several rounds: different interleavings
        _race_submits_against_shutdown(round_, cancel_futures, num_submitters=4)


def _race_submits_against_shutdown(round_, cancel_futures, num_submitters):
    ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1), mx.cpu(1)])
    workers = workers_of(ex)
    everyone_submitted = threading.Barrier(num_submitters + 1, timeout=TIMEOUT)
    accepted = [[] for _ in range(num_submitters)]  # (value, future)
    refusals = [None] * num_submitters

    def submit_until_refused(k):
        value = k * 1_000_000
        try:
            while True:
                data = mx.nd.ones((1,), ctx=CPU2[value % 2]) if value % 3 == 0 else value
                accepted[k].append((value, ex.submit(lambda v, d: v, value, data)))
                value += 1
                if len(accepted[k]) == 20:
                    everyone_submitted.wait()
        except RuntimeError as exc:
            refusals[k] = exc

    threads = [threading.Thread(target=submit_until_refused, args=(k,)) for k in range(num_submitters)]
    for thread in threads:
        thread.start()
    everyone_submitted.wait()
    ex.shutdown(wait=True, cancel_futures=cancel_futures)
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads) and left_their_executor(workers)
    assert all("shutdown" in str(exc) for exc in refusals), refusals
    futures = [f for per_thread in accepted for _, f in per_thread]
    # shutdown(wait=True) returned: every accepted task had already run
    # or been cancelled; none was queued behind a worker's exit.
    _, not_done = concurrent.futures.wait(futures, timeout=0)
    assert not not_done, f"round {round_}: {len(not_done)} accepted futures never completed"
    for value, future in (pair for per_thread in accepted for pair in per_thread):
        if cancel_futures and future.cancelled():
            continue
        assert future.result(0) == value
    if not cancel_futures:
        assert not any(f.cancelled() for f in futures)


class ContendedLock:
    """A lock that reports when a second thread has to wait for it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc_info):
        self._lock.release()


class PausingQueue:
    """Wraps a worker's queue: the first work item put pauses until released."""

    def __init__(self, inner, on_put, release):
        self._inner = inner
        self._on_put = on_put
        self._release = release

    def put(self, item):
        if item is not None and not self._on_put.is_set():
            self._on_put.set()
            assert self._release.wait(TIMEOUT)
        self._inner.put(item)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_shutdown_arriving_while_submit_enqueues_still_runs_that_task():
    # Forces the window: submit holds the executor's lock and is putting its
    # item on the queue when shutdown arrives. The item must land before the
    # worker's exit sentinel, so it runs and shutdown(wait=True) waits for it.
    ex = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
    lock = ContendedLock()
    ex._crew.lock = lock  # white-box: to see shutdown waiting on it
    in_put = threading.Event()
    ex._slots[0].queue = PausingQueue(ex._slots[0].queue, in_put, lock.contended)
    results = []
    submitter = threading.Thread(target=lambda: results.append(ex.submit(lambda: "ran")))
    submitter.start()
    try:
        assert in_put.wait(TIMEOUT)
        shutter = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
        shutter.start()  # blocks on the lock until the item is queued
        shutter.join(TIMEOUT)
        submitter.join(TIMEOUT)
        assert not shutter.is_alive() and not submitter.is_alive()
        assert results[0].done()  # shutdown(wait=True) waited for it
        assert results[0].result(0) == "ran"
    finally:
        lock.contended.set()
        ex.shutdown(wait=True)


def test_submit_overtaken_by_shutdown_before_it_enqueues_raises(monkeypatch):
    # Forces the other order: shutdown completes while submit is still
    # routing, before it takes the lock. submit must refuse, not queue a task
    # behind the exit sentinel where it would never run.
    in_routing, shut_down = threading.Event(), threading.Event()
    real_find = _routing.find_first_ndarray

    def slow_find(args, kwargs):
        if threading.current_thread().name == "late submitter":
            in_routing.set()
            assert shut_down.wait(TIMEOUT)
        return real_find(args, kwargs)

    monkeypatch.setattr(_routing, "find_first_ndarray", slow_find)
    ex = pe.ContextExecutor(CPU2)
    outcome = []

    def late_submit():
        try:
            outcome.append(ex.submit(int))
        except RuntimeError as exc:
            outcome.append(exc)

    submitter = threading.Thread(target=late_submit, name="late submitter")
    submitter.start()
    try:
        assert in_routing.wait(TIMEOUT)
        ex.shutdown(wait=True)
        shut_down.set()
        submitter.join(TIMEOUT)
        assert isinstance(outcome[0], RuntimeError) and "shutdown" in str(outcome[0])
    finally:
        shut_down.set()
        ex.shutdown(wait=True)


# --- shutdown from several places -----------------------------------------------


def test_shutdown_from_two_threads_at_once_both_wait_for_the_running_task():
    ex, release = parked_executor([mx.cpu(0)])
    started = threading.Event()
    future = ex.submit(lambda: started.set() or release.wait(TIMEOUT))
    assert started.wait(TIMEOUT)
    queued = ex.submit(lambda: "queued")
    # White-box: the task is released only once both shutdown calls are
    # waiting for the worker, so neither can return before it finishes.
    joining = []
    joining_lock = threading.Lock()

    class SeenCondition(threading.Condition):
        def wait_for(self, predicate, timeout=None):
            with joining_lock:
                joining.append(threading.current_thread().name)
                if len(joining) == 2:
                    release.set()
            return super().wait_for(predicate, timeout)

    ex._slots[0].changed = SeenCondition(threading.Lock())  # what shutdown's waiters wait on
    done_when_returned = []

    def shut_down():
        ex.shutdown(wait=True)
        done_when_returned.append((future.done(), queued.done()))

    threads = [threading.Thread(target=shut_down) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    finally:
        release.set()
    assert len(joining) == 2
    assert done_when_returned == [(True, True), (True, True)]
    assert queued.result(0) == "queued"


def test_shutdown_with_cancel_from_a_task_cancels_queued_work_everywhere():
    ex, release = parked_executor()
    other_started = threading.Event()
    other = ex.submit_to(mx.cpu(1), lambda: other_started.set() or release.wait(TIMEOUT))
    assert other_started.wait(TIMEOUT)
    queued_behind_other = [ex.submit_to(mx.cpu(1), int) for _ in range(3)]
    all_queued = threading.Event()

    def shut_down_from_task():
        assert all_queued.wait(TIMEOUT)
        # Waits for the other worker, not for itself; the other worker's
        # running task is released by a done-callback of its cancelled work.
        ex.shutdown(wait=True, cancel_futures=True)
        return "shut down"

    queued_behind_other[-1].add_done_callback(lambda _: release.set())
    task = ex.submit_to(mx.cpu(0), shut_down_from_task)
    queued_behind_task = [ex.submit_to(mx.cpu(0), int) for _ in range(3)]
    all_queued.set()
    try:
        assert task.result(TIMEOUT) == "shut down"
    finally:
        release.set()
    assert other.result(TIMEOUT) is True
    leftovers = queued_behind_other + queued_behind_task
    _, not_done = concurrent.futures.wait(leftovers, timeout=TIMEOUT)
    assert not not_done
    assert all(f.cancelled() for f in leftovers)
    ex.shutdown(wait=True)


def test_shutdown_from_a_done_callback_in_a_worker():
    ex = pe.ContextExecutor(CPU2)
    returned = threading.Event()
    future = ex.submit_to(mx.cpu(1), int)
    # The callback runs in cpu(1)'s worker (or here, if already done): it
    # must not wait for the thread it runs on.
    future.add_done_callback(lambda _: ex.shutdown(wait=True) or returned.set())
    assert returned.wait(TIMEOUT)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(int)
    ex.shutdown(wait=True)


def test_shutdown_from_another_executors_task_waits_for_its_work():
    ex_a, release = parked_executor()
    started = threading.Event()
    running = ex_a.submit_to(mx.cpu(0), lambda: started.set() or release.wait(TIMEOUT))
    assert started.wait(TIMEOUT)
    queued = [ex_a.submit(lambda i=i: i * 2) for i in range(4)]

    def shut_down_a():
        release.set()
        ex_a.shutdown(wait=True)
        return running.done() and all(f.done() for f in queued)

    with pe.ContextExecutor(CPU2) as ex_b:
        assert ex_b.submit(shut_down_a).result(TIMEOUT) is True
    assert [f.result(0) for f in queued] == [0, 2, 4, 6]
    with pytest.raises(RuntimeError, match="shutdown"):
        ex_a.submit(int)


# --- with blocks left by an exception -----------------------------------------


class CustomBaseException(BaseException):
    pass


@pytest.mark.parametrize(
    "exc", [ValueError("body failed"), KeyboardInterrupt(), SystemExit(2), CustomBaseException()],
    ids=lambda e: type(e).__name__,
)
def test_with_block_left_by_an_exception_runs_what_was_submitted(exc):
    release = threading.Event()
    with pytest.raises(type(exc)) as info:
        with pe.ContextExecutor(CPU2, serial_init=False) as ex:
            workers = workers_of(ex)
            parked = ex.submit_to(mx.cpu(0), lambda: release.wait(TIMEOUT) and "parked")
            queued = [ex.submit_to(c, lambda i=i: (mx.nd.ones((2,)) * i).sum().asscalar()) for i, c in
                      enumerate(CPU2 * 2)]
            release.set()  # the task may still be running when the block is left
            raise exc
    assert info.value is exc  # the block's exception, unchanged
    # __exit__ waited: everything submitted had run when it returned.
    assert parked.done() and all(f.done() for f in queued)
    assert parked.result(0) == "parked"
    assert [f.result(0) for f in queued] == [0.0, 2.0, 4.0, 6.0]
    assert left_their_executor(workers)
    with pytest.raises(RuntimeError):
        ex.submit(int)


def test_with_block_left_by_an_exception_while_iterating_map():
    seen = []
    with pytest.raises(ZeroDivisionError):
        with pe.ContextExecutor(CPU2) as ex:
            workers = workers_of(ex)
            for value in ex.map(lambda x: 12 // x, [1, 2, 0, 3, 4], timeout=TIMEOUT):
                seen.append(value)
    assert seen == [12, 6]
    assert left_their_executor(workers)


# --- the atexit path ------------------------------------------------------------


def test_shutdown_from_the_atexit_path_does_not_hang():
    script = textwrap.dedent(
        """
        import atexit
        import sys
        import threading

        def say(line):  # one write: lines from several threads never interleave
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

        def after_parallel_exec_hook():
            # Registered before parallel_exec: runs after its exit hook.
            A.shutdown(wait=True)
            A.shutdown(wait=True, cancel_futures=True)
            say("shutdown again after the exit hook returned")

        atexit.register(after_parallel_exec_hook)

        import mxnet as mx
        import parallel_exec as pe

        exiting = threading.Event()
        A = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)], serial_init=False)
        B = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
        started = threading.Event()

        def shut_down_self_at_exit():
            started.set()
            assert exiting.wait(30)  # still running when the interpreter starts exiting
            A.shutdown(wait=True)
            say("a task shut its own executor down")

        def shut_down_a_from_b():
            A.shutdown(wait=True)
            say("B's task shut A down")

        def before_parallel_exec_hook():
            # Registered after parallel_exec: runs before its exit hook.
            A.shutdown(wait=True, cancel_futures=True)
            say("user hook shut A down")

        A.submit_to(mx.cpu(0), shut_down_self_at_exit)
        assert started.wait(30)
        A.submit_to(mx.cpu(1), say, "queued on A")
        B.submit(shut_down_a_from_b)
        atexit.register(before_parallel_exec_hook)
        atexit.register(exiting.set)  # registered last: the first hook to run
        say("main thread ends")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "shutdown again after the exit hook returned"
    # "queued on A" may run before the main thread ends, or later; the rest
    # happens during exit.
    assert [line for line in lines if line != "queued on A"][0] == "main thread ends"
    assert set(lines[:-1]) - {"queued on A"} == {
        "main thread ends", "a task shut its own executor down", "B's task shut A down", "user hook shut A down"
    }
