"""The GPU tier: the tests whose outcome depends on the device, on ``mx.gpu(i)``.

The CPU suite checks the executor, routing, the gate, the shim and the
examples on ``mx.cpu(i)``; here the same promises are checked on GPUs: pinning
and routing by device, engine errors and autograd on a GPU, real Gluon training
(its deferred initialisation behind the gate) against the serial loop,
gluonnlp-style ``Parallel`` on GPU shards, and ``train_digits.py`` on GPUs.

Every test is marked ``gpu`` and parametrised over the GPUs MXNet sees. Where it
sees none, conftest skips them all ("needs a GPU; MXNet sees none"); a test that
needs more GPUs than there are is skipped saying how many it needs. Nothing
here changes to run on a GPU machine: ``pytest -m gpu`` runs this tier alone.
"""

import logging
import re
import threading

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import parallel_exec as pe

from helpers import TIMEOUT
from helpers.example_runs import EXAMPLES, TINY, run  # the example's tiny settings and runner
from helpers.gluon_training import run_on, run_recorded_by_caller, run_serially, train  # the network, batches, runners

NUM_GPUS = mx.context.num_gpus()
# At least gpu(0), so that a machine without GPUs still lists (and skips) the tier.
GPUS = [mx.gpu(i) for i in range(max(NUM_GPUS, 1))]
EACH_GPU = [pytest.param(gpu, id=f"gpu{gpu.device_id}") for gpu in GPUS]

pytestmark = pytest.mark.gpu


def needs_gpus(count):
    return pytest.mark.skipif(NUM_GPUS < count, reason=f"needs {count} GPUs; MXNet sees {NUM_GPUS}")


def where():
    """Inside a task: the worker's context, as both APIs see it."""
    return pe.current_context(), mx.current_context()


# --- executor and routing -------------------------------------------------------


@pytest.mark.parametrize("gpu", EACH_GPU)
def test_a_gpu_worker_is_pinned_to_its_gpu(gpu):
    def make_and_sum():
        array = mx.nd.ones((2, 3)) * 2  # no ctx=: the worker's default context
        return array.context, array.sum().asscalar()

    with pe.ContextExecutor([mx.cpu(0), gpu]) as ex:
        assert ex.submit_to(gpu, where).result(TIMEOUT) == (gpu, gpu)
        assert ex.submit_to(gpu, make_and_sum).result(TIMEOUT) == (gpu, 12.0)
        assert ex.submit_to(mx.cpu(0), where).result(TIMEOUT) == (mx.cpu(0), mx.cpu(0))


@pytest.mark.parametrize("gpu", EACH_GPU)
def test_submit_routes_by_the_device_of_the_first_ndarray(gpu):
    on_gpu, on_cpu = mx.nd.ones((4,), ctx=gpu), mx.nd.ones((4,), ctx=mx.cpu(0))
    with pe.ContextExecutor([mx.cpu(0), gpu]) as ex:
        for _ in range(3):
            assert ex.submit(lambda x: where(), on_gpu).result(TIMEOUT) == (gpu, gpu)
            assert ex.submit(lambda x, y: where(), [on_cpu], y=on_gpu).result(TIMEOUT) == (mx.cpu(0), mx.cpu(0))
            name = ex.submit(lambda x: threading.current_thread().name, on_gpu).result(TIMEOUT)
            assert name.endswith(f"[{gpu}]")


def test_map_runs_each_split_and_load_shard_on_its_gpu():
    data = mx.nd.arange(8 * len(GPUS)).reshape((-1, 2))
    shards = gluon.utils.split_and_load(data, GPUS)

    def task(shard):
        return pe.current_context(), shard.context, (shard * 2).asnumpy()

    with pe.ContextExecutor(GPUS) as ex:
        results = list(ex.map(task, shards, timeout=TIMEOUT))
    assert [(worker, device) for worker, device, _ in results] == [(g, g) for g in GPUS]
    np.testing.assert_array_equal(np.concatenate([doubled for _, _, doubled in results]), data.asnumpy() * 2)


@needs_gpus(2)
def test_a_shard_on_a_gpu_without_worker_is_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="parallel_exec")
    elsewhere = mx.nd.ones((2,), ctx=mx.gpu(1))
    with pe.ContextExecutor([mx.gpu(0)]) as ex:
        for _ in range(3):  # still runs, on the only worker
            assert ex.submit(lambda x: pe.current_context(), elsewhere).result(TIMEOUT) == mx.gpu(0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gpu(1)" in warnings[0] and "[gpu(0)]" in warnings[0], warnings


@pytest.mark.parametrize("gpu", EACH_GPU)
def test_an_engine_error_on_a_gpu_lands_on_the_future_and_the_worker_serves_on(gpu):
    def bad_dot():
        return mx.nd.dot(mx.nd.ones((2, 3)), mx.nd.ones((2, 3))).asnumpy()  # shapes do not chain

    with pe.ContextExecutor([gpu]) as ex:
        with pytest.raises(mx.base.MXNetError):
            ex.submit(bad_dot).result(TIMEOUT)
        assert ex.submit(lambda: mx.nd.ones((3,)).sum().asscalar()).result(TIMEOUT) == 3.0


@pytest.mark.parametrize("gpu", EACH_GPU)
def test_the_callers_recording_travels_to_a_gpu_task(gpu):
    x = mx.nd.array([1.0, 2.0, 3.0], ctx=gpu)
    x.attach_grad()
    with pe.ContextExecutor([gpu]) as ex:
        with autograd.record():
            y = ex.submit(lambda v: (v * v).sum(), x).result(TIMEOUT)
        y.backward()
        assert ex.submit(autograd.is_recording).result(TIMEOUT) is False  # restored after the task
    np.testing.assert_allclose(x.grad.asnumpy(), [2.0, 4.0, 6.0])


# --- Gluon training and the serial-init gate ----------------------------------------

# test_gluon's training, there on CPU contexts. Its batches split evenly over
# 1, 2, 4, 8 or 16 contexts: as many GPUs as that allows, and, with two GPUs,
# the contexts in another order than the devices'. (Not a CPU beside a GPU:
# whether the trainer's kvstore sums over both is MXNet's business, not ours.)
TRAIN_GPUS = GPUS[: 1 << (len(GPUS).bit_length() - 1)]
GPU_SETS = [
    pytest.param(TRAIN_GPUS, id="gpus"),
    pytest.param([mx.gpu(1), mx.gpu(0)], id="gpu1+gpu0", marks=needs_gpus(2)),
]


def assert_close_training(actual, expected):
    """Same parameters and losses, up to GPU kernels' run-to-run rounding."""
    (actual_params, actual_losses), (expected_params, expected_losses) = actual, expected
    assert actual_params.keys() == expected_params.keys()
    for key, value in expected_params.items():
        np.testing.assert_allclose(actual_params[key], value, rtol=1e-4, atol=1e-5, err_msg=str(key))
    np.testing.assert_allclose(np.array(actual_losses), np.array(expected_losses), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contexts", GPU_SETS)
def test_training_on_gpus_through_map_matches_serial_training(contexts):
    expected = train(contexts, run_serially, steps=8)
    with pe.ContextExecutor(contexts) as ex:
        actual = train(contexts, run_on(ex), steps=8)
    assert_close_training(actual, expected)
    _, losses = actual
    assert np.mean(losses[-3:]) < np.mean(losses[0])  # it learned


def test_caller_records_and_backwards_over_gpu_workers():
    expected = train(TRAIN_GPUS, run_serially, steps=4)
    with pe.ContextExecutor(TRAIN_GPUS) as ex:
        actual = train(TRAIN_GPUS, run_recorded_by_caller(ex), steps=4)
    assert_close_training(actual, expected)


@needs_gpus(2)
def test_first_step_of_fresh_nets_on_gpus_never_fails():
    # The gate's reason to exist: deferred init of fresh blocks from several
    # threads at once. A new executor per round, so first tasks go through it.
    expected = train(TRAIN_GPUS, run_serially, steps=1)
    for _ in range(4):
        with pe.ContextExecutor(TRAIN_GPUS) as ex:
            actual = train(TRAIN_GPUS, run_on(ex), steps=1)
        assert_close_training(actual, expected)


# --- the gluonnlp shim ---------------------------------------------------------------


class GpuShard(pe.Parallelizable):
    """Forward, loss and backward of one shard, on the shard's GPU."""

    def __init__(self, net):
        self._net = net
        self._loss = gluon.loss.SoftmaxCELoss()

    def forward_backward(self, shard):
        data, label = shard
        with autograd.record():
            loss = self._loss(self._net(data), label)
        loss.backward()
        return loss.asnumpy()


def gradients_of_one_batch(contexts, run):
    """Gradients on every context after ``run`` computed one batch's shards."""
    mx.random.seed(11)
    net = gluon.nn.Dense(3, in_units=5, prefix="shim_")
    net.initialize(mx.init.Xavier(), ctx=contexts)
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.uniform(size=(4 * len(contexts), 5)))
    label = mx.nd.array(rng.randint(0, 3, size=(4 * len(contexts),)))
    shards = list(zip(gluon.utils.split_and_load(data, contexts), gluon.utils.split_and_load(label, contexts)))
    losses = run(GpuShard(net), shards)
    grads = {(name, str(c)): p.grad(c).asnumpy() for name, p in net.collect_params().items() for c in contexts}
    return sorted(float(loss.sum()) for loss in losses), grads


@pytest.mark.parametrize("num_workers", [0, 2])
def test_parallel_shim_on_gpu_shards_matches_the_serial_loop(num_workers):
    def serially(model, shards):
        return [model.forward_backward(shard) for shard in shards]

    def through_parallel(model, shards):
        with pe.Parallel(num_workers, model) as parallel:
            for shard in shards:
                parallel.put(shard)
            return [parallel.get() for _ in shards]

    expected_losses, expected_grads = gradients_of_one_batch(GPUS, serially)
    losses, grads = gradients_of_one_batch(GPUS, through_parallel)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for key, grad in expected_grads.items():
        np.testing.assert_allclose(grads[key], grad, rtol=1e-5, atol=1e-7, err_msg=str(key))


# --- the example ------------------------------------------------------------------


def test_train_digits_on_every_gpu_trains_like_the_sequential_loop(tmp_path):
    devices = ",".join(f"{c.device_type}:{c.device_id}" for c in GPUS)
    outs = {mode: tmp_path / mode for mode in ("map", "sequential")}
    stdout = run([EXAMPLES / "train_digits.py", "--contexts", devices, "--out", outs["map"], *TINY], tmp_path).stdout
    run([EXAMPLES / "train_digits.py", "--mode", "sequential", "--contexts", devices, "--out", outs["sequential"],
         *TINY], tmp_path)
    for gpu in GPUS:  # the per-device table has a row for each GPU's worker
        assert re.search(rf"^\d+:{re.escape(str(gpu))} ", stdout, re.MULTILINE), stdout
    accuracy = float(re.search(r"test accuracy ([0-9.]+)%", stdout).group(1))
    assert accuracy > 50, stdout  # one short epoch; chance is 10%
    mapped, sequential = (mx.nd.load(str(outs[mode] / "params.params")) for mode in ("map", "sequential"))
    assert mapped.keys() == sequential.keys()
    for name, value in sequential.items():
        np.testing.assert_allclose(mapped[name].asnumpy(), value.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=name)

