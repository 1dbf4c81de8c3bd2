"""Benchmarks: parallel_exec against the sequential loop, gluonnlp's Parallel and ThreadPoolExecutor.

    python benchmarks/run.py            # full run, < 15 minutes on 2 cores
    python benchmarks/run.py --quick    # < 3 minutes on 2 cores

Prints the tables, and writes RESULTS.md and the PNG plots to runs/benchmarks/
(git-ignored) or to ``--out DIR``; ``--out benchmarks`` rewrites the committed
RESULTS.md and plots, on purpose only. Everything runs in this process, variants interleaved in
rounds, except the peak-RSS measurement, which needs a fresh process per
variant. Needs the ``bench`` extra: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
# A run writes here unless told otherwise, so it never rewrites tracked files.
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "runs", "benchmarks")
sys.path.insert(0, HERE)

import hot_path  # noqa: E402
from tqdm import tqdm  # noqa: E402

import dispatch  # noqa: E402
import floors  # noqa: E402
import harness  # noqa: E402
import memory  # noqa: E402
import report  # noqa: E402
import training  # noqa: E402

RSS_MODELS = ("python-heavy", "compute-heavy")  # sync-in-step's memory is compute-heavy's


@dataclass(frozen=True)
class Size:
    """How much of everything one run measures."""

    dispatch_ns: Tuple[int, ...]
    dispatch_tasks: int  # tasks per measurement
    dispatch_rounds: int
    training_ns: Tuple[int, ...]
    training_rounds: int
    training_steps: int  # steps per measurement
    training_warmup: int
    overlap_steps: int
    growth_tasks: int
    rss_n: int
    rss_steps: int  # 0: skip the peak-RSS children


SIZES = {
    # 21 rounds: identical code measured 0.94-1.07x against itself with 15.
    "full": Size((2, 4), 3000, 21, (1, 2, 4), 21, 8, 3, 4, 200_000, 4, 30),
    "quick": Size((2, 4), 1000, 7, (1, 2, 4), 5, 3, 2, 4, 200_000, 2, 10),
    # For the test suite only: every code path once, no figure worth reading.
    "smoke": Size((2,), 100, 2, (1, 2), 2, 1, 2, 2, 2_000, 2, 0),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size_flags = parser.add_mutually_exclusive_group()
    size_flags.add_argument("--quick", action="store_const", dest="size", const="quick",
                            help="a run under 3 minutes on 2 cores")
    size_flags.add_argument("--smoke", action="store_const", dest="size", const="smoke",
                            help="smallest size, for the test suite")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR",
        help="where RESULTS.md and the PNGs go (default: runs/benchmarks/, git-ignored; "
        "--out benchmarks rewrites the committed ones)",
    )
    parser.add_argument("--note", default="", help="a remark printed at the top of RESULTS.md, e.g. about machine load")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    name = args.size or "full"
    size = SIZES[name]
    command = shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    os.makedirs(args.out, exist_ok=True)

    env = harness.environment()
    print(f"# parallel_exec benchmarks ({name})\n")
    print("\n".join(f"{k}: {v}" for k, v in env.items()), "\n", flush=True)

    total = (
        len(size.dispatch_ns) * size.dispatch_rounds * (dispatch.VARIANTS + hot_path.VARIANTS)
        + len(training.MODELS)
        * sum(size.training_rounds * (len(training.VARIANTS) + (n > 1)) for n in size.training_ns)
        + (len(RSS_MODELS) * len(training.RSS_VARIANTS) if size.rss_steps else 0)
    )
    # One tick per measurement, on stderr; the tables go to stdout.
    progress = tqdm(total=total, unit="measurement", file=sys.stderr, leave=False, disable=args.no_progress)
    started = time.perf_counter()
    timings: Dict[str, float] = {}

    t0 = time.perf_counter()
    dispatch_results = [
        dispatch.measure(n, size.dispatch_tasks, size.dispatch_rounds, progress.update) for n in size.dispatch_ns
    ]
    flag_ab = {n: hot_path.measure(n, size.dispatch_tasks, size.dispatch_rounds, progress.update)
               for n in size.dispatch_ns}
    pieces = floors.task_pieces()
    timings["dispatch"] = time.perf_counter() - t0
    _emit(progress, "## 1. Dispatch overhead\n\n" + dispatch.table(dispatch_results) + "\n\n"
          + dispatch.pieces_table(pieces) + "\n\n" + hot_path.table(flag_ab))

    t0 = time.perf_counter()
    overlap_n = 2 if 2 in size.training_ns else max(size.training_ns)
    training_results = [
        training.measure(
            spec, n, size.training_rounds, size.training_steps, size.training_warmup, progress.update,
            overlap_steps=size.overlap_steps if n == overlap_n else 0,
        )
        for spec in training.MODELS.values()
        for n in size.training_ns
    ]
    timings["training"] = time.perf_counter() - t0
    _emit(progress, "## 2. Training-step throughput\n\n" + training.table(training_results))

    t0 = time.perf_counter()
    peaks: List[memory.PeakRss] = []
    if size.rss_steps:
        peaks = [
            memory.peak_rss(model, size.rss_n, size.rss_steps, training.RSS_VARIANTS, progress.update)
            for model in RSS_MODELS
        ]
    grown = memory.growth(size.growth_tasks, 2)
    threads = memory.thread_rss()
    timings["memory"] = time.perf_counter() - t0
    _emit(progress, "## 3. Memory\n\n" + memory.table(peaks, grown, threads))
    progress.close()

    env["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    timings["total"] = time.perf_counter() - started
    files = report.write(
        args.out, command=command, size=name, note=args.note, env=env, timings=timings,
        dispatch_results=dispatch_results, pieces=pieces, flag_ab=flag_ab, training_results=training_results,
        peaks=peaks, grown=grown,
        threads=threads,
    )
    print("\n" + report.targets_table(dispatch_results, training_results, peaks, grown))
    print(f"\nwrote {', '.join(files)} to {args.out} in {timings['total']:.0f} s")
    return 0


def _emit(progress: tqdm, text: str) -> None:
    progress.write("\n" + text + "\n", file=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
