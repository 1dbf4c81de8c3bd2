"""The ``Parallel`` shim under stress: every put gets exactly one outcome.

test_gluonnlp_shim.py has one round of two workers raising at once and a put after
close. Here: many rounds of every worker raising at once (``Exception`` and
``BaseException`` kinds), puts and gets from several threads, and a put
that races ``close()``; and a fork with calls pending.
"""

import os
import signal
import threading

import mxnet as mx
import pytest

import parallel_exec as pe
from parallel_exec import _forkguard

from helpers import TIMEOUT

NUM_WORKERS = 4


class RaiseTogether(pe.Parallelizable):
    """``x = (value, exc)``: raise ``exc`` (if any) once every worker is in a call."""

    def __init__(self):
        self.barrier = threading.Barrier(NUM_WORKERS, timeout=TIMEOUT)

    def forward_backward(self, x):
        value, exc = x
        if exc is not None:
            self.barrier.wait()  # every worker is in a raising call now
            raise exc
        return value


# The data of a call: nothing, or an NDArray on the workers' own context
# (mx.cpu(0)). Either way the calls must take the workers in turn: were they
# routed by the data to "the least busy" worker, a worker whose result was
# already taken but whose load had not yet dropped would be passed over, two
# raising calls of a round would share a worker, and the barrier would break.
@pytest.mark.parametrize("data", [None, "ndarray"])
def test_every_worker_raising_at_once_round_after_round_never_hangs(data):
    kinds = [ValueError, KeyboardInterrupt, SystemExit, RuntimeError]
    data = mx.nd.zeros((1,), ctx=mx.cpu(0)) if data == "ndarray" else None
    with pe.Parallel(NUM_WORKERS, RaiseTogether(), serial_init=False) as parallel:
        for round_ in range(25):
            raised = {kinds[(round_ + k) % len(kinds)](round_, k) for k in range(NUM_WORKERS)}
            for exc in raised:
                parallel.put((data, exc))
            parallel.put((round_, None))
            outcomes = []
            for _ in range(NUM_WORKERS + 1):
                try:
                    outcomes.append(parallel.get())
                except BaseException as exc:  # noqa: B036 - the calls raise these on purpose
                    outcomes.append(exc)
            assert round_ in outcomes
            assert {o for o in outcomes if isinstance(o, BaseException)} == raised  # the objects themselves


def test_puts_and_gets_from_several_threads_each_get_one_outcome():
    # Four threads put 50 calls each (every 5th raises) and get 50 outcomes.
    class Checked(pe.Parallelizable):
        def forward_backward(self, x):
            if x % 5 == 0:
                raise ValueError(x)
            return x

    outcomes = [[] for _ in range(4)]

    def put_and_get(k, parallel):
        for x in range(k * 1000, k * 1000 + 50):
            parallel.put(x)
        for _ in range(50):
            try:
                outcomes[k].append(parallel.get())
            except ValueError as exc:
                outcomes[k].append(("raised", exc.args[0]))

    with pe.Parallel(NUM_WORKERS, Checked()) as parallel:
        threads = [threading.Thread(target=put_and_get, args=(k, parallel)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        with pytest.raises(RuntimeError, match="no pending put"):
            parallel.get()
    # Results come in completion order, to any getter: all of them, once each.
    got = sorted((o if isinstance(o, tuple) else ("returned", o)) for per in outcomes for o in per)
    expected = sorted(
        ("raised", x) if x % 5 == 0 else ("returned", x) for k in range(4) for x in range(k * 1000, k * 1000 + 50)
    )
    assert got == expected


class PauseOnLookup(pe.Parallelizable):
    """Pauses the armed put inside it, while close() runs.

    ``put`` looks ``forward_backward`` up before it checks ``close()``; the
    lookup signals ``in_put`` and waits for ``closed``.
    """

    def __init__(self):
        self.in_put, self.closed = threading.Event(), threading.Event()
        self._armed = False

    def arm(self):
        self._armed = True

    @property
    def forward_backward(self):
        if self._armed:
            self._armed = False
            self.in_put.set()
            assert self.closed.wait(TIMEOUT)
        return lambda x: x


def test_put_racing_close_raises_a_clear_error_and_get_does_not_hang():
    parallizable = PauseOnLookup()
    parallel = pe.Parallel(2, parallizable, serial_init=False)
    parallel.put("before")
    assert parallel.get() == "before"
    parallizable.arm()
    outcome = []

    def late_put():
        try:
            parallel.put("late")
            outcome.append("accepted")
        except RuntimeError as exc:
            outcome.append(exc)

    putter = threading.Thread(target=late_put)
    putter.start()
    try:
        assert parallizable.in_put.wait(TIMEOUT)
        parallel.close()  # the put has started, and has not submitted yet
    finally:
        parallizable.closed.set()
        putter.join(TIMEOUT)
    # The put started before close() but would submit after it.
    assert isinstance(outcome[0], RuntimeError) and "close()" in str(outcome[0])
    # It left nothing pending: get() says so instead of blocking.
    getter_outcome = []

    def get():
        try:
            getter_outcome.append(parallel.get())
        except RuntimeError as exc:
            getter_outcome.append(exc)

    getter = threading.Thread(target=get, daemon=True)  # daemon: the bug blocks it forever
    getter.start()
    getter.join(TIMEOUT)
    alive = getter.is_alive()
    if alive:  # unblock it, so the thread does not leak past the test
        parallel._done.put(None)
        getter.join(TIMEOUT)
    assert not alive, "get() blocked forever after a put() that raised"
    assert "no pending put" in str(getter_outcome[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_put_after_close_from_another_thread_raises(num_workers):
    parallel = pe.Parallel(num_workers, RaiseTogether())
    parallel.put((1, None))
    parallel.close()
    errors = []

    def put():
        try:
            parallel.put((2, None))
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    thread.join(TIMEOUT)
    assert len(errors) == 1 and "close()" in str(errors[0])
    assert parallel.get() == 1
    with pytest.raises(RuntimeError, match="no pending put"):
        parallel.get()


# --- os.fork() with calls pending -------------------------------------------------


class Blocking(pe.Parallelizable):
    """Echoes x; "block" calls wait for ``release`` once all ``n`` have started."""

    def __init__(self, n):
        self.all_started = threading.Barrier(n + 1, timeout=TIMEOUT)
        self.release = threading.Event()

    def forward_backward(self, x):
        if x == "block":
            self.all_started.wait()
            assert self.release.wait(TIMEOUT)
        return x


def in_forked_child(parallel, num_early, num_pending):
    """What the child checks; returns the lines it reports."""
    lines = [repr(parallel.get()) for _ in range(num_early)]  # reported before the fork
    for _ in range(num_pending):  # the "block" calls (running at the fork) and "queued"
        try:
            parallel.get()
            lines.append("returned")
        except RuntimeError as exc:
            lines.append("os.fork()" in str(exc) and "raised naming os.fork()")
    try:
        parallel.get()
    except RuntimeError as exc:
        lines.append("no pending put" in str(exc) and "nothing pending")
    try:
        parallel.put("new")
    except RuntimeError as exc:
        lines.append("put: " + ("os.fork()" in str(exc) and "refused naming os.fork()"))
    with pe.Parallel(1, Blocking(0), serial_init=False) as fresh:
        fresh.put("fresh")
        lines.append(fresh.get())
    return lines


@pytest.mark.parametrize("num_workers", [1, 4])
def test_forked_child_get_raises_at_once_for_calls_pending_at_the_fork(num_workers, monkeypatch):
    # The "block" calls are running at the fork: the fork need not wait for them.
    monkeypatch.setattr(_forkguard, "FORK_WAIT_SECONDS", 0.05)
    parallizable = Blocking(num_workers)
    parallel = pe.Parallel(num_workers, parallizable, serial_init=True)
    try:
        for _ in range(num_workers):
            parallel.put("early")  # serial init: run inline, so reported before the fork
        for _ in range(num_workers):
            parallel.put("block")  # one per worker
        parallizable.all_started.wait()
        parallel.put("queued")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                # A get() that blocks kills the child, not the test; SIG_DFL: the
                # kernel ends it, whatever Python handler pytest-timeout set.
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(TIMEOUT)
                lines = in_forked_child(parallel, num_early=num_workers, num_pending=num_workers + 1)
                os.write(write_end, "\n".join(map(str, lines)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as report:
            lines = report.read().splitlines()
        _, status = os.waitpid(pid, 0)
        assert status == 0, f"child ended with status {status:#x}; reported {lines}"
        assert lines == ["'early'"] * num_workers + ["raised naming os.fork()"] * (num_workers + 1) + [
            "nothing pending", "put: refused naming os.fork()", "fresh"
        ]
        # The parent is unaffected: every put gets its outcome.
        parallizable.release.set()
        assert sorted(parallel.get() for _ in range(2 * num_workers + 1)) == sorted(
            ["early"] * num_workers + ["block"] * num_workers + ["queued"]
        )
    finally:
        parallizable.release.set()
        parallel.close()


# --- a put() interrupted after it queued the call ------------------------------------


class Interrupted(Exception):
    """Stands for a KeyboardInterrupt arriving in put(), just after it queued the call."""


class QueueThenRaise:
    """Wraps the shared queue of calls: put() queues, then raises ``Interrupted``."""

    def __init__(self, inputs, before_raising):
        self._inputs = inputs
        self._before_raising = before_raising

    def put(self, call):
        self._inputs.put(call)
        self._before_raising()
        raise Interrupted

    def get(self):
        return self._inputs.get()


@pytest.mark.parametrize("taken_first", [False, True])
def test_put_interrupted_after_queueing_leaves_one_outcome_per_successful_put(taken_first):
    started = {x: threading.Event() for x in ("busy", "late", "after")}
    release_busy = threading.Event()

    class Echo(pe.Parallelizable):
        def forward_backward(self, x):
            started[x].set()
            if x == "busy":
                assert release_busy.wait(TIMEOUT)
            return x

    parallel = pe.Parallel(1, Echo(), serial_init=False)
    calls = parallel._calls
    real_inputs = calls.inputs

    def before_raising():
        if taken_first:
            assert started["late"].wait(TIMEOUT)  # the loop has taken the call

    try:
        if not taken_first:
            parallel.put("busy")  # holds the one worker: the late call waits in the queue
            assert started["busy"].wait(TIMEOUT)
        calls.inputs = QueueThenRaise(real_inputs, before_raising)
        with pytest.raises(Interrupted):
            parallel.put("late")
        calls.inputs = real_inputs
        release_busy.set()
        if taken_first:  # the call ran: its outcome is the next get()'s
            assert parallel.get() == "late"
        else:  # taken back: the loop skips it
            assert parallel.get() == "busy"
        parallel.put("after")
        assert parallel.get() == "after"
        with pytest.raises(RuntimeError, match="no pending put"):
            parallel.get()
        assert started["late"].is_set() == taken_first
    finally:
        calls.inputs = real_inputs
        release_busy.set()
        parallel.close()
