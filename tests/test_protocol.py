"""FedMoE-DA's typed messages: they round-trip, keep the wire format, and refuse malformed ones."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedspecialists.protocol.fedmoe_da import (
    EvaluateReply,
    Instruction,
    ProtocolError,
    Source,
    TrainReply,
)
from fedspecialists.protocol.records import content_nbytes, record_to_numpy, state_to_record

SHA = "ab" * 32


def _train_reply() -> TrainReply:
    return TrainReply(
        num_examples=10,
        train_loss=0.5,
        aux_loss=0.01,
        peer_bytes=300,
        peer_fetches=2,
        peer_failures=1,
        peer_reused=1,
        domain_examples=[7, 3],
        after_training_correct=4,
        after_training_total=5,
        shared=state_to_record({"backbone.w": np.ones((2, 2), np.float32)}),
        proxies=state_to_record({"gate": np.eye(2, dtype=np.float32)}),
        hashes=[SHA, SHA],
        address="/stores/node-1",
    )


def test_instruction_round_trips_with_its_plans() -> None:
    sent = Instruction(
        server_round=3,
        share=["backbone"],
        exchange=True,
        peer_root="/stores",
        grant_key="key",
        grant="grant",
        plans={1: [Source("2/1", 0.75, SHA, "/a"), Source("1/1", 0.25, SHA, "/b")]},
    )
    got = Instruction.from_record(sent.to_record())
    assert got == sent
    assert got.planned_hashes() == {SHA}


def test_train_reply_round_trips_and_keeps_the_wire_format() -> None:
    reply = _train_reply()
    got = TrainReply.from_record(reply.to_record())
    assert (got.num_examples, got.peer_reused, got.domain_examples) == (10, 1, [7, 3])
    np.testing.assert_array_equal(got.gate_proxies(), np.eye(2))
    assert got.shared is not None and record_to_numpy(got.shared).keys() == {"backbone.w"}
    # The same bytes as the bare records the protocol replaced (traffic figures unchanged).
    bare = RecordDict()
    bare.array_records["shared"] = state_to_record({"backbone.w": np.ones((2, 2), np.float32)})
    bare.array_records["proxies"] = state_to_record({"gate": np.eye(2, dtype=np.float32)})
    bare.config_records["experts"] = ConfigRecord(
        {"hashes": [SHA, SHA], "address": "/stores/node-1"}
    )
    bare.metric_records["metrics"] = MetricRecord(
        {
            "num-examples": 10,
            "train-loss": 0.5,
            "aux-loss": 0.01,
            "peer-bytes": 300,
            "peer-fetches": 2,
            "peer-failures": 1,
            "peer-reused": 1,
            "domain-examples": [7, 3],
            "after-training-correct": 4,
            "after-training-total": 5,
        }
    )
    assert content_nbytes(reply.to_record()) == content_nbytes(bare)


@pytest.mark.parametrize(
    ("record", "key", "value", "reason"),
    [
        ("metrics", "train-loss", float("nan"), "train-loss"),
        ("metrics", "num-examples", 0, "no training examples"),
        ("experts", "hashes", ["xyz"], "SHA-256"),
        ("experts", "address", "", "no peer address"),
    ],
)
def test_a_malformed_train_reply_raises_one_error_with_its_reason(
    record: str, key: str, value: Any, reason: str
) -> None:
    content = _train_reply().to_record()
    if record == "metrics":
        content.metric_records[record][key] = value
    else:
        content.config_records[record][key] = value
    with pytest.raises(ProtocolError, match=reason):
        TrainReply.from_record(content)
    del content.metric_records["metrics"]
    with pytest.raises(ProtocolError, match="no 'metrics' record"):
        TrainReply.from_record(content)


def test_evaluate_reply_round_trips_and_refuses_an_empty_one() -> None:
    reply = EvaluateReply(3, 4, 5, 10, [1, 2], [2, 2], routing=[1, 0, 0, 1])
    assert EvaluateReply.from_record(reply.to_record()) == reply
    with pytest.raises(ProtocolError, match="no personalised test results"):
        EvaluateReply.from_record(EvaluateReply(0, 0, 0, 0, [], []).to_record())


def test_an_instruction_without_a_round_is_refused() -> None:
    with pytest.raises(ProtocolError, match="server-round"):
        Instruction.from_record(RecordDict({"config": ConfigRecord({"share": []})}))
