"""Issue 15's scenario: fresh networks first used after every gate opened.

An executor over 2 or 4 cpu contexts runs one trivial task per worker (every
serial-init gate opens); then, per trial, a fresh network whose parameters
are all deferred (no ``in_units``), initialised on every context, runs one
forward+backward per context through ``ex.map``. A trial fails if a task
raises or the trained replicas differ. Prints failures per setting, with the
lazy-init lock (``on``, as shipped) or without it (``off``: ``install`` made a
no-op before the first executor starts).

    python benchmarks/lazy_init_trials.py off   # the issue's 77 of 80
    python benchmarks/lazy_init_trials.py on    # 0 failures
    python benchmarks/lazy_init_trials.py on --trials 20 --net conv
"""

import argparse
import collections
from typing import Sequence, Union

import mxnet as mx
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import _lazy_init


def fresh_net(kind: str, ctxs: Sequence[mx.Context], hybridize: Union[bool, str]) -> gluon.HybridSequential:
    net = gluon.nn.HybridSequential()
    if kind == "dense":  # the network
        for _ in range(4):
            net.add(gluon.nn.Dense(16, activation="relu"))
        net.add(gluon.nn.Dense(4))
    elif kind == "conv":  # BatchNorm: aux parameters, per-context running stats
        net.add(gluon.nn.Conv2D(4, 3), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
        net.add(gluon.nn.Conv2D(4, 3), gluon.nn.Flatten(), gluon.nn.Dense(4))
    else:  # lstm: shapes set by _RNNLayer.infer_shape
        net.add(gluon.rnn.LSTM(8, num_layers=2, layout="NTC"), gluon.nn.Dense(4))
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    if hybridize == "static":
        net.hybridize(static_alloc=True, static_shape=True)
    elif hybridize:
        net.hybridize()
    return net


def batch(kind: str, n: int) -> mx.nd.NDArray:
    shape = {"dense": (4 * n, 8), "conv": (2 * n, 1, 8, 8), "lstm": (2 * n, 5, 3)}[kind]
    return mx.nd.random.normal(shape=shape)


def trial(ex: pe.ContextExecutor, kind: str, ctxs: Sequence[mx.Context], hybridize: Union[bool, str]) -> None:
    net = fresh_net(kind, ctxs, hybridize)

    def step(x: mx.nd.NDArray) -> float:
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        return loss.asscalar()

    list(ex.map(step, gluon.utils.split_and_load(batch(kind, len(ctxs)), ctxs)))
    for param in net.collect_params().values():
        if param.grad_req == "null":
            continue  # BatchNorm's running stats differ per shard by design
        first, *others = (d.asnumpy() for d in param.list_data())
        if any((other != first).any() for other in others):
            raise AssertionError(f"replicas of {param.name} differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", choices=["on", "off"])
    parser.add_argument("--trials", type=int, default=20, help="per setting (default 20)")
    parser.add_argument("--net", choices=["dense", "conv", "lstm"], default="dense")
    parser.add_argument("--static", action="store_true", help="also hybridize(static_alloc, static_shape)")
    args = parser.parse_args()
    if args.lock == "off":
        _lazy_init.install = lambda: None
    errors: collections.Counter[str] = collections.Counter()
    failed = total = 0
    for hybridize in [False, True] + (["static"] if args.static else []):
        for n in (2, 4):
            ctxs = [mx.cpu(i) for i in range(n)]
            fails = 0
            with pe.ContextExecutor(ctxs) as ex:
                list(ex.map(abs, range(n)))  # every gate opens
                for _ in range(args.trials):
                    try:
                        trial(ex, args.net, ctxs, hybridize)
                    except Exception as exc:  # noqa: BLE001 - counted and summarised below
                        fails += 1
                        errors[f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"] += 1
            print(f"{args.net}, hybridize={hybridize}, {n} workers: {fails} of {args.trials} failed")
            failed += fails
            total += args.trials
    print(f"lock {args.lock}: {failed} of {total} trials failed")
    for message, count in errors.most_common(5):
        print(f"  {count:3d}  {message}")


if __name__ == "__main__":
    main()
