import mxnet as mx

import parallel_exec as pe
from conftest import TIMEOUT


def test_map_runs_each_shard_on_its_context(executor):
    shards = [mx.nd.ones((2,), ctx=c) for c in executor.contexts]
    seen = list(executor.map(lambda x: (pe.current_context(), mx.current_context(), x.context), shards, timeout=TIMEOUT))
    assert seen == [(c, c, c) for c in executor.contexts]
