"""Process-level reliability: exit paths, Ctrl-C in ``map``, fork.

test_exit.py covers a script that leaves queued and running tasks and ends
normally. Here: the ``Parallel`` shim dropped (or left) without ``close()``,
the main thread ending with an exception, a ``KeyboardInterrupt`` while
iterating ``ex.map``, ``DataLoader(num_workers=2)`` (which forks) next to a
live executor, and an executor inherited through ``os.fork()``.

Each script runs in a fresh interpreter under ``subprocess.run(timeout=60)``,
so a hang fails the test instead of blocking the suite.
"""

import gc
import signal
import subprocess
import sys
import textwrap
import threading

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import parallel_exec as pe

from helpers import CPU2, SCRIPT_PRELUDE, TIMEOUT


def run_script(source: str) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh interpreter, bounded by a timeout."""
    return subprocess.run(
        [sys.executable, "-c", SCRIPT_PRELUDE + textwrap.dedent(source)], capture_output=True, text=True, timeout=60
    )


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# --- exit without close() / shutdown() -----------------------------------------------


@pytest.mark.parametrize("how", ["dropped", "left_global"])
def test_parallel_left_open_with_work_in_flight_exits_promptly(how):
    result = run_script(
        f"""
        import mxnet as mx
        import parallel_exec as pe

        started = threading.Event()

        class Slow(pe.Parallelizable):
            def forward_backward(self, x):
                if x == 0:
                    started.set()
                    assert exiting.wait(30)  # still running when the script ends
                say(f"call {{x}} done: {{(mx.nd.ones((2,)) * x).sum().asscalar()}}")
                return x

        def put_some():
            parallel = pe.Parallel(2, Slow(), serial_init=False)
            notice_exit()
            for x in range(6):
                parallel.put(x)
            assert started.wait(30)
            return parallel

        if {how!r} == "dropped":
            put_some()  # the last reference goes here: no close(), no get()
            say("dropped")
        else:
            PARALLEL = put_some()
            say("left open")
        """
    )
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0] in ("dropped", "left open")
    # Every call put ran to the end, the engine still working.
    assert sorted(lines[1:]) == [f"call {x} done: {2.0 * x}" for x in range(6)]
    assert result.stderr == ""


def test_main_thread_exiting_from_an_exception_lets_running_and_queued_work_finish():
    result = run_script(
        """
        import mxnet as mx
        import parallel_exec as pe

        ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)])
        notice_exit()
        started = threading.Event()

        def running():
            started.set()
            assert exiting.wait(30)  # the main thread raises meanwhile
            say("running task done")

        def queued(i):
            say(f"queued task {i} done: {(mx.nd.ones((2,)) * i).sum().asscalar()}")

        class Echo(pe.Parallelizable):
            def forward_backward(self, x):
                say(f"put {x} done")
                return x

        ex.submit_to(mx.cpu(0), running)
        assert started.wait(30)
        for i in range(4):
            ex.submit_to(mx.cpu(i % 2), queued, i)
        parallel = pe.Parallel(2, Echo(), serial_init=False)
        for x in range(3):
            parallel.put(x)
        raise ValueError("main thread failed")
        """
    )
    assert result.returncode == 1, describe(result)
    assert "ValueError: main thread failed" in result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "put 0 done", "put 1 done", "put 2 done",
        "queued task 0 done: 0.0", "queued task 1 done: 2.0", "queued task 2 done: 4.0", "queued task 3 done: 6.0",
        "running task done",
    ]


# --- KeyboardInterrupt while iterating map -------------------------------------------


@pytest.mark.parametrize("source", ["sigint", "loop_body"])
def test_keyboard_interrupt_while_iterating_map_leaves_no_work_and_exits(source):
    # Tasks from 4 on park until the interrupt has been handled, so both
    # workers are busy when it comes; any task starting after it would be
    # work left behind.
    result = run_script(
        f"""
        import atexit
        import os
        import signal

        # Python installs its Ctrl-C handler only where SIGINT is not ignored,
        # and a background job of a non-interactive shell (how CI may start
        # pytest) inherits it ignored: install it as a terminal session has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        started = []  # (task, whether the interrupt had been handled)

        def report():
            # Registered before parallel_exec: runs after its exit hook has
            # joined the workers.
            say(f"tasks started: {{len(started)}}")
            say(f"started after the interrupt: {{sum(after for _, after in started)}}")

        atexit.register(report)

        import mxnet as mx
        import parallel_exec as pe

        ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)], serial_init=False)
        handled = threading.Event()

        def task(i):
            started.append((i, handled.is_set()))
            if i == 4 and {source!r} == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while main waits in result()
            if i >= 4:
                assert handled.wait(30)
            say(f"task {{i}} done")
            return i

        try:
            for value in ex.map(task, range(40)):
                say(f"got {{value}}")
                if value == 3 and {source!r} == "loop_body":
                    raise KeyboardInterrupt  # Ctrl-C while main processes a result
        except KeyboardInterrupt:
            say("KeyboardInterrupt")
            handled.set()
            raise
        """
    )
    # An uncaught KeyboardInterrupt ends Python by SIGINT.
    assert result.returncode == -signal.SIGINT, describe(result)
    lines = result.stdout.splitlines()
    assert "KeyboardInterrupt" in lines
    assert lines[-1] == "started after the interrupt: 0"
    started = int(lines[-2].split(": ")[1])
    assert started < 40
    # Whatever had started ran to the end; nothing else did.
    assert len([line for line in lines if line.startswith("task ")]) == started


# --- fork ------------------------------------------------------------------------------


def test_executor_inherited_through_fork_fails_clearly_in_the_child_and_never_hangs():
    result = run_script(
        """
        import os
        import mxnet as mx
        import parallel_exec as pe
        from parallel_exec import _forkguard

        _forkguard.FORK_WAIT_SECONDS = 0.1  # the parked task waits for the parent: fork without it
        ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)], serial_init=False)
        started, release = threading.Event(), threading.Event()
        running = ex.submit_to(mx.cpu(0), lambda: started.set() or release.wait(30) and "parked")
        assert started.wait(30)
        queued = ex.submit_to(mx.cpu(0), lambda: "queued")
        # A flood of small tasks in flight on the other worker while forking.
        flood = [ex.submit_to(mx.cpu(1), int, i) for i in range(2000)]
        pid = os.fork()
        if pid == 0:
            try:
                for name, call in [("submit", lambda: ex.submit(int)),
                                   ("submit_to", lambda: ex.submit_to(mx.cpu(1), int)),
                                   ("map", lambda: list(ex.map(int, [1])))]:
                    try:
                        call()
                        say(f"child: {name} did not raise")
                    except RuntimeError as exc:
                        say(f"child: {name} refused: {'os.fork()' in str(exc)}")
                for name, future in [("running", running), ("queued", queued)]:
                    exc = future.exception(30)
                    say(f"child: {name} future failed: {type(exc).__name__} {'os.fork()' in str(exc)}")
                pending = [f for f in flood if not f.done()]
                say(f"child: flood futures not done: {len(pending)}")
                ex.shutdown(wait=True)  # no worker to wait for: returns
                with pe.ContextExecutor([mx.cpu(0), mx.cpu(1)]) as fresh:
                    total = fresh.submit(lambda: (mx.nd.ones((3,)) * 2).sum().asscalar()).result(30)
                say(f"child: a new executor works: {total}")
            finally:
                sys.stdout.flush()
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        say(f"parent: child exit status {status}")
        release.set()
        say(f"parent: {running.result(30)} {queued.result(30)} {[f.result(30) for f in flood] == list(range(2000))}")
        say(f"parent: still works: {ex.submit(lambda: (mx.nd.ones((2,)) * 3).sum().asscalar()).result(30)}")
        ex.shutdown()
        """
    )
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines() == [
        "child: submit refused: True",
        "child: submit_to refused: True",
        "child: map refused: True",
        "child: running future failed: RuntimeError True",
        "child: queued future failed: RuntimeError True",
        "child: flood futures not done: 0",
        "child: a new executor works: 6.0",
        "parent: child exit status 0",
        "parent: parked queued True",
        "parent: still works: 6.0",
    ]


# --- Gluon's DataLoader forks worker processes --------------------------------------


def train_two_epochs(ex, num_workers):
    """Train a small net on fixed data; return its parameters."""
    rng = np.random.RandomState(0)
    features = rng.randn(64, 8).astype("float32")
    labels = (features[:, 0] > 0).astype("float32")
    dataset = gluon.data.ArrayDataset(features, labels)
    net = gluon.nn.Dense(2, in_units=8, prefix="dense_")
    net.initialize(mx.init.Constant(0.01), ctx=CPU2)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step(data, label):
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        return loss.mean().asscalar()

    # With num_workers > 0 the loader forks its worker processes here, while
    # the executor's threads are alive.
    loader = gluon.data.DataLoader(dataset, batch_size=16, shuffle=False, num_workers=num_workers)
    try:
        for _ in range(2):
            for data, label in loader:
                shards = gluon.utils.split_and_load(data, CPU2)
                label_shards = gluon.utils.split_and_load(label, CPU2)
                if ex is None:
                    losses = [step(x, y) for x, y in zip(shards, label_shards)]
                else:
                    losses = list(ex.map(step, shards, label_shards, timeout=TIMEOUT))
                assert all(np.isfinite(losses))
                trainer.step(data.shape[0])
    finally:
        del loader  # terminates the worker processes and the pool's threads
        gc.collect()
    return {name: p.data(CPU2[0]).asnumpy() for name, p in net.collect_params().items()}


def test_dataloader_with_worker_processes_next_to_a_live_executor_trains_like_a_serial_loop():
    expected = train_two_epochs(None, num_workers=0)
    # cpu(1) twice: one of its workers is parked on a task while the loader
    # forks, the other serves the cpu(1) shards. No gate: in_units is given,
    # so nothing is initialised lazily.
    with pe.ContextExecutor([mx.cpu(0), mx.cpu(1), mx.cpu(1)], serial_init=False) as ex:
        release = threading.Event()
        busy = ex.submit_to(mx.cpu(1), lambda: release.wait(TIMEOUT))
        try:
            got = train_two_epochs(ex, num_workers=2)
        finally:
            release.set()
        assert busy.result(TIMEOUT) is True
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
