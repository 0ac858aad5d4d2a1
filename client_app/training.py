"""Local training helpers every ClientApp shares: the optimiser, the steps in one round (from
:mod:`fedspecialists.budget`, which the server shares) and the round's seed, so that every method
gets the same local budget from the same ``train`` settings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from fedspecialists.budget import local_batch_size, steps_per_round
from fedspecialists.config import TrainSettings

if TYPE_CHECKING:  # imported where used (round_seed serves mods that never load torch)
    import torch

__all__ = [
    "local_batch_size",
    "make_optimizer",
    "proximal_term",
    "round_seed",
    "steps_per_round",
]


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


def round_seed(seed: int, server_round: int, partition_id: int, index: int = 0) -> int:
    """The seed of one local training: the run's ``seed``, the round, the node's partition and
    the ``index`` of what it trains there (an FL-TAC task slot; 0 for a whole model)."""
    return seed * 1_000_003 + server_round * 1_009 + partition_id * 31 + index


def proximal_term(
    params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum ||w - w_0||^2`` over the parameters in ``anchor``.

    Parameters
    ----------
    params : Mapping[str, torch.Tensor]
        The model's named parameters (any shapes); those not in ``anchor`` are not held.
    anchor : Mapping[str, torch.Tensor]
        ``w_0``: the values the term holds them near (no gradient flows into them).
    mu : float
        Strength (>= 0).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    import torch

    terms = [(params[name] - start.detach()).pow(2).sum() for name, start in anchor.items()]
    return 0.5 * mu * torch.stack(terms).sum() if terms else torch.zeros(())
