"""RESULTS.md and the plots, generated from one run's figures.

The text is ``RESULTS.template.md``, a Markdown file with ``$placeholders``;
this module fills them: the tables, the target checks, a few
sentences with this run's own figures, and the plots (matplotlib).
"""

from __future__ import annotations

import os
import statistics
import string
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import hot_path  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import dispatch  # noqa: E402
import memory  # noqa: E402
import training  # noqa: E402
from harness import Summary, markdown_table  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.template.md")


def in_brief(
    dispatch_results: Sequence[dispatch.DispatchResult], training_results: Sequence[training.TrainingResult],
    grown: memory.Growth,
) -> str:
    """A few sentences with this run's own figures."""
    lines = ["## This run in brief", ""]
    for d in dispatch_results:
        us = {k: v.median for k, v in d.us_per_task.items()}
        theirs = us.get("gluonnlp Parallel put/get")
        lines.append(
            f"- N={d.n}: a trivial task cost {us['ContextExecutor submit+result']:.0f} us with `submit`+`result` "
            f"(ThreadPoolExecutor {us['ThreadPoolExecutor submit+result']:.0f} us) and "
            f"{us['ContextExecutor map']:.0f} us per shard with `map` "
            f"(ThreadPoolExecutor {us['ThreadPoolExecutor map']:.0f} us"
            + (f", gluonnlp `Parallel` {theirs:.0f} us" if theirs is not None else "")
            + f"); recording a timeline added "
            f"{us['ContextExecutor map, timeline on'] - us['ContextExecutor map']:.0f} us per shard."
        )
    for model in dict.fromkeys(r.model for r in training_results):
        parts = []
        for r in (r for r in training_results if r.model == model and r.n > 1):
            gluonnlp = r.vs_sequential.get(training.GLUONNLP)
            parts.append(
                f"N={r.n}: `map` {r.vs_sequential[training.MAP].median:.2f}x, "
                f"futures {r.vs_sequential[training.FUTURES].median:.2f}x"
                + (f", gluonnlp {gluonnlp.median:.2f}x" if gluonnlp is not None else "")
                + " the sequential loop; best variant "
                f"{max(v.median for v in r.vs_one_context.values()):.2f}x one context"
            )
        if parts:
            lines.append(f"- {model} model: " + "; ".join(parts) + ".")
    agree = all(ok for r in training_results for ok, _ in r.agreement.values())
    lines.append(f"- All training variants ended with the sequential loop's parameters: {'yes' if agree else 'NO'}.")
    lines.append(f"- RSS changed by {grown.growth_mib:+.1f} MiB over {grown.tasks:,} tasks.")
    return "\n".join(lines)


# The dispatch floors reported against ThreadPoolExecutor and ContextExecutor:
# (title, what it is, its map and submit+result variants).
_DISPATCH_FLOORS = (
    ("the correct floor", "a thread per context + flags + routing",
     (dispatch.FLOOR_CORRECT, dispatch.FLOOR_CORRECT_SUBMIT)),
    ("the contract floor", "a lean executor keeping every per-task promise",
     (dispatch.FLOOR_CONTRACT, dispatch.FLOOR_CONTRACT_SUBMIT)),
)


def targets(
    dispatch_results: Sequence[dispatch.DispatchResult], training_results: Sequence[training.TrainingResult],
    peaks: Sequence[memory.PeakRss], grown: memory.Growth,
) -> List[Tuple[str, str, Optional[bool]]]:
    """(target, figure, met?) rows, one per target and per measured case; met is None for report-only rows."""
    rows: List[Tuple[str, str, Optional[bool]]] = []
    for d in dispatch_results:
        for kind in ("submit+result", "map"):
            ratio = d.ratio[f"ContextExecutor {kind} / ThreadPoolExecutor {kind}"].median
            rows.append((f"dispatch {kind}, N={d.n}: <= 1.0x ThreadPoolExecutor", f"{ratio:.2f}x", ratio <= 1.0))
        ratio = d.ratio["ContextExecutor map / ThreadPoolExecutor map"].median
        rows.append((f"dispatch map, N={d.n}: <= 0.8x ThreadPoolExecutor (stretch)", f"{ratio:.2f}x", ratio <= 0.8))
        theirs = d.us_per_task.get("gluonnlp Parallel put/get")
        if theirs is not None:
            ours = d.us_per_task["pe.Parallel put/get"].median
            rows.append((f"pe.Parallel put/get, N={d.n}: <= 1.0x gluonnlp Parallel",
                         f"{ours / theirs.median:.2f}x ({ours:.1f} vs {theirs.median:.1f} us)", ours <= theirs.median))
        ratio = d.ratio[f"{dispatch.FLOOR_PINNED} / ThreadPoolExecutor map"].median
        rows.append((f"a bare thread per context (map's floor) / ThreadPoolExecutor map, N={d.n} (report only)",
                     f"{ratio:.2f}x", None))
        shared = d.ratio.get(f"{dispatch.FLOOR_SHARED} / gluonnlp Parallel put/get")
        if shared is not None:
            rows.append((f"one shared queue (gluonnlp's design, bare) / gluonnlp Parallel, N={d.n} (report only)",
                         f"{shared.median:.2f}x", None))
        for title, floor_variant in (
            ("one shared queue + the caller's flags (pe.Parallel's design floor)", dispatch.FLOOR_SHARED_FLAGS),
            ("one shared queue keeping every per-call promise (pe.Parallel's contract floor)",
             dispatch.FLOOR_SHARED_CONTRACT),
        ):
            floor_ratio = d.ratio.get(f"{floor_variant} / gluonnlp Parallel put/get")
            if floor_ratio is not None:
                rows.append((f"{title} / gluonnlp Parallel, N={d.n} (report only)", f"{floor_ratio.median:.2f}x",
                             None))
                ratio = d.ratio[f"pe.Parallel put/get / {floor_variant}"].median
                rows.append((f"pe.Parallel put/get / that floor, N={d.n} (report only)", f"{ratio:.2f}x", None))
        ratio = d.ratio[f"ContextExecutor map / {dispatch.FLOOR_PINNED}"].median
        rows.append((f"ContextExecutor map / that floor, N={d.n} (report only)", f"{ratio:.2f}x", None))
        for title, what, floors in _DISPATCH_FLOORS:
            for kind, floor_variant in zip(("map", "submit+result"), floors):
                ratio = d.ratio[f"{floor_variant} / ThreadPoolExecutor {kind}"].median
                rows.append((f"{title} ({what}) / ThreadPoolExecutor {kind}, N={d.n} (report only)",
                             f"{ratio:.2f}x", None))
                ratio = d.ratio[f"ContextExecutor {kind} / {floor_variant}"].median
                rows.append((f"ContextExecutor {kind} / {title}, N={d.n} (report only)", f"{ratio:.2f}x", None))
        for kind in ("submit+result", "map"):
            ratio = d.ratio[f"ContextExecutor {kind}, timeline on / ContextExecutor {kind}"].median
            rows.append((f"timeline recording on, {kind}, N={d.n} (report only)", f"{ratio:.2f}x the cost with it off",
                         None))
    ours_variants = (training.MAP, training.PARALLEL, training.FUTURES)
    for r in training_results:
        present = [name for name in ours_variants if name in r.vs_sequential]
        floor = r.vs_sequential.get(training.FLOOR)
        if r.model == "python-heavy":
            if floor is not None:
                rows.append((f"python-heavy N={r.n}, the floor (a bare thread per context) / sequential (report only)",
                             f"{floor.median:.3f}x", None))
            for name in present:
                ratio = r.vs_sequential[name].median
                rows.append((f"python-heavy N={r.n}, {name}: >= 0.97x sequential", f"{ratio:.3f}x", ratio >= 0.97))
        if r.model == "compute-heavy":
            floor_vs_best = r.vs_best_peer.get(training.FLOOR)
            if floor_vs_best is not None:
                rows.append((f"compute-heavy N={r.n}, the floor (a bare thread per context) / best of sequential and "
                             "gluonnlp (report only)", f"{floor_vs_best.median:.3f}x the best", None))
            for name in present:
                ratio = r.vs_best_peer[name].median
                rows.append((f"compute-heavy N={r.n}, {name}: >= 0.97x best of sequential and gluonnlp",
                             f"{ratio:.3f}x the best", ratio >= 0.97))
            if r.n == 4:
                ratio = r.vs_one_context[training.MAP].median
                rows.append(("compute-heavy N=4, map: >= 1.9x single-context sequential", f"{ratio:.2f}x",
                             ratio >= 1.9))
        if r.model == "sync-in-step" and r.n > 1:
            ceiling = sync_in_step_ceiling(training_results, r)
            if ceiling is not None:
                rows.append((f"sync-in-step N={r.n}: the machine's ceiling, best compute-heavy samples/s at N / "
                             "sequential sync-in-step (report only)", f"{ceiling:.2f}x", None))
            if floor is not None:
                rows.append((f"sync-in-step N={r.n}, the floor (a bare thread per context) / sequential (report only)",
                             f"{floor.median:.2f}x", None))
            for name in present:
                ratio = r.vs_sequential[name].median
                rows.append((f"sync-in-step N={r.n}, {name}: >= 1.7x sequential", f"{ratio:.2f}x", ratio >= 1.7))
            gluonnlp = r.throughput.get(training.GLUONNLP)
            if gluonnlp is not None and training.PARALLEL in r.vs_sequential:
                ratio = r.vs_sequential[training.PARALLEL].median / r.vs_sequential[training.GLUONNLP].median
                rows.append((f"sync-in-step N={r.n}: pe.Parallel >= gluonnlp Parallel", f"{ratio:.3f}x", ratio >= 1.0))
                shared = r.vs_sequential.get(training.SHARED_FLOOR)
                if shared is not None:  # the same ratios of medians as the target row
                    rows.append((f"sync-in-step N={r.n}, pe.Parallel's design floor (one shared SimpleQueue, nothing "
                                 "else) / gluonnlp Parallel (report only)",
                                 f"{shared.median / r.vs_sequential[training.GLUONNLP].median:.3f}x", None))
                    rows.append((f"sync-in-step N={r.n}, pe.Parallel / that floor (report only)",
                                 f"{r.vs_sequential[training.PARALLEL].median / shared.median:.3f}x", None))
        agree = all(ok for ok, _ in r.agreement.values())
        rows.append((f"{r.model} N={r.n}: all variants end with the same parameters", "yes" if agree else "NO", agree))
    growth = grown.growth_mib
    rows.append((f"RSS growth over {grown.tasks:,} tasks < 10 MiB", f"{growth:+.2f} MiB", growth < 10))
    for peak in peaks:
        for name in (training.MAP, training.FUTURES):
            ratio = peak.mib[name] / peak.mib[training.SEQUENTIAL]
            rows.append((f"peak RSS {peak.model} N={peak.n}, {name}: <= sequential + 5%", f"{ratio:.3f}x",
                         ratio <= 1.05))
    return rows


def sync_in_step_ceiling(
    training_results: Sequence[training.TrainingResult], sync: training.TrainingResult
) -> Optional[float]:
    """How fast sync-in-step could go at ``sync.n``: the best compute-heavy throughput there, over its loop's.

    The same network and batch without the host reads: what the machine
    computes when nothing waits, whichever way the shards are driven.
    """
    compute = next((r for r in training_results if r.model == "compute-heavy" and r.n == sync.n), None)
    if compute is None:
        return None
    best = max(summary.median for summary in compute.throughput.values())
    return best / sync.throughput[training.SEQUENTIAL].median


def targets_table(
    dispatch_results: Sequence[dispatch.DispatchResult], training_results: Sequence[training.TrainingResult],
    peaks: Sequence[memory.PeakRss], grown: memory.Growth,
) -> str:
    """Every target with this run's figure and verdict."""
    verdict = {True: "met", False: "**missed**", None: "-"}
    rows = [(target, figure, verdict[ok]) for target, figure, ok in targets(dispatch_results, training_results, peaks,
                                                                           grown)]
    return markdown_table(["target", "this run", "verdict"], rows, "lrl")


def overlap_profile_table(training_results: Sequence[training.TrainingResult]) -> str:
    """Where the recorded steps' time went: medians over the profile rounds."""
    rows = []
    for r in training_results:
        for variant, recordings in (r.overlap or {}).items():
            columns = zip(*(_span_profile(recording) for recording in recordings))
            rows.append([r.model, r.n, variant, *(f"{statistics.median(column):.2f}" for column in columns)])
    headers = ["model", "N", "variant", "ms per step", "forward_backward ms per step", "mean span ms",
               "spans running at once", "trainer.step ms per step"]
    return markdown_table(headers, rows, "lrlrrrrr")


def _span_profile(recording: Dict[str, Any]) -> Tuple[float, float, float, float, float]:
    """(ms per step, forward_backward ms per step, mean span ms, concurrency, trainer.step ms per step)."""
    events = recording["events"]
    spans = [e["dur"] / 1e3 for e in events if e["name"] == "forward_backward"]
    steps = sum(e["name"] == "trainer.step" for e in events)
    step_ms = sum(e["dur"] / 1e3 for e in events if e["name"] == "trainer.step")
    total = max(e["ts"] + e["dur"] for e in events) / 1e3
    return total / steps, sum(spans) / steps, sum(spans) / len(spans), recording["concurrency"], step_ms / steps


def plot_scaling(training_results: Sequence[training.TrainingResult], out: str) -> List[str]:
    """One PNG per model: throughput relative to 1-context sequential, against N."""
    files = []
    for model in dict.fromkeys(r.model for r in training_results):
        rows = sorted((r for r in training_results if r.model == model), key=lambda r: r.n)
        ns = [r.n for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in rows[0].vs_one_context:
            summaries = [r.vs_one_context[name] for r in rows]
            errors = [[s.median - s.q1 for s in summaries], [s.q3 - s.median for s in summaries]]
            ax.errorbar(ns, [s.median for s in summaries], yerr=errors, marker="o", capsize=3, label=name)
        cores = os.cpu_count() or max(ns)
        ax.plot(ns, [min(n, cores) for n in ns], linestyle=":", color="grey", label=f"ideal on {cores} cores")
        ax.set(xticks=ns, xlabel="N contexts (mx.cpu(0) .. mx.cpu(N-1))", ylabel="throughput / 1-context sequential",
               title=f"{model} model: throughput against N")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(_save(fig, out, f"scaling_{model.replace('-', '_')}.png"))
    return files


COLORS = {"forward_backward": "tab:blue", "trainer.step": "tab:orange", "wait for results": "tab:grey",
          "wait in map": "lightgrey", "serial-init gate": "tab:red"}


def plot_overlap(training_results: Sequence[training.TrainingResult], out: str) -> List[str]:
    """One PNG per model: the sequential loop's spans above ContextExecutor.map's."""
    files = []
    for r in training_results:
        if not r.overlap:
            continue
        fig, axes = plt.subplots(2, 1, figsize=(10, 4.8), sharex=True)
        for ax, (variant, recordings) in zip(axes, r.overlap.items()):
            recording = recordings[0]  # the pictures show the first recording
            events, tracks = recording["events"], recording["tracks"]
            for event in events:
                row = tracks.index(event["tid"])
                ax.broken_barh([(event["ts"] / 1e3, event["dur"] / 1e3)], (row - 0.4, 0.8),
                               color=COLORS.get(event["name"], "tab:purple"))
            ax.set_yticks(range(len(tracks)), tracks, fontsize=8)
            ax.invert_yaxis()
            steps_ms = max(e["ts"] + e["dur"] for e in events) / 1e3
            ax.set_title(f"{variant}: {steps_ms:.1f} ms for the steps shown, forward_backward spans overlap "
                         f"{recording['concurrency']:.2f}x on average", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        axes[-1].set_xlabel("ms since the first step began")
        fig.legend(handles=[Patch(color=c, label=n) for n, c in COLORS.items()], loc="lower center", ncol=5, fontsize=8)
        fig.suptitle(f"{r.model} model, N={r.n}: Python-side spans of each step (the engine computes asynchronously)",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        files.append(_save(fig, out, f"overlap_{r.model.replace('-', '_')}.png"))
    return files


def _save(fig: Figure, out: str, name: str) -> str:
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def _images(names: List[str]) -> str:
    return "\n".join(f"![{name}]({name})" for name in names)


def write(out: str, *, command: str, size: str, note: str, env: Dict[str, str], timings: Dict[str, float],
          dispatch_results: Sequence[dispatch.DispatchResult], pieces: Dict[str, float],
          flag_ab: Dict[int, Dict[str, Dict[str, Summary]]], training_results: Sequence[training.TrainingResult],
          peaks: Sequence[memory.PeakRss], grown: memory.Growth, threads: memory.ThreadRss) -> List[str]:
    """Write RESULTS.md and the PNGs into ``out``; return the file names."""
    scaling = plot_scaling(training_results, out)
    overlap = plot_overlap(training_results, out)
    regenerate = (
        "Run the same command to regenerate this file and the plots." if "--out" in command
        else "Run the same command with `--out benchmarks` to regenerate the committed file and plots."
    )
    with open(TEMPLATE, encoding="utf-8") as file:
        template = string.Template(file.read())
    text = template.substitute(
        command=command, size=size, regenerate=regenerate,
        **{f"{part}_s": f"{timings[part]:.0f}" for part in ("total", "dispatch", "training", "memory")},
        note=f"\n> **Note on this run:** {note}\n" if note else "",
        environment_table=markdown_table(["setting", "value"], list(env.items()), "ll"),
        targets_table=targets_table(dispatch_results, training_results, peaks, grown),
        dispatch_tasks=dispatch_results[0].tasks_per_measurement,
        dispatch_rounds=next(iter(dispatch_results[0].us_per_task.values())).n,
        dispatch_table=dispatch.table(dispatch_results),
        pieces_table=dispatch.pieces_table(pieces),
        flags_table=hot_path.table(flag_ab),
        training_steps=training_results[0].steps_per_measurement,
        training_rounds=next(iter(training_results[0].throughput.values())).n,
        batches=", ".join(f"{s.batch_per_context} ({s.name})" for s in training.MODELS.values()),
        training_table=training.table(training_results),
        scaling_plots=_images(scaling),
        overlap_plots=_images(overlap),
        profile_rounds=training.PROFILE_ROUNDS,
        overlap_table=overlap_profile_table(training_results),
        memory_text=memory.table(peaks, grown, threads),
        in_brief=in_brief(dispatch_results, training_results, grown),
    )
    with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as file:
        file.write(text)
    return ["RESULTS.md", *scaling, *overlap]
