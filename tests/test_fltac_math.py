"""FL-TAC's maths against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from client_app.fltac_training import label_fingerprint
from strategies.fltac import (
    adapter_features,
    auto_kmeans,
    choose_k,
    choose_sources,
    clustering_agreement,
    clusters_per_label_count,
    constrained_assignment,
    constrained_kmeans_labels,
    fingerprint_features,
    group_means,
    grouping_scatter,
    head_input_width,
    head_label_counts,
    kmeans_labels,
    label_fingerprint_features,
    match_cluster_ids,
    node_payload,
    refine_by_moves,
    select_feature_keys,
    slot_order,
    tasks_lower_bound,
)

KEYS = [
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
    "base_model.model.classifier.weight",
    "base_model.model.classifier.bias",
]


def _adapter(a: float, b: float, w: float, bias: float) -> dict[str, np.ndarray]:
    return {
        KEYS[0]: np.array([[a, 0.0]], dtype=np.float32),
        KEYS[1]: np.array([[b], [0.0]], dtype=np.float32),
        KEYS[2]: np.array([[w, 0.0]], dtype=np.float32),
        KEYS[3]: np.array([bias], dtype=np.float32),
    }


def test_select_feature_keys() -> None:
    assert select_feature_keys(KEYS, "all") == sorted(KEYS)
    assert select_feature_keys(KEYS, "lora") == sorted(KEYS[:2])
    assert select_feature_keys(KEYS, "head") == sorted(KEYS[2:])
    with pytest.raises(ValueError, match="feature_tensors"):
        select_feature_keys(KEYS, "everything")


def test_adapter_features_update_and_normalisation() -> None:
    # Prepare: one adapter and the reference it started from.
    adapter = _adapter(a=4.0, b=0.0, w=3.0, bias=0.0)
    reference = _adapter(a=1.0, b=0.0, w=-1.0, bias=0.0)
    keys = select_feature_keys(KEYS, "all")  # sorted: lora_A, lora_B, classifier.bias, .weight
    # Execute
    raw = adapter_features([adapter], keys, normalize=False)
    update = adapter_features([adapter], keys, references=[reference], normalize=False)
    unit = adapter_features([adapter], keys, references=[reference], normalize=True)
    # Assert: raw = [A row | B column | bias | w row] = [4 0 | 0 0 | 0 | 3 0]
    assert_allclose(raw, [[4, 0, 0, 0, 0, 3, 0]])
    # update = adapter - reference = [3 0 | 0 0 | 0 | 4 0]; its norm is 5
    assert_allclose(update, [[3, 0, 0, 0, 0, 4, 0]])
    assert_allclose(unit, [[0.6, 0, 0, 0, 0, 0.8, 0]])


def test_zero_update_stays_zero_when_normalised() -> None:
    adapter = _adapter(1.0, 1.0, 1.0, 1.0)
    out = adapter_features([adapter], select_feature_keys(KEYS, "all"), [adapter], True)
    assert_allclose(out, np.zeros((1, 7)))


def test_group_means_uniform_and_weighted() -> None:
    adapters = [_adapter(1, 0, 0, 0), _adapter(3, 0, 0, 0), _adapter(10, 0, 0, 2)]
    labels = [0, 0, 1]
    uniform = group_means(adapters, labels)
    # cluster 0: mean of 1 and 3 = 2; cluster 1: the single member.
    assert_allclose(uniform[0][KEYS[0]], [[2.0, 0.0]])
    assert_allclose(uniform[1][KEYS[0]], [[10.0, 0.0]])
    assert_allclose(uniform[1][KEYS[3]], [2.0])
    weighted = group_means(adapters, labels, weights=[1, 3, 5])
    # (1*1 + 3*3) / 4 = 2.5
    assert_allclose(weighted[0][KEYS[0]], [[2.5, 0.0]])
    assert weighted[0][KEYS[0]].dtype == np.float32


def test_kmeans_separates_obvious_groups_and_caps_k() -> None:
    features = np.array([[0, 0], [0, 0.1], [10, 10], [10, 10.1]], dtype=float)
    labels = kmeans_labels(features, k=2, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert_allclose(kmeans_labels(features[:1], k=3, seed=0), [0])  # k capped at M


def test_constrained_kmeans_never_puts_one_nodes_adapters_together() -> None:
    # 1-D points: node A has 0.0 and 0.2, node B has 10.0 and 0.1. Plain K-means groups
    # {0, 0.1, 0.2} | {10}. With cannot-link inside a node, the two feasible partitions are
    #   {0, 0.1} | {0.2, 10}: SSE = 2 * 0.05^2 + 2 * 4.9^2 = 48.025
    #   {0, 10} | {0.2, 0.1}: SSE = 2 * 5^2 + 2 * 0.05^2 = 50.005
    # so the first one is optimal.
    features = np.array([[0.0], [0.2], [10.0], [0.1]])
    owners = [1, 1, 2, 2]
    plain = kmeans_labels(features, 2, seed=0)
    assert plain[0] == plain[1] == plain[3] != plain[2]
    labels = constrained_kmeans_labels(features, owners, 2, seed=0)
    assert labels[0] == labels[3] and labels[1] == labels[2] and labels[0] != labels[1]


def test_weighted_assignment_gives_the_heavier_adapter_its_nearest_cluster() -> None:
    # Centroids 0 and 10; one node's adapters at 4 (a) and 3 (b). Unweighted costs:
    #   a->0, b->10: 16 + 49 = 65;  a->10, b->0: 36 + 9 = 45  -> b takes 0.
    # With a weighing 10 (b 1): 160 + 49 = 209 against 360 + 9 = 369 -> a takes 0.
    features, centroids, node = np.array([[4.0], [3.0]]), np.array([[0.0], [10.0]]), [np.arange(2)]
    assert constrained_assignment(features, centroids, node).tolist() == [1, 0]
    weighted = constrained_assignment(features, centroids, node, np.array([10.0, 1.0]))
    assert weighted.tolist() == [0, 1]


def test_weighted_kmeans_moves_the_split_towards_the_heavy_point() -> None:
    # 1-D points 0, 4, 6, 10, one node each, k = 2. Contiguous splits, unweighted SSE:
    #   {0} {4,6,10}: 18.67;  {0,4} {6,10}: 8 + 8 = 16;  {0,4,6} {10}: 18.67  -> {0,4} {6,10}.
    # With 10 weighing 100: {0,4} {6,10} has centroid (6 + 1000) / 101 = 9.960 and SSE
    #   8 + 3.960^2 + 100 * 0.0396^2 = 23.84;  {0,4,6} {10}: 18.67 + 0 -> {0,4,6} {10}.
    features = np.array([[0.0], [4.0], [6.0], [10.0]])
    owners, weights = [0, 1, 2, 3], np.array([1.0, 1.0, 1.0, 100.0])
    for labels in (
        constrained_kmeans_labels(features, owners, 2, seed=0),
        kmeans_labels(features, 2, seed=0),
    ):
        assert labels[0] == labels[1] != labels[2] == labels[3]
    for labels in (
        constrained_kmeans_labels(features, owners, 2, seed=0, weights=weights),
        kmeans_labels(features, 2, seed=0, weights=weights),
    ):
        assert labels[0] == labels[1] == labels[2] != labels[3]


def test_weights_of_one_change_nothing() -> None:
    rng = np.random.default_rng(3)
    features, owners = rng.standard_normal((24, 3)), [i // 3 for i in range(24)]
    plain = constrained_kmeans_labels(features, owners, 4, seed=1)
    ones = constrained_kmeans_labels(features, owners, 4, seed=1, weights=np.ones(24))
    assert clustering_agreement([str(x) for x in plain], ones.tolist()) == 1.0


def test_constrained_kmeans_falls_back_when_a_node_has_more_adapters_than_clusters() -> None:
    features = np.array([[0.0], [0.1], [0.2], [5.0]])
    labels = constrained_kmeans_labels(features, [1, 1, 1, 2], 2, seed=0)
    assert labels[0] == labels[1] == labels[2] != labels[3]


def test_choose_k_finds_three_blobs() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    features = np.concatenate([c + 0.1 * rng.standard_normal((5, 2)) for c in centres])
    assert choose_k(features, 2, 6, seed=0) == 3


@pytest.mark.parametrize("k", [3, 5])
def test_choose_k_on_a_sample_finds_the_clusters_of_thousands_of_adapters(k: int) -> None:
    """Above SILHOUETTE_SAMPLE adapters, K is read off a sample with fewer restarts: on
    well-separated clusters of unequal sizes it still finds their number."""
    from strategies.fltac import SILHOUETTE_SAMPLE

    rng = np.random.default_rng(k)
    centres = 10.0 * rng.standard_normal((k, 16))
    sizes = rng.integers(300, 900, size=k)
    features = np.concatenate(
        [c + rng.standard_normal((n, 16)) for c, n in zip(centres, sizes, strict=True)]
    )
    assert len(features) > SILHOUETTE_SAMPLE
    assert choose_k(features, 2, 8, seed=0) == k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_k_scores_each_k_by_its_silhouette_on_features(seed: int) -> None:
    """The distances computed once give every K the silhouette score sklearn computes from the
    features themselves: the K chosen is the same as scoring each K from scratch."""
    from sklearn.metrics import silhouette_score

    features = np.random.default_rng(seed).standard_normal((60, 5))
    scores = {k: silhouette_score(features, kmeans_labels(features, k, seed)) for k in range(2, 7)}
    assert choose_k(features, 2, 6, seed=seed) == max(scores, key=lambda k: (scores[k], -k))


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_kmeans_below_the_sample_size_is_the_scan_then_kmeans(seed: int) -> None:
    """Up to SILHOUETTE_SAMPLE adapters the scan's fit for the chosen K is the clustering: the
    same labels as choosing K and fitting K-means again with the same seed."""
    features = np.random.default_rng(seed).standard_normal((80, 4))
    k, labels = auto_kmeans(features, 2, 6, seed=seed, n_init=10)
    assert k == choose_k(features, 2, 6, seed=seed)
    assert labels.tolist() == kmeans_labels(features, k, seed, n_init=10).tolist()


def test_auto_kmeans_weighs_its_fits() -> None:
    """1-D points 0, 4, 10 and K = 2. Merging a pair costs w_a w_b / (w_a + w_b) d^2: unweighted
    {0, 4} (8) before {4, 10} (18); with weights 100, 100, 1, {0, 4} costs 50 * 16 = 800 and
    {4, 10} 100/101 * 36 = 35.6, so 4 joins 10."""
    features = np.array([[0.0], [4.0], [10.0]])
    k, labels = auto_kmeans(features, 2, 2, seed=0)
    assert k == 2 and labels[0] == labels[1] != labels[2]
    k, labels = auto_kmeans(features, 2, 2, seed=0, weights=np.array([100.0, 100.0, 1.0]))
    assert k == 2 and labels[0] != labels[1] == labels[2]


def test_auto_kmeans_above_the_sample_size_clusters_every_adapter() -> None:
    """Above SILHOUETTE_SAMPLE adapters every adapter is labelled (not only the sample) by
    K-means started from the sample's centroids: on clear clusters, exactly the true ones."""
    from sklearn.metrics import adjusted_rand_score

    from strategies.fltac import SILHOUETTE_SAMPLE

    rng = np.random.default_rng(4)
    centres = 10.0 * rng.standard_normal((4, 16))
    truth = rng.integers(0, 4, size=2500)
    features = centres[truth] + rng.standard_normal((2500, 16))
    assert len(features) > SILHOUETTE_SAMPLE
    k, labels = auto_kmeans(features, 2, 8, seed=0)
    assert k == 4 and labels.shape == (2500,)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_match_cluster_ids_follows_majority_of_members() -> None:
    # Members 0,1,2 held g0 and g0,g1; members 3,4 held g1. New labels are swapped: 1 for the
    # g0 majority, 0 for the g1 majority.
    labels = [1, 1, 1, 0, 0]
    previous = ["g0", "g0", "g1", "g1", "g1"]
    assert match_cluster_ids(labels, previous, ["g0", "g1"]) == {1: "g0", 0: "g1"}


def test_match_cluster_ids_first_round_gets_fresh_ids() -> None:
    assert match_cluster_ids([0, 1, 1], [None, None, None], []) == {0: "g0", 1: "g1"}


def test_match_cluster_ids_breaks_ties_by_distance() -> None:
    # No overlap information (all came from v0); cluster 0's mean is close to g1's adapter.
    means = {0: {"w": np.array([5.0])}, 1: {"w": np.array([0.0])}}
    previous_globals = {"g0": {"w": np.array([0.1])}, "g1": {"w": np.array([4.9])}}
    mapping = match_cluster_ids([0, 1], ["v0", "v0"], ["g0", "g1"], means, previous_globals)
    assert mapping == {0: "g1", 1: "g0"}


def test_clustering_agreement() -> None:
    assert clustering_agreement(["a", "a", "b", "b"], [1, 1, 0, 0]) == pytest.approx(1.0)
    # ARI of {a,a,b,b} vs {0,1,0,1}: contingency all ones -> index sum C(1,2) = 0; rows and
    # columns each give C(2,2)+C(2,2) = 2; expected = 2*2/C(4,2) = 2/3; max = (2+2)/2 = 2.
    # ARI = (0 - 2/3) / (2 - 2/3) = -0.5
    assert clustering_agreement(["a", "a", "b", "b"], [0, 1, 0, 1]) == pytest.approx(-0.5)


def test_grouping_scatter_by_hand() -> None:
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0], [10.0, 3.0]])
    # {0, 1}: mean (1, 0), distances 1 + 1 = 2; {2, 3}: mean (10, 2), 1 + 1 = 2; total 4
    assert grouping_scatter(x, ["a", "a", "b", "b"]) == pytest.approx(4.0)
    # {0, 2}: mean (5, 0.5), 25.25 + 25.25 = 50.5; {1, 3}: mean (6, 1.5), 18.25 + 18.25 = 36.5
    assert grouping_scatter(x, [0, 1, 0, 1]) == pytest.approx(87.0)
    # one group: mean (5.5, 1), 31.25 + 13.25 + 20.25 + 24.25 = 89
    assert grouping_scatter(x, [7, 7, 7, 7]) == pytest.approx(89.0)
    assert grouping_scatter(x, [0, 1, 2, 3]) == 0.0


def test_node_payload_sends_each_cluster_once() -> None:
    assert node_payload(["g2", "g0", "g2"]) == (["g0", "g2"], ["g2", "g0", "g2"])


def test_fingerprint_features_centre_then_normalise() -> None:
    # Mean of the rows is (2, 2/3); centred rows (-1, -2/3), (1, -2/3), (0, 4/3).
    fps = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0]])
    out = fingerprint_features(fps)
    r13 = np.sqrt(13.0)
    assert_allclose(out, [[-3 / r13, -2 / r13], [3 / r13, -2 / r13], [0.0, 1.0]], atol=1e-12)


def test_fingerprint_features_row_at_the_mean_becomes_zero() -> None:
    out = fingerprint_features(np.array([[1.0, 1.0], [3.0, 1.0], [2.0, 1.0]]))
    assert_allclose(out, [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], atol=1e-12)


def test_label_fingerprint_is_each_class_mean_minus_the_mean_of_class_means() -> None:
    # Class 0: (1, 0), (3, 0) -> mean (2, 0); class 1: (0, 2); class 2 absent.
    # Mean of the present classes' means (1, 1): rows (1, -1), (-1, 1), and 0 for class 2.
    reps = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    out = label_fingerprint(reps, np.array([0, 0, 1]), 3)
    assert out.shape == (3, 2)
    assert_allclose(out, [[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])
    # The label balance does not enter: three more copies of class 1 change nothing.
    more = np.vstack([reps, np.repeat(reps[2:], 3, axis=0)])
    assert_allclose(label_fingerprint(more, np.array([0, 0, 1, 1, 1, 1]), 3), out)


def test_label_fingerprint_of_one_class_is_zero() -> None:
    out = label_fingerprint(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1, 1]), 2)
    assert_allclose(out, np.zeros((2, 2)))


def test_label_fingerprint_features_pad_flatten_normalise() -> None:
    # (2, 2) rows [1, -1], [-1, 1] -> [1, -1, -1, 1] / 2; (1, 2) [3, 4] padded -> [3, 4, 0, 0] / 5.
    out = label_fingerprint_features(
        [np.array([[1.0, -1.0], [-1.0, 1.0]]), np.array([[3.0, 4.0]]), np.zeros((2, 2))]
    )
    assert_allclose(
        out, [[0.5, -0.5, -0.5, 0.5], [0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], atol=1e-12
    )


def test_tasks_lower_bound_is_the_most_adapters_of_one_owner() -> None:
    assert tasks_lower_bound([5, 5, 7, 5, 7, 9]) == 3
    assert tasks_lower_bound([1]) == 1
    assert tasks_lower_bound([]) == 1


def test_head_input_width_reads_the_heads_in_features() -> None:
    template = {KEYS[0]: np.zeros((1, 2)), KEYS[2]: np.zeros((5, 7)), KEYS[3]: np.zeros(5)}
    assert head_input_width(template) == 7
    assert head_input_width({KEYS[0]: np.zeros((1, 2))}) is None


def test_choose_sources_swaps_when_the_labels_favour_it_enough() -> None:
    # Two slots, two received globals; the server started slot 0 from global 0, slot 1 from 1.
    slot0 = np.array([[1.0, 0.2], [0.9, 0.1], [1.1, 0.3]])  # (3 examples, 2 globals)
    slot1 = np.array([[0.1, 1.0], [0.2, 0.8], [0.3, 1.2]])
    # Summed: slot 0 (3.0, 0.6), slot 1 (0.6, 3.0). The plan costs 6.0 nats, the swap 1.2:
    # log-likelihood ratio 4.8.
    chosen, llr = choose_sources([slot0, slot1], [0, 1], min_llr=4.6)
    assert chosen == [1, 0]
    assert llr == pytest.approx(4.8)
    kept, llr_again = choose_sources([slot0, slot1], [0, 1], min_llr=5.0)
    assert kept == [0, 1] and llr_again == pytest.approx(4.8)


def test_choose_sources_keeps_the_plan_on_weak_evidence() -> None:
    # The swap is better in sum (2.1 nats against 2.4): a ratio of 0.3, far below ln 100.
    slot0 = np.array([[1.0, 0.5], [0.3, 0.6]])
    slot1 = np.array([[0.6, 0.5], [0.4, 0.6]])
    chosen, llr = choose_sources([slot0, slot1], [0, 1], min_llr=4.6)
    assert chosen == [0, 1]
    assert llr == pytest.approx(0.3)


def test_choose_sources_with_the_best_plan_already_reports_no_change() -> None:
    slot0 = np.array([[0.1, 1.0]])
    slot1 = np.array([[1.0, 0.1]])
    assert choose_sources([slot0, slot1], [0, 1], min_llr=4.6) == ([0, 1], 0.0)


def test_choose_sources_never_moves_a_slot_against_its_own_labels() -> None:
    # Three slots on globals 0, 1, 2. Slot 0 fits global 1 far better (10.0 -> 1.0); the cycle
    # 0 -> 1, 1 -> 2, 2 -> 0 sums to 1.0 + 4.0 + 4.0 = 9.0 against the plan's 10.0 + 2.0 + 2.0
    # = 14.0 (5 nats, the best one-to-one assignment), but slots 1 and 2 would each start from
    # a global that fits them worse (4.0 against 2.0).
    slots = [
        np.array([[10.0, 1.0, 12.0]]),
        np.array([[9.0, 2.0, 4.0]]),
        np.array([[4.0, 9.0, 2.0]]),
    ]
    chosen, llr = choose_sources(slots, [0, 1, 2], min_llr=1.0)
    assert chosen == [0, 1, 2] and llr == 0.0  # no allowed move at all
    # Give slot 1 a global it fits better (global 3, 1.0): now slot 0 -> 1 and slot 1 -> 3 are
    # both allowed: 1.0 + 1.0 + 2.0 = 4.0 against 14.0, ratio 10.0.
    slots = [np.hstack([x, [[c]]]) for x, c in zip(slots, (20.0, 1.0, 20.0), strict=True)]
    chosen, llr = choose_sources(slots, [0, 1, 2], min_llr=4.6)
    assert chosen == [1, 3, 2]
    assert llr == pytest.approx(10.0)


def test_choose_sources_with_two_slots_on_one_global_picks_per_slot() -> None:
    # Slots 0 and 1 both start from global 0 (no one-to-one plan to keep), slot 2 from global 1.
    # Each takes its own best: slots 0 and 1 stay (global 0 fits both best), slot 2 moves to
    # global 2 (9.0 -> 0.0): 9 nats. A one-to-one answer would have to move slot 1 to a global
    # that fits it worse (2.0 -> 3.0).
    slots = [
        np.array([[1.0, 3.0, 9.0]]),
        np.array([[2.0, 3.0, 9.0]]),
        np.array([[9.0, 9.0, 0.0]]),
    ]
    assert choose_sources(slots, [0, 0, 1], min_llr=1.0) == ([0, 0, 2], 9.0)


def test_choose_sources_with_more_slots_than_globals_picks_per_slot() -> None:
    # Three slots, two globals: no one-to-one plan exists, each slot takes its own best.
    slots = [
        np.array([[0.1, 3.0], [0.2, 3.0]]),
        np.array([[3.0, 0.1], [3.0, 0.2]]),
        np.array([[3.0, 0.0], [3.0, 0.0]]),
    ]
    chosen, llr = choose_sources(slots, [0, 0, 0], min_llr=4.6)
    # Slots 1 and 2 move: (6.0 - 0.3) + (6.0 - 0.0) = 11.7 nats.
    assert chosen == [0, 1, 1]
    assert llr == pytest.approx(11.7)


HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"


def test_head_label_counts_read_the_last_row_that_moved() -> None:
    start = {HEAD_W: np.zeros((5, 2)), HEAD_B: np.zeros(5)}
    two = {HEAD_W: np.zeros((5, 2)), HEAD_B: np.array([0.1, -0.1, 0.0, 0.0, 0.0])}
    three = {HEAD_W: np.zeros((5, 2)), HEAD_B: np.zeros(5)}
    three[HEAD_W][2, 1] = 1e-7  # only the weight of row 2 moved: still three logits
    still = {HEAD_W: np.zeros((5, 2)), HEAD_B: np.zeros(5)}
    counts = head_label_counts([two, three, still], [start] * 3, [HEAD_B, HEAD_W])
    assert counts.tolist() == [2, 3, 0]


def test_clusters_per_label_count_automatic_is_each_groups_lower_bound() -> None:
    # Owner 1 holds two binary tasks and one 3-way task; owner 2 one of each.
    counts = [2, 2, 3, 2, 3]
    owners = [1, 1, 1, 2, 2]
    assert clusters_per_label_count(counts, owners, None, {}) == {2: 2, 3: 1}
    # An earlier round proved three binary tasks: the bound is kept.
    assert clusters_per_label_count(counts, owners, None, {2: 3}) == {2: 3, 3: 1}


def test_clusters_per_label_count_spreads_the_fixed_k_by_adapters_per_cluster() -> None:
    # Needs: count 2 -> 1 cluster (6 adapters), count 3 -> 1 (2 adapters). K = 4 leaves two:
    # the first to count 2 (6/1 > 2/1), the second again to count 2 (6/2 = 3 > 2/1).
    counts = [2] * 6 + [3] * 2
    owners = [1, 2, 3, 4, 5, 6, 1, 2]
    assert clusters_per_label_count(counts, owners, 4, {}) == {2: 3, 3: 1}
    # A K below what the groups need: no split.
    assert clusters_per_label_count(counts, owners, 1, {}) is None


def test_constrained_assignment_by_hand() -> None:
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]])
    features = np.array([[1.0, 0.0], [2.0, 0.0], [9.0, 0.0]])
    # Owner A holds rows 0 and 1 (squared costs [1, 81] and [4, 64]): distinct clusters, and
    # 0 -> c0, 1 -> c1 costs 1 + 64 = 65 < 81 + 4 = 85. Owner B's one row goes to its nearest.
    labels = constrained_assignment(features, centroids, [np.array([0, 1]), np.array([2])])
    assert labels.tolist() == [0, 1, 1]
    # One owner with more rows than clusters: each row to its nearest centroid.
    assert constrained_assignment(features, centroids, [np.array([0, 1, 2])]).tolist() == [0, 0, 1]


# -- slot_order: a reply's adapters back in the slots they were trained for -------------------
HEAD = ["w"]


def _head(rows: list[float], extra: float = 0.0) -> dict[str, np.ndarray]:
    """A 3-logit head ``w`` (one column) and one non-head value ``x``."""
    return {"w": np.array([[r] for r in rows]), "x": np.array([extra])}


def test_slot_order_by_label_counts_alone_when_every_slot_started_from_v0() -> None:
    v0 = _head([0.0, 0.0, 0.0])
    two, three = _head([1.0, -1.0, 0.0]), _head([1.0, 1.0, -2.0])  # moved 2 and 3 logits
    assert slot_order([two, three], [v0, v0], [2, 3], HEAD) == [0, 1]
    assert slot_order([three, two], [v0, v0], [2, 3], HEAD) == [1, 0]  # came swapped
    # both slots of 2 classes from v0: either order fits, and both are as near (4 + 4)
    assert slot_order([two, _head([2.0, 0.0, 0.0])], [v0, v0], [2, 2], HEAD) is None
    assert slot_order([three, three], [v0, v0], [2, 3], HEAD) is None  # slot 0 fits none


def test_slot_order_by_distance_to_the_starts_when_the_counts_allow_both() -> None:
    """Slots of 2 classes each, started from s0 = 0 and s1 = (3, 3, 0). Adapter a = s1 + (1, 1,
    0), b = s0 + (1, -1, 0), x = 0; each moved 2 logits from either start. As they came (a, b):
    |a - s0|^2 + |b - s1|^2 = 32 + 20 = 52; swapped: |b - s0|^2 + |a - s1|^2 = 2 + 2 = 4."""
    s0, s1 = _head([0.0, 0.0, 0.0]), _head([3.0, 3.0, 0.0])
    a, b = _head([4.0, 4.0, 0.0]), _head([1.0, -1.0, 0.0])
    assert slot_order([a, b], [s0, s1], [2, 2], HEAD) == [1, 0]
    assert slot_order([b, a], [s0, s1], [2, 2], HEAD) == [0, 1]
    # the non-head part counts too: x = 5 on b, as they came 32 + 45 = 77, swapped 27 + 2 = 29
    b5 = _head([1.0, -1.0, 0.0], extra=5.0)
    assert slot_order([a, b5], [s0, s1], [2, 2], HEAD) == [1, 0]
    # a moved only logit 0 from s1: it fits slot 1 no more, and slot 0 only as it came
    a1 = _head([4.0, 3.0, 0.0])
    assert slot_order([a1, b], [s0, s1], [2, 2], HEAD) == [0, 1]


# -- Hartigan's moves after constrained K-means (fltac.refine_moves) ------------------------------
def test_refine_moves_a_row_lloyd_keeps_when_the_objective_falls() -> None:
    """1-D rows 0, 2.9 | 4, 5, 6: a Lloyd fixed point (2.9 is 1.45 from its centroid, 2.1 from
    the other), but moving 2.9 takes the scatter from 2 x 1.45^2 + 2 = 6.205 to 0 + 5.3075
    (mean 4.475: 1.575^2 + 0.475^2 + 0.525^2 + 1.525^2)."""
    x = np.array([[0.0], [2.9], [4.0], [5.0], [6.0]])
    before = np.array([0, 0, 1, 1, 1])
    after = refine_by_moves(x, [0, 1, 2, 3, 4], before, 2)
    assert after.tolist() == [0, 1, 1, 1, 1]
    assert grouping_scatter(x, before.tolist()) == pytest.approx(6.205)
    assert grouping_scatter(x, after.tolist()) == pytest.approx(5.3075)


def test_refine_keeps_the_cannot_link_a_move_would_break() -> None:
    """The same rows with 2.9 and 4 of one owner: 2.9 may only swap with 4 (scatter 8 +
    5.0067 = 13.0, worse than 6.205), and no other change helps: nothing moves."""
    x = np.array([[0.0], [2.9], [4.0], [5.0], [6.0]])
    before = np.array([0, 0, 1, 1, 1])
    assert refine_by_moves(x, [0, 9, 9, 1, 2], before, 2).tolist() == before.tolist()


def test_refine_swaps_two_rows_of_one_owner() -> None:
    """Rows 0, 10 (owner 1) and 1, 11 (owner 2), each owner one row per cluster, grouped
    {0, 11} {10, 1} (scatter 2 x 5.5^2 + 2 x 4.5^2 = 101): single moves would break a
    cannot-link; swapping owner 1's rows gives {10, 11} {0, 1}, scatter 0.5 + 0.5 = 1."""
    x = np.array([[0.0], [10.0], [1.0], [11.0]])
    before = np.array([0, 1, 1, 0])
    after = refine_by_moves(x, [1, 1, 2, 2], before, 2)
    assert after.tolist() == [1, 0, 1, 0]
    assert grouping_scatter(x, before.tolist()) == pytest.approx(101.0)
    assert grouping_scatter(x, after.tolist()) == pytest.approx(1.0)


def test_refine_never_empties_a_cluster() -> None:
    x = np.array([[0.0], [0.1], [50.0]])
    assert refine_by_moves(x, [0, 1, 2], np.array([0, 0, 1]), 2).tolist() == [0, 0, 1]
