"""What both ClientApp paths read from a message's context: the run's config, this node's
partition and its device (node config overrides the experiment config)."""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from flwr.app import Context
from omegaconf import DictConfig

from fedspecialists.config import load_config
from fedspecialists.models import resolve_device


@lru_cache(maxsize=4)
def config_for(overrides: str) -> DictConfig:
    """The composed, validated experiment config (cached: ClientApps are rebuilt per message)."""
    return load_config(overrides)


def run_config(context: Context) -> tuple[str, DictConfig]:
    """The run's Hydra overrides and its config; sets torch's thread count for this process."""
    overrides = str(context.run_config.get("overrides", ""))
    cfg = config_for(overrides)
    torch.set_num_threads(int(cfg.train.num_threads or os.cpu_count() or 1))
    return overrides, cfg


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config."""
    return (
        int(context.node_config["partition-id"]),  # type: ignore[arg-type]
        int(context.node_config["num-partitions"]),  # type: ignore[arg-type]
    )


def device_of(context: Context, cfg: DictConfig) -> torch.device:
    """The node config's ``device`` if set, else ``train.device``."""
    return resolve_device(str(context.node_config.get("device") or cfg.train.device))
