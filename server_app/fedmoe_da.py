"""The ServerApp's mixture-of-experts path: FedMoE-DA and its baselines, one run to files."""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log
from flwr.serverapp import Grid
from safetensors.numpy import save_file

from fedspecialists import methods
from fedspecialists.config import MoERunConfig, routed_experts
from fedspecialists.data.domains import model_input
from fedspecialists.models.moe import build_model, part_of
from server_app.outputs import RunRecorder
from server_app.rounds import run_rounds


def initial_state(cfg: MoERunConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """The federation's initial model (numpy, by parameter name) and the domains' names.

    Sized from the suite's specs where they declare it (no data needed on the server's
    machine), else from the data (:func:`fedspecialists.data.domains.model_input`).
    """
    input_shape, num_labels = model_input(cfg)
    model = build_model(
        input_shape,
        num_labels,
        cfg.moe,
        dense=methods.get(cfg.method.name).model == "dense",
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


def shared_state(state: dict[str, np.ndarray], parts: Sequence[str]) -> dict[str, np.ndarray]:
    """The entries of ``state`` in the model parts ``parts`` (``experts`` = every expert)."""
    return {
        k: v
        for k, v in state.items()
        if part_of(k) in parts or (part_of(k).startswith("expert.") and "experts" in parts)
    }


def round_summary(rounds: list[dict[str, Any]], domain_names: list[str]) -> dict[str, Any]:
    """The summary's figures read from the per-round records (the last round's accuracies)."""
    last = rounds[-1] if rounds else {}
    cumulative = last.get("bytes", {}).get("cumulative", {})
    return {
        "personalised_accuracy": last.get("personalised_accuracy", {}).get("mean"),
        "personalised_accuracy_std": last.get("personalised_accuracy", {}).get("std"),
        "global_accuracy": last.get("global_accuracy", {}).get("mean"),
        "accuracy_after_training": last.get("accuracy_after_training", {}).get("mean"),
        "domain_accuracy": dict(zip(domain_names, last.get("domain_accuracy", []), strict=False)),
        "total_server_bytes": int(sum(cumulative.get(k, 0) for k in ("train_up", "train_down"))),
        "total_peer_bytes": int(last.get("peer_bytes", {}).get("cumulative", 0)),
        "peer_failures": int(sum(r.get("peer_failures", 0) for r in rounds)),
    }


def run(grid: Grid, cfg: MoERunConfig, recorder: RunRecorder, run_dir: Path) -> None:
    """Run the rounds and write summary, plots, the shared model and the personal files' index."""
    state, domain_names = initial_state(cfg)
    peer_root = (
        str(Path(cfg.peer.root).expanduser().resolve()) if cfg.peer.root else str(run_dir / "nodes")
    )
    method = methods.get(cfg.method.name)
    parts = list(method.shares)
    strategy = method.strategy_class().from_config(
        cfg, shared_state(state, parts), parts, peer_root, recorder.on_round_end
    )
    strategy.run_key = str(grid.run.run_id)  # a resumed run restores its first run's key
    run_rounds(strategy, grid, cfg, recorder)
    if strategy.shared:
        save_file(strategy.shared, str(run_dir / "shared_model.safetensors"))
    personal = [
        str(p.relative_to(run_dir) if p.is_relative_to(run_dir) else p)
        for p in sorted(Path(peer_root).glob("node-*/run-*/personal.safetensors"))
    ]
    summary = recorder.write_summary(
        {
            "domains": domain_names,
            "parameters": parameter_counts(state),
            "shared_parts": parts,
            "num_peers": cfg.fedmoe_da.num_peers,
            **round_summary(recorder.rounds, domain_names),
            "shared_model": "shared_model.safetensors" if strategy.shared else None,
            "personal_models": personal,
        }
    )
    if cfg.output.plots:
        recorder.write_plots()
        moe = cfg.moe
        routed = routed_experts(moe.num_experts, moe.private_experts, moe.private_mode)
        recorder.write_moe_plots(domain_names, moe.num_experts, routed - moe.num_experts)
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
