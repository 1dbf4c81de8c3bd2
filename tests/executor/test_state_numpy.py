"""MXNet's NumPy-semantics flags travel with the task, and no leftover reaches the next one.

``npx.is_np_shape()`` (C++ ``thread_local``) and ``npx.is_np_array()`` (a
Python ``threading.local``) are per thread like the autograd flags: a task
runs with what its submitter had at ``submit``, the worker's own are restored
after it, and whatever a done-callback leaves in force on the worker's thread
does not change the flags the next task runs with.
"""

import threading

import mxnet as mx
import pytest
from mxnet import autograd, gluon, npx

import parallel_exec as pe

from helpers import TIMEOUT


def all_flags():
    return autograd.is_recording(), autograd.is_training(), npx.is_np_shape(), npx.is_np_array()


OFF = (False, False, False, False)


@pytest.fixture
def numpy_mode():
    """The caller in NumPy mode (``npx.set_np()``) for the test, legacy mode after it."""
    npx.set_np()
    try:
        yield
    finally:
        npx.reset_np()


def contexts(n):
    return [mx.cpu(i) for i in range(n)]


@pytest.mark.parametrize("n", [2, 4])
def test_numpy_mode_travels_with_the_task_and_is_restored(numpy_mode, n):
    with pe.ContextExecutor(contexts(n)) as ex:
        x = mx.np.ones((2, 3), ctx=mx.cpu(1))
        assert float(ex.submit(lambda a: a.sum() * 2, x).result(TIMEOUT)) == 12.0  # MXNetError without the flags
        seen = [ex.submit_to(c, all_flags).result(TIMEOUT) for c in ex.contexts]
        assert seen == [(False, False, True, True)] * n
        npx.reset_np()
        assert [ex.submit_to(c, all_flags).result(TIMEOUT) for c in ex.contexts] == [OFF] * n


def test_gluon_block_on_numpy_input_in_a_task(numpy_mode):
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize(ctx=mx.cpu(1))
    x = mx.np.ones((4, 3), ctx=mx.cpu(1))
    with pe.ContextExecutor(contexts(2)) as ex:
        out = ex.submit(net, x).result(TIMEOUT)
    assert isinstance(out, mx.np.ndarray)  # TypeError inside the task without the flags
    assert out.shape == (4, 2)


def test_task_that_turns_numpy_mode_on_leaves_the_worker_as_it_was():
    def turn_on():
        npx.set_np()
        return all_flags()

    with pe.ContextExecutor(contexts(2)) as ex:
        assert ex.submit_to(mx.cpu(1), turn_on).result(TIMEOUT)[2:] == (True, True)
        assert ex.submit_to(mx.cpu(1), all_flags).result(TIMEOUT) == OFF


def leave_flags_on():
    autograd.set_recording(True)
    autograd.set_training(True)
    npx.set_np()


@pytest.mark.parametrize("n", [2, 4])
def test_done_callback_leftovers_do_not_reach_the_next_task(n):
    # The callback runs on the worker's thread (the future completes there),
    # between two tasks; the worker must not trust the flags it last set.
    with pe.ContextExecutor(contexts(n)) as ex:
        for context in ex.contexts:
            release, called = threading.Event(), threading.Event()
            first = ex.submit_to(context, release.wait, TIMEOUT)
            first.add_done_callback(lambda f, called=called: (leave_flags_on(), called.set()))
            release.set()
            assert called.wait(TIMEOUT)
            assert ex.submit_to(context, all_flags).result(TIMEOUT) == OFF
            with autograd.record():
                assert ex.submit_to(context, all_flags).result(TIMEOUT) == (True, True, False, False)


def test_parallel_shim_carries_numpy_mode(numpy_mode):
    class Shard:
        def forward_backward(self, x):
            return all_flags(), float(x.sum())

    parallel = pe.Parallel(2, Shard(), serial_init=False)
    try:
        for i in range(4):
            parallel.put(mx.np.ones((2, 3), ctx=mx.cpu(i % 2)))
        outcomes = [parallel.get() for _ in range(4)]
    finally:
        parallel.close()
    assert outcomes == [((False, False, True, True), 6.0)] * 4
