"""MapFuture, the future of a ``map`` call: a ``Future``'s states on two plain locks.

Nobody but ``map``'s iterator sees one, so these tests check the states the
worker, shutdown, the fork hook and the iterator rely on, then ``map``
through an executor where a MapFuture is cancelled.
"""

import concurrent.futures
import threading
import traceback

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec._future import MapFuture

from helpers import TIMEOUT


class Counted:
    def __init__(self):
        self.cancelled = 0

    def count_cancelled(self):
        self.cancelled += 1


def test_a_result_set_is_read_by_every_reader():
    future = MapFuture()
    assert future.set_running_or_notify_cancel()
    future.set_result(7)
    assert future.result() == 7
    assert future.result(timeout=0) == 7  # done stays done


def test_an_exception_set_is_raised_with_its_traceback_each_time():
    future = MapFuture()
    future.set_running_or_notify_cancel()
    try:
        raise ValueError("shard 3")
    except ValueError as exc:
        future.set_exception(exc)
    for _ in range(2):
        with pytest.raises(ValueError, match="shard 3") as info:
            future.result()
        assert "raise ValueError" in "".join(traceback.format_tb(info.value.__traceback__))


def test_result_times_out_while_pending_then_returns_once_set():
    future = MapFuture()
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=-1)  # a deadline already past, as map computes it
    future.set_running_or_notify_cancel()
    future.set_result("late")
    assert future.result(timeout=0) == "late"


def test_a_waiting_reader_is_woken_by_the_result():
    future = MapFuture()
    got = []
    reader = threading.Thread(target=lambda: got.append(future.result(TIMEOUT)))
    reader.start()
    future.set_running_or_notify_cancel()
    future.set_result(1)
    reader.join(TIMEOUT)
    assert got == [1]


def test_cancel_before_start_wins_once_and_is_counted_once():
    future = MapFuture()
    future.counters = counted = Counted()
    assert future.cancel()
    assert future.cancel()  # still cancelled, not counted again
    assert future.cancelled()
    assert not future.set_running_or_notify_cancel()  # the worker skips it
    assert counted.cancelled == 1
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)


def test_cancel_after_start_fails_and_the_call_completes():
    future = MapFuture()
    future.counters = counted = Counted()
    assert future.set_running_or_notify_cancel()
    assert not future.cancel()
    future.set_result(5)
    assert not future.cancel()  # after the result too: what map's iterator does
    assert future.result() == 5
    assert counted.cancelled == 0


def test_start_and_cancel_racing_have_exactly_one_winner():
    rounds = 300
    futures = [MapFuture() for _ in range(rounds)]
    started = [False] * rounds
    cancelled = [False] * rounds
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    def starter():
        for i, future in enumerate(futures):
            barrier.wait()
            started[i] = future.set_running_or_notify_cancel()

    def canceller():
        for i, future in enumerate(futures):
            barrier.wait()
            cancelled[i] = future.cancel()

    threads = [threading.Thread(target=starter), threading.Thread(target=canceller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(s != c for s, c in zip(started, cancelled))


def test_a_forked_child_fails_only_what_was_not_done():
    pending, running, finished, cancelled = MapFuture(), MapFuture(), MapFuture(), MapFuture()
    running.set_running_or_notify_cancel()
    finished.set_running_or_notify_cancel()
    finished.set_result("kept")
    cancelled.cancel()
    for future in (pending, running, finished, cancelled):
        future.fail_in_forked_child(RuntimeError("forked"))
    for future in (pending, running):
        with pytest.raises(RuntimeError, match="forked"):
            future.result(timeout=0)
    assert finished.result(timeout=0) == "kept"
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result(timeout=0)


def test_map_calls_queued_at_shutdown_with_cancel_futures_are_cancelled_and_counted():
    ex = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
    started, release = threading.Event(), threading.Event()

    def task(i):
        if i == 0:
            started.set()
            release.wait(TIMEOUT)
        return i

    try:
        results = ex.map(task, range(4))
        assert started.wait(TIMEOUT)
        ex.shutdown(wait=False, cancel_futures=True)
        release.set()
        assert next(results) == 0  # it was running: it completes
        with pytest.raises(concurrent.futures.CancelledError):
            next(results)
    finally:
        release.set()
        ex.shutdown(wait=True)
    (stats,) = ex.stats().values()
    assert (stats.completed, stats.cancelled) == (1, 3)
