"""Worker threads outlive executors: the pool of idle pinned threads (``_pool``).

A later executor on a context runs on the thread an earlier one left idle;
everything per executor (initializer, names, gate, statistics, MXNet's
per-thread state) stays per executor on the reused thread; live executors
never share a thread; nothing keeps an ended thread or a closed executor
alive.
"""

import gc
import threading
import weakref

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec import _pool

from helpers import CPU2, TIMEOUT, wait_until_workers_end


def ident_and_name():
    return threading.get_ident(), threading.current_thread().name


def idents(ex):
    """The thread ident of each worker of ``ex``, in the order of its contexts."""
    return [ex.submit_to(c, threading.get_ident).result(TIMEOUT) for c in ex.contexts]


def test_a_later_executor_on_a_context_runs_on_the_thread_an_earlier_one_left_idle():
    with pe.ContextExecutor(CPU2) as first:
        before = idents(first)
    assert _pool.idle_count() == 2
    threads = threading.active_count()
    with pe.ContextExecutor(list(reversed(CPU2))) as second:
        assert threading.active_count() == threads  # no thread started
        assert idents(second) == list(reversed(before))  # each context's own thread
    assert _pool.idle_count() == 2


def test_shutdown_hands_the_workers_back_idle_and_release_ends_them():
    before = set(threading.enumerate())
    ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1), mx.cpu(1)])
    workers = set(threading.enumerate()) - before
    assert len(workers) == 3
    ex.submit(int).result(TIMEOUT)
    ex.shutdown(wait=True)
    # Back in the pool by the time shutdown returns, named as idle.
    assert _pool.idle_count() == 3
    assert sorted(t.name for t in workers) == [
        "parallel_exec-idle[cpu(0)]", "parallel_exec-idle[cpu(1)]", "parallel_exec-idle[cpu(1)]",
    ]
    assert pe.release_idle_threads() == 3
    assert not [t for t in workers if t.is_alive()]
    assert pe.release_idle_threads() == 0


def test_idle_threads_never_outnumber_the_most_that_served_a_context_at_once():
    with pe.ContextExecutor([mx.cpu(0)]) as a, pe.ContextExecutor([mx.cpu(0)]) as b:
        peak = set(idents(a) + idents(b))
    assert len(peak) == 2
    for _ in range(20):
        with pe.ContextExecutor([mx.cpu(0)]) as ex:
            assert set(idents(ex)) <= peak
    assert _pool.idle_count() == 2


def test_live_crews_on_one_context_never_share_a_thread_and_may_wait_on_each_other():
    with pe.ContextExecutor([mx.cpu(0)]) as warm:
        idents(warm)  # leaves one idle thread: the first executor below takes it
    with pe.ContextExecutor([mx.cpu(0)]) as a, pe.ContextExecutor([mx.cpu(0)]) as b:
        release = threading.Event()
        inner = b.submit(lambda: release.wait(TIMEOUT) and threading.get_ident())
        outer = a.submit(lambda: (threading.get_ident(), inner.result(TIMEOUT)))
        release.set()
        a_ident, b_ident = outer.result(TIMEOUT)
        assert a_ident != b_ident


def test_initializer_names_gate_and_stats_are_per_executor_on_a_reused_thread():
    calls = []
    with pe.ContextExecutor([mx.cpu(0)], initializer=lambda: calls.append(ident_and_name())) as first:
        for _ in range(5):
            first.submit(int).result(TIMEOUT)
    with pe.ContextExecutor([mx.cpu(0)], thread_name_prefix="second",
                            initializer=lambda: calls.append(ident_and_name())) as second:
        # The gate holds a task of this executor's first round, though the
        # thread ran tasks for the first executor already.
        inside, release = threading.Event(), threading.Event()
        first_task = second.submit(lambda: inside.set() or release.wait(TIMEOUT))
        assert inside.wait(TIMEOUT)
        assert second._slots[0].in_gate  # counted by the gate: a first task, run alone
        release.set()
        assert first_task.result(TIMEOUT) is True
        stats = second.stats()[(mx.cpu(0), 0)]
        name = second.submit(lambda: threading.current_thread().name).result(TIMEOUT)
    assert [ident for ident, _ in calls] == [calls[0][0]] * 2  # once per executor, one thread
    assert calls[1][1] == name == "second_0[cpu(0)]"
    assert stats.completed == 1  # not the first executor's five


def test_nothing_a_task_left_in_its_thread_reaches_the_next_executor():
    def leave_state_behind():
        mx.gpu(3).__enter__()  # a `with ctx:` never left
        mx.autograd.set_recording(True)  # flags never reset
        mx.autograd.set_training(True)
        return mx.gluon.nn.Dense(2).prefix, threading.get_ident()

    def look():
        return (mx.current_context(), pe.current_context(), mx.autograd.is_recording(),
                mx.autograd.is_training(), mx.gluon.nn.Dense(2).prefix, threading.get_ident())

    with pe.ContextExecutor([mx.cpu(1)]) as first:
        prefix, ident = first.submit(leave_state_behind).result(TIMEOUT)
        first.submit(mx.gluon.nn.Dense, 2).result(TIMEOUT)  # the name counter moves on: dense1
    with pe.ContextExecutor([mx.cpu(1)]) as second:
        seen = second.submit(look).result(TIMEOUT)
        # Between tasks too: a done-callback runs on the worker's thread.
        between = []
        release = threading.Event()
        blocker = second.submit(release.wait, TIMEOUT)
        blocker.add_done_callback(lambda _: between.append(mx.current_context()))
        release.set()
        blocker.result(TIMEOUT)
    assert seen == (mx.cpu(1), mx.cpu(1), False, False, prefix, ident)
    assert prefix == "dense0_"  # a fresh thread's names, not dense2_
    assert between == [mx.cpu(1)]


def test_an_initializer_that_raises_on_a_reused_thread_breaks_its_executor_only():
    with pe.ContextExecutor([mx.cpu(0)]) as ex:
        [ident] = idents(ex)

    def fail():
        raise ValueError("no")

    broken = pe.ContextExecutor([mx.cpu(0)], initializer=fail)
    with pytest.raises(pe.BrokenContextExecutor):
        broken.submit(int).result(TIMEOUT)
    broken.shutdown(wait=True)
    with pe.ContextExecutor([mx.cpu(0)]) as after:
        assert idents(after) == [ident]  # the thread went back to the pool


def test_neither_the_pool_nor_the_registry_keeps_an_ended_thread_or_a_closed_executor():
    ex = pe.ContextExecutor(CPU2)
    idents(ex)
    threads = [weakref.ref(t) for t in threading.enumerate() if t.name.startswith("ContextExecutor")]
    executor, crew = weakref.ref(ex), weakref.ref(ex._crew)
    ex.shutdown(wait=True)
    del ex
    gc.collect()
    assert executor() is None and crew() is None  # _lifecycle's registry is weak
    assert pe.release_idle_threads() == 2
    gc.collect()
    assert [t() for t in threads] == [None, None]  # nothing holds an ended thread
    assert _pool.idle_count() == 0


def test_a_collected_executor_hands_its_threads_back_after_its_queue():
    release = threading.Event()
    ex = pe.ContextExecutor([mx.cpu(0)])
    queued = [ex.submit(release.wait, TIMEOUT), ex.submit(lambda: "last")]
    [worker] = [t for t in threading.enumerate() if t.name.startswith("ContextExecutor")]
    slots = ex._slots  # they hold no reference to the executor
    del ex
    gc.collect()
    release.set()
    assert queued[1].result(TIMEOUT) == "last"  # the queue ran to its end
    assert wait_until_workers_end(slots)  # and the thread is idle
    with pe.ContextExecutor([mx.cpu(0)]) as later:
        assert idents(later) == [worker.ident]


def test_executors_opened_and_closed_from_several_threads_at_once_never_share_a_thread():
    owners = {}  # thread ident -> the live executor's number that holds it
    lock = threading.Lock()
    shared, errors = [], []
    start = threading.Barrier(4, timeout=TIMEOUT)

    def churn(k):
        try:
            open_and_close_executors(k)
        except BaseException as exc:  # reported by the test, not lost with the thread
            errors.append(exc)

    def open_and_close_executors(k):
        start.wait()
        for i in range(25):
            with pe.ContextExecutor(CPU2) as ex:
                # Its threads as handed out, before any task could queue behind another executor's.
                mine = [slot.thread.ident for slot in ex._slots]
                with lock:
                    shared.extend(ident for ident in mine if ident in owners)
                    owners.update({ident: (k, i) for ident in mine})
                assert idents(ex) == mine
                assert ex.submit(lambda: (mx.nd.ones((2,)) * 2).sum().asscalar()).result(TIMEOUT) == 4.0
                with lock:  # before shutdown hands the threads back
                    for ident in mine:
                        del owners[ident]

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [] and shared == []
    assert _pool.idle_count() <= 8  # at most 4 executors x 2 contexts were alive at once
