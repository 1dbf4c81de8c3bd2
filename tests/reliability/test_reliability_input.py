"""Bad input, property-based: routing never raises, construction fails clearly.

test_routing.py checks the pure routing walk against a reference with
hypothesis. Here the same kind of arguments go through a running executor
(NDArrays on known and unknown contexts, large structures): ``submit``
never raises and the task lands on a worker of the first NDArray's context
when a worker has it. And arbitrary bad constructor and ``submit_to`` input
always gives a ``TypeError`` or ``ValueError``.
"""

import threading

import hypothesis.strategies as st
import mxnet as mx
from hypothesis import given, settings

import parallel_exec as pe

from helpers import TIMEOUT

KNOWN = [mx.cpu(0), mx.cpu(1), mx.cpu(1)]
ARRAYS = [mx.nd.ones((1,), ctx=c) for c in (mx.cpu(0), mx.cpu(1), mx.cpu(5))]  # cpu(5): no worker

leaves = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.sampled_from(ARRAYS),
    st.integers(200, 5000).map(lambda n: list(range(n))),  # large, no NDArray inside
)
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=2), children, max_size=3),
    ),
    max_leaves=15,
)


def first_ndarray(obj):
    """Reference walk: the first NDArray of ``obj``, depth-first, or None."""
    if isinstance(obj, mx.nd.NDArray):
        return obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for child in children:
        found = first_ndarray(child)
        if found is not None:
            return found
    return None


def test_arbitrary_arguments_route_without_raising_to_the_first_ndarrays_context():
    with pe.ContextExecutor(KNOWN, serial_init=False) as ex:

        @settings(max_examples=60, deadline=None)
        @given(args=st.lists(nested, max_size=3).map(tuple), kwargs=st.dictionaries(st.text(max_size=2), nested,
                                                                                    max_size=2))
        def check(args, kwargs):
            kwargs = {f"k_{key}": value for key, value in kwargs.items()}  # valid keyword names
            future = ex.submit(lambda *a, **k: pe.current_context(), *args, **kwargs)
            ran_on = future.result(TIMEOUT)
            first = first_ndarray(list(args) + list(kwargs.values()))
            if first is not None and first.context in KNOWN:
                assert ran_on == first.context
            else:
                assert ran_on in KNOWN

        check()


junk = st.one_of(
    st.none(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=3),
    st.builds(object), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=100, deadline=None)
@given(
    contexts=st.one_of(
        junk,
        st.just([]),
        st.just(()),
        # Some valid contexts and at least one bad entry, anywhere.
        st.tuples(st.lists(st.sampled_from(KNOWN), max_size=3), st.lists(junk, min_size=1, max_size=3))
        .flatmap(lambda parts: st.permutations(parts[0] + parts[1])),
    )
)
def test_bad_contexts_always_give_a_type_or_value_error(contexts):
    before = threading.active_count()
    try:
        pe.ContextExecutor(contexts)
    except (TypeError, ValueError) as exc:
        assert str(exc)  # says what was wrong
    else:
        raise AssertionError(f"accepted contexts={contexts!r}")
    assert threading.active_count() == before  # no worker started


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.one_of(st.none(), st.integers(), st.binary(max_size=2)),
    initializer=st.one_of(st.integers(), st.text(max_size=2), st.builds(object)),
    which=st.sampled_from(["prefix", "initializer"]),
)
def test_bad_keyword_arguments_always_give_a_type_error(prefix, initializer, which):
    kwargs = {"thread_name_prefix": prefix} if which == "prefix" else {"initializer": initializer}
    before = threading.active_count()
    try:
        pe.ContextExecutor([mx.cpu(0)], **kwargs)
    except TypeError as exc:
        assert str(exc)
    else:
        raise AssertionError(f"accepted {kwargs!r}")
    assert threading.active_count() == before


def test_submit_to_bad_contexts_always_gives_a_type_or_value_error():
    with pe.ContextExecutor(KNOWN) as ex:

        @settings(max_examples=60, deadline=None)
        @given(context=st.one_of(junk, st.sampled_from([mx.cpu(2), mx.cpu(5), mx.gpu(0)])))
        def check(context):
            try:
                ex.submit_to(context, int)
            except (TypeError, ValueError) as exc:
                assert str(exc)
            else:
                raise AssertionError(f"accepted context={context!r}")

        check()
        # The executor still works after all that.
        assert [ex.submit_to(c, pe.current_context).result(TIMEOUT) for c in KNOWN] == KNOWN


def test_reference_walk_agrees_on_examples():
    # The reference used above, checked on hand-made cases.
    a, b = ARRAYS[0], ARRAYS[1]
    assert first_ndarray([[1, [b]], a]) is b
    assert first_ndarray([{"x": None, "y": (a,)}, b]) is a
    assert first_ndarray([[], (), {}, 3]) is None
