"""TaskAdapterClustering and its baselines as Flower strategies, driven with hand-made messages."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from conftest import FakeGrid, as_received
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from numpy.testing import assert_allclose

from fedspecialists.protocol.fltac import Instruction, TrainReply
from fedspecialists.protocol.records import (
    FAULT_RECORD,
    FINGERPRINT_RECORD,
    LABEL_FINGERPRINT_RECORD,
    record_to_numpy,
    state_to_record,
)
from strategies.baselines import NO_TASK_EVIDENCE, FedIT, LocalOnly, OracleClustering
from strategies.fltac import PoolEntry, TaskAdapterClustering, choose_sources

A = "base_model.model.layer.lora_A.weight"
W = "base_model.model.classifier.weight"
V0 = {A: np.zeros((1, 2), np.float32), W: np.zeros((2, 2), np.float32)}


def paper_fltac(**kwargs: Any) -> TaskAdapterClustering:
    """FL-TAC as the paper has it (none of our task evidence: no fingerprints, no source
    check, no split by label count), with ``kwargs`` on top, over the adapter V0."""
    return TaskAdapterClustering(V0, **{**NO_TASK_EVIDENCE, **kwargs})


def _adapter(x: float, y: float) -> dict[str, np.ndarray]:
    """An adapter pointing along task "x" (first coordinates) or task "y" (second)."""
    return {
        A: np.array([[x, y]], np.float32),
        W: np.array([[x, 0.0], [0.0, y]], np.float32),
    }


def _reply(
    msg: Message,
    adapters: list[dict[str, np.ndarray]],
    examples: list[int] | None = None,
    tasks: list[str] | None = None,
    sources: list[str] | None = None,
) -> Message:
    """A node's training reply: these adapters, and the sources its check chose (if any)."""
    reply = TrainReply(
        [state_to_record(adapter) for adapter in adapters],
        examples or [1] * len(adapters),
        train_loss=0.5,
        slot_sources=sources,
        slot_tasks=tasks,
    )
    return Message(reply.to_record(), reply_to=msg)


def _by_node(messages: list[Message]) -> dict[int, Message]:
    """The messages by node, as the nodes' handlers read them (unpacked)."""
    return {m.metadata.dst_node_id: m for m in as_received(messages)}


def _round(strategy: TaskAdapterClustering, server_round: int, grid: FakeGrid, make_replies):  # type: ignore[no-untyped-def]
    messages = _by_node(list(strategy.configure_train(server_round, None, ConfigRecord(), grid)))  # type: ignore[arg-type]
    replies = make_replies(messages)
    strategy.aggregate_train(server_round, replies)
    return messages


def test_round_one_broadcasts_v0_to_every_node() -> None:
    strategy = paper_fltac(num_clusters=2)
    messages = _by_node(list(strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2]))))  # type: ignore[arg-type]
    assert sorted(messages) == [1, 2]
    for msg in messages.values():
        assert list(msg.content.array_records) == ["adapter.v0"]
        assert Instruction.from_record(msg.content).sources(2) == ["v0", "v0"]
        assert_allclose(record_to_numpy(msg.content.array_records["adapter.v0"])[W], V0[W])


def test_clusters_are_averaged_and_each_node_gets_exactly_its_adapters() -> None:
    # Prepare: node 1 holds tasks (x, y), node 2 holds (y, x).
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters=2, seed=0)

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[1], [_adapter(1, 0), _adapter(0, 1)], tasks=["x", "y"]),
            _reply(messages[2], [_adapter(0, 3), _adapter(3, 0)], tasks=["y", "x"]),
        ]

    # Execute
    _round(strategy, 1, grid, replies)
    agreement = strategy.record.clustering_agreement
    second = _by_node(list(strategy.configure_train(2, None, ConfigRecord(), grid)))  # type: ignore[arg-type]

    # Assert: x cluster = mean of (1,0) and (3,0) = (2,0); y cluster = (0,2).
    assert agreement == pytest.approx(1.0)
    slots1 = Instruction.from_record(second[1].content).sources(2)
    slots2 = Instruction.from_record(second[2].content).sources(2)
    x_id, y_id = slots1
    assert x_id != y_id and slots2 == [y_id, x_id]
    for node in (1, 2):
        assert sorted(second[node].content.array_records) == sorted(
            [f"adapter.{x_id}", f"adapter.{y_id}"]
        )
    x = record_to_numpy(second[1].content.array_records[f"adapter.{x_id}"])
    y = record_to_numpy(second[1].content.array_records[f"adapter.{y_id}"])
    assert_allclose(x[A], [[2.0, 0.0]])
    assert_allclose(y[W], [[0.0, 0.0], [0.0, 2.0]])


def test_cluster_ids_stay_stable_across_rounds() -> None:
    # Each slot trains like a real client: what it received plus a step along its task.
    grid = FakeGrid([1, 2, 3])
    strategy = paper_fltac(num_clusters=2, seed=0)
    tasks = {1: ["x", "y"], 2: ["y", "x"], 3: ["x"]}
    step = {"x": _adapter(1, 0), "y": _adapter(0, 1)}

    def replies(messages: dict[int, Message]) -> list[Message]:
        out = []
        for node, msg in messages.items():
            sources = Instruction.from_record(msg.content).sources(len(tasks[node]))
            trained = []
            for slot, task in enumerate(tasks[node]):
                start = record_to_numpy(msg.content.array_records[f"adapter.{sources[slot]}"])
                trained.append({k: start[k] + step[task][k] for k in start})
            out.append(_reply(msg, trained, tasks=tasks[node]))
        return out

    _round(strategy, 1, grid, replies)
    first = {node: list(slots) for node, slots in strategy.node_slots.items()}
    assert first[1][0] == first[2][1] == first[3][0] != first[1][1] == first[2][0]
    for server_round in (2, 3, 4):
        _round(strategy, server_round, grid, replies)
        assert strategy.node_slots == first
        assert strategy.record.clustering_agreement == pytest.approx(1.0)
    # After 4 rounds the x adapter has moved 4 steps along x, the y adapter along y.
    x_id, y_id = first[1]
    assert_allclose(strategy.globals[x_id][A], [[4.0, 0.0]])
    assert_allclose(strategy.globals[y_id][A], [[0.0, 4.0]])


def test_a_node_whose_slots_share_a_cluster_receives_it_once() -> None:
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters=2, seed=0, clustering="kmeans")

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[1], [_adapter(1, 0), _adapter(2, 0)]),
            _reply(messages[2], [_adapter(0, 3)]),
        ]

    _round(strategy, 1, grid, replies)
    second = _by_node(list(strategy.configure_train(2, None, ConfigRecord(), grid)))  # type: ignore[arg-type]
    sources = Instruction.from_record(second[1].content).sources(2)
    assert sources[0] == sources[1]
    assert list(second[1].content.array_records) == [f"adapter.{sources[0]}"]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({A: np.array([[np.nan, 0]], np.float32), W: np.zeros((2, 2), np.float32)}, "non-finite"),
        ({A: np.array([[np.inf, 0]], np.float32), W: np.zeros((2, 2), np.float32)}, "non-finite"),
        ({A: np.zeros((2, 2), np.float32), W: np.zeros((2, 2), np.float32)}, "wrong shape"),
        ({A: np.zeros((1, 2), np.float32)}, "missing keys"),
        ({**V0, "extra.weight": np.zeros(1, np.float32)}, "unexpected keys"),
        ({A: np.array([[1e9, 0]], np.float32), W: np.zeros((2, 2), np.float32)}, "max_abs_value"),
    ],
)
def test_bad_replies_are_rejected_and_never_aggregated(
    bad: dict[str, np.ndarray], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    grid = FakeGrid([1, 2, 3])
    strategy = paper_fltac(num_clusters=1, seed=0)

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[1], [_adapter(1, 0)]),
            _reply(messages[2], [_adapter(3, 0)]),
            _reply(messages[3], [_adapter(5, 0), bad]),
        ]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    assert any(reason in r.getMessage() and "node 3" in r.getMessage() for r in caplog.records)
    (gid,) = strategy.final_adapters()
    # Only nodes 1 and 2 entered: mean of 1 and 3 (node 3's good slot was dropped with its reply).
    assert_allclose(strategy.globals[gid][A], [[2.0, 0.0]])
    assert 3 not in strategy.node_slots
    assert strategy.record.replies_rejected == 1


def test_failed_client_does_not_stop_the_round(caplog: pytest.LogCaptureFixture) -> None:
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters=1)

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[1], [_adapter(4, 0)]),
            Message(Error(code=1, reason="ClientApp raised"), reply_to=messages[2]),
        ]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    assert any("ClientApp raised" in r.getMessage() for r in caplog.records)
    assert_allclose(next(iter(strategy.final_adapters().values()))[A], [[4.0, 0.0]])
    assert strategy.record.replies_failed == 1


def test_too_few_replies_skip_aggregation() -> None:
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters=1, min_replies=2)
    _round(strategy, 1, grid, lambda m: [_reply(m[1], [_adapter(4, 0)])])
    assert strategy.final_adapters() == {}
    assert strategy.record.aggregated is False


def test_malformed_metrics_are_rejected() -> None:
    grid = FakeGrid([1])
    strategy = paper_fltac(num_clusters=1)

    def replies(messages: dict[int, Message]) -> list[Message]:
        reply = _reply(messages[1], [_adapter(1, 0)])
        reply.content.metric_records["metrics"] = MetricRecord({"slot-examples": [1, 1]})
        return [reply]

    _round(strategy, 1, grid, replies)
    assert strategy.record.replies_rejected == 1
    assert strategy.final_adapters() == {}


def test_update_norm_bound() -> None:
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters=1, max_update_norm=2.0)
    # |update| of _adapter(1, 0) from v0 = sqrt(1 + 1) = 1.41 (accepted); of (3, 0) = 4.24.
    _round(
        strategy,
        1,
        grid,
        lambda m: [_reply(m[1], [_adapter(1, 0)]), _reply(m[2], [_adapter(3, 0)])],
    )
    assert_allclose(next(iter(strategy.final_adapters().values()))[A], [[1.0, 0.0]])


def test_fedit_is_example_weighted_fedavg_of_one_adapter() -> None:
    grid = FakeGrid([1, 2])
    strategy = FedIT(V0)
    _round(
        strategy,
        1,
        grid,
        lambda m: [
            _reply(m[1], [_adapter(1, 0)], examples=[1]),
            _reply(m[2], [_adapter(0, 4)], examples=[3]),
        ],
    )
    # (1 * (1, 0) + 3 * (0, 4)) / 4 = (0.25, 3)
    assert_allclose(strategy.final_adapters()["global"][A], [[0.25, 3.0]])
    second = _by_node(list(strategy.configure_train(2, None, ConfigRecord(), grid)))  # type: ignore[arg-type]
    assert list(second[1].content.array_records) == ["adapter.global"]


def test_oracle_groups_by_true_task() -> None:
    grid = FakeGrid([1, 2])
    strategy = OracleClustering(V0, num_clusters=2)
    # Adapters deliberately look alike across tasks: only the reported truth groups them.
    _round(
        strategy,
        1,
        grid,
        lambda m: [
            _reply(m[1], [_adapter(1, 0), _adapter(1, 0)], tasks=["x", "y"]),
            _reply(m[2], [_adapter(3, 0), _adapter(5, 0)], tasks=["x", "y"]),
        ],
    )
    adapters = strategy.final_adapters()
    assert_allclose(adapters["x"][A], [[2.0, 0.0]])
    assert_allclose(adapters["y"][A], [[3.0, 0.0]])


def test_oracle_without_truth_fails_loudly() -> None:
    strategy = OracleClustering(V0, num_clusters=2)
    with pytest.raises(ValueError, match="true tasks"):
        _round(strategy, 1, FakeGrid([1]), lambda m: [_reply(m[1], [_adapter(1, 0)])])


def test_local_only_sends_no_adapters_after_round_one() -> None:
    grid = FakeGrid([1])
    strategy = LocalOnly(V0)
    _round(strategy, 1, grid, lambda m: [_reply(m[1], [_adapter(1, 0), _adapter(0, 1)])])
    second = _by_node(list(strategy.configure_train(2, None, ConfigRecord(), grid)))  # type: ignore[arg-type]
    instruction = Instruction.from_record(second[1].content)
    assert instruction.slot_sources == ["local", "local"]
    assert instruction.keep_local is True
    assert len(second[1].content.array_records) == 0
    assert strategy.final_adapters() == {}


def test_traffic_ledger_counts_serialized_sizes() -> None:
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters=1)
    sent = list(strategy.configure_train(1, None, ConfigRecord(), grid))  # type: ignore[arg-type]
    messages = {m.metadata.dst_node_id: m for m in sent}  # as they travel (packed)
    replies = [_reply(messages[n], [_adapter(1, 0)]) for n in (1, 2)]
    strategy.aggregate_train(1, replies)
    summary = strategy.ledger.round_summary()
    # Independent of the ledger's own size function: the bytes protobuf really writes.
    assert summary["train_down"] == sum(_wire_bytes(m.content) for m in messages.values())
    assert summary["train_up"] == sum(_wire_bytes(r.content) for r in replies)
    per_node = summary["per_node"]
    assert per_node["1"]["train_down"] == _wire_bytes(messages[1].content)  # type: ignore[index]


def _wire_bytes(content: RecordDict) -> int:
    from flwr.common.serde import recorddict_to_proto

    return len(recorddict_to_proto(content).SerializeToString())


# ------------------------------------------------------------------------------------------
# Input fingerprints, automatic K and recovery from a wrong grouping
# ------------------------------------------------------------------------------------------
H0 = "base_model.model.classifier.weight"
# A head row with one axis per task and a fourth for what a small client's label balance adds.
T3 = {H0: np.zeros((1, 4), np.float32)}
TASK_AXIS = {"x": 0, "y": 1, "z": 2}


def _with_fingerprints(reply: Message, fingerprints: list[np.ndarray]) -> Message:
    reply.content.array_records[FINGERPRINT_RECORD] = state_to_record(
        {f"slot{i}": f.astype(np.float32) for i, f in enumerate(fingerprints)}
    )
    return reply


def _with_label_fingerprints(reply: Message, fingerprints: list[np.ndarray]) -> Message:
    reply.content.array_records[LABEL_FINGERPRINT_RECORD] = state_to_record(
        {f"slot{i}": f.astype(np.float32) for i, f in enumerate(fingerprints)}
    )
    return reply


def test_label_fingerprints_are_asked_for_and_unusable_ones_are_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = FakeGrid([1, 2, 3, 4, 5])
    strategy = paper_fltac(num_clusters=1, label_fingerprint=True)  # V0's head: (2, 2)
    good = np.array([[1.0, -1.0], [-1.0, 1.0]])

    def replies(messages: dict[int, Message]) -> list[Message]:
        for msg in messages.values():
            assert Instruction.from_record(msg.content).send_label_fingerprint is True
        return [
            _with_label_fingerprints(_reply(messages[1], [_adapter(1, 0)]), [good]),
            _reply(messages[2], [_adapter(3, 0)]),  # none at all
            _with_label_fingerprints(_reply(messages[3], [_adapter(5, 0)]), [np.ones((3, 2))]),
            _with_label_fingerprints(_reply(messages[4], [_adapter(7, 0)]), [np.ones(2)]),
            _with_label_fingerprints(_reply(messages[5], [_adapter(9, 0)]), [good * np.inf]),
        ]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "no 'label_fingerprints' record (label_fingerprint is on)" in text
    assert "shape (3, 2), expected (C, 2) with 1 <= C <= 2" in text  # more rows than logits
    assert "shape (2,), expected (C, 2)" in text
    assert "non-finite" in text
    assert strategy.record.replies_rejected == 4
    (gid,) = strategy.final_adapters()
    assert_allclose(strategy.globals[gid][A], [[1.0, 0.0]])  # node 1 alone


# Label fingerprints of a slot whose data have one class, and two.
ONE_CLASS, TWO_CLASSES = np.array([[0.0, 0.0]]), np.array([[1.0, -1.0], [-1.0, 1.0]])


def test_a_head_that_moved_another_label_count_than_its_data_have_is_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """V0's head has 2 logits; ``_adapter(x, y)`` moves row 0 where x != 0 and row 1 where
    y != 0, so it moved 1 + (the last moved row) logits: (1, 0) one, (0, 1) and (1, 1) two."""
    grid = FakeGrid([1, 2, 3, 4, 5])
    strategy = paper_fltac(num_clusters=1, label_fingerprint=True, reject_label_count_mismatch=True)
    one, two = ONE_CLASS, TWO_CLASSES

    def replies(messages: dict[int, Message]) -> list[Message]:
        out = [
            _with_label_fingerprints(_reply(messages[1], [_adapter(1, 1)]), [two]),  # 2 and 2
            _with_label_fingerprints(_reply(messages[2], [_adapter(1, 0)]), [one]),  # 1 and 1
            _with_label_fingerprints(_reply(messages[3], [_adapter(0, 0)]), [one]),  # unmoved
            _with_label_fingerprints(_reply(messages[4], [_adapter(3, 3)]), [one]),  # 2 and 1
            _with_label_fingerprints(_reply(messages[5], [_adapter(5, 0)]), [two]),  # 1 and 2
        ]
        out[3].content.config_records[FAULT_RECORD] = ConfigRecord({"kind": "other_task"})
        return out

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "adapter slot0: its head moved 2 logits but its label fingerprint has 1 classes" in text
    assert "its head moved 1 logits but its label fingerprint has 2 classes" in text
    assert strategy.record.replies_rejected == 2
    assert strategy.record.rejected_injected == 1  # node 4's said it carried a fault
    (gid,) = strategy.final_adapters()
    # nodes 1-3 alone: the mean of A rows (1, 1), (1, 0), (0, 0)
    assert_allclose(strategy.globals[gid][A], [[2 / 3, 1 / 3]])


def test_the_label_count_check_measures_from_the_global_the_slot_started_from() -> None:
    """Node 1's one slot (1 class from round 2 on) starts from round 1's global G = (1, 1).
    Round 2's adapter (2, 1) moved head row 0 only from G: one logit (two from v0), accepted.
    Round 3's (2, 5) moved row 1 from the new global (2, 1): two logits, rejected."""
    grid = FakeGrid([1])
    strategy = paper_fltac(num_clusters=1, label_fingerprint=True, reject_label_count_mismatch=True)
    one, two = ONE_CLASS, TWO_CLASSES
    _round(
        strategy,
        1,
        grid,
        lambda m: [_with_label_fingerprints(_reply(m[1], [_adapter(1, 1)]), [two])],
    )
    _round(
        strategy,
        2,
        grid,
        lambda m: [_with_label_fingerprints(_reply(m[1], [_adapter(2, 1)]), [one])],
    )
    assert strategy.record.replies_rejected == 0
    (gid,) = strategy.final_adapters()
    assert_allclose(strategy.globals[gid][A], [[2.0, 1.0]])
    _round(
        strategy,
        3,
        grid,
        lambda m: [_with_label_fingerprints(_reply(m[1], [_adapter(2, 5)]), [one])],
    )
    assert strategy.record.replies_rejected == 1  # row 1 moved from (2, 1): two logits


def test_adapters_that_fit_their_slots_only_in_another_order_are_taken_in_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node 1, two slots: slot 0's data have 1 class, slot 1's 2; its adapters came swapped
    (the first moved 2 logits, the second 1). Taken swapped, each forms its own cluster. Node
    2, three slots of 1, 2 and 2 classes, adapters moving 2, 2 and 1 logits: the last is slot
    0's, but the other two fit slots 1 and 2 either way, as near v0: rejected."""
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(
        num_clusters=2,
        label_fingerprint=True,
        reject_label_count_mismatch=True,
        reorder_mismatched_adapters=True,
    )
    one, two = ONE_CLASS, TWO_CLASSES

    def replies(messages: dict[int, Message]) -> list[Message]:
        swapped = _reply(messages[1], [_adapter(3, 3), _adapter(1, 0)], examples=[5, 7])
        either = _reply(messages[2], [_adapter(2, 2), _adapter(4, 4), _adapter(1, 0)])
        return [
            _with_label_fingerprints(swapped, [one, two]),
            _with_label_fingerprints(either, [one, two, two]),
        ]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    assert strategy.record.replies_reordered == 1
    assert strategy.record.replies_rejected == 1
    assert "no one order of its adapters fits its slots best" in caplog.text
    slot0, slot1 = strategy.node_slots[strategy.client_of(1)]
    assert_allclose(strategy.globals[slot0][A], [[1.0, 0.0]])
    assert_allclose(strategy.globals[slot1][A], [[3.0, 3.0]])


def test_fingerprints_are_asked_for_and_a_reply_without_them_is_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = FakeGrid([1, 2, 3, 4])
    strategy = paper_fltac(num_clusters=1, input_fingerprint=True)
    fp = np.array([1.0, 2.0])

    def replies(messages: dict[int, Message]) -> list[Message]:
        for msg in messages.values():
            assert Instruction.from_record(msg.content).send_fingerprint is True
        return [
            _with_fingerprints(_reply(messages[1], [_adapter(1, 0)]), [fp]),
            _reply(messages[2], [_adapter(3, 0)]),  # none at all
            _with_fingerprints(_reply(messages[3], [_adapter(5, 0)]), [np.ones(3)]),  # width 3
            _with_fingerprints(_reply(messages[4], [_adapter(7, 0)]), [np.array([np.nan, 0])]),
        ]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "no 'fingerprints' record" in text and "expected (2,)" in text
    assert "non-finite" in text
    assert strategy.record.replies_rejected == 3
    (gid,) = strategy.final_adapters()
    assert_allclose(strategy.globals[gid][A], [[1.0, 0.0]])  # node 1 alone


def test_auto_k_is_the_most_tasks_one_node_has_shown() -> None:
    grid = FakeGrid([1, 2])
    strategy = paper_fltac(num_clusters="auto", auto_k_range=(2, 8))

    def replies(messages: dict[int, Message]) -> list[Message]:
        three = [_adapter(1, 0), _adapter(0, 1), _adapter(1, 1)]
        return [_reply(messages[1], three), _reply(messages[2], [_adapter(2, 0)])]

    _round(strategy, 1, grid, replies)
    assert len(strategy.final_adapters()) == 3


def _step(task: str, node: int) -> dict[str, np.ndarray]:
    """One round of local training: a small step along the task, a larger one along the node's
    label balance (the confound that makes head features group clients, not tasks)."""
    row = np.zeros((1, 4), np.float32)
    row[0, TASK_AXIS[task]] = 0.1
    row[0, 3] = (-1.0) ** node * 0.3
    return {H0: row}


class _WrongFirstRound(TaskAdapterClustering):
    """Round 1 grouped deliberately wrong: each node's slot tasks shifted by one cluster."""

    def assign_groups(self, server_round, pool, features):  # type: ignore[no-untyped-def]
        if server_round == 1:
            return [f"g{(TASK_AXIS[str(e.true_task)] + e.node_id) % 3}" for e in pool]
        return super().assign_groups(server_round, pool, features)


NODE_TASKS = {
    1: ["x", "y", "z"],
    2: ["y", "z", "x"],
    3: ["z", "x"],
    4: ["x", "y"],
    5: ["y", "z"],
    6: ["z", "x", "y"],
}


class _SwappedPair(TaskAdapterClustering):
    """Round 1 right except node 1, whose "x" and "y" adapters are swapped (a same-source pair)."""

    def assign_groups(self, server_round, pool, features):  # type: ignore[no-untyped-def]
        if server_round == 1:
            swap = {"x": "y", "y": "x"}
            tasks = [str(e.true_task) for e in pool]
            seen = [
                swap.get(t, t) if e.node_id == 1 else t for t, e in zip(tasks, pool, strict=True)
            ]
            return [f"g{TASK_AXIS[t]}" for t in seen]
        return super().assign_groups(server_round, pool, features)


def _fingerprint(task: str, node: int, pair_alike: bool) -> np.ndarray:
    """A task's mean input; with ``pair_alike`` node 1's "x" and "y" inputs look the same.

    The same in every round, as a real client's (its inputs under the frozen base model).
    """
    mean = np.eye(4)[TASK_AXIS[task]]
    if pair_alike and node == 1 and task in ("x", "y"):
        mean = (np.eye(4)[0] + np.eye(4)[1]) / 2
    noise = np.random.default_rng([node, TASK_AXIS[task]]).normal(size=4)
    return mean + 0.05 * noise + 3.0  # a shared offset; centring drops it


def _label_fingerprint(task: str, node: int) -> np.ndarray:
    """``(1, 4)``: the direction a task's labels split its inputs, the same for every client up
    to noise, also where two tasks' inputs look alike."""
    noise = np.random.default_rng([node, TASK_AXIS[task], 1]).normal(size=(1, 4))
    return np.eye(4)[[TASK_AXIS[task]]] + 0.05 * noise


def _slot_losses(task: str, candidates: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(8, C) per-example losses: a global fits a task as far as its head points along it."""
    fit = np.array([c[0, TASK_AXIS[task]] for c in candidates])
    return 1.0 - 5.0 * fit[None, :] + 0.02 * rng.normal(size=(8, len(candidates)))


def _client_reply(
    msg: Message,
    node: int,
    rng: np.random.Generator,
    input_fingerprint: bool,
    pair_alike: bool,
    shrinking_steps: bool,
    label_fingerprint: bool = False,
) -> Message:
    """What a real client of :func:`_recovering_run` replies: a small step from its starts."""
    instruction = Instruction.from_record(msg.content)
    tasks = NODE_TASKS[node]
    sources = instruction.sources(len(tasks))
    starts = {g: record_to_numpy(instruction.global_adapter(g))[H0] for g in sources}
    min_llr = instruction.check_sources
    moved = min_llr > 0 and instruction.slot_sources is not None
    if moved:
        candidates = sorted(set(sources))
        losses = [_slot_losses(t, [starts[c] for c in candidates], rng) for t in tasks]
        chosen, _ = choose_sources(losses, [candidates.index(g) for g in sources], min_llr)
        sources = [candidates[c] for c in chosen]
    # A few local steps barely move an adapter away from the mean it started from.
    scale = np.ones(4, np.float32)
    if shrinking_steps:
        scale[:3] = 1.0 / float(instruction.server_round) ** 2
    pairs = zip(sources, tasks, strict=True)
    trained = [{H0: starts[g] + scale * _step(t, node)[H0]} for g, t in pairs]
    reply = _reply(msg, trained, tasks=tasks, sources=sources if moved else None)
    if input_fingerprint:
        reply = _with_fingerprints(reply, [_fingerprint(t, node, pair_alike) for t in tasks])
    if label_fingerprint:
        reply = _with_label_fingerprints(reply, [_label_fingerprint(t, node) for t in tasks])
    return reply


def _recovering_run(
    input_fingerprint: bool,
    rounds: int = 6,
    strategy_cls: type[TaskAdapterClustering] | None = None,
    source_check_llr: float | None = None,
    pair_alike: bool = False,
    shrinking_steps: bool = False,
    label_fingerprint: bool = False,
) -> tuple[list[float], list[dict[int, list[str]]]]:
    """Agreement and slot ids per round; clients train like real ones (start + a small step).

    With ``source_check_llr`` the clients run :func:`choose_sources` on synthetic losses and say
    which global each slot used, as the real ClientApp does. With ``shrinking_steps`` the task
    step of round r is 1/r^2 of round 1's, as training that converges moves less each round.
    """
    grid = FakeGrid(sorted(NODE_TASKS))
    strategy = (strategy_cls or _WrongFirstRound)(
        T3,
        num_clusters=3,
        seed=0,
        input_fingerprint=input_fingerprint,
        label_fingerprint=label_fingerprint,
        source_check_llr=source_check_llr,
        max_abs_value=1e4,
    )
    rng = np.random.default_rng(0)

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _client_reply(
                msg, node, rng, input_fingerprint, pair_alike, shrinking_steps, label_fingerprint
            )
            for node, msg in messages.items()
        ]

    agreement, slots = [], []
    for server_round in range(1, rounds + 1):
        _round(strategy, server_round, grid, replies)
        agreement.append(strategy.record.clustering_agreement)
        slots.append({n: list(s) for n, s in strategy.node_slots.items()})
    return agreement, slots


def test_a_wrong_first_grouping_is_undone_by_round_three_and_then_holds() -> None:
    agreement, slots = _recovering_run(input_fingerprint=True)
    assert agreement[0] < 0  # the permutation: worse than chance
    first_right = next(r for r, a in enumerate(agreement, start=1) if a == pytest.approx(1.0))
    assert first_right <= 3
    assert all(a == pytest.approx(1.0) for a in agreement[first_right - 1 :])
    # Held, not merely re-found: every slot keeps its global id once recovered.
    assert all(s == slots[first_right - 1] for s in slots[first_right - 1 :])


def test_without_fingerprints_the_wrong_grouping_freezes() -> None:
    # The paper's failure mode, kept as a regression guard of what the fingerprints fix.
    agreement, _ = _recovering_run(input_fingerprint=False)
    assert max(agreement[1:]) < 1.0


def _holds_from(agreement: list[float], slots: list[dict[int, list[str]]]) -> int:
    """The first round of agreement 1.0, asserting it holds (same slot ids) to the end."""
    first_right = next(r for r, a in enumerate(agreement, start=1) if a == pytest.approx(1.0))
    assert all(a == pytest.approx(1.0) for a in agreement[first_right - 1 :])
    assert all(s == slots[first_right - 1] for s in slots[first_right - 1 :])
    return first_right


def test_a_swapped_same_source_pair_freezes_without_the_source_check() -> None:
    # Node 1's x and y inputs look alike, so its fingerprints cannot tell the pair apart.
    agreement, _ = _recovering_run(
        True, strategy_cls=_SwappedPair, pair_alike=True, shrinking_steps=True
    )
    assert max(agreement[:3]) < 1.0  # still wrong in round 3, the latest the target allows


def test_the_source_check_undoes_a_swapped_pair_in_round_two_and_holds() -> None:
    agreement, slots = _recovering_run(
        True, strategy_cls=_SwappedPair, source_check_llr=4.6, pair_alike=True, shrinking_steps=True
    )
    assert agreement[0] < 1.0
    assert _holds_from(agreement, slots) == 2


def test_label_fingerprints_undo_a_swapped_same_source_pair_in_round_two_and_hold() -> None:
    # The inputs of node 1's pair look alike, but their labels split them differently: with
    # label fingerprints the next clustering puts each back, with no source check at all.
    agreement, slots = _recovering_run(
        True,
        strategy_cls=_SwappedPair,
        pair_alike=True,
        shrinking_steps=True,
        label_fingerprint=True,
    )
    assert agreement[0] < 1.0
    assert _holds_from(agreement, slots) == 2


def test_the_default_undoes_a_permuted_first_round_by_round_three_and_holds() -> None:
    # Fingerprints and the source check together (the default) on the permutation.
    agreement, slots = _recovering_run(True, source_check_llr=4.6, label_fingerprint=True)
    assert agreement[0] < 0
    assert _holds_from(agreement, slots) <= 3


def test_the_source_check_is_asked_for_and_its_choices_are_checked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = FakeGrid([1, 2, 3])
    strategy = paper_fltac(num_clusters=2, source_check_llr=4.6)
    both = [_adapter(1, 0), _adapter(0, 1)]
    _round(strategy, 1, grid, lambda m: [_reply(m[n], both) for n in (1, 2, 3)])
    plan = strategy.node_slots[1]
    assert sorted(plan) == ["g0", "g1"]

    def replies(messages: dict[int, Message]) -> list[Message]:
        assert all(
            Instruction.from_record(m.content).check_sources == 4.6 for m in messages.values()
        )
        moved = _reply(messages[1], both, sources=plan[::-1])
        foreign = _reply(messages[2], both, sources=["v0", plan[1]])
        return [moved, foreign, _reply(messages[3], both)]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 2, grid, replies)
    assert strategy.record.replies_rejected == 1  # node 2 named a global it was not sent
    assert "not a choice among the globals" in " ".join(r.getMessage() for r in caplog.records)
    assert strategy.record.source_swaps == 2


def test_a_sources_record_is_rejected_when_the_check_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = FakeGrid([1])
    strategy = paper_fltac(num_clusters=1)

    def replies(messages: dict[int, Message]) -> list[Message]:
        assert Instruction.from_record(messages[1].content).check_sources == 0.0
        return [_reply(messages[1], [_adapter(1, 0)], sources=["v0"])]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, grid, replies)
    assert strategy.record.replies_rejected == 1
    assert "the source check is off" in " ".join(r.getMessage() for r in caplog.records)


def test_the_grouping_does_not_depend_on_reply_order_or_node_ids() -> None:
    # Six uploads whose K-means depends on where it starts; the same uploads reach a second
    # federation (other node ids) in reverse order.
    uploads = [_adapter(1, 0), _adapter(0.8, 0.5), _adapter(0.5, 0.8), _adapter(0, 1),
               _adapter(0.7, 0.7), _adapter(0.9, 0.2)]  # fmt: skip

    def means(nodes: list[int], arrival: list[int]) -> list[list[float]]:
        strategy = paper_fltac(num_clusters=2, kmeans_n_init=1)
        by_node = dict(zip(nodes, uploads, strict=True))
        _round(
            strategy,
            1,
            FakeGrid(sorted(nodes)),
            lambda m: [_reply(m[n], [by_node[n]]) for n in arrival],
        )
        return sorted(a[A].ravel().round(6).tolist() for a in strategy.final_adapters().values())

    first = means([1, 2, 3, 4, 5, 6], arrival=[1, 2, 3, 4, 5, 6])
    assert first == means([60, 50, 40, 30, 20, 10], arrival=[10, 20, 30, 40, 50, 60])


def test_adapters_of_different_label_counts_never_share_a_cluster() -> None:
    # Node 2's head moved two logits but points where the one-logit heads do.
    adapters = {1: _adapter(1, 0), 2: _adapter(1, 0.01), 3: _adapter(0, 1), 4: _adapter(1, 0)}

    def run(split: bool) -> dict[int, list[str]]:
        strategy = paper_fltac(num_clusters=2, split_by_label_count=split)
        _round(
            strategy, 1, FakeGrid([1, 2, 3, 4]), lambda m: [_reply(m[n], [adapters[n]]) for n in m]
        )
        return strategy.node_slots

    plain = run(split=False)
    assert plain[2] == plain[1] == plain[4] != plain[3]  # the features alone: 2 joins 1 and 4
    split = run(split=True)
    assert split[2] == split[3] != split[1] == split[4]


def test_cumulative_plus_update_features_are_two_unit_blocks() -> None:
    # Prepare: one round done, so a slot's previous global is known.
    grid = FakeGrid([1])
    strategy = paper_fltac(num_clusters=1, feature_source="cumulative+update")
    _round(strategy, 1, grid, lambda m: [_reply(m[1], [_adapter(3, 0)])])
    (gid,) = strategy.final_adapters()  # the global is (3, 0) on W's diagonal
    pool = [PoolEntry(1, 0, _adapter(3, 4), 1, gid, None)]

    # Execute
    features = strategy.clustering_features(pool)

    # Assert: head W flattened: cumulative (3, 0, 0, 4) / 5; update (0, 0, 0, 4) / 4.
    assert_allclose(features, [[0.6, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 1.0]])


def test_kmeans_weighting_by_samples_weighs_each_adapter_by_its_example_count() -> None:
    # The hand example of test_weighted_kmeans_moves_the_split_towards_the_heavy_point: points
    # 0, 4, 6, 10 of four nodes; the adapter at 10 was trained on 100 examples, the rest on 1.
    pool = [PoolEntry(n, 0, _adapter(1, 0), e, "v0", None) for n, e in enumerate([1, 1, 1, 100])]
    features = np.array([[0.0], [4.0], [6.0], [10.0]])
    uniform = paper_fltac(num_clusters=2)
    weighted = paper_fltac(num_clusters=2, kmeans_weighting="samples")
    assert uniform.kmeans_weights(pool) is None
    assert_allclose(weighted.kmeans_weights(pool), [1.0, 1.0, 1.0, 100.0])
    a, b, c, d = uniform.cluster(pool, features, seed=0)
    assert a == b != c == d
    a, b, c, d = weighted.cluster(pool, features, seed=0)
    assert a == b == c != d
    assert weighted.describe()["kmeans_weighting"] == "samples"


def test_kmeans_weighting_by_samples_holds_with_automatic_k() -> None:
    # The same hand example with plain K-means and K chosen by silhouette in 2..2: the scan's
    # fit is weighted too (it used to ignore fltac.kmeans_weighting).
    pool = [PoolEntry(n, 0, _adapter(1, 0), e, "v0", None) for n, e in enumerate([1, 1, 1, 100])]
    features = np.array([[0.0], [4.0], [6.0], [10.0]])
    auto = {"num_clusters": "auto", "auto_k_range": (2, 2), "clustering": "kmeans"}
    a, b, c, d = paper_fltac(**auto).cluster(pool, features, seed=0)
    assert a == b != c == d
    a, b, c, d = paper_fltac(**auto, kmeans_weighting="samples").cluster(pool, features, seed=0)
    assert a == b == c != d


def test_fingerprints_only_from_v0_leaves_the_heads_out_of_round_one_only() -> None:
    strategy = paper_fltac(
        num_clusters=1,
        input_fingerprint=True,
        label_fingerprint=True,
        fingerprints_only_from_v0=True,
    )
    fps = [np.array([1.0, 0.0]), np.array([3.0, 0.0])]  # centred: (-1, 0), (1, 0)
    labels = [np.array([[0.0, 2.0]]), np.array([[3.0, 4.0]])]  # unit: (0, 1), (0.6, 0.8)

    def pool(previous: str) -> list[PoolEntry]:
        return [
            PoolEntry(1, i, _adapter(3, 4), 1, previous, None, fps[i], labels[i]) for i in range(2)
        ]

    # Every adapter started from v0: the two fingerprint blocks alone.
    assert_allclose(
        strategy.clustering_features(pool("v0")), [[-1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.6, 0.8]]
    )
    # Started from a global (round 2 on): the head block (3, 0, 0, 4) / 5 comes first again.
    strategy.globals["g0"] = dict(V0)
    assert_allclose(strategy.clustering_features(pool("g0"))[:, :4], [[0.6, 0.0, 0.0, 0.8]] * 2)
    assert strategy.clustering_features(pool("g0")).shape == (2, 8)


def test_evaluated_rounds_are_every_nth_and_the_last() -> None:
    from server_app.rounds import evaluates

    assert [r for r in range(1, 8) if evaluates(r, 3, 7)] == [3, 6, 7]
    assert [r for r in range(1, 7) if evaluates(r, 3, 6)] == [3, 6]
    assert [r for r in range(1, 4) if evaluates(r, 1, 3)] == [1, 2, 3]
    assert [r for r in range(1, 3) if evaluates(r, 5, 2)] == [2]


def test_refine_moves_runs_after_constrained_kmeans() -> None:
    """``fltac.refine_moves``: the strategy's K-means step is constrained K-means, then
    Hartigan's moves (off: constrained K-means alone)."""
    from strategies.fltac import constrained_kmeans_labels, refine_by_moves

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    owners = np.repeat(np.arange(6), 2)
    plain = constrained_kmeans_labels(x, owners.tolist(), 3, 5, 10)
    refined = refine_by_moves(x, owners.tolist(), plain, 3)
    assert paper_fltac(num_clusters=3)._kmeans(x, owners, 3, 5).tolist() == plain.tolist()
    on = paper_fltac(num_clusters=3, refine_moves=True)._kmeans(x, owners, 3, 5)
    assert on.tolist() == refined.tolist()


@pytest.mark.parametrize(
    "kwargs",
    [{"kmeans_weighting": "samples"}, {"clustering": "kmeans"}],
    ids=["weighted", "kmeans"],
)
def test_refine_moves_is_refused_where_it_is_not_defined(kwargs: dict[str, str]) -> None:
    """A strategy built directly refuses what the config refuses: Hartigan's moves only after
    unweighted constrained K-means (they used to be skipped silently with weights)."""
    from fedspecialists.config import ConfigError

    with pytest.raises(ConfigError, match=r"fltac\.refine_moves"):
        paper_fltac(num_clusters=3, refine_moves=True, **kwargs)
