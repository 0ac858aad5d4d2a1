"""Faults injected on purpose, their counting, and local DP through Flower's LocalDpMod."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from conftest import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from numpy.testing import assert_allclose, assert_array_equal
from test_moe_strategy import GATES
from test_moe_strategy import _reply as _moe_reply
from test_moe_strategy import _round as _moe_round
from test_moe_strategy import _strategy as _moe_strategy
from test_strategy import V0, A, W, _adapter, _reply, _round, paper_fltac

from client_app.faults import HUGE, poisoned
from client_app.privacy import local_dp as privacy_local_dp
from fedspecialists.config import load_config
from fedspecialists.faults import FaultDraw, absent_clients, faulty_clients
from fedspecialists.protocol.fedmoe_da import Instruction as FedMoEInstruction
from fedspecialists.protocol.records import FAULT_RECORD, record_to_numpy, state_to_record
from strategies.common import injected_faults
from strategies.robust import RobustAggregation

INVALID = ("nan", "inf", "shape", "huge_norm")


def test_faulty_clients_are_a_fixed_share_drawn_anew_each_round() -> None:
    rounds = [faulty_clients(0, r, 10, 0.3) for r in range(1, 7)]
    assert all(len(chosen) == 3 and chosen <= set(range(10)) for chosen in rounds)
    assert len({frozenset(c) for c in rounds}) > 1  # not the same three every round
    assert faulty_clients(0, 2, 10, 0.3) == rounds[1]  # the same draw on every client
    assert faulty_clients(0, 1, 10, 0.0) == set()
    assert faulty_clients(0, 1, 3, 1.0) == {0, 1, 2}
    assert len(faulty_clients(0, 1, 10, 0.25)) == 2  # round(2.5) = 2 (half to even)


def test_each_poison_by_hand() -> None:
    ref = {"w": np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)}
    x = {"w": np.array([[2.0, 3.0], [1.0, 0.0]], np.float32)}  # update (1, 2, 0, -1)
    assert np.isnan(poisoned(x, ref, "nan", 10)["w"][0, 0])
    assert np.isposinf(poisoned(x, ref, "inf", 10)["w"][0, 0])
    assert poisoned(x, ref, "shape", 10)["w"].shape == (1, 2)
    assert_array_equal(poisoned(x, ref, "sign_flip", 10)["w"], [[0.0, -1.0], [1.0, 2.0]])
    assert_array_equal(poisoned(x, ref, "scale", 10)["w"], [[11.0, 21.0], [1.0, -9.0]])
    assert_array_equal(
        poisoned(x, ref, "huge_norm", 10)["w"], ref["w"] + HUGE * (x["w"] - ref["w"])
    )
    assert_array_equal(x["w"], [[2.0, 3.0], [1.0, 0.0]])  # the input is left as it was


def test_injected_faults_are_counted_by_kind() -> None:
    sent = Message(_empty(), dst_node_id=1, message_type="train")
    crashed = Message(
        Error(code=1, reason="RuntimeError('injected fault: crash (round 2)')"), reply_to=sent
    )
    other = Message(Error(code=1, reason="out of memory"), reply_to=sent)
    poisoned_reply = Message(_empty(), reply_to=sent)
    poisoned_reply.content.config_records[FAULT_RECORD] = ConfigRecord({"kind": "sign_flip"})
    honest = Message(_empty(), reply_to=sent)
    assert injected_faults([crashed, other, poisoned_reply, honest]) == {"crash": 1, "sign_flip": 1}


def _empty() -> RecordDict:
    return RecordDict()


@pytest.mark.parametrize("kind", INVALID)
def test_an_invalid_update_is_rejected_with_its_reason_and_never_aggregated(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """FL-TAC: the cluster mean is that of the valid replies alone, to the last bit."""
    strategy = paper_fltac(num_clusters=1, seed=0)
    bad = poisoned(_adapter(5, 0), V0, kind, 10.0)

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[1], [_adapter(1, 0)]),
            _reply(messages[2], [_adapter(3, 0)]),
            _reply(messages[3], [bad]),
        ]

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, FakeGrid([1, 2, 3]), replies)
    (gid,) = strategy.final_adapters()
    assert_array_equal(strategy.globals[gid][A], np.array([[2.0, 0.0]], np.float32))  # (1+3)/2
    assert_array_equal(strategy.globals[gid][W], np.array([[2.0, 0.0], [0.0, 0.0]], np.float32))
    assert strategy.record.replies_rejected == 1
    (reason,) = strategy.record.rejected_reasons
    assert any(reason in r.getMessage() and "node 3" in r.getMessage() for r in caplog.records)
    expected = {"nan": "non-finite", "inf": "non-finite", "shape": "shape", "huge_norm": "max_abs"}
    assert expected[kind] in reason


@pytest.mark.parametrize("kind", INVALID)
def test_an_invalid_backbone_is_rejected_and_never_aggregated(kind: str) -> None:
    """FedMoE-DA: the backbone is the FedAvg of the two valid replies alone."""
    strategy = _moe_strategy()

    def make(node: int, msg: Message) -> Message:
        reply = _moe_reply(msg, float(node), GATES[node], examples=10 * node)
        if node == 3:
            shared = record_to_numpy(reply.content.array_records["shared"])
            reply.content.array_records["shared"] = state_to_record(
                poisoned(shared, None, kind, 10.0)
            )
        return reply

    _moe_round(strategy, 1, make)
    # (1 * 10 + 2 * 20) / 30
    assert_allclose(strategy.shared["backbone.w"], np.full((2, 2), 50 / 30), rtol=1e-6)
    assert strategy.record.replies_rejected == 1
    assert strategy.pool.proxies.keys() == {1, 2}  # nothing of node 3 entered the pool


def test_local_dp_clips_with_flowers_mod_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's mod clips and noises each update, in a process without Flower's task identity
    (a simulated ClientApp has none: building a new message there raised, and every DP reply
    of a simulation failed until this was fixed)."""
    from flwr.clientapp.mod import LocalDpMod
    from flwr.supercore.task_identity import TaskIdentity

    received = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    for name in ("_run_id", "_node_id", "_task_id"):  # as in a simulated ClientApp
        monkeypatch.setattr(TaskIdentity, name, None)
    with pytest.raises(RuntimeError, match="not set"):
        Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)

    def local_dp(mod: LocalDpMod, reference: ArrayRecord, trained: ArrayRecord) -> ArrayRecord:
        return privacy_local_dp(mod, reference, trained, received)

    reference = state_to_record({"w": np.zeros((2,), np.float32)})
    trained = state_to_record({"w": np.array([3.0, 4.0], np.float32)})  # update norm 5
    no_noise = LocalDpMod(clipping_norm=1.0, sensitivity=0.0, epsilon=1.0, delta=1e-5)
    out = record_to_numpy(local_dp(no_noise, reference, trained))
    assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)  # clipped to norm 1, no noise
    noisy = LocalDpMod(clipping_norm=1.0, sensitivity=1.0, epsilon=1.0, delta=1e-5)
    np.random.seed(0)
    start = state_to_record({"w": np.zeros((20_000,), np.float32)})
    step = state_to_record({"w": np.full((20_000,), 1e-3, np.float32)})  # norm 0.14 < 1
    std = math.sqrt(2 * math.log(1.25 / 1e-5))  # 4.84
    values = record_to_numpy(local_dp(noisy, start, step))["w"]
    assert values.std() == pytest.approx(std, rel=0.03) and values.mean() == pytest.approx(
        0, abs=0.1
    )
    # A zero update (a slot without examples): Flower's clip would divide by 0; noise only.
    values = record_to_numpy(local_dp(noisy, start, start))["w"]
    assert values.std() == pytest.approx(std, rel=0.03)


def test_the_noise_std_is_named_by_hand() -> None:
    cfg = load_config("privacy.local_dp=true privacy.sensitivity=0.5 privacy.epsilon=2")
    assert cfg.privacy.noise_std() == pytest.approx(0.5 * math.sqrt(2 * math.log(1.25e5)) / 2)


def test_a_client_that_stops_replying_leaves_the_pool_after_pool_max_age_rounds() -> None:
    """Node 3 replies in round 1 only: its experts stay in the pool (and in the others' plans)
    through round 1 + 2 = 3, are gone after round 4, and come back with its next reply."""
    strategy = _moe_strategy(pool_max_age=2)

    def train(server_round: int, repliers: tuple[int, ...]) -> dict[int, Message]:
        grid = FakeGrid([1, 2, 3])
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(server_round, None, ConfigRecord(), grid)  # type: ignore[arg-type]
        }
        replies = [_moe_reply(sent[n], 0.0, GATES[n], server_round=server_round) for n in repliers]
        strategy.aggregate_train(server_round, replies)
        return sent

    def planned_owners(message: Message) -> set[str]:
        plans = FedMoEInstruction.from_record(message.content).plans
        return {src.expert_id.split("/")[0] for sources in plans.values() for src in sources}

    train(1, (1, 2, 3))
    for server_round in (2, 3):
        train(server_round, (1, 2))
        assert strategy.pool.proxies.keys() == {1, 2, 3}
        assert strategy.record.pool == {"clients": 3, "dropped": []}
    train(4, (1, 2))  # 4 - 1 = 3 rounds silent > 2
    assert strategy.pool.proxies.keys() == strategy.pool.addresses.keys() == {1, 2}
    assert strategy.record.pool == {"clients": 2, "dropped": [3]}
    assert strategy.matrix is not None and strategy.matrix.shape == (4, 4)  # 2 clients x K = 2
    sent = train(5, (1, 2, 3))
    assert all("3" not in planned_owners(sent[n]) for n in (1, 2))
    assert strategy.pool.proxies.keys() == {1, 2, 3}  # back with its reply


def test_a_failed_reply_is_recorded_with_what_its_error_said() -> None:
    """A ClientApp that raised: counted, its reason in the round's record (the last 500
    characters: a traceback ends with the exception), and the round aggregated from the rest."""
    strategy = paper_fltac(num_clusters=1, seed=0)
    long_reason = "Traceback ... " + "x" * 600 + " ValueError('partition 3 holds no examples')"

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[1], [_adapter(1, 0)]),
            _reply(messages[2], [_adapter(3, 0)]),
            Message(Error(code=1, reason="RuntimeError('boom')"), reply_to=messages[3]),
            Message(Error(code=1, reason=long_reason), reply_to=messages[4]),
        ]

    _round(strategy, 1, FakeGrid([1, 2, 3, 4]), replies)
    assert strategy.record.replies_ok == 2 and strategy.record.replies_failed == 2
    first, second = strategy.record.failed_reasons or []
    assert first == "RuntimeError('boom')"
    assert second == "..." + long_reason[-500:] and second.endswith("holds no examples')")
    (gid,) = strategy.final_adapters()
    assert_array_equal(strategy.globals[gid][A], np.array([[2.0, 0.0]], np.float32))  # (1+3)/2


DROP_OPPOSED = RobustAggregation(drop_opposed_updates=True)


def test_a_reversed_adapter_is_left_out_of_its_cluster_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FL-TAC, one cluster, updates against V0 = 0: (2, 1), (4, 1), (3, 2) and node 4's
    reversed (-3, -1). Median update per coordinate (x: -3, 2, 3, 4 -> 2.5; y: -1, 1, 1, 2
    -> 1) is (2.5, 1); only node 4's cosine is negative, so the cluster's mean is that of the
    three others: A = ((2 + 4 + 3) / 3, (1 + 1 + 2) / 3) = (3, 4/3)."""
    strategy = paper_fltac(num_clusters=1, seed=0, robust=DROP_OPPOSED)
    values = {1: (2.0, 1.0), 2: (4.0, 1.0), 3: (3.0, 2.0), 4: (-3.0, -1.0)}

    def replies(messages: dict[int, Message]) -> list[Message]:
        out = [_reply(messages[n], [_adapter(*values[n])]) for n in sorted(messages)]
        out[3].content.config_records[FAULT_RECORD] = ConfigRecord({"kind": "sign_flip"})
        return out

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, FakeGrid([1, 2, 3, 4]), replies)
    (gid,) = strategy.final_adapters()
    assert_allclose(strategy.globals[gid][A], np.array([[3.0, 4 / 3]], np.float32), rtol=1e-6)
    assert strategy.record.replies_ok == 4  # accepted, then left out of the aggregate
    assert strategy.record.updates_dropped == 1
    assert strategy.record.dropped_injected == 1  # the one dropped was the attacker's
    (reason,) = strategy.record.dropped_reasons or []
    assert "node 4 slot 0" in reason and "cosine -" in reason
    assert any(reason in r.getMessage() for r in caplog.records)
    # Node 4's slot still follows its cluster: it is sent the cleaned global next round.
    assert strategy.node_slots[strategy.client_of(4)] == [gid]


def test_with_node_scope_the_other_slots_of_that_node_are_left_out_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One cluster; nodes 1-3 send (2, 1), (4, 1), (3, 2); node 4 two slots: the reversed
    (-3, -1) and (5, 2). Median update (x: -3, 2, 3, 4, 5 -> 3; y: -1, 1, 1, 2, 2 -> 1) is
    (3, 1): only (-3, -1) opposes it. Update scope: A = (14 / 4, 6 / 4) = (3.5, 1.5); node
    scope also leaves out node 4's (5, 2): A = (9 / 3, 4 / 3) = (3, 4/3)."""
    values = {1: [(2.0, 1.0)], 2: [(4.0, 1.0)], 3: [(3.0, 2.0)], 4: [(-3.0, -1.0), (5.0, 2.0)]}

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [_reply(messages[n], [_adapter(*v) for v in values[n]]) for n in sorted(messages)]

    expected = {"update": (3.5, 1.5), "node": (3.0, 4 / 3)}
    for scope, mean in expected.items():
        robust = RobustAggregation(drop_opposed_updates=True, drop_opposed_scope=scope)
        strategy = paper_fltac(num_clusters=1, seed=0, robust=robust)
        with caplog.at_level(logging.WARNING):
            _round(strategy, 1, FakeGrid([1, 2, 3, 4]), replies)
        (gid,) = strategy.final_adapters()
        assert_allclose(strategy.globals[gid][A], np.array([mean], np.float32), rtol=1e-6)
        assert strategy.record.updates_dropped == {"update": 1, "node": 2}[scope]
    reasons = sorted(strategy.record.dropped_reasons or [])  # by node and slot
    assert reasons[0].startswith("node 4 slot 0") and "opposed to its cluster" in reasons[0]
    assert reasons[1] == (
        f"node 4 slot 1 (cluster {gid}): its node sent an opposed update (slot 0, cosine "
        f"{-10 / math.sqrt(10) / math.sqrt(10):.3f})"
    )
    assert any(reasons[1] in r.getMessage() for r in caplog.records)


def test_without_the_screen_the_reversed_adapter_is_averaged_in() -> None:
    strategy = paper_fltac(num_clusters=1, seed=0)
    values = {1: (2.0, 1.0), 2: (4.0, 1.0), 3: (3.0, 2.0), 4: (-3.0, -1.0)}
    _round(
        strategy,
        1,
        FakeGrid([1, 2, 3, 4]),
        lambda messages: [_reply(messages[n], [_adapter(*values[n])]) for n in sorted(messages)],
    )
    (gid,) = strategy.final_adapters()
    # (2 + 4 + 3 - 3) / 4 = 1.5, (1 + 1 + 2 - 1) / 4 = 0.75
    assert_allclose(strategy.globals[gid][A], np.array([[1.5, 0.75]], np.float32))
    assert strategy.record.updates_dropped is None and strategy.record.dropped_injected is None


def test_a_reversed_backbone_is_left_out_of_fedavg() -> None:
    """FedMoE-DA from a zero backbone: updates 1, 2, 3 (x 10 n examples) and node 4's -2.
    Median -2, 1, 2, 3 -> 1.5 > 0: node 4 (cosine -1) is left out, and the backbone is the
    FedAvg of the rest, (1 * 10 + 2 * 20 + 3 * 30) / 60 = 140 / 60."""
    strategy = _moe_strategy(robust=DROP_OPPOSED)
    strategy.shared = {"backbone.w": np.zeros((2, 2), np.float32)}
    gates = {**GATES, 4: GATES[1]}
    values = {1: 1.0, 2: 2.0, 3: 3.0, 4: -2.0}
    _moe_round(
        strategy,
        1,
        lambda n, m: _moe_reply(m, values[n], gates[n], examples=10 * n),
        nodes=(1, 2, 3, 4),
    )
    assert_allclose(strategy.shared["backbone.w"], np.full((2, 2), 140 / 60), rtol=1e-6)
    assert strategy.record.updates_dropped == 1
    (reason,) = strategy.record.dropped_reasons or []
    assert reason.startswith("node 4 (backbone)") and "cosine -1.000" in reason


def test_a_scaled_adapter_is_clipped_and_counted_with_its_norms(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FL-TAC, one cluster, updates against V0 = 0: (3, 4), (0, 4), (4, 0), (0, 5) and node
    5's scaled (30, 40), each in A and in W's diagonal (so every norm is sqrt(2) times that of
    (x, y)). Norms / sqrt(2): 5, 4, 4, 5, 50: median 5, |deviations| 0, 1, 1, 0, 45 -> MAD 1,
    Hampel bound sqrt(2) * (5 + 3 * 1.4826); only node 5's is cut, A to (0.6, 0.8) * 9.4478."""
    strategy = paper_fltac(
        num_clusters=1, seed=0, robust=RobustAggregation(clip_outlier_norms=True)
    )
    values = {1: (3.0, 4.0), 2: (0.0, 4.0), 3: (4.0, 0.0), 4: (0.0, 5.0), 5: (30.0, 40.0)}

    def replies(messages: dict[int, Message]) -> list[Message]:
        out = [_reply(messages[n], [_adapter(*values[n])]) for n in sorted(messages)]
        out[4].content.config_records[FAULT_RECORD] = ConfigRecord({"kind": "scale"})
        return out

    with caplog.at_level(logging.INFO):
        _round(strategy, 1, FakeGrid([1, 2, 3, 4, 5]), replies)
    bound = 5 + 3 * 1.4826
    (gid,) = strategy.final_adapters()
    expected = [(3 + 0 + 4 + 0 + 0.6 * bound) / 5, (4 + 4 + 0 + 5 + 0.8 * bound) / 5]
    assert_allclose(strategy.globals[gid][A], np.array([expected], np.float32), rtol=1e-5)
    assert strategy.record.updates_clipped == 1
    assert strategy.record.clipped_injected == 1
    (reason,) = strategy.record.clipped_reasons or []
    norms = (50 * math.sqrt(2), bound * math.sqrt(2))
    assert reason == f"node 5 slot 0 (cluster {gid}): norm {norms[0]:.4g} -> {norms[1]:.4g}"
    assert any(reason in r.getMessage() for r in caplog.records)
    assert strategy.record.updates_dropped is None  # clipped, not left out


def test_a_scaled_adapter_is_clipped_to_the_norm_its_steps_make_plausible() -> None:
    """FL-TAC, one cluster, updates against V0 = 0 in A and W's diagonal (norms sqrt(2) |(x, y)|):
    (sqrt 2, 0), (sqrt 2, 0), (2, 0), (2, 0), (4, 0) from 8, 8, 32, 32, 128 examples (2, 2, 4, 4,
    16 steps at batch 16, 2 epochs: norms sqrt(2 steps)), node 6's scaled (0, 20) from 32. The
    Theil-Sen fit of log norm on log steps is slope 0.5 (tests/test_robust.py works it out), so
    each bound is sqrt(2 steps): only node 6 is cut, to A = (0, 2); the data-rich node 5, twice
    the median norm, keeps its update (Hampel's bound on the plain norms would be 4.6)."""
    from test_robust import TRAIN

    robust = RobustAggregation(clip_outlier_norms_for_steps=True, train=TRAIN)
    strategy = paper_fltac(num_clusters=1, seed=0, robust=robust)
    root2 = math.sqrt(2)
    values = {1: (root2, 0.0), 2: (root2, 0.0), 3: (2.0, 0.0), 4: (2.0, 0.0), 5: (4.0, 0.0)}
    values[6] = (0.0, 20.0)
    examples = {1: 8, 2: 8, 3: 32, 4: 32, 5: 128, 6: 32}

    def replies(messages: dict[int, Message]) -> list[Message]:
        return [
            _reply(messages[n], [_adapter(*values[n])], examples=[examples[n]])
            for n in sorted(messages)
        ]

    _round(strategy, 1, FakeGrid([1, 2, 3, 4, 5, 6]), replies)
    (gid,) = strategy.final_adapters()
    expected = [(2 * root2 + 2 + 2 + 4) / 6, 2.0 / 6]
    assert_allclose(strategy.globals[gid][A], np.array([expected], np.float32), rtol=1e-5)
    assert strategy.record.updates_clipped == 1
    (reason,) = strategy.record.clipped_reasons or []
    assert reason == f"node 6 slot 0 (cluster {gid}): norm {20 * root2:.4g} -> {2 * root2:.4g}"


def test_a_scaled_backbone_is_clipped_to_the_median_norm_and_counted() -> None:
    """FedMoE-DA from a zero backbone (2 x 2): updates 1, 2, 3 and node 4's 30 in every entry,
    norms 2, 4, 6, 60: median 5; nodes 3 and 4 cut to entries 2.5. FedAvg with 10 n examples:
    (1 * 10 + 2 * 20 + 2.5 * 30 + 2.5 * 40) / 100 = 2.25."""
    strategy = _moe_strategy(robust=RobustAggregation(clip_to_median_norm=True))
    strategy.shared = {"backbone.w": np.zeros((2, 2), np.float32)}
    gates = {**GATES, 4: GATES[1]}
    values = {1: 1.0, 2: 2.0, 3: 3.0, 4: 30.0}
    _moe_round(
        strategy,
        1,
        lambda n, m: _moe_reply(m, values[n], gates[n], examples=10 * n),
        nodes=(1, 2, 3, 4),
    )
    assert_allclose(strategy.shared["backbone.w"], np.full((2, 2), 2.25), rtol=1e-6)
    assert strategy.record.updates_clipped == 2
    assert strategy.record.clipped_reasons == [
        "node 3 (backbone): norm 6 -> 5",
        "node 4 (backbone): norm 60 -> 5",
    ]


def test_a_scaled_backbone_is_clipped_to_the_norm_its_steps_make_plausible() -> None:
    """FedMoE-DA from a zero backbone (2 x 2, norm 2 |v| for v in every entry): v = sqrt(2)/2,
    sqrt(2)/2, 1, 2 from 8, 8, 32, 128 examples (2, 2, 4, 16 steps: norms sqrt(steps)) and node
    5's 10 from 32 examples (norm 20). Siegel's slope 0.5 (each point's median slope: 0.5 for
    the honest ones, 3.82 for node 5), residuals 0 and ln 10, MAD 0: bounds sqrt(steps), node 5
    cut to v = 1. FedAvg: (8 sqrt(2)/2 * 2 + 32 + 128 * 2 + 32) / 208."""
    from test_robust import TRAIN

    robust = RobustAggregation(clip_outlier_norms_for_steps=True, train=TRAIN)
    strategy = _moe_strategy(robust=robust)
    strategy.shared = {"backbone.w": np.zeros((2, 2), np.float32)}
    gates = {**GATES, 4: GATES[1], 5: GATES[2]}
    half_root2 = math.sqrt(2) / 2
    values = {1: half_root2, 2: half_root2, 3: 1.0, 4: 2.0, 5: 10.0}
    examples = {1: 8, 2: 8, 3: 32, 4: 128, 5: 32}
    _moe_round(
        strategy,
        1,
        lambda n, m: _moe_reply(m, values[n], gates[n], examples=examples[n]),
        nodes=(1, 2, 3, 4, 5),
    )
    expected = (16 * half_root2 + 32 + 256 + 32) / 208
    assert_allclose(strategy.shared["backbone.w"], np.full((2, 2), expected), rtol=1e-6)
    assert strategy.record.updates_clipped == 1
    assert strategy.record.clipped_reasons == ["node 5 (backbone): norm 20 -> 2"]


def test_without_clipping_nothing_is_counted() -> None:
    strategy = paper_fltac(num_clusters=1, seed=0)
    _round(
        strategy,
        1,
        FakeGrid([1, 2, 3]),
        lambda messages: [_reply(messages[n], [_adapter(float(n), 0.0)]) for n in sorted(messages)],
    )
    assert strategy.record.updates_clipped is None and strategy.record.clipped_reasons is None


def test_absent_clients_are_never_sampled_and_match_a_crash_runs_draw() -> None:
    """``faults.kind=absent``: the server leaves out exactly the clients the fault mod would
    make crash in that round (the same draw), so a crash run has a clean twin."""
    draw = absent_clients(load_config(["faults.kind=absent", "faults.fraction=0.3"]))
    assert draw == FaultDraw(seed=0, fraction=0.3, num_clients=10)
    assert absent_clients(load_config(["faults.kind=crash", "faults.fraction=0.3"])) is None
    nodes = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110]  # client id = node - 101
    strategy = paper_fltac(num_clusters=1, absent_clients=draw)
    strategy.client_ids = {node: node - 101 for node in nodes}
    for server_round in (1, 2, 3):
        messages = strategy.configure_train(server_round, None, ConfigRecord(), FakeGrid(nodes))  # type: ignore[arg-type]
        sent = {m.metadata.dst_node_id - 101 for m in messages}
        assert sent == set(range(10)) - faulty_clients(0, server_round, 10, 0.3)
        assert len(sent) == 7 and strategy.record.clients_absent == 3
