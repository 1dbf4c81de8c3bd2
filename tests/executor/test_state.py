"""Autograd state travels with the task, and the worker's own is restored.

MXNet keeps ``is_recording()``/``is_training()`` per thread. A task must run
with the flags its submitter had at ``submit`` time; the worker thread's own
flags, seen by code that runs there outside tasks (the initializer, future
done-callbacks), must be what they were before the task.
"""

import threading

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import _worker

from helpers import CPU2, TIMEOUT, make_restore_fail_once

# (is_recording, is_training) -> a context manager putting the caller in it.
MODES = {
    (True, True): lambda: autograd.record(train_mode=True),
    (True, False): lambda: autograd.record(train_mode=False),
    (False, True): autograd.train_mode,
    (False, False): autograd.predict_mode,
}


def flags():
    return autograd.is_recording(), autograd.is_training()


def set_flags(recording, training):
    autograd.set_recording(recording)
    autograd.set_training(training)


@pytest.mark.parametrize("worker_flags", [(False, False), (True, True)], ids=["worker-idle", "worker-recording"])
def test_submitter_flags_are_in_force_in_the_task(worker_flags):
    # An initializer gives the workers their own flags, so that a task that
    # merely inherited the worker's state fails at least one combination.
    with pe.ContextExecutor(CPU2, initializer=set_flags, initargs=worker_flags) as ex:
        for expected, mode in MODES.items():
            with mode():
                assert flags() == expected  # the caller really is in that mode
                futures = [ex.submit_to(c, flags) for c in CPU2]
                mapped = list(ex.map(lambda _: flags(), range(4), timeout=TIMEOUT))
            assert [f.result(TIMEOUT) for f in futures] == [expected] * 2
            assert mapped == [expected] * 4


def test_flags_are_captured_at_submit_time_not_run_time():
    ex = pe.ContextExecutor([mx.cpu(0)])
    started, release = threading.Event(), threading.Event()

    def park():
        started.set()
        release.wait(TIMEOUT)

    try:
        ex.submit(park)
        assert started.wait(TIMEOUT)
        with autograd.record():
            submitted_recording = ex.submit(flags)
        submitted_idle = ex.submit(flags)
        with autograd.record():  # the caller's state when the tasks run
            release.set()
            assert submitted_recording.result(TIMEOUT) == (True, True)
            assert submitted_idle.result(TIMEOUT) == (False, False)
    finally:
        release.set()
        ex.shutdown(wait=True)


def flags_seen_by_done_callback(ex, task, mode):
    """Submit ``task`` under ``mode``; return the worker's flags after it.

    A done-callback added while the task is still running runs in the worker
    thread once the task is over, so it sees the worker's own flags.
    """
    go, called = threading.Event(), threading.Event()
    seen = {}

    def parked_task():
        go.wait(TIMEOUT)
        return task()

    def callback(_):
        seen["thread"] = threading.current_thread().name
        seen["flags"] = flags()
        called.set()

    with mode():
        future = ex.submit(parked_task)
    future.add_done_callback(callback)  # not done yet: it is parked
    go.set()
    future.result(TIMEOUT)
    assert called.wait(TIMEOUT)
    assert seen["thread"] != threading.current_thread().name
    return seen["flags"]


def change_flags_and_return():
    set_flags(True, True)
    return flags()


@pytest.mark.parametrize(
    "task, mode",
    [
        pytest.param(flags, MODES[(True, True)], id="submitted-while-recording"),
        pytest.param(change_flags_and_return, MODES[(False, False)], id="task-sets-flags-itself"),
        pytest.param(change_flags_and_return, MODES[(True, False)], id="both"),
    ],
)
def test_worker_flags_are_restored_after_the_task(task, mode):
    with pe.ContextExecutor([mx.cpu(1)]) as ex:
        assert flags_seen_by_done_callback(ex, task, mode) == (False, False)
        assert ex.submit(flags).result(TIMEOUT) == (False, False)


def test_worker_flags_are_restored_to_its_own_not_to_defaults():
    with pe.ContextExecutor([mx.cpu(1)], initializer=set_flags, initargs=(True, True)) as ex:
        assert flags_seen_by_done_callback(ex, flags, MODES[(False, False)]) == (True, True)


# --- a worker that knows its flags sets only those that differ ------------------------


def leave_recording_on(_):
    autograd.set_recording(True)  # and never set it back
    return flags()


def test_a_map_call_that_leaves_recording_on_does_not_reach_the_next_one():
    # The next call's caller is not recording either, so nothing is set before
    # it: this holds only because the flags are put back after every call.
    with pe.ContextExecutor([mx.cpu(1)]) as ex:
        assert list(ex.map(leave_recording_on, [0])) == [(True, False)]
        assert list(ex.map(lambda _: flags(), [0])) == [(False, False)]


def test_a_done_callback_that_sets_recording_does_not_reach_the_next_map_call():
    # A submit's done-callback runs on the worker after the flags were put
    # back: the worker cannot know its flags then, and sets them all.
    go = threading.Event()
    with pe.ContextExecutor([mx.cpu(1)]) as ex:
        list(ex.map(lambda _: None, [0]))  # the worker knows its flags now
        future = ex.submit(go.wait, TIMEOUT)
        future.add_done_callback(lambda _: autograd.set_recording(True))  # not done: runs on the worker
        go.set()
        future.result(TIMEOUT)
        assert list(ex.map(lambda _: flags(), [0])) == [(False, False)]


def test_after_putting_the_flags_back_failed_the_next_task_gets_its_flags_set(monkeypatch):
    make_restore_fail_once(_worker, monkeypatch)  # the first call leaves recording on
    with pe.ContextExecutor([mx.cpu(1)]) as ex:
        with pytest.raises(RuntimeError, match="refused a flag"):
            ex.submit(leave_recording_on, 0).result(TIMEOUT)
        assert ex.submit(flags).result(TIMEOUT) == (False, False)  # unknown, so all were set


# --- both styles of training ------------------------------------------------------


def training_setup():
    """A net on both contexts, its loss function, and a batch split over them."""
    net = gluon.nn.Dense(2, in_units=3)  # in_units given: no deferred init
    net.initialize(mx.init.Xavier(), ctx=list(CPU2))
    loss = gluon.loss.L2Loss()

    def loss_fn(x, y):
        return loss(net(x), y)

    data = mx.nd.array(np.arange(24, dtype="float32").reshape((8, 3)) / 10)
    label = mx.nd.array(np.arange(16, dtype="float32").reshape((8, 2)) / 10)
    xs = gluon.utils.split_and_load(data, list(CPU2))
    ys = gluon.utils.split_and_load(label, list(CPU2))
    return net, loss_fn, xs, ys


def grads(net):
    return {(name, str(g.context)): g.asnumpy() for name, p in net.collect_params().items() for g in p.list_grad()}


def sequential_grads(net, loss_fn, xs, ys):
    """The reference: the same forward/backward, in the calling thread."""
    with autograd.record():
        losses = [loss_fn(x, y) for x, y in zip(xs, ys)]
    autograd.backward(losses)
    return grads(net)


def assert_same_grads(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=str(key))
    assert any(np.abs(g).sum() > 0 for g in expected.values())  # not trivially zero


def test_record_in_caller_map_then_backward_in_caller():
    net, loss_fn, xs, ys = training_setup()

    with pe.ContextExecutor(CPU2) as ex:
        with autograd.record():
            losses = list(ex.map(loss_fn, xs, ys, timeout=TIMEOUT))
        assert [loss.context for loss in losses] == list(CPU2)
        autograd.backward(losses)
        got = grads(net)
    assert_same_grads(got, sequential_grads(net, loss_fn, xs, ys))


def test_task_records_and_calls_backward_itself():
    net, loss_fn, xs, ys = training_setup()

    def forward_backward(x, y):
        with autograd.record():
            value = loss_fn(x, y)
        value.backward()
        return value

    with pe.ContextExecutor(CPU2) as ex:
        values = list(ex.map(forward_backward, xs, ys, timeout=TIMEOUT))
        got = grads(net)
    assert [v.context for v in values] == list(CPU2)
    assert_same_grads(got, sequential_grads(net, loss_fn, xs, ys))
