"""The server maths at scale, against their reference definitions on fixed inputs.

FL-TAC's constrained assignment (every owner's adapters solved together, distances without an
``(M, k, D)`` array) against the per-owner Hungarian assignment it replaces; FedMoE-DA's sparse,
blockwise A against Eq. 8-10 and keep_self computed densely; the record, checkpoint and sync
plans that read the sparse A.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from strategies.fedmoe_da import (
    DENSE_RECORD_LIMIT,
    _restored_matrix,
    aggregation_matrix,
    aggregation_record,
    correlation_matrix,
    keep_self,
    same_domain_share,
    sparse_aggregation_matrix,
    sync_plans,
)
from strategies.fltac import (
    PoolEntry,
    TaskAdapterClustering,
    constrained_assignment,
    constrained_kmeans_labels,
    hungarian_assignment,
    random_projection,
    squared_distances,
)


def reference_assignment(
    features: np.ndarray, centroids: np.ndarray, groups: list[np.ndarray]
) -> np.ndarray:
    """The definition: squared distances summed over an (M, k, D) array, then each owner's
    rows to distinct clusters by a Hungarian assignment (nearest when it has more rows)."""
    cost = ((features[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return hungarian_assignment(cost, groups)


@pytest.mark.parametrize(("owners", "k", "d"), [(200, 4, 16), (60, 6, 8), (40, 3, 5), (9, 9, 4)])
def test_the_fast_assignment_equals_the_hungarian_one(owners: int, k: int, d: int) -> None:
    rng = np.random.default_rng(owners + k)
    sizes = rng.integers(1, k + 2, size=owners)  # some owners hold more rows than clusters
    owner_of = np.repeat(np.arange(owners), sizes)
    features = rng.normal(size=(len(owner_of), d))
    centroids = rng.normal(size=(k, d))
    groups = [np.flatnonzero(owner_of == o) for o in range(owners)]
    fast = constrained_assignment(features, centroids, groups)
    assert np.array_equal(fast, reference_assignment(features, centroids, groups))
    for rows in groups:  # and the cannot-link holds wherever it can
        if len(rows) <= k:
            assert len(set(fast[rows].tolist())) == len(rows)


def test_a_large_owner_falls_back_to_the_hungarian_assignment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import strategies.fltac as fltac

    monkeypatch.setattr(fltac, "_injective_maps", lambda k, r, limit=0: None)
    rng = np.random.default_rng(3)
    features, centroids = rng.normal(size=(12, 3)), rng.normal(size=(4, 3))
    groups = [np.arange(0, 4), np.arange(4, 7), np.arange(7, 12)]
    expected = reference_assignment(features, centroids, groups)
    assert np.array_equal(constrained_assignment(features, centroids, groups), expected)


def test_squared_distances_by_hand() -> None:
    features = np.array([[0.0, 0.0], [3.0, 4.0]])
    centroids = np.array([[0.0, 0.0], [3.0, 0.0]])
    assert_allclose(squared_distances(features, centroids), [[0.0, 9.0], [25.0, 16.0]])


def test_constrained_kmeans_recovers_separated_tasks_at_a_thousand_owners() -> None:
    # 1,000 owners, each with one adapter of each of 4 tasks whose centres are far apart.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 5
    owners = np.repeat(np.arange(1000), 4)
    tasks = np.tile(np.arange(4), 1000)
    features = centres[tasks] + rng.normal(size=(4000, 32))
    labels = constrained_kmeans_labels(features, owners.tolist(), 4, seed=0, n_init=2)
    # The same partition as the tasks (labels are a permutation of them).
    pairs = set(zip(labels.tolist(), tasks.tolist(), strict=True))
    assert len(pairs) == 4


CASES = [  # (M, d, P, tau, self weight, by owner)
    (40, 8, 5, 1.0, 0.2, True),
    (37, 4, 2, 0.5, 0.0, False),
    (30, 3, 0, 1.0, 0.5, True),
    (25, 3, 40, 2.0, 0.1, True),
    (64, 6, 3, 0.3, 1.0, False),
]


@pytest.mark.parametrize(("m", "d", "p", "tau", "s", "by_owner"), CASES)
def test_the_sparse_matrix_equals_eq_8_to_10_and_keep_self(
    m: int, d: int, p: int, tau: float, s: float, by_owner: bool
) -> None:
    rng = np.random.default_rng(m)
    proxies = rng.normal(size=(m, d))
    proxies[3] = 0.0  # a silent expert: similarity 0 with everything
    owners = (np.arange(m) // 4).tolist() if by_owner else None
    positions = (np.arange(m) % 4).tolist() if p % 2 else None  # some cases, alone too
    r = correlation_matrix(proxies)
    dense = keep_self(aggregation_matrix(r, p, tau, owners=owners, positions=positions), s)
    for block in (1, 7, 1024):  # however the rows are cut
        a = sparse_aggregation_matrix(
            proxies, p, tau, s, owners=owners, block=block, positions=positions
        )
        assert_allclose(a.toarray(), dense, rtol=0, atol=1e-15)
        assert ((a.toarray() > 0) == (dense > 0)).all()
        assert_allclose(np.asarray(a.sum(axis=1)).ravel(), 1.0)


def test_ties_at_the_threshold_are_all_kept_as_in_the_dense_mask() -> None:
    proxies = np.ones((10, 3))  # every pair ties: every entry is kept
    a = sparse_aggregation_matrix(proxies, 2, 1.0, 0.0)
    assert a.nnz == 100
    assert_allclose(a.toarray(), np.full((10, 10), 0.1))


def test_sync_plans_of_one_client_read_only_its_rows() -> None:
    # A by hand: expert 0 (client 1) mixes itself 0.75 and expert 2 (client 2) 0.25.
    dense = np.array([[0.75, 0.0, 0.25], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    ids, owners = ["1/0", "1/1", "2/0"], [1, 1, 2]
    hashes = {"1/0": "h0", "1/1": "h1", "2/0": "h2"}
    from scipy import sparse

    a = sparse.csr_matrix(dense)
    plans = sync_plans(a, ids, owners, hashes)
    assert plans == sync_plans(dense, ids, owners, hashes)  # dense or sparse, the same
    assert plans[1]["1/0"] == [("1/0", 0.75, "h0"), ("2/0", 0.25, "h2")]
    assert sync_plans(a, ids, owners, hashes, client=2) == {2: {"2/0": plans[2]["2/0"]}}


def test_same_domain_share_reads_a_sparse_matrix_as_the_dense_one() -> None:
    # Experts of clients 1, 1, 2, 3; clients 1 and 2 in domain 0, client 3 in domain 1.
    dense = np.array(
        [
            [0.5, 0.0, 0.3, 0.2],  # 0.3 of 0.5 to a same-domain peer
            [0.0, 1.0, 0.0, 0.0],  # takes nothing from peers: left out
            [0.4, 0.0, 0.6, 0.0],  # all of it from the same domain
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    from scipy import sparse

    owners, dominant = [1, 1, 2, 3], {1: 0, 2: 0, 3: 1}
    share, chance = same_domain_share(sparse.csr_matrix(dense), owners, dominant)
    # share: mean of 0.3/0.5 and 0.4/0.4; chance: row 0 has 1 same-domain expert among its
    # 2 other-client ones, row 2 has 2 among 3.
    assert share == pytest.approx((0.6 + 1.0) / 2)
    assert chance == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert (share, chance) == pytest.approx(same_domain_share(dense, owners, dominant))


def test_the_record_keeps_full_matrices_only_for_small_pools() -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(size=(6, 3))
    a = sparse_aggregation_matrix(small, 2, 1.0, 0.1)
    record = aggregation_record([f"{i // 2}/{i % 2}" for i in range(6)], small, a)
    assert_allclose(record["matrix"], np.round(a.toarray(), 5))
    assert_allclose(record["correlation"], np.round(correlation_matrix(small), 5))
    kept = record["matrix_sparse"]
    assert kept["indptr"] == a.indptr.tolist() and kept["indices"] == a.indices.tolist()
    m = DENSE_RECORD_LIMIT + 1
    big = rng.normal(size=(m, 3))
    large = aggregation_record(
        [str(i) for i in range(m)], big, sparse_aggregation_matrix(big, 2, 1.0, 0.1)
    )
    assert "matrix" not in large and "correlation" not in large
    assert len(large["matrix_sparse"]["indptr"]) == m + 1


def test_a_checkpoint_restores_a_from_its_kept_entries_or_an_older_dense_one() -> None:
    a = sparse_aggregation_matrix(np.random.default_rng(2).normal(size=(5, 3)), 2, 1.0, 0.2)
    parts = {"matrix/indptr": a.indptr, "matrix/indices": a.indices, "matrix/data": a.data}
    assert_allclose(_restored_matrix(parts, 5).toarray(), a.toarray())  # type: ignore[union-attr]
    older = {"matrix": a.toarray()}
    assert_allclose(_restored_matrix(older, 5).toarray(), a.toarray())  # type: ignore[union-attr]
    assert _restored_matrix({}, 5) is None


def test_a_random_projection_keeps_distances_and_is_the_same_every_round() -> None:
    rng = np.random.default_rng(4)
    features = rng.normal(size=(50, 3000))
    projected = random_projection(features, 256, seed=7)
    assert projected.shape == (50, 256)
    assert np.array_equal(projected, random_projection(features, 256, seed=7))
    before = ((features[:, None] - features[None]) ** 2).sum(-1)[np.triu_indices(50, 1)]
    after = ((projected[:, None] - projected[None]) ** 2).sum(-1)[np.triu_indices(50, 1)]
    ratio = after / before
    # Each pair's ratio has mean 1 and std sqrt(2 / 256) = 0.088 over matrices; the 1,225 pairs
    # share one matrix, so their mean moves with it by a few percent (here 1.032).
    assert abs(ratio.mean() - 1) < 0.05 and ratio.std() < 0.12


def _pool(m: int) -> tuple[dict[str, np.ndarray], list[PoolEntry]]:
    rng = np.random.default_rng(m)
    template = {"classifier.weight": np.zeros((2, 300), np.float32)}
    pool = [
        PoolEntry(i // 2, i % 2, {"classifier.weight": rng.normal(size=(2, 300))}, 1, "v0", None)
        for i in range(m)
    ]
    return template, pool


@pytest.mark.parametrize(
    ("m", "dim", "above", "width"),
    [(30, 64, 20, 64), (30, 64, 30, 600), (30, 0, 0, 600), (30, 900, 0, 600)],
)
def test_features_are_projected_only_for_large_pools_of_wide_features(
    m: int, dim: int, above: int, width: int
) -> None:
    template, pool = _pool(m)
    strategy = TaskAdapterClustering(
        template, num_clusters=2, projection_dim=dim, projection_min_adapters=above
    )
    strategy.open_round(1)
    features = strategy.clustering_features(pool)
    assert features.shape == (m, width)
    assert (strategy.record.feature_projection is not None) == (width == dim)


def test_time_left_by_hand() -> None:
    from server_app.outputs import time_left_text

    assert time_left_text([10.0, 20.0], 3) == "about 45 s left"  # mean 15 s x 3
    assert time_left_text([60.0, 120.0], 4) == "about 6 min left"  # 90 s x 4 = 360 s
    assert time_left_text([3600.0], 2) == "about 2.0 h left"
    assert time_left_text([5.0], 0) == "done"
    assert time_left_text([], 2) == "time left unknown"


def test_a_round_record_becomes_scalars_by_hand() -> None:
    from server_app.tracking import round_scalars

    record = {
        "round": 3,
        "mean_accuracy": 0.5,
        "accuracy": {"a": 0.25, "b": 0.75},
        "evaluated": True,  # a bool: not a scalar
        "groups": {"g0": 2},
        "bytes": {"train_up": 10, "per_node": {"7": {"train_up": 10}}, "cumulative": {"x": 4}},
        "group_tasks": {"g0": {"a": 2}},
        "rejected_reasons": ["nan"],  # a list: left out
        "train_loss": float("nan"),  # not finite: left out
    }
    assert round_scalars(record) == {
        "mean_accuracy": 0.5,
        "accuracy/a": 0.25,
        "accuracy/b": 0.75,
        "groups/g0": 2.0,
        "bytes/train_up": 10.0,
        "bytes/cumulative/x": 4.0,
        "group_tasks/g0/a": 2.0,
    }
