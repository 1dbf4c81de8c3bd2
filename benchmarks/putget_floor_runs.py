"""``pe.Parallel``'s put/get against gluonnlp's and against its floors, over many runs.

The dispatch section measures each put/get variant on one instance per run,
and one instance of the same code can measure up to 0.15 apart from another
at N=2 (RESULTS.md): one run cannot tell whether a floor sits above or below
gluonnlp's. This repeats the put/get measurement in ``--runs`` runs, each on
fresh instances (fresh threads) of gluonnlp's ``Parallel``, ``pe.Parallel``
and three floors from ``floors.py``, in shuffled rounds, and prints each
run's median ratio to gluonnlp's:

- contract floor: ``SharedQueueContract``, every per-call promise of
  ``pe.Parallel`` written lean;
- design floor: ``SharedQueue(carry_flags=True)``, only the caller's flags and
  an outcome per call;
- bare: ``SharedQueue``, gluonnlp's design on ``SimpleQueue``s, nothing else.

    python benchmarks/putget_floor_runs.py            # N=2, 8 runs, ~1.5 min
    python benchmarks/putget_floor_runs.py --n 4
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

import mxnet as mx

import parallel_exec as pe

from floors import SharedQueue, SharedQueueContract
from harness import close_gluonnlp_parallel, markdown_table

try:
    import gluonnlp.utils as gluonnlp_utils
except ImportError:
    gluonnlp_utils = None

COLUMNS = ("pe.Parallel", "contract floor", "design floor", "bare")


class _Noop(pe.Parallelizable):
    def forward_backward(self, x: Any) -> Any:
        return x


def _noop(x: Any) -> Any:
    return x


def _put_get(parallel: Any, shards: Sequence[Any], loops: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(loops):
            for shard in shards:
                parallel.put(shard)
            for _ in shards:
                parallel.get()
        return time.perf_counter() - start

    return run


def one_run(n: int, rounds: int, tasks: int) -> Dict[str, float]:
    """Median ratio of each variant's time to gluonnlp's, over shuffled rounds, on fresh instances."""
    shards = [mx.nd.zeros((1,), ctx=mx.cpu(i)) for i in range(n)]
    instances = {
        "gluonnlp": gluonnlp_utils.Parallel(n, _Noop()),
        "pe.Parallel": pe.Parallel(n, _Noop()),
        "contract floor": SharedQueueContract(n, _noop),
        "design floor": SharedQueue(n, _noop, carry_flags=True),
        "bare": SharedQueue(n, _noop),
    }
    runs = {name: _put_get(parallel, shards, tasks // n) for name, parallel in instances.items()}
    seconds: Dict[str, List[float]] = {name: [] for name in runs}
    try:
        for run in runs.values():  # warm-up, also passes the serial-init calls
            run()
        for _ in range(rounds):
            order = list(runs)
            random.shuffle(order)
            for name in order:
                seconds[name].append(runs[name]())
    finally:
        for name, parallel in instances.items():
            close_gluonnlp_parallel(parallel) if name == "gluonnlp" else parallel.close()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    figures = {name: ratio(name, "gluonnlp") for name in COLUMNS}
    figures["pe.Parallel / contract floor"] = ratio("pe.Parallel", "contract floor")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--runs", type=int, default=8, help="runs, each on fresh instances (default 8)")
    parser.add_argument("--rounds", type=int, default=21, help="shuffled rounds per run (default 21)")
    parser.add_argument("--tasks", type=int, default=3000, help="put/get calls per measurement (default 3000)")
    args = parser.parse_args()
    if gluonnlp_utils is None:
        parser.error("gluonnlp is not installed: pip install -e '.[test]'")
    columns = COLUMNS + ("pe.Parallel / contract floor",)
    results = []
    for index in range(args.runs):
        results.append(one_run(args.n, args.rounds, args.tasks))
        print(f"run {index + 1} of {args.runs} done", flush=True)
    rows: List[Sequence[object]] = [[index + 1, *(f"{r[c]:.3f}" for c in columns)] for index, r in enumerate(results)]
    rows.append(["median"] + [f"{statistics.median(r[c] for r in results):.3f}" for c in columns])
    rows.append(["runs above 1.0"] + [sum(r[c] > 1.0 for r in results) for c in columns])
    print(f"\nput/get of a trivial call, N={args.n}: time / gluonnlp's Parallel's (last column: / the contract floor),"
          f" median of {args.rounds} shuffled rounds of {args.tasks} calls per run\n")
    print(markdown_table(("run",) + columns, rows, "l" + "r" * len(columns)))


if __name__ == "__main__":
    main()
