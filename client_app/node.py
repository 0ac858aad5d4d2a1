"""What both ClientApp paths read from a message's context: the run's config, this node's
partition and its device (node config overrides the experiment config)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

from flwr.app import Context

from fedspecialists.config import ExperimentConfig, Schema, as_schema, load_config

if TYPE_CHECKING:  # torch is imported where it is used: a forwarding ClientApp never needs it
    import torch


@lru_cache(maxsize=4)
def config_for(overrides: str) -> ExperimentConfig:
    """The composed, validated experiment config (cached: ClientApps are rebuilt per message)."""
    return load_config(overrides)


def config_as(overrides: str, schema: type[Schema]) -> Schema:
    """:func:`config_for`, checked to be of one family's schema (e.g. ``MoERunConfig``)."""
    return as_schema(config_for(overrides), schema)


def run_config(context: Context, schema: type[Schema]) -> tuple[str, Schema]:
    """The run's Hydra overrides and its config; sets torch's thread count for this process."""
    overrides = str(context.run_config.get("overrides", ""))
    import torch

    cfg = config_as(overrides, schema)
    torch.set_num_threads(torch_threads(context.node_config, cfg.train.num_threads))
    return overrides, cfg


def torch_threads(node_config: Mapping[str, object], run_threads: int) -> int:
    """Torch threads for this node's work: the site's own ``num-threads`` (node config), else
    the run's ``train.num_threads``, else every core (0 means that in both).

    A site knows its cores; the run's setting is the same for every node. Sites sharing one
    machine (the loopback federation) each take their share, instead of all taking every core.

    Raises
    ------
    ValueError
        When ``num-threads`` is not a whole number >= 0 (names the node config key).
    """
    raw = node_config.get("num-threads", 0)
    try:
        own = int(str(raw))
    except ValueError:
        own = -1
    if own < 0:
        raise ValueError(f"node config 'num-threads': must be a whole number >= 0, got {raw!r}")
    return own or int(run_threads) or os.cpu_count() or 1


def partition_of(context: Context, own_files: bool = False) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config.

    A site reading its own files (``own_files``) needs none: ``(0, 1)`` when they are not set
    (the id only varies training seeds there).
    """
    node_config = context.node_config
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        if own_files:
            return 0, 1
        raise ValueError(
            "node config needs partition-id and num-partitions (a partition of the suite), or "
            "data-dir with a suite of source: files tasks (the site's own files)"
        )
    return (
        int(node_config["partition-id"]),  # type: ignore[arg-type]
        int(node_config["num-partitions"]),  # type: ignore[arg-type]
    )


def client_id_of(context: Context) -> int:
    """This node's client id, the same in every federation the run meets it in: the node
    config's ``client-id``, else its ``partition-id``, else (unstable) the node id."""
    for key in ("client-id", "partition-id"):
        if key in context.node_config:
            return int(str(context.node_config[key]))
    return int(context.node_id)


def data_dir_of(context: Context, cfg: ExperimentConfig) -> str | None:
    """The site's own data folder (node config ``data-dir``) when the run's suite reads files.

    A suite of ``source: files`` tasks names its files relative to each site's ``data-dir``;
    any other suite is partitioned by ``partition-id``, so one site can serve both kinds of run.
    """
    data_dir = context.node_config.get("data-dir")
    if data_dir and all(t.source == "files" for t in cfg.suite.tasks):
        return str(data_dir)
    return None


def device_of(context: Context, cfg: ExperimentConfig) -> torch.device:
    """The node config's ``device`` if set, else ``train.device``."""
    import torch

    setting = str(context.node_config.get("device") or cfg.train.device)
    if setting == "auto":  # the first CUDA GPU torch sees, else the CPU
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)
