import mxnet as mx
from mxnet import autograd, gluon

import parallel_exec as pe

contexts = [mx.cpu(0), mx.cpu(1)]  # on a GPU machine: [mx.gpu(0), mx.gpu(1)]
net = gluon.nn.HybridSequential()
net.add(gluon.nn.Dense(64, activation="relu"), gluon.nn.Dense(4))
net.initialize(mx.init.Xavier(), ctx=contexts)
net.hybridize()
trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

def step(data, label):  # runs in the worker thread of the shard's device
    with autograd.record():
        loss = loss_fn(net(data), label)
    loss.backward()
    return loss.mean().asscalar()

mx.random.seed(0)
data = mx.nd.random.normal(shape=(512, 16))
label = mx.nd.argmax(data[:, :4], axis=1)  # a task the network can learn

with pe.ContextExecutor(contexts) as ex:
    for epoch in range(20):
        data_shards = gluon.utils.split_and_load(data, contexts)
        label_shards = gluon.utils.split_and_load(label, contexts)
        losses = list(ex.map(step, data_shards, label_shards))  # one shard per device
        trainer.step(data.shape[0])
        print(f"epoch {epoch:2d}  loss {sum(losses) / len(losses):.3f}")
