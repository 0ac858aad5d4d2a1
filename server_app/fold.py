"""The server's side of ``federation.fold_evaluation``: round r's evaluation asked for inside
round r + 1's training messages, and taken back out of their replies
(see :mod:`fedspecialists.protocol.fold`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedspecialists.protocol.fold import (
    EVALUATE_FIRST,
    as_type,
    ask_evaluation_first,
    detach_evaluation,
)
from fedspecialists.protocol.records import content_nbytes
from strategies.common import TrafficLedger

FAILED_EVALUATION = 1  # the code of an error reply standing for an evaluation that raised


@dataclass(frozen=True)
class NodesExcept:
    """The grid's nodes but ``excluded``: those a folded evaluation reaches by training."""

    excluded: frozenset[int]

    def bind(self, grid: Grid) -> Grid:
        return cast(Grid, _GridView(grid, self.excluded))


class _GridView:
    """``grid`` whose ``get_node_ids`` leaves out some nodes (a strategy's ``configure_*``
    reads only that)."""

    def __init__(self, grid: Any, excluded: frozenset[int]) -> None:
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def ask_for_evaluation(
    ledger: TrafficLedger, train: Sequence[Message], evaluated_round: int
) -> NodesExcept:
    """Ask every training message in ``train`` for round ``evaluated_round``'s evaluation
    first (its bytes counted as the training's); returns the nodes left to ask otherwise."""
    marker = RecordDict({EVALUATE_FIRST: ConfigRecord({"round": int(evaluated_round)})})
    extra = content_nbytes(marker)  # a record adds its own serialized size to a message
    for message in train:
        ask_evaluation_first(message.content, evaluated_round)
        ledger.count("train", "down", message.metadata.dst_node_id, extra)
    return NodesExcept(frozenset(m.metadata.dst_node_id for m in train))


def evaluation_replies(replies: Iterable[Message]) -> list[Message]:
    """The evaluation replies among ``replies``: evaluation messages' own, and the evaluation
    each training reply carried (taken out of it, so the training reply holds the training's
    records only). A failed training reply stands for a failed evaluation too."""
    out = []
    for reply in replies:
        if reply.metadata.message_type == MessageType.EVALUATE or reply.has_error():
            out.append(reply)
            continue
        evaluation = detach_evaluation(reply.content)
        if evaluation is None:
            continue  # the node did not evaluate (a ClientApp without the fold mod)
        if isinstance(evaluation, str):
            error = Error(code=FAILED_EVALUATION, reason=evaluation)
            out.append(as_type(reply, MessageType.EVALUATE, error=error))
        else:
            out.append(as_type(reply, MessageType.EVALUATE, content=evaluation))
    return out
