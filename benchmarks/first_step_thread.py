"""Why a hybridized block on CPU contexts runs fastest on the thread that ran its first step.

MXNet 1.9.1's resource manager is per thread (``ResourceManager::Get`` in
``src/resource.cc`` is a ``dmlc::ThreadLocalStore``): every thread has its own
random generator and its own temporary-space copies, ``MXNET_CPU_TEMP_COPY``
of them (default 4), which all of that thread's CPU contexts share (a GPU
gets copies of its own). A block hybridized with ``static_shape=True`` binds,
at its first forward and backward on a device (``CachedOp::StaticInitExec``,
``AttachOpResources``), temporary-space copies of the thread that ran them,
for good: every later step's operator segments on that device write those
copies' engine variables. Two devices whose operators use the same copy
cannot run at the same time; their steps take turns. That happens when both
devices' first steps ran in one thread (round robin over 4 copies: gluonnlp's
``Parallel`` and ``pe.Parallel`` run the first calls in the caller), or when
the thread that owns a device's copies runs another device's steps.

This script measures it on ``cpu(0)``, ``cpu(1)``: training.py's
sync-in-step step (the compute-heavy hybridized model, loss read on the
host), one thread per device running that device's steps
(``floors.ThreadPerContext``), with each device's first step run three ways:

- ``own thread``: on the thread that runs the device's steps (what
  ``map``'s serial-init gate does);
- ``caller``: both in the calling thread (gluonnlp's design);
- ``other device's thread``: device 0's on device 1's thread and the reverse.

Each way has its own network from the same saved parameters, measured in
interleaved rounds; the figure is time per step over the ``own thread``
way's, median of the rounds. Then the same process runs training.py's
sync-in-step and compute-heavy sections at N=2 (every variant, speed over
the sequential loop, whose first steps all run in the calling thread too).
All of it runs in a fresh process with MXNet's default
``MXNET_CPU_TEMP_COPY``, then in others with ``--copies`` copies per thread
(read when a thread first uses the resource manager, so only a fresh process
can change it): if shared copies are the cause, enough of them make the three
ways equal, and lift the designs that run the first calls in the caller,
the sequential loop among them.
Each process's peak RSS says what the copies cost in memory.

    python benchmarks/first_step_thread.py [--rounds 7] [--steps 15] [--copies 16 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mxnet as mx  # noqa: E402

import training  # noqa: E402
from floors import ThreadPerContext  # noqa: E402
from harness import markdown_table, run_rounds  # noqa: E402

OWN, CALLER, OTHER = "own thread", "caller", "other device's thread"
WAYS = (OWN, CALLER, OTHER)
N = 2


# way -> the thread that runs device i's first step: -1 for the caller, else the index of a device's thread.
FIRST_STEP_THREAD: Dict[str, Callable[[int], int]] = {
    OWN: lambda i: i,
    CALLER: lambda i: -1,
    OTHER: lambda i: N - 1 - i,
}


def first_steps(rounds: int, steps: int) -> Dict[str, float]:
    """In this process: way -> median over rounds of its time per step over the own-thread way's."""
    spec = training.MODELS["sync-in-step"]
    contexts = [mx.cpu(i) for i in range(N)]
    workdir = tempfile.mkdtemp(prefix="bench_first_step_")
    param_file = os.path.join(workdir, "initial.params")
    training.save_initial_parameters(spec, param_file, seed=42)
    batch = training.make_batches(spec, contexts, count=1, seed=7)[0]
    pools: Dict[str, ThreadPerContext] = {}
    try:
        replicas = {way: training.Replica(spec, contexts, param_file) for way in WAYS}
        for way, replica in replicas.items():
            pool = pools[way] = ThreadPerContext(N)
            for index, shard in enumerate(batch):  # one at a time, as the serial-init gate runs them
                thread = FIRST_STEP_THREAD[way](index)
                if thread < 0:
                    replica.forward_backward(shard)
                else:
                    pool.call_on(thread, replica.forward_backward, shard)
            replica.finish_step()

        def steps_of(way: str) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                for _ in range(steps):
                    pools[way].map(replicas[way].forward_backward, batch)
                    replicas[way].finish_step()
                return (time.perf_counter() - start) / steps
            return run

        seconds = run_rounds({way: steps_of(way) for way in WAYS}, rounds)
    finally:
        for pool in pools.values():
            pool.close()
        os.remove(param_file)
        os.rmdir(workdir)
    return {way: statistics.median(a / b for a, b in zip(seconds[way], seconds[OWN])) for way in WAYS}


TRAINED = ("sync-in-step", "compute-heavy")  # training.py's models run here, at N=2


def measure(rounds: int, steps: int) -> Dict[str, Any]:
    """In this process: the three ways, then training.py at N=2 for ``TRAINED``, and the peak RSS in MiB."""
    ways = first_steps(rounds, steps)
    trained = {}
    for model in TRAINED:
        result = training.measure(training.MODELS[model], N, rounds, steps, 3, lambda: None)
        trained[model] = {name: s.median for name, s in result.vs_sequential.items()}
        trained[model]["loop samples/s"] = result.throughput[training.SEQUENTIAL].median
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"ways": ways, "training": trained, "peak_rss_mib": peak_mib}


def in_fresh_process(rounds: int, steps: int, copies: Optional[int]) -> Dict[str, Any]:
    """``measure`` in a child process, with ``MXNET_CPU_TEMP_COPY`` set to ``copies`` (None: MXNet's default)."""
    env = dict(os.environ)
    env.pop("MXNET_CPU_TEMP_COPY", None)
    if copies is not None:
        env["MXNET_CPU_TEMP_COPY"] = str(copies)
    child = [sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(rounds), "--steps", str(steps)]
    out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def tables(results: Dict[str, Dict[str, Any]]) -> str:
    ways = markdown_table(
        ["MXNET_CPU_TEMP_COPY"] + [f"first step on the {way}" for way in WAYS] + ["peak RSS of the process"],
        [[setting] + [f"{r['ways'][way]:.2f}x" for way in WAYS] + [f"{r['peak_rss_mib']:.0f} MiB"]
         for setting, r in results.items()], "lrrrr")
    names = [name for name in training.VARIANTS if name != training.SEQUENTIAL
             and all(name in r["training"][model] for r in results.values() for model in TRAINED)]
    trained = markdown_table(
        ["model", "MXNET_CPU_TEMP_COPY", "sequential loop, samples/s"] + names,
        [[model, setting, f"{r['training'][model]['loop samples/s']:.0f}"]
         + [f"{r['training'][model][name]:.2f}x" for name in names]
         for model in TRAINED for setting, r in results.items()], "llr" + "r" * len(names))
    heading = "training.py's models at N=2, each variant's speed over the sequential loop (median of the rounds):"
    return f"{ways}\n\n{heading}\n\n{trained}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=15, help="steps per measurement")
    parser.add_argument("--copies", type=int, nargs="+", default=[16, 64],
                        help="MXNET_CPU_TEMP_COPY of the other processes, one process each")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rounds, args.steps)))
        return 0
    results: Dict[str, Dict[str, Any]] = {}
    for copies in (None, *args.copies):
        results["4 (MXNet's default)" if copies is None else str(copies)] = in_fresh_process(
            args.rounds, args.steps, copies)
    print(f"Time per sync-in-step step on cpu(0), cpu(1) over the own-thread way's, median of {args.rounds} "
          f"rounds of {args.steps} steps:\n")
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
