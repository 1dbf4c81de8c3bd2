"""dist.Checkpointer in one process: what is saved, atomicity, damaged files, resuming after a kill."""

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from parallel_exec import dist
from parallel_exec.dist import _checkpoint_files, _random_state

from helpers import HELPERS, ROOT, restart_train_script

SCRIPT = HELPERS / "restart_train_script.py"
CPU2 = [mx.cpu(0), mx.cpu(1)]
RUN_TIMEOUT = 120  # a deadlock guard: a run takes 3-10 s on a loaded 2-core machine


@pytest.fixture(autouse=True)
def keep_global_random_state():
    """restore() sets Python's and NumPy's global random state: give it back to the other tests."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def make_net_and_trainer(seed, contexts=CPU2):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(5, activation="relu", in_units=3), gluon.nn.Dense(2, in_units=5))
    net.initialize(mx.init.Normal(1.0), ctx=contexts)
    values = np.random.RandomState(seed)
    for _, param in sorted(net.collect_params().items()):
        param.set_data(mx.nd.array(values.normal(size=param.shape)))
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.1})
    return net, trainer


def train_steps(net, trainer, rng, steps, contexts=CPU2):
    """Steps whose data come from ``rng``: the same result only with the same rng state."""
    for _ in range(steps):
        data = mx.nd.array(rng.normal(size=(4, 3)))
        for shard in gluon.utils.split_and_load(data, contexts):
            with autograd.record():
                loss = (net(shard) ** 2).sum()
            loss.backward()
        trainer.step(4)


def params_of(net):
    return {name: p.data(CPU2[0]).asnumpy() for name, p in net._collect_params_with_prefix().items()}


def test_restore_puts_back_parameters_trainer_states_counters_and_random_state(tmp_path):
    net, trainer = make_net_and_trainer(seed=1)
    rng = np.random.default_rng(5)
    checkpointer = dist.Checkpointer(tmp_path, net, trainer, rngs=[rng])
    train_steps(net, trainer, rng, 3)
    random.seed(11)
    np.random.seed(12)
    checkpointer.save(3, epoch=1, extra={"history": [0.5]})
    draws = (random.random(), np.random.random(), mx.nd.random.uniform(shape=(2,)).asnumpy())
    train_steps(net, trainer, rng, 2)  # Adam's moments and step count matter from here
    expected = params_of(net)

    net2, trainer2 = make_net_and_trainer(seed=2)  # other parameters, fresh optimizer
    rng2 = np.random.default_rng(99)
    resumed = dist.Checkpointer(tmp_path, net2, trainer2, rngs=[rng2]).restore()
    assert resumed == dist.Checkpoint(3, 1, {"history": [0.5]}, tmp_path / "checkpoint-0000000003.pe")
    assert random.random() == draws[0] and np.random.random() == draws[1]
    np.testing.assert_array_equal(mx.nd.random.uniform(shape=(2,)).asnumpy(), draws[2])
    train_steps(net2, trainer2, rng2, 2)
    for name, value in params_of(net2).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_an_empty_directory_means_start_from_step_0(tmp_path):
    net, trainer = make_net_and_trainer(seed=1)
    before = params_of(net)
    assert dist.Checkpointer(tmp_path / "new", net, trainer).restore() == dist.Checkpoint(0, 0, None, None)
    assert (tmp_path / "new").is_dir()
    for name, value in params_of(net).items():
        np.testing.assert_array_equal(value, before[name])


def test_maybe_save_saves_every_n_steps_and_keeps_the_newest(tmp_path):
    net, trainer = make_net_and_trainer(seed=1)
    checkpointer = dist.Checkpointer(tmp_path, net, trainer, every=2, keep=2)
    saved = [step for step in range(8) if checkpointer.maybe_save(step)]
    assert saved == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000000004.pe", "checkpoint-0000000006.pe"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, damage):
    net, trainer = make_net_and_trainer(seed=1)
    checkpointer = dist.Checkpointer(tmp_path, net, trainer)
    checkpointer.save(1)
    at_step_1 = params_of(net)
    train_steps(net, trainer, np.random.default_rng(0), 1)
    newest = checkpointer.save(2)
    data = newest.read_bytes()
    newest.write_bytes(
        {
            "truncate": data[: len(data) // 2],
            "flip": data[:-1] + bytes([data[-1] ^ 1]),
            "empty": b"",
            "garbage": b"x" * len(data),
        }[damage]
    )
    net2, trainer2 = make_net_and_trainer(seed=2)
    with caplog.at_level(logging.WARNING, logger="parallel_exec.dist"):
        resumed = dist.Checkpointer(tmp_path, net2, trainer2).restore()
    assert resumed.step == 1
    assert f"skipping checkpoint {newest}" in caplog.text
    for name, value in params_of(net2).items():
        np.testing.assert_array_equal(value, at_step_1[name], err_msg=name)


def test_a_write_that_fails_midway_leaves_no_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    net, trainer = make_net_and_trainer(seed=1)
    checkpointer = dist.Checkpointer(tmp_path, net, trainer)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", crash)  # the moment between writing and renaming
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save(1)
    assert list(tmp_path.iterdir()) == []


def test_restore_removes_what_a_killed_writer_left(tmp_path):
    net, trainer = make_net_and_trainer(seed=1)
    (tmp_path / ".tmp-checkpoint-abc").write_bytes(b"half a file")
    assert dist.Checkpointer(tmp_path, net, trainer).restore().path is None
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_network_is_an_error_naming_the_difference(tmp_path):
    net, trainer = make_net_and_trainer(seed=1)
    dist.Checkpointer(tmp_path, net, trainer).save(1)
    other = gluon.nn.Dense(2, in_units=3)
    other.initialize(ctx=CPU2)
    with pytest.raises(ValueError, match=r"does not fit this network: missing \['bias', 'weight'\]"):
        dist.Checkpointer(tmp_path, other).restore()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"every": 0}, ValueError, "every must be at least 1, got 0"),
        ({"keep": 0}, ValueError, "keep must be at least 1, got 0"),
        ({"rngs": [3]}, TypeError, r"rngs\[0\] is not a numpy Generator"),
        ({"net": "net"}, TypeError, "net must be a gluon Block or ParameterDict, got 'net'"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, message):
    net, trainer = make_net_and_trainer(seed=1)
    arguments = {"net": net, "trainer": trainer, **kwargs}
    with pytest.raises(error, match=message):
        dist.Checkpointer(tmp_path, **arguments)


@pytest.mark.parametrize("own_state", ["present", "damaged"])
def test_another_worker_restores_its_own_random_state_or_else_rank_0s(tmp_path, caplog, own_state):
    # Rank 0 writes the checkpoint; rank 1's random state is its own file
    # beside it. A worker of rank 1 in a job of 1 needs no kvstore barrier.
    net, trainer = make_net_and_trainer(seed=1)
    random.seed(0)
    path = dist.Checkpointer(tmp_path, net, trainer).save(2)
    after_rank_0 = random.random()
    rank_file = tmp_path / "checkpoint-0000000002.rank1.pe"
    random.seed(1)
    _checkpoint_files.write_atomically(rank_file, _random_state.capture([]))
    after_rank_1 = random.random()
    if own_state == "damaged":
        rank_file.write_bytes(rank_file.read_bytes()[:-1])
    rank_1 = dist.WorkerProcess("dist_sync", 1, 1)  # no kvstore: nothing else is read
    with caplog.at_level(logging.WARNING, logger="parallel_exec.dist"):
        assert dist.Checkpointer(tmp_path, net, trainer, worker=rank_1).restore().path == path
    if own_state == "present":
        assert random.random() == after_rank_1
    else:
        assert random.random() == after_rank_0
        assert "using rank 0's random state: this worker's own (rank 1) is unusable: truncated" in caplog.text


def test_a_trainer_that_updates_on_the_servers_is_refused(tmp_path):
    net, trainer = make_net_and_trainer(seed=1)
    worker = dist.WorkerProcess("dist_sync", 0, 2, kvstore=object())  # only its type is read
    with pytest.raises(ValueError, match=r"update_on_kvstore=False"):
        dist.Checkpointer(tmp_path, net, trainer, worker=worker)


def run_script(*args):
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT)


def test_a_run_killed_midway_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path):
    _, _, expected = restart_train_script.train("device", CPU2, 8, tmp_path / "reference", every=3)
    options = ["--steps", 8, "--every", 3, "--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path]
    killed = run_script(*options, "--kill-at", 5)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "rank 0 step 4 " in killed.stdout and "rank 0 step 5 " not in killed.stdout
    resumed = run_script(*options)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "rank 0 resumed from step 3" in resumed.stdout  # 2 of the 5 steps done are lost
    params = np.load(tmp_path / "params-rank0.npz")
    assert sorted(params) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)  # bitwise: same data order


def _horovod_importable():
    try:
        import horovod.mxnet  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not (_horovod_importable() or os.environ.get("PE_REQUIRE_HOROVOD") == "1"),
    reason="needs Horovod built with MXNet support, the optional 'horovod' extra",
)
@pytest.mark.timeout(300)
def test_a_horovod_job_saves_and_resumes_through_its_own_barrier(tmp_path):
    # The Horovod barrier is an allreduce, not ps-lite's: a job of 2 processes
    # saves at steps 2 and 4, then a longer run resumes from step 4.
    horovodrun = Path(sys.executable).with_name("horovodrun")
    options = ["--kvstore", "horovod", "--every", 2, "--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path]

    def job(steps):
        command = [horovodrun, "--gloo", "-np", 2, "-H", "localhost:2", sys.executable, SCRIPT, *options]
        command += ["--steps", steps]
        return subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=240, cwd=ROOT)

    first = job(4)
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = job(6)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for rank in (0, 1):
        assert f"rank {rank} resumed from step 4" in resumed.stdout, resumed.stdout
    assert "step 5 " in resumed.stdout and " step 3 " not in resumed.stdout
