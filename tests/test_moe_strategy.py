"""DomainAwareMoEAggregation and the MoE baselines, driven with hand-made messages."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
from conftest import FakeGrid, as_received
from flwr.app import ConfigRecord, Error, Message
from numpy.testing import assert_allclose

from fedspecialists.peer.exchange import verify_grant
from fedspecialists.protocol.fedmoe_da import Instruction, TrainReply
from fedspecialists.protocol.records import record_to_numpy, state_to_record
from strategies.baselines import FedAvgMoE, LocalMoE
from strategies.fedmoe_da import DomainAwareMoEAggregation, same_domain_share

BACKBONE = {"backbone.w": np.zeros((2, 2), np.float32)}
K = 2


def _hash(node: int, k: int, r: int = 1) -> str:
    return f"{node:02x}{k:02x}{r:02x}".ljust(64, "a")


def _reply(
    msg: Message,
    backbone: float,
    gates: np.ndarray,
    examples: int = 10,
    server_round: int = 1,
    hashes: list[str] | None = None,
) -> Message:
    node = msg.metadata.dst_node_id
    reply = TrainReply(
        num_examples=examples,
        train_loss=1.0,
        aux_loss=0.0,
        peer_bytes=100,
        peer_fetches=1,
        peer_failures=0,
        shared=state_to_record({"backbone.w": np.full((2, 2), backbone, np.float32)}),
        proxies=state_to_record({"gate": gates.astype(np.float32)}),
        hashes=hashes or [_hash(node, k, server_round) for k in range(K)],
        address=f"/stores/node-{node}",
    )
    return Message(reply.to_record(), reply_to=msg)


GATES = {
    1: np.array([[1.0, 0.0], [0.0, 1.0]]),
    2: np.array([[1.0, 0.1], [0.0, 1.0]]),
    3: np.array([[0.0, 1.0], [1.0, 0.0]]),
}

# The matrix A these gates give with P = 1, tau = 0.5, worked out by hand (Eq. 8-10 as
# strategies/fedmoe_da.py reads them; docs/methods.md).
#
# Pool order (clients sorted, then experts): 1/0, 1/1, 2/0, 2/1, 3/0, 3/1, with proxies
#   e0 = (1, 0), e1 = (0, 1), e2 = (1, 0.1), e3 = (0, 1), e4 = (0, 1), e5 = (1, 0).
# Eq. 8, r_ij = cos(pi_i, pi_j). |e2| = sqrt(1.01), so with C = 1/sqrt(1.01) ~ 0.99504 and
# S = 0.1/sqrt(1.01) ~ 0.09950: cos((1,0), e2) = C, cos((0,1), e2) = S, cos((1,0), (0,1)) = 0.
#        e0  e1  e2  e3  e4  e5
#   e0 [ 1,  0,  C,  0,  0,  1 ]
#   e1 [ 0,  1,  S,  1,  1,  0 ]
#   e2 [ C,  S,  1,  S,  S,  C ]
#   e3 [ 0,  1,  S,  1,  1,  0 ]     (= row e1)
#   e4 [ 0,  1,  S,  1,  1,  0 ]     (= row e1)
#   e5 [ 1,  0,  C,  0,  0,  1 ]     (= row e0)
# Eq. 9, P = 1: row i keeps every entry >= the row's (P+1)-th = 2nd largest value, the diagonal
# included in that ranking, ties all kept:
#   e0, e5: sorted 1, 1, C, ... -> threshold 1 -> keep e0 and e5 (2/0's C < 1 is NOT kept).
#   e1, e3, e4: sorted 1, 1, 1, S, ... -> threshold 1 -> keep e1, e3, e4 (a three-way tie).
#   e2: sorted 1, C, C, S, ... -> threshold C -> keep e0, e2, e5 (C twice: a tie).
# Eq. 10, a_ij = exp(r_ij / tau) / sum over kept l of exp(r_il / tau), tau = 0.5:
#   e0, e5: exp(2) each -> 1/2, 1/2.  e1, e3, e4: exp(2) each -> 1/3 each.
#   e2: itself exp(2 * 1) = exp(2), e0 and e5 exp(2C) each; D = exp(2) + 2 exp(2C):
#       a_22 = exp(2) / D ~ 0.335543, a_20 = a_25 = exp(2C) / D ~ 0.332229.
_C = 1 / math.sqrt(1.01)
_D = math.exp(2.0) + 2 * math.exp(2 * _C)
_SELF, _PEER = math.exp(2.0) / _D, math.exp(2 * _C) / _D
H, T = 1 / 2, 1 / 3
EXPECTED_A = np.array(
    [
        [H, 0, 0, 0, 0, H],
        [0, T, 0, T, T, 0],
        [_PEER, 0, _SELF, 0, 0, _PEER],
        [0, T, 0, T, T, 0],
        [0, T, 0, T, T, 0],
        [H, 0, 0, 0, 0, H],
    ]
)


def _round(
    strategy: DomainAwareMoEAggregation,
    server_round: int,
    make: Callable[[int, Message], Message],
    nodes: tuple[int, ...] = (1, 2, 3),
) -> dict[int, Message]:
    grid = FakeGrid(list(nodes))
    sent = strategy.configure_train(server_round, None, ConfigRecord(), grid)  # type: ignore[arg-type]
    messages = {m.metadata.dst_node_id: m for m in as_received(sent)}
    strategy.aggregate_train(server_round, [make(n, m) for n, m in messages.items()])
    return messages


def _strategy(**kwargs: object) -> DomainAwareMoEAggregation:
    """The strategy with experts matched at any index (Eq. 9 as the re-implementations read
    it), which the hand-worked matrices below assume; ``same_index=True`` to bar other indices."""
    kwargs.setdefault("same_index", False)
    return DomainAwareMoEAggregation(
        BACKBONE,
        ["backbone"],
        num_experts=K,
        num_peers=1,
        tau=0.5,
        **kwargs,  # type: ignore[arg-type]
    )


def test_backbone_is_fedavg_weighted_by_examples() -> None:
    strategy = _strategy()
    _round(strategy, 1, lambda n, m: _reply(m, float(n), GATES[n], examples=10 * n))
    # (1*10 + 2*20 + 3*30) / 60 = 140 / 60
    assert_allclose(strategy.shared["backbone.w"], np.full((2, 2), 140 / 60), rtol=1e-6)


def test_aggregation_matrix_and_per_node_sync_plans() -> None:
    strategy = _strategy(peer_root="/stores")
    _round(strategy, 1, lambda n, m: _reply(m, 0.0, GATES[n]))
    assert strategy.matrix is not None
    # The proxies travel as float32 (0.1 -> 0.10000000149): agreement to ~1e-9, not 1e-16.
    assert_allclose(strategy.matrix.toarray(), EXPECTED_A, rtol=1e-8, atol=1e-12)
    assert_allclose(EXPECTED_A[2], [0.332229, 0, 0.335543, 0, 0, 0.332229], atol=1e-6)
    assert strategy.matrix_ids == ["1/0", "1/1", "2/0", "2/1", "3/0", "3/1"]

    messages = _round(strategy, 2, lambda n, m: _reply(m, 0.0, GATES[n], server_round=2))
    instruction = Instruction.from_record(messages[1].content)
    sources = instruction.plans[0]
    ids = [s.expert_id for s in sources]
    # Row of expert 1/0 (e0): P = 1 keeps itself and 3/1 (cos 1, the row's 2nd largest value);
    # 2/0 (cos C ~ .995) falls below that threshold. Weights exp(2) / (2 exp(2)) = 1/2 each.
    assert ids == ["1/0", "3/1"]
    assert_allclose([s.weight for s in sources], [0.5, 0.5], rtol=1e-12)
    assert [s.sha256 for s in sources] == [
        _hash(int(i.split("/")[0]), int(i.split("/")[1]), 1) for i in ids
    ]
    assert sources[1].address.startswith("/stores/node-")
    assert instruction.peer_root == "/stores"
    # A signed grant for this node and this round, verifiable with the key sent alongside.
    claims = verify_grant(instruction.grant, str(instruction.grant_key), node_id=1)
    assert claims["round"] == 2


def test_no_expert_tensor_goes_through_the_server() -> None:
    strategy = _strategy()
    _round(strategy, 1, lambda n, m: _reply(m, 0.0, GATES[n]))
    messages = _round(strategy, 2, lambda n, m: _reply(m, 0.0, GATES[n]))
    for message in messages.values():
        arrays = {k: record_to_numpy(v) for k, v in message.content.array_records.items()}
        assert list(arrays) == ["shared"]
        assert list(arrays["shared"]) == ["backbone.w"]
    assert strategy.record.peer_bytes == {"round": 300, "cumulative": 600}


def test_matrix_reused_between_recomputes_when_interval_is_two() -> None:
    strategy = _strategy(interval=2)
    _round(strategy, 1, lambda n, m: _reply(m, 0.0, GATES[n]))
    first = strategy.matrix.toarray()  # type: ignore[union-attr]
    swapped = {n: g[::-1] for n, g in GATES.items()}
    swapped[1] = np.array([[0.0, 1.0], [0.3, 0.7]])
    _round(strategy, 2, lambda n, m: _reply(m, 0.0, swapped[n], server_round=2))
    assert_allclose(strategy.matrix.toarray(), first)  # type: ignore[union-attr]  # round 2: reused (I = 2)
    assert strategy.record.aggregation_recomputed is False
    _round(strategy, 3, lambda n, m: _reply(m, 0.0, swapped[n], server_round=3))
    assert not np.allclose(strategy.matrix.toarray(), first)  # type: ignore[union-attr]  # round 3: recomputed
    # Plans use the latest hashes even while A is reused.
    assert strategy.pool.hashes[1] == [_hash(1, k, 3) for k in range(K)]


def test_bad_replies_are_rejected_and_failures_skipped(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy()

    def make(node: int, msg: Message) -> Message:
        if node == 1:
            return _reply(msg, float("nan"), GATES[node])  # poisoned backbone
        if node == 2:
            return _reply(msg, 0.0, GATES[node], hashes=["not-a-hash", "x"])
        return Message(Error(code=0, reason="client crashed"), reply_to=msg)

    with caplog.at_level(logging.WARNING):
        _round(strategy, 1, make)
    assert strategy.record.replies_rejected == 2
    assert strategy.record.replies_failed == 1
    assert strategy.record.aggregated is False
    assert (
        "non-finite" in caplog.text and "SHA-256" in caplog.text and "client crashed" in caplog.text
    )
    assert_allclose(strategy.shared["backbone.w"], 0.0)  # nothing entered aggregation
    assert strategy.matrix is None


def test_wrong_proxy_shape_is_rejected() -> None:
    strategy = _strategy()
    _round(strategy, 1, lambda n, m: _reply(m, 1.0, GATES[n] if n != 3 else np.ones((3, 2))))
    assert strategy.record.replies_rejected == 1
    assert strategy.matrix_ids == ["1/0", "1/1", "2/0", "2/1"]


def test_p_zero_sends_no_plan_and_baselines_share_what_they_say() -> None:
    p0 = DomainAwareMoEAggregation(BACKBONE, ["backbone"], num_experts=K, num_peers=0)
    assert not p0.exchange
    msg = next(iter(p0.configure_train(1, None, ConfigRecord(), FakeGrid([1]))))  # type: ignore[arg-type]
    instruction = Instruction.from_record(msg.content)
    assert instruction.exchange is False and not instruction.plans

    local = LocalMoE({}, [], num_experts=K)
    msg = next(iter(local.configure_train(1, None, ConfigRecord(), FakeGrid([1]))))  # type: ignore[arg-type]
    assert not msg.content.array_records  # local only: the server sends no parameters

    everything = {**BACKBONE, "gate.weight": np.zeros((K, 2), np.float32)}
    fedavg = FedAvgMoE(everything, ["backbone", "gate", "experts"], num_experts=K)
    msg = as_received(fedavg.configure_train(1, None, ConfigRecord(), FakeGrid([1])))[0]  # type: ignore[arg-type]
    assert set(record_to_numpy(msg.content.array_records["shared"])) == set(everything)


def test_mix_every_two_rounds_sends_plans_in_rounds_2_and_4_only() -> None:
    strategy = _strategy(mix_every=2)
    planned = []
    for r in range(1, 6):
        messages = _round(strategy, r, lambda n, m, r=r: _reply(m, 0.0, GATES[n], server_round=r))  # type: ignore[misc]
        instruction = Instruction.from_record(messages[1].content)
        planned.append(bool(instruction.plans))
        assert instruction.grant is not None  # the owners still learn the round's key
    assert planned == [False, True, False, True, False]


def test_self_weight_and_no_siblings_shape_the_matrix() -> None:
    strategy = _strategy(self_weight=0.5, mix_within_client=False)
    _round(strategy, 1, lambda n, m: _reply(m, 0.0, GATES[n]))
    # Siblings out: each row's entry for its own client's other expert becomes -inf before the
    # ranking. No row above kept a sibling (e0 keeps e0, e5; e1 keeps e1, e3, e4; e2 keeps e0,
    # e2, e5; e3 keeps e1, e3, e4: its sibling e2 has only S; e4 keeps e1, e3, e4; e5 keeps e0,
    # e5), so A is EXPECTED_A again, and s = 0.5 gives A' = 0.5 I + 0.5 A:
    assert strategy.matrix is not None
    matrix = strategy.matrix.toarray()
    expected = np.array(
        [
            [3 / 4, 0, 0, 0, 0, 1 / 4],
            [0, 2 / 3, 0, 1 / 6, 1 / 6, 0],
            [_PEER / 2, 0, 1 / 2 + _SELF / 2, 0, 0, _PEER / 2],
            [0, 1 / 6, 0, 2 / 3, 1 / 6, 0],
            [0, 1 / 6, 0, 1 / 6, 2 / 3, 0],
            [1 / 4, 0, 0, 0, 0, 3 / 4],
        ]
    )
    assert_allclose(matrix, expected, rtol=1e-8, atol=1e-12)  # float32 proxies, as above
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4)):
        assert matrix[i, j] == 0.0  # never its own client's other expert
    assert np.all(np.diag(matrix) >= 0.5)


@pytest.mark.parametrize("within", [True, False])
def test_no_siblings_changes_the_rows_where_a_sibling_ranks_high(within: bool) -> None:
    # Client 1's two experts are the same vector, so each is the other's best match.
    twins = {
        1: np.array([[1.0, 0.0], [1.0, 0.0]]),
        2: np.array([[0.0, 1.0], [0.0, 1.0]]),
        3: np.array([[1.0, 0.0], [0.0, 1.0]]),
    }
    strategy = _strategy(mix_within_client=within)
    _round(strategy, 1, lambda n, m: _reply(m, 0.0, twins[n]))
    # e0 = e1 = e4 = (1, 0) and e2 = e3 = e5 = (0, 1): every r_ij is 1 or 0. P = 1 keeps the
    # entries equal to the row's 2nd largest, i.e. every r = 1 entry, each with the same
    # exp(1 / 0.5) weight. Siblings allowed: rows of (1, 0) experts keep {e0, e1, e4} and
    # rows of (0, 1) experts keep {e2, e3, e5}: 1/3 each. Siblings out (-inf first): e0 and e1
    # keep themselves and e4 (1/2 each), e2 and e3 themselves and e5; e4 (client 3) still
    # keeps e0, e1 (1/3 each), e5 still keeps e2, e3.
    t, h = 1 / 3, 1 / 2
    expected = (
        [
            [t, t, 0, 0, t, 0],
            [t, t, 0, 0, t, 0],
            [0, 0, t, t, 0, t],
            [0, 0, t, t, 0, t],
            [t, t, 0, 0, t, 0],
            [0, 0, t, t, 0, t],
        ]
        if within
        else [
            [h, 0, 0, 0, h, 0],
            [0, h, 0, 0, h, 0],
            [0, 0, h, 0, 0, h],
            [0, 0, 0, h, 0, h],
            [t, t, 0, 0, t, 0],
            [0, 0, t, t, 0, t],
        ]
    )
    assert strategy.matrix is not None
    assert_allclose(strategy.matrix.toarray(), np.array(expected), rtol=1e-12, atol=1e-12)


def test_same_index_matches_each_expert_only_at_its_index() -> None:
    twins = {
        1: np.array([[1.0, 0.0], [1.0, 0.0]]),
        2: np.array([[0.0, 1.0], [0.0, 1.0]]),
        3: np.array([[1.0, 0.0], [0.0, 1.0]]),
    }
    strategy = _strategy(same_index=True)
    _round(strategy, 1, lambda n, m: _reply(m, 0.0, twins[n]))
    # Index 0 holds e0 = (1, 0), e2 = (0, 1), e4 = (1, 0); index 1 holds e1 = (1, 0),
    # e3 = (0, 1), e5 = (0, 1). P = 1, tau = 0.5. e0 keeps e4 (r = 1): 1/2 each; e2's two
    # candidates tie at r = 0, both kept: e^2 / (e^2 + 2) for itself, 1 / (e^2 + 2) each;
    # likewise e1 with e3 and e5; e3 and e5 keep each other (r = 1).
    h, a, b = 0.5, math.e**2 / (math.e**2 + 2), 1 / (math.e**2 + 2)
    expected = [
        [h, 0, 0, 0, h, 0],
        [0, a, 0, b, 0, b],
        [b, 0, a, 0, b, 0],
        [0, 0, 0, h, 0, h],
        [h, 0, 0, 0, h, 0],
        [0, 0, 0, h, 0, h],
    ]
    assert strategy.matrix is not None
    assert_allclose(strategy.matrix.toarray(), np.array(expected), rtol=1e-12, atol=1e-12)
    assert strategy.describe()["same_index"] is True


def test_same_domain_share_of_the_matrix_is_recorded_from_reported_domains() -> None:
    strategy = _strategy(mix_within_client=False)
    domains = {1: [9, 1], 2: [8, 2], 3: [0, 5]}  # training examples per domain

    def reply(n: int, m: Message) -> Message:
        out = TrainReply.from_record(_reply(m, 0.0, GATES[n]).content)
        out.domain_examples = domains[n]
        return Message(out.to_record(), reply_to=m)

    _round(strategy, 1, reply)
    assert strategy.matrix is not None
    share, chance = same_domain_share(strategy.matrix, [1, 1, 2, 2, 3, 3], {1: 0, 2: 0, 3: 1})
    recorded = strategy.record.same_domain_peer_share
    assert recorded == {"share": share, "chance": chance}
    assert chance == pytest.approx((4 * 0.5 + 2 * 0.0) / 6)  # every expert takes from a peer
