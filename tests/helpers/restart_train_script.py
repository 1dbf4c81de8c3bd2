"""A small checkpointed training run for tests/distributed/test_checkpoint.py.

    python tests/helpers/restart_train_script.py --checkpoint-dir DIR --out DIR [--kill-at STEP]
    python -m parallel_exec.launch -n 2 --max-restarts 1 -- python tests/helpers/restart_train_script.py \
        --kvstore dist_sync --checkpoint-dir DIR --out DIR --kill-at STEP

Trains a tiny network for ``--steps`` steps, checkpointing every ``--every``
steps, and saves the final parameters to OUT/params-rank<R>.npz. Every step
draws its batch from a NumPy Generator and adds noise from MXNet's
generator, so resuming needs the random state back, not only the weights.
``--kill-at S`` makes the last worker SIGKILL itself when S steps are done,
on the first attempt only (``PE_RESTART_COUNT`` absent or 0).
``train(...)`` in the test process is the uninterrupted reference.
"""

import argparse
import os
import signal

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import dist

GLOBAL_BATCH = 16
FEATURES = 4


def build_net(contexts):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(8, activation="tanh", in_units=FEATURES), gluon.nn.Dense(2, in_units=8))
    net.initialize(ctx=contexts)
    rng = np.random.RandomState(7)
    for _, param in sorted(net.collect_params().items()):
        param.set_data(mx.nd.array(rng.normal(scale=0.5, size=param.shape)))
    return net


def train(kvstore, contexts, steps, checkpoint_dir, every, kill_at=None):
    """Train; return ``(worker, resumed step, {name: array})``."""
    worker = dist.init_worker(kvstore)
    net = build_net(contexts)
    trainer_options = {"update_on_kvstore": False} if kvstore.startswith("dist") else {}
    trainer = worker.trainer(net.collect_params(), "adam", {"learning_rate": 0.05}, **trainer_options)
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    checkpointer = dist.Checkpointer(checkpoint_dir, net, trainer, every=every, rngs=[rng])
    start = checkpointer.restore().step
    print(f"rank {worker.rank} resumed from step {start}", flush=True)
    loss_fn = gluon.loss.L2Loss()

    def step_fn(data, label):
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        return loss.sum().asscalar()

    with pe.ContextExecutor(contexts) as ex:
        for step in range(start, steps):
            if step == kill_at and worker.rank == worker.num_workers - 1:
                if os.environ.get("PE_RESTART_COUNT", "0") == "0":
                    os.kill(os.getpid(), signal.SIGKILL)
            data = mx.nd.array(rng.normal(size=(GLOBAL_BATCH, FEATURES)))
            data = data + mx.nd.random.normal(scale=0.1, shape=data.shape, ctx=mx.cpu(0))
            label = mx.nd.stack(data[:, 0] * data[:, 1], data[:, 2], axis=1)
            data, label = worker.shard(data), worker.shard(label)
            shards = zip(gluon.utils.split_and_load(data, contexts), gluon.utils.split_and_load(label, contexts))
            loss = sum(ex.map(lambda pair: step_fn(*pair), shards))
            trainer.step(data.shape[0])
            print(f"rank {worker.rank} step {step} loss {loss / data.shape[0]:.5f}", flush=True)
            checkpointer.maybe_save(step + 1)
    params = {name: param.data(contexts[0]).asnumpy() for name, param in net._collect_params_with_prefix().items()}
    return worker, start, params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kvstore", default="device")
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    contexts = [mx.cpu(i) for i in range(args.contexts)]
    worker, _, params = train(args.kvstore, contexts, args.steps, args.checkpoint_dir, args.every, args.kill_at)
    np.savez(os.path.join(args.out, f"params-rank{worker.rank}.npz"), **params)


if __name__ == "__main__":
    main()
