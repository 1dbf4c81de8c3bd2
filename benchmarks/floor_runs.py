"""Dispatch figures near a target, against their floors, over many runs of fresh instances.

The dispatch section measures each variant on one instance per run, and at
N=2 one instance of the same code can measure up to 0.15 apart from another
(RESULTS.md): one run cannot tell whether a floor sits above or below a
target of 1.0x. This repeats one group of the dispatch section in
``--runs`` runs, each on fresh instances (fresh threads), in shuffled rounds,
and prints each run's median paired ratio to the reference, with the median
over runs and how many runs came out above 1.0.

``putget`` (reference: gluonnlp's ``Parallel``), a trivial call through
``put``/``get``: ``pe.Parallel`` and three floors from ``floors.py`` (the
contract floor, ``SharedQueueContract``: every per-call promise of
``pe.Parallel`` written lean; the design floor, ``SharedQueue(carry_flags=True)``:
the caller's flags and an outcome per call; bare, ``SharedQueue``: one shared
queue each way, nothing else).

``submit`` and ``map`` (reference: ``ThreadPoolExecutor``), a trivial task by
``submit(...).result()`` one at a time, or ``map`` over one shard per context:
``ContextExecutor`` and the executor floors (the contract floor,
``ContractFloor``; the correct floor, ``CorrectFloor``: flags and routing
only; for ``map``, bare: ``ThreadPerContext``).

    python benchmarks/floor_runs.py                 # putget, N=2, 8 runs, ~1.5 min
    python benchmarks/floor_runs.py submit --n 4
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Sequence, Tuple

import mxnet as mx

import parallel_exec as pe

from dispatch import Noop, map_shards, noop, put_get, submit_result
from floors import ContractFloor, CorrectFloor, SharedQueue, SharedQueueContract, ThreadPerContext
from harness import close_gluonnlp_parallel, markdown_table, run_rounds

try:
    import gluonnlp.utils as gluonnlp_utils
except ImportError:
    gluonnlp_utils = None

# Per group: the reference, then the variants compared with it; the last
# column is the first variant over the first floor.
GROUPS: Dict[str, Tuple[str, ...]] = {
    "putget": ("gluonnlp Parallel", "pe.Parallel", "contract floor", "design floor", "bare"),
    "submit": ("ThreadPoolExecutor", "ContextExecutor", "contract floor", "correct floor"),
    "map": ("ThreadPoolExecutor", "ContextExecutor", "contract floor", "correct floor", "bare"),
}


def _instances(group: str, n: int) -> Dict[str, Any]:
    contexts = [mx.cpu(i) for i in range(n)]
    if group == "putget":
        return {
            "gluonnlp Parallel": gluonnlp_utils.Parallel(n, Noop()),
            "pe.Parallel": pe.Parallel(n, Noop()),
            "contract floor": SharedQueueContract(n, noop),
            "design floor": SharedQueue(n, noop, carry_flags=True),
            "bare": SharedQueue(n, noop),
        }
    made = {
        "ThreadPoolExecutor": ThreadPoolExecutor(n),
        "ContextExecutor": pe.ContextExecutor(contexts),
        "contract floor": ContractFloor(contexts),
        "correct floor": CorrectFloor(contexts),
    }
    if group == "map":
        made["bare"] = ThreadPerContext(n)
    return made


def _close(name: str, instance: Any) -> None:
    if name == "gluonnlp Parallel":
        close_gluonnlp_parallel(instance)
    elif name in ("ThreadPoolExecutor", "ContextExecutor"):
        instance.shutdown()
    else:
        instance.close()


# What each group's runs measure, as the dispatch section measures it.
MEASUREMENTS: Dict[str, Callable[[Any, Sequence[Any], int], Callable[[], float]]] = {
    "putget": put_get, "submit": submit_result, "map": map_shards,
}


def one_run(group: str, n: int, rounds: int, tasks: int, seed: int) -> Dict[str, float]:
    """Median paired ratio of each variant's time to the reference's, on fresh instances.

    Rounds in shuffled orders (``harness.run_rounds``), seeded with ``seed``.
    """
    shards = [mx.nd.zeros((1,), ctx=mx.cpu(i)) for i in range(n)]
    instances = _instances(group, n)
    runs = {name: MEASUREMENTS[group](instance, shards, tasks) for name, instance in instances.items()}
    try:
        for run in runs.values():  # warm-up, also passes the serial-init calls
            run()
        seconds = run_rounds(runs, rounds, seed=seed)
    finally:
        for name, instance in instances.items():
            _close(name, instance)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    reference, ours, floor = GROUPS[group][:3]
    figures = {name: ratio(name, reference) for name in GROUPS[group][1:]}
    figures[f"{ours} / {floor}"] = ratio(ours, floor)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("group", nargs="?", default="putget", choices=sorted(GROUPS),
                        help="what to measure (default putget)")
    parser.add_argument("--n", type=int, default=2, help="worker threads or contexts (default 2)")
    parser.add_argument("--runs", type=int, default=8, help="runs, each on fresh instances (default 8)")
    parser.add_argument("--rounds", type=int, default=21, help="shuffled rounds per run (default 21)")
    parser.add_argument("--tasks", type=int, default=3000, help="calls per measurement (default 3000)")
    args = parser.parse_args()
    if args.group == "putget" and gluonnlp_utils is None:
        parser.error("gluonnlp is not installed: pip install -e '.[test]'")
    results = []
    for index in range(args.runs):
        results.append(one_run(args.group, args.n, args.rounds, args.tasks, seed=index))
        print(f"run {index + 1} of {args.runs} done", flush=True)
    columns = list(results[0])
    rows: List[Sequence[object]] = [[index + 1, *(f"{r[c]:.3f}" for c in columns)] for index, r in enumerate(results)]
    rows.append(["median", *(f"{statistics.median(r[c] for r in results):.3f}" for c in columns)])
    rows.append(["runs above 1.0", *(sum(r[c] > 1.0 for r in results) for c in columns)])
    reference = GROUPS[args.group][0]
    print(f"\n{args.group} of a trivial task, N={args.n}: time / {reference}'s (last column: as named), median of "
          f"{args.rounds} shuffled rounds of {args.tasks} calls per run\n")
    print(markdown_table(["run", *columns], rows, "l" + "r" * len(columns)))


if __name__ == "__main__":
    main()
