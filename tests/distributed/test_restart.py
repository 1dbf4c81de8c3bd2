"""A job that survives a failure: --max-restarts, resuming from checkpoints, no orphans.

The jobs run under ``subprocess`` with a timeout; children's PIDs come from
the launcher's ``started ... (pid N)`` lines, and any still alive when a test
ends are killed, so a failing test leaves nothing behind.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from parallel_exec import launch
from parallel_exec.dist import _parent_death

from helpers import HELPERS, ROOT, restart_train_script

SCRIPT = HELPERS / "restart_train_script.py"
JOB_TIMEOUT = 150  # a deadlock guard: a restarted job takes 15-40 s on a loaded 2-core machine
STARTED = re.compile(r"started [a-z]+(?: \d+)? \(pid (\d+)\)")


def started_pids(launcher_stderr):
    return [int(pid) for pid in STARTED.findall(launcher_stderr or "")]


def alive(pids):
    """The PIDs that still run (a zombie, dead but not yet reaped, does not count)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def kill_all(pids):
    for pid in alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_job(*args, timeout=JOB_TIMEOUT):
    command = [sys.executable, "-m", "parallel_exec.launch", *map(str, args)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        kill_all(started_pids(stderr))
        raise
    return proc


# -- restarts -------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_a_killed_worker_restarts_the_job_which_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path):
    # Worker 1 SIGKILLs itself when 5 of 8 steps are done, on the first
    # attempt only; checkpoints every 3 steps, so the second attempt resumes
    # from step 3 and redoes 2 steps.
    script = [sys.executable, SCRIPT, "--kvstore", "dist_sync", "--steps", 8, "--every", 3, "--kill-at", 5]
    script += ["--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path]
    proc = launch_job("-n", 2, "--max-restarts", 1, "--restart-backoff", 0.1, "--timeout", 60, "--", *script)
    pids = started_pids(proc.stderr)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        failed = r"attempt 1 of 2 failed: worker [01](, rank [01])? \(pid \d+\) was killed by SIGKILL; restarting"
        assert re.search(failed, proc.stderr), proc.stderr
        ports = re.findall(r"job: scheduler 127\.0\.0\.1:(\d+)", proc.stderr)
        assert len(ports) == 2 and ports[0] != ports[1], proc.stderr  # a fresh port for the new attempt
        assert len(pids) == 8  # scheduler, server, 2 workers, twice
        for rank in (0, 1):
            line = rf"^\[worker \d(?:, rank \d)?\] rank {rank} resumed from step (\d+)$"  # labelled by rank once known
            resumed = re.findall(line, proc.stdout, re.MULTILINE)
            assert resumed == ["0", "3"], proc.stdout
        assert not alive(pids)
    finally:
        kill_all(pids)
    contexts = [mx.cpu(i) for i in range(4)]  # one process, the union of both workers' shards
    _, _, expected = restart_train_script.train("device", contexts, 8, tmp_path / "reference", every=3)
    ranks = [dict(np.load(tmp_path / f"params-rank{rank}.npz")) for rank in (0, 1)]
    for name, value in expected.items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        np.testing.assert_allclose(ranks[0][name], value, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.dist
def test_a_job_that_always_fails_runs_max_restarts_plus_one_times_then_fails(tmp_path):
    fail = "import os, sys; print('attempt', os.environ['PE_RESTART_COUNT'], 'of', os.environ['PE_MAX_RESTARTS'])"
    fail += "; sys.exit(3)"
    proc = launch_job("-n", 1, "--max-restarts", 2, "--restart-backoff", 0.01, "--", sys.executable, "-c", fail)
    pids = started_pids(proc.stderr)
    try:
        assert proc.returncode == 1, proc.stderr
        assert re.findall(r"^\[worker 0\] (attempt \d of \d)$", proc.stdout, re.MULTILINE) == [
            "attempt 0 of 2", "attempt 1 of 2", "attempt 2 of 2",
        ]  # fmt: skip
        failed = re.findall(r"attempt (\d) of 3 failed: worker 0 \(pid \d+\) exited with status 3; (\w+)", proc.stderr)
        assert failed == [("1", "restarting"), ("2", "restarting"), ("3", "no")], proc.stderr
        assert not alive(pids)
    finally:
        kill_all(pids)


@pytest.mark.dist
@pytest.mark.parametrize("when", ["during the job", "during the back-off"])
def test_a_signal_to_the_launcher_stops_without_a_restart(tmp_path, when):
    # The worker parks (first case) or fails at once (second, with a long
    # back-off); SIGTERM goes to the launcher once the test has seen that state.
    if when == "during the job":
        worker, ready = "import threading; print('ready', flush=True); threading.Event().wait()", "] ready"
    else:
        worker, ready = "import sys; sys.exit(3)", "restarting the whole job in 20 s"
    options = ["-n", "1", "--max-restarts", "2", "--restart-backoff", "20"]
    command = [sys.executable, "-m", "parallel_exec.launch", *options, "--", sys.executable, "-c", worker]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    try:
        for line in proc.stdout:  # the test's timeout guards this loop
            lines.append(line)
            if ready in line:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.stdout.readlines()
        proc.wait(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        kill_all(started_pids("".join(lines)))
    output = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert len(re.findall(r"job: scheduler", output)) == 1, output  # one attempt only
    if when == "during the back-off":
        assert "not restarting: the launcher received SIGTERM" in output
    assert not alive(started_pids(output))


# -- no orphans -------------------------------------------------------------------


@pytest.mark.dist
def test_no_child_outlives_a_launcher_killed_by_sigkill(tmp_path):
    # Workers that never join: the scheduler and server wait for them forever.
    park = "import threading; print('ready', flush=True); threading.Event().wait()"
    command = [sys.executable, "-m", "parallel_exec.launch", "-n", "2", "--", sys.executable, "-c", park]
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
        pids = []
        try:
            ready = 0
            for line in proc.stdout:  # the test's timeout guards this loop
                ready += line.endswith("] ready\n")
                if ready == 2:
                    break
            stderr.seek(0)
            pids = started_pids(stderr.read())  # written before any child started
            assert len(pids) == 4 and len(alive(pids)) == 4
            proc.kill()  # what the OOM killer or a cluster scheduler does
            proc.wait()
            deadline = time.monotonic() + 5
            while alive(pids) and time.monotonic() < deadline:
                time.sleep(0.05)  # the kernel kills them; nothing to wait on but their exit
            assert not alive(pids)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            kill_all(pids)


def test_a_child_whose_launcher_died_before_it_asked_for_the_signal_kills_itself(monkeypatch, tmp_path):
    # The race: the launcher dies after fork, before prctl. The child then has
    # another parent; forced here by making getppid() lie in the forked child.
    hook = _parent_death.parent_death_hook()
    if hook is None:
        pytest.skip("prctl(PR_SET_PDEATHSIG) is Linux only")
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    assert subprocess.run(command, preexec_fn=hook, timeout=60).returncode == 0  # the launcher alive: runs
    assert marker.exists()
    marker.unlink()
    monkeypatch.setattr(os, "getppid", lambda: 1)  # inherited by the fork: init adopted the child
    assert subprocess.run(command, preexec_fn=hook, timeout=60).returncode == -signal.SIGKILL
    assert not marker.exists()


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-n", "2", "--max-restarts", "-1", "--", "python"], "--max-restarts must not be negative, got -1"),
        (["-n", "2", "--restart-backoff", "-1", "--", "python"], "--restart-backoff must not be negative"),
        (
            ["-n", "2", "--max-restarts", "1", "--local-workers", "1", "--", "python"],
            "--max-restarts needs the whole job under this launcher",
        ),
    ],
)
def test_bad_restart_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as excinfo:
        launch.main(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err
