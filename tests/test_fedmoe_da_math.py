"""FedMoE-DA's Eq. 8-11 against matrices computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from strategies.fedmoe_da import (
    aggregation_matrix,
    barred_pairs,
    correlation_matrix,
    declared_domain_proxies,
    keep_self,
    mix_experts,
    mix_round,
    recompute_round,
    renormalise,
    routed_means,
    same_domain_share,
    stale_clients,
    sync_plans,
    top_p_mask,
)

R = np.array(
    [
        [1.0, 0.8, 0.3, 0.8],
        [0.8, 1.0, 0.5, 0.1],
        [0.3, 0.5, 1.0, 0.2],
        [0.8, 0.1, 0.2, 1.0],
    ]
)


def test_eq8_cosine_of_gate_vectors() -> None:
    proxies = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0]])
    expected = np.array(
        [
            [1, 0, 1 / math.sqrt(2), 0],
            [0, 1, 1 / math.sqrt(2), 0],
            [1 / math.sqrt(2), 1 / math.sqrt(2), 1, 0],
            [0, 0, 0, 0],  # a zero gate vector is similar to nothing
        ]
    )
    assert_allclose(correlation_matrix(proxies), expected, atol=1e-12)


def test_eq9_top_p_mask_keeps_ties() -> None:
    # P = 1: row 0 sorted is 1, .8, .8, .3 -> threshold .8 -> keeps 0, 1 and 3 (tie kept).
    expected = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], float)
    assert_allclose(top_p_mask(R, 1), expected)


def test_eq9_p_zero_and_p_at_least_pool_size() -> None:
    assert_allclose(top_p_mask(R, 0), np.eye(4))
    assert_allclose(top_p_mask(R, 3), np.ones((4, 4)))
    assert_allclose(top_p_mask(R, 10), np.ones((4, 4)))
    with pytest.raises(ValueError):
        top_p_mask(R, -1)


def test_eq10_softmax_over_the_mask() -> None:
    a = aggregation_matrix(R, p=1, tau=1.0)
    # Row 1 keeps {0, 1}: e^.8 / (e^.8 + e^1) = 1 / (1 + e^.2) = 0.450166
    assert_allclose(a[1], [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(-0.2)), 0, 0], atol=1e-9)
    # Row 0 keeps {0, 1, 3}: (e, e^.8, 0, e^.8) / (e + 2 e^.8)
    z = math.e + 2 * math.exp(0.8)
    assert_allclose(a[0], [math.e / z, math.exp(0.8) / z, 0, math.exp(0.8) / z], atol=1e-9)
    assert_allclose(a.sum(axis=1), np.ones(4))


def test_eq10_temperature_limits() -> None:
    sharp = aggregation_matrix(R, p=1, tau=1e-3)
    assert_allclose(sharp, np.eye(4), atol=1e-9)  # all weight on the most similar: itself
    flat = aggregation_matrix(R, p=1, tau=1e6)
    assert_allclose(flat[0], [1 / 3, 1 / 3, 0, 1 / 3], atol=1e-6)  # uniform over the mask
    assert_allclose(aggregation_matrix(R, p=3, tau=1e6), np.full((4, 4), 0.25), atol=1e-6)
    assert_allclose(aggregation_matrix(R, p=0, tau=1.0), np.eye(4))
    with pytest.raises(ValueError):
        aggregation_matrix(R, p=1, tau=0.0)


def test_eq11_mixing_and_renormalisation() -> None:
    experts = [{"w": np.array([0.0, 4.0], np.float32)}, {"w": np.array([4.0, 0.0], np.float32)}]
    mixed = mix_experts([0.25, 0.75], experts)
    assert_allclose(mixed["w"], [3.0, 1.0])
    assert mixed["w"].dtype == np.float32
    # A missing or tampered peer drops out and the others are renormalised: .5/.7 and .2/.7.
    assert_allclose(renormalise([0.5, 0.3, 0.2], [True, False, True]), [5 / 7, 0, 2 / 7])
    with pytest.raises(ValueError):
        renormalise([0.5, 0.5], [False, False])


def test_recompute_every_i_rounds() -> None:
    assert [recompute_round(r, 1) for r in range(1, 4)] == [True, True, True]
    assert [recompute_round(r, 5) for r in range(1, 12)] == [
        True, False, False, False, False, True, False, False, False, False, True,
    ]  # fmt: skip


def test_sync_plans_name_sources_weights_and_hashes() -> None:
    a = aggregation_matrix(R, p=1, tau=1.0)
    ids = ["a/0", "a/1", "b/0", "b/1"]
    hashes = {e: f"h-{e}" for e in ids}
    plans = sync_plans(a, ids, owners=[1, 1, 2, 2], hashes=hashes)
    assert sorted(plans) == [1, 2]
    assert [src for src, _, _ in plans[1]["a/1"]] == ["a/0", "a/1"]
    assert [h for _, _, h in plans[2]["b/0"]] == ["h-a/1", "h-b/0"]
    assert sum(w for _, w, _ in plans[1]["a/0"]) == pytest.approx(1.0)


def test_keep_self_mixes_identity_into_a() -> None:
    a = np.array([[0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    # s = 0.5: a_ii -> 0.5 + 0.5 a_ii, off-diagonal halved
    assert_allclose(keep_self(a, 0.5), [[0.6, 0.4, 0.0], [0.25, 0.75, 0.0], [0.05, 0.05, 0.9]])
    assert_allclose(keep_self(a, 0.0), a)
    assert_allclose(keep_self(a, 1.0), np.eye(3))
    assert_allclose(keep_self(a, 0.3).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="self_weight"):
        keep_self(a, 1.5)


def test_mix_every_n_rounds_from_round_2() -> None:
    assert [mix_round(r, 1) for r in range(1, 5)] == [False, True, True, True]
    assert [mix_round(r, 3) for r in range(1, 9)] == [
        False, True, False, False, True, False, False, True,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        mix_round(2, 0)


def test_routed_means_weight_inputs_by_router_probability() -> None:
    h = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    p = np.array([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.25, 0.0, 0.0]])
    # expert 0: (0.5*[1,0] + 0.25*[0,2] + 0.25*[3,3]) / 1.0 = [1.25, 1.25]
    # expert 1: (0.5*[1,0] + 0.75*[0,2]) / 1.25 = [0.4, 1.2]; expert 2: nothing routed -> 0
    assert_allclose(routed_means(h, p), [[1.25, 1.25], [0.4, 1.2], [0.0, 0.0]])


def test_eq9_without_siblings_takes_p_from_other_clients() -> None:
    # experts 0, 1 of client 7; 2, 3 of client 8. Row 0 without its sibling 1 (0.8): 3 (0.8),
    # then 2 (0.3); row 2 without 3: 1 (0.5) and 0 (0.3).
    mask = top_p_mask(R, p=2, owners=[7, 7, 8, 8])
    assert_allclose(mask, [[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1]])
    # P beyond the other clients' experts keeps them all, still no sibling
    assert_allclose(top_p_mask(R, p=3, owners=[7, 7, 8, 8]), mask)
    a = aggregation_matrix(R, p=1, tau=1.0, owners=[7, 7, 8, 8])
    # row 0: itself (1.0) and expert 3 (0.8): e^1 / (e^1 + e^0.8)
    assert_allclose(
        a[0], [math.e / (math.e + math.e**0.8), 0, 0, math.e**0.8 / (math.e + math.e**0.8)]
    )


def test_barred_pairs_by_hand() -> None:
    # experts 0, 1 of client 7 and 2, 3 of client 8, at indices 0, 1, 0, 1
    owners, positions = [7, 7, 8, 8], [0, 1, 0, 1]
    rows = np.array([0, 3])
    assert not barred_pairs(rows, 4).any()
    assert barred_pairs(rows, 4, owners=owners).tolist() == [
        [False, True, False, False],  # its sibling 1
        [False, False, True, False],  # its sibling 2
    ]
    assert barred_pairs(rows, 4, positions=positions).tolist() == [
        [False, True, False, True],  # index 1
        [True, False, True, False],  # index 0
    ]
    both = barred_pairs(rows, 4, owners, positions)
    assert both.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_eq9_at_the_same_index_keeps_only_experts_at_that_index() -> None:
    # indices 0, 1, 0, 1: expert 0 may keep only 2 (0.3), expert 1 only 3 (0.1), whatever P
    positions = [0, 1, 0, 1]
    expected = [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    assert_allclose(top_p_mask(R, p=1, positions=positions), expected)
    assert_allclose(top_p_mask(R, p=3, positions=positions), expected)
    a = aggregation_matrix(R, p=1, tau=1.0, positions=positions)
    # row 0: itself (1.0) and expert 2 (0.3): e^1 / (e^1 + e^0.3); row 1: e^1 / (e^1 + e^0.1)
    assert_allclose(a[0], [0.6681877721681662, 0, 0.3318122278318338, 0])
    assert_allclose(a[1], [0, 0.7109495026250039, 0, 0.2890504973749960])


def test_declared_domain_proxies_by_hand() -> None:
    # counts (3, 1, 0) -> shares (0.75, 0.25, 0); K = 2: row k holds them in block k
    q = declared_domain_proxies([3, 1, 0], 2)
    assert_allclose(q, [[0.75, 0.25, 0, 0, 0, 0], [0, 0, 0, 0.75, 0.25, 0]])
    assert_allclose(declared_domain_proxies([0, 0, 0], 2), np.zeros((2, 6)))
    # the same mixture at twice the size: cosine 1 at the same index, 0 across indices
    r = correlation_matrix(np.vstack([q, declared_domain_proxies([6, 2, 0], 2)]))
    assert_allclose(r[0, 2], 1.0)
    assert_allclose(r[0, 3], 0.0)
    # (3, 1, 0) against (0, 1, 3): 0.25 * 0.25 / (0.625) = 0.1 (squared norms 0.625 each)
    other = declared_domain_proxies([0, 1, 3], 2)
    assert_allclose(correlation_matrix(np.vstack([q, other]))[1, 3], 0.1)


def test_same_domain_share_by_hand() -> None:
    # owners 1, 1, 2, 3; dominant domains 1 -> 0, 2 -> 0, 3 -> 1
    a = np.array(
        [
            [0.5, 0.1, 0.3, 0.1],  # peers 0.4, same domain 0.3: 0.75 (chance 1/2)
            [0.0, 1.0, 0.0, 0.0],  # takes nothing from other clients: not counted
            [0.2, 0.2, 0.4, 0.2],  # peers 0.6, same domain 0.4: 2/3 (chance 2/3)
            [0.1, 0.0, 0.1, 0.8],  # peers 0.2, none of domain 1: 0 (chance 0)
        ]
    )
    share, chance = same_domain_share(a, [1, 1, 2, 3], {1: 0, 2: 0, 3: 1})
    assert share == pytest.approx((0.75 + 2 / 3 + 0.0) / 3)
    assert chance == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    share, chance = same_domain_share(np.eye(4), [1, 1, 2, 3], {1: 0, 2: 0, 3: 1})
    assert np.isnan(share) and np.isnan(chance)


def test_stale_clients_by_hand() -> None:
    heard = {4: 1, 7: 3, 9: 5, 2: 2}  # client -> round of its last accepted reply
    # Closing round 5 with max_age 2: silent for 4 (client 4), 2 (7), 0 (9), 3 (2) rounds.
    assert stale_clients(heard, 5, 2) == [2, 4]
    assert stale_clients(heard, 5, 4) == []  # 4 rounds silent is still allowed
    assert stale_clients({}, 5, 1) == []
