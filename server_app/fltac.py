"""The ServerApp's adapter path: FL-TAC and its baselines, one run to files."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedspecialists import methods
from fedspecialists.config import AdapterRunConfig
from fedspecialists.data.tasks import declared_num_labels, load_suite
from fedspecialists.models.lora import initial_adapter
from server_app.outputs import RunRecorder, save_adapters
from server_app.rounds import run_rounds


def head_width(cfg: AdapterRunConfig) -> int:
    """Logits of the shared-width head: the largest label count of the suite's tasks.

    Read from the suite's specs where every task declares its labels (the server then needs none
    of the sites' data), else from the data.
    """
    declared = declared_num_labels(cfg.suite.tasks)
    if declared is None:
        declared = [t.num_labels for t in load_suite(cfg.suite.tasks, cfg.seed, cfg.data.cache_dir)]
    return max(declared)


def run(grid: Grid, cfg: AdapterRunConfig, recorder: RunRecorder, run_dir: Path) -> None:
    """Run the rounds and write the summary, plots and final global adapters."""
    num_labels = head_width(cfg)
    template: dict[str, np.ndarray] = {
        k: v.numpy() for k, v in initial_adapter(cfg, num_labels).items()
    }
    method = methods.get(cfg.method.name)
    strategy = method.strategy_class().from_config(cfg, template, recorder.on_round_end)
    run_rounds(strategy, grid, cfg, recorder)
    adapters = strategy.final_adapters() if cfg.output.save_adapters else {}
    saved = save_adapters(run_dir, cfg, num_labels, adapters, strategy.majority_task)
    summary = recorder.write_summary(
        {
            "tasks": [t.name for t in cfg.suite.tasks],
            "adapter_parameters": int(sum(v.size for v in template.values())),
            "global_adapters": {gid: strategy.majority_task.get(gid) for gid in sorted(adapters)},
            "adapters_saved": [str(p) for p in saved],
        }
    )
    if cfg.output.plots:
        recorder.write_plots()
    if not recorder.rounds or summary["mean_accuracy"] is None:
        raise RuntimeError("no round produced evaluation results (did every client fail?)")
    recorder.set_status("completed")
    log(INFO, "Run finished: mean accuracy %.4f; results in %s", summary["mean_accuracy"], run_dir)
