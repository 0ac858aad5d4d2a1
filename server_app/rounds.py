"""What both ServerApp paths share: waiting for the federation and running the round loop."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedspecialists.config import ExperimentConfig


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


def run_rounds(strategy: Strategy, grid: Grid, cfg: ExperimentConfig) -> None:
    """Wait for the federation, then the strategy's round loop (Flower's ``Strategy.start``)."""
    wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.node_wait_s)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=cfg.num_rounds,
        timeout=cfg.federation.reply_timeout_s,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )
