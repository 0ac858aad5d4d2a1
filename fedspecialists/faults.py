"""Which clients are faulty in a round (``faults.*``): one draw, shared by the ClientApp's fault
mod (``client_app.faults``) and by the server, which leaves the same clients out of training
with ``faults.kind=absent`` (the clean run with a faulty run's exact participation)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedspecialists.config import ExperimentConfig


def faulty_clients(seed: int, server_round: int, num_clients: int, fraction: float) -> set[int]:
    """The client ids faulty in ``server_round``: ``round(fraction * num_clients)`` of
    ``0..num_clients-1``, drawn afresh each round from ``seed``."""
    count = min(num_clients, round(fraction * num_clients))
    rng = random.Random(seed * 1_000_003 + server_round)
    return set(rng.sample(range(num_clients), count))


@dataclass(frozen=True)
class FaultDraw:
    """:func:`faulty_clients` with its settings fixed: ``clients(r)`` for round ``r``."""

    seed: int
    fraction: float
    num_clients: int

    def clients(self, server_round: int) -> set[int]:
        return faulty_clients(self.seed, server_round, self.num_clients, self.fraction)


def absent_clients(cfg: ExperimentConfig) -> FaultDraw | None:
    """The draw of the clients the server leaves out of training (``faults.kind=absent``)."""
    faults = cfg.faults
    if faults.kind != "absent" or faults.fraction <= 0:
        return None
    return FaultDraw(faults.seed, faults.fraction, cfg.federation.num_clients)
