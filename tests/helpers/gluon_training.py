"""A small Gluon network trained serially or through an executor, for comparing the two.

The network defers its parameter shapes to the first forward pass, which
is what the serial-init gate protects. Its weights come from a generator
seeded by each parameter's name, so every net built here starts from the
same values whichever thread initialises it, and whatever MXNet's RNG did.
"""

import zlib

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from helpers import TIMEOUT

CPU4 = [mx.cpu(i) for i in range(4)]
BATCH = 16  # divisible by 2 and 4 devices
STEPS = 20


class NameSeededInit(mx.init.Initializer):
    """Weights from a numpy generator seeded by the parameter's name."""

    def _init_weight(self, name, arr):
        rng = np.random.RandomState(zlib.crc32(name.encode()))
        arr[:] = rng.uniform(-0.3, 0.3, arr.shape)


def make_net(contexts):
    """A fresh hybridized Conv/Dense net; no input sizes, so init is deferred."""
    net = gluon.nn.HybridSequential(prefix="net_")  # same names in every net
    with net.name_scope():
        net.add(
            gluon.nn.Conv2D(4, kernel_size=3, activation="relu"),
            gluon.nn.Dense(16, activation="relu"),
            gluon.nn.Dense(3),
        )
    net.initialize(NameSeededInit(), ctx=contexts)
    net.hybridize()
    return net


def batches(steps):
    """The same ``steps`` batches of images and labels on every call."""
    rng = np.random.RandomState(0)
    for _ in range(steps):
        data = rng.uniform(-1, 1, (BATCH, 1, 6, 6))
        # Learnable: the class is the brightest band of two rows.
        label = data.reshape(BATCH, 3, 12).sum(axis=2).argmax(axis=1)
        yield mx.nd.array(data), mx.nd.array(label)


def parameters(net, contexts):
    """Every parameter's value on every context, as numpy arrays."""
    return {(name, str(c)): p.data(c).asnumpy() for name, p in net.collect_params().items() for c in contexts}


def run_serially(net, loss_fn, xs, ys):
    """Forward and backward of each shard, one after another, in this thread."""
    losses = []
    for x, y in zip(xs, ys):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        losses.append(loss)
    return losses


def run_on(ex):
    """Each shard on its device's worker; the task records and backwards."""

    def run(net, loss_fn, xs, ys):
        def step(x, y):
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            return loss

        return list(ex.map(step, xs, ys, timeout=TIMEOUT))

    return run


def run_recorded_by_caller(ex):
    """The caller records; workers compute the losses; the caller backwards."""

    def run(net, loss_fn, xs, ys):
        with autograd.record():
            losses = list(ex.map(lambda x, y: loss_fn(net(x), y), xs, ys, timeout=TIMEOUT))
        autograd.backward(losses)
        return losses

    return run


def train(contexts, run, steps=STEPS):
    """Train a fresh net with ``run`` computing each batch's gradients.

    Returns:
        The final parameters and every step's per-shard losses.
    """
    net = make_net(contexts)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for data, label in batches(steps):
        xs = gluon.utils.split_and_load(data, contexts)
        ys = gluon.utils.split_and_load(label, contexts)
        losses.append([loss.asnumpy() for loss in run(net, loss_fn, xs, ys)])
        trainer.step(BATCH)
    return parameters(net, contexts), losses


def assert_same_training(actual, expected):
    actual_params, actual_losses = actual
    expected_params, expected_losses = expected
    assert actual_params.keys() == expected_params.keys()
    for key, value in expected_params.items():
        np.testing.assert_allclose(actual_params[key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))
    np.testing.assert_allclose(np.array(actual_losses), np.array(expected_losses), rtol=1e-5, atol=1e-6)
