"""Move gluonnlp ``Parallel`` code to parallel_exec, in two steps.

The model is written the gluonnlp way: a ``Parallelizable`` whose
``forward_backward`` runs forward and backward on one shard of a batch. Here
it is a small GRU classifier on synthetic token sequences: the label says
whether most tokens of a sequence are in the upper half of the vocabulary.

Step 1: change the import; the put/get loop runs unchanged, and a shard that
raises no longer hangs ``get()``::

    -from gluonnlp.utils import Parallel, Parallelizable
    +from parallel_exec import Parallel, Parallelizable

Step 2: replace put/get with futures on a ``ContextExecutor``; each shard then
runs on the thread of its own device::

     shards = list(zip(split_and_load(tokens, contexts), split_and_load(labels, contexts)))
    -parallel = Parallel(len(contexts), model)
    -for shard in shards:
    -    parallel.put(shard)
    -losses = [parallel.get() for _ in shards]
    +executor = ContextExecutor(contexts)
    +losses = list(executor.map(model.forward_backward, shards))
     trainer.step(batch_size)

This script trains the model both ways from the same seed and prints the loss
per epoch of each; the two runs end with the same loss. It needs no gluonnlp.
"""

import argparse

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn, rnn

from parallel_exec import ContextExecutor, Parallel, Parallelizable

VOCAB, SEQ_LEN, NUM_SEQUENCES = 10, 11, 1024


class GRUClassifier(gluon.HybridBlock):
    """Embedding, one GRU layer, and a linear layer on the last step."""

    def __init__(self, hidden=32):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        self.gru = rnn.GRU(hidden, layout="NTC", input_size=16)
        self.output = nn.Dense(2, in_units=hidden)

    def hybrid_forward(self, F, tokens):
        states = self.gru(self.embedding(tokens))  # (batch, time, hidden)
        return self.output(F.squeeze(F.slice_axis(states, axis=1, begin=-1, end=None), axis=1))


class SequenceModel(Parallelizable):
    """gluonnlp style: ``forward_backward`` takes one (tokens, labels) shard."""

    def __init__(self, net):
        self.net = net
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def forward_backward(self, shard):
        tokens, labels = shard
        with autograd.record():
            loss = self.loss_fn(self.net(tokens), labels)
        loss.backward()
        return loss.mean().asscalar()  # reading it surfaces engine errors on this thread


def train(style, args, contexts):
    """Train a fresh model with put/get or with futures; return the loss per epoch."""
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, VOCAB, size=(NUM_SEQUENCES, SEQ_LEN)).astype(np.float32)
    labels = ((tokens >= VOCAB // 2).sum(axis=1) > SEQ_LEN // 2).astype(np.float32)
    mx.random.seed(args.seed)
    net = GRUClassifier()
    net.initialize(mx.init.Xavier(), ctx=contexts)
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": args.lr})
    model = SequenceModel(net)

    split = gluon.utils.split_and_load
    pool = Parallel(len(contexts), model) if style == "put/get" else ContextExecutor(contexts)
    epoch_losses = []
    with pool:
        for epoch in range(1, args.epochs + 1):
            losses = []
            for start in range(0, len(tokens), args.batch_size):
                batch = slice(start, start + args.batch_size)
                shards = list(zip(split(tokens[batch], contexts), split(labels[batch], contexts)))
                if style == "put/get":  # step 1: gluonnlp's interface
                    for shard in shards:
                        pool.put(shard)
                    losses += [pool.get() for _ in shards]
                else:  # step 2: futures, one shard per device thread
                    losses += pool.map(model.forward_backward, shards)
                trainer.step(args.batch_size)
            epoch_losses.append(float(np.mean(losses)))
            print(f"{style:8s} epoch {epoch}  loss {epoch_losses[-1]:.4f}")
    return epoch_losses


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a small GRU classifier with Parallel put/get, then with ContextExecutor futures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=6, help="passes over the 1,024 synthetic sequences")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per batch, over all devices (even)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the initial parameters")
    args = parser.parse_args(argv)
    contexts = [mx.gpu(i) for i in range(mx.context.num_gpus())] or [mx.cpu(0), mx.cpu(1)]
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1 or NUM_SEQUENCES % args.batch_size or args.batch_size % len(contexts):
        parser.error(
            f"--batch-size must divide {NUM_SEQUENCES} and be a multiple of the number of devices "
            f"({len(contexts)}), got {args.batch_size}"
        )

    put_get = train("put/get", args, contexts)
    futures = train("futures", args, contexts)
    print(f"final loss: put/get {put_get[-1]:.4f}, futures {futures[-1]:.4f}")


if __name__ == "__main__":
    main()
