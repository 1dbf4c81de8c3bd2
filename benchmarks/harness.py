"""Shared measurement helpers: interleaved rounds, medians, IQRs, environment.

Every section measures its variants in one process, interleaved in rounds
(A B C, C A B, B C A ...), so slow drift of a shared machine hits all
variants alike, in an order shuffled afresh each round, so no variant always
runs right after the same one (whatever a variant leaves behind, threads
just woken, caches, the scheduler's placement, falls on all of them alike).
Ratios between variants are taken within a round, then summarised.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence

from tabulate import tabulate

HERE = os.path.dirname(os.path.abspath(__file__))
# The settings that change how MXNet schedules work on CPUs.
ENV_VARS = (
    "MXNET_ENGINE_TYPE", "OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_CPU_PRIORITY_NTHREADS",
    "OMP_WAIT_POLICY",  # spinning OpenMP threads compete with Python for the cores
    "MKL_NUM_THREADS",
)


@dataclass(frozen=True)
class Summary:
    """Median and interquartile range of a list of samples."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Summary":
        values = sorted(samples)
        if len(values) == 1:
            return cls(values[0], values[0], values[0], 1)
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median, q1, q3, len(values))

    def fmt(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ± {self.iqr / 2:.{digits}f}"


def run_rounds(
    variants: Mapping[str, Callable[[], float]], rounds: int, progress: Callable[[], object] = lambda: None,
    seed: int = 0,
) -> Dict[str, List[float]]:
    """Run each variant once per round, in an order shuffled each round, ``rounds`` times.

    Args:
        variants: name -> a callable that does one measurement and returns
            its figure (seconds, or whatever the section measures).
        rounds: how many rounds.
        progress: called after every measurement (a progress bar's update).
        seed: seeds the shuffles, so a rerun measures in the same orders.

    Returns:
        name -> one figure per round, in round order.
    """
    shuffler = random.Random(seed)
    results: Dict[str, List[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            results[name].append(variants[name]())
            progress()
    return results


def ratios(results: Mapping[str, List[float]], name: str, reference: str) -> List[float]:
    """Per-round ratio ``results[name] / results[reference]``."""
    return [a / b for a, b in zip(results[name], results[reference])]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    """A plain Markdown (pipe) table; ``align`` has one letter per column, ``l`` or ``r``."""
    colalign = ["left" if a == "l" else "right" for a in align]
    return tabulate(rows, headers=headers, tablefmt="pipe", colalign=colalign, disable_numparse=True)


def close_gluonnlp_parallel(parallel: Any) -> None:
    """Stop a ``gluonnlp.utils.Parallel``: its non-daemon workers stop only in ``__del__``.

    ``Any``: gluonnlp 0.10.0 ships no type information.
    """
    parallel.__del__()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        return float("nan")


def _git_commit(repo: str) -> str:
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "parallel_exec")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" (parallel_exec/ has uncommitted changes)" if dirty else "")


def environment() -> Dict[str, str]:
    """Machine, versions and MXNet engine/OpenMP settings, as display strings."""
    import mxnet as mx
    import numpy

    import parallel_exec

    try:
        import gluonnlp

        gluonnlp_version = gluonnlp.__version__
    except ImportError:
        gluonnlp_version = "not installed"
    shown = ("OPENMP", "MKLDNN", "BLAS_OPEN", "BLAS_MKL", "CUDA")
    features = [name for name, feature in mx.runtime.Features().items() if feature.enabled and name in shown]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "machine": f"{_cpu_model()}, {platform.machine()}",
        "os.cpu_count()": str(os.cpu_count()),
        "CPUs this process may use": str(affinity),
        "memory": f"{_memory_gib():.1f} GiB",
        "OS": platform.platform(),
        "Python": sys.version.split()[0],
        "mxnet": f"{mx.__version__} ({', '.join(features)})",
        "numpy": numpy.__version__,
        "gluonnlp": gluonnlp_version,
        "parallel_exec": f"{parallel_exec.__version__}, commit {_git_commit(os.path.dirname(HERE))}",
    }
    for var in ENV_VARS:
        info[var] = os.environ.get(var, "unset (MXNet default)")
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info
