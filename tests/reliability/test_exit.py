"""Lifecycle: shutdown, garbage collection, interpreter exit, missing MXNet.

The exit tests run a script in a fresh interpreter (``subprocess.run`` with
a timeout, so a hang fails instead of blocking the suite) and read what it
printed.
"""

import gc
import subprocess
import sys
import textwrap
import threading
import weakref

import mxnet as mx
import pytest

import parallel_exec as pe

from helpers import CPU2, SCRIPT_PRELUDE, TIMEOUT, wait_until_workers_end


def run_script(source: str) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh interpreter; fail on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT_PRELUDE + textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"exit status {result.returncode}\n{output}"
    return result


def new_threads(before):
    return [t for t in threading.enumerate() if t not in before]


# --- in this process ------------------------------------------------------------


def test_close_leaves_no_thread_serving():
    class Echo(pe.Parallelizable):
        def forward_backward(self, x):
            return x

    before = set(threading.enumerate())
    parallel = pe.Parallel(2, Echo(), serial_init=False)
    workers = new_threads(before)
    assert len(workers) == 2
    parallel.put(1)
    assert parallel.get() == 1
    parallel.close()
    assert pe.release_idle_threads() == 2  # both idle, kept for a later executor
    assert not any(t.is_alive() for t in workers)


def test_collected_executor_finishes_its_tasks_then_its_workers_go_idle():
    before = set(threading.enumerate())
    release = threading.Event()
    started = threading.Event()

    def parked():
        started.set()
        assert release.wait(TIMEOUT)
        return "parked"

    ex = pe.ContextExecutor(CPU2)
    workers = new_threads(before)
    running = ex.submit_to(CPU2[0], parked)
    assert started.wait(TIMEOUT)
    queued = [ex.submit_to(CPU2[0], lambda i=i: (mx.nd.ones((2,)) * i).sum().asscalar()) for i in range(3)]
    collected = weakref.ref(ex)
    slots = ex._slots  # they hold no reference to the executor
    del ex
    gc.collect()
    assert collected() is None  # workers hold no reference to the executor
    release.set()
    assert running.result(TIMEOUT) == "parked"
    assert [f.result(TIMEOUT) for f in queued] == [0.0, 2.0, 4.0]
    assert wait_until_workers_end(slots)
    assert pe.release_idle_threads() == 2
    assert not any(t.is_alive() for t in workers)


# --- in a fresh interpreter -------------------------------------------------------


def test_exit_without_shutdown_runs_queued_tasks_and_exits_0():
    result = run_script(
        """
        import threading
        import mxnet as mx
        import parallel_exec as pe

        ex = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)])
        notice_exit()
        started = threading.Event()

        def parked():
            started.set()
            exiting.wait(30)  # still running when the interpreter starts to exit
            say("parked task done")

        def queued(i):
            total = (mx.nd.ones((2,)) * i).sum().asscalar()  # the engine still works
            say(f"queued task {i} done: {total}")

        ex.submit_to(mx.cpu(0), parked)
        assert started.wait(30)
        for i in range(4):
            ex.submit_to(mx.cpu(i % 2), queued, i)
        say("main thread ends")
        """
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "main thread ends"
    assert sorted(lines[1:]) == ["parked task done"] + [f"queued task {i} done: {2.0 * i}" for i in range(4)]


def test_exit_with_idle_threads_in_the_pool_exits_0():
    result = run_script(
        """
        import mxnet as mx
        import parallel_exec as pe

        for i in range(3):
            with pe.ContextExecutor([mx.cpu(0), mx.cpu(1)]) as ex:
                ex.submit(lambda: (mx.nd.ones((2,)) * 2).sum().asscalar()).result(30)
        say(f"idle threads: {sorted(t.name for t in threading.enumerate() if t.name != 'MainThread')}")
        """
    )
    assert result.stdout.splitlines() == ["idle threads: ['parallel_exec-idle[cpu(0)]', 'parallel_exec-idle[cpu(1)]']"]


def test_the_exit_and_fork_hooks_are_registered_by_the_first_executor_not_by_import():
    result = run_script(
        """
        import atexit
        import weakref
        import mxnet as mx

        class Anchor:
            pass

        weakref.finalize(Anchor, int)  # weakref registers its own exit hook with the first finalize
        base = atexit._ncallbacks()
        import parallel_exec as pe
        pe.ContextExecutor, pe.Parallel  # their modules load
        say(f"after import: {atexit._ncallbacks() - base}")
        pe.ContextExecutor([mx.cpu(0)]).shutdown()
        say(f"after the first executor: {atexit._ncallbacks() - base}")
        pe.ContextExecutor([mx.cpu(0)]).shutdown()
        say(f"after the second: {atexit._ncallbacks() - base}")
        """
    )
    assert result.stdout.splitlines() == ["after import: 0", "after the first executor: 1", "after the second: 1"]


def test_no_fork_hook_is_registered_by_import_only_by_the_first_parallel_or_executor():
    result = run_script(
        """
        import os
        import mxnet as mx

        registered = []
        real_register = os.register_at_fork

        def counting(**hooks):
            registered.append(hooks)
            real_register(**hooks)

        os.register_at_fork = counting
        import parallel_exec as pe
        pe.ContextExecutor, pe.Parallel  # their modules load
        say(f"after import: {len(registered)}")

        class Echo(pe.Parallelizable):
            def forward_backward(self, x):
                return x

        with pe.Parallel(0, Echo()):
            pass
        say(f"after the first Parallel: {len(registered)}")
        with pe.Parallel(0, Echo()):
            pass
        say(f"after the second: {len(registered)}")
        """
    )
    after_import, after_first, after_second = (int(line.rsplit(": ", 1)[1]) for line in result.stdout.splitlines())
    assert (after_import, after_second) == (0, after_first) and after_first > 0


def test_module_global_executor_and_parallel_exit_0():
    result = run_script(
        """
        import mxnet as mx
        import parallel_exec as pe

        class Echo(pe.Parallelizable):
            def forward_backward(self, x):
                return x

        EXECUTOR = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)])
        PARALLEL = pe.Parallel(2, Echo(), serial_init=False)
        print(EXECUTOR.submit(mx.nd.ones, (2,)).result(30).sum().asscalar(), flush=True)
        PARALLEL.put("put")
        print(PARALLEL.get(), flush=True)
        """
    )
    assert result.stdout.splitlines() == ["2.0", "put"]


def test_parallel_open_at_exit_runs_the_calls_put_then_refuses_puts():
    # Its workers each run one long task serving the shared queue: the exit
    # must tell those loops to end, after the calls put, or it would wait forever.
    result = run_script(
        """
        import atexit
        import threading

        def put_at_exit():
            try:
                PARALLEL.put("too late")
            except RuntimeError as exc:
                print("refused:", exc, flush=True)

        atexit.register(put_at_exit)  # before parallel_exec's hooks: runs after them

        import mxnet as mx
        import parallel_exec as pe

        started, release = threading.Event(), threading.Event()

        class Slow(pe.Parallelizable):
            def forward_backward(self, x):
                if x == 0:
                    started.set()
                    release.wait(30)
                print("ran", x, flush=True)
                return x

        PARALLEL = pe.Parallel(1, Slow(), serial_init=False)
        for x in range(3):
            PARALLEL.put(x)
        started.wait(30)
        atexit.register(release.set)  # after parallel_exec's hooks: runs first
        """
    )
    assert result.stdout.splitlines() == [
        "ran 0", "ran 1", "ran 2", "refused: cannot put() on a Parallel after interpreter exit began"
    ]


def test_submit_during_interpreter_exit_raises():
    result = run_script(
        """
        import atexit

        def submit_at_exit():
            for submit in (lambda: EX.submit(print, "ran"), lambda: EX.submit_to(mx.cpu(0), print, "ran")):
                try:
                    submit()
                except RuntimeError as exc:
                    print("refused:", exc, flush=True)

        # Registered before parallel_exec's hook, so (last in, first out) it
        # runs after that hook has stopped the workers.
        atexit.register(submit_at_exit)

        import mxnet as mx
        import parallel_exec as pe

        EX = pe.ContextExecutor([mx.cpu(0), mx.cpu(1)])
        EX.submit(print, "before exit").result(30)
        """
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "before exit"
    assert len(lines) == 3
    for line in lines[1:]:
        assert line.startswith("refused:") and "interpreter shutdown" in line


@pytest.mark.parametrize("hide", ["None", "raise"])
def test_import_without_mxnet_says_what_to_install(tmp_path, hide):
    # Either way an import of mxnet fails: a None entry in sys.modules, or
    # an mxnet package that raises ImportError (as a broken install does).
    fake = tmp_path / "mxnet"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named mxnet (simulated)')\n")
    result = run_script(
        f"""
        import sys
        if {hide!r} == "None":
            sys.modules["mxnet"] = None
        else:
            sys.path.insert(0, {str(tmp_path)!r})
        import parallel_exec  # the top level loads MXNet-backed names on first use
        try:
            parallel_exec.ContextExecutor
        except ImportError as exc:
            print(type(exc).__name__, exc)
        else:
            print("imported without mxnet")
        """
    )
    message = result.stdout
    assert message.startswith("ImportError")
    assert "needs MXNet" in message
    assert "pip install" in message and "mxnet" in message


def test_an_exit_callback_that_raises_is_logged_and_the_workers_still_finish():
    result = run_script(
        """
        import mxnet as mx
        import parallel_exec as pe
        from parallel_exec import _lifecycle

        def broken():
            raise ValueError("broken exit callback")

        ex = pe.ContextExecutor([mx.cpu(0)])
        notice_exit()
        _lifecycle.call_before_exit(broken)
        started = threading.Event()

        def parked():
            started.set()
            exiting.wait(30)  # still running when the exit hook calls the broken callback
            say("parked task done")

        ex.submit(parked)
        assert started.wait(30)
        say("main thread ends")
        """
    )
    assert result.stdout.splitlines() == ["main thread ends", "parked task done"]
    assert "Exception in an exit callback" in result.stderr and "broken exit callback" in result.stderr
