"""Experiments on the hot path: what each piece of a task costs, measured A/B in one process.

    python benchmarks/hot_path.py [--tasks 2000] [--rounds 11] [--n 2 4]

Each variant swaps one implementation of the per-task flag handling into the
same executor (``_executor.capture_flags``, ``_worker.apply_flags``,
``_worker.restore_flags``), and every round measures all of them and
``ThreadPoolExecutor`` one after the other, so the ratios are paired:

- ``held``: what ships: the flag reads and writes through a ``ctypes.PyDLL``
  handle, the GIL kept across each call (``_state``);
- ``released``: the same flags through ``mx.autograd`` / ``mx.util``: each call
  builds ctypes objects and releases the GIL (what the executor did before);
- ``none``: no flags carried at all: the floor of this piece, not correct.

Prints microseconds per task and ratios to ``ThreadPoolExecutor`` (median ±
IQR/2 over rounds). The figures are in RESULTS.md's hot-path section.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, TypeVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mxnet as mx  # noqa: E402
from mxnet import autograd, util  # noqa: E402

import parallel_exec as pe  # noqa: E402
from parallel_exec import _executor, _state, _worker  # noqa: E402

from harness import Summary, markdown_table, ratios, run_rounds  # noqa: E402


def _released_capture() -> _state.TaskFlags:
    return _state.TaskFlags(autograd.is_recording(), autograd.is_training(), util.is_np_shape(), util.is_np_array())


def _released_apply(flags: _state.TaskFlags, current: Any = None) -> Any:
    autograd.set_recording(flags.recording)
    autograd.set_training(flags.training)
    util.set_np_shape(flags.np_shape)
    return None


def _released_restore(own: _state.TaskFlags, scope: Any) -> None:
    _released_apply(own)


_OFF = _state.TaskFlags(False, False, False, False)
IMPLEMENTATIONS = {
    "held": (_state.capture_flags, _state.apply_flags, _state.restore_flags),
    "released": (_released_capture, _released_apply, _released_restore),
    "none": (lambda: _OFF, lambda flags, current=None: None, lambda own, scope: None),
}


def _use(name: str) -> None:
    capture, apply, restore = IMPLEMENTATIONS[name]
    _executor.capture_flags = capture
    _worker.apply_flags = apply
    _worker.restore_flags = restore


_T = TypeVar("_T")


def noop(x: _T) -> _T:
    return x


def measure(
    n: int, tasks: int, rounds: int, progress: Callable[[], object] = lambda: None
) -> Dict[str, Dict[str, Summary]]:
    contexts = [mx.cpu(i) for i in range(n)]
    shards = [mx.nd.zeros((1,), ctx=c) for c in contexts]
    executor = pe.ContextExecutor(contexts)
    pool = ThreadPoolExecutor(n)

    def submit_result(ex: Executor, implementation: Optional[str] = None) -> Callable[[], float]:
        def run() -> float:
            if implementation:
                _use(implementation)
            start = time.perf_counter()
            for i in range(tasks):
                ex.submit(noop, shards[i % n]).result()
            return (time.perf_counter() - start) / tasks * 1e6

        return run

    def map_shards(ex: Executor, implementation: Optional[str] = None) -> Callable[[], float]:
        def run() -> float:
            if implementation:
                _use(implementation)
            start = time.perf_counter()
            for _ in range(tasks // n):
                list(ex.map(noop, shards))
            return (time.perf_counter() - start) / (tasks // n * n) * 1e6

        return run

    variants = {"ThreadPoolExecutor submit": submit_result(pool), "ThreadPoolExecutor map": map_shards(pool)}
    for name in IMPLEMENTATIONS:
        variants[f"submit, flags {name}"] = submit_result(executor, name)
        variants[f"map, flags {name}"] = map_shards(executor, name)
    try:
        for run in variants.values():
            run()
        us = run_rounds(variants, rounds, progress)
    finally:
        _use("held")
        executor.shutdown()
        pool.shutdown()
    out = {"us": {name: Summary.of(values) for name, values in us.items()}, "vs TPE": {}}
    for name in IMPLEMENTATIONS:
        for kind in ("submit", "map"):
            out["vs TPE"][f"{kind}, flags {name}"] = Summary.of(ratios(us, f"{kind}, flags {name}",
                                                                      f"ThreadPoolExecutor {kind}"))
    return out


VARIANTS = 2 + 2 * len(IMPLEMENTATIONS)  # measurements per round, for the progress bar


def table(results: Dict[int, Dict[str, Dict[str, Summary]]]) -> str:
    """Markdown tables: microseconds per task, then paired ratios to ``ThreadPoolExecutor``."""
    ns = list(results)
    align = "l" + "r" * len(ns)
    names = list(results[ns[0]]["us"])
    per_task = markdown_table(["variant", *(f"N={n}: us/task" for n in ns)],
                              [[name, *(results[n]["us"][name].fmt(1) for n in ns)] for name in names], align)
    names = list(results[ns[0]]["vs TPE"])
    paired = markdown_table(["paired ratio to ThreadPoolExecutor", *(f"N={n}" for n in ns)],
                            [[name, *(results[n]["vs TPE"][name].fmt(2) for n in ns)] for name in names], align)
    return per_task + "\n\n" + paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(table({n: measure(n, args.tasks, args.rounds) for n in args.n}))


if __name__ == "__main__":
    main()
