"""The ServerApp: composes the experiment config, builds the strategy and writes the run folder."""

from __future__ import annotations

import time
import traceback
from logging import ERROR, INFO
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedspecialists.config import MOE_METHODS, load_config, num_clusters
from fedspecialists.data import declared_num_labels, load_suite
from fedspecialists.models import initial_adapter
from server_app.moe import run_moe, run_rounds
from server_app.outputs import RunRecorder, run_dir_for, save_adapters
from strategies.baselines import FedIT, LocalOnly, OracleClustering
from strategies.fltac import TaskAdapterClustering

app = ServerApp()

STRATEGIES: dict[str, type[TaskAdapterClustering]] = {
    "fltac": TaskAdapterClustering,
    "fedit": FedIT,
    "oracle": OracleClustering,
    "local": LocalOnly,
}


def build_strategy(
    cfg: DictConfig, template: dict[str, np.ndarray], recorder: RunRecorder | None
) -> TaskAdapterClustering:
    """The strategy ``cfg.method.name`` names, with its settings from ``cfg``."""
    common: dict[str, Any] = {
        "feature_source": cfg.fltac.feature_source,
        "feature_tensors": cfg.fltac.feature_tensors,
        "normalize": cfg.fltac.normalize,
        "head_module": cfg.model.head_module,
        "seed": cfg.seed,
        "fraction_train": cfg.federation.fraction_train,
        "min_replies": cfg.federation.min_replies,
        "max_abs_value": cfg.validation.max_abs_value,
        "max_update_norm": cfg.validation.max_update_norm,
        "on_round_end": recorder.on_round_end if recorder is not None else None,
    }
    name = cfg.method.name
    if name == "fedit":
        return FedIT(template, **common)
    common["weighting"] = cfg.fltac.weighting
    if name == "local":
        return LocalOnly(template, **common)
    k = num_clusters(cfg)
    if name == "fltac":
        common["input_fingerprint"] = cfg.fltac.input_fingerprint
        common["source_check_llr"] = cfg.fltac.source_check_llr if cfg.fltac.source_check else None
        common["split_by_label_count"] = cfg.fltac.split_by_label_count
    return STRATEGIES[name](
        template,
        num_clusters=k,
        auto_k_range=(cfg.fltac.auto_k_min, cfg.fltac.auto_k_max),
        kmeans_n_init=cfg.fltac.kmeans_n_init,
        clustering=cfg.fltac.clustering,
        **common,
    )


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """Wait until ``expected`` nodes are connected; fail clearly if the federation is smaller."""
    deadline = time.time() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.time() >= deadline:
            raise RuntimeError(
                f"federation.num_clients={expected} but only {len(nodes)} SuperNode(s) connected "
                f"within {timeout_s:.0f}s. In simulation pass --federation-config "
                f'"num-supernodes={expected}" (or set federation.num_clients to match).'
            )
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one experiment: config -> strategy -> rounds -> files."""
    overrides = str(context.run_config.get("overrides", ""))
    cfg = load_config(overrides)  # refuses unknown keys / bad values before any training
    run_dir = run_dir_for(cfg)
    recorder = RunRecorder(run_dir, cfg)
    log(
        INFO,
        "fedspecialists: method=%s suite=%s, writing to %s",
        cfg.method.name,
        cfg.suite.name,
        run_dir,
    )
    try:
        if cfg.method.name in MOE_METHODS:
            run_moe(grid, cfg, recorder, run_dir, wait_for_nodes)
            return
        declared = declared_num_labels(cfg.suite.tasks)
        if declared is None:
            counts = [
                t.num_labels for t in load_suite(cfg.suite.tasks, cfg.seed, cfg.data.cache_dir)
            ]
        else:  # every task declares its labels: the server needs none of the sites' data
            counts = declared
        num_labels = max(counts)
        task_names = [t.name for t in cfg.suite.tasks]
        template = {k: v.numpy() for k, v in initial_adapter(cfg, num_labels).items()}
        strategy = build_strategy(cfg, template, recorder)
        wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.node_wait_s)
        run_rounds(strategy, grid, cfg)
        adapters = strategy.final_adapters() if cfg.output.save_adapters else {}
        saved = save_adapters(run_dir, cfg, num_labels, adapters, strategy.majority_task)
        summary = recorder.write_summary(
            {
                "tasks": task_names,
                "adapter_parameters": int(sum(v.size for v in template.values())),
                "global_adapters": {
                    gid: strategy.majority_task.get(gid) for gid in sorted(adapters)
                },
                "adapters_saved": [str(p) for p in saved],
            }
        )
        if cfg.output.plots:
            recorder.write_plots()
        if not recorder.rounds or summary["mean_accuracy"] is None:
            raise RuntimeError("no round produced evaluation results (did every client fail?)")
        recorder.set_status("completed")
        log(
            INFO,
            "Run finished: mean accuracy %.4f; results in %s",
            summary["mean_accuracy"],
            run_dir,
        )
    except Exception as exc:
        recorder.set_status("failed", error=repr(exc), traceback=traceback.format_exc())
        log(ERROR, "Run failed: %r (run folder %s)", exc, run_dir)
        raise


__all__ = ["app", "build_strategy"]
