"""The MXNet calls that keep the GIL (``_held``) never deadlock, and their errors reach the future.

``_held`` calls MXNet's flag getters and setters, and the NDArray context
getter routing uses, through a ``ctypes.PyDLL`` handle, holding the GIL. That is safe only because those functions never
block: these tests run, on several workers at once, what would deadlock a
held call that waits inside MXNet while an engine thread needs the GIL (a
Python ``CustomOp``), operators whose output shape depends on data (the
caller blocks until the engine computed it), kvstore push/pull, and the
whole of it under ``MXNET_ENGINE_TYPE=NaiveEngine`` (operators run inline).
"""

import ctypes
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import parallel_exec as pe
from parallel_exec import _held

from helpers import TIMEOUT


class _Double(mx.operator.CustomOp):
    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], in_data[0] * 2)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], out_grad[0] * 2)


@mx.operator.register("pe_held_double")
class _DoubleProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def list_arguments(self):
        return ["data"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return _Double()


def custom_op_step(x):
    x.attach_grad()
    with autograd.record():
        y = mx.nd.Custom(x, op_type="pe_held_double")
    y.backward()
    return float(y.sum().asscalar()), float(x.grad.sum().asscalar())


def data_dependent_shape(x):
    # The output's shape is known only once the engine computed the mask.
    return mx.nd.contrib.boolean_mask(x, x > 0).shape


def many(fn, args, n=4, repeat=8):
    contexts = [mx.cpu(i) for i in range(n)]
    with pe.ContextExecutor(contexts) as ex:
        with autograd.record():  # flags to carry: the setters run on every task
            futures = [ex.submit_to(c, fn, *args(c)) for _ in range(repeat) for c in contexts]
        return [f.result(TIMEOUT) for f in futures]


def test_python_custom_op_in_tasks():
    results = many(custom_op_step, lambda c: (mx.nd.ones((2, 3), ctx=c),))
    assert results == [(12.0, 12.0)] * len(results)


def test_data_dependent_shape_operator_in_tasks():
    x = np.array([1.0, -1.0, 2.0, -3.0], dtype="float32")
    results = many(data_dependent_shape, lambda c: (mx.nd.array(x, ctx=c),))
    assert results == [(2,)] * len(results)


def test_kvstore_push_pull_from_tasks():
    kv = mx.kv.create("local")
    kv.init(3, mx.nd.zeros((2,)))

    def push_pull(value):
        out = mx.nd.zeros((2,), ctx=value.context)
        kv.push(3, value)
        kv.pull(3, out=out)
        return out.asnumpy().tolist()

    results = many(push_pull, lambda c: (mx.nd.ones((2,), ctx=c),), n=2, repeat=4)
    assert results == [[1.0, 1.0]] * len(results)


def test_error_inside_a_held_call_fails_the_task_and_the_worker_serves_on(monkeypatch):
    def failing(value, prev):
        # A real failing call sets this thread's last error, as a failing setter would.
        return mx.base._LIB.MXSymbolCreateFromJSON(b"not json", ctypes.byref(ctypes.c_void_p()))

    with pe.ContextExecutor([mx.cpu(1)]) as ex:
        monkeypatch.setattr(_held, "set_training", failing)
        with pytest.raises(mx.base.MXNetError):
            ex.submit(lambda: 1).result(TIMEOUT)
        monkeypatch.undo()
        assert ex.submit(lambda: 2).result(TIMEOUT) == 2


def test_all_of_it_under_naive_engine():
    # NaiveEngine runs each operator inline, in the calling thread: a fresh process.
    here = os.path.dirname(os.path.abspath(__file__))
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]  # this file's folder, and tests/ for helpers
        import test_state_held_calls as t
        t.test_python_custom_op_in_tasks()
        t.test_data_dependent_shape_operator_in_tasks()
        t.test_kvstore_push_pull_from_tasks()
        print("ok")
    """)
    env = dict(os.environ, MXNET_ENGINE_TYPE="NaiveEngine")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=TIMEOUT * 3,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
