"""``Parallel``/``Parallelizable``: a drop-in for gluonnlp 0.10.0's.

The scenario of gluonnlp's own ``test_parallel`` runs on both
implementations; the rest checks where ours differs on purpose (errors do
not hang, ``get()`` with nothing pending, ``close()``) and its checks.
"""

import gc
import threading
import time
import weakref

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import _shim_worker

from helpers import CPU2, TIMEOUT, left_their_executor, make_restore_fail_once, wait_until_workers_end

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


def close(parallel):
    """Stop either implementation's workers (gluonnlp's stop only in __del__)."""
    if isinstance(parallel, pe.Parallel):
        parallel.close()
    else:
        parallel.__del__()


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
    """Echoes x; the call for "first put" sets ``started``, then waits for ``release``."""

    def __init__(self, release):
        self._release = release
        self.started = threading.Event()

    def forward_backward(self, x):
        if x == "first put":
            self.started.set()
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
    assert left_their_executor(workers)
    with pytest.raises(RuntimeError):
        parallel.put(1)


class Payload:
    """A result that can be watched through a weak reference."""


class MakesPayloads(pe.Parallelizable):
    def forward_backward(self, x):
        return Payload()


def test_an_idle_worker_keeps_no_call_or_result_alive():
    with pe.Parallel(1, MakesPayloads(), serial_init=False) as parallel:
        parallel.put("x")
        watched = weakref.ref(parallel.get())  # dropped by the caller at once
        deadline = time.monotonic() + TIMEOUT
        while watched() is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker drops its references just after reporting
        assert watched() is None


def test_dropping_the_last_reference_stops_the_workers():
    before = set(threading.enumerate())
    parallel = pe.Parallel(2, Doubler(), serial_init=False)
    parallel.put(1)
    assert parallel.get() == 2
    workers = [t for t in threading.enumerate() if t not in before]
    assert len(workers) == 2
    slots = parallel._executor._slots  # they hold no reference to the Parallel
    del parallel
    gc.collect()
    assert wait_until_workers_end(slots)
    assert left_their_executor(workers)


class NotImplemented_(pe.Parallelizable):
    """Forgot to implement forward_backward."""


@pytest.mark.parametrize(
    ("num_workers", "parallizable", "error", "match"),
    [
        (-1, Doubler(), ValueError, "num_workers must be >= 0, got -1"),
        (2.0, Doubler(), TypeError, "num_workers must be an integer .*got float: 2.0"),
        ("2", Doubler(), TypeError, "num_workers must be an integer .*got str: '2'"),
        (np.float64(2), Doubler(), TypeError, "num_workers must be an integer"),
        (2, object(), TypeError, "forward_backward"),
        (2, None, TypeError, "forward_backward"),
        (2, Doubler, TypeError, r"an instance, got the class Doubler itself; write Parallel\(num_workers, Doubler\("),
        (2, pe.Parallelizable(), TypeError, "Parallelizable does not implement forward_backward"),
        (2, NotImplemented_(), TypeError, "NotImplemented_ does not implement forward_backward"),
    ],
)
def test_construction_errors(num_workers, parallizable, error, match):
    with pytest.raises(error, match=match):
        pe.Parallel(num_workers, parallizable)


@pytest.mark.parametrize("num_workers", [np.int64(2), np.int32(1), True, 0])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_num_workers_takes_any_integer_like_value(implementation, num_workers):
    # gluonnlp passes num_workers to range(): numpy integers and bools work.
    parallel = implementation()(num_workers, Doubler(), serial_init=False)
    try:
        for x in range(3):
            parallel.put(x)
        assert sorted(parallel.get() for _ in range(3)) == [0, 2, 4]
    finally:
        close(parallel)


def test_negative_num_workers_raises_where_gluonnlp_runs_inline():
    # A documented difference (docs/migrating.md): gluonnlp's range(-1) starts
    # no thread and runs every call inline; here it is a ValueError.
    caller = threading.get_ident()

    class Where(pe.Parallelizable):
        def forward_backward(self, x):
            return threading.get_ident()

    theirs = gluonnlp_s()(-1, Where())
    theirs.put(0)
    assert theirs.get() == caller
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        pe.Parallel(-1, Where())


def test_keyword_arguments_keep_the_original_spelling():
    with pe.Parallel(num_workers=0, parallizable=Doubler(), serial_init=False) as parallel:
        parallel.put(2)
        assert parallel.get() == 4


def test_parallelizable_forward_backward_says_what_to_implement():
    with pytest.raises(NotImplementedError, match=r"NotImplemented_ must implement forward_backward\(self, x\)"):
        NotImplemented_().forward_backward(0)


# --- start order: put() order, as gluonnlp's shared queue ----------------------


class StartOrder(pe.Parallelizable):
    """Records the order calls start in; "A" waits for ``release_a``."""

    def __init__(self):
        self.started = []  # appended to by the calls, one at a time (see the test)
        self.a_started = threading.Event()
        self.release_a = threading.Event()

    def forward_backward(self, x):
        self.started.append(x)
        if x == "A":
            self.a_started.set()
            assert self.release_a.wait(TIMEOUT)
        return x


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_calls_start_in_put_order(implementation):
    # A keeps one worker busy. Per-worker queues filled in turn would put C
    # behind A and D on the free worker, so D would start before C.
    probe = StartOrder()
    parallel = implementation()(2, probe, serial_init=False)
    try:
        parallel.put("A")
        assert probe.a_started.wait(TIMEOUT)
        for x in "BCD":
            parallel.put(x)
        # One worker is free: B and C run on it one after the other (and with
        # gluonnlp, D too), so the order they start in is not a race.
        got = [parallel.get(), parallel.get()]
        probe.release_a.set()
        got += [parallel.get(), parallel.get()]
    finally:
        probe.release_a.set()
        close(parallel)
    assert probe.started == ["A", "B", "C", "D"]
    assert got[:2] == ["B", "C"]


# --- autograd flags: the caller's at put(), on every call ------------------------


class Flags(pe.Parallelizable):
    def forward_backward(self, x):
        return (autograd.is_recording(), autograd.is_training())


FLAG_SCOPES = {
    "record": (autograd.record, (True, True)),
    "record_predict": (lambda: autograd.record(train_mode=False), (True, False)),
    "train_mode": (autograd.train_mode, (False, True)),
}


@pytest.mark.parametrize("scope", FLAG_SCOPES)
def test_every_call_runs_with_the_callers_autograd_flags_at_put(scope):
    # Our decision: inline and worker calls alike see the caller's flags, as
    # ContextExecutor tasks do, and the workers' own flags are restored after.
    enter, flags = FLAG_SCOPES[scope]
    with pe.Parallel(2, Flags(), serial_init=True) as parallel:
        with enter():
            for x in range(4):  # 2 inline (serial init), then 2 on the workers
                parallel.put(x)
        assert [parallel.get() for _ in range(4)] == [flags] * 4
        for x in range(4):  # outside the scope: off everywhere, workers included
            parallel.put(x)
        assert [parallel.get() for _ in range(4)] == [(False, False)] * 4


class LeavesRecordingOn(pe.Parallelizable):
    def forward_backward(self, x):
        if x == "leave it on":
            autograd.set_recording(True)  # and never set it back
        return autograd.is_recording()


def test_a_call_that_leaves_recording_on_does_not_reach_the_next():
    # The next call's caller is not recording either: the loop sets no flag
    # before it (they are known to be the worker's own), so this holds only
    # because every call's flags are put back after it.
    with pe.Parallel(1, LeavesRecordingOn(), serial_init=False) as parallel:
        parallel.put("leave it on")
        assert parallel.get() is True
        parallel.put("next")
        assert parallel.get() is False


class LeavesAContextEntered(pe.Parallelizable):
    def forward_backward(self, x):
        if x == "leave it entered":
            mx.cpu(3).__enter__()  # and never leave it
        return mx.current_context()


def test_a_call_that_leaves_a_context_entered_does_not_reach_the_next():
    with pe.Parallel(1, LeavesAContextEntered(), serial_init=False) as parallel:
        parallel.put("leave it entered")
        assert parallel.get() == mx.cpu(3)
        parallel.put("next")
        assert parallel.get() == mx.cpu(0)  # the worker's own


def test_after_putting_the_flags_back_failed_the_next_call_gets_its_flags_set(monkeypatch):
    make_restore_fail_once(_shim_worker, monkeypatch)  # the first call leaves recording on
    with pe.Parallel(1, LeavesRecordingOn(), serial_init=False) as parallel:
        parallel.put("leave it on")
        with pytest.raises(RuntimeError, match="refused a flag"):
            parallel.get()
        parallel.put("next")
        assert parallel.get() is False  # the flags were unknown, so they were set


@pytest.mark.parametrize("scope", FLAG_SCOPES)
def test_gluonnlp_worker_calls_run_with_autograd_off(scope):
    # The documented difference (docs/migrating.md): gluonnlp's worker threads
    # never see the caller's flags, only its inline serial-init calls do.
    enter, flags = FLAG_SCOPES[scope]
    parallel = gluonnlp_s()(2, Flags(), serial_init=True)
    try:
        with enter():
            for x in range(4):
                parallel.put(x)
        assert [parallel.get() for _ in range(4)] == [flags, flags, (False, False), (False, False)]
    finally:
        close(parallel)


def test_recording_in_the_caller_then_backward_there():
    # What the decision allows and gluonnlp's worker calls cannot do: record
    # in the caller around put(), backward() on what get() returned.
    class Forward(pe.Parallelizable):
        def forward_backward(self, x):
            return (x * x).sum()

    xs = [mx.nd.array([1.0, 2.0], ctx=c) for c in CPU2]
    for x in xs:
        x.attach_grad()
    with pe.Parallel(2, Forward(), serial_init=False) as parallel:
        with autograd.record():
            for x in xs:
                parallel.put(x)
            losses = [parallel.get() for _ in xs]
        autograd.backward(losses)
    for x in xs:
        np.testing.assert_allclose(x.grad.asnumpy(), [2.0, 4.0])


# --- recovering after a forward_backward raised in put-all/get-all --------------


def get_all(parallel, n):
    """docs/migrating.md's recovery helper: take all ``n`` outcomes, then raise the first error."""
    results, error = [], None
    for _ in range(n):
        try:
            results.append(parallel.get())
        except Exception as exc:  # noqa: PERF203 - keep going: every put gets its get
            error = error or exc
    if error is not None:
        raise error
    return results


class FailOn(pe.Parallelizable):
    def __init__(self, bad):
        self.bad = bad

    def forward_backward(self, x):
        if x == self.bad:
            raise ValueError(f"bad shard {x}")
        return x


def test_stopping_at_the_first_error_leaves_results_a_step_behind():
    # The trap the documentation warns of: the other shard's result stays
    # queued, and the next batch's get() returns it.
    with pe.Parallel(2, FailOn(bad=0), serial_init=False) as parallel:
        try:
            for x in (0, 1):
                parallel.put(x)
            [parallel.get() for _ in range(2)]
        except ValueError:
            pass
        for x in (10, 11):
            parallel.put(x)
        stale = [parallel.get(), parallel.get()]
        assert 1 in stale  # the first batch's result, not the second's
        parallel.get()  # drained


def test_get_all_keeps_batches_in_step_after_an_error():
    with pe.Parallel(2, FailOn(bad=0), serial_init=False) as parallel:
        for x in (0, 1):
            parallel.put(x)
        with pytest.raises(ValueError, match="bad shard 0"):
            get_all(parallel, 2)
        for x in (10, 11):
            parallel.put(x)
        assert sorted(get_all(parallel, 2)) == [10, 11]
        with pytest.raises(RuntimeError, match="no pending put"):
            parallel.get()


# --- which worker runs a call: a free one, from one shared queue ----------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_free_worker_takes_a_call_while_another_is_busy(implementation):
    # A holds one worker, B ran on the other; C is taken by the free worker at
    # once, as in gluonnlp (docs/migrating.md), instead of waiting behind A.
    a_started, release_a, c_started = threading.Event(), threading.Event(), threading.Event()

    class Probe(pe.Parallelizable):
        def forward_backward(self, x):
            if x == "A":
                a_started.set()
                assert release_a.wait(TIMEOUT)
            if x == "C":
                c_started.set()
            return x

    parallel = implementation()(2, Probe(), serial_init=False)
    try:
        parallel.put("A")
        assert a_started.wait(TIMEOUT)
        parallel.put("B")
        assert parallel.get() == "B"
        parallel.put("C")
        assert c_started.wait(TIMEOUT)
        assert parallel.get() == "C"
        release_a.set()
        assert parallel.get() == "A"
    finally:
        release_a.set()
        close(parallel)


@pytest.mark.parametrize("serial_init", [True, False])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_call_may_put_another(implementation, serial_init):
    # A serial-init call runs inline while put() holds the serial lock: a put
    # from inside it runs inline too (gluonnlp recurses), rather than deadlock.
    class Nested(pe.Parallelizable):
        def __init__(self):
            self.parallel = None

        def forward_backward(self, x):
            if x == "outer":
                self.parallel.put("inner")
            return x

    nested = Nested()
    parallel = nested.parallel = implementation()(1, nested, serial_init=serial_init)
    try:
        putter = threading.Thread(target=parallel.put, args=("outer",), daemon=True)  # daemon: a deadlock fails
        putter.start()
        putter.join(TIMEOUT)
        assert not putter.is_alive(), "put() from inside a call deadlocked"
        assert sorted([parallel.get(), parallel.get()]) == ["inner", "outer"]
    finally:
        nested.parallel = None
        close(parallel)
