"""``federation.fold_evaluation``: round r's evaluation inside round r + 1's training message.

The protocol's pieces by hand, the ClientApp mod around a recording handler and around FL-TAC's
real handlers (the folded evaluation equals the evaluation message's reply, the folded training
equals the plain training's), the server's split of the replies and the deferred round record.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client_app.fold import fold_evaluation
from fedspecialists.protocol.fold import (
    EVALUATE_FIRST,
    EVALUATION_ERROR,
    as_type,
    ask_evaluation_first,
    attach_evaluation,
    detach_evaluation,
    split_request,
)
from fedspecialists.protocol.packing import unpack_content
from fedspecialists.protocol.records import content_nbytes, record_to_numpy, state_to_record
from server_app.fold import FAILED_EVALUATION, ask_for_evaluation, evaluation_replies
from strategies.common import RoundBookkeeping, TrafficLedger
from strategies.round_record import RoundRecord


def _train_message(server_round: int, node: int = 1) -> Message:
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": server_round, "keep-local": False}),
            "adapter.g0": ArrayRecord({"w": state_to_record({"w": np.ones(3)})["w"]}),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


# -- protocol -------------------------------------------------------------------------------------
def test_a_marked_training_message_splits_into_the_two_requests_it_stands_for() -> None:
    msg = _train_message(3)
    ask_evaluation_first(msg.content, 2)
    train, evaluation = split_request(msg.content)
    assert EVALUATE_FIRST not in train and evaluation is not None
    assert EVALUATE_FIRST not in evaluation
    assert train.config_records["config"]["server-round"] == 3
    assert evaluation.config_records["config"]["server-round"] == 2  # the round evaluated
    assert evaluation.config_records["config"]["keep-local"] is False  # the rest unchanged
    # The adapters are the very records the server sent (not copies).
    assert evaluation.array_records["adapter.g0"] is msg.content.array_records["adapter.g0"]
    assert split_request(_train_message(3).content)[1] is None  # no marker: no evaluation


def test_an_evaluation_travels_in_a_training_reply_and_comes_out_alone() -> None:
    reply = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
    evaluation = RecordDict({"metrics": MetricRecord({"correct.a": 3.0, "total.a": 4.0})})
    attach_evaluation(reply, evaluation)
    assert sorted(reply) == ["evaluation.metrics", "metrics"]
    out = detach_evaluation(reply)
    assert isinstance(out, RecordDict) and out.metric_records["metrics"]["correct.a"] == 3.0
    assert sorted(reply) == ["metrics"] and reply.metric_records["metrics"]["num-examples"] == 5
    assert detach_evaluation(reply) is None  # nothing left to take
    attach_evaluation(reply, "ValueError: no test data")
    assert detach_evaluation(reply) == "ValueError: no test data"
    assert EVALUATION_ERROR not in reply


def test_the_marker_adds_exactly_its_own_size_to_a_message() -> None:
    ledger = TrafficLedger()
    msgs = [_train_message(2, node=7), _train_message(2, node=9)]
    before = [content_nbytes(m.content) for m in msgs]
    others = ask_for_evaluation(ledger, msgs, 1)
    added = [content_nbytes(m.content) - b for m, b in zip(msgs, before, strict=True)]
    assert ledger.round_bytes[("train", "down")] == {7: added[0], 9: added[1]}
    assert added[0] > 0
    assert others.excluded == frozenset({7, 9})

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [9, 7, 8, 10]

    assert others.bind(Grid()).get_node_ids() == [8, 10]  # type: ignore[arg-type]


def test_the_server_takes_each_evaluation_out_of_its_reply() -> None:
    trained = _train_message(2, node=4)
    ok = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=trained)
    attach_evaluation(ok.content, RecordDict({"metrics": MetricRecord({"total.a": 2.0})}))
    failed_eval = Message(RecordDict(), reply_to=_train_message(2, node=5))
    attach_evaluation(failed_eval.content, "RuntimeError: boom")
    crashed = Message(Error(code=0, reason="injected fault: crash"), reply_to=_train_message(2, 6))
    plain = Message(RecordDict(), reply_to=_train_message(2, node=7))  # evaluated nothing
    own = as_type(_train_message(1, node=8), MessageType.EVALUATE, content=RecordDict())
    out = evaluation_replies([ok, failed_eval, crashed, plain, own])
    assert [m.metadata.message_type for m in out] == [MessageType.EVALUATE] * 2 + [
        MessageType.TRAIN,
        MessageType.EVALUATE,
    ]
    assert out[0].metadata.src_node_id == ok.metadata.src_node_id
    assert out[0].content.metric_records["metrics"]["total.a"] == 2.0
    assert list(ok.content) == ["metrics"]  # the training reply keeps only its own
    assert out[1].has_error() and out[1].error.code == FAILED_EVALUATION
    assert out[1].error.reason == "RuntimeError: boom"
    assert out[2] is crashed and out[3] is own


# -- the ClientApp mod ----------------------------------------------------------------------------
def _context() -> Context:
    return Context(1, 1, {}, RecordDict(), {})


class Recorder:
    """A stand-in for the rest of the ClientApp: records each call, replies with its round."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, int, bool]] = []
        self.fail = fail

    def __call__(self, msg: Message, context: Context) -> Message:
        kind = msg.metadata.message_type
        server_round = msg.content.config_records["config"]["server-round"]
        assert isinstance(server_round, int)
        self.calls.append((kind, server_round, EVALUATE_FIRST in msg.content))
        if kind == self.fail:
            raise ValueError(f"{kind} failed")
        return Message(
            RecordDict({"metrics": MetricRecord({f"{kind}-round": server_round})}), reply_to=msg
        )


def test_the_mod_evaluates_the_earlier_round_then_trains() -> None:
    evaluate, rest = Recorder(), Recorder()
    msg = _train_message(4)
    ask_evaluation_first(msg.content, 3)
    reply = fold_evaluation(evaluate)(msg, _context(), rest)
    assert evaluate.calls == [(MessageType.EVALUATE, 3, False)]  # first, the earlier round
    assert rest.calls == [(MessageType.TRAIN, 4, False)]
    assert reply.metadata.message_type == MessageType.TRAIN
    assert reply.content.metric_records["metrics"]["train-round"] == 4
    assert reply.content.metric_records["evaluation.metrics"]["evaluate-round"] == 3


def test_the_mod_leaves_unmarked_and_evaluation_messages_alone() -> None:
    rest = Recorder()
    plain = fold_evaluation(rest)(_train_message(2), _context(), rest)
    assert rest.calls == [(MessageType.TRAIN, 2, False)]
    assert list(plain.content) == ["metrics"]


def test_a_failed_evaluation_is_reported_and_the_training_still_runs() -> None:
    rest = Recorder(fail=MessageType.EVALUATE)
    msg = _train_message(2)
    ask_evaluation_first(msg.content, 1)
    reply = fold_evaluation(rest)(msg, _context(), rest)
    assert [c[0] for c in rest.calls] == [MessageType.EVALUATE, MessageType.TRAIN]
    assert detach_evaluation(reply.content) == "ValueError: evaluate failed"
    assert reply.content.metric_records["metrics"]["train-round"] == 2


def test_a_failed_training_fails_the_message() -> None:
    msg = _train_message(2)
    ask_evaluation_first(msg.content, 1)
    with pytest.raises(ValueError, match="train failed"):
        rest = Recorder(fail=MessageType.TRAIN)
        fold_evaluation(rest)(msg, _context(), rest)


# -- FL-TAC's real handlers -----------------------------------------------------------------------
def test_fltac_folded_reply_equals_the_two_messages_it_replaces() -> None:
    """Through the ClientApp itself: its mods reach only the handler of a message's own type,
    so the evaluation must go to the evaluation handler by name (a bug caught here)."""
    from flwr.supercore.task_identity import TaskIdentity

    from client_app import fltac
    from client_app.app import app
    from fedspecialists.config import AdapterRunConfig, load_config_as
    from fedspecialists.models.lora import initial_adapter
    from fedspecialists.protocol.fltac import Instruction

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    overrides = "model=minilm suite=tiny_text train.num_threads=1"
    cfg = load_config_as(AdapterRunConfig, overrides)
    v0 = state_to_record(initial_adapter(cfg, 5))

    def message(server_round: int, kind: str) -> Message:
        content = Instruction(server_round=server_round, globals={"v0": v0}).to_record()
        return Message(content, dst_node_id=1, message_type=kind)

    def context() -> Context:
        node: dict[str, bool | float | int | str] = {"partition-id": 0, "num-partitions": 2}
        return Context(1, 1, node, RecordDict(), {"overrides": overrides})

    folded_msg = message(2, MessageType.TRAIN)
    ask_evaluation_first(folded_msg.content, 1)
    folded = unpack_content(app(folded_msg, context()).content)  # the ClientApp, mods and all
    evaluation = detach_evaluation(folded)
    alone = fltac.evaluate(message(1, MessageType.EVALUATE), context()).content
    assert isinstance(evaluation, RecordDict)
    assert dict(evaluation.metric_records["metrics"]) == dict(alone.metric_records["metrics"])
    trained = fltac.train(message(2, MessageType.TRAIN), context()).content
    assert sorted(folded) == sorted(trained)
    for name in trained.array_records:
        for key, value in record_to_numpy(trained.array_records[name]).items():
            np.testing.assert_array_equal(record_to_numpy(folded.array_records[name])[key], value)


# -- the deferred round record --------------------------------------------------------------------
class Bookkeeping(RoundBookkeeping[RoundRecord]):
    def __init__(self) -> None:
        self.init_rounds(RoundRecord, 0, 1.0, 1, 1e4, None)

    def method_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {}

    def method_restore(self, arrays: Any, state: Any) -> None:
        pass


def test_a_deferred_round_keeps_its_own_time_and_bytes_and_closes_first() -> None:
    rounds = Bookkeeping()
    rounds.open_round(1)
    rounds.ledger.count("train", "up", 3, 100)
    rounds.defer_evaluation()
    deferred = rounds.checkpoint()[1]["rounds"]["deferred"]
    assert deferred["round"] == 1 and deferred["evaluated_in_round"] == 2
    rounds.open_round(2)
    rounds.ledger.count("train", "up", 3, 40)
    rounds.ledger.count("evaluate", "up", 3, 7)  # round 1's evaluation, carried by round 2

    def evaluate() -> None:
        rounds.record.mean_accuracy = 0.5
        rounds.close_round()

    rounds.close_deferred(evaluate)
    assert rounds.deferred is None and rounds.record == RoundRecord(round=2)
    first = rounds.history[0]
    assert first.round == 1 and first.mean_accuracy == 0.5 and first.bytes is not None
    assert first.bytes["train_up"] == 100 and "evaluate_up" not in first.bytes
    assert first.round_time_s == deferred["round_time_s"]
    rounds.record.mean_accuracy = 0.75
    second = rounds.close_round()
    assert second is rounds.history[1] and second.bytes is not None
    assert second.bytes["train_up"] == 40 and second.bytes["evaluate_up"] == 7
    assert second.bytes["cumulative"]["train_up"] == 140


def test_a_checkpoint_taken_while_an_evaluation_is_deferred_restores_it() -> None:
    rounds = Bookkeeping()
    rounds.open_round(1)
    rounds.defer_evaluation()
    arrays, state = rounds.checkpoint()
    again = Bookkeeping()
    again.restore(arrays, state)
    assert again.deferred is not None and again.deferred.round == 1
