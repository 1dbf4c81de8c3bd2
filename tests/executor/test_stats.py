"""Per-worker statistics (ContextExecutor.stats) add up exactly."""

import threading
import time

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec import _crew
from parallel_exec._gate import SerialInitGate

from helpers import CPU2, TIMEOUT


def _ok():
    return 1


def _fail():
    raise ValueError("planned")


def test_counts_add_up_per_worker():
    with pe.ContextExecutor(CPU2) as ex:
        release = threading.Event()
        blocker = ex.submit_to(mx.cpu(0), release.wait, TIMEOUT)
        queued = [ex.submit_to(mx.cpu(0), _ok) for _ in range(3)]  # behind the blocker
        assert queued[0].cancel() and queued[1].cancel()
        release.set()
        assert blocker.result(TIMEOUT) is True
        assert queued[2].result(TIMEOUT) == 1  # the worker has passed the cancelled two
        oks = [ex.submit_to(mx.cpu(1), _ok) for _ in range(4)]
        fails = [ex.submit_to(mx.cpu(1), _fail) for _ in range(2)]
        for future in oks + fails:
            future.exception(TIMEOUT)
        stats = ex.stats()
    first, second = stats[(mx.cpu(0), 0)], stats[(mx.cpu(1), 1)]
    assert (first.submitted, first.completed, first.failed, first.cancelled, first.in_queue) == (4, 2, 0, 2, 0)
    assert (second.submitted, second.completed, second.failed, second.cancelled, second.in_queue) == (6, 4, 2, 0, 0)
    assert list(stats) == [(mx.cpu(0), 0), (mx.cpu(1), 1)] and len(stats) == 2


def test_times_are_consistent_with_a_task_that_blocks():
    with pe.ContextExecutor([mx.cpu(0)], serial_init=False) as ex:
        release = threading.Event()
        started = threading.Event()

        def blocking():
            started.set()
            release.wait(TIMEOUT)

        running = ex.submit(blocking)
        waiting = ex.submit(_ok)  # queued for as long as `blocking` runs
        assert started.wait(TIMEOUT)
        during = ex.stats()[(mx.cpu(0), 0)]
        assert during.in_queue == 2 and during.completed == 0
        time.sleep(0.05)  # a lower bound for the times below, not an ordering device
        release.set()
        running.result(TIMEOUT)
        waiting.result(TIMEOUT)
        after = ex.stats()[(mx.cpu(0), 0)]
    assert after.completed == 2 and after.in_queue == 0
    assert after.running_seconds >= 0.05 and after.queued_seconds >= 0.05
    assert after.gate_seconds == 0.0  # serial_init=False: no gate
    assert 0.0 <= after.running_p50 <= after.running_p95 <= after.running_seconds
    assert 0.0 <= after.queued_p50 <= after.queued_p95 <= after.queued_seconds


def gate_waits_signalled(monkeypatch):
    """Patch the executor's gate so that an Event is set once a task blocks at it."""
    blocked = threading.Event()

    class SignallingGate(SerialInitGate):
        def enter(self, first, on_wait=None):
            def signal(waiting):
                if on_wait is not None:
                    on_wait(waiting)
                if waiting:
                    blocked.set()

            return super().enter(first, signal)

    monkeypatch.setattr(_crew, "SerialInitGate", SignallingGate)
    return blocked


def test_gate_time_is_counted_for_tasks_held_by_a_first_task(monkeypatch):
    blocked = gate_waits_signalled(monkeypatch)
    with pe.ContextExecutor(CPU2) as ex:
        inside = threading.Event()
        release = threading.Event()

        def first_on_cpu0():
            inside.set()
            release.wait(TIMEOUT)

        a = ex.submit_to(mx.cpu(0), first_on_cpu0)
        assert inside.wait(TIMEOUT)
        b = ex.submit_to(mx.cpu(1), _ok)  # cpu(1)'s first task waits at the gate
        assert blocked.wait(TIMEOUT)
        assert not b.running()  # held at the gate: not started
        time.sleep(0.03)  # the gate time below is at least this, less a moment
        release.set()
        a.result(TIMEOUT)
        b.result(TIMEOUT)
        stats = ex.stats()
    assert stats[(mx.cpu(1), 1)].gate_seconds >= 0.02


def test_shutdown_cancellations_and_table():
    ex = pe.ContextExecutor([mx.cpu(0)])
    started, release = threading.Event(), threading.Event()

    def blocking():
        started.set()
        return release.wait(TIMEOUT)

    try:
        blocker = ex.submit(blocking)
        assert started.wait(TIMEOUT)
        for _ in range(3):
            ex.submit(_ok)
        ex.shutdown(wait=False, cancel_futures=True)
    finally:
        release.set()
    blocker.result(TIMEOUT)
    ex.shutdown(wait=True)
    stats = ex.stats()
    only = stats[(mx.cpu(0), 0)]
    assert (only.submitted, only.completed, only.cancelled, only.in_queue) == (4, 1, 3, 0)
    table = str(stats).splitlines()
    assert table[0].split()[:3] == ["worker", "submitted", "ok"]
    assert table[1].split()[:3] == ["0:cpu(0)", "4", "1"]
    with pytest.raises(AttributeError):
        only.completed = 5  # snapshots are immutable
