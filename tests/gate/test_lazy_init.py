"""Gluon's lazy initialisation is safe whenever a task triggers it (_lazy_init).

Every test meets networks first used after the serial-init gates have opened:
the tasks of each step wait at a Barrier, so all workers reach the deferred
initialisation at once (without the lock, about 9 trials in 10 raised).
"""

import threading

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import _lazy_init

from helpers import TIMEOUT

TRIALS = 6


def contexts(n):
    return [mx.cpu(i) for i in range(n)]


def warmed_up(ctxs, **kwargs):
    """An executor whose gates are all open: one trivial task per worker."""
    ex = pe.ContextExecutor(ctxs, **kwargs)
    list(ex.map(abs, range(len(ctxs)), timeout=TIMEOUT))
    return ex


class Wavy(mx.init.Initializer):
    """Deterministic, asymmetric weights from ``seed``.

    Not MXNet's random initializers: MXNet 1.9.1 keeps the generator of ops
    run from a thread per thread, and ``mx.random.seed`` in the caller does
    not reseed a worker that drew before, so a random init in a task would
    not be comparable with the sequential loop's.
    """

    def __init__(self, seed):
        super().__init__()
        self._seed = seed

    def _init_weight(self, name, arr):
        values = np.sin(np.arange(arr.size) * 0.37 + self._seed) * 0.3
        arr[:] = values.reshape(arr.shape)

    def _init_bias(self, name, arr):
        arr[:] = 0.01


def fresh_net(ctxs, seed, hybridize):
    """Five Dense layers without in_units: every parameter's init is deferred."""
    net = gluon.nn.HybridSequential()
    for _ in range(4):
        net.add(gluon.nn.Dense(16, activation="relu"))
    net.add(gluon.nn.Dense(4))
    net.initialize(Wavy(seed), ctx=ctxs)
    if hybridize:
        net.hybridize()
    return net


def make_step(net, n, meet=True):
    barrier = threading.Barrier(n, timeout=TIMEOUT)

    def step(x):
        if meet:
            barrier.wait()  # every worker meets the deferred init at once
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        return loss.asscalar()

    return step


def shards(ctxs, seed=1):
    data = mx.nd.random.normal(shape=(4 * len(ctxs), 8), ctx=mx.cpu(0))
    return gluon.utils.split_and_load(data, ctxs)


def replicas(net, ctxs):
    """Each parameter's data and gradient on each context, as numpy, in layer order.

    A list, not keyed by name: Gluon numbers layers globally (dense9, dense10),
    so two networks' names neither match nor sort alike.
    """
    return [
        ((name, str(ctx), kind), getattr(param, kind)(ctx).asnumpy())
        for name, param in net.collect_params().items()
        for ctx in ctxs
        for kind in ("data", "grad")
    ]


def sequential_reference(ctxs, seed, hybridize, xs):
    net = fresh_net(ctxs, seed, hybridize)
    for x in xs:
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
    return replicas(net, ctxs)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("n", [2, 4])
def test_fresh_networks_after_the_gates_opened(n, hybridize):
    ctxs = contexts(n)
    xs = shards(ctxs)
    with warmed_up(ctxs) as ex:
        for trial in range(TRIALS):
            net = fresh_net(ctxs, seed=trial, hybridize=hybridize)
            list(ex.map(make_step(net, n), xs, timeout=TIMEOUT))
            got = replicas(net, ctxs)
            expected = sequential_reference(ctxs, trial, hybridize, xs)
            assert len(got) == len(expected) == 5 * 2 * n * 2
            for (key, value), (_, want) in zip(got, expected):
                np.testing.assert_array_equal(value, want, err_msg=str(key))
            weights = [net[0].weight.data(c).asnumpy() for c in ctxs]
            for other in weights[1:]:
                np.testing.assert_array_equal(weights[0], other)


def test_second_network_first_used_a_step_later():
    """GAN-style: network A trains in step 1; network B is first called in step 2."""
    ctxs = contexts(2)
    xs = shards(ctxs)
    with pe.ContextExecutor(ctxs) as ex:
        for trial in range(TRIALS):
            net_a = fresh_net(ctxs, seed=trial, hybridize=False)
            net_b = fresh_net(ctxs, seed=trial + 100, hybridize=True)
            # Step 1 opens the gates (its first tasks run one at a time).
            list(ex.map(make_step(net_a, 2, meet=(trial > 0)), xs, timeout=TIMEOUT))
            list(ex.map(make_step(net_b, 2), xs, timeout=TIMEOUT))
            for net in (net_a, net_b):
                first, second = (net[-1].weight.grad(c).asnumpy() for c in ctxs)
                assert first.shape == second.shape == (4, 16)


def test_hybridized_after_training_started():
    ctxs = contexts(2)
    xs = shards(ctxs)
    with warmed_up(ctxs) as ex:
        for trial in range(TRIALS):
            net = fresh_net(ctxs, seed=trial, hybridize=False)
            step = make_step(net, 2)
            before = list(ex.map(step, xs, timeout=TIMEOUT))
            net.hybridize()  # every worker now builds the cached graph at once
            after = list(ex.map(step, xs, timeout=TIMEOUT))
            np.testing.assert_allclose(after, before, rtol=1e-5)


def test_nested_blocks_and_shared_parameters():
    ctxs = contexts(2)
    with warmed_up(ctxs) as ex:
        for trial in range(TRIALS):
            inner = gluon.nn.HybridSequential()
            inner.add(gluon.nn.Dense(8, activation="relu"), gluon.nn.Dense(8))
            outer = gluon.nn.HybridSequential()
            outer.add(inner, gluon.nn.Dense(2))
            twin = gluon.nn.Dense(8, params=inner[0].collect_params())  # shares inner[0]'s
            outer.initialize(Wavy(trial), ctx=ctxs)  # twin's parameters are inner[0]'s
            barrier = threading.Barrier(2, timeout=TIMEOUT)

            def use(block, ctx, barrier=barrier):
                x = mx.nd.ones((2, 5), ctx=ctx)
                barrier.wait()
                return block(x).asnumpy()

            # One worker meets the shared parameters through outer, the other through twin.
            futures = [ex.submit_to(ctxs[0], use, outer, ctxs[0]), ex.submit_to(ctxs[1], use, twin, ctxs[1])]
            assert futures[0].result(TIMEOUT).shape == (2, 2)
            assert futures[1].result(TIMEOUT).shape == (2, 8)
            assert twin.weight is inner[0].weight
            np.testing.assert_array_equal(twin.weight.data(ctxs[0]).asnumpy(), inner[0].weight.data(ctxs[1]).asnumpy())


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_without_the_gate(hybridize):
    ctxs = contexts(2)
    xs = shards(ctxs)
    with pe.ContextExecutor(ctxs, serial_init=False) as ex:
        for trial in range(TRIALS):
            net = fresh_net(ctxs, seed=trial, hybridize=hybridize)
            losses = list(ex.map(make_step(net, 2), xs, timeout=TIMEOUT))
            assert all(np.isfinite(losses))


def test_the_parallel_shim_is_protected_too():
    ctxs = contexts(2)
    xs = shards(ctxs)
    net = fresh_net(ctxs, seed=0, hybridize=True)
    step = make_step(net, 2)

    class Step(pe.Parallelizable):
        def forward_backward(self, x):
            return step(x)

    # serial_init=False: no inline first calls, both workers meet the deferred init.
    with pe.Parallel(2, Step(), serial_init=False) as parallel:
        for x in xs:
            parallel.put(x)
        losses = [parallel.get() for _ in xs]
    assert all(np.isfinite(losses))


class CountingLock:
    """An RLock that counts its acquisitions."""

    def __init__(self):
        self._lock = threading.RLock()
        self.acquired = 0

    def __enter__(self):
        self._lock.acquire()
        self.acquired += 1
        return self

    def __exit__(self, *exc_info):
        self._lock.release()


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_steady_state_calls_never_take_the_lock(monkeypatch, hybridize):
    ctxs = contexts(2)
    xs = shards(ctxs)
    counting = CountingLock()
    monkeypatch.setattr(_lazy_init, "_lock", counting)
    with warmed_up(ctxs) as ex:
        net = fresh_net(ctxs, seed=0, hybridize=hybridize)
        step = make_step(net, 2)
        list(ex.map(step, xs, timeout=TIMEOUT))
        assert counting.acquired > 0  # the first step initialised under the lock
        counting.acquired = 0
        for _ in range(3):
            list(ex.map(step, xs, timeout=TIMEOUT))
        for param in net.collect_params().values():
            param.data(ctxs[0])
            param.grad(ctxs[1])
        assert counting.acquired == 0


def test_install_is_idempotent():
    pe.ContextExecutor([mx.cpu(0)]).shutdown()
    patched = gluon.Parameter.data
    _lazy_init.install()
    _lazy_init.install()
    assert gluon.Parameter.data is patched
    assert patched.__wrapped__ is not None  # functools.wraps keeps the original
