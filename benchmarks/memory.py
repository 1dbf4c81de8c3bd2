"""Section 3: memory. Peak RSS per training variant, and RSS over many tasks.

Peak RSS is a high-water mark of the whole process, so each variant runs in
a fresh child process (``python benchmarks/memory.py VARIANT MODEL N STEPS``)
that reports its own ``ru_maxrss``. Growth is measured in this process: RSS
sampled while one ``ContextExecutor`` runs many trivial tasks. What one more
thread costs, idle and once it has run an MXNet operator, is measured in a
fresh child too (``python benchmarks/memory.py --thread-rss``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from harness import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class PeakRss:
    model: str
    n: int
    steps: int
    mib: Dict[str, float]  # variant -> peak RSS of its child process
    added: Dict[str, float]  # variant -> peak minus RSS before the variant was built


@dataclass
class Growth:
    tasks: int
    samples: List[Tuple[int, float]]  # (tasks done, RSS MiB)

    @property
    def growth_mib(self) -> float:
        return self.samples[-1][1] - self.samples[0][1]


@dataclass
class ThreadRss:
    """RSS added by one more thread, in a fresh process after ``import mxnet``."""

    idle_mib: float  # a thread that only waits
    one_operator_mib: float  # a thread that has run one MXNet operator


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss(model: str, n: int, steps: int, variants: Sequence[str], progress: Callable[[], object]) -> PeakRss:
    """Run each variant in its own child process; collect peak RSS."""
    mib: Dict[str, float] = {}
    added: Dict[str, float] = {}
    for variant in variants:
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "memory.py"), variant, model, str(n), str(steps)],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory child for {variant} failed:\n{out.stderr[-2000:]}")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        mib[variant] = report["peak_rss_mib"]
        added[variant] = report["peak_rss_mib"] - report["baseline_mib"]
        progress()
    return PeakRss(model, n, steps, mib, added)


def growth(tasks: int, n: int, samples: int = 20) -> Growth:
    """RSS while a ``ContextExecutor`` on ``n`` contexts runs ``tasks`` tasks.

    Tasks go in as ``map`` over one NDArray shard per context (the shape of a
    training step) and a warm-up of one sample's worth runs first.
    """
    import mxnet as mx

    import parallel_exec as pe

    from dispatch import noop

    contexts = [mx.cpu(i) for i in range(n)]
    shards = [mx.nd.zeros((1,), ctx=c) for c in contexts]
    per_sample = max(n, tasks // samples) // n
    points: List[Tuple[int, float]] = []
    with pe.ContextExecutor(contexts) as executor:
        for _ in range(per_sample):
            list(executor.map(noop, shards))
        points.append((0, _rss_mib()))
        for i in range(samples):
            for _ in range(per_sample):
                list(executor.map(noop, shards))
            points.append(((i + 1) * per_sample * n, _rss_mib()))
    return Growth(points[-1][0], points)


def thread_rss() -> ThreadRss:
    """Measure ``ThreadRss`` in a child process (this one has many threads already)."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "memory.py"), "--thread-rss"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"thread RSS child failed:\n{out.stderr[-2000:]}")
    return ThreadRss(**json.loads(out.stdout.strip().splitlines()[-1]))


def _thread_rss_child() -> None:
    """Print, as JSON, the RSS one idle thread adds, then one that ran an operator."""
    import threading

    import mxnet as mx

    x = mx.nd.ones((16,), ctx=mx.cpu(0))
    (x + 1).wait_to_read()  # the main thread's own MXNet state exists before the baseline

    def added_by(work: Callable[[], None]) -> float:
        ready, done = threading.Event(), threading.Event()

        def body() -> None:
            work()
            ready.set()
            done.wait()

        before = _status_kib("VmRSS")
        thread = threading.Thread(target=body)
        thread.start()
        ready.wait()
        after = _status_kib("VmRSS")
        done.set()
        thread.join()
        return (after - before) / 1024

    idle = added_by(lambda: None)
    one_operator = added_by(lambda: (x + 1).wait_to_read())
    print(json.dumps({"idle_mib": idle, "one_operator_mib": one_operator}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as file:
        match = re.search(rf"^{field}:\s+(\d+) kB", file.read(), re.M)
    if match is None:
        raise RuntimeError(f"no {field} line in /proc/self/status")
    return int(match.group(1))


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _child(variant: str, model: str, n: int, steps: int) -> None:
    """Run ``steps`` training steps of one variant; print its peak RSS as JSON.

    The peak is taken from the point where only the imports, the saved
    initial parameters and the batches exist, so it covers building this
    variant's network (and threads) and training it: what differs between
    variants. Where the kernel cannot reset the high-water mark, the peak
    covers the whole process.
    """
    import tempfile

    import mxnet as mx

    import training

    spec = training.MODELS[model]
    contexts = [mx.cpu(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as workdir:
        param_file = os.path.join(workdir, "initial.params")
        training.save_initial_parameters(spec, param_file, seed=42)
        batches = training.make_batches(spec, contexts, count=4, seed=7)
        mx.nd.waitall()
        reset = _reset_peak()
        baseline = _status_kib("VmRSS") / 1024
        runner = training.Variant(variant, training.Replica(spec, contexts, param_file))
        try:
            for i in range(steps):
                runner.step(batches[i % len(batches)])
        finally:
            runner.close()
    peak = _status_kib("VmHWM") / 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "baseline_mib": baseline, "reset": reset}))


def table(peaks: Sequence[PeakRss], grown: Growth, threads: ThreadRss) -> str:
    lines = [
        f"One more thread, in a fresh process after `import mxnet`: {threads.idle_mib:.1f} MiB of RSS while idle, "
        f"{threads.one_operator_mib:.1f} MiB once it has run one MXNet operator (MXNet's per-thread state). "
        "Every threaded variant below has N such threads.",
        "",
    ]
    for peak in peaks:
        base = peak.mib.get("sequential loop")
        lines += [
            f"Peak RSS, {peak.model} model, N={peak.n}, {peak.steps} steps, each variant in a fresh process "
            "(high-water mark reset after imports and data; 'added' is the peak minus RSS at that point):",
            "",
            markdown_table(
                ["variant", "peak RSS MiB", "of which the variant added", "vs sequential loop"],
                [[name, f"{mib:.0f}", f"{peak.added[name]:.0f}", f"{mib / base:.3f}" if base else ""]
                 for name, mib in peak.mib.items()],
                "lrrr",
            ),
            "",
        ]
    lines += [
        f"RSS over {grown.tasks:,} trivial tasks (ContextExecutor.map, one shard per context): "
        f"{grown.samples[0][1]:.1f} MiB after warm-up, {grown.samples[-1][1]:.1f} MiB at the end, "
        f"growth {grown.growth_mib:+.2f} MiB (max {max(m for _, m in grown.samples):.1f} MiB).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    if sys.argv[1:] == ["--thread-rss"]:
        _thread_rss_child()
    else:
        _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
