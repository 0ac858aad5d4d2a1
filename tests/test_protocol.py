"""The typed messages of both methods: they round-trip, keep the wire format, refuse bad ones."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedspecialists.protocol import fltac
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


# -- FL-TAC ---------------------------------------------------------------------------------------
def _adapter(value: float) -> ArrayRecord:
    return state_to_record({"lora_A.weight": np.full((1, 2), value, np.float32)})


def test_fltac_instruction_round_trips() -> None:
    sent = fltac.Instruction(
        server_round=2,
        keep_local=True,
        send_fingerprint=True,
        send_label_fingerprint=True,
        check_sources=4.6,
        slot_sources=["g1", "local"],
        globals={"g1": _adapter(1.0)},
        extra={"lr-scale": 1.0},
    )
    got = fltac.Instruction.from_record(sent.to_record())
    assert (got.server_round, got.keep_local, got.send_fingerprint) == (2, True, True)
    assert got.send_label_fingerprint is True
    assert (
        fltac.Instruction.from_record(fltac.Instruction(1).to_record()).send_label_fingerprint
        is False
    )
    assert got.sources(2) == ["g1", "local"] and got.extra == {"lr-scale": 1.0}
    assert list(got.globals) == ["g1"]
    with pytest.raises(ProtocolError, match="2 slot sources for 3 slots"):
        got.sources(3)
    with pytest.raises(ProtocolError, match="no global adapter 'g9'"):
        got.global_adapter("g9")
    assert fltac.Instruction.from_record(fltac.Instruction(1).to_record()).sources(2) == ["v0"] * 2


def test_fltac_train_reply_round_trips_and_keeps_the_wire_format() -> None:
    reply = fltac.TrainReply(
        [_adapter(1.0), _adapter(2.0)],
        [3, 4],
        train_loss=0.25,
        slot_sources=["g1", "g0"],
        source_swaps=2,
        source_check_llr=5.0,
        slot_tasks=["a", "b"],
        label_fingerprints=state_to_record({"slot0": np.ones((2, 3)), "slot1": np.zeros((2, 3))}),
    )
    got = fltac.TrainReply.from_record(reply.to_record())
    assert got.label_fingerprints is not None
    assert np.array_equal(got.label_fingerprints["slot0"].numpy(), np.ones((2, 3)))
    assert (got.slot_examples, got.train_loss, got.slot_sources) == ([3, 4], 0.25, ["g1", "g0"])
    assert (got.source_swaps, got.source_check_llr, got.slot_tasks) == (2, 5.0, ["a", "b"])
    bare = RecordDict()
    bare.array_records["adapter.slot0"] = _adapter(1.0)
    bare.array_records["adapter.slot1"] = _adapter(2.0)
    bare.config_records["sources"] = ConfigRecord({"slot-sources": ["g1", "g0"]})
    bare.metric_records["metrics"] = MetricRecord(
        {
            "num-examples": 7,
            "slot-examples": [3, 4],
            "train-loss": 0.25,
            "source-swaps": 2,
            "source-check-llr": 5.0,
        }
    )
    bare.config_records["truth"] = ConfigRecord({"slot-tasks": ["a", "b"]})
    bare.array_records["label_fingerprints"] = state_to_record(
        {"slot0": np.ones((2, 3)), "slot1": np.zeros((2, 3))}
    )
    assert content_nbytes(reply.to_record()) == content_nbytes(bare)


def test_a_malformed_fltac_reply_raises_with_its_reason() -> None:
    content = fltac.TrainReply([_adapter(1.0)], [3]).to_record()
    del content.array_records["adapter.slot0"]
    with pytest.raises(ProtocolError, match="do not match 1 slots"):
        fltac.TrainReply.from_record(content)
    content = fltac.TrainReply([_adapter(1.0)], [3]).to_record()
    content.metric_records["metrics"]["slot-examples"] = [-1]
    with pytest.raises(ProtocolError, match="non-negative ints"):
        fltac.TrainReply.from_record(content)


def test_fltac_evaluate_reply_round_trips() -> None:
    reply = fltac.EvaluateReply({"a": 3, "b": 1}, {"a": 4, "b": 2}, {"a": 0.5, "b": 0.7})
    content = reply.to_record()
    assert content.metric_records["metrics"]["num-examples"] == 6
    assert fltac.EvaluateReply.from_record(content) == reply


@pytest.mark.parametrize(("shape", "expected"), [((1, 2), 190), ((64,), 437)])
def test_content_nbytes_by_hand(shape: tuple[int, ...], expected: int) -> None:
    """The traffic counts' unit, field by field (protobuf: a 1-byte tag, then a varint length
    of 1 byte below 128, else 2). ``Array.data`` is ``np.save``'s output: a 128-byte .npy v1
    header + 4 bytes per float32.

    (1, 2): data 128 + 8 = 136 -> 1 + 2 + 136 = 139; dtype "float32" 1 + 1 + 7 = 9; shape
    packed [1, 2] 1 + 1 + 2 = 4; stype "numpy.ndarray" 1 + 1 + 13 = 15 -> Array 167;
    ArrayRecord item: key "w" 3 + value 1 + 2 + 167 = 173; ArrayRecord 1 + 2 + 173 = 176;
    RecordDict item: key "arrays" 8 + 1 + 2 + 176 = 187; RecordDict 1 + 2 + 187 = 190.
    (64,): data 128 + 256 = 384 -> 387; shape [64] 3 -> Array 9 + 3 + 15 + 387 = 414; item
    3 + 417 = 420; ArrayRecord 423; RecordDict item 8 + 426 = 434; total 437.
    """
    record = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(shape, np.float32))})})
    assert content_nbytes(record) == expected


def test_state_to_record_keeps_a_scalar_and_a_transposed_array() -> None:
    import torch

    from fedspecialists.peer.exchange import expert_from_bytes, expert_to_bytes

    state = {"scalar": torch.tensor(3.0), "t": torch.arange(6.0).reshape(2, 3).T}
    back = record_to_numpy(state_to_record(state))
    assert back["scalar"].shape == ()  # not (1,)
    np.testing.assert_array_equal(back["t"], [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])
    tensors = expert_from_bytes(expert_to_bytes({k: v.numpy() for k, v in state.items()}))
    assert tensors["scalar"].shape == ()
    np.testing.assert_array_equal(tensors["t"], back["t"])
