"""Real Gluon training through the executor matches the same loop run serially.

The network defers its parameter shapes to the first forward pass, which
is what the serial-init gate protects. Its weights come from a generator
seeded by each parameter's name, so every net built here starts from the
same values whichever thread initialises it, and whatever MXNet's RNG did.
"""


import numpy as np
import pytest

import parallel_exec as pe

from helpers import CPU2
from helpers.gluon_training import CPU4, assert_same_training, run_on, run_recorded_by_caller, run_serially, train


@pytest.mark.parametrize("contexts", [CPU2, CPU4], ids=["2cpu", "4cpu"])
def test_training_through_map_matches_serial_training(contexts):
    expected = train(contexts, run_serially)
    with pe.ContextExecutor(contexts) as ex:
        actual = train(contexts, run_on(ex))
    assert_same_training(actual, expected)
    # It did learn: the last steps' loss is below the first's.
    _, losses = actual
    assert np.mean(losses[-3:]) < np.mean(losses[0])


def test_caller_records_and_calls_backward():
    expected = train(CPU2, run_serially, steps=5)
    with pe.ContextExecutor(CPU2) as ex:
        actual = train(CPU2, run_recorded_by_caller(ex), steps=5)
    assert_same_training(actual, expected)


def test_first_step_of_fresh_nets_never_fails():
    # Fresh blocks run from several threads at once often fail (deferred
    # init races); the gate makes each first step safe. Each round has a new
    # executor, so its first tasks go through the gate.
    expected = train(CPU4, run_serially, steps=1)
    for _ in range(6):
        with pe.ContextExecutor(CPU4) as ex:
            actual = train(CPU4, run_on(ex), steps=1)
        assert_same_training(actual, expected)
