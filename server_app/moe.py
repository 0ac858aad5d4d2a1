"""The ServerApp's mixture-of-experts path: FedMoE-DA and its baselines, one run to files."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig
from safetensors.numpy import save_file

from fedspecialists.domains import model_input
from fedspecialists.moe import build_model, part_of
from server_app.outputs import RunRecorder
from strategies.baselines import FedAvgDense, FedAvgMoE, LocalMoE
from strategies.fedmoe_da import DomainAwareMoEAggregation

# Which parts of the model each method aggregates through the server.
SHARED_PARTS: dict[str, list[str]] = {
    "fedmoe_da": ["backbone"],
    "fedavg_moe": ["backbone", "gate", "experts"],
    "fedavg_dense": ["backbone", "head"],
    "local_moe": [],
}
STRATEGIES: dict[str, type[DomainAwareMoEAggregation]] = {
    "fedmoe_da": DomainAwareMoEAggregation,
    "fedavg_moe": FedAvgMoE,
    "fedavg_dense": FedAvgDense,
    "local_moe": LocalMoE,
}


def initial_state(cfg: DictConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """The federation's initial model (numpy, by parameter name) and the domains' names.

    Sized from the suite's specs where they declare it (no data needed on the server's
    machine), else from the data (:func:`fedspecialists.domains.model_input`).
    """
    input_shape, num_labels = model_input(cfg)
    model = build_model(
        input_shape,
        num_labels,
        cfg.moe,
        dense=cfg.method.name == "fedavg_dense",
        seed=cfg.seed,
    )
    names = [str(t.name) for t in cfg.suite.tasks]
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}, names


def parameter_counts(state: dict[str, np.ndarray]) -> dict[str, int]:
    """Parameters per part: backbone, gate, experts (all K together), head."""
    counts: dict[str, int] = {}
    for key, value in state.items():
        part = part_of(key)
        part = "experts" if part.startswith("expert.") else part
        counts[part] = counts.get(part, 0) + int(value.size)
    return counts


def build_moe_strategy(
    cfg: DictConfig,
    state: dict[str, np.ndarray],
    peer_root: str,
    on_round_end: Callable[[dict[str, Any]], None] | None,
) -> DomainAwareMoEAggregation:
    """The strategy of ``cfg.method.name`` with the shared parts it aggregates."""
    parts = SHARED_PARTS[cfg.method.name]
    shared = {
        k: v
        for k, v in state.items()
        if part_of(k) in parts or (part_of(k).startswith("expert.") and "experts" in parts)
    }
    return STRATEGIES[cfg.method.name](
        shared,
        parts,
        num_experts=cfg.moe.num_experts,
        num_peers=cfg.fedmoe_da.num_peers,
        tau=cfg.fedmoe_da.tau,
        interval=cfg.fedmoe_da.interval,
        self_weight=cfg.fedmoe_da.self_weight,
        mix_every=cfg.fedmoe_da.mix_every,
        mix_within_client=cfg.fedmoe_da.mix_within_client,
        peer_root=peer_root,
        grant_ttl_s=cfg.peer.grant_ttl_s,
        seed=cfg.seed,
        fraction_train=cfg.federation.fraction_train,
        min_replies=cfg.federation.min_replies,
        max_abs_value=cfg.validation.max_abs_value,
        on_round_end=on_round_end,
    )


def run_rounds(strategy: Strategy, grid: Grid, cfg: DictConfig) -> None:
    """The strategy's round loop (Flower's ``Strategy.start``) with the run's settings."""
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=cfg.num_rounds,
        timeout=cfg.federation.reply_timeout_s,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )


def run_moe(
    grid: Grid,
    cfg: DictConfig,
    recorder: RunRecorder,
    run_dir: Path,
    wait_for_nodes: Callable[[Grid, int, float], list[int]],
) -> None:
    """Run the rounds and write summary, plots, the shared model and the personal files' index."""
    state, domain_names = initial_state(cfg)
    peer_root = (
        str(Path(cfg.peer.root).expanduser().resolve()) if cfg.peer.root else str(run_dir / "nodes")
    )
    strategy = build_moe_strategy(cfg, state, peer_root, recorder.on_round_end)
    wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.node_wait_s)
    run_rounds(strategy, grid, cfg)
    if strategy.shared:
        save_file(strategy.shared, str(run_dir / "shared_model.safetensors"))
    personal = [
        str(p.relative_to(run_dir) if p.is_relative_to(run_dir) else p)
        for p in sorted(Path(peer_root).glob("node-*/run-*/personal.safetensors"))
    ]
    last = recorder.rounds[-1] if recorder.rounds else {}
    summary = recorder.write_summary(
        {
            "domains": domain_names,
            "parameters": parameter_counts(state),
            "shared_parts": SHARED_PARTS[cfg.method.name],
            "num_peers": cfg.fedmoe_da.num_peers,
            "personalised_accuracy": last.get("personalised_accuracy", {}).get("mean"),
            "personalised_accuracy_std": last.get("personalised_accuracy", {}).get("std"),
            "global_accuracy": last.get("global_accuracy", {}).get("mean"),
            "accuracy_after_training": last.get("accuracy_after_training", {}).get("mean"),
            "domain_accuracy": dict(
                zip(domain_names, last.get("domain_accuracy", []), strict=False)
            ),
            "total_server_bytes": int(
                sum(
                    last.get("bytes", {}).get("cumulative", {}).get(k, 0)
                    for k in ("train_up", "train_down")
                )
            ),
            "total_peer_bytes": int(last.get("peer_bytes", {}).get("cumulative", 0)),
            "peer_failures": int(sum(r.get("peer_failures", 0) for r in recorder.rounds)),
            "shared_model": "shared_model.safetensors" if strategy.shared else None,
            "personal_models": personal,
        }
    )
    if cfg.output.plots:
        recorder.write_plots()
        recorder.write_moe_plots(domain_names, cfg.moe.num_experts)
    if not recorder.rounds or summary["mean_accuracy"] is None:
        raise RuntimeError("no round produced evaluation results (did every client fail?)")
    recorder.set_status("completed")
    log(
        INFO,
        "Run finished: personalised accuracy %.4f, server bytes %s, peer bytes %s; results in %s",
        summary["personalised_accuracy"],
        summary["total_server_bytes"],
        summary["total_peer_bytes"],
        run_dir,
    )
