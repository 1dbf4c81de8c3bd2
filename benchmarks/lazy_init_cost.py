"""What the lazy-initialisation lock costs in steady state (parallel_exec._lazy_init).

Gluon's lazy-init steps are wrapped once the first ContextExecutor starts.
This script compares, in one process and in alternating rounds, the wrapped
and the original methods: a ``Parameter.data(ctx)`` call, and training steps
of an imperative and a hybridized 13-layer network through the sequential
loop and ``ContextExecutor.map`` on cpu(0), cpu(1). It prints the medians of
the paired ratios (wrapped / original time).

    python benchmarks/lazy_init_cost.py
"""

import statistics
import time
import timeit
from typing import Any, Callable, Dict, Sequence, Tuple

import mxnet as mx
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import _lazy_init

ROUNDS = 9
STEPS = 30
PATCHED = {
    gluon.Parameter: ["_finish_deferred_init", "data", "list_data", "grad", "list_grad"],
    gluon.HybridBlock: ["_deferred_infer_shape", "_get_graph", "_call_cached_op"],
}
# (class, method name) -> the function in the class's __dict__.
Methods = Dict[Tuple[type, str], Callable[..., Any]]


def methods() -> Methods:
    return {(cls, name): cls.__dict__[name] for cls, names in PATCHED.items() for name in names}


def use(table: Methods) -> None:
    for (cls, name), method in table.items():
        setattr(cls, name, method)


def paired(run: Callable[[], float], original: Methods, wrapped: Methods) -> float:
    """Median over alternating rounds of run()'s time wrapped / original."""
    ratios = []
    for round_ in range(ROUNDS):
        times = {}
        order = [("original", original), ("wrapped", wrapped)]
        for label, table in order if round_ % 2 else reversed(order):
            use(table)
            times[label] = run()
        ratios.append(times["wrapped"] / times["original"])
    use(wrapped)
    return statistics.median(ratios)


def main() -> None:
    original = methods()
    _lazy_init.install()
    wrapped = methods()
    ctxs = [mx.cpu(0), mx.cpu(1)]

    dense = gluon.nn.Dense(4, in_units=4)
    dense.initialize(ctx=mx.cpu(0))
    read = lambda: min(timeit.repeat(lambda: dense.weight.data(mx.cpu(0)), number=20000, repeat=3))  # noqa: E731
    print(f"Parameter.data(ctx): {paired(read, original, wrapped):.3f}x")

    for hybridize in (False, True):
        measure_training(hybridize, ctxs, original, wrapped)


def timed(body: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(STEPS):
            body()
        mx.nd.waitall()
        return time.perf_counter() - start

    return run


def measure_training(hybridize: bool, ctxs: Sequence[mx.Context], original: Methods, wrapped: Methods) -> None:
    net = gluon.nn.HybridSequential()
    for _ in range(12):
        net.add(gluon.nn.Dense(128, activation="relu", in_units=128))
    net.add(gluon.nn.Dense(10, in_units=128))
    net.initialize(ctx=ctxs)
    if hybridize:
        net.hybridize()
    shards = [mx.nd.ones((32, 128), ctx=c) for c in ctxs]

    def step(x: mx.nd.NDArray) -> mx.nd.NDArray:
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        return loss

    with pe.ContextExecutor(ctxs) as ex:
        list(ex.map(step, shards))
        loop = timed(lambda: [step(x) for x in shards])
        mapped = timed(lambda: list(ex.map(step, shards)))
        name = "hybridized" if hybridize else "imperative"
        print(f"{name} step, sequential loop: {paired(loop, original, wrapped):.3f}x")
        print(f"{name} step, ContextExecutor.map: {paired(mapped, original, wrapped):.3f}x")


if __name__ == "__main__":
    main()
