"""Section 2: data-parallel training-step throughput over N mx.cpu(i) contexts.

Two models: a Python-heavy imperative one (many small layers, not
hybridized: most of a step is Python calling MXNet operator by operator) and
a compute-heavy hybridized one (a few large matrix products per step), and
the compute-heavy one reading its loss on the host in each shard
("sync-in-step"). Ways to drive the N shards of each step: the sequential
loop, gluonnlp's ``Parallel``, ``ContextExecutor.map``, a ``ContextExecutor``
futures loop, ``pe.Parallel``, and two floors: of any threaded design, a bare
thread per context (``floors.ThreadPerContext``, nothing else), whose first
step runs one shard at a time, each on its own thread, as ``map``'s
serial-init gate runs it; of the put/get shims' design, threads sharing one
``SimpleQueue`` of calls and one of results (``floors.SharedQueue``, nothing
else; ``pe.Parallel``'s queues), whose first step runs in the caller, as the
shims' serial init does (Gluon's deferred initialisation is not
thread-safe, and on CPU contexts a block hybridized with ``static_shape``
keeps the temporary space of the thread that ran its first step on a device:
first_step_thread.py).

Every variant has its own copy of the network, loaded from the same saved
parameters, and sees the same batches in the same order; after the last round
their parameters must agree. A step ends when its results are computed:
``trainer.step`` followed by ``mx.nd.waitall()`` in the calling thread (never
in a worker). Data loading is not measured: the shards are on their devices
before timing starts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import parallel_exec as pe

from floors import SharedQueue, ThreadPerContext
from harness import Summary, close_gluonnlp_parallel, markdown_table, ratios, run_rounds

try:
    import gluonnlp.utils as gluonnlp_utils
except ImportError:
    gluonnlp_utils = None

SEQUENTIAL = "sequential loop"
GLUONNLP = "gluonnlp Parallel"
MAP = "ContextExecutor.map"
FUTURES = "ContextExecutor futures loop"
PARALLEL = "pe.Parallel"
FLOOR = "floor: a bare thread per context"
SHARED_FLOOR = "floor: one shared queue (pe.Parallel's design)"
REFERENCE = "sequential, 1 context"  # the single-context baseline every ratio to 1 context uses
VARIANTS = (SEQUENTIAL, GLUONNLP, MAP, FUTURES, PARALLEL, FLOOR, SHARED_FLOOR)
RSS_VARIANTS = (SEQUENTIAL, GLUONNLP, MAP, FUTURES)  # the peak-RSS children (one process each)
PROFILE_ROUNDS = 7  # recordings of a few steps per variant, for the span profile


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and what one shard looks like."""

    name: str
    build: Callable[[], gluon.Block]
    hybridize: bool
    batch_per_context: int
    features: int
    classes: int = 10
    learning_rate: float = 0.01
    sync: bool = False  # forward_backward reads the loss on the host (loss.mean().asscalar())


def _python_heavy() -> gluon.Block:
    # 25 tiny layers: each forward/backward is ~150 operator calls from Python.
    net = gluon.nn.Sequential()
    for _ in range(24):
        net.add(gluon.nn.Dense(16, activation="relu", in_units=16))
    net.add(gluon.nn.Dense(10, in_units=16))
    return net


def _compute_heavy() -> gluon.Block:
    # Three 1024-wide layers: a step is a few large matrix products.
    net = gluon.nn.HybridSequential()
    net.add(
        gluon.nn.Dense(1024, activation="relu", in_units=512),
        gluon.nn.Dense(1024, activation="relu", in_units=1024),
        gluon.nn.Dense(1024, activation="relu", in_units=1024),
        gluon.nn.Dense(10, in_units=1024),
    )
    return net


MODELS = {
    "python-heavy": ModelSpec("python-heavy", _python_heavy, hybridize=False, batch_per_context=64, features=16),
    "compute-heavy": ModelSpec("compute-heavy", _compute_heavy, hybridize=True, batch_per_context=128, features=512),
    # The compute-heavy step as quickstarts and gluon-nlp's scripts write it: the
    # step waits for its loss on the host, so a loop waits for each device in turn.
    "sync-in-step": ModelSpec("sync-in-step", _compute_heavy, hybridize=True, batch_per_context=128, features=512,
                              sync=True),
}


class Replica:
    """One variant's own network, trainer and loss, on ``contexts``."""

    def __init__(self, spec: ModelSpec, contexts: Sequence[mx.Context], param_file: str) -> None:
        self.spec = spec
        self.contexts = list(contexts)
        self.net = spec.build()
        self.net.load_parameters(param_file, ctx=self.contexts)
        if spec.hybridize:
            self.net.hybridize(static_alloc=True, static_shape=True)
        self.trainer = gluon.Trainer(self.net.collect_params(), "sgd", {"learning_rate": spec.learning_rate})
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        self.batch_size = spec.batch_per_context * len(self.contexts)

    def forward_backward(self, shard: Tuple[mx.nd.NDArray, mx.nd.NDArray]) -> mx.nd.NDArray:
        data, label = shard
        with autograd.record():
            loss = self.loss_fn(self.net(data), label)
        loss.backward()
        if self.spec.sync:
            return loss.mean().asscalar()
        return loss

    def fb(self, data: mx.nd.NDArray, label: mx.nd.NDArray) -> mx.nd.NDArray:
        return self.forward_backward((data, label))

    def finish_step(self) -> None:
        self.trainer.step(self.batch_size)
        mx.nd.waitall()  # the step ends when its results are computed (caller thread only)

    def parameters(self) -> List[np.ndarray]:
        return [d.asnumpy() for p in self.net.collect_params().values() for d in p.list_data()]


class _GluonnlpShard:
    """``gluonnlp.utils.Parallelizable``-style adapter around a replica."""

    def __init__(self, replica: Replica) -> None:
        self.forward_backward = replica.forward_backward


class Variant:
    """A way to drive the shards of one step; ``step(batch)`` runs one step."""

    def __init__(self, name: str, replica: Replica) -> None:
        self.name = name
        self.replica = replica
        self.executor: Optional[pe.ContextExecutor] = None
        # A gluonnlp.utils.Parallel (no type information), a pe.Parallel or a
        # floors.SharedQueue: whatever is driven through put/get.
        self.parallel: Optional[Any] = None
        self.floor: Optional[ThreadPerContext] = None
        self.steps = 0
        n = len(replica.contexts)
        if name == FLOOR:
            self.floor = ThreadPerContext(n)
        elif name == SHARED_FLOOR:
            self.parallel = SharedQueue(n, replica.forward_backward)
        elif name == GLUONNLP:
            self.parallel = gluonnlp_utils.Parallel(n, _GluonnlpShard(replica))
        elif name == PARALLEL:
            self.parallel = pe.Parallel(n, _GluonnlpShard(replica))
        elif name in (MAP, FUTURES):
            self.executor = pe.ContextExecutor(replica.contexts)

    def step(self, shards: Sequence[Tuple[mx.nd.NDArray, mx.nd.NDArray]]) -> None:
        replica = self.replica
        self.steps += 1
        if self.name in (SEQUENTIAL, REFERENCE):
            for shard in shards:
                replica.forward_backward(shard)
        elif self.name == FLOOR and self.steps == 1:  # serial: one shard at a time, each on its own thread
            assert self.floor is not None
            for index, shard in enumerate(shards):
                self.floor.call_on(index, replica.forward_backward, shard)
        elif self.name == FLOOR:
            assert self.floor is not None
            self.floor.map(replica.forward_backward, shards)  # shard i on thread i
        elif self.name == SHARED_FLOOR and self.steps == 1:  # serial init in the caller, as the shims'
            for shard in shards:
                replica.forward_backward(shard)
        elif self.name in (GLUONNLP, PARALLEL, SHARED_FLOOR):
            assert self.parallel is not None
            for shard in shards:
                self.parallel.put(shard)
            for _ in shards:
                self.parallel.get()
        elif self.name == MAP:
            assert self.executor is not None
            list(self.executor.map(replica.fb, *zip(*shards)))
        else:
            assert self.executor is not None
            futures = [self.executor.submit(replica.fb, data, label) for data, label in shards]
            for future in as_completed(futures):
                future.result()
        replica.finish_step()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        if self.floor is not None:
            self.floor.close()
        if self.name == GLUONNLP:
            close_gluonnlp_parallel(self.parallel)
        elif self.parallel is not None:
            self.parallel.close()


@dataclass
class TrainingResult:
    """One model at one N: throughput of every variant and its checks."""

    model: str
    n: int
    batch: int
    steps_per_measurement: int
    throughput: Dict[str, Summary]  # samples/s
    vs_sequential: Dict[str, Summary]  # in-round ratio to the sequential loop at this N
    vs_one_context: Dict[str, Summary]  # in-round ratio to the single-context sequential loop
    vs_best_peer: Dict[str, Summary]  # in-round ratio to the faster of the sequential loop and gluonnlp's Parallel
    agreement: Dict[str, Tuple[bool, float]]  # variant -> (allclose to sequential, max abs diff)
    # variant -> one recording per profile round; the first is drawn.
    overlap: Optional[Dict[str, List[Dict[str, Any]]]] = field(default=None)


def make_batches(
    spec: ModelSpec, contexts: Sequence[mx.Context], count: int, seed: int
) -> List[List[Tuple[mx.nd.NDArray, mx.nd.NDArray]]]:
    """``count`` batches, each a list of ``(data, label)`` shards, one per context."""
    rng = np.random.RandomState(seed)
    batches = []
    for _ in range(count):
        shards = []
        for context in contexts:
            data = rng.uniform(-1, 1, size=(spec.batch_per_context, spec.features)).astype("float32")
            label = rng.randint(0, spec.classes, size=(spec.batch_per_context,)).astype("float32")
            shards.append((mx.nd.array(data, ctx=context), mx.nd.array(label, ctx=context)))
        batches.append(shards)
    return batches


def save_initial_parameters(spec: ModelSpec, path: str, seed: int) -> None:
    """Initialise ``spec``'s network from ``seed`` and save it: every variant starts from this file."""
    mx.random.seed(seed)
    net = spec.build()
    net.initialize(mx.init.Xavier(), ctx=mx.cpu(0))
    net.save_parameters(path)


def measure(
    spec: ModelSpec, n: int, rounds: int, steps: int, warmup: int, progress: Callable[[], object],
    overlap_steps: int = 0,
) -> TrainingResult:
    """Throughput of every variant for ``spec`` on ``n`` contexts, interleaved in rounds.

    Args:
        spec: the model.
        n: number of contexts, ``mx.cpu(0)`` .. ``mx.cpu(n - 1)``.
        rounds: measurements per variant.
        steps: training steps per measurement.
        warmup: untimed steps per variant first (serial init, graph building).
        progress: called after every measurement.
        overlap_steps: if > 0, afterwards record that many steps of the
            sequential loop and of ``ContextExecutor.map`` as timelines,
            alternately, ``PROFILE_ROUNDS`` times each.
    """
    contexts = [mx.cpu(i) for i in range(n)]
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    param_file = os.path.join(workdir, "initial.params")
    save_initial_parameters(spec, param_file, seed=42)
    batches = make_batches(spec, contexts, count=4, seed=7)
    names = [v for v in VARIANTS if v != GLUONNLP or gluonnlp_utils is not None]
    variants = {name: Variant(name, Replica(spec, contexts, param_file)) for name in names}
    if n > 1:
        variants[REFERENCE] = Variant(REFERENCE, Replica(spec, contexts[:1], param_file))
    counters = {name: 0 for name in variants}

    def shards_for(name: str) -> List[Tuple[mx.nd.NDArray, mx.nd.NDArray]]:
        batch = batches[counters[name] % len(batches)]
        counters[name] += 1
        return batch[:1] if name == REFERENCE else batch

    def measurement(name: str) -> Callable[[], float]:
        variant = variants[name]

        def run() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                variant.step(shards_for(name))
            return time.perf_counter() - start

        return run

    try:
        for name, variant in variants.items():
            for _ in range(warmup):
                variant.step(shards_for(name))
        seconds = run_rounds({name: measurement(name) for name in variants}, rounds, progress)
        reference = variants[SEQUENTIAL].replica.parameters()
        agreement = {}
        for name in names:
            params = variants[name].replica.parameters()
            max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(params, reference))
            close = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params, reference))
            agreement[name] = (close and all(np.isfinite(p).all() for p in params), max_diff)
        overlap: Optional[Dict[str, List[Dict[str, Any]]]] = None
        if overlap_steps > 0:
            overlap = {SEQUENTIAL: [], MAP: []}
            for _ in range(PROFILE_ROUNDS):  # interleaved, as the measurements are
                overlap[SEQUENTIAL].append(_record_sequential(variants[SEQUENTIAL], batches, overlap_steps))
                overlap[MAP].append(_record_executor(variants[MAP], batches, overlap_steps, workdir))
    finally:
        for variant in variants.values():
            variant.close()
        for name in os.listdir(workdir):
            os.remove(os.path.join(workdir, name))
        os.rmdir(workdir)

    samples = {
        name: [variants[name].replica.batch_size * steps / s for s in values] for name, values in seconds.items()
    }
    one_context = REFERENCE if n > 1 else SEQUENTIAL
    peers = [SEQUENTIAL] + ([GLUONNLP] if GLUONNLP in samples else [])
    best_peer = [max(values) for values in zip(*(samples[p] for p in peers))]
    return TrainingResult(
        model=spec.name,
        n=n,
        batch=variants[SEQUENTIAL].replica.batch_size,
        steps_per_measurement=steps,
        throughput={name: Summary.of(values) for name, values in samples.items()},
        vs_sequential={name: Summary.of(ratios(samples, name, SEQUENTIAL)) for name in names},
        vs_one_context={name: Summary.of(ratios(samples, name, one_context)) for name in names},
        vs_best_peer={name: Summary.of([a / b for a, b in zip(samples[name], best_peer)]) for name in names},
        agreement=agreement,
        overlap=overlap,
    )


def _span(track: str, name: str, start_ns: int, end_ns: int, origin_ns: int) -> Dict[str, Any]:
    """A Chrome trace-event complete span, with the track's name as ``tid``."""
    return {"ph": "X", "name": name, "tid": track, "ts": (start_ns - origin_ns) / 1e3, "dur": (end_ns - start_ns) / 1e3}


def _record_sequential(
    variant: Variant, batches: Sequence[Sequence[Tuple[mx.nd.NDArray, mx.nd.NDArray]]], steps: int
) -> Dict[str, Any]:
    """Time the sequential loop's own spans, in the timeline's shape."""
    replica = variant.replica
    events: List[Dict[str, Any]] = []
    origin = time.perf_counter_ns()
    for i in range(steps):
        for context, shard in zip(replica.contexts, batches[i % len(batches)]):
            start = time.perf_counter_ns()
            replica.forward_backward(shard)
            events.append(_span(f"{context} (main thread)", "forward_backward", start, time.perf_counter_ns(), origin))
        _finish_step_traced(replica, events, origin)
    # One thread runs every span, so they never overlap: concurrency 1.0.
    tracks = ["caller"] + [f"{c} (main thread)" for c in replica.contexts]
    return {"events": events, "tracks": tracks, "concurrency": 1.0}


def _finish_step_traced(replica: Replica, events: List[Dict[str, Any]], origin: int) -> None:
    start = time.perf_counter_ns()
    replica.trainer.step(replica.batch_size)
    middle = time.perf_counter_ns()
    mx.nd.waitall()
    end = time.perf_counter_ns()
    events.append(_span("caller", "trainer.step", start, middle, origin))
    events.append(_span("caller", "wait for results", middle, end, origin))


def _record_executor(
    variant: Variant, batches: Sequence[Sequence[Tuple[mx.nd.NDArray, mx.nd.NDArray]]], steps: int, workdir: str
) -> Dict[str, Any]:
    """Record ``ContextExecutor.map`` steps with the executor's timeline."""
    replica = variant.replica
    assert variant.executor is not None, f"{variant.name} has no ContextExecutor"
    path = os.path.join(workdir, "trace.json")
    events: List[Dict[str, Any]] = []
    # The timeline's clock starts when record_timeline creates it, microseconds
    # after this: close enough to line our caller spans up with its spans.
    origin = time.perf_counter_ns()
    with variant.executor.record_timeline(path) as timeline:
        for i in range(steps):
            list(variant.executor.map(replica.fb, *zip(*batches[i % len(batches)])))
            _finish_step_traced(replica, events, origin)
    with open(path, encoding="utf-8") as file:
        trace = json.load(file)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in trace if e.get("ph") == "M" and e.get("name") == "thread_name"}
    tracks = ["caller"]
    for e in trace:
        if e.get("ph") != "X":
            continue
        if e["cat"] == "wait":
            events.append({**e, "tid": "caller", "name": "wait in map"})
        else:
            track = names[e["tid"]].split("[")[-1].rstrip("]") + " (worker)"
            if track not in tracks:
                tracks.append(track)
            events.append({**e, "tid": track, "name": "forward_backward" if e["cat"] == "task" else e["name"]})
    tracks = tracks[:1] + sorted(tracks[1:])
    return {"events": events, "tracks": tracks, "concurrency": timeline.mean_concurrency()}


def table(results: Sequence[TrainingResult]) -> str:
    """Markdown table: one row per model, N and variant."""
    headers = ["model", "N", "batch", "variant", "samples/s (median ± IQR/2)", "vs sequential at N",
               "vs 1-context sequential", "same parameters as sequential (max abs diff)"]
    rows = [
        [r.model, r.n, r.batch, name, r.throughput[name].fmt(0), r.vs_sequential[name].fmt(3),
         r.vs_one_context[name].fmt(2), f"{'yes' if r.agreement[name][0] else 'NO'} ({r.agreement[name][1]:.1e})"]
        for r in results
        for name in r.vs_sequential
    ]
    return markdown_table(headers, rows, "lrrlrrrl")
