"""Local training helpers every ClientApp shares: the optimiser, the steps in one round and the
round's seed, so that every method gets the same local budget from the same ``train`` settings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedspecialists.config import TrainSettings

if TYPE_CHECKING:  # imported where used (round_seed serves mods that never load torch)
    import torch


def make_optimizer(
    params: Iterable[torch.nn.Parameter], train: TrainSettings
) -> torch.optim.Optimizer:
    """``train.optimizer`` (``adamw`` or ``sgd``) over ``params`` with the run's lr and decay."""
    import torch

    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


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


def round_seed(seed: int, server_round: int, partition_id: int, index: int = 0) -> int:
    """The seed of one local training: the run's ``seed``, the round, the node's partition and
    the ``index`` of what it trains there (an FL-TAC task slot; 0 for a whole model)."""
    return seed * 1_000_003 + server_round * 1_009 + partition_id * 31 + index
