"""Smoke tests of benchmarks/run.py at its smallest size and of the single-question scripts; no timing asserted."""

import os
import subprocess
import sys

from helpers import ROOT

RUN = str(ROOT / "benchmarks" / "run.py")


def table_rows(markdown):
    """The cells of every Markdown table row in ``markdown``, separator rows left out."""
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if not set("".join(row)) <= set("-: ")]


def test_smoke_run_prints_tables_and_parameters_agree(tmp_path):
    out = subprocess.run(
        [sys.executable, RUN, "--smoke", "--no-progress", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=100, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stdout = out.stdout
    for heading in ("## 1. Dispatch overhead", "## 2. Training-step throughput", "## 3. Memory"):
        assert heading in stdout
    rows = table_rows(stdout)
    names = {row[0] for row in rows}
    contract_floor = "floor: a lean executor keeping every per-task promise"
    assert {"ContextExecutor map", "gluonnlp Parallel put/get", f"{contract_floor}, map",
            f"{contract_floor}, submit+result"} <= names
    # pe.Parallel's floors, in the dispatch table and, against gluonnlp's, in the targets table.
    assert {"pe.Parallel put/get", "floor: one shared queue, put/get + the caller's flags and an outcome per call",
            "floor: one shared queue, put/get, keeping every per-call promise of pe.Parallel"} <= names
    assert any(name.startswith("one shared queue keeping every per-call promise (pe.Parallel's contract floor)")
               for name in names)
    # pe.Parallel's design floor on sync-in-step, against gluonnlp's, in the targets table.
    assert "sync-in-step N=2, pe.Parallel's design floor (one shared SimpleQueue, nothing else) / gluonnlp " \
        "Parallel (report only)" in names
    assert "OMP_NUM_THREADS" in stdout and "os.cpu_count()" in stdout

    # Every training variant of every model and N ended with the sequential loop's parameters.
    training = [row for row in rows if row[0] in ("python-heavy", "compute-heavy", "sync-in-step")]
    assert len(training) == 3 * (7 + 7), training  # 3 models x (N=1: 7 variants, N=2: 7 variants)
    assert {"floor: a bare thread per context", "floor: one shared queue (pe.Parallel's design)"} <= {
        row[3] for row in training}, training
    assert all(row[-1].startswith("yes (") for row in training), training
    agreement = [row for row in rows if row[0].endswith("all variants end with the same parameters")]
    assert agreement and all(row[1:] == ["yes", "met"] for row in agreement), agreement
    assert not any("NO" in row for row in rows)

    results = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert "python benchmarks/run.py --smoke" in results
    assert "## Targets" in results and "## What the numbers mean for you" in results
    # Each target is explained in the report itself, with nothing to look up elsewhere.
    assert "What each target asks, and why" in results and "issue" not in results.lower()
    for png in ("scaling_python_heavy.png", "scaling_compute_heavy.png", "scaling_sync_in_step.png",
                "overlap_python_heavy.png", "overlap_compute_heavy.png", "overlap_sync_in_step.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG"), png
        assert f"]({png})" in results


def test_a_run_writes_to_a_git_ignored_folder_by_default():
    # Only ``--out benchmarks`` rewrites the committed RESULTS.md and plots.
    # In a subprocess: importing run.py puts benchmarks/ on sys.path.
    repo = os.path.dirname(os.path.dirname(RUN))
    code = f"import sys; sys.path.insert(0, {os.path.dirname(RUN)!r}); import run; print(run.DEFAULT_OUT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=True)
    assert os.path.relpath(out.stdout.strip(), repo).split(os.sep)[0] == "runs"
    with open(os.path.join(repo, ".gitignore"), encoding="utf-8") as file:
        assert "/runs/" in file.read().split()


def test_churn_quick_prints_its_tables():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "churn.py"), "--quick"],
        capture_output=True, text=True, timeout=100, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = {row[0] for row in table_rows(out.stdout)}
    assert {"ContextExecutor", "ThreadPoolExecutor(2)"} <= names
    assert "paired per round" in out.stdout and "release_idle_threads() ended 2 idle thread(s)" in out.stdout


def test_first_step_thread_prints_its_tables_per_setting():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "first_step_thread.py"), "--rounds", "1", "--steps", "1",
         "--copies", "8"],
        capture_output=True, text=True, timeout=200, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [row[:2] for row in table_rows(out.stdout) if row[0] not in ("MXNET_CPU_TEMP_COPY", "model")]
    default, eight = "4 (MXNet's default)", "8"
    assert [row[0] for row in rows[:2]] == [default, eight]  # the first-step table
    assert rows[2:] == [["sync-in-step", default], ["sync-in-step", eight],
                        ["compute-heavy", default], ["compute-heavy", eight]]  # the training one
    assert "first step on the caller" in out.stdout and "pe.Parallel" in out.stdout


def test_floor_runs_prints_a_row_per_run_and_the_summary_for_each_group():
    expected = {
        "putget": ["pe.Parallel", "contract floor", "design floor", "bare", "pe.Parallel / contract floor"],
        "submit": ["ContextExecutor", "contract floor", "correct floor", "ContextExecutor / contract floor"],
        "map": ["ContextExecutor", "contract floor", "correct floor", "bare", "ContextExecutor / contract floor"],
    }
    for group, columns in expected.items():
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "floor_runs.py"), group, "--runs", "2", "--rounds", "1",
             "--tasks", "20"],
            capture_output=True, text=True, timeout=100, check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        rows = table_rows(out.stdout)
        assert rows[0] == ["run", *columns], group
        assert [row[0] for row in rows[1:]] == ["1", "2", "median", "runs above 1.0"], group
        assert all(float(cell) > 0 for row in rows[1:4] for cell in row[1:]), group


def test_run_rounds_runs_each_variant_once_a_round_in_shuffled_seeded_orders(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import harness

    def rounds_order(seed):
        calls = []
        variants = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in "ABCDEF"}
        results = harness.run_rounds(variants, 12, seed=seed)
        assert {name: len(values) for name, values in results.items()} == dict.fromkeys("ABCDEF", 12)
        orders = [tuple(calls[i:i + 6]) for i in range(0, len(calls), 6)]
        assert all(sorted(order) == list("ABCDEF") for order in orders)  # each variant once per round
        for name, values in results.items():  # each figure is filed under the variant that produced it
            assert all(calls[int(value) - 1] == name for value in values)
        return orders

    orders = rounds_order(seed=0)
    assert len(set(orders)) > 1  # not one fixed order
    assert len({order[0] for order in orders}) > 1  # not always the same variant first
    assert rounds_order(seed=0) == orders  # a rerun measures in the same orders
