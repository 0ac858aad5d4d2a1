"""A method registered from outside the project: plain FedAvg over every task adapter.

Shows what adding a method takes (``docs/extending.md``): this file, with its strategy and one
:func:`~fedspecialists.methods.register` call, and ``method.plugins=[toy_fedavg]`` in a run's
overrides. Nothing else in the project knows about it. Clients train one adapter per local task
(the adapters family's ClientApp); the server averages all of them, of every task, into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedspecialists.config import AdapterRunConfig
from fedspecialists.methods import Method, register
from strategies.baselines import NO_TASK_EVIDENCE
from strategies.fltac import PoolEntry, TaskAdapterClustering, round_kwargs


class FedAvgAllAdapters(TaskAdapterClustering):
    """FedAvg over every uploaded adapter, whatever its task: one global adapter."""

    method = "toy_fedavg"
    reports_clustering = False

    @classmethod
    def config_kwargs(cls, cfg: AdapterRunConfig) -> dict[str, Any]:
        # One group whatever the evidence: FL-TAC's task evidence is not asked for.
        return {**round_kwargs(cfg), **NO_TASK_EVIDENCE, "num_clusters": 1, "weighting": "samples"}

    def assign_groups(
        self, server_round: int, pool: Sequence[PoolEntry], features: np.ndarray
    ) -> list[str] | None:
        return ["global"] * len(pool)


register(
    Method(
        "toy_fedavg",
        "adapters",
        f"{__name__}:FedAvgAllAdapters",
        "toy: FedAvg over all task adapters (registered by a plugin)",
        shares=("adapters",),
    )
)
