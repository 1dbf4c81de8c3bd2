"""``Parallel``/``Parallelizable``: a drop-in for gluonnlp 0.10.0's.

The scenario of gluonnlp's own ``test_parallel`` runs on both
implementations; the rest checks where ours differs on purpose (errors do
not hang, ``get()`` with nothing pending, ``close()``) and its checks.
"""

import gc
import threading
from concurrent.futures import Future

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import parallel_exec as pe

from conftest import CPU2, TIMEOUT

# Bounded wait for a call that must NOT start (it would overlap a first
# call); only spent in full when the shim works.
SHORT = 0.3


def ours():
    return pe.Parallel


def gluonnlp_s():
    # pyproject.toml ignores the DeprecationWarnings gluonnlp 0.10.0 and
    # mxnet raise under newer numpy; nothing else warns on this import.
    return pytest.importorskip("gluonnlp").utils.Parallel


IMPLEMENTATIONS = [pytest.param(ours, id="parallel_exec"), pytest.param(gluonnlp_s, id="gluonnlp")]


# --- gluonnlp's test_parallel scenario ----------------------------------------


class ParallelNet(pe.Parallelizable):
    """gluonnlp's test net: forward, loss and backward on one shard."""

    def __init__(self, net, loss):
        self._net = net
        self._loss = loss

    def forward_backward(self, x):
        data, label = x
        with autograd.record():
            loss = self._loss(self._net(data), label)
        loss.backward()
        return loss


def make_dense():
    """gluonnlp's Dense(2), seeded: its deferred init runs inline in put()."""
    mx.random.seed(7)
    net = gluon.nn.Dense(2, prefix="test_parallel_")
    net.initialize(ctx=CPU2)
    return net


def shards():
    data = mx.nd.array(np.random.RandomState(0).uniform(size=(2, 5)))
    label = mx.nd.array([[0], [1]])
    return list(zip(gluon.utils.split_and_load(data, CPU2), gluon.utils.split_and_load(label, CPU2)))


def accumulate(net, run_epoch, epochs=2):
    """Run ``epochs`` epochs with gradients added up; return loss sum and grads."""
    params = net.collect_params()
    params.zero_grad()
    params.setattr("grad_req", "add")
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum += sum(loss.sum().asscalar() for loss in run_epoch(shards()))
    grads = {name: p.grad(c).asnumpy() for name, p in params.items() for c in CPU2}
    return loss_sum, grads


def run_parallel(parallel_cls, num_workers):
    """gluonnlp's test_parallel scenario, through ``parallel_cls``."""
    net = make_dense()
    # Dropped on return: gluonnlp's stops its threads in __del__, ours too.
    parallel = parallel_cls(num_workers, ParallelNet(net, gluon.loss.SoftmaxCELoss()))

    def run_epoch(xs):
        for x in xs:
            parallel.put(x)
        return [parallel.get() for _ in xs]

    return accumulate(net, run_epoch)


def run_serially():
    net = make_dense()
    model = ParallelNet(net, gluon.loss.SoftmaxCELoss())
    return accumulate(net, lambda xs: [model.forward_backward(x) for x in xs])


def assert_same(actual, expected):
    (actual_loss, actual_grads), (expected_loss, expected_grads) = actual, expected
    np.testing.assert_allclose(actual_loss, expected_loss, rtol=1e-5)
    assert actual_grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        np.testing.assert_allclose(actual_grads[key], grad, rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gluonnlp_scenario_matches_serial_loop(implementation, num_workers):
    assert_same(run_parallel(implementation(), num_workers), run_serially())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_results_as_gluonnlp(num_workers):
    theirs = run_parallel(gluonnlp_s(), num_workers)
    assert_same(run_parallel(pe.Parallel, num_workers), theirs)


# --- errors do not hang ----------------------------------------------------------


class Doubler(pe.Parallelizable):
    """Returns 2 * x; raises for a negative x."""

    def forward_backward(self, x):
        if x < 0:
            raise ValueError(f"negative: {x}")
        return 2 * x


@pytest.mark.parametrize("serial_init", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_error_is_raised_by_get_and_later_calls_work(num_workers, serial_init):
    with pe.Parallel(num_workers, Doubler(), serial_init=serial_init) as parallel:
        for _ in range(2):  # inline (serial init) calls, then worker calls
            parallel.put(-1)  # never raises here, even inline
            with pytest.raises(ValueError, match="negative: -1"):
                parallel.get()
            parallel.put(3)
            assert parallel.get() == 6


def test_error_keeps_its_traceback():
    with pe.Parallel(2, Doubler(), serial_init=False) as parallel:
        parallel.put(-1)
        with pytest.raises(ValueError) as info:
            parallel.get()
    assert any(entry.name == "forward_backward" for entry in info.traceback)


def test_every_worker_raising_at_once_does_not_hang():
    barrier = threading.Barrier(2, timeout=TIMEOUT)

    class RaiseTogether(pe.Parallelizable):
        def forward_backward(self, x):
            if x == "together":
                barrier.wait()  # both workers are in a call
                raise RuntimeError("raised by every worker")
            return x

    with pe.Parallel(2, RaiseTogether(), serial_init=False) as parallel:
        parallel.put("together")
        parallel.put("together")
        for _ in range(2):
            with pytest.raises(RuntimeError, match="raised by every worker"):
                parallel.get()
        parallel.put("still works")
        assert parallel.get() == "still works"


class FirstPutWaits(pe.Parallelizable):
    """Echoes x; the call for "first put" waits for ``release`` first."""

    def __init__(self, release):
        self._release = release

    def forward_backward(self, x):
        if x == "first put":
            assert self._release.wait(TIMEOUT)
        return x


def test_results_come_in_completion_order():
    release_first = threading.Event()

    with pe.Parallel(2, FirstPutWaits(release_first), serial_init=False) as parallel:
        parallel.put("first put")
        parallel.put("second put")
        assert parallel.get() == "second put"  # the first call cannot finish yet
        release_first.set()
        assert parallel.get() == "first put"


def test_completion_order_holds_when_a_call_finishes_inside_put(monkeypatch):
    # Forces the window between submit() returning and put() returning: there
    # the second call finishes, then the first. A shim that learns of results
    # through a done-callback added after submit() would hear of the second
    # only when adding it, after the first, and get() would return them in
    # the wrong order.
    release_first = threading.Event()
    first_heard = threading.Event()
    futures = []
    registered = []
    real_submit = pe.ContextExecutor.submit

    def submit(self, fn, /, *args, **kwargs):
        future = real_submit(self, fn, *args, **kwargs)
        futures.append(future)
        if len(futures) == 1:
            # Callbacks run in the order added: ours says put()'s has run.
            def add_done_callback(callback):
                registered.append(callback)
                Future.add_done_callback(future, callback)
                Future.add_done_callback(future, lambda _: first_heard.set())

            future.add_done_callback = add_done_callback
        else:
            future.result(TIMEOUT)  # the second call is done...
            release_first.set()
            futures[0].result(TIMEOUT)  # ...then the first one,
            if registered:  # put() listens with a callback:
                assert first_heard.wait(TIMEOUT)  # wait until it has heard
        return future

    monkeypatch.setattr(pe.ContextExecutor, "submit", submit)

    with pe.Parallel(2, FirstPutWaits(release_first), serial_init=False) as parallel:
        parallel.put("first put")
        parallel.put("second put")
        assert [parallel.get(), parallel.get()] == ["second put", "first put"]


# --- serial init --------------------------------------------------------------


class Meeting(pe.Parallelizable):
    """Calls that wait on a barrier; counts how many run at once.

    The first ``num_first`` calls wait on a barrier with a short timeout (with
    serial init they cannot meet); later calls on one with TIMEOUT.
    """

    def __init__(self, num_first, first_timeout):
        self._lock = threading.Lock()  # guards the counters below
        self._calls = 0
        self._running = 0
        self._first_running = 0
        self.max_while_first = 0
        self._first_barrier = threading.Barrier(2, timeout=first_timeout)
        self._later_barrier = threading.Barrier(2, timeout=TIMEOUT)
        self._num_first = num_first

    def forward_backward(self, x):
        with self._lock:
            first = self._calls < self._num_first
            self._calls += 1
            self._running += 1
            self._first_running += first
            if self._first_running:
                self.max_while_first = max(self.max_while_first, self._running)
        try:
            try:
                (self._first_barrier if first else self._later_barrier).wait()
            except threading.BrokenBarrierError:
                return False
            return True
        finally:
            with self._lock:
                self._running -= 1
                self._first_running -= first


def test_serial_init_first_calls_never_overlap():
    meeting = Meeting(num_first=2, first_timeout=SHORT)
    with pe.Parallel(2, meeting, serial_init=True) as parallel:
        for x in range(4):
            parallel.put(x)
        met = sorted(parallel.get() for _ in range(4))
    # The two first calls could not meet; the two later ones ran together.
    assert met == [False, False, True, True]
    assert meeting.max_while_first == 1


def test_without_serial_init_first_calls_overlap():
    meeting = Meeting(num_first=2, first_timeout=TIMEOUT)
    with pe.Parallel(2, meeting, serial_init=False) as parallel:
        for x in range(4):
            parallel.put(x)
        met = [parallel.get() for _ in range(4)]
    assert met == [True] * 4
    assert meeting.max_while_first == 2


def test_serial_init_holds_for_puts_from_several_threads():
    first_started = threading.Event()
    second_started = threading.Event()
    overlapped = []

    class Probe(pe.Parallelizable):
        def forward_backward(self, x):
            if x == 1:
                first_started.set()
                # A correct shim keeps call 2 out until this one returns.
                overlapped.append(second_started.wait(SHORT))
            else:
                second_started.set()
            return x

    with pe.Parallel(2, Probe(), serial_init=True) as parallel:
        other = threading.Thread(target=parallel.put, args=(1,))
        other.start()
        try:
            assert first_started.wait(TIMEOUT)
            parallel.put(2)
        finally:
            other.join(TIMEOUT)
        assert sorted(parallel.get() for _ in range(2)) == [1, 2]
    assert overlapped == [False]


# --- get/put/close ------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_get_with_nothing_pending_raises(num_workers):
    with pe.Parallel(num_workers, Doubler()) as parallel:
        with pytest.raises(RuntimeError, match="no pending put"):
            parallel.get()
        parallel.put(1)
        assert parallel.get() == 2
        with pytest.raises(RuntimeError, match="no pending put"):
            parallel.get()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_put_after_close_raises_and_close_is_idempotent(num_workers):
    parallel = pe.Parallel(num_workers, Doubler())
    parallel.put(1)
    parallel.close()
    parallel.close()
    assert parallel.get() == 2  # what was put before close is still there
    with pytest.raises(RuntimeError, match="close"):
        parallel.put(1)


def test_with_closes_and_stops_the_workers():
    before = set(threading.enumerate())
    with pe.Parallel(2, Doubler(), serial_init=False) as parallel:
        parallel.put(1)
        assert parallel.get() == 2
        workers = [t for t in threading.enumerate() if t not in before]
        assert len(workers) == 2
    assert not any(t.is_alive() for t in workers)
    with pytest.raises(RuntimeError):
        parallel.put(1)


def test_dropping_the_last_reference_stops_the_workers():
    before = set(threading.enumerate())
    parallel = pe.Parallel(2, Doubler(), serial_init=False)
    parallel.put(1)
    assert parallel.get() == 2
    workers = [t for t in threading.enumerate() if t not in before]
    assert len(workers) == 2
    del parallel
    gc.collect()
    for thread in workers:
        thread.join(TIMEOUT)
    assert not any(t.is_alive() for t in workers)


@pytest.mark.parametrize(
    ("num_workers", "parallizable", "error", "match"),
    [
        (-1, Doubler(), ValueError, "num_workers must be >= 0"),
        (2.0, Doubler(), TypeError, "num_workers must be an int"),
        ("2", Doubler(), TypeError, "num_workers must be an int"),
        (2, object(), TypeError, "forward_backward"),
        (2, None, TypeError, "forward_backward"),
    ],
)
def test_construction_errors(num_workers, parallizable, error, match):
    with pytest.raises(error, match=match):
        pe.Parallel(num_workers, parallizable)


def test_keyword_arguments_keep_the_original_spelling():
    with pe.Parallel(num_workers=0, parallizable=Doubler(), serial_init=False) as parallel:
        parallel.put(2)
        assert parallel.get() == 4


def test_parallelizable_forward_backward_is_abstract():
    with pytest.raises(NotImplementedError):
        pe.Parallelizable().forward_backward(0)
