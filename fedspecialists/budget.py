"""The local training budget of one round: the batch and the optimiser steps a client takes for
its number of examples. Shared by the ClientApps (who train that many steps) and by the server
(whose norm bounds for clipping depend on how many steps an update took)."""

from __future__ import annotations

import math

from fedspecialists.config import TrainSettings


def local_batch_size(train: TrainSettings, examples: int) -> int:
    """``train.batch_size``, or all the examples when there are fewer (at least 1)."""
    return max(1, min(int(train.batch_size), examples))


def steps_per_round(train: TrainSettings, examples: int) -> int:
    """Optimiser steps in one round: ``train.local_steps`` if set, else
    ``ceil(local_epochs * examples / batch)`` with the batch of :func:`local_batch_size`
    (at least 1), the same rule for every method."""
    if train.local_steps:
        return int(train.local_steps)
    batch = local_batch_size(train, examples)
    return max(1, math.ceil(train.local_epochs * examples / batch))
