"""ContextExecutor as an Executor: construction, pinning, submit_to, map,
shutdown, task exceptions, the initializer and MXNet's asynchronous errors.

Routing is in test_routing.py, autograd state in test_state.py, the
serial-init gate in test_gate.py. Tests that park a task on an Event use
``serial_init=False`` where the gate would otherwise keep the other worker's
first task waiting behind the parked one.
"""

import concurrent.futures
import re
import threading
import traceback

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import parallel_exec as pe

from helpers import CPU2, TIMEOUT


def where():
    """Inside a task: the worker's context as both APIs see it."""
    return pe.current_context(), mx.current_context()


# --- construction ---------------------------------------------------------------


@pytest.mark.parametrize(
    "contexts, error, words",
    [
        pytest.param([], ValueError, ["empty", "num_gpus"], id="empty-list"),
        pytest.param((), ValueError, ["empty"], id="empty-tuple"),
        pytest.param([mx.cpu(0), "gpu(1)"], TypeError, ["contexts[1]", "'gpu(1)'"], id="string-element"),
        pytest.param([mx.cpu(0), mx.cpu(1), None], TypeError, ["contexts[2]", "None"], id="none-element"),
        pytest.param(mx.cpu(1), TypeError, ["cpu(1)", "sequence"], id="single-context"),
        pytest.param("cpu(0)", TypeError, ["'cpu(0)'"], id="string"),
        pytest.param(None, TypeError, ["None"], id="none"),
        pytest.param(3, TypeError, ["3"], id="int"),
    ],
)
def test_bad_contexts_fail_with_a_message_naming_the_problem(contexts, error, words):
    with pytest.raises(error) as info:
        pe.ContextExecutor(contexts)
    for word in words:
        assert word in str(info.value)


def test_a_gpu_mxnet_cannot_see_is_refused_at_construction():
    # One past the last visible GPU (gpu(0) on a CPU-only build): without the
    # check it would fail only at the first task.
    missing = mx.gpu(mx.context.num_gpus())
    before = threading.active_count()
    with pytest.raises(ValueError) as info:
        pe.ContextExecutor([mx.cpu(0), missing])
    message = str(info.value)
    assert f"contexts[1] is {missing}" in message and "MXNet sees" in message and "mx.cpu(0)" in message
    assert threading.active_count() == before  # no worker started


def test_visible_gpus_are_accepted(monkeypatch):
    # Pretend MXNet sees two GPUs: gpu(0) and gpu(1) pass, gpu(2) does not.
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 2)
    ex = pe.ContextExecutor([mx.gpu(0), mx.gpu(1)])  # no task: nothing runs on them
    ex.shutdown(wait=True)
    with pytest.raises(ValueError, match=r"gpu\(2\), but MXNet sees only 2 GPU\(s\)"):
        pe.ContextExecutor([mx.gpu(2)])


@pytest.mark.parametrize("call", ["submit", "submit_to", "map", "map of nothing"])
def test_a_non_callable_fn_is_a_type_error_and_queues_nothing(executor, call):
    shard = mx.nd.zeros((1,), ctx=mx.cpu(0))
    calls = {
        "submit": lambda: executor.submit("not callable", shard),
        "submit_to": lambda: executor.submit_to(mx.cpu(0), "not callable", shard),
        "map": lambda: executor.map("not callable", [shard, shard]),
        "map of nothing": lambda: executor.map("not callable", []),
    }
    with pytest.raises(TypeError, match="fn must be callable, got 'not callable'"):
        calls[call]()
    assert sum(s.submitted for s in executor.stats().values()) == 0


def test_non_callable_initializer_is_a_type_error():
    with pytest.raises(TypeError, match="initializer.*'not callable'"):
        pe.ContextExecutor(CPU2, initializer="not callable")


def test_contexts_is_a_tuple_in_the_order_given():
    given = [mx.cpu(1), mx.cpu(0), mx.cpu(1)]
    with pe.ContextExecutor(given) as ex:
        given.append(mx.cpu(2))  # the executor keeps its own copy
        assert ex.contexts == (mx.cpu(1), mx.cpu(0), mx.cpu(1))
        assert type(ex.contexts) is tuple


def test_contexts_accepts_any_iterable_of_contexts():
    with pe.ContextExecutor(c for c in CPU2) as ex:
        assert ex.contexts == tuple(CPU2)


def test_duplicated_context_gets_one_worker_per_entry():
    ex = pe.ContextExecutor([mx.cpu(1), mx.cpu(1)], serial_init=False)
    both_running = threading.Barrier(2, timeout=TIMEOUT)

    def meet():
        both_running.wait()  # only passes if two workers run at once
        return where(), threading.current_thread().name

    try:
        futures = [ex.submit_to(mx.cpu(1), meet) for _ in range(2)]
        results = [f.result(TIMEOUT) for f in futures]
    finally:
        ex.shutdown(wait=True)
    assert [r[0] for r in results] == [(mx.cpu(1), mx.cpu(1))] * 2
    assert results[0][1] != results[1][1]


def test_is_a_concurrent_futures_executor():
    with pe.ContextExecutor(CPU2) as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        assert isinstance(ex.submit(int), concurrent.futures.Future)


# --- pinning --------------------------------------------------------------------


def test_tasks_run_pinned_to_their_worker_context(executor):
    for context in CPU2 * 2:
        assert executor.submit_to(context, where).result(TIMEOUT) == (context, context)


def test_pinning_survives_a_task_that_leaves_a_context_entered():
    ex = pe.ContextExecutor([mx.cpu(1)])

    def enter_and_never_leave():
        mx.cpu(3).__enter__()
        return mx.current_context()

    try:
        # The first result shows the task's own context did take effect.
        assert ex.submit(enter_and_never_leave).result(TIMEOUT) == mx.cpu(3)
        assert ex.submit(where).result(TIMEOUT) == (mx.cpu(1), mx.cpu(1))
        assert ex.submit(enter_and_never_leave).result(TIMEOUT) == mx.cpu(3)
        assert ex.submit(where).result(TIMEOUT) == (mx.cpu(1), mx.cpu(1))
    finally:
        ex.shutdown(wait=True)


def test_a_done_callback_after_a_task_that_left_a_context_entered_sees_the_worker_context():
    ex = pe.ContextExecutor([mx.cpu(1)])
    release = threading.Event()
    seen = []

    def enter_and_never_leave():
        release.wait(TIMEOUT)  # so the callback is added before the task ends and runs in the worker
        mx.cpu(3).__enter__()

    try:
        future = ex.submit(enter_and_never_leave)
        future.add_done_callback(lambda f: seen.append((threading.current_thread() is not threading.main_thread(),
                                                        mx.current_context())))
        release.set()
        future.result(TIMEOUT)
        ex.shutdown(wait=True)  # the callback ran before the worker ended
        assert seen == [(True, mx.cpu(1))]
    finally:
        ex.shutdown(wait=True)


def test_a_done_callback_that_leaves_a_context_entered_does_not_reach_the_next_task():
    # The worker checks its context before a task only when something may
    # have run on its thread since the last one: such a callback.
    release = threading.Event()
    with pe.ContextExecutor([mx.cpu(1)]) as ex:
        assert ex.submit(where).result(TIMEOUT) == (mx.cpu(1), mx.cpu(1))
        future = ex.submit(release.wait, TIMEOUT)
        future.add_done_callback(lambda _: mx.cpu(3).__enter__())  # not done yet: runs on the worker
        release.set()
        future.result(TIMEOUT)
        assert ex.submit(where).result(TIMEOUT) == (mx.cpu(1), mx.cpu(1))


def test_current_context_is_none_outside_workers(executor):
    assert executor.submit_to(mx.cpu(1), where).result(TIMEOUT)[0] == mx.cpu(1)
    assert pe.current_context() is None  # main thread, while workers exist
    seen = []
    thread = threading.Thread(target=lambda: seen.append(pe.current_context()))
    thread.start()
    thread.join(TIMEOUT)
    assert seen == [None]


def test_thread_names_start_with_the_prefix_and_name_the_context():
    with pe.ContextExecutor(CPU2, thread_name_prefix="trainer") as ex:
        names = {c: ex.submit_to(c, lambda: threading.current_thread().name).result(TIMEOUT) for c in CPU2}
    for context, name in names.items():
        assert name.startswith("trainer")
        assert str(context) in name
    assert len(set(names.values())) == 2


def test_thread_names_name_the_context_without_a_prefix(executor):
    for context in CPU2:
        name = executor.submit_to(context, lambda: threading.current_thread().name).result(TIMEOUT)
        assert str(context) in name


# --- submit_to ------------------------------------------------------------------


def test_submit_to_runs_on_that_context_whatever_the_arguments(executor):
    on_cpu0 = mx.nd.ones((2,), ctx=mx.cpu(0))
    for _ in range(3):  # round-robin or routing by argument would reach cpu(0)
        future = executor.submit_to(mx.cpu(1), lambda x, y=None: where(), on_cpu0, y=on_cpu0)
        assert future.result(TIMEOUT) == (mx.cpu(1), mx.cpu(1))


def test_submit_to_passes_arguments(executor):
    assert executor.submit_to(mx.cpu(0), lambda a, /, b, *, c: (a, b, c), 1, 2, c=3).result(TIMEOUT) == (1, 2, 3)


def test_submit_to_a_context_without_worker_is_a_value_error(executor):
    with pytest.raises(ValueError, match=r"cpu\(5\)"):
        executor.submit_to(mx.cpu(5), where)


@pytest.mark.parametrize("context", ["cpu(0)", None, 0])
def test_submit_to_a_non_context_is_a_type_error(executor, context):
    with pytest.raises(TypeError, match=re.escape(repr(context))):
        executor.submit_to(context, where)


# --- map ------------------------------------------------------------------------


def test_map_yields_in_input_order_when_completion_order_differs():
    ex = pe.ContextExecutor(CPU2, serial_init=False)
    third_started = threading.Event()
    finished = []  # task indices, in the order they finished

    def task(i, x):
        if i == 0:
            # Task 2 is queued on cpu(1) behind task 1, so once it starts,
            # task 1's future is done: 1 completes before 0.
            third_started.wait(TIMEOUT)
        elif i == 2:
            third_started.set()
        finished.append(i)
        return i, pe.current_context()

    shards = [mx.nd.ones((1,), ctx=c) for c in (mx.cpu(0), mx.cpu(1), mx.cpu(1))]
    try:
        results = list(ex.map(task, range(3), shards, timeout=TIMEOUT))
    finally:
        third_started.set()
        ex.shutdown(wait=True)
    assert finished.index(1) < finished.index(0)
    assert results == [(0, mx.cpu(0)), (1, mx.cpu(1)), (2, mx.cpu(1))]


def test_map_raises_timeout_error_past_timeout():
    ex = pe.ContextExecutor([mx.cpu(0)])
    release = threading.Event()
    try:
        results = ex.map(lambda x: release.wait(TIMEOUT) and x, [1, 2], timeout=0.2)
        with pytest.raises(concurrent.futures.TimeoutError):
            list(results)
    finally:
        release.set()
        ex.shutdown(wait=True)


def test_map_raises_a_task_exception_when_its_result_is_reached(executor):
    results = executor.map(lambda x: 12 // x, [1, 2, 0, 4], timeout=TIMEOUT)  # does not raise yet
    assert next(results) == 12
    assert next(results) == 6
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_accepts_chunksize(executor):
    assert list(executor.map(lambda a, b: a + b, range(5), range(5), timeout=TIMEOUT, chunksize=2)) == [0, 2, 4, 6, 8]


def test_map_over_split_and_load_runs_each_shard_on_its_device(executor):
    data = mx.nd.arange(12).reshape((4, 3))
    label = mx.nd.arange(4)

    def step(x, y):
        assert x.context == y.context == pe.current_context() == mx.current_context()
        return pe.current_context(), (x.sum(axis=1) + y).asnumpy()

    shards = gluon.utils.split_and_load(data, list(CPU2))
    labels = gluon.utils.split_and_load(label, list(CPU2))
    results = list(executor.map(step, shards, labels, timeout=TIMEOUT))
    assert [r[0] for r in results] == list(CPU2)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), [3, 13, 23, 33])


# --- shutdown -------------------------------------------------------------------


def test_shutdown_is_idempotent():
    ex = pe.ContextExecutor(CPU2)
    ex.shutdown(wait=False)
    ex.shutdown(wait=True)
    ex.shutdown(wait=True, cancel_futures=True)
    ex.shutdown()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda ex: ex.submit(int), id="submit"),
        pytest.param(lambda ex: ex.submit_to(mx.cpu(0), int), id="submit_to"),
        pytest.param(lambda ex: list(ex.map(int, [1])), id="map"),
    ],
)
def test_new_work_after_shutdown_is_a_runtime_error(call):
    ex = pe.ContextExecutor(CPU2)
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="shutdown"):
        call(ex)


def test_shutdown_wait_waits_for_the_running_task():
    ex = pe.ContextExecutor([mx.cpu(0)])
    started, shutting_down, shutdown_returned = threading.Event(), threading.Event(), threading.Event()

    def task():
        started.set()
        shutting_down.wait(TIMEOUT)
        # A shutdown that did not wait would return during this window.
        return shutdown_returned.wait(0.3)

    future = ex.submit(task)
    assert started.wait(TIMEOUT)
    shutting_down.set()
    ex.shutdown(wait=True)
    shutdown_returned.set()
    assert future.done()
    assert future.result(TIMEOUT) is False


def test_shutdown_cancel_futures_cancels_queued_tasks_only():
    ex = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
    started, release = threading.Event(), threading.Event()
    ran = []

    def park():
        started.set()
        release.wait(TIMEOUT)
        return "finished"

    try:
        running = ex.submit(park)
        assert started.wait(TIMEOUT)
        queued = [ex.submit(ran.append, i) for i in range(3)]
        ex.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
    finally:
        release.set()
    ex.shutdown(wait=True)
    assert running.result(TIMEOUT) == "finished"
    assert ran == []


def test_shutdown_with_wait_and_cancel_futures_together():
    ex = pe.ContextExecutor([mx.cpu(0)], serial_init=False)
    started, release = threading.Event(), threading.Event()

    def park():
        started.set()
        release.wait(TIMEOUT)
        return "finished"

    running = ex.submit(park)
    assert started.wait(TIMEOUT)
    queued = ex.submit(int)
    # Cancelling runs the callback, which frees the running task that
    # shutdown(wait=True) then waits for.
    queued.add_done_callback(lambda _: release.set())
    try:
        ex.shutdown(wait=True, cancel_futures=True)
    finally:
        release.set()
    assert queued.cancelled()
    assert running.result(TIMEOUT) == "finished"


def test_with_block_shuts_down_after_running_its_tasks():
    with pe.ContextExecutor(CPU2) as ex:
        futures = [ex.submit_to(c, lambda: threading.current_thread().name) for c in CPU2]
    names = {f.result(0) for f in futures}  # done already: the block waited
    assert not {t.name for t in threading.enumerate()} & names
    with pytest.raises(RuntimeError):
        ex.submit(int)


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_from_inside_a_task_does_not_deadlock(executor, wait):
    future = executor.submit_to(mx.cpu(0), lambda: executor.shutdown(wait=wait))
    assert future.result(TIMEOUT) is None
    with pytest.raises(RuntimeError):
        executor.submit(int)


# --- task exceptions --------------------------------------------------------------


class CustomBaseException(BaseException):
    pass


def raise_it_here(exc):
    raise exc


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad value"), SystemExit(3), KeyboardInterrupt(), GeneratorExit(), CustomBaseException("x")],
    ids=lambda e: type(e).__name__,
)
def test_a_task_exception_lands_on_its_future_and_the_worker_survives(exc):
    ex = pe.ContextExecutor([mx.cpu(1)])
    try:
        before = ex.submit(lambda: (threading.current_thread().name, "before"))
        failing = ex.submit(raise_it_here, exc)
        after = ex.submit(lambda: (threading.current_thread().name, "after"))
        assert failing.exception(TIMEOUT) is exc  # the object itself, not a copy
        with pytest.raises(type(exc)):
            failing.result(TIMEOUT)
        assert "raise_it_here" in "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name, _ = before.result(TIMEOUT)
        # The same worker thread, not a replacement, serves the next tasks.
        assert after.result(TIMEOUT) == (name, "after")
        assert ex.submit(where).result(TIMEOUT) == (mx.cpu(1), mx.cpu(1))
    finally:
        ex.shutdown(wait=True)


def test_a_failing_task_does_not_disturb_other_workers_tasks(executor):
    futures = [executor.submit_to(c, lambda i=i: 10 // i) for i, c in zip([5, 0, 2, 1], CPU2 * 2)]
    assert isinstance(futures[1].exception(TIMEOUT), ZeroDivisionError)
    assert [futures[i].result(TIMEOUT) for i in (0, 2, 3)] == [2, 5, 10]


# --- initializer ----------------------------------------------------------------


def test_initializer_runs_once_per_worker_after_pinning_with_initargs():
    calls = []
    lock = threading.Lock()
    local = threading.local()

    def init(tag):
        with lock:
            calls.append((tag, threading.current_thread().name, pe.current_context(), mx.current_context()))
        local.tag = tag

    contexts = [mx.cpu(0), mx.cpu(1), mx.cpu(1)]
    with pe.ContextExecutor(contexts, initializer=init, initargs=("hello",)) as ex:
        # Each task sees the thread-local its worker's initializer set.
        futures = [ex.submit(lambda: (threading.current_thread().name, local.tag)) for _ in range(9)]
        seen = [f.result(TIMEOUT) for f in futures]
    assert len(calls) == 3  # nine tasks, three workers: once each
    assert sorted(str(c[2]) for c in calls) == sorted(str(c) for c in contexts)
    assert all(tag == "hello" and pinned == current for tag, _, pinned, current in calls)
    assert len({c[1] for c in calls}) == 3
    assert {name for name, _ in seen} == {c[1] for c in calls}  # ran in the workers
    assert {tag for _, tag in seen} == {"hello"}


def _seed_worker(seed):
    # docs/gate.md's recipe: one stream per device, from the caller's seed.
    mx.random.seed(seed * 1000 + pe.current_context().device_id)


def _draws(seed):
    """Each device's first random draw in a task, under an executor whose workers ``_seed_worker`` seeded."""
    shards = [mx.nd.zeros((1,), ctx=context) for context in CPU2]
    with pe.ContextExecutor(CPU2, initializer=_seed_worker, initargs=(seed,)) as ex:
        return [tuple(r) for r in ex.map(lambda x: mx.nd.random.uniform(shape=(4,), ctx=x.context).asnumpy(), shards)]


def test_seeding_workers_in_the_initializer_makes_their_draws_follow_the_seed():
    # MXNet's generator is per thread, and workers' threads are kept from one
    # executor to the next (still drawing on from where they were): the
    # initializer reseeds them each time an executor starts.
    first, again, other = _draws(7), _draws(7), _draws(8)
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    assert first[0] != first[1]  # one stream per device


def test_a_failing_initializer_breaks_the_executor():
    assert issubclass(pe.BrokenContextExecutor, concurrent.futures.BrokenExecutor)
    entered, fail_now = threading.Event(), threading.Event()
    ran = []

    def init():
        if pe.current_context() == mx.cpu(1):
            entered.set()
            fail_now.wait(TIMEOUT)
            raise RuntimeError("initializer failed")

    ex = pe.ContextExecutor(CPU2, initializer=init)
    try:
        assert entered.wait(TIMEOUT)
        # Queued on cpu(1) while its initializer has not finished yet.
        pending = [ex.submit_to(mx.cpu(1), ran.append, i) for i in range(3)]
        fail_now.set()
        for future in pending:
            with pytest.raises(pe.BrokenContextExecutor):
                future.result(TIMEOUT)
        assert ran == []
        with pytest.raises(pe.BrokenContextExecutor):
            ex.submit(int)
        with pytest.raises(pe.BrokenContextExecutor):
            ex.submit_to(mx.cpu(0), int)
        with pytest.raises(pe.BrokenContextExecutor):
            ex.submit(int, mx.nd.ones((1,), ctx=mx.cpu(0)))
    finally:
        fail_now.set()
        ex.shutdown(wait=True)


# --- MXNet's asynchronous errors --------------------------------------------------


def not_positive_definite(context):
    # potrf (Cholesky) fails in the engine, after the call returned: lazily.
    return mx.nd.array([[-1.0, 0.0], [0.0, -1.0]], ctx=context)


def test_engine_error_surfaces_where_the_result_is_read(executor):
    future = executor.submit_to(mx.cpu(1), lambda: mx.nd.linalg.potrf(not_positive_definite(mx.cpu(1))))
    out = future.result(TIMEOUT)  # the task returned before the engine ran the op
    assert isinstance(out, mx.nd.NDArray)
    with pytest.raises(mx.base.MXNetError, match="potrf"):
        out.asnumpy()
    assert executor.submit_to(mx.cpu(1), lambda: (mx.nd.ones((2,)) * 2).asnumpy().tolist()).result(TIMEOUT) == [2, 2]


def test_a_task_that_reads_its_output_gets_the_engine_error_on_its_future(executor):
    future = executor.submit_to(mx.cpu(1), lambda: mx.nd.linalg.potrf(not_positive_definite(mx.cpu(1))).asnumpy())
    assert isinstance(future.exception(TIMEOUT), mx.base.MXNetError)
    assert executor.submit_to(mx.cpu(1), lambda: (mx.nd.ones((2,)) * 3).asnumpy().tolist()).result(TIMEOUT) == [3, 3]
