"""Routing: which worker a task runs on.

Two layers: the pure helpers in ``parallel_exec._routing`` (no threads, checked
against an independent reference walk with hypothesis), then the executor,
where the worker a task landed on is read from inside the task with
``pe.current_context()`` and ``threading.current_thread().name``.
"""

import collections
import itertools
import logging
import threading

import hypothesis.strategies as st
import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings

import parallel_exec as pe
from parallel_exec._routing import find_first_ndarray, pick_least_loaded

from helpers import CPU2, TIMEOUT

Point = collections.namedtuple("Point", "x y")

# Distinct small arrays; tests compare with ``is``, so identity matters.
A = mx.nd.zeros((1,), ctx=mx.cpu(0))
B = mx.nd.ones((1,), ctx=mx.cpu(1))
C = mx.nd.ones((2,), ctx=mx.cpu(0))


def where():
    """Inside a task: the worker's context and thread name."""
    return pe.current_context(), threading.current_thread().name


def submit_and_locate(ex, *args, **kwargs):
    """Submit a task with these arguments; return the context it ran on."""
    return ex.submit(lambda *a, **k: pe.current_context(), *args, **kwargs).result(TIMEOUT)


# --- find_first_ndarray: worked examples -------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        pytest.param((), {}, None, id="nothing"),
        pytest.param((None, 1, "text", 2.5), {"k": None}, None, id="no-ndarray"),
        pytest.param((A,), {}, A, id="first-positional"),
        pytest.param((1, B, A), {}, B, id="leftmost-positional"),
        pytest.param((1, [2, [3, B]], A), {}, B, id="nested-lists"),
        pytest.param(((1, (None, B)), A), {}, B, id="nested-tuples"),
        pytest.param((Point(x=1, y=B), A), {}, B, id="namedtuple"),
        pytest.param(({"k": 1, "v": B}, A), {}, B, id="dict-values"),
        pytest.param(([{"a": (1, [B])}], A), {}, B, id="mixed-nesting"),
        pytest.param(([], (), {}, [[]]), {"x": B}, B, id="empty-containers-then-kwarg"),
        pytest.param((1, [A]), {"x": B}, A, id="positional-before-kwargs"),
        pytest.param((1, 2), {"z": B, "a": A}, B, id="kwargs-in-call-order-not-sorted"),
        pytest.param((), {"x": [None, {"d": C}], "y": A}, C, id="nested-kwarg"),
        pytest.param(([1, [2]], [3]), {"x": B}, B, id="depth-first-then-kwargs"),
    ],
)
def test_find_first_ndarray_examples(args, kwargs, expected):
    assert find_first_ndarray(args, kwargs) is expected


def test_find_first_ndarray_is_depth_first_not_breadth_first():
    # Breadth-first would find A (depth 1) before B (depth 3).
    assert find_first_ndarray(([[[B]]], A), {}) is B


def test_find_first_ndarray_does_not_descend_into_other_iterables():
    # Only lists, tuples and dict values are walked: an iterator passed as an
    # argument must not be consumed, and sets/dict keys are not looked into.
    iterator = iter([A])
    assert find_first_ndarray((iterator, {A: 1}, frozenset([A]), {A}), {}) is None
    assert next(iterator) is A


def test_find_first_ndarray_survives_cycles():
    looped_list = [1]
    looped_list.append(looped_list)
    looped_dict = {}
    looped_dict["self"] = looped_dict
    assert find_first_ndarray((looped_list, looped_dict), {"k": looped_list}) is None

    looped_list.append(B)  # after the cycle: still found
    assert find_first_ndarray((looped_list,), {}) is B
    looped_dict["x"] = A
    assert find_first_ndarray((looped_dict,), {}) is A


def test_find_first_ndarray_handles_deep_nesting():
    # Far deeper than the recursion limit: the walk must not recurse.
    deep = B
    for _ in range(20_000):
        deep = [deep]
    assert find_first_ndarray((deep,), {}) is B
    empty_deep = None
    for _ in range(20_000):
        empty_deep = (empty_deep,)
    assert find_first_ndarray((empty_deep,), {"x": A}) is A


# --- find_first_ndarray: properties ------------------------------------------


class Hostile:
    """A leaf that fails on anything but identity: the walk must not touch it."""

    def __eq__(self, other):
        raise AssertionError("compared")

    def __hash__(self):
        raise AssertionError("hashed")

    def __bool__(self):
        raise AssertionError("truth-tested")

    def __iter__(self):
        raise AssertionError("iterated")

    def __len__(self):
        raise AssertionError("len() taken")

    def __repr__(self):
        return "Hostile()"


POOL = [A, B, C, mx.nd.zeros((3,), ctx=mx.cpu(1))]

leaves = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.builds(np.arange, st.integers(0, 3)),  # truth-testing it raises
    st.builds(Hostile),
    st.sampled_from(POOL),
)
keys = st.from_regex(r"[a-z]{1,3}", fullmatch=True)
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.builds(Point, children, children),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=20,
)


def reference_ndarrays(obj):
    """Independent reference: yield the NDArrays of ``obj`` depth-first."""
    if isinstance(obj, mx.nd.NDArray):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from reference_ndarrays(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from reference_ndarrays(value)


@settings(max_examples=150, deadline=None)
@given(args=st.lists(nested, max_size=4).map(tuple), kwargs=st.dictionaries(keys, nested, max_size=3))
def test_find_first_ndarray_matches_reference_walk(args, kwargs):
    walk = itertools.chain(reference_ndarrays(list(args)), reference_ndarrays(list(kwargs.values())))
    assert find_first_ndarray(args, kwargs) is next(walk, None)


# --- pick_least_loaded --------------------------------------------------------


@pytest.mark.parametrize(
    "loads, expected",
    [([0], 0), ([3, 1, 2], 1), ([1, 0, 0], 1), ([2, 2], 0), ([5, 4, 4, 0], 3)],
)
def test_pick_least_loaded_examples(loads, expected):
    assert pick_least_loaded(loads) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=8))
def test_pick_least_loaded_picks_a_minimum_first_on_ties(loads):
    assert pick_least_loaded(loads) == loads.index(min(loads))


# --- the executor routes by the first NDArray ---------------------------------


@pytest.mark.parametrize(
    "make_call, expected",
    [
        pytest.param(lambda a0, a1: ((a1,), {}), 1, id="positional"),
        pytest.param(lambda a0, a1: ((a0,), {}), 0, id="positional-cpu0"),
        pytest.param(lambda a0, a1: ((1, [None, (2, {"k": a1})], a0), {}), 1, id="nested"),
        pytest.param(lambda a0, a1: ((1, "x"), {"y": a1, "z": a0}), 1, id="kwargs-call-order"),
        pytest.param(lambda a0, a1: ((3, a0), {"y": a1}), 0, id="positional-before-kwargs"),
    ],
)
def test_submit_runs_on_the_context_of_the_first_ndarray(executor, make_call, expected):
    a0 = mx.nd.ones((2,), ctx=mx.cpu(0))
    a1 = mx.nd.ones((2,), ctx=mx.cpu(1))
    args, kwargs = make_call(a0, a1)
    # Several times in a row: round-robin would alternate between workers.
    seen = [submit_and_locate(executor, *args, **kwargs) for _ in range(4)]
    assert seen == [CPU2[expected]] * 4


def test_map_routes_each_call(executor):
    shards = [mx.nd.ones((2,), ctx=c) for c in (mx.cpu(1), mx.cpu(1), mx.cpu(0), mx.cpu(1))]
    seen = list(executor.map(lambda x: (pe.current_context(), x.context), shards, timeout=TIMEOUT))
    assert seen == [(x.context, x.context) for x in shards]


def test_duplicated_context_goes_to_its_least_busy_worker():
    ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1), mx.cpu(1)], serial_init=False)
    data = mx.nd.ones((2,), ctx=mx.cpu(1))
    parked, release = threading.Event(), threading.Event()

    def park(x):
        parked.set()
        release.wait(TIMEOUT)
        return where()

    try:
        busy = ex.submit(park, data)
        assert parked.wait(TIMEOUT)
        # The parked worker has one task running, its twin none.
        follow_up = ex.submit(lambda x: where(), data).result(TIMEOUT)
        release.set()
        busy_ctx, busy_name = busy.result(TIMEOUT)
        assert busy_ctx == follow_up[0] == mx.cpu(1)
        assert follow_up[1] != busy_name
    finally:
        release.set()
        ex.shutdown(wait=True)


def test_work_submitted_on_completion_avoids_the_busy_twin():
    # A completed task no longer counts towards its worker's load, even in a
    # done-callback that runs in that worker right after completion.
    ex = pe.ContextExecutor([mx.cpu(1), mx.cpu(1)], serial_init=False)
    data = mx.nd.ones((2,), ctx=mx.cpu(1))
    parked, release, go = threading.Event(), threading.Event(), threading.Event()
    follow_up_submitted = threading.Event()
    follow_ups = []

    def park(x):
        parked.set()
        release.wait(TIMEOUT)
        return where()

    def quick(x):
        go.wait(TIMEOUT)
        return where()

    def submit_next(done):
        # Runs in the worker that completed ``done``: that task is finished.
        follow_ups.append(ex.submit(lambda x: where(), data))
        follow_up_submitted.set()

    try:
        busy = ex.submit(park, data)
        assert parked.wait(TIMEOUT)
        first = ex.submit(quick, data)  # the idle twin takes it
        first.add_done_callback(submit_next)
        go.set()
        _, free_name = first.result(TIMEOUT)
        assert follow_up_submitted.wait(TIMEOUT)
        # Cannot block on the follow-up before release if routing is wrong;
        # so look at where it ran only after releasing the parked task.
        release.set()
        _, busy_name = busy.result(TIMEOUT)
        assert follow_ups[0].result(TIMEOUT)[1] == free_name != busy_name
    finally:
        go.set()
        release.set()
        ex.shutdown(wait=True)


def thread_names_in_submission_order(ex, n, *args):
    futures = [ex.submit(lambda *a: threading.current_thread().name, *args) for _ in range(n)]
    return [f.result(TIMEOUT) for f in futures]


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda: (), id="no-args"),
        pytest.param(lambda: (1, [2, "three"], {"k": None}), id="no-ndarray"),
        pytest.param(lambda: (mx.nd.ones((1,), ctx=mx.cpu(7)),), id="ndarray-on-unknown-context"),
    ],
)
def test_falls_back_to_round_robin(make_args):
    # Three workers, two on the same context: round-robin is over workers.
    ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1), mx.cpu(1)])
    try:
        names = thread_names_in_submission_order(ex, 9, *make_args())
    finally:
        ex.shutdown(wait=True)
    assert len(set(names[:3])) == 3  # every worker takes a turn...
    assert names[3:6] == names[:3] and names[6:] == names[:3]  # ...in a fixed cycle


def test_an_ndarray_on_a_context_without_worker_is_logged_once_per_context_and_executor(caplog):
    caplog.set_level(logging.WARNING, logger="parallel_exec")
    on_cpu3, on_cpu4 = mx.nd.ones((1,), ctx=mx.cpu(3)), mx.nd.ones((1,), ctx=mx.cpu(4))
    for _ in range(2):  # a second executor warns again, for itself
        with pe.ContextExecutor(CPU2) as ex:
            for _ in range(3):
                assert submit_and_locate(ex, on_cpu3) in CPU2  # still runs, round-robin
            list(ex.map(lambda x: x, [on_cpu3, on_cpu4, on_cpu4], timeout=TIMEOUT))
            submit_and_locate(ex, mx.nd.ones((1,), ctx=mx.cpu(1)))  # known: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4, warnings
    assert [("cpu(3)" in w, "cpu(4)" in w) for w in warnings] == [(True, False), (False, True)] * 2
    assert all("[cpu(0), cpu(1)]" in w for w in warnings)  # the executor's contexts

