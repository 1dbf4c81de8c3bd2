"""Multi-process jobs on MXNet's distributed kvstore, under parallel_exec.launch.

Real ps-lite jobs on this machine (Unix sockets, ``--ipc``), one at a time:
pytest runs them in order. Every job runs under ``subprocess`` with a
timeout; a launcher that overran it is killed with every child it
reported, so a hang fails the test instead of leaving processes behind.
The children's PIDs come from the launcher's ``started ... (pid N)`` lines.
"""

import importlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest

from parallel_exec import dist, launch
from parallel_exec.dist import _supervisor

from helpers import HELPERS, ROOT, dist_train_script

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

SCRIPT = HELPERS / "dist_train_script.py"
JOB_TIMEOUT = 120  # a deadlock guard: a job takes 5-20 s on a loaded 2-core machine
STEPS = 10


def _importable(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


HOROVOD = _importable("horovod.mxnet")
# .ci/run builds Horovod and sets this, so there its test runs or fails, never skips.
REQUIRE_HOROVOD = os.environ.get("PE_REQUIRE_HOROVOD") == "1"


def _started_pids(launcher_stderr):
    return [int(pid) for pid in re.findall(r"started [a-z]+(?: \d+)? \(pid (\d+)\)", launcher_stderr or "")]


def _alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def _kill_groups(pids):
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)  # each child leads its own session
        except (ProcessLookupError, PermissionError):
            pass


def run_launcher(*args, timeout=JOB_TIMEOUT):
    """Run ``python -m parallel_exec.launch ARGS``; return it and its children's PIDs."""
    command = [sys.executable, "-m", "parallel_exec.launch", *map(str, args)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        _kill_groups(_started_pids(stderr))
        raise
    pids = _started_pids(proc.stderr)
    assert len(pids) >= 3, f"expected a scheduler, a server and workers to start:\n{proc.stderr}"
    return proc, pids


def train_job(tmp_path, kvstore, *extra, timeout=""):
    launcher_options = ["--ipc", "-n", 2, "-s", 1] + (["--timeout", timeout] if timeout else [])
    command = [sys.executable, SCRIPT, "--kvstore", kvstore, "--out", tmp_path, "--steps", STEPS, *extra]
    return run_launcher(*launcher_options, "--", *command)


@pytest.fixture(scope="module")
def reference_params():
    """One process training on the union of the data over 4 contexts."""
    _, params = dist_train_script.train("device", [mx.cpu(i) for i in range(4)], STEPS)
    return params


# -- whole jobs -------------------------------------------------------------


@pytest.mark.parametrize("kvstore", ["dist_sync", "dist_device_sync"])
def test_two_workers_train_like_one_process_on_all_their_contexts(tmp_path, kvstore, reference_params):
    proc, pids = train_job(tmp_path, kvstore)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "job finished: every worker exited 0" in proc.stderr
    assert not _alive(pids)
    assert_trained_like(reference_params, tmp_path)
    # Output is streamed, labelled by launch index and, once it is known, rank.
    assert re.search(r"^\[worker [01](, rank [01])?\] rank [01] step 9 loss", proc.stdout, re.MULTILINE)


def assert_trained_like(reference_params, out):
    """Both workers saved the same parameters, those of the one-process run."""
    ranks = [dict(np.load(out / f"params-rank{rank}.npz")) for rank in (0, 1)]
    assert sorted(ranks[0]) == sorted(reference_params)
    for name, expected in reference_params.items():
        # Bitwise equal between workers: they apply the same summed gradient.
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        np.testing.assert_allclose(ranks[0][name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.skipif(
    not (HOROVOD or REQUIRE_HOROVOD), reason="needs Horovod built with MXNet support, the optional 'horovod' extra"
)
def test_horovod_two_processes_train_like_one_process_on_all_their_contexts(tmp_path, reference_params):
    # Horovod's own trainer would allreduce only each process's first context.
    horovodrun = Path(sys.executable).with_name("horovodrun")
    command = [horovodrun, "--gloo", "-np", 2, "-H", "localhost:2", sys.executable, SCRIPT]
    command += ["--kvstore", "horovod", "--out", tmp_path, "--steps", STEPS]
    proc = subprocess.run(
        list(map(str, command)), capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_trained_like(reference_params, tmp_path)


@pytest.mark.parametrize(
    "fail, reason",
    [
        pytest.param("raise", r"worker [01], rank 1 \(pid \d+\) exited with status 1", id="raise"),
        pytest.param("kill", r"worker [01], rank 1 \(pid \d+\) was killed by SIGKILL", id="kill"),
        pytest.param("stall", r"no output from any worker for 8 s", id="stall"),
    ],
)
def test_a_failing_worker_stops_the_whole_job(tmp_path, fail, reason):
    # ps-lite never notices a dead peer: without the launcher, each of these
    # leaves every other process of the job waiting forever.
    proc, pids = train_job(tmp_path, "dist_sync", "--fail", fail, timeout=8)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search("job failed: " + reason, proc.stderr), proc.stderr
    assert not _alive(pids)
    assert not list(tmp_path.glob("params-rank*.npz"))
    if fail == "raise":
        assert "RuntimeError: injected failure in a task" in proc.stdout


# A plain ps-lite worker: no parallel_exec. Rank 1 raises at step 2 (in the
# main thread or another) while rank 0 waits in pull for its push. A
# heartbeat until then keeps a short --timeout from firing on a slow start.
PLAIN_WORKER = """
import sys, threading
joined = threading.Event()

def heartbeat():
    while not joined.wait(0.5):
        print("starting", flush=True)

threading.Thread(target=heartbeat, daemon=True).start()
import mxnet as mx

where = sys.argv[1]
kv = mx.kv.create("dist_sync")
kv.init(3, mx.nd.ones((2,)))
out = mx.nd.zeros((2,))
joined.set()

def fail():
    raise RuntimeError(f"plain worker failed in {where}")

for step in range(5):
    if step == 2 and kv.rank == 1:
        if where == "thread":
            threading.Thread(target=fail, name="failing").start()
            threading.Event().wait()
        fail()
    kv.push(3, mx.nd.ones((2,)))
    kv.pull(3, out=out)
    out.wait_to_read()
"""


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_plain_ps_lite_worker_that_raises_ends_its_job(where):
    # Without the launcher's fail-fast hook the worker that raised hangs in
    # MXNet's exit handlers (main) or runs on (thread): the job would end only
    # at the --timeout, which is longer than this test's.
    proc, pids = run_launcher("--ipc", "-n", 2, "--timeout", 600, "--", sys.executable, "-c", PLAIN_WORKER, where)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # Its ps-lite rank labels the worker once known.
    assert re.search(r"job failed: worker [01], rank 1 \(pid \d+\) exited with status 1", proc.stderr), proc.stderr
    assert f"RuntimeError: plain worker failed in {where}" in proc.stdout
    assert ("thread failing" if where == "thread" else "the main thread") in proc.stdout
    assert not _alive(pids)


def test_no_fail_fast_leaves_a_raising_worker_to_the_timeout():
    command = [sys.executable, "-c", PLAIN_WORKER, "main"]
    proc, pids = run_launcher("--ipc", "-n", 2, "--timeout", 8, "--no-fail-fast", "--", *command)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "RuntimeError: plain worker failed in main" in proc.stdout
    assert "job failed: no output from any worker for 8 s" in proc.stderr
    assert not _alive(pids)


# Draws a progress bar as tqdm does (redrawn with \r, block characters)
# without joining any kvstore, and writes bytes so that its own stdout's
# encoding does not matter.
BAR_WORKER = """
import sys
for percent in range(0, 101, 10):
    sys.stdout.buffer.write(("\\r" + "\\u2588" * (percent // 10) + f" {percent}%").encode())
    sys.stdout.buffer.flush()
sys.stdout.buffer.write(b"\\ndone\\n")
"""


def test_a_worker_that_never_joins_with_a_progress_bar_on_an_ascii_stdout(monkeypatch):
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")  # the launcher's stdout cannot encode the bar
    proc, pids = run_launcher("--ipc", "-n", 1, "--", sys.executable, "-c", BAR_WORKER)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The bar is one line in its last state, its blocks escaped.
    assert proc.stdout.splitlines() == ["[worker 0] " + "\\u2588" * 10 + " 100%", "[worker 0] done"]
    # The user forgot --kvstore dist_sync: each worker trained alone.
    assert "no worker joined a distributed kvstore" in proc.stderr
    assert not _alive(pids)


def test_the_launcher_stops_the_job_when_its_output_closes():
    # As with `| head -1`: the reader goes away after one line.
    talk = "import itertools\nfor i in itertools.count(): print(i, flush=True)"
    command = [sys.executable, "-m", "parallel_exec.launch", "-n", "1", "--ipc", "--", sys.executable, "-c", talk]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        proc.stdout.readline()  # the module's timeout guards this
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.wait(JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 1, stderr
    assert "job failed: the launcher's output is closed (BrokenPipeError)" in stderr
    pids = _started_pids(stderr)
    assert len(pids) == 3
    assert not _alive(pids)


def test_ctrl_c_stops_every_process(tmp_path):
    # Workers that never join: the scheduler and server wait for them forever.
    park = "import threading; print('ready', flush=True); threading.Event().wait()"
    command = [sys.executable, "-m", "parallel_exec.launch", "-n", "2", "--ipc", "--", sys.executable, "-c", park]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = set()
        for line in proc.stdout:  # the module's timeout guards this loop
            if line.endswith("] ready\n"):
                ready.add(line.split("]")[0])
            if len(ready) == 2:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            _kill_groups(_started_pids(proc.stderr.read()))
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "job failed: the launcher received SIGINT" in stderr
    pids = _started_pids(stderr)
    assert len(pids) == 4
    assert not _alive(pids)


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-n", "0", "--", "python", "train.py"], "-n/--num-workers must be at least 1, got 0"),
        (["-n", "2"], "missing the command to run"),
        (["-n", "2", "python", "train.py", "--kvstore", "dist_sync"], "did you forget `--` before the workers'"),
        (["-n", "2", "--"], "missing the command to run: put it after --"),
        (["--", "python"], "the following arguments are required: -n/--num-workers"),
        (["-n", "2", "-s", "0", "--", "python"], "ps-lite needs a server"),
        (["-n", "2", "--scheduler", "10.0.0.1:9000", "--", "python"], "needs --host"),
    ],
)
def test_launcher_bad_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as excinfo:
        launch.main(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_launcher_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as excinfo:
        launch.main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "[--no-fail-fast] -- COMMAND [ARG ...]" in " ".join(out.split())  # the usage line, however wrapped
    options = ["--num-workers", "--num-servers", "--timeout", "--grace", "--host", "--scheduler", "--ipc"]
    for option in [*options, "--no-fail-fast"]:
        assert option in out, option


def test_unknown_kvstore_type_names_the_choices():
    expected = r"unknown kvstore type 'dist_foo'; expected one of device, local, dist_sync, .*horovod"
    with pytest.raises(ValueError, match=expected):
        dist.init_worker("dist_foo")


def test_horovod_without_horovod_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)  # import horovod.mxnet raises ImportError
    # Not sys.__excepthook__: before 3.11 the exceptiongroup backport (pytest's) installs its own.
    excepthook = sys.excepthook
    expected = r"kvstore 'horovod' needs Horovod built with MXNet support.*docs/multi-machine.md"
    with pytest.raises(ImportError, match=expected):
        dist.init_worker("horovod")
    assert sys.excepthook is excepthook  # nothing installed by a failed join


def test_distributed_kvstore_outside_a_job_says_how_to_start_one(monkeypatch):
    for name in ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER"):
        monkeypatch.delenv(name, raising=False)
    # Creating the kvstore here would wait forever for a scheduler.
    with pytest.raises(RuntimeError, match=r"DMLC_ROLE=None.*python -m parallel_exec.launch"):
        dist.init_worker("dist_sync")


# -- worker side without a job ------------------------------------------------


def test_local_kvstore_is_a_single_worker_that_changes_nothing():
    worker = dist.init_worker("device")
    assert (worker.rank, worker.num_workers, worker.kvstore) == (0, 1, None)
    data = np.arange(7)
    np.testing.assert_array_equal(worker.shard(data), data)
    net = mx.gluon.nn.Dense(2, in_units=3)
    net.initialize(ctx=mx.cpu(0))
    trainer = worker.trainer(net.collect_params(), "sgd", {"learning_rate": 1.0})
    assert isinstance(trainer, dist.DistTrainer)
    with pytest.raises(TypeError, match="do not pass kvstore"):
        worker.trainer(net.collect_params(), "sgd", kvstore="device")


def _fake_worker(rank, num_workers, kvstore_type="dist_sync"):
    """A WorkerProcess without a kvstore: enough for shard."""
    return dist.WorkerProcess(kvstore_type, rank, num_workers)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_shard_gives_equal_contiguous_shares_and_drops_the_rest(rank):
    worker = _fake_worker(rank, 3)
    expected = list(range(3 * rank, 3 * rank + 3))  # 11 samples: 3 each, 2 dropped
    assert list(worker.shard(list(range(11)))) == expected
    assert worker.shard(mx.nd.arange(11)).asnumpy().tolist() == expected
    dataset = mx.gluon.data.SimpleDataset(list(range(11)))
    assert list(worker.shard(dataset)) == expected


def test_broadcast_refuses_parameters_whose_shape_is_unknown():
    net = mx.gluon.nn.Dense(2)  # in_units unknown until a forward pass
    net.initialize()
    with pytest.raises(ValueError, match="is not initialized yet"):
        dist.init_worker("device").broadcast(net.collect_params())


@pytest.mark.parametrize("where", ["main", "thread"])
def test_fail_fast_ends_the_process_on_an_uncaught_exception(where):
    # A non-daemon thread that never ends: without the hook the process
    # would wait for it at exit (main) or run on (thread) forever.
    program = f"""
import threading
from parallel_exec import dist
dist.install_fail_fast()
threading.Thread(target=threading.Event().wait).start()
def fail():
    raise RuntimeError("boom in {where}")
if "{where}" == "main":
    fail()
threading.Thread(target=fail, name="failing").start()
threading.Event().wait()
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 1
    assert f"RuntimeError: boom in {where}" in proc.stderr
    assert ("thread failing" if where == "thread" else "the main thread") in proc.stderr


# -- without MXNet --------------------------------------------------------------

# Prepended to a program to run it where ``import mxnet`` fails, as on a machine without MXNet.
WITHOUT_MXNET = "import runpy, sys\nsys.modules['mxnet'] = None\n"


def run_without_mxnet(program):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MXNET + program], capture_output=True, text=True, timeout=JOB_TIMEOUT
    )


def test_launcher_and_role_environment_run_without_mxnet():
    # The launcher and a cluster's role mapping run where MXNet is absent, and
    # never import it (MXNet reads DMLC_ROLE at import and becomes that role).
    proc = run_without_mxnet(
        """
from parallel_exec.dist import role_environment, role_of_process
role, _ = role_of_process(0, num_workers=1, num_servers=1)
role_environment(role, num_workers=1, num_servers=1, scheduler_host="127.0.0.1", scheduler_port=9000)
sys.argv = ["launch", "--help"]
runpy.run_module("parallel_exec.launch", run_name="__main__")
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert "--num-workers" in proc.stdout


def test_package_names_load_on_first_use():
    proc = run_without_mxnet(
        """
import parallel_exec as pe
from parallel_exec import dist
assert set(pe.__all__) <= set(dir(pe)) and set(dist.__all__) <= set(dir(dist))
pe.ContextExecutor
"""
    )
    # Only touching a name that needs MXNet imports it, with the install advice.
    assert proc.returncode == 1
    assert "parallel_exec needs MXNet, which is not installed" in proc.stderr, proc.stderr


def test_every_public_name_resolves():
    import parallel_exec as pe

    for module in (pe, dist):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        pe.nope  # noqa: B018
    # Old names stay importable, though not in dist.__all__.
    assert dist.DIST_KVSTORE_TYPES == ("dist_sync", "dist_device_sync", "dist_async")
    assert issubclass(dist.HorovodTrainer, mx.gluon.Trainer)


@pytest.mark.parametrize("interval, snapshot", [(0.0, ["10%"]), (3600.0, [])])
def test_a_redrawn_line_is_printed_in_its_last_state_and_at_most_once_per_interval(interval, snapshot):
    # A progress bar redraws its line with \r; the launcher prints that line
    # once it ends, and a snapshot of it only when the interval has passed.
    read_fd, write_fd = os.pipe()
    events = queue.SimpleQueue()
    with open(read_fd, "rb") as stream:
        child = SimpleNamespace(proc=SimpleNamespace(stdout=stream))
        reader = threading.Thread(target=_supervisor._read_output, args=(child, events, interval))
        reader.start()
        try:
            os.write(write_fd, b"\r 0%\r10%")
            assert events.get(timeout=JOB_TIMEOUT)[2] == snapshot  # any output counts as progress
            os.write(write_fd, b"\r20%\r100%\nnext\n")
            assert events.get(timeout=JOB_TIMEOUT)[2] == ["100%", "next"]
        finally:
            os.close(write_fd)
            reader.join(JOB_TIMEOUT)


@pytest.mark.parametrize("fail_fast", ["1", "0"])
def test_worker_start_up_hook_fails_fast_and_runs_the_sitecustomize_it_hides(tmp_path, fail_fast):
    # What the launcher puts first on a worker's PYTHONPATH; the user's own
    # sitecustomize still runs.
    site = Path(dist.__file__).parent / "_site"
    (tmp_path / "sitecustomize.py").write_text("print('user sitecustomize ran', flush=True)\n")
    program = """
import threading
def fail():
    raise RuntimeError("boom in a thread")
thread = threading.Thread(target=fail, name="failing")
thread.start()
thread.join()
print("survived", flush=True)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(tmp_path)]), PARALLEL_EXEC_FAIL_FAST=fail_fast)
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.stdout.startswith("user sitecustomize ran\n")
    assert "RuntimeError: boom in a thread" in proc.stderr
    if fail_fast == "1":
        assert (proc.returncode, "survived" in proc.stdout) == (1, False)
        assert "uncaught exception in thread failing" in proc.stderr
    else:  # --no-fail-fast: Python's default hook
        assert (proc.returncode, "survived" in proc.stdout) == (0, True)


# -- role_environment: pure ---------------------------------------------------


def test_role_environment_is_everything_a_local_process_needs():
    env = dist.role_environment("worker", num_workers=4, num_servers=2, scheduler_host="127.0.0.1", scheduler_port=9091)
    assert env == {
        "DMLC_ROLE": "worker",
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": "9091",
        "DMLC_NUM_WORKER": "4",
        "DMLC_NUM_SERVER": "2",
        "DMLC_NODE_HOST": "127.0.0.1",  # else ps-lite announces the first non-loopback interface
        "DMLC_LOCAL": "0",
    }


def test_role_environment_on_another_machine_and_with_unix_sockets():
    env = dist.role_environment(
        "server", num_workers=1, num_servers=1, scheduler_host="10.0.0.1", scheduler_port=9000, node_host="10.0.0.2"
    )
    assert (env["DMLC_ROLE"], env["DMLC_PS_ROOT_URI"], env["DMLC_NODE_HOST"]) == ("server", "10.0.0.1", "10.0.0.2")
    env = dist.role_environment(
        "scheduler", num_workers=1, num_servers=1, scheduler_host="127.0.0.1", scheduler_port=1, unix_sockets=True
    )
    assert env["DMLC_LOCAL"] == "1"


def test_role_environment_reads_no_environment(monkeypatch):
    monkeypatch.setenv("DMLC_ROLE", "server")
    monkeypatch.setenv("DMLC_NODE_HOST", "10.9.9.9")
    env = dist.role_environment("worker", num_workers=1, num_servers=1, scheduler_host="127.0.0.1", scheduler_port=80)
    assert (env["DMLC_ROLE"], env["DMLC_NODE_HOST"]) == ("worker", "127.0.0.1")


@pytest.mark.parametrize(
    "role, workers, servers, port, message",
    [
        ("master", 1, 1, 80, "unknown role 'master'"),
        ("worker", 0, 1, 80, "num_workers must be at least 1, got 0"),
        ("worker", 1, 0, 80, "num_servers must be at least 1"),
        ("worker", 1, 1, 0, "scheduler_port must be in 1..65535, got 0"),
        ("worker", 1, 1, 65536, "got 65536"),
    ],
)
def test_role_environment_rejects_bad_values(role, workers, servers, port, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dist.role_environment(
            role, num_workers=workers, num_servers=servers, scheduler_host="127.0.0.1", scheduler_port=port
        )


def test_role_of_process_maps_a_cluster_rank_to_a_role():
    roles = [dist.role_of_process(i, num_workers=3, num_servers=2) for i in range(6)]
    assert roles == [("scheduler", 0), ("server", 0), ("server", 1), ("worker", 0), ("worker", 1), ("worker", 2)]
    with pytest.raises(ValueError, match="process index 6 is outside 0..5"):
        dist.role_of_process(6, num_workers=3, num_servers=2)


def test_worker_process_keeps_its_earlier_name():
    from parallel_exec.dist import Worker

    assert Worker is dist.WorkerProcess
    assert "Worker" not in dist.__all__
