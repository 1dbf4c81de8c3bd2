"""The examples run as a user runs them, in a subprocess, with tiny settings.

Each subprocess has a timeout, so a hang fails its test instead of eating CI.
"""

import json
import re
import struct
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

from helpers import ROOT
from helpers.example_runs import EXAMPLES, TINY, check_ok, run, run_all

MODES = ("map", "futures", "legacy", "sequential")


def test_quickstart_runs_and_its_loss_goes_down(tmp_path):
    stdout = run([EXAMPLES / "quickstart.py"], tmp_path).stdout
    losses = [float(x) for x in re.findall(r"^epoch +\d+ +loss ([0-9.]+)$", stdout, re.MULTILINE)]
    assert len(losses) == 20, stdout
    assert losses[-1] < 0.5 * losses[0], losses


def test_readme_quickstart_is_examples_quickstart_verbatim():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("\n## Quickstart\n", 1)[1]
    block = re.search(r"^```python\n(.*?)^```$", quickstart, re.MULTILINE | re.DOTALL)
    assert block is not None, "README's Quickstart section has no python code block"
    assert block.group(1) == (EXAMPLES / "quickstart.py").read_text()


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Output folders of one tiny train_digits run per mode, all from one seed.

    ``map`` goes through the real command line. The other three modes run in
    one more process, through ``main(argv)``, to pay for importing MXNet,
    scikit-learn and matplotlib once rather than three times.
    """
    root = tmp_path_factory.mktemp("digits")
    outs = {mode: root / mode for mode in MODES}
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(EXAMPLES)!r})
        import train_digits
        for mode in {MODES[1:]!r}:
            train_digits.main(["--mode", mode, "--out", {str(root)!r} + "/" + mode, *{TINY!r}])
        """
    )
    procs = run_all(
        {
            "cli": [EXAMPLES / "train_digits.py", "--mode", "map", "--out", outs["map"],
                    "--trace", root / "trace.json", *TINY],
            "main": ["-c", script],
        },
        root,
    )
    cli = check_ok(procs["cli"])
    check_ok(procs["main"])
    return outs, cli.stdout


@pytest.mark.parametrize("mode", MODES)
def test_train_digits_writes_params_metrics_and_plot(digits_runs, mode):
    outs, _ = digits_runs
    out = outs[mode]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {
        "mode", "contexts", "seed", "epochs", "batch_size", "lr", "train_samples", "test_samples",
        "test_accuracy", "wall_time_s", "samples_per_s", "history", "batch_loss",
    }  # fmt: skip
    assert metrics["mode"] == mode and metrics["epochs"] == 1 and len(metrics["history"]) == 1
    epoch_keys = {"epoch", "loss", "train_accuracy", "test_accuracy", "seconds", "samples_per_s"}
    assert set(metrics["history"][0]) == epoch_keys
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["history"][0]["train_accuracy"] > 0.3  # chance is 0.1; counted in every mode

    # One epoch of 1437 // 32 batches: the loss falls within it.
    losses = metrics["batch_loss"]
    assert len(losses) == metrics["train_samples"] // 32
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses

    params = mx.nd.load(str(out / "params.params"))
    assert params and all(np.isfinite(p.asnumpy()).all() for p in params.values())
    assert_valid_png(out / "metrics.png")


def assert_valid_png(path):
    """PNG signature, an IHDR chunk with a plausible size, and Pillow decodes it."""
    from PIL import Image  # a dependency of matplotlib, so of the examples extra

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert width >= 200 and height >= 100, (width, height)
    with Image.open(path) as image:
        image.load()  # decodes every pixel; raises on a truncated or corrupt file
        assert image.size == (width, height)


def test_train_digits_prints_accuracy_wall_time_and_throughput(digits_runs):
    _, stdout = digits_runs
    assert re.search(r"test accuracy [0-9.]+%  wall time [0-9.]+ s  throughput [0-9]+ samples/s", stdout), stdout


def test_train_digits_trace_and_statistics_show_what_ran_where(digits_runs):
    outs, stdout = digits_runs
    table = stdout.split("per-device statistics:\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["worker", "submitted", "ok"]
    assert [row.split()[0] for row in table[1:3]] == ["0:cpu(0)", "1:cpu(1)"]
    assert re.search(r"shards overlapped: [0-9.]+ tasks running at once on average", stdout), stdout
    events = json.loads((outs["map"].parent / "trace.json").read_text())["traceEvents"]
    tracks = {e["tid"] for e in events if e.get("cat") == "task"}
    assert len(tracks) == 2  # one track per device's worker
    batches = json.loads((outs["map"] / "metrics.json").read_text())["train_samples"] // 32
    assert sum(e.get("cat") == "task" for e in events) == 2 * batches  # one span per shard


def test_train_digits_modes_end_with_the_same_parameters(digits_runs):
    outs, _ = digits_runs
    params = {mode: mx.nd.load(str(outs[mode] / "params.params")) for mode in MODES}
    reference = params["map"]
    for mode in MODES[1:]:
        assert params[mode].keys() == reference.keys()
        for name, value in reference.items():
            np.testing.assert_allclose(
                params[mode][name].asnumpy(), value.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=f"{mode}: {name}"
            )


def test_train_digits_under_the_launcher_trains_like_one_process_on_all_its_devices(tmp_path):
    # Two workers, each with 2 contexts and half of every batch, through
    # MXNet's parameter server, against one process with all 4 contexts: the
    # same shard on each device. (Against 2 contexts of twice the shard size
    # the parameters differ by rounding that Adam amplifies, ~1e-3 on some
    # CPUs.) --timeout ends a stalled job before ours does.
    script = EXAMPLES / "train_digits.py"
    launch = ["-m", "parallel_exec.launch", "-n", "2", "--ipc", "--timeout", "60", "--", sys.executable]
    procs = run_all(
        {
            "dist": [*launch, script, "--kvstore", "dist_sync", "--out", tmp_path / "dist", *TINY],
            "one": [script, "--contexts", "cpu:0,cpu:1,cpu:2,cpu:3", "--out", tmp_path / "one", *TINY],
        },
        tmp_path,
    )
    check_ok(procs["dist"])
    check_ok(procs["one"])
    reference = mx.nd.load(str(tmp_path / "one" / "params.params"))
    params = mx.nd.load(str(tmp_path / "dist" / "params.params"))
    assert params.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_allclose(params[name].asnumpy(), value.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_train_digits_resumes_from_its_checkpoint_to_the_parameters_of_an_uninterrupted_run(tmp_path):
    # One epoch with checkpoints, then the same command asked for two: it
    # resumes after the first (parameters, Adam's state, the batch order's
    # random state) and ends where a two-epoch run does.
    script = [EXAMPLES / "train_digits.py", *TINY]  # later --epochs win over TINY's
    resumable = [*script, "--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path / "resumed"]
    whole = [*script, "--epochs", "2", "--out", tmp_path / "whole"]
    procs = run_all({"first": [*resumable, "--epochs", "1"], "whole": whole}, tmp_path)
    check_ok(procs["first"])
    check_ok(procs["whole"])
    resumed = run([*resumable, "--epochs", "2"], tmp_path)
    assert "resuming after epoch 1 from " in resumed.stdout
    reference = mx.nd.load(str(tmp_path / "whole" / "params.params"))
    params = mx.nd.load(str(tmp_path / "resumed" / "params.params"))
    for name, value in reference.items():
        np.testing.assert_array_equal(params[name].asnumpy(), value.asnumpy(), err_msg=name)
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["batch_loss"] == whole["batch_loss"]


BAD_CONTEXTS = {"bad_kind": "tpu:0", "no_such_gpu": "gpu:99"}


@pytest.fixture(scope="module")
def cli_checks(tmp_path_factory):
    """``--help`` and each bad ``--contexts`` value, run side by side."""
    script = EXAMPLES / "train_digits.py"
    commands = {name: [script, "--contexts", value] for name, value in BAD_CONTEXTS.items()}
    commands["help"] = [script, "--help"]
    root = tmp_path_factory.mktemp("cli")
    return root, run_all(commands, root)


@pytest.mark.parametrize("name", BAD_CONTEXTS)
def test_train_digits_bad_contexts_is_a_usage_error(cli_checks, name):
    root, procs = cli_checks
    proc = procs[name]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: train_digits.py"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: argument --contexts: " in proc.stderr and repr(BAD_CONTEXTS[name]) in proc.stderr
    assert not (root / "runs").exists()


def test_train_digits_help_lists_every_option(cli_checks):
    _, procs = cli_checks
    proc = check_ok(procs["help"])
    options = "--mode --kvstore --contexts --epochs --batch-size --lr --test-size --seed --out --trace --checkpoint-dir"
    for option in options.split():
        assert option in proc.stdout, option
    assert all(mode in proc.stdout for mode in MODES)


def test_gluonnlp_migration_trains_the_same_with_put_get_and_futures(tmp_path):
    stdout = run([EXAMPLES / "gluonnlp_migration.py", "--epochs", "3"], tmp_path).stdout
    losses = {style: [] for style in ("put/get", "futures")}
    for style, loss in re.findall(r"^(put/get|futures) +epoch \d+  loss ([0-9.]+)$", stdout, re.MULTILINE):
        losses[style].append(float(loss))
    assert len(losses["put/get"]) == len(losses["futures"]) == 3, stdout
    for curve in losses.values():
        assert curve[-1] < 0.5 * curve[0], losses
    np.testing.assert_allclose(losses["put/get"], losses["futures"], rtol=1e-3)


def test_ps_bootstrap_makes_a_launcher_process_a_ps_lite_worker(tmp_path, monkeypatch):
    # As torchrun would start the third of four processes: scheduler, server, 2 workers.
    for name, value in {"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NODE_IP", raising=False)
    names = ["DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_WORKER", "DMLC_NUM_SERVER"]
    show = f"import os; print(*(os.environ[name] for name in {names!r}))"
    stdout = run([EXAMPLES / "ps_bootstrap.py", sys.executable, "-c", show], tmp_path).stdout
    assert stdout.split() == ["worker", "127.0.0.1", "29501", "2", "1"]
