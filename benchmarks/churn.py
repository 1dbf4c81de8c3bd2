"""Issue 17's churn: what opening and closing executors costs, in memory and time.

MXNet 1.9.1 keeps ~4.9 MiB in every thread that ran a reduction and never
frees it, so an executor that started fresh threads cost that per worker.

1. Memory: 100 executors x 2 contexts (``mx.cpu(0)``, ``mx.cpu(1)``), each
   ``with``-block running one reduction per context through ``map``, against
   ``ThreadPoolExecutor(2)`` doing the same. Each variant runs in a fresh
   process (RSS never comes back); growth is measured after one warm-up
   executor. Target for ``ContextExecutor``: < 10 MiB.
2. Time: create, use once (one tiny task per context) and shut down an
   executor, ``ContextExecutor`` against ``ThreadPoolExecutor(2)``,
   interleaved rounds in one process, medians of the rounds.

    python benchmarks/churn.py           # ~1 minute on 2 cores
    python benchmarks/churn.py --quick   # smoke test
"""

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

import mxnet as mx
import psutil

import parallel_exec as pe

CONTEXTS = [mx.cpu(0), mx.cpu(1)]
VARIANTS = {
    "ContextExecutor": lambda: pe.ContextExecutor(CONTEXTS),
    "ThreadPoolExecutor(2)": lambda: ThreadPoolExecutor(2),
}


def reduction(x: mx.nd.NDArray) -> float:
    return float((x * 2).sum().asscalar())  # asscalar gives a numpy float32


def memory_child(variant: str, executors: int) -> None:
    """In a fresh process: RSS growth and thread count over ``executors`` executors; prints JSON."""
    shards = [mx.nd.ones((100,), ctx=c) for c in CONTEXTS]
    make = VARIANTS[variant]
    process = psutil.Process()

    def one_executor() -> None:
        with make() as ex:
            list(ex.map(reduction, shards))

    one_executor()  # warm-up: MXNet's and the first threads' own start-up
    start = process.memory_info().rss
    for _ in range(executors):
        one_executor()
    figures = {"growth_mib": (process.memory_info().rss - start) / 2**20, "threads": threading.active_count()}
    if variant == "ContextExecutor":
        figures["released"] = pe.release_idle_threads()
        figures["threads_after_release"] = threading.active_count()
    print(json.dumps(figures))


def memory(executors: int) -> Dict[str, Dict[str, Any]]:
    """Variant -> the figures its child printed (``memory_child``)."""
    results = {}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--executors", str(executors)],
                              capture_output=True, text=True, check=True, timeout=600)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def open_use_close_us(rounds: int, per_round: int) -> Dict[str, Any]:
    """Median over rounds of the microseconds to create, use once and shut down one executor."""
    samples: Dict[str, List[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(rounds):
        order = list(VARIANTS.items())
        if round_ % 2:
            order.reverse()  # neither variant always runs first
        for variant, make in order:
            start = time.perf_counter()
            for _ in range(per_round):
                with make() as ex:
                    list(ex.map(int, [1, 2]))
            samples[variant].append((time.perf_counter() - start) / per_round * 1e6)
    ratios = [pe_us / tpe_us for pe_us, tpe_us in zip(samples["ContextExecutor"], samples["ThreadPoolExecutor(2)"])]
    return {"us": {v: statistics.median(s) for v, s in samples.items()}, "ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke test")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--executors", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child, args.executors)
        return
    executors, rounds, per_round = (10, 3, 10) if args.quick else (100, 7, 50)
    grown = memory(executors)
    timed = open_use_close_us(rounds, per_round)
    command = "python benchmarks/churn.py" + (" --quick" if args.quick else "")
    print(f"Command: `{command}`\n")
    print(f"| {executors} executors x 2 contexts, a reduction each | RSS growth (MiB) | threads at the end |")
    print("|---|---:|---:|")
    for variant, figures in grown.items():
        print(f"| {variant} | {figures['growth_mib']:+.1f} | {figures['threads']} |")
    pe_figures = grown["ContextExecutor"]
    print(f"\nContextExecutor: release_idle_threads() ended {pe_figures['released']} idle thread(s); "
          f"threads after it: {pe_figures['threads_after_release']}.\n")
    print(f"| create, use once, shut down ({rounds} rounds x {per_round}) | median us |")
    print("|---|---:|")
    for variant, us in timed["us"].items():
        print(f"| {variant} | {us:.0f} |")
    print(f"\nContextExecutor / ThreadPoolExecutor(2), paired per round: {timed['ratio']:.2f}x")


if __name__ == "__main__":
    main()
