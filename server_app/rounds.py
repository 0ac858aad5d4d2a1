"""What both ServerApp paths share: waiting for the federation and running the round loop.

The loop is ours, not Flower's ``Strategy.start`` (which always counts from round 1): it asks
nodes it has not met for their client id, runs each round's training and evaluation, and writes
a checkpoint after every round, so that a run can go on from its last completed round
(``resume=<run folder>``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedspecialists.config import ExperimentConfig
from server_app.fold import ask_for_evaluation, evaluation_replies
from server_app.outputs import RunRecorder
from strategies.common import TrafficLedger, exchange
from strategies.round_record import RoundRecord


class RoundStrategy(Protocol):
    """What the loop needs of a strategy: Flower's four round hooks and the shared plumbing
    of :class:`strategies.common.RoundBookkeeping` (round opening, identities, checkpoints)."""

    ledger: TrafficLedger

    @property
    def deferred(self) -> RoundRecord | None: ...

    @property
    def record(self) -> RoundRecord: ...

    def summary(self) -> None: ...

    def open_round(self, server_round: int) -> None: ...

    def identify_nodes(
        self, server_round: int, grid: Any, timeout: float, max_in_flight: int = 0
    ) -> None: ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None: ...

    def close_round(self) -> RoundRecord: ...

    def defer_evaluation(self) -> None: ...

    def close_deferred(self, evaluate: Any) -> None: ...

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...

    def restore(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None: ...


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


def evaluates(server_round: int, every: int, num_rounds: int) -> bool:
    """Whether round ``server_round`` ends with an evaluation: every ``every``-th round, and
    the last one (the run's final metrics are always measured)."""
    return server_round % every == 0 or server_round == num_rounds


def run_rounds(
    strategy: RoundStrategy, grid: Grid, cfg: ExperimentConfig, recorder: RunRecorder
) -> None:
    """Rounds ``1..num_rounds`` (or, resuming, from the one after the checkpoint), each
    followed by a checkpoint in the run folder."""
    first = 1
    if recorder.resumed is not None:
        strategy.restore(recorder.resumed.arrays, recorder.resumed.state)
        first = recorder.resumed.round + 1
        log(INFO, "resuming %s after round %s", recorder.run_dir, recorder.resumed.round)
    wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.node_wait_s)
    strategy.summary()
    for server_round in range(first, cfg.num_rounds + 1):
        log(INFO, "[ROUND %s/%s]", server_round, cfg.num_rounds)
        strategy.open_round(server_round)
        timeout, window = cfg.federation.reply_timeout_s, cfg.federation.max_in_flight
        strategy.identify_nodes(server_round, grid, timeout, window)
        train_round(strategy, grid, server_round, timeout, window)
        if not evaluates(server_round, cfg.federation.evaluate_every, cfg.num_rounds):
            strategy.record.evaluated = False  # no message at all: the record says so
            strategy.close_round()
        elif cfg.federation.fold_evaluation and server_round < cfg.num_rounds:
            strategy.defer_evaluation()  # the next round's training messages carry it
        else:
            evaluate = strategy.configure_evaluate(server_round, *EMPTY, grid)
            replies = exchange(grid, evaluate, timeout, window, strategy.ledger.uncount_unsent)
            strategy.aggregate_evaluate(server_round, replies)
        recorder.save_checkpoint(server_round, *strategy.checkpoint())


EMPTY = (ArrayRecord(), ConfigRecord())  # the strategies take no arrays or config from the loop


def train_round(
    strategy: RoundStrategy, grid: Grid, server_round: int, timeout: float, max_in_flight: int = 0
) -> None:
    """The round's training; with a deferred evaluation, that one too, in the same messages
    (nodes not sampled for training get the evaluation message of their own)."""
    train = list(strategy.configure_train(server_round, *EMPTY, grid))
    deferred = strategy.deferred
    if deferred is None:
        replies = exchange(grid, train, timeout, max_in_flight, strategy.ledger.uncount_unsent)
        aggregate_timed(strategy, server_round, replies)
        return
    evaluated = deferred.round
    others = ask_for_evaluation(strategy.ledger, train, evaluated)
    evaluate = list(strategy.configure_evaluate(evaluated, *EMPTY, others.bind(grid)))
    replies = exchange(
        grid, train + evaluate, timeout, max_in_flight, strategy.ledger.uncount_unsent
    )
    evaluations = evaluation_replies(replies)
    strategy.close_deferred(lambda: strategy.aggregate_evaluate(evaluated, evaluations))
    trained = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
    aggregate_timed(strategy, server_round, trained)


def aggregate_timed(strategy: RoundStrategy, server_round: int, replies: list[Message]) -> None:
    """The strategy's aggregation of the round's training replies; its time in the record
    (``aggregate_s``: the server's own maths, no waiting)."""
    started = time.perf_counter()
    strategy.aggregate_train(server_round, replies)
    strategy.record.aggregate_s = time.perf_counter() - started
