"""Train a small convolutional network on scikit-learn's digits, on every device.

The data set ships with scikit-learn (1,797 8x8 images of handwritten digits),
so nothing is downloaded. Each batch is split into one shard per device, every
shard runs forward and backward on its own device, and ``gluon.Trainer`` sums
the gradients and updates the parameters once per batch.

``--mode`` picks how the shards are driven; the step that runs on a shard is
the same in every mode:

- ``map`` (default): ``ex.map(step, split_and_load(data, ctxs),
  split_and_load(label, ctxs))`` on a ``ContextExecutor``.
- ``futures``: submit the shards, add up loss and accuracy with
  ``as_completed`` as shards finish, and load the next batch onto the
  devices while they work.
- ``legacy``: the step as a ``Parallelizable``, driven through
  ``Parallel.put``/``get`` the way gluonnlp code does it.
- ``sequential``: a plain loop over the shards, as the baseline.

With the same ``--seed`` every mode starts from the same parameters, sees the
batches in the same order and ends with the same parameters.

``--kvstore`` picks how gradients are combined: ``device`` (default) on this
process's devices; ``dist_sync``, ``dist_device_sync`` or ``dist_async``
across worker processes through MXNet's parameter servers. Run those under
the launcher, which starts the scheduler, servers and workers::

    python -m parallel_exec.launch -n 2 -- python examples/train_digits.py --kvstore dist_sync

``horovod`` (optional extra) runs under Horovod's launcher instead::

    horovodrun --gloo -np 2 -H localhost:2 python examples/train_digits.py --kvstore horovod

Every worker goes through the same global batches and takes its share of each
(``worker.shard``), so two workers train like one process on all their
devices. Rank 0 writes the outputs.

``--checkpoint-dir DIR`` saves a checkpoint (``dist.Checkpointer``) at the end
of every epoch and, when DIR already holds one, resumes after its epoch with
the same parameters, optimizer state, batch order and metrics. With the
launcher's ``--max-restarts`` a job that loses a worker starts again and loses
at most the epoch it was in::

    python -m parallel_exec.launch -n 2 --max-restarts 3 -- \
        python examples/train_digits.py --kvstore dist_sync --checkpoint-dir runs/ckpt

Run ``python examples/train_digits.py --help`` for the options. The run
leaves ``params.params``, ``metrics.json`` and ``metrics.png`` in ``--out``.
"""

import argparse
import contextlib
import functools
import json
import re
import time
from concurrent.futures import as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # only write PNG files: no display needed
import matplotlib.pyplot as plt
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import parallel_exec as pe
from parallel_exec import dist

MODES = ("map", "futures", "legacy", "sequential")
KVSTORES = ("device",) + dist.DIST_KVSTORE_TYPES + ("horovod",)


# --- Command line -------------------------------------------------------------


def default_contexts():
    """Every GPU that MXNet sees; two CPU contexts on a machine without one."""
    num_gpus = mx.context.num_gpus()
    if num_gpus:
        return [mx.gpu(i) for i in range(num_gpus)]
    return [mx.cpu(0), mx.cpu(1)]


def parse_contexts(text):
    """Parse ``cpu:0,cpu:1`` or ``gpu:0,gpu:1`` into a list of ``mx.Context``.

    Raises:
        argparse.ArgumentTypeError: a malformed, repeated or missing device;
            argparse turns it into a usage error (exit status 2).
    """
    contexts = []
    for item in (item.strip() for item in text.split(",")):
        match = re.fullmatch(r"(cpu|gpu):([0-9]+)", item)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"invalid context {item!r} in {text!r}: write DEVICE:INDEX with DEVICE cpu or gpu, "
                "separated by commas, e.g. cpu:0,cpu:1 or gpu:0,gpu:1"
            )
        kind, index = match[1], int(match[2])
        if kind == "gpu" and index >= mx.context.num_gpus():
            raise argparse.ArgumentTypeError(f"no such device {item!r}: MXNet sees {mx.context.num_gpus()} GPU(s)")
        context = mx.Context(kind, index)
        if context in contexts:
            raise argparse.ArgumentTypeError(f"context {item!r} is listed twice in {text!r}")
        contexts.append(context)
    return contexts


def positive(kind):
    """An argparse ``type``: ``kind(text)``, which must be greater than 0."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return convert


def parse_args(argv=None):
    """The command line as a Namespace; a bad value exits with status 2."""
    parser = argparse.ArgumentParser(
        description="Train a small CNN on scikit-learn's digits, one shard of each batch per device.",
        epilog="Example: python examples/train_digits.py --mode futures --contexts cpu:0,cpu:1",
    )
    add = parser.add_argument
    add("--mode", choices=MODES, default="map", help="how the shards of a batch are driven (default: %(default)s)")
    add(
        "--contexts",
        type=parse_contexts,
        metavar="LIST",
        help="devices, e.g. cpu:0,cpu:1 or gpu:0,gpu:1 (default: every GPU MXNet sees, else cpu:0,cpu:1)",
    )
    add(
        "--kvstore",
        choices=KVSTORES,
        default="device",
        help="how gradients are combined: on this process's devices, or across the worker processes "
        "of a job started by python -m parallel_exec.launch (dist_*) or horovodrun (default: %(default)s)",
    )
    add("--epochs", type=positive(int), default=12, help="passes over the training set (default: %(default)s)")
    add("--batch-size", type=positive(int), default=64,
        help="samples per batch, all devices of all workers (default: %(default)s)")
    add("--lr", type=positive(float), default=0.002, help="Adam learning rate (default: %(default)s)")
    add("--test-size", type=float, default=0.2, help="fraction of images held out (default: %(default)s)")
    add("--seed", type=int, default=0, help="seeds parameters, split, batch order (default: %(default)s)")
    add("--out", type=Path, help="output folder (default: runs/digits-<mode>/)")
    add(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help="save a checkpoint after every epoch, and resume from the newest one DIR holds",
    )
    add(
        "--trace",
        type=Path,
        metavar="PATH",
        help="write a Chrome trace of what ran on which device (map and futures modes; open it in Perfetto)",
    )
    args = parser.parse_args(argv)
    if args.contexts is None:
        args.contexts = default_contexts()
    if args.batch_size < len(args.contexts):
        parser.error(f"--batch-size {args.batch_size} is smaller than the number of contexts ({len(args.contexts)})")
    if not 0.05 <= args.test_size <= 0.9:
        parser.error(f"--test-size must be between 0.05 and 0.9, got {args.test_size}")
    if args.out is None:
        args.out = Path("runs") / f"digits-{args.mode}"
    if args.trace is not None and args.mode not in ("map", "futures"):
        parser.error(f"--trace needs --mode map or futures (the modes with a ContextExecutor), got {args.mode}")
    return args


# --- Data and model -----------------------------------------------------------


def load_data(test_size, seed):
    """The digits as float32 images of shape (N, 1, 8, 8) in [0, 1], split in train and test."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, np.newaxis]
    labels = digits.target.astype(np.float32)
    return train_test_split(images, labels, test_size=test_size, random_state=seed, stratify=labels)


def iter_batches(images, labels, batch_size, rng, worker):
    """This worker's share of shuffled full batches, as NDArrays.

    Every worker draws the same order (same seed) and takes its share of each
    batch; the last, incomplete batch is dropped.
    """
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = worker.shard(order[start : start + batch_size])
        yield mx.nd.array(images[index]), mx.nd.array(labels[index])


def build_net():
    """A small CNN. Every input size is given, so the parameters exist right
    after ``initialize`` and are the same in every mode for the same seed."""
    net = nn.HybridSequential()
    net.add(
        nn.Conv2D(32, kernel_size=3, padding=1, in_channels=1, activation="relu"),
        nn.Conv2D(64, kernel_size=3, padding=1, in_channels=32, activation="relu"),
        nn.MaxPool2D(pool_size=2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Dense(128, in_units=64 * 4 * 4, activation="relu"),
        nn.Dense(10, in_units=128),
    )
    return net


class ShardStep(pe.Parallelizable):
    """Forward and backward on one shard; the same code in every mode.

    Called as ``step(data, label)`` by ``map``, ``futures`` and ``sequential``,
    and as ``step.forward_backward((data, label))`` by ``Parallel``.
    Returns the shard's summed loss and number of correct predictions as
    Python floats: reading them waits for the device, so an engine error
    surfaces here, on the shard's own thread.
    """

    def __init__(self, net):
        self.net = net
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def __call__(self, data, label):
        with autograd.record():  # recording is per thread: open it here
            output = self.net(data)
            loss = self.loss_fn(output, label)
        loss.backward()
        correct = (output.argmax(axis=1) == label).sum()
        return loss.sum().asscalar(), correct.asscalar()

    def forward_backward(self, shard):
        return self(*shard)


# Shards may differ by one sample when the batch does not divide evenly.
split_and_load = functools.partial(gluon.utils.split_and_load, even_split=False)


def shard_batch(batch, contexts):
    """One (data, label) shard per context, already copied to its device."""
    data, label = batch
    return list(zip(split_and_load(data, contexts), split_and_load(label, contexts)))


def add_up(results):
    """Sum (loss, correct) pairs over the shards of a batch (any iterable, read once)."""
    loss_sum = correct = 0.0
    for shard_loss, shard_correct in results:
        loss_sum += shard_loss
        correct += shard_correct
    return loss_sum, correct


# --- The four ways to drive the shards -----------------------------------------
# Each takes one epoch's batches and yields (summed loss, correct predictions)
# per batch once every shard's backward is done; the caller then steps the
# trainer.


def drive_sequential(step, contexts, batches):
    for batch in batches:
        yield add_up([step(data, label) for data, label in shard_batch(batch, contexts)])


def drive_map(executor, step, contexts, batches):
    for data, label in batches:
        yield add_up(executor.map(step, split_and_load(data, contexts), split_and_load(label, contexts)))


def drive_futures(executor, step, contexts, batches):
    pending = None  # futures of the batch the devices are working on
    for batch in batches:
        shards = shard_batch(batch, contexts)  # loaded while the devices work on `pending`
        if pending:
            yield add_up_as_completed(pending)
        pending = [executor.submit(step, data, label) for data, label in shards]
    if pending:
        yield add_up_as_completed(pending)


def add_up_as_completed(futures):
    """Sum (loss, correct) over a batch's futures, in the order shards finish."""
    return add_up(future.result() for future in as_completed(futures))


def drive_legacy(parallel, step, contexts, batches):
    for batch in batches:
        shards = shard_batch(batch, contexts)
        for shard in shards:
            parallel.put(shard)
        yield add_up([parallel.get() for _ in shards])


def make_driver(mode, step, contexts, stack):
    """A function ``batches -> (loss, correct) per batch`` for ``mode``, and its executor.

    Executors are entered on ``stack``, so they close when the run ends. The
    executor is ``None`` for the modes that have none.
    """
    if mode == "sequential":
        return (lambda batches: drive_sequential(step, contexts, batches)), None
    if mode == "legacy":
        parallel = stack.enter_context(pe.Parallel(len(contexts), step))
        return (lambda batches: drive_legacy(parallel, step, contexts, batches)), None
    executor = stack.enter_context(pe.ContextExecutor(contexts))
    drive = drive_map if mode == "map" else drive_futures
    return (lambda batches: drive(executor, step, contexts, batches)), executor


# --- Training -----------------------------------------------------------------


def evaluate(net, images, labels, context):
    """Accuracy of ``net`` on the given images, computed on one device."""
    output = net(mx.nd.array(images, ctx=context))
    return float((output.argmax(axis=1).asnumpy() == labels).mean())


def train(args):
    """Train with ``args``; return the metrics and the trained network."""
    contexts = args.contexts
    worker = dist.init_worker(args.kvstore)
    worker_batch = args.batch_size // worker.num_workers  # what this process's devices get
    if worker_batch < len(contexts):
        raise SystemExit(
            f"error: --batch-size {args.batch_size} over {worker.num_workers} workers leaves {worker_batch} "
            f"samples per worker, fewer than its {len(contexts)} contexts"
        )
    train_x, test_x, train_y, test_y = load_data(args.test_size, args.seed)
    rng = np.random.default_rng(args.seed)
    mx.random.seed(args.seed)
    net = build_net()
    net.initialize(mx.init.Xavier(), ctx=contexts)
    net.hybridize()
    # Checkpoints need the optimizer's state in this process, not on the parameter servers.
    on_servers = {"update_on_kvstore": False} if args.checkpoint_dir and args.kvstore.startswith("dist") else {}
    # Starts every worker from rank 0's parameters; step() takes this worker's batch.
    trainer = worker.trainer(net.collect_params(), "adam", {"learning_rate": args.lr}, **on_servers)
    step = ShardStep(net)

    batches_per_epoch = len(train_x) // args.batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the {len(train_x)} training images")
    history, batch_losses = [], []
    checkpointer, first_epoch = None, 1
    if args.checkpoint_dir is not None:
        # rng decides the batch order: its state is saved with the parameters.
        checkpointer = dist.Checkpointer(args.checkpoint_dir, net, trainer, rngs=[rng])
        resumed = checkpointer.restore()
        if resumed.path is not None:
            first_epoch = resumed.epoch + 1
            history, batch_losses = resumed.extra["history"], resumed.extra["batch_losses"]
            print(f"resuming after epoch {resumed.epoch} from {resumed.path}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        drive, executor = make_driver(args.mode, step, contexts, stack)
        timeline = stack.enter_context(executor.record_timeline(args.trace)) if args.trace is not None else None
        for epoch in range(first_epoch, args.epochs + 1):
            epoch_start = time.perf_counter()
            loss_sum = correct = seen = 0.0
            batches = iter_batches(train_x, train_y, args.batch_size, rng, worker)
            total = batches_per_epoch * worker_batch
            with tqdm(total=total, desc=f"epoch {epoch}/{args.epochs}", unit="samples", disable=worker.rank > 0) as bar:
                for batch_loss, batch_correct in drive(batches):
                    trainer.step(worker_batch)  # gradients are summed over this worker's share of the batch
                    batch_losses.append(batch_loss / worker_batch)
                    loss_sum += batch_loss
                    correct += batch_correct
                    seen += worker_batch
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
                    bar.update(worker_batch)
            seconds = time.perf_counter() - epoch_start
            history.append(
                {
                    "epoch": epoch,
                    "loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "test_accuracy": evaluate(net, test_x, test_y, contexts[0]),
                    "seconds": seconds,
                    "samples_per_s": seen / seconds,
                }
            )
            if checkpointer is not None:
                extra = {"history": history, "batch_losses": batch_losses}
                checkpointer.save(epoch * batches_per_epoch, epoch=epoch, extra=extra)
        worker_stats = str(executor.stats()) if executor is not None else None
        if timeline is not None:
            worker_stats += f"\nshards overlapped: {timeline.mean_concurrency():.2f} tasks running at once on average"
    wall_time = time.perf_counter() - start
    metrics = {
        "mode": args.mode,
        "kvstore": args.kvstore,
        "rank": worker.rank,
        "workers": worker.num_workers,
        "contexts": [str(c) for c in contexts],
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_samples": len(train_x),
        "test_samples": len(test_x),
        "test_accuracy": history[-1]["test_accuracy"],
        "wall_time_s": wall_time,
        # this worker's, over the epochs this run trained (after a resume, not all of them)
        "samples_per_s": batches_per_epoch * worker_batch * (args.epochs + 1 - first_epoch) / wall_time,
        "history": history,
        "batch_loss": batch_losses,
    }
    return metrics, net, worker_stats


def plot(history, path):
    """Save loss and accuracy per epoch as a PNG."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [h["loss"] for h in history], "o-")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h["test_accuracy"] for h in history], "s-", label="test")
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="accuracy")
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    print(f"training on {', '.join(map(str, args.contexts))} in {args.mode} mode, kvstore {args.kvstore}")
    metrics, net, worker_stats = train(args)
    if metrics["workers"] > 1:
        print(f"worker {metrics['rank']} of {metrics['workers']}: test accuracy {metrics['test_accuracy']:.2%}")
        if metrics["rank"] > 0:
            return  # every worker ends with the same parameters: rank 0 writes them

    args.out.mkdir(parents=True, exist_ok=True)
    net.save_parameters(str(args.out / "params.params"))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot(metrics["history"], args.out / "metrics.png")

    print(
        f"test accuracy {metrics['test_accuracy']:.2%}  "
        f"wall time {metrics['wall_time_s']:.1f} s  "
        f"throughput {metrics['samples_per_s']:.0f} samples/s"
    )
    print(f"wrote params.params, metrics.json and metrics.png to {args.out}/")
    if worker_stats is not None:
        print("per-device statistics:")
        print(worker_stats)
    if args.trace is not None:
        print(f"wrote the timeline to {args.trace} (open it in https://ui.perfetto.dev)")


if __name__ == "__main__":
    main()
