"""The random state a checkpoint keeps: Python's, NumPy's, given generators, MXNet's seed.

MXNet cannot read its generators' state back, so ``capture`` reseeds them
with a seed drawn from them and keeps that seed; ``restore`` reseeds with it.
MXNet's stream after a checkpoint is then the same whether or not the run
stopped there.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np

from .._mxnet import mx


def capture(rngs: Iterable[Any]) -> Dict[str, Any]:
    """This process's random state and that of ``rngs``; reseeds MXNet (see the module docstring)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "rngs": [_rng_state(rng) for rng in rngs],
        "mxnet_seed": _reseed_mxnet(None),
    }


def restore(state: Dict[str, Any], rngs: Sequence[Any]) -> None:
    """Put back what ``capture`` returned, into this process and ``rngs`` (the same kinds, in order)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if len(state["rngs"]) != len(rngs):
        raise ValueError(f"the checkpoint holds the state of {len(state['rngs'])} rngs, this run gives {len(rngs)}")
    for rng, saved in zip(rngs, state["rngs"]):
        _set_rng_state(rng, saved)
    _reseed_mxnet(state["mxnet_seed"])


def _rng_state(rng: Any) -> Any:
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator.state
    if isinstance(rng, np.random.RandomState):
        return rng.get_state()
    return rng.getstate()


def _set_rng_state(rng: Any, state: Any) -> None:
    if isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state
    elif isinstance(rng, np.random.RandomState):
        rng.set_state(state)
    else:
        rng.setstate(state)


def _reseed_mxnet(seed: Optional[int]) -> int:
    """Reseed MXNet's generators with ``seed``, or with one drawn from them; return it.

    MXNet has no way to read a generator's state, so a checkpoint stores
    this seed instead: the stream continues from it in both runs.
    """
    if seed is None:
        seed = int(mx.nd.random.randint(0, 2**31 - 1, shape=(1,), ctx=mx.cpu(), dtype="int32").asscalar())
    mx.random.seed(seed)
    return seed
