"""Baselines of both methods.

FL-TAC's, as variations of its grouping step:

* :class:`FedIT` (Zhang et al. 2023): FedAvg over one LoRA adapter shared by all tasks (clients
  train a single adapter on all their local data; the mean is weighted by example counts).
* :class:`OracleClustering`: adapters grouped by their true task (the upper bound of perfect
  clustering); needs clients to report true tasks, which FL-TAC itself never uses.
* :class:`LocalOnly`: no federation; every client keeps and trains its own adapters.

FedMoE-DA's, as variations of what the server aggregates (no peer exchange in any of them):

* :class:`FedAvgMoE`: FedAvg on the whole MoE model (backbone, gate, experts via the server);
* :class:`FedAvgDense`: FedAvg on a dense model of similar size;
* :class:`LocalMoE`: every client trains its own MoE model; nothing is exchanged.

FedMoE-DA with P = 0 is :class:`~strategies.fedmoe_da.DomainAwareMoEAggregation` itself with
``num_peers=0`` (backbone shared, experts never aggregated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedspecialists.config import AdapterRunConfig
from strategies.fedmoe_da import DomainAwareMoEAggregation
from strategies.fltac import PoolEntry, TaskAdapterClustering, round_kwargs

GLOBAL_ID = "global"

# FL-TAC's own task evidence, which a baseline that does not cluster never asks for: no input
# or label fingerprints, no source check on the clients, no split by label count.
NO_TASK_EVIDENCE: dict[str, Any] = {
    "input_fingerprint": False,
    "label_fingerprint": False,
    "source_check_llr": None,
    "split_by_label_count": False,
}


def without_task_evidence(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with :data:`NO_TASK_EVIDENCE` wherever the caller did not say otherwise."""
    return {**NO_TASK_EVIDENCE, **kwargs}


class FedIT(TaskAdapterClustering):
    """FedAvg over one shared adapter: every upload joins the single group ``global``."""

    method = "fedit"
    reports_clustering = False

    def __init__(self, initial_adapter: Mapping[str, np.ndarray], **kwargs: Any) -> None:
        kwargs.setdefault("weighting", "samples")  # FedAvg weights by local example counts
        super().__init__(initial_adapter, num_clusters=1, **without_task_evidence(kwargs))

    @classmethod
    def config_kwargs(cls, cfg: AdapterRunConfig) -> dict[str, Any]:
        return round_kwargs(cfg)  # one group, FedAvg's weighting: no clustering settings

    def assign_groups(
        self, server_round: int, pool: Sequence[PoolEntry], features: np.ndarray
    ) -> list[str] | None:
        return [GLOBAL_ID] * len(pool)


class OracleClustering(TaskAdapterClustering):
    """Group by true task id: FL-TAC's aggregation with a perfect clustering."""

    method = "oracle"

    def __init__(
        self, initial_adapter: Mapping[str, np.ndarray], num_clusters: int | str, **kwargs: Any
    ) -> None:
        super().__init__(initial_adapter, num_clusters, **without_task_evidence(kwargs))

    @classmethod
    def config_kwargs(cls, cfg: AdapterRunConfig) -> dict[str, Any]:
        # Groups come from the truth: FL-TAC's task evidence is not asked for.
        return {**super().config_kwargs(cfg), **NO_TASK_EVIDENCE}

    def assign_groups(
        self, server_round: int, pool: Sequence[PoolEntry], features: np.ndarray
    ) -> list[str] | None:
        missing = [e.node_id for e in pool if e.true_task is None]
        if missing:
            raise ValueError(
                f"the oracle needs true tasks, but nodes {sorted(set(missing))} reported none "
                "(set report_true_tasks=true)"
            )
        return [str(e.true_task) for e in pool]


class LocalOnly(TaskAdapterClustering):
    """No aggregation: clients keep their own adapters between rounds (in their state)."""

    method = "local"

    def __init__(self, initial_adapter: Mapping[str, np.ndarray], **kwargs: Any) -> None:
        kwargs["keep_local"] = True
        kwargs.setdefault("num_clusters", 1)  # never clusters
        super().__init__(initial_adapter, **without_task_evidence(kwargs))

    @classmethod
    def config_kwargs(cls, cfg: AdapterRunConfig) -> dict[str, Any]:
        return {**round_kwargs(cfg), "weighting": cfg.fltac.weighting}  # nothing is clustered

    def assign_groups(
        self, server_round: int, pool: Sequence[PoolEntry], features: np.ndarray
    ) -> list[str] | None:
        return None


class FedAvgMoE(DomainAwareMoEAggregation):
    """FedAvg over every parameter of the MoE model (``initial_shared`` holds all of them)."""

    method = "fedavg_moe"
    exchanges_experts = False


class FedAvgDense(DomainAwareMoEAggregation):
    """FedAvg over every parameter of the dense model."""

    method = "fedavg_dense"
    exchanges_experts = False


class LocalMoE(DomainAwareMoEAggregation):
    """No federation: nothing is shared (``initial_shared`` is empty), only metrics travel."""

    method = "local_moe"
    exchanges_experts = False
