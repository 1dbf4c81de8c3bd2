"""A small training job for tests/distributed/test_dist.py, run under parallel_exec.launch.

    python -m parallel_exec.launch -n 2 -- python tests/helpers/dist_train_script.py --kvstore dist_sync --out DIR

Each worker trains a small hybridized network on 2 cpu contexts through a
ContextExecutor, on its share of every global batch, and saves its
parameters to DIR/params-rank<R>.npz. Workers start from different random
parameters on purpose: only the broadcast of rank 0's makes them agree.
``train(kvstore="device", contexts=4 cpus)`` in one process is the
reference: the same global batches over 4 contexts.

``--fail raise|kill|stall`` makes rank 1 fail at step 3: raise in a task,
SIGKILL itself, or wait forever.
"""

import argparse
import os
import signal
import threading

# Set once the first step is done. Until then, a heartbeat (started before the
# slow imports) tells the launcher this worker is alive, so a test can use a
# short progress timeout however loaded the machine is.
TRAINING = threading.Event()


def _heartbeat():
    while not TRAINING.wait(0.5):
        print("starting", flush=True)


if __name__ == "__main__":
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import parallel_exec as pe
from parallel_exec import dist

GLOBAL_BATCH = 32
FEATURES = 8
FAIL_STEP = 3


def build_net(contexts, seed):
    """A hybridized 2-layer network with parameters drawn from ``seed``."""
    net = gluon.nn.HybridSequential(prefix="net_")  # fixed names in any process
    with net.name_scope():
        net.add(gluon.nn.Dense(16, activation="tanh", in_units=FEATURES), gluon.nn.Dense(3, in_units=16))
    net.initialize(ctx=contexts)
    rng = np.random.RandomState(seed)
    for _, param in sorted(net.collect_params().items()):
        param.set_data(mx.nd.array(rng.normal(scale=0.5, size=param.shape)))
    net.hybridize()
    return net


def global_batch(step):
    """The batch every process agrees on for ``step``: 3 learnable classes."""
    rng = np.random.RandomState(1000 + step)
    data = rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype("float32")
    label = (data[:, 0] > 0).astype("float32") + (data[:, 1] > 0.5)
    return data, label


def train(kvstore, contexts, steps, fail=None):
    """Train; return ``(worker, {name: array})`` with the final parameters."""
    worker = dist.init_worker(kvstore)
    net = build_net(contexts, seed=7 + worker.rank)
    trainer = worker.trainer(net.collect_params(), "sgd", {"learning_rate": 0.5, "momentum": 0.5})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step_fn(data, label, step):
        if fail == "raise" and step == FAIL_STEP and worker.rank == 1:
            raise RuntimeError("injected failure in a task")
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        return loss.sum().asscalar()

    with pe.ContextExecutor(contexts) as ex:
        for step in range(steps):
            if step == FAIL_STEP and worker.rank == 1:
                if fail == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fail == "stall":
                    print("stalling", flush=True)
                    threading.Event().wait()
            data, label = (worker.shard(mx.nd.array(a)) for a in global_batch(step))
            data_shards = gluon.utils.split_and_load(data, contexts)
            label_shards = gluon.utils.split_and_load(label, contexts)
            losses = list(ex.map(step_fn, data_shards, label_shards, [step] * len(contexts)))
            trainer.step(data.shape[0])
            print(f"rank {worker.rank} step {step} loss {sum(losses) / data.shape[0]:.4f}", flush=True)
            TRAINING.set()  # from now on every step prints

    params = {}
    for name, param in net.collect_params().items():
        arrays = [a.asnumpy() for a in param.list_data()]
        for array in arrays[1:]:
            assert np.array_equal(array, arrays[0]), f"{name} differs between this worker's contexts"
        params[name] = arrays[0]
    return worker, params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kvstore", default="dist_sync")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--fail", choices=["raise", "kill", "stall"])
    args = parser.parse_args()
    contexts = [mx.cpu(i) for i in range(args.contexts)]
    worker, params = train(args.kvstore, contexts, args.steps, args.fail)
    np.savez(os.path.join(args.out, f"params-rank{worker.rank}.npz"), **params)
    print(f"rank {worker.rank} of {worker.num_workers} saved its parameters", flush=True)


if __name__ == "__main__":
    main()
