"""FL-TAC: low-rank, task-specific adapter clustering (Ping et al., arXiv 2404.15384).

Each client trains one LoRA adapter per local task and uploads them all without task labels. The
server pools every adapter, runs K-means (K = number of tasks by default), replaces each adapter by
the mean of its cluster and sends every node exactly the cluster means its slots need. After
training the K cluster means are the task-specific global adapters.

The maths is in pure functions (arrays in, arrays out); :class:`TaskAdapterClustering` is the thin
Flower glue around them. Choices the paper leaves open are ours, configurable, and measured on the
offline benchmark (see docs/results.md):

* features (``fltac.feature_tensors``, ``fltac.feature_source``): by default the classification
  head only, taken relative to the broadcast v0 (``cumulative``) and L2-normalised. The head is
  where tasks differ most (label meaning, label count); LoRA A/B updates of a few local steps are
  mostly noise and drown it. Raw weights with every tensor (what the public re-implementation
  does) froze the grouping after round 1 in our runs.
* input fingerprints (``fltac.input_fingerprint``, default on): each client also sends, per
  adapter, the mean representation of that task's training inputs under the frozen base model
  (the head's input with every adapter switched off, so every client computes it in the same
  space). Adapters say what a task's *labels* mean; on tasks that share a label count that is
  weak evidence, dominated by the label balance of small clients. The inputs say what the task's
  *data* is. The server centres the fingerprints on the round's pool, L2-normalises them and
  appends them to the adapter features (both blocks of unit norm). What this reveals to the
  server is documented in docs/methods.md; ``fltac.input_fingerprint=false`` turns it off.
* label fingerprints (``fltac.label_fingerprint``, default off): per adapter and class, the mean
  representation of that class's inputs minus the mean of the class means (balance-free). Tasks
  that share their inputs (one set of reviews labelled two ways) differ in what their labels
  separate. A third unit block; measured no better than without in real runs, so off.
* the clients' source check (``fltac.source_check``, default on): from round 2 a client scores
  every global it was sent on its own tasks' training examples and may reassign its slots among
  those globals, only on clear evidence (:func:`choose_sources`); it replies with the global
  each slot started from, which the server checks and uses as the slot's previous global. It
  undoes what fingerprints cannot: one client's two same-source tasks swapped in round 1.
* the label-count split (``fltac.split_by_label_count``, default on): a task with C labels never
  moves head rows C and up (they are masked out of its loss), so how many rows an adapter's
  training moved is its task's label count, read exactly; K-means runs within each label count.
* ``constrained_kmeans`` (default): a client trains one adapter per *distinct* local task, so the
  adapters of one upload never share a cluster. That structural fact, not a label, turns K-means
  into a per-client assignment problem and removes most round-1 mistakes; plain ``kmeans`` (the
  paper) stays available.
* cluster identity: K-means labels are arbitrary, so each new cluster takes the global id that
  most of its members held before (Hungarian assignment on the overlap), ties broken by distance
  to the previous global adapters. "Global adapter k" then means the same task across rounds.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, pairwise_distances, silhouette_score

from fedspecialists.config import (
    AdapterRunConfig,
    ConfigError,
    check_refine_moves,
    check_setting,
    num_clusters,
)
from fedspecialists.faults import FaultDraw, absent_clients
from fedspecialists.protocol.fltac import LOCAL, EvaluateReply, Instruction, TrainReply
from fedspecialists.protocol.records import (
    FINGERPRINT_RECORD,
    LABEL_FINGERPRINT_RECORD,
    SOURCES_RECORD,
    check_adapter,
    record_to_numpy,
    state_to_record,
)
from fedspecialists.protocol.values import ProtocolError
from strategies.common import (
    RoundBookkeeping,
    log_failed_reply,
    log_rejected_reply,
    planar_embedding,
    reply_content,
)
from strategies.robust import RobustAggregation
from strategies.round_record import RoundRecord

Adapter = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------
def select_feature_keys(
    keys: Sequence[str], which: str, head_module: str = "classifier"
) -> list[str]:
    """The tensor names K-means looks at.

    Parameters
    ----------
    keys : Sequence[str]
        All tensor names of an adapter (peft state-dict keys).
    which : str
        ``all`` (every tensor), ``lora`` (``lora_A``/``lora_B`` only) or ``head`` (the head only).
    head_module : str
        Name of the classification head module.
    """
    is_lora = [("lora_A" in k or "lora_B" in k) for k in keys]
    is_head = [f"{head_module}." in k and not lora for k, lora in zip(keys, is_lora, strict=True)]
    if which == "all":
        selected = list(keys)
    elif which == "lora":
        selected = [k for k, lora in zip(keys, is_lora, strict=True) if lora]
    elif which == "head":
        selected = [k for k, head in zip(keys, is_head, strict=True) if head]
    else:
        check_setting("fltac.feature_tensors", which)
    if not selected:
        raise ValueError(f"no adapter tensors match feature_tensors={which!r}")
    return sorted(selected)


def head_shape(template: Adapter, head_module: str = "classifier") -> tuple[int, int] | None:
    """Shape ``(C, H)`` of the head's weight in an adapter template (None: no head)."""
    for key in sorted(template):
        value = np.asarray(template[key])
        is_head = f"{head_module}." in key and key.endswith("weight") and "lora" not in key
        if is_head and value.ndim == 2:
            return int(value.shape[0]), int(value.shape[1])
    return None


def head_input_width(template: Adapter, head_module: str = "classifier") -> int | None:
    """In-features H of the head's weight ``(C, H)`` in an adapter template (None: no head)."""
    shape = head_shape(template, head_module)
    return None if shape is None else shape[1]


def adapter_features(
    adapters: Sequence[Adapter],
    keys: Sequence[str],
    references: Sequence[Adapter] | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """One feature row per adapter: the selected tensors flattened and concatenated.

    Parameters
    ----------
    adapters : Sequence[Mapping[str, np.ndarray]]
        M uploaded adapters.
    keys : Sequence[str]
        Tensor names to use, in order (see :func:`select_feature_keys`).
    references : Sequence[Mapping[str, np.ndarray]], optional
        When given, row m is ``adapters[m] - references[m]`` (the update since what was sent).
    normalize : bool
        Divide each row by its L2 norm (rows of norm 0 are left at 0).

    Returns
    -------
    np.ndarray
        Shape ``(M, D)``, float64, ``D`` = total size of the selected tensors.
    """
    rows = []
    for m, adapter in enumerate(adapters):
        parts = []
        for key in keys:
            value = np.asarray(adapter[key], dtype=np.float64).ravel()
            if references is not None:
                value = value - np.asarray(references[m][key], dtype=np.float64).ravel()
            parts.append(value)
        rows.append(np.concatenate(parts))
    features = np.stack(rows)
    if normalize:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        features = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    return features


def fingerprint_features(fingerprints: np.ndarray) -> np.ndarray:
    """Input fingerprints as a clustering block: centred on the pool mean, rows L2-normalised.

    Centring removes what every task's inputs share (a text encoder's mean embedding is far from
    the origin), so the cosine geometry reflects how the tasks' inputs differ.

    Parameters
    ----------
    fingerprints : np.ndarray
        ``(M, H)``: one mean input representation per pooled adapter.

    Returns
    -------
    np.ndarray
        ``(M, H)`` float64; a row equal to the mean becomes 0.
    """
    centred = np.asarray(fingerprints, dtype=np.float64)
    centred = centred - centred.mean(0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 1e-12)


def label_fingerprint_features(label_fingerprints: Sequence[np.ndarray]) -> np.ndarray:
    """Label fingerprints as a clustering block: rows zero-padded to the widest, flattened,
    L2-normalised.

    Not centred: a label fingerprint has no offset shared by every task (each is already
    centred on its own classes), and its direction is what tells tasks apart.

    Parameters
    ----------
    label_fingerprints : Sequence[np.ndarray]
        M arrays ``(C_m, H)``: per class, what separates it from the task's other classes.

    Returns
    -------
    np.ndarray
        ``(M, C_max * H)`` float64; an all-zero fingerprint (fewer than two classes) stays 0.
    """
    rows = max(f.shape[0] for f in label_fingerprints)
    padded = np.stack(
        [
            np.pad(np.asarray(f, np.float64), ((0, rows - f.shape[0]), (0, 0))).ravel()
            for f in label_fingerprints
        ]
    )
    norms = np.linalg.norm(padded, axis=1, keepdims=True)
    return np.divide(padded, norms, out=np.zeros_like(padded), where=norms > 1e-12)


def random_projection(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """``features`` ``(M, D)`` times a seeded Gaussian matrix ``(D, dims)`` with entries of
    variance ``1 / dims``: squared distances are kept in expectation (Johnson-Lindenstrauss),
    and K-means then costs ``dims`` instead of ``D`` per distance. The same seed gives the same
    matrix in every round, so clusters stay comparable."""
    matrix = np.random.default_rng(seed).normal(0.0, 1.0 / np.sqrt(dims), (features.shape[1], dims))
    return np.asarray(features @ matrix)


def kmeans_labels(
    features: np.ndarray,
    k: int,
    seed: int,
    n_init: int = 10,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """K-means labels ``(M,)`` for ``features`` ``(M, D)``; ``k`` is capped at M.

    ``weights`` ``(M,)`` (None: all 1) weigh each row in the centroids and the inertia."""
    return fitted_kmeans(features, k, seed, n_init, weights=weights)[0]


def fitted_kmeans(
    features: np.ndarray,
    k: int,
    seed: int,
    n_init: int = 10,
    init: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """K-means on ``features`` ``(M, D)``: labels ``(M,)`` and centroids ``(k, D)``.

    ``init`` ``(k, D)`` starts Lloyd's iterations there (one run) instead of from ``n_init``
    k-means++ draws; ``k`` is capped at M; ``weights`` ``(M,)`` weigh the rows (None: all 1)."""
    k = max(1, min(k, features.shape[0]))
    if k == 1:
        return np.zeros(features.shape[0], dtype=np.int64), features.mean(0, keepdims=True)
    if init is not None:
        model = KMeans(n_clusters=k, init=init, n_init=1, random_state=seed)
    else:
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    labels = model.fit_predict(features, sample_weight=weights).astype(np.int64)
    return labels, np.asarray(model.cluster_centers_)


def constrained_kmeans_labels(
    features: np.ndarray,
    owners: Sequence[int],
    k: int,
    seed: int,
    n_init: int = 10,
    max_iter: int = 100,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """K-means in which adapters of the same owner never share a cluster (cannot-link).

    A client trains one adapter per *distinct* local task, so two adapters from one upload are
    of different tasks by construction: no label is needed to know that. The assignment step
    solves, for each owner, a small linear assignment of its adapters to distinct clusters
    (Hungarian, squared Euclidean cost); the update step is the usual mean. An owner with more
    adapters than clusters falls back to nearest-centroid assignment. Best of ``n_init``
    k-means++ starts by inertia.

    Parameters
    ----------
    features : np.ndarray
        ``(M, D)`` feature rows.
    owners : Sequence[int]
        ``(M,)`` owner (node id) of each row.
    k : int
        Number of clusters (capped at M).
    weights : np.ndarray | None
        ``(M,)`` positive row weights (None: all 1). Weighted K-means: a row's squared
        distance counts ``weights[i]`` times in the assignment and the inertia, centroids are
        weighted means, and the k-means++ draws are weighted. With each adapter's example
        count, a centroid is the sample-weighted mean of its members, and a fingerprint (a
        mean over n examples, its noise variance ~ 1/n) counts as the evidence it is.

    Returns
    -------
    np.ndarray
        ``(M,)`` int labels in ``[0, k)``.
    """
    from sklearn.cluster import kmeans_plusplus

    m = features.shape[0]
    k = max(1, min(k, m))
    if k == 1:
        return np.zeros(m, dtype=np.int64)
    owners_arr = np.asarray(owners)
    rows_of = {o: np.flatnonzero(owners_arr == o) for o in dict.fromkeys(owners_arr.tolist())}
    best_labels, best_inertia = np.zeros(m, dtype=np.int64), np.inf
    for start in range(n_init):
        centroids, _ = kmeans_plusplus(
            features, k, random_state=seed + start, sample_weight=weights
        )
        labels = np.full(m, -1, dtype=np.int64)
        for _ in range(max_iter):
            new = constrained_assignment(features, centroids, list(rows_of.values()), weights)
            if np.array_equal(new, labels):
                break
            labels = new
            _update_centroids(centroids, features, labels, weights)
        inertia = _inertia(features, centroids, labels, weights)
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels.copy(), inertia
    return best_labels


MAX_REFINE_ROWS = 2_000  # above this many adapters the move search is skipped (O(M^2 k) a pass)


def refine_by_moves(
    features: np.ndarray, owners: Sequence[int], labels: np.ndarray, k: int, max_passes: int = 50
) -> np.ndarray:
    """Hartigan's local search on K-means' objective, within the cannot-links.

    Lloyd's iterations (:func:`constrained_kmeans_labels`) stop where no row is nearer another
    centroid, but moving a row also moves the two centroids: a row can be worth moving although
    its own centroid is the nearest. Here every row is tried in every other cluster: alone if
    its owner has no row there, else swapped with that row (two adapters of one owner never
    share a cluster); the first change that lowers the summed squared distance to the cluster
    means (exactly, both clusters recomputed) is made, until a pass changes nothing or after
    ``max_passes``. A cluster is never emptied. The objective never rises, so the result is
    never a worse K-means solution than ``labels``.

    Parameters
    ----------
    features : np.ndarray
        ``(M, D)`` feature rows.
    owners : Sequence[int]
        ``(M,)`` owner of each row.
    labels : np.ndarray
        ``(M,)`` a grouping in ``[0, k)`` that keeps the cannot-links.
    k : int
        Number of clusters.

    Returns
    -------
    np.ndarray
        ``(M,)`` labels, at most as scattered as ``labels`` (:func:`grouping_scatter`).
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    if len(labels) > MAX_REFINE_ROWS:
        return labels
    owners_arr = np.asarray(owners)
    for _ in range(max_passes):
        if not _refine_pass(features, owners_arr, labels, k):
            break
    return labels


def _refine_pass(features: np.ndarray, owners: np.ndarray, labels: np.ndarray, k: int) -> bool:
    """One pass of :func:`refine_by_moves` over the rows, changing ``labels`` in place;
    whether anything changed."""
    changed = False
    for i in range(len(labels)):
        a = int(labels[i])
        for b in range(k):
            if b == a:
                continue
            partner = np.flatnonzero((labels == b) & (owners == owners[i]))
            if partner.size > 1:  # an owner with more rows than clusters: no constraint kept
                continue
            if partner.size == 0 and np.count_nonzero(labels == a) == 1:
                continue  # moving the last row out would empty its cluster
            before = _scatter(features[labels == a]) + _scatter(features[labels == b])
            trial = labels.copy()
            trial[i] = b
            trial[partner] = a
            after = _scatter(features[trial == a]) + _scatter(features[trial == b])
            if after < before - 1e-12 * max(1.0, before):
                labels[:] = trial
                changed = True
                break
    return changed


def _scatter(rows: np.ndarray) -> float:
    """Summed squared distance of ``rows`` ``(n, D)`` to their mean (0 for no rows)."""
    return float(((rows - rows.mean(0)) ** 2).sum()) if len(rows) else 0.0


def _update_centroids(
    centroids: np.ndarray, features: np.ndarray, labels: np.ndarray, weights: np.ndarray | None
) -> None:
    """K-means' update step in place: each used centroid ``(k, D)`` becomes its members' mean
    (weighted by ``weights`` ``(M,)`` when given); an empty cluster keeps its centroid."""
    for c in range(centroids.shape[0]):
        members = labels == c
        if not np.any(members):
            continue
        if weights is None:  # the unweighted path, bit for bit as before weights existed
            centroids[c] = features[members].mean(0)
        else:
            centroids[c] = np.average(features[members], axis=0, weights=weights[members])


def _inertia(
    features: np.ndarray, centroids: np.ndarray, labels: np.ndarray, weights: np.ndarray | None
) -> float:
    """Sum of (weighted) squared distances of the rows ``(M, D)`` to their centroids."""
    squared = (features - centroids[labels]) ** 2
    if weights is None:
        return float(squared.sum())
    return float((np.asarray(weights) * squared.sum(1)).sum())


def squared_distances(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(M, k)`` squared Euclidean distances of ``features`` ``(M, D)`` to ``centroids``
    ``(k, D)``, as ``|x|^2 - 2 x.c + |c|^2``: memory ``M * k``, never ``M * k * D``."""
    sq = (features**2).sum(1)[:, None] - 2.0 * features @ centroids.T + (centroids**2).sum(1)
    return np.maximum(sq, 0.0)  # rounding can dip a zero distance below 0


MAX_PERMUTATION_CELLS = 20_000_000  # owners x permutations x rows scored at once


def constrained_assignment(
    features: np.ndarray,
    centroids: np.ndarray,
    groups: Sequence[np.ndarray],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The assignment step of :func:`constrained_kmeans_labels`.

    ``features`` ``(M, D)``, ``centroids`` ``(k, D)``; ``groups`` are the row indices of each
    owner. An owner's rows go to distinct clusters at least total squared distance (each row's
    times its ``weights`` ``(M,)`` entry, when given); an owner with more rows than clusters,
    each to its nearest centroid. Returns ``(M,)`` labels.

    Owners with the same number of rows r are solved together: every injective map of r rows
    to k clusters (``k! / (k - r)!`` of them, few for the handful of tasks a client holds) is
    scored for all those owners at once, in chunks of at most
    :data:`MAX_PERMUTATION_CELLS`; where there are too many maps, each owner gets its own
    Hungarian assignment (scipy).
    """
    k = centroids.shape[0]
    cost = squared_distances(features, centroids)  # (M, k)
    if weights is not None:
        cost = cost * np.asarray(weights, dtype=np.float64)[:, None]
    labels = np.empty(features.shape[0], dtype=np.int64)
    by_size: dict[int, list[np.ndarray]] = defaultdict(list)
    for rows in groups:
        by_size[len(rows)].append(np.asarray(rows))
    for r, members in by_size.items():
        rows = np.stack(members)  # (G, r)
        if r > k:
            labels[rows] = cost[rows].argmin(-1)
            continue
        maps = _injective_maps(k, r)
        if maps is None:
            owners = list(rows)
            labels[rows.ravel()] = hungarian_assignment(cost, owners)[rows.ravel()]
            continue
        chunk = max(1, MAX_PERMUTATION_CELLS // (len(maps) * r))
        for start in range(0, len(rows), chunk):
            block = rows[start : start + chunk]  # (g, r)
            totals = cost[block][:, np.arange(r), maps].sum(-1)  # (g, maps)
            labels[block] = maps[totals.argmin(1)]
    return labels


def hungarian_assignment(cost: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """The assignment step by definition, one owner at a time: an owner's rows go to distinct
    clusters at least total ``cost`` ``(M, k)`` (scipy's Hungarian), or each to its cheapest
    when it has more rows than clusters. Rows in no group are labelled -1."""
    k = cost.shape[1]
    labels = np.full(cost.shape[0], -1, dtype=np.int64)
    for rows in groups:
        if len(rows) > k:
            labels[rows] = cost[rows].argmin(1)
        else:
            i, c = linear_sum_assignment(cost[rows])
            labels[rows[i]] = c
    return labels


def _injective_maps(k: int, r: int, limit: int = 50_000) -> np.ndarray | None:
    """Every way to send r rows to distinct clusters of k, ``(k! / (k - r)!, r)``; ``None``
    when there are more than ``limit``."""
    count = math.perm(k, r)
    if count > limit:
        return None
    return np.asarray(list(itertools.permutations(range(k), r)), dtype=np.int64).reshape(count, r)


SILHOUETTE_SAMPLE = 1000  # above this many adapters, auto K looks at a seeded sample
SAMPLE_N_INIT = 3  # K-means restarts per K on that sample (the final clustering keeps n_init)


def choose_k(features: np.ndarray, k_min: int, k_max: int, seed: int, n_init: int = 10) -> int:
    """Automatic K: the K in ``[k_min, k_max]`` (capped at M-1) with the best silhouette score
    of K-means (see :func:`auto_kmeans`, which also returns the clustering)."""
    return auto_kmeans(features, k_min, k_max, seed, n_init)[0]


def auto_kmeans(
    features: np.ndarray,
    k_min: int,
    k_max: int,
    seed: int,
    n_init: int = 10,
    weights: np.ndarray | None = None,
) -> tuple[int, np.ndarray]:
    """Automatic K and the K-means labels ``(M,)`` it chose, for ``features`` ``(M, D)``.

    Each K in ``[k_min, k_max]`` (capped at M-1) is scored by the silhouette of a K-means fit
    with ``n_init`` restarts; the best K's fit is the clustering, not fitted again. Above
    :data:`SILHOUETTE_SAMPLE` adapters the scan runs on a seeded sample of that many with at
    most :data:`SAMPLE_N_INIT` restarts per K (restarts for every K, and silhouette's O(M^2),
    made this slow at thousands), and all M adapters are then clustered by one K-means started
    from the sample's centroids for the chosen K. ``weights`` ``(M,)`` weigh the rows in every
    K-means fit (None: all 1); the silhouette counts every adapter once."""
    m = features.shape[0]
    sample, sample_weights, scan_init = features, weights, n_init
    sampled = m > SILHOUETTE_SAMPLE
    if sampled:
        rows = np.sort(np.random.default_rng(seed).choice(m, SILHOUETTE_SAMPLE, replace=False))
        sample, scan_init = features[rows], min(n_init, SAMPLE_N_INIT)
        sample_weights = None if weights is None else weights[rows]
    upper = min(k_max, sample.shape[0] - 1)
    if upper < k_min:
        k = max(1, min(k_min, m))
        return k, kmeans_labels(features, k, seed, n_init, weights)
    distances = pairwise_distances(sample)  # (m, m), once for every K: silhouette's main cost
    fits = {
        k: fitted_kmeans(sample, k, seed, scan_init, weights=sample_weights)
        for k in range(k_min, upper + 1)
    }
    scores = {
        k: float(silhouette_score(distances, labels, metric="precomputed"))
        for k, (labels, _) in fits.items()
    }
    best = max(scores, key=lambda k: (scores[k], -k))
    if not sampled:
        return best, fits[best][0]
    return best, fitted_kmeans(features, best, seed, init=fits[best][1], weights=weights)[0]


def label_count_mismatch(
    adapter: Adapter, start: Adapter, classes: int, head_keys: Sequence[str]
) -> int | None:
    """How many logits ``adapter``'s head moved from ``start``, when a task of ``classes``
    classes cannot have moved that many (:func:`head_label_counts`); ``None`` when it can, or
    when the head did not move (that says nothing)."""
    (moved,) = head_label_counts([adapter], [start], head_keys)
    return None if moved in (0, classes) else int(moved)


def slot_order(
    adapters: Sequence[Adapter],
    starts: Sequence[Adapter],
    classes: Sequence[int],
    head_keys: Sequence[str],
    tolerance: float = 1e-9,
) -> list[int] | None:
    """Which of a reply's adapters belongs to which of its slots, when they came in another order.

    Adapter j fits slot i when, measured from the adapter slot i started from, its head moved
    exactly the slot's C_i logits, or none (:func:`head_label_counts`). Of the orders in which
    every adapter fits its slot, the one whose adapters lie nearest their slots' starts (least
    total squared distance: a round's update continues from its start, away from the other
    tasks' globals) is taken, if no other order is as near: when every slot started from the
    same adapter (v0 in round 1) every order is, and the counts alone must single one out.

    Parameters
    ----------
    adapters, starts : Sequence[Mapping[str, np.ndarray]]
        The reply's n adapters in the order they came; the adapter each of its n slots
        started from (same keys and shapes).
    classes : Sequence[int]
        ``(n,)``: C_i, the classes of each slot's data (its label fingerprint's rows).
    head_keys : Sequence[str]
        The head's tensors, each with the logit on axis 0.
    tolerance : float
        Relative difference of total distance under which two orders are as near.

    Returns
    -------
    list[int] | None
        ``order``: slot i's adapter is ``adapters[order[i]]``; ``None`` when no order fits
        or two fit equally near.
    """
    n = len(adapters)
    cost = np.full((n, n), np.inf)
    for i, (start, count) in enumerate(zip(starts, classes, strict=True)):
        for j, adapter in enumerate(adapters):
            if label_count_mismatch(adapter, start, count, head_keys) is None:
                cost[i, j] = _distance(adapter, start) ** 2
    best = _cheapest_order(cost)
    if best is None:
        return None
    total = float(cost[np.arange(n), best].sum())
    for i in range(n):  # any other order leaves out at least one of the best's pairs
        without = cost.copy()
        without[i, best[i]] = np.inf
        other = _cheapest_order(without)
        if other is not None and cost[np.arange(n), other].sum() <= total * (1 + tolerance):
            return None
    return best.tolist()


def _cheapest_order(cost: np.ndarray) -> np.ndarray | None:
    """The assignment of least finite total ``cost`` ``(n, n)`` (row -> column), or None when
    every assignment takes an infinite entry."""
    finite = np.isfinite(cost)
    if not finite.any():
        return None
    big = float(cost[finite].sum()) + 1.0  # dearer than any all-finite assignment
    rows, cols = linear_sum_assignment(np.where(finite, cost, big))
    return cols if finite[rows, cols].all() else None


def tasks_lower_bound(owners: Sequence[int]) -> int:
    """The most adapters any one owner uploaded: a lower bound on the number of tasks.

    A client trains one adapter per *distinct* local task, so an owner with n adapters proves
    that at least n tasks exist. It is exact as soon as one client holds every task.
    """
    counts = Counter(int(o) for o in owners)
    return max(counts.values()) if counts else 1


def head_label_counts(
    adapters: Sequence[Adapter], starts: Sequence[Adapter], head_keys: Sequence[str]
) -> np.ndarray:
    """How many logits each adapter's training moved: its task's label count, read exactly.

    Heads are shared-width and a task with C labels masks logits C and up out of its loss, so
    its training never changes head rows C and up (exactly: their gradient is 0, and neither
    Adam nor SGD moves a parameter with zero gradient when weight decay is 0).

    Parameters
    ----------
    adapters, starts : Sequence[Mapping[str, np.ndarray]]
        M uploaded adapters and the adapter each one started from this round.
    head_keys : Sequence[str]
        The head's tensors, each with the logit on axis 0 (weight ``(C_max, H)``, bias
        ``(C_max,)``).

    Returns
    -------
    np.ndarray
        ``(M,)`` int: 1 + the last head row that moved (0: no row moved).
    """
    counts = np.zeros(len(adapters), dtype=np.int64)
    for m, (adapter, start) in enumerate(zip(adapters, starts, strict=True)):
        moved = np.zeros(0, dtype=bool)
        for key in head_keys:
            delta = np.asarray(adapter[key], np.float64) - np.asarray(start[key], np.float64)
            rows = np.abs(delta.reshape(delta.shape[0], -1)).max(1) > 0
            moved = rows if moved.size == 0 else moved | rows
        counts[m] = int(np.flatnonzero(moved).max()) + 1 if moved.any() else 0
    return counts


def label_count_bounds(
    counts: Sequence[int], owners: Sequence[int], bounds: Mapping[int, int]
) -> dict[int, int]:
    """Fewest tasks each label count proves: the most adapters one owner has of it, or ``bounds``.

    Returns
    -------
    dict[int, int]
        Label count -> lower bound on its number of tasks (at least 1).
    """
    counts_arr, owners_arr = np.asarray(counts), np.asarray(owners)
    return {
        int(c): max(tasks_lower_bound(owners_arr[counts_arr == c].tolist()), bounds.get(int(c), 1))
        for c in sorted(set(counts_arr.tolist()))
    }


def clusters_per_label_count(
    counts: Sequence[int], owners: Sequence[int], k: int | None, bounds: Mapping[int, int]
) -> dict[int, int] | None:
    """Split K among the label-count groups (a cannot-link between different label counts).

    Each group needs at least as many clusters as the most adapters one owner has in it (its
    tasks are distinct), or as ``bounds`` (the same, over earlier rounds). With ``k=None``
    (automatic K) that lower bound is the group's K. With a fixed ``k``, the clusters left over
    go one at a time to the group with the most adapters per cluster.

    Parameters
    ----------
    counts : Sequence[int]
        ``(M,)`` label count of each adapter (:func:`head_label_counts`).
    owners : Sequence[int]
        ``(M,)`` owner of each adapter.
    k : int | None
        The total K, or None for automatic K.
    bounds : Mapping[int, int]
        Lower bound per label count seen in earlier rounds.

    Returns
    -------
    dict[int, int] | None
        Label count -> K of that group; None when a fixed ``k`` is smaller than the groups need
        (then the caller clusters without the split).
    """
    need = label_count_bounds(counts, owners, bounds)
    sizes = {c: int(np.sum(np.asarray(counts) == c)) for c in need}
    if k is None:
        return need
    if sum(need.values()) > k:
        return None
    split = dict(need)
    for _ in range(k - sum(need.values())):
        room = {c: sizes[c] / split[c] for c in split if split[c] < sizes[c]}
        if not room:
            break
        split[max(room, key=lambda c: (room[c], -c))] += 1
    return split


def group_means(
    adapters: Sequence[Adapter],
    labels: Sequence[int],
    weights: Sequence[float] | None = None,
    aggregate: RobustAggregation | None = None,
    references: Sequence[Adapter] | None = None,
    examples: Sequence[int] | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Mean adapter of every group (unweighted as in the paper, or weighted by ``weights``),
    or its robust ``aggregate`` (``references``: the global each adapter started from;
    ``examples``: each adapter's training examples, for a clip that needs them).

    Returns
    -------
    dict[int, dict[str, np.ndarray]]
        Label -> adapter whose every tensor is the (weighted) mean over the label's members.
    """
    aggregate = aggregate or RobustAggregation()
    labels_arr = np.asarray(labels)
    out: dict[int, dict[str, np.ndarray]] = {}
    for label in sorted(set(labels_arr.tolist())):
        members = np.flatnonzero(labels_arr == label).tolist()
        member_weights = None if weights is None else [float(weights[m]) for m in members]
        if member_weights is not None and sum(member_weights) <= 0:
            member_weights = None
        refs = None if references is None else [references[m] for m in members]
        counts = None if examples is None else [examples[m] for m in members]
        out[int(label)] = aggregate([adapters[m] for m in members], member_weights, refs, counts)
    return out


def match_cluster_ids(
    labels: Sequence[int],
    previous_ids: Sequence[str | None],
    known_ids: Sequence[str],
    new_means: Mapping[int, Adapter] | None = None,
    previous_globals: Mapping[str, Adapter] | None = None,
) -> dict[int, str]:
    """Give each new cluster a stable global id.

    Cluster ``c`` takes the previous id held by most of its members (maximum total overlap over
    all clusters, by Hungarian assignment); where overlaps tie, the previous global adapter closest
    to the cluster's new mean wins. Clusters left without an id get fresh ones ``g<n>``.

    Parameters
    ----------
    labels : Sequence[int]
        New K-means label of every pooled adapter, shape ``(M,)``.
    previous_ids : Sequence[str | None]
        Global id each adapter's slot held before this round (None: none yet, e.g. round 1).
    known_ids : Sequence[str]
        Ids in use so far (candidates to keep).
    new_means, previous_globals : optional
        Cluster means and previous global adapters, used to break overlap ties by distance.

    Returns
    -------
    dict[int, str]
        New label -> global id, injective.
    """
    clusters = sorted(set(int(c) for c in labels))
    candidates = list(known_ids)
    mapping: dict[int, str] = {}
    if candidates:
        overlap = np.zeros((len(clusters), len(candidates)))
        for label, prev in zip(labels, previous_ids, strict=True):
            if prev in candidates:
                overlap[clusters.index(int(label)), candidates.index(prev)] += 1
        distance = np.zeros_like(overlap)
        if new_means is not None and previous_globals is not None:
            for i, c in enumerate(clusters):
                for j, gid in enumerate(candidates):
                    if gid in previous_globals:
                        distance[i, j] = _distance(new_means[c], previous_globals[gid])
            if distance.max() > 0:
                distance = distance / distance.max()
        # Overlap counts are integers, so a distance term < 1 only ever breaks ties.
        cost = -overlap + 0.5 * distance
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols, strict=True):
            if overlap[r, c] > 0 or (new_means is not None and previous_globals is not None):
                mapping[clusters[r]] = candidates[c]
    used = set(mapping.values())
    fresh = (f"g{n}" for n in range(10**6) if f"g{n}" not in used and f"g{n}" not in candidates)
    for c in clusters:
        if c not in mapping:
            mapping[c] = next(fresh)
    return mapping


def clustering_agreement(true_tasks: Sequence[str], labels: Sequence[int]) -> float:
    """Adjusted Rand index between the true tasks and the cluster labels (1.0 = perfect)."""
    if len(true_tasks) < 2:
        return 1.0
    return float(adjusted_rand_score(list(true_tasks), list(labels)))


def grouping_scatter(features: np.ndarray, groups: Sequence[Hashable]) -> float:
    """K-means' objective for a given grouping: the summed squared distance of the rows
    ``(M, D)`` to their group's mean, groups given by any hashable label ``(M,)`` (a task
    name or a cluster index). Comparing the true tasks' value with K-means' shows whether a
    miss is the search's (the tasks scatter less) or the features' (they scatter more)."""
    _, labels = np.unique(np.asarray(list(groups)), return_inverse=True)
    labels = labels.ravel()
    centroids = np.zeros((int(labels.max()) + 1, features.shape[1]))
    _update_centroids(centroids, features, labels, None)  # each group's mean
    return _inertia(features, centroids, labels, None)


def choose_sources(
    losses: Sequence[np.ndarray], current: Sequence[int], min_llr: float
) -> tuple[list[int], float]:
    """Client-side source check: which received global each task slot should start from.

    IFCA's client-side cluster estimation, restricted to the clusters the server already put
    this client in: the client's slots are distinct tasks, so the best start is a one-to-one
    assignment of slots to the received global adapters that minimises the summed loss on the
    slots' own examples. Losses are negative log-likelihoods of the labels, so the summed loss
    reduction of a reassignment is its log-likelihood ratio against the server's plan; the plan
    is kept unless that ratio reaches ``min_llr`` (nats: ln 100 = 4.6 means the labels are 100
    times likelier under the change). No slot is moved against its own labels: a slot either
    keeps its global or moves to one under which its own examples' loss is lower, so a large gain
    of one slot can never pay for moving another to a global that fits it worse (a chain of
    moves through related tasks' clusters, seen on ``stress_eight``).

    Parameters
    ----------
    losses : Sequence[np.ndarray]
        One ``(n_i, C)`` array per slot i: the loss of each of the C candidate globals on each of
        the slot's ``n_i`` examples.
    current : Sequence[int]
        ``(S,)`` candidate index each slot starts from now (the server's assignment).
    min_llr : float
        Evidence needed to change anything, in nats.

    Returns
    -------
    tuple[list[int], float]
        Candidate index per slot, and the log-likelihood ratio of the best change over the plan
        (0.0: the plan is already the best).
    """
    num_slots = len(losses)
    if num_slots == 0:
        return [], 0.0
    num_candidates = int(losses[0].shape[1])
    total = np.stack([np.asarray(x, np.float64).sum(0) for x in losses])  # (S, C)
    if num_candidates >= num_slots and len(set(current)) == num_slots:
        proposal = _best_moves(total, current)
    else:  # no one-to-one plan to keep (plain K-means merged two slots): each slot on its own
        proposal = [int(c) for c in total.argmin(1)]
    slots = range(num_slots)
    llr = float(sum(total[i, current[i]] - total[i, proposal[i]] for i in slots))
    if llr <= 0.0:
        return list(current), 0.0
    return (proposal if llr >= min_llr else list(current)), llr


def _best_moves(total: np.ndarray, current: Sequence[int]) -> list[int]:
    """The one-to-one assignment ``(S,)`` of least summed loss among those in which every slot
    keeps its global or moves to one it fits strictly better (``total`` is ``(S, C)``)."""
    plan = (np.arange(len(current)), np.asarray(current))
    allowed = total < total[plan][:, None]  # (S, C): fits that global better than its own
    allowed[plan] = True  # staying is always allowed
    forbidden = float(np.abs(total).sum() + 1.0)  # dearer than any allowed assignment
    rows, cols = linear_sum_assignment(np.where(allowed, total, forbidden))
    return [int(c) for _, c in sorted(zip(rows, cols, strict=True))]


def node_payload(slot_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """What one node needs: the distinct global ids of its slots, and slot -> id.

    A node whose two task slots fell into the same cluster receives that adapter once.
    """
    return sorted(set(slot_ids)), list(slot_ids)


def _distance(a: Adapter, b: Adapter) -> float:
    return float(
        np.sqrt(
            sum(
                np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)
                for k in a
            )
        )
    )


# --------------------------------------------------------------------------------------------
# Flower glue
# --------------------------------------------------------------------------------------------
@dataclass
class FLTACRoundRecord(RoundRecord):
    """FL-TAC's round: the shared entries and what the clustering and evaluation found.

    Attributes
    ----------
    num_adapters : int | None
        Task adapters clustered this round.
    groups : dict[str, int] | None
        Adapters per global adapter id.
    clusters_per_label_count : dict[str, int] | None
        K of each label-count group (``fltac.split_by_label_count``).
    source_swaps : int | None
        Adapters a client's source check started from another of its globals.
    replies_reordered : int | None
        Replies whose adapters were taken in another order than they came
        (``fltac.reorder_mismatched_adapters``; set in rounds with one).
    clustering_agreement : float | None
        ARI between the groups and the true tasks (``report_true_tasks``; metrics only).
    group_tasks : dict[str, dict[str, int]] | None
        True tasks in each group (metrics only).
    embedding : dict[str, list[Any]] | None
        2-D embedding of the adapters' features with their task, group and node (plots).
    feature_projection : dict[str, int] | None
        Feature width before and after the random projection, when it applied.
    accuracy : dict[str, float] | None
        Test accuracy per task.
    test_examples : dict[str, int] | None
        Test examples per task.
    """

    num_adapters: int | None = None
    groups: dict[str, int] | None = None
    clusters_per_label_count: dict[str, int] | None = None
    source_swaps: int | None = None
    replies_reordered: int | None = None
    clustering_agreement: float | None = None
    group_tasks: dict[str, dict[str, int]] | None = None
    embedding: dict[str, list[Any]] | None = None
    feature_projection: dict[str, int] | None = None
    accuracy: dict[str, float] | None = None
    test_examples: dict[str, int] | None = None


@dataclass
class PoolEntry:
    """One uploaded adapter: who sent it, for which slot, and what that slot had received."""

    node_id: int
    slot: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    previous_id: str
    true_task: str | None
    fingerprint: np.ndarray | None = None
    label_fingerprint: np.ndarray | None = None
    moved: bool = False  # the client's source check started it from another of its globals


def _example_counts(pool: Sequence[PoolEntry]) -> list[float]:
    """``(M,)`` each pooled adapter's reported training-example count."""
    return [float(e.num_examples) for e in pool]


def entry_digest(entry: PoolEntry) -> str:
    """SHA-256 of an uploaded adapter's tensors (sorted by name) and its fingerprints."""
    digest = hashlib.sha256()
    for key in sorted(entry.arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(entry.arrays[key]).tobytes())
    if entry.fingerprint is not None:
        digest.update(np.ascontiguousarray(entry.fingerprint).tobytes())
    if entry.label_fingerprint is not None:
        digest.update(np.ascontiguousarray(entry.label_fingerprint).tobytes())
    return digest.hexdigest()


def check_settings(
    num_clusters: int | str,
    feature_source: str,
    weighting: str,
    clustering: str,
    source_check_llr: float | None,
    kmeans_weighting: str = "uniform",
    refine_moves: bool = False,
) -> None:
    """Refuse settings the strategy cannot run with (``ConfigError``, a ``ValueError``, naming
    the setting): the config's own ranges (:func:`fedspecialists.config.check_setting`)."""
    if num_clusters is None:  # the config's null is resolved to the number of tasks before
        raise ConfigError("num_clusters: pass the number of tasks or 'auto', not None")
    check_setting("fltac.num_clusters", num_clusters)
    check_setting("fltac.feature_source", feature_source)
    check_setting("fltac.weighting", weighting)
    check_setting("fltac.kmeans_weighting", kmeans_weighting)
    check_setting("fltac.clustering", clustering)
    check_refine_moves(refine_moves, clustering, kmeans_weighting)
    if source_check_llr is not None:  # None: no source check
        check_setting("fltac.source_check_llr", source_check_llr)


def round_kwargs(cfg: AdapterRunConfig) -> dict[str, Any]:
    """Constructor arguments every adapter strategy reads from ``cfg`` (features, rounds)."""
    return {
        "feature_source": cfg.fltac.feature_source,
        "feature_tensors": cfg.fltac.feature_tensors,
        "normalize": cfg.fltac.normalize,
        "head_module": cfg.model.head_module,
        "seed": cfg.seed,
        "fraction_train": cfg.federation.fraction_train,
        "min_replies": cfg.federation.min_replies,
        "max_abs_value": cfg.validation.max_abs_value,
        "max_update_norm": cfg.validation.max_update_norm,
        "robust": RobustAggregation.from_settings(cfg.robust, cfg.train),
        "absent_clients": absent_clients(cfg),
        "pack_arrays": cfg.federation.pack_arrays,
    }


class TaskAdapterClustering(RoundBookkeeping[FLTACRoundRecord], Strategy):
    """FL-TAC's server (Flower Message API): cluster all task adapters, average per cluster.

    Every node gets its own message carrying exactly the global adapters its task slots need
    (``adapter.<id>`` ArrayRecords plus a ``slot-sources`` list); it replies with one adapter per
    local task (``adapter.slot<i>``), without task labels. Replies that fail validation are
    rejected with a logged reason and never enter clustering or aggregation; failed nodes keep
    their previous adapters.

    Parameters
    ----------
    initial_adapter : Mapping[str, np.ndarray]
        The round-0 adapter v0 broadcast to every node; also the template (keys, shapes) every
        uploaded adapter must match.
    num_clusters : int | str, default 4
        K: an int (the number of tasks, as in the paper) or ``"auto"`` (best silhouette score for
        K in ``auto_k_range``).
    auto_k_range : tuple[int, int], default (2, 8)
        Range of K tried when ``num_clusters="auto"``.
    kmeans_n_init : int, default 10
        K-means restarts.
    clustering : str, default "constrained_kmeans"
        ``kmeans`` (the paper) or ``constrained_kmeans``: K-means in which the adapters of one
        node never share a cluster (a node trains one adapter per distinct task).
    feature_source : str, default "cumulative"
        What K-means sees: ``cumulative`` (adapter - v0), ``update`` (adapter - what the slot
        received this round), ``weights`` (raw), or ``cumulative+update`` (both blocks side by
        side, each normalised on its own: where an adapter is, and where it is going).
    feature_tensors : str, default "head"
        Tensors K-means sees: ``head``, ``lora`` (A and B) or ``all``.
    normalize : bool, default True
        L2-normalise each adapter's feature vector.
    weighting : str, default "uniform"
        Mean inside a cluster: ``uniform`` (the paper) or ``samples`` (by local example count).
    kmeans_weighting : str, default "uniform"
        How much each adapter counts in K-means: ``uniform`` (each the same, the paper) or
        ``samples`` (its local example count: weighted K-means, see
        :func:`constrained_kmeans_labels`). Plain ``kmeans`` with ``num_clusters="auto"``
        (the silhouette scan, :func:`auto_kmeans`) stays unweighted.
    input_fingerprint : bool, default False
        Ask clients for each adapter's input fingerprint (the mean representation of its task's
        training inputs under the frozen base model) and cluster on it together with the
        adapter features (see :func:`fingerprint_features`). A reply without valid
        fingerprints is rejected. ``False`` is the paper: the server sees adapters only.
    label_fingerprint : bool, default False
        Ask clients also for each adapter's label fingerprint (per class, the mean input
        representation of that class minus the mean over the task's classes) and cluster on it
        as a third block (see :func:`label_fingerprint_features`). A reply without valid label
        fingerprints is rejected.
    fingerprints_only_from_v0 : bool, default False
        Cluster a pool whose adapters all started from v0 (round 1) on its fingerprints alone:
        a head a few steps from v0 moves mostly with its client's label balance.
    reject_label_count_mismatch : bool, default False
        With ``label_fingerprint``: reject a reply in which an adapter's head moved another
        number of logits (:func:`head_label_counts`) than its slot's label fingerprint has
        classes. Honest training moves exactly the task's logits, so this never refuses an
        honest reply (weight decay 0); it refuses an adapter trained on another task's data.
    reorder_mismatched_adapters : bool, default False
        With ``reject_label_count_mismatch``: a reply whose adapters fit their slots only in
        another order, and in one order nearer their starts than any other, is taken in that
        order (logged, counted in ``replies_reordered``) instead of refused (:func:`slot_order`).
    refine_moves : bool, default False
        After constrained K-means, :func:`refine_by_moves` (Hartigan's moves within the
        cannot-links; unweighted K-means only). Measured as an option, not the default.
    projection_dim, projection_min_adapters : int, default 0 and 1000
        With more than ``projection_min_adapters`` adapters in a round's pool, K-means sees
        the features randomly projected to ``projection_dim`` columns
        (:func:`random_projection`), where they have more; 0 never projects.
    head_module : str, default "classifier"
        Name of the classification head inside the adapter.
    seed : int, default 0
        Seed of K-means and node sampling.
    fraction_train : float, default 1.0
        Fraction of nodes sampled each round (the paper uses all).
    min_replies : int, default 1
        Fewer valid replies than this: the round's aggregation is skipped (logged).
    max_abs_value : float, default 1e4
        Largest absolute tensor value accepted in a reply.
    max_update_norm : float | None, default None
        Largest L2 norm of an adapter's update accepted (None: no bound).
    keep_local : bool, default False
        Ask clients to keep their adapters in their own state (the local-only baseline).
    on_round_end : Callable[[dict], None] | None
        Receives each round's metrics record (the ServerApp writes it to disk).
    absent_clients : FaultDraw | None
        Clients never sampled for training in a round (``faults.kind=absent``).
    pack_arrays : bool, default True
        Every ArrayRecord of a message travels as one safetensors array
        (:mod:`fedspecialists.protocol.packing`); the bytes counted are the packed ones.
    """

    method = "fltac"
    reports_clustering = True  # clustering agreement is meaningless for one group (FedIT)

    def __init__(
        self,
        initial_adapter: Mapping[str, np.ndarray],
        num_clusters: int | str,
        auto_k_range: tuple[int, int] = (2, 8),
        kmeans_n_init: int = 10,
        clustering: str = "constrained_kmeans",
        feature_source: str = "cumulative",
        feature_tensors: str = "head",
        normalize: bool = True,
        weighting: str = "uniform",
        kmeans_weighting: str = "uniform",
        input_fingerprint: bool = True,
        label_fingerprint: bool = False,
        fingerprints_only_from_v0: bool = False,
        reject_label_count_mismatch: bool = False,
        reorder_mismatched_adapters: bool = False,
        refine_moves: bool = False,
        projection_dim: int = 256,
        projection_min_adapters: int = 1000,
        source_check_llr: float | None = 4.6,
        split_by_label_count: bool = True,
        head_module: str = "classifier",
        seed: int = 0,
        fraction_train: float = 1.0,
        min_replies: int = 1,
        max_abs_value: float = 1.0e4,
        max_update_norm: float | None = None,
        keep_local: bool = False,
        robust: RobustAggregation | None = None,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        absent_clients: FaultDraw | None = None,
        pack_arrays: bool = True,
    ) -> None:
        check_settings(
            num_clusters,
            feature_source,
            weighting,
            clustering,
            source_check_llr,
            kmeans_weighting,
            refine_moves,
        )
        self.robust = robust or RobustAggregation()  # the plain mean unless configured
        self.init_rounds(
            FLTACRoundRecord,
            seed,
            fraction_train,
            min_replies,
            max_abs_value,
            on_round_end,
            absent_clients,
            pack_arrays,
        )
        self.template = {k: np.asarray(v) for k, v in initial_adapter.items()}
        # A fingerprint is the head's input: its width is the head's in-features (else the
        # first valid reply's, e.g. a causal LM whose adapter carries no head).
        self.fingerprint_width: int | None = head_input_width(self.template, head_module)
        shape = head_shape(self.template, head_module)
        self.max_label_rows = None if shape is None else shape[0]  # no head: no bound
        self.num_clusters = num_clusters
        self.auto_k_range = auto_k_range
        self.kmeans_n_init = kmeans_n_init
        self.clustering = clustering
        self.feature_source = feature_source
        self.feature_keys = select_feature_keys(list(self.template), feature_tensors, head_module)
        self.feature_tensors = feature_tensors
        self.normalize = normalize
        self.weighting = weighting
        self.kmeans_weighting = kmeans_weighting
        self.input_fingerprint = input_fingerprint
        self.label_fingerprint = label_fingerprint
        self.fingerprints_only_from_v0 = fingerprints_only_from_v0
        self.reject_label_count_mismatch = reject_label_count_mismatch
        self.reorder_mismatched_adapters = reorder_mismatched_adapters
        self.refine_moves = refine_moves
        self.projection_dim = projection_dim
        self.projection_min_adapters = projection_min_adapters
        self.source_check_llr = source_check_llr
        self.split_by_label_count = split_by_label_count
        try:
            self.head_keys: list[str] | None = select_feature_keys(
                list(self.template), "head", head_module
            )
        except ValueError:  # no head (a causal LM's adapter): nothing to read label counts from
            self.head_keys = None
        self.label_count_bounds: dict[int, int] = {}
        self.max_update_norm = max_update_norm
        self.keep_local = keep_local
        # Global adapters by id ("v0" is the broadcast init) and each client's slot -> id.
        self.globals: dict[str, dict[str, np.ndarray]] = {"v0": dict(self.template)}
        self.node_slots: dict[int, list[str]] = {}
        self.majority_task: dict[str, str] = {}

    @classmethod
    def from_config(
        cls,
        cfg: AdapterRunConfig,
        initial_adapter: Mapping[str, np.ndarray],
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> TaskAdapterClustering:
        """This strategy with its settings read from the experiment config (``fltac.*``, ...)."""
        return cls(initial_adapter, on_round_end=on_round_end, **cls.config_kwargs(cfg))

    @classmethod
    def config_kwargs(cls, cfg: AdapterRunConfig) -> dict[str, Any]:
        """The constructor's keyword arguments this method takes from ``cfg``."""
        fltac = cfg.fltac
        return {
            **round_kwargs(cfg),
            "weighting": fltac.weighting,
            "kmeans_weighting": fltac.kmeans_weighting,
            "num_clusters": num_clusters(cfg),
            "auto_k_range": (fltac.auto_k_min, fltac.auto_k_max),
            "kmeans_n_init": fltac.kmeans_n_init,
            "clustering": fltac.clustering,
            "input_fingerprint": fltac.input_fingerprint,
            "label_fingerprint": fltac.label_fingerprint,
            "fingerprints_only_from_v0": fltac.fingerprints_only_from_v0,
            "reject_label_count_mismatch": fltac.reject_label_count_mismatch,
            "reorder_mismatched_adapters": fltac.reorder_mismatched_adapters,
            "refine_moves": fltac.refine_moves,
            "projection_dim": fltac.projection_dim,
            "projection_min_adapters": fltac.projection_min_adapters,
            "source_check_llr": fltac.source_check_llr if fltac.source_check else None,
            "split_by_label_count": fltac.split_by_label_count,
        }

    # -- what each method changes --------------------------------------------------------------
    def assign_groups(
        self, server_round: int, pool: Sequence[PoolEntry], features: np.ndarray
    ) -> list[str] | None:
        """Global id for every pooled adapter (entries with equal ids are averaged together).

        FL-TAC: K-means on ``features`` ``(M, D)``, clusters matched to stable ids. Returning
        ``None`` means "no aggregation" (the local-only baseline).
        """
        seed = self.seed + server_round
        labels = self.cluster(pool, features, seed)
        means = self.cluster_means(pool, labels)
        known = [gid for gid in self.globals if gid != "v0"]
        mapping = match_cluster_ids(
            labels, [e.previous_id for e in pool], known, means, self.globals
        )
        return [mapping[label] for label in labels]

    def cluster(self, pool: Sequence[PoolEntry], features: np.ndarray, seed: int) -> list[int]:
        """K-means labels ``(M,)``: within each label-count group when the split is on."""
        owners = np.asarray([e.node_id for e in pool])
        weights = self.kmeans_weights(pool)
        split = self.label_count_split(pool)
        if split is None:
            if self.num_clusters == "auto" and self.clustering != "constrained_kmeans":
                low, high = self.auto_k_range  # the scan's best fit is the clustering
                fit = auto_kmeans(features, low, high, seed, self.kmeans_n_init, weights)
                return fit[1].tolist()
            return self._kmeans(features, owners, self.cluster_count(pool), seed, weights).tolist()
        counts, per_group = split
        labels = np.zeros(len(pool), dtype=np.int64)
        offset = 0
        for count, k in sorted(per_group.items()):
            rows = np.flatnonzero(counts == count)
            part = None if weights is None else weights[rows]
            labels[rows] = self._kmeans(features[rows], owners[rows], k, seed, part) + offset
            offset += k
        return labels.tolist()

    def kmeans_weights(self, pool: Sequence[PoolEntry]) -> np.ndarray | None:
        """``(M,)`` each adapter's weight in K-means (its example count, at least 1), or None
        (``kmeans_weighting="uniform"``: every adapter counts once)."""
        if self.kmeans_weighting != "samples":
            return None
        return np.maximum(_example_counts(pool), 1.0)

    def _kmeans(
        self,
        features: np.ndarray,
        owners: np.ndarray,
        k: int,
        seed: int,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        if self.clustering == "constrained_kmeans":
            labels = constrained_kmeans_labels(
                features, owners.tolist(), k, seed, self.kmeans_n_init, weights=weights
            )
            if self.refine_moves:  # unweighted only: check_refine_moves
                return refine_by_moves(
                    features, owners.tolist(), labels, max(1, min(k, len(labels)))
                )
            return labels
        return kmeans_labels(features, k, seed=seed, n_init=self.kmeans_n_init, weights=weights)

    def label_count_split(
        self, pool: Sequence[PoolEntry]
    ) -> tuple[np.ndarray, dict[int, int]] | None:
        """Each adapter's label count ``(M,)`` and K per count, or None (no split this round).

        See :func:`head_label_counts` and :func:`clusters_per_label_count`.
        """
        if not self.split_by_label_count or self.head_keys is None:
            return None
        counts = head_label_counts([e.arrays for e in pool], self._starts(pool), self.head_keys)
        if np.any(counts == 0):
            log(WARNING, "an adapter's head did not move: no split by label count this round")
            return None
        owners = [e.node_id for e in pool]
        k = None if self.num_clusters == "auto" else int(self.num_clusters)
        per_group = clusters_per_label_count(counts.tolist(), owners, k, self.label_count_bounds)
        if per_group is None:
            log(WARNING, "K=%s is below what the label counts prove: no split", k)
            return None
        self.label_count_bounds.update(
            label_count_bounds(counts.tolist(), owners, self.label_count_bounds)
        )
        self.record.clusters_per_label_count = {str(c): k for c, k in per_group.items()}
        return counts, per_group

    def cluster_count(self, pool: Sequence[PoolEntry]) -> int:
        """K this round: the configured int, or ``auto`` with ``constrained_kmeans``: the most
        distinct tasks any node has shown so far (:func:`tasks_lower_bound` over this pool and
        every earlier upload), clipped to ``auto_k_range``. (``auto`` with plain ``kmeans`` is
        the best silhouette score, chosen together with the clustering: :func:`auto_kmeans`.)
        """
        if self.num_clusters != "auto":
            return int(self.num_clusters)
        low, high = self.auto_k_range
        owners = [e.node_id for e in pool]
        seen = max([tasks_lower_bound(owners), *(len(s) for s in self.node_slots.values())])
        return int(min(max(seen, low), high))

    def group_weights(self, pool: Sequence[PoolEntry]) -> list[float] | None:
        return _example_counts(pool) if self.weighting == "samples" else None

    def cluster_means(
        self,
        pool: Sequence[PoolEntry],
        labels: Sequence[int],
        names: Sequence[str] | None = None,
    ) -> dict[int, dict[str, np.ndarray]]:
        """Each cluster's aggregate (:attr:`robust`: the mean unless configured); an update
        (clipped, or screened for its direction) is measured against the global the adapter
        started from. ``names`` (label -> global id): log and count the adapters left out."""
        references = [self.globals.get(e.previous_id, self.template) for e in pool]
        arrays = [e.arrays for e in pool]
        opposed = self.robust.opposed(arrays, references, labels)
        with_nodes = self.robust.with_their_nodes(opposed, [e.node_id for e in pool], labels)
        if names is not None and self.robust.drop_opposed_updates:
            self.record_dropped(self._dropped_reasons(pool, labels, names, opposed, with_nodes))
        left_out = opposed.keys() | with_nodes.keys()
        kept = [i for i in range(len(pool)) if i not in left_out]
        kept_arrays, kept_labels = [arrays[i] for i in kept], [labels[i] for i in kept]
        kept_refs = [references[i] for i in kept]
        kept_examples = [pool[i].num_examples for i in kept]
        # the step clip's slope: one for all clusters of the round
        robust = self.robust.for_groups(kept_arrays, kept_refs, kept_examples, kept_labels)
        if names is not None and robust.clips:
            self.record_clipped(
                self._clipped_reasons(pool, labels, names, kept, references, robust)
            )
        weights = self.group_weights(pool)
        return group_means(
            kept_arrays,
            kept_labels,
            None if weights is None else [weights[i] for i in kept],
            robust,
            kept_refs,
            kept_examples,
        )

    def _clipped_reasons(
        self,
        pool: Sequence[PoolEntry],
        labels: Sequence[int],
        names: Sequence[str],
        kept: Sequence[int],
        references: Sequence[Adapter],
        robust: RobustAggregation,
    ) -> list[tuple[int, str]]:
        """``(node id, reason)`` of every kept adapter whose norm its cluster's clipping cut."""
        out = []
        for label in sorted({labels[i] for i in kept}):
            members = [i for i in kept if labels[i] == label]
            cut = robust.clipped_norms(
                [pool[i].arrays for i in members],
                [references[i] for i in members],
                [pool[i].num_examples for i in members],
            )
            for j, (before, after) in sorted(cut.items()):
                entry = pool[members[j]]
                where = f"node {entry.node_id} slot {entry.slot} (cluster {names[label]})"
                out.append((entry.node_id, f"{where}: norm {before:.4g} -> {after:.4g}"))
        return out

    @staticmethod
    def _dropped_reasons(
        pool: Sequence[PoolEntry],
        labels: Sequence[int],
        names: Sequence[str],
        opposed: Mapping[int, float],
        with_nodes: Mapping[int, int],
    ) -> list[tuple[int, str]]:
        """``(node id, reason)`` of every adapter left out, in pool order."""

        def where(i: int) -> str:
            return f"node {pool[i].node_id} slot {pool[i].slot} (cluster {names[labels[i]]})"

        reasons = {
            i: f"{where(i)}: opposed to its cluster's median update, cosine {cosine:.3f}"
            for i, cosine in opposed.items()
        }
        for i, cause in with_nodes.items():
            reasons[i] = (
                f"{where(i)}: its node sent an opposed update (slot {pool[cause].slot}, "
                f"cosine {opposed[cause]:.3f})"
            )
        return [(pool[i].node_id, reasons[i]) for i in sorted(reasons)]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_clusters": self.num_clusters,
            "clustering": self.clustering,
            "feature_source": self.feature_source,
            "feature_tensors": self.feature_tensors,
            "normalize": self.normalize,
            "weighting": self.weighting,
            "kmeans_weighting": self.kmeans_weighting,
            "input_fingerprint": self.input_fingerprint,
            "label_fingerprint": self.label_fingerprint,
            "fingerprints_only_from_v0": self.fingerprints_only_from_v0,
            "source_check_llr": self.source_check_llr,
            "split_by_label_count": self.split_by_label_count,
            "fraction_train": self.fraction_train,
            "min_replies": self.min_replies,
            "robust": self.robust,
        }

    # -- checkpoint --------------------------------------------------------------------------------
    def method_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The global adapters (``global/<id>/<tensor>``) and what the clustering keeps."""
        arrays = {
            f"global/{gid}/{name}": value
            for gid, params in self.globals.items()
            for name, value in params.items()
        }
        state = {
            "globals": sorted(self.globals),
            "node_slots": {str(client): slots for client, slots in self.node_slots.items()},
            "majority_task": dict(self.majority_task),
            "label_count_bounds": {str(c): k for c, k in self.label_count_bounds.items()},
            "fingerprint_width": self.fingerprint_width,
        }
        return arrays, state

    def method_restore(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        self.globals = {gid: {} for gid in state["globals"]}
        for key, value in arrays.items():
            _, gid, name = key.split("/", 2)
            self.globals[gid][name] = value
        self.node_slots = {int(c): list(slots) for c, slots in state["node_slots"].items()}
        self.majority_task = dict(state["majority_task"])
        self.label_count_bounds = {int(c): int(k) for c, k in state["label_count_bounds"].items()}
        width = state["fingerprint_width"]
        self.fingerprint_width = None if width is None else int(width)

    # -- Strategy API ----------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.begin_train_round(server_round, grid)
        messages = [
            Message(
                content=self.instruction(node, server_round, config).to_record(),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in nodes
        ]
        return self.ledger.count_messages("train", messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen_replies("train", replies, self._parse_train_reply)
        pool = [entry for _, (entries, _) in accepted for entry in entries]
        losses = [loss for _, (_, loss) in accepted if loss is not None]
        if self.too_few_replies(server_round, len(accepted), usable=bool(pool)):
            return None, None
        # Replies arrive in any order and node ids are drawn anew by every federation, while
        # K-means++ and ties depend on row order: order by content, the same in every run.
        pool.sort(key=entry_digest)
        self._aggregate(server_round, pool)
        train_loss = (
            sum(loss * n for loss, n in losses) / max(1, sum(n for _, n in losses))
            if losses
            else None
        )
        self.record.train_loss = train_loss
        self.record.aggregated = True
        metrics: dict[str, int | float | list[int] | list[float]] = {"num-adapters": len(pool)}
        if train_loss is not None:
            metrics["train-loss"] = float(train_loss)
        if self.record.clustering_agreement is not None:
            metrics["clustering-agreement"] = float(self.record.clustering_agreement)
        return None, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Every known node evaluates the adapters it would use now, on its own test split.
        messages = [
            Message(
                content=self.instruction(node, server_round, config).to_record(),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
            )
            for node in sorted(grid.get_node_ids(), key=self.client_of)
        ]
        return self.ledger.count_messages("evaluate", messages)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = self.ledger.count_replies("evaluate", replies)
        correct: dict[str, float] = defaultdict(float)
        total: dict[str, float] = defaultdict(float)
        for reply in replies:
            if reply.has_error():
                log_failed_reply(reply, "evaluate")
                continue
            try:
                result = EvaluateReply.from_record(reply_content(reply))
            except ProtocolError as exc:
                log_rejected_reply(reply.metadata.src_node_id, "evaluate", str(exc))
                continue
            for task, value in result.correct.items():
                correct[task] += value
            for task, value in result.total.items():
                total[task] += value
        accuracy = {task: correct[task] / total[task] for task in sorted(total) if total[task] > 0}
        mean = float(np.mean(list(accuracy.values()))) if accuracy else None
        self.record.accuracy = accuracy
        self.record.mean_accuracy = mean
        self.record.test_examples = {task: int(total[task]) for task in sorted(total)}
        self.close_round()
        out: dict[str, int | float | list[int] | list[float]] = {
            f"accuracy.{task}": acc for task, acc in accuracy.items()
        }
        if mean is not None:
            out["mean-accuracy"] = mean
        return MetricRecord(out) if out else None

    # -- helpers -----------------------------------------------------------------------------------
    def instruction(self, node: int, server_round: int, config: ConfigRecord) -> Instruction:
        """What ``node`` is sent: each slot's starting global (a new node: v0 for all)."""
        message = Instruction(
            server_round=server_round,
            keep_local=self.keep_local,
            send_fingerprint=self.input_fingerprint,
            send_label_fingerprint=self.label_fingerprint,
            check_sources=float(self.source_check_llr or 0.0),
            extra=dict(config),
        )
        slot_ids = self.node_slots.get(self.client_of(node))
        needed: list[str] = ["v0"]
        if slot_ids is not None:
            needed, message.slot_sources = node_payload(slot_ids)
        message.globals = {
            gid: state_to_record(self.globals[gid]) for gid in needed if gid != LOCAL
        }
        return message

    def _parse_train_reply(
        self, node: int, content: RecordDict
    ) -> tuple[str | None, tuple[list[PoolEntry], tuple[float, int] | None]]:
        """Validate one reply: (reason to reject or None, (its adapters, (loss, examples)))."""
        try:
            reply = TrainReply.from_record(content)
            return None, (self._pool_entries(node, reply), self._loss(reply))
        except ProtocolError as exc:
            return str(exc), ([], None)

    def _pool_entries(self, node: int, reply: TrainReply) -> list[PoolEntry]:
        """The reply's adapters as pool entries, each checked against the template, against
        its slot's label count (``reject_label_count_mismatch``) and against the global it
        started from (value bound, update norm)."""
        num_slots = len(reply.slot_examples)
        previous = self.node_slots.get(self.client_of(node), ["v0"] * num_slots)
        if len(previous) != num_slots:
            raise ProtocolError(f"{num_slots} slots, but the node had {len(previous)} before")
        used = self._parse_sources(reply, previous)
        fingerprints: list[np.ndarray | None] = [None] * num_slots
        label_fingerprints: list[np.ndarray | None] = [None] * num_slots
        if self.input_fingerprint:
            fingerprints = list(self._parse_fingerprints(reply.fingerprints, num_slots))
        if self.label_fingerprint:
            label_fingerprints = list(
                self._parse_label_fingerprints(reply.label_fingerprints, num_slots)
            )
        adapters, order = self._checked_adapters(reply, used, label_fingerprints)
        truth = reply.slot_tasks
        entries = []
        for i, arrays in enumerate(adapters):
            entries.append(
                PoolEntry(
                    node_id=node,
                    slot=i,
                    arrays=arrays,
                    num_examples=reply.slot_examples[i],
                    previous_id=used[i],
                    true_task=str(truth[i]) if truth is not None and i < len(truth) else None,
                    fingerprint=fingerprints[i],
                    label_fingerprint=label_fingerprints[i],
                    moved=used[i] != previous[i],
                )
            )
        if order is not None:
            log(
                WARNING,
                "node %s: its adapters fit their slots in the order %s, taken so",
                node,
                order,
            )
            self.record.replies_reordered = (self.record.replies_reordered or 0) + 1
        return entries

    def _checked_adapters(
        self,
        reply: TrainReply,
        used: Sequence[str],
        label_fingerprints: Sequence[np.ndarray | None],
    ) -> tuple[list[dict[str, np.ndarray]], list[int] | None]:
        """The reply's adapters in the order of its slots, each checked against the template,
        its slot's label count and the global it started from (``used``: value bound, update
        norm); and the order they were taken in, if not the order they came."""
        adapters = [record_to_numpy(record) for record in reply.adapters]
        for i, arrays in enumerate(adapters):
            reason = check_adapter(arrays, self.template, self.max_abs_value)
            if reason is not None:
                raise ProtocolError(f"adapter slot{i}: {reason}")
        # a "local" slot started from its own adapter, unknown here: v0 is where that began
        starts = [self.globals.get(u, self.globals["v0"]) for u in used]
        order = self._slot_order(adapters, starts, label_fingerprints)
        if order is not None:
            adapters = [adapters[j] for j in order]
        if self.max_update_norm is not None:  # measured once each adapter is in its slot
            for i, arrays in enumerate(adapters):
                reference = self.globals.get(used[i])
                reason = check_adapter(
                    arrays, self.template, self.max_abs_value, reference, self.max_update_norm
                )
                if reason is not None:
                    raise ProtocolError(f"adapter slot{i}: {reason}")
        return adapters, order

    def _slot_order(
        self,
        adapters: Sequence[Adapter],
        starts: Sequence[Adapter],
        label_fingerprints: Sequence[np.ndarray | None],
    ) -> list[int] | None:
        """``None`` if each adapter fits its slot's label count (or the check is off); else the
        one order that fits (``reorder_mismatched_adapters``, :func:`slot_order`); else
        ``ProtocolError`` naming the first slot that does not fit."""
        if not self.reject_label_count_mismatch or self.head_keys is None:
            return None
        if any(f is None for f in label_fingerprints):
            return None
        classes = [int(f.shape[0]) for f in label_fingerprints]  # type: ignore[union-attr]
        for i, (arrays, start) in enumerate(zip(adapters, starts, strict=True)):
            reason = self._label_count_mismatch(arrays, start, classes[i])
            if reason is None:
                continue
            if self.reorder_mismatched_adapters:
                order = slot_order(adapters, starts, classes, self.head_keys)
                if order is not None:
                    return order
                reason += "; no one order of its adapters fits its slots best"
            raise ProtocolError(f"adapter slot{i}: {reason}")
        return None

    def _label_count_mismatch(self, adapter: Adapter, start: Adapter, classes: int) -> str | None:
        """Why ``adapter`` cannot have been trained on its slot's data (``None``: it can): its
        head moved another number of logits than the slot's data have ``classes``. A head that
        did not move says nothing."""
        assert self.head_keys is not None
        moved = label_count_mismatch(adapter, start, classes, self.head_keys)
        if moved is None:
            return None
        return (
            f"its head moved {moved} logits but its label fingerprint has {classes} classes"
            " (trained on another task's data?)"
        )

    @staticmethod
    def _loss(reply: TrainReply) -> tuple[float, int] | None:
        if reply.train_loss is None:
            return None
        return reply.train_loss, int(sum(reply.slot_examples))

    def _parse_sources(self, reply: TrainReply, planned: Sequence[str]) -> list[str]:
        """The global each slot started from: the plan, or the client's checked choice.

        A client may only move a slot to another global it was sent, and only when asked to.
        """
        used = reply.slot_sources
        if used is None:
            return list(planned)
        if self.source_check_llr is None:
            raise ProtocolError(f"a '{SOURCES_RECORD}' record, but the source check is off")
        if len(used) != len(planned):
            raise ProtocolError(f"'{SOURCES_RECORD}' must list {len(planned)} slot sources")
        allowed = set(planned) - {"v0", LOCAL}
        pairs = zip(used, planned, strict=True)
        if any(u != p and (u not in allowed or p not in allowed) for u, p in pairs):
            raise ProtocolError(
                f"slot sources {used} are not a choice among the globals {sorted(allowed)}"
            )
        return list(used)

    def _parse_fingerprints(self, record: ArrayRecord | None, num_slots: int) -> list[np.ndarray]:
        """The ``(H,)`` fingerprint of every slot; ``ProtocolError`` if they are unusable."""
        found = self._slot_arrays(record, FINGERPRINT_RECORD, "input_fingerprint", num_slots)
        for i, value in enumerate(found):
            width = self.fingerprint_width or value.size
            if value.ndim != 1 or value.size != width:
                raise ProtocolError(
                    f"fingerprint slot{i}: shape {value.shape}, expected ({width},)"
                )
        if self.fingerprint_width is None and found:
            self.fingerprint_width = int(found[0].size)
        return found

    def _parse_label_fingerprints(
        self, record: ArrayRecord | None, num_slots: int
    ) -> list[np.ndarray]:
        """The ``(C, H)`` label fingerprint of every slot (C at most the head's rows)."""
        found = self._slot_arrays(record, LABEL_FINGERPRINT_RECORD, "label_fingerprint", num_slots)
        for i, value in enumerate(found):
            width = self.fingerprint_width or (value.shape[-1] if value.ndim else 0)
            rows = self.max_label_rows or (value.shape[0] if value.ndim else 0)
            if value.ndim != 2 or value.shape[1] != width or not 1 <= value.shape[0] <= rows:
                raise ProtocolError(
                    f"label fingerprint slot{i}: shape {value.shape}, expected (C, {width})"
                    f" with 1 <= C <= {rows}"
                )
        if self.fingerprint_width is None and found:
            self.fingerprint_width = int(found[0].shape[1])
        return found

    def _slot_arrays(
        self, record: ArrayRecord | None, record_name: str, setting: str, num_slots: int
    ) -> list[np.ndarray]:
        """One finite array per slot from ``record``, within the value bound, as float64."""
        if record is None:
            raise ProtocolError(f"no '{record_name}' record ({setting} is on)")
        arrays = record_to_numpy(record)
        expected = [f"slot{i}" for i in range(num_slots)]
        if sorted(arrays) != sorted(expected):
            raise ProtocolError(f"'{record_name}' {sorted(arrays)} do not match {num_slots} slots")
        found = [np.asarray(arrays[name], dtype=np.float64) for name in expected]
        for name, value in zip(expected, found, strict=True):
            if value.size and (
                not np.all(np.isfinite(value)) or float(np.abs(value).max()) > self.max_abs_value
            ):
                raise ProtocolError(
                    f"'{record_name}' {name}: non-finite or above {self.max_abs_value:g}"
                )
        return found

    def _starts(self, pool: Sequence[PoolEntry]) -> list[dict[str, np.ndarray]]:
        """The global each pooled adapter started from this round."""
        # A "local" slot's previous adapter never reached the server: v0 stands in.
        return [self.globals.get(e.previous_id, self.globals["v0"]) for e in pool]

    def clustering_features(self, pool: Sequence[PoolEntry]) -> np.ndarray:
        """``(M, D)`` rows K-means sees: adapter features, then input and label fingerprints
        where asked for (each block of unit norm). With ``fingerprints_only_from_v0``, a pool
        whose adapters all started from v0 (round 1) is clustered on its fingerprints alone."""
        blocks = self._fingerprint_blocks(pool)
        all_new = all(e.previous_id == "v0" for e in pool)
        if not (blocks and all_new and self.fingerprints_only_from_v0):
            blocks.insert(0, self._adapter_block(pool))
        return self._projected(np.hstack(blocks))

    def _adapter_block(self, pool: Sequence[PoolEntry]) -> np.ndarray:
        """``(M, D_a)``: one unit block per ``feature_source`` part (the adapters' features)."""
        blocks = []
        for source in self.feature_source.split("+"):
            references = None
            if source == "update":
                references = self._starts(pool)
            elif source == "cumulative":
                references = [self.globals["v0"]] * len(pool)
            arrays = [e.arrays for e in pool]
            blocks.append(adapter_features(arrays, self.feature_keys, references, self.normalize))
        return np.hstack(blocks)

    def _fingerprint_blocks(self, pool: Sequence[PoolEntry]) -> list[np.ndarray]:
        """The input and label fingerprint blocks where asked for (empty list: none)."""
        blocks = []
        fingerprints = [e.fingerprint for e in pool]
        if self.input_fingerprint and all(f is not None for f in fingerprints):
            blocks.append(fingerprint_features(np.stack(fingerprints)))  # type: ignore[arg-type]
        label_fingerprints = [e.label_fingerprint for e in pool]
        if self.label_fingerprint and all(f is not None for f in label_fingerprints):
            blocks.append(label_fingerprint_features(label_fingerprints))  # type: ignore[arg-type]
        return blocks

    def _projected(self, features: np.ndarray) -> np.ndarray:
        """``features``, randomly projected to ``projection_dim`` columns when the pool holds
        more than ``projection_min_adapters`` rows of more columns than that (recorded)."""
        m, d = features.shape
        if not self.projection_dim or m <= self.projection_min_adapters:
            return features
        if d <= self.projection_dim:
            return features
        self.record.feature_projection = {"from": int(d), "to": int(self.projection_dim)}
        return random_projection(features, self.projection_dim, self.seed)

    def _aggregate(self, server_round: int, pool: list[PoolEntry]) -> None:
        features = self.clustering_features(pool)
        ids = self.assign_groups(server_round, pool, features)
        groups = list(ids) if ids is not None else [LOCAL] * len(pool)
        labels = sorted(set(groups))
        index = [labels.index(gid) for gid in groups]
        if ids is not None:
            means = self.cluster_means(pool, index, labels)
            for label, gid in enumerate(labels):
                self.globals[gid] = means[label]
        new_slots: dict[int, dict[int, str]] = defaultdict(dict)
        for entry, gid in zip(pool, groups, strict=True):
            new_slots[entry.node_id][entry.slot] = gid
        for node, slots in new_slots.items():  # by client id: it outlives node ids
            self.node_slots[self.client_of(node)] = [slots[i] for i in range(len(slots))]
        self._record_groups(pool, groups, index, clustered=ids is not None)
        coords = planar_embedding(features, seed=self.seed)
        self.record.embedding = {
            "x": coords[:, 0].round(5).tolist(),
            "y": coords[:, 1].round(5).tolist(),
            "task": [e.true_task if e.true_task is not None else "?" for e in pool],
            "group": groups,
            "node": [e.node_id for e in pool],
        }
        ari = self.record.clustering_agreement
        log(
            INFO,
            "round %s: %s adapters -> groups %s%s",
            server_round,
            len(pool),
            self.record.groups,
            f", clustering agreement (ARI) {ari:.3f}" if ari is not None else "",
        )

    def _record_groups(
        self, pool: list[PoolEntry], groups: list[str], index: list[int], clustered: bool
    ) -> None:
        """The round record's groups and, when clients report their true tasks (metrics only),
        each group's tasks, its majority task and the clustering agreement."""
        self.record.num_adapters = len(pool)
        self.record.groups = dict(sorted(Counter(groups).items()))
        if self.source_check_llr is not None:
            self.record.source_swaps = sum(e.moved for e in pool)
        truth = [e.true_task for e in pool]
        if not all(t is not None for t in truth):
            return
        if clustered and self.reports_clustering:
            self.record.clustering_agreement = clustering_agreement(truth, index)  # type: ignore[arg-type]
        self.record.group_tasks = {}
        for gid in sorted(set(groups)):
            tasks = Counter(str(t) for t, g in zip(truth, groups, strict=True) if g == gid)
            self.majority_task[gid] = tasks.most_common(1)[0][0]
            self.record.group_tasks[gid] = dict(tasks)

    def final_adapters(self) -> dict[str, dict[str, np.ndarray]]:
        """The global adapters after training (id -> tensors); empty for local only."""
        return {gid: arrays for gid, arrays in self.globals.items() if gid != "v0"}
