"""FedMoE-DA: domain-aware fine-grained aggregation of mixture-of-experts (Zhan et al., 2024).

The paper's body is not available; this is our reading of its Eq. 8-11 (as re-implementations
cite them; docs/methods.md lists every choice of ours). The pool holds every
client's experts, M = N * K of them; expert i is represented by its gate vector pi_i (the row of
the gating network's last linear layer that scores it), and experts are mixed across clients by
the similarity of those proxies:

* Eq. 8  r_ij = cos(pi_i, pi_j)                                   (correlation of expert proxies)
* Eq. 9  m_ij = 1  iff  r_ij >= the (P+1)-th largest value of row i  (itself and its P most
  related experts; ties keep more)
* Eq. 10 a_ij = m_ij exp(r_ij / tau) / sum_l m_il exp(r_il / tau)
* Eq. 11 theta_i <- sum_j a_ij theta_j

A is recomputed every I rounds and reused in between. P = 0 means no expert aggregation (A = I).
Where the paper is silent [ours]: an expert can keep a share s of itself (``keep_self``), experts
can be mixed only every n rounds (``mix_round``), and the proxy can be the gate row (the paper's
pi_i), its change since the common start, or the mean input the expert serves (``routed_means``;
computed by the client).

The maths are pure functions (arrays in, arrays out); :class:`DomainAwareMoEAggregation` is the
Flower strategy around them. What travels where (our reading of the paper): the backbone is
FedAvg'd through the server so gate vectors live in one feature space; gates stay personal and
are uploaded as proxies; the server sends each client its sync plan; expert tensors travel client
to client through a peer transport (``fedspecialists.peer.exchange``), never through the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from scipy import sparse

from fedspecialists.config import MoERunConfig, check_setting
from fedspecialists.faults import FaultDraw, absent_clients
from fedspecialists.peer.exchange import GrantIssuer
from fedspecialists.protocol.fedmoe_da import (
    EvaluateReply,
    Instruction,
    ProtocolError,
    Source,
    TrainReply,
)
from fedspecialists.protocol.records import check_adapter, record_to_numpy, state_to_record
from strategies.common import (
    RoundBookkeeping,
    log_failed_reply,
    log_rejected_reply,
    reply_content,
    weighted_mean,
)
from strategies.robust import RobustAggregation
from strategies.round_record import RoundRecord

# An accepted training reply: (node id, its checked shared parameters, the reply).
Accepted = tuple[int, dict[str, np.ndarray], TrainReply]
# What a reply's parser keeps: the shared parts, and the reply (None when it is rejected).
Parsed = tuple[dict[str, np.ndarray], TrainReply | None]


def correlation_matrix(proxies: np.ndarray) -> np.ndarray:
    """Eq. 8: cosine similarity between every pair of expert proxies.

    Parameters
    ----------
    proxies : np.ndarray
        ``(M, d)`` gate vectors, one row per client-expert.

    Returns
    -------
    np.ndarray
        ``(M, M)`` matrix R with ``R[i, j] = cos(pi_i, pi_j)``; a zero vector has similarity 0
        with everything, itself included.
    """
    proxies = np.asarray(proxies, dtype=np.float64)
    norms = np.linalg.norm(proxies, axis=1, keepdims=True)
    unit = np.divide(proxies, norms, out=np.zeros_like(proxies), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def barred_pairs(
    rows: np.ndarray,
    m: int,
    owners: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> np.ndarray:
    """Which pairs Eq. 9 may not keep [ours]: siblings (``owners`` given) and experts at another
    index k (``positions`` given). An expert is never barred from itself.

    Parameters
    ----------
    rows : np.ndarray
        ``(B,)`` indices of the experts whose rows are asked for.
    m : int
        Size M of the pool.
    owners, positions : Sequence[int] | None
        ``(M,)`` each expert's client and its index k in that client's model.

    Returns
    -------
    np.ndarray
        ``(B, M)`` bool, True where the pair is barred.
    """
    barred = np.zeros((len(rows), m), dtype=bool)
    if owners is not None:
        who = np.asarray(owners)
        barred |= who[rows, None] == who[None, :]
    if positions is not None:
        where = np.asarray(positions)
        barred |= where[rows, None] != where[None, :]
    barred[np.arange(len(rows)), rows] = False
    return barred


def top_p_mask(
    correlation: np.ndarray,
    p: int,
    owners: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> np.ndarray:
    """Eq. 9: keep, in each row, every entry at least the row's (P+1)-th largest value.

    Ties at the threshold are all kept, so a row can keep more than P+1 entries. ``p = 0`` keeps
    only the diagonal (no aggregation) and ``p >= M - 1`` keeps everything.

    Parameters
    ----------
    correlation : np.ndarray
        ``(M, M)`` matrix R of Eq. 8.
    p : int
        Entries kept besides the diagonal.
    owners : Sequence[int] | None
        Owner of each expert. Given: an expert is never matched with another expert of its own
        client (its siblings) [ours], so its P come from other clients.
    positions : Sequence[int] | None
        Index k of each expert in its client's model. Given: an expert is matched only with
        experts at its own index (``fedmoe_da.same_index``) [ours].

    Returns
    -------
    np.ndarray
        ``(M, M)`` 0/1 float mask.
    """
    check_setting("fedmoe_da.num_peers", p)
    m = correlation.shape[0]
    if p == 0:
        return np.eye(m)
    r = np.asarray(correlation, dtype=np.float64)
    r = np.where(barred_pairs(np.arange(m), m, owners, positions), -np.inf, r)
    threshold = -np.sort(-r, axis=1)[:, min(p, m - 1)]  # (P+1)-th largest of each row
    mask = ((r >= threshold[:, None]) & np.isfinite(r)).astype(np.float64)
    np.fill_diagonal(mask, 1.0)  # an expert always keeps itself
    return mask


def aggregation_matrix(
    correlation: np.ndarray,
    p: int,
    tau: float,
    owners: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> np.ndarray:
    """Eq. 9-10: the row-stochastic aggregation matrix A.

    Parameters
    ----------
    correlation : np.ndarray
        ``(M, M)`` matrix R of Eq. 8.
    p : int
        Number of most related experts each expert is mixed with (besides itself).
    tau : float
        Softmax temperature (> 0): small tau -> weight on the most similar; large -> uniform.
    owners, positions : Sequence[int] | None
        As in :func:`top_p_mask`: given, siblings are never mixed / only equal indices are.

    Returns
    -------
    np.ndarray
        ``(M, M)``; row i holds expert i's mixing weights, summing to 1.
    """
    check_setting("fedmoe_da.tau", tau)
    mask = top_p_mask(correlation, p, owners, positions)
    logits = np.where(mask > 0, correlation / tau, -np.inf)
    logits = logits - logits.max(axis=1, keepdims=True)  # stable softmax over kept entries
    weights = np.exp(logits) * mask
    return weights / weights.sum(axis=1, keepdims=True)


def keep_self(matrix: np.ndarray, self_weight: float) -> np.ndarray:
    """How much of itself an expert keeps: ``A' = s I + (1 - s) A`` [ours; the paper is silent].

    With ``s = 0`` this is A as Eq. 10 gives it (a_ii is then about 1 / (P + 1) when the
    kept correlations are alike); with ``s = 1`` no expert is mixed. Rows still sum to 1.

    Parameters
    ----------
    matrix : np.ndarray
        ``(M, M)`` row-stochastic aggregation matrix A.
    self_weight : float
        s in [0, 1].
    """
    check_setting("fedmoe_da.self_weight", self_weight)
    return self_weight * np.eye(matrix.shape[0]) + (1.0 - self_weight) * matrix


def check_mixing(p: int, tau: float, self_weight: float) -> None:
    """Refuse mixing settings no A can be built with (``ConfigError`` naming the setting)."""
    check_setting("fedmoe_da.num_peers", p)
    check_setting("fedmoe_da.tau", tau)
    check_setting("fedmoe_da.self_weight", self_weight)


ROW_BLOCK = 1024  # rows of R computed at once by the sparse path: memory ROW_BLOCK x M


def sparse_aggregation_matrix(
    proxies: np.ndarray,
    p: int,
    tau: float,
    self_weight: float,
    owners: Sequence[int] | None = None,
    block: int = ROW_BLOCK,
    positions: Sequence[int] | None = None,
) -> sparse.csr_matrix:
    """Eq. 8-10 and :func:`keep_self` in one pass, as a sparse matrix.

    The same A as ``keep_self(aggregation_matrix(correlation_matrix(proxies), p, tau, owners),
    self_weight)`` (tested against it), computed ``block`` rows of R at a time and keeping only
    each row's entries: the P most related experts (ties included) and itself. Memory
    ``block * M`` plus the kept entries, never ``M * M``: what lets the server mix thousands of
    client-experts.

    Parameters
    ----------
    proxies : np.ndarray
        ``(M, d)`` gate vectors, one row per client-expert.
    p, tau, owners, positions
        As in :func:`aggregation_matrix`.
    self_weight : float
        As in :func:`keep_self`.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(M, M)``, rows summing to 1.
    """
    check_mixing(p, tau, self_weight)
    x = np.asarray(proxies, dtype=np.float64)
    if positions is not None:  # A is block-diagonal by index: K smaller problems, not one
        return _by_position(x, p, tau, self_weight, owners, block, positions)
    m = x.shape[0]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    rows, cols, vals = [], [], []
    for start in range(0, m, block):
        stop = min(m, start + block)
        barred = barred_pairs(np.arange(start, stop), m, owners)  # positions: _by_position
        i, j, w = _sparse_rows(unit, start, stop, p, tau, barred)
        rows.append(i)
        cols.append(j)
        vals.append(w * (1.0 - self_weight) + (i == j) * self_weight)
    matrix = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m)
    )
    matrix.eliminate_zeros()  # weight 0 (self_weight = 1): nothing to fetch
    matrix.sort_indices()
    return matrix


def _by_position(
    proxies: np.ndarray,
    p: int,
    tau: float,
    self_weight: float,
    owners: Sequence[int] | None,
    block: int,
    positions: Sequence[int],
) -> sparse.csr_matrix:
    """:func:`sparse_aggregation_matrix` with ``positions``: every pair at different indices is
    barred, so A is the matrix of each index's experts alone, put back in place; about K times
    less work than barring them in one ``(M, M)`` pass, with the same entries."""
    where = np.asarray(positions)
    who = None if owners is None else np.asarray(owners)
    m = len(where)
    rows, cols, vals = [], [], []
    for k in np.unique(where):
        idx = np.flatnonzero(where == k)
        mine = None if who is None else who[idx].tolist()
        part = sparse_aggregation_matrix(proxies[idx], p, tau, self_weight, mine, block).tocoo()
        rows.append(idx[part.row])
        cols.append(idx[part.col])
        vals.append(part.data)
    matrix = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m)
    )
    matrix.sort_indices()
    return matrix


def _sparse_rows(
    unit: np.ndarray, start: int, stop: int, p: int, tau: float, barred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of A (before keep_self) as (row, column, weight) triples; ``barred``
    ``(stop - start, M)`` from :func:`barred_pairs`."""
    m = unit.shape[0]
    r = np.clip(unit[start:stop] @ unit.T, -1.0, 1.0)  # (B, M) of Eq. 8
    local = np.arange(stop - start)
    diagonal = np.arange(start, stop)
    if p == 0:
        keep = np.zeros_like(r, dtype=bool)
    else:
        if barred.any():  # siblings / other indices (the diagonal stays)
            r = np.where(barred, -np.inf, r)
        kth = min(p, m - 1)
        threshold = -np.partition(-r, kth, axis=1)[:, kth]  # (P+1)-th largest of each row
        keep = (r >= threshold[:, None]) & np.isfinite(r)
    keep[local, diagonal] = True  # an expert always keeps itself
    b, j = np.nonzero(keep)
    logits = r[b, j] / tau
    row_max = np.full(stop - start, -np.inf)
    np.maximum.at(row_max, b, logits)
    weights = np.exp(logits - row_max[b])
    weights /= np.bincount(b, weights=weights, minlength=stop - start)[b]
    return b + start, j, weights


def same_domain_share(
    matrix: np.ndarray, owners: Sequence[int], dominant: Mapping[int, int]
) -> tuple[float, float]:
    """How much of A's weight on *other* clients' experts goes to clients of the same domain.

    A diagnostic, never used to aggregate: it reads each client's dominant training domain,
    which clients report as a metric. ``share`` averages, over experts that take anything from
    other clients, the part of that weight whose owner has the same dominant domain; ``chance``
    is the same average had the weight been spread evenly over every other client's experts.

    Parameters
    ----------
    matrix : np.ndarray
        ``(M, M)`` aggregation matrix (rows: the mixed expert, columns: its sources).
    owners : Sequence[int]
        Owner node of each of the M experts.
    dominant : Mapping[int, int]
        Node -> index of its dominant domain; every owner must be in it.

    Returns
    -------
    tuple[float, float]
        ``(share, chance)``, each in [0, 1]; NaN when no expert takes weight from other clients.
    """
    a = sparse.coo_matrix(matrix)  # A's kept entries (a dense A is read as well)
    i, j, w = a.row, a.col, a.data.astype(np.float64)
    own = np.asarray(owners)
    dom = np.asarray([dominant[o] for o in owners])
    other = own[i] != own[j]
    same = other & (dom[i] == dom[j])
    m = len(own)
    peer_weight = np.bincount(i, weights=w * other, minlength=m)
    rows = peer_weight > 0
    if not rows.any():
        return float("nan"), float("nan")
    same_weight = np.bincount(i, weights=w * same, minlength=m)
    # Counts over every column: all of a client's experts share its dominant domain.
    n_own = _counts_of(own)
    same_count = _counts_of(dom) - n_own
    share = same_weight[rows] / peer_weight[rows]
    chance = same_count[rows] / (m - n_own[rows])
    return float(share.mean()), float(chance.mean())


def _counts_of(values: np.ndarray) -> np.ndarray:
    """For each entry, how many entries equal it."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return np.asarray(counts[inverse])


def mix_round(server_round: int, every: int) -> bool:
    """Experts are mixed (peers fetched) in rounds 2, 2 + n, 2 + 2n, ... for ``every = n``.

    Round 1 has no plan (A needs the first proxies), so the first mix is in round 2.
    """
    check_setting("fedmoe_da.mix_every", every)
    return server_round >= 2 and (server_round - 2) % every == 0


def routed_means(features: np.ndarray, router_probs: np.ndarray) -> np.ndarray:
    """Each expert's proxy as the mean input it serves [ours]: ``sum_n p_nk h_n / sum_n p_nk``.

    Parameters
    ----------
    features : np.ndarray
        ``(N, d)`` backbone outputs h of a client's training inputs.
    router_probs : np.ndarray
        ``(N, K)`` the gate's softmax probabilities for those inputs.

    Returns
    -------
    np.ndarray
        ``(K, d)``; an expert no input routes to (all p_nk = 0) gets a zero row.
    """
    weights = np.asarray(router_probs, dtype=np.float64)
    totals = weights.sum(axis=0)[:, None]  # (K, 1)
    sums = weights.T @ np.asarray(features, dtype=np.float64)  # (K, d)
    return np.divide(sums, totals, out=np.zeros_like(sums), where=totals > 0)


def declared_domain_proxies(domain_counts: Sequence[int], num_experts: int) -> np.ndarray:
    """Each expert's proxy as its client's known domain mixture, at its own index [ours].

    Row k is ``e_k (x) q`` with q the client's training examples per domain, normalised: the
    cosine of two experts is then the cosine of their clients' domain mixtures when they sit at
    the same index k, and 0 otherwise. It needs each site to know which domain its data come
    from (the benchmarks' partitions do), and tells the server the client's mixture (which the
    ``domain-examples`` metric reports already): a measure of what a proxy that finds the
    domains exactly gives, not a proxy the paper describes.

    Parameters
    ----------
    domain_counts : Sequence[int]
        ``(D,)`` training examples per domain.
    num_experts : int
        K.

    Returns
    -------
    np.ndarray
        ``(K, K * D)``; all zeros when the client holds no examples.
    """
    counts = np.asarray(domain_counts, dtype=np.float64)
    total = counts.sum()
    share = counts / total if total > 0 else counts
    return np.kron(np.eye(num_experts), share[None, :])


def mix_experts(
    weights: Sequence[float], experts: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Eq. 11: theta_i = sum_j a_ij theta_j for one expert, over the experts given.

    Parameters
    ----------
    weights : Sequence[float]
        Mixing weights of the experts that arrived (renormalised here to sum to 1).
    experts : Sequence[Mapping[str, np.ndarray]]
        Their parameters, tensor by tensor, with identical keys and shapes.
    """
    return weighted_mean(experts, weights)


def renormalise(weights: Sequence[float], arrived: Sequence[bool]) -> np.ndarray:
    """Weights over the peers whose experts arrived (a missing or tampered peer drops out)."""
    w = np.asarray(weights, dtype=np.float64) * np.asarray(arrived, dtype=np.float64)
    total = w.sum()
    if total <= 0:
        raise ValueError("no expert with positive weight arrived")
    return w / total


def recompute_round(server_round: int, interval: int) -> bool:
    """A is recomputed every ``interval`` rounds: in rounds 1, 1 + I, 1 + 2I, ..."""
    check_setting("fedmoe_da.interval", interval)
    return (server_round - 1) % interval == 0


def sync_plans(
    matrix: np.ndarray | sparse.csr_matrix,
    expert_ids: Sequence[str],
    owners: Sequence[int],
    hashes: Mapping[str, str],
    client: int | None = None,
) -> dict[int, dict[str, list[tuple[str, float, str]]]]:
    """Each client's sync plan: for each of its experts, the experts to mix, with weights and the
    content hash every owner reported (checked by the fetching client).

    Parameters
    ----------
    matrix : np.ndarray | scipy.sparse.csr_matrix
        ``(M, M)`` aggregation matrix A.
    expert_ids : Sequence[str]
        Pool order, e.g. ``"<node>/<k>"``.
    owners : Sequence[int]
        Owner node of each pooled expert.
    hashes : Mapping[str, str]
        Expert id -> content hash reported by its owner.
    client : int | None
        Only this client's plan (its rows of A); ``None``: every client's.

    Returns
    -------
    dict[int, dict[str, list[tuple[str, float, str]]]]
        node -> its expert id -> ``[(source expert id, weight, hash), ...]`` (zero weights dropped).
    """
    a = sparse.csr_matrix(matrix)
    a.sort_indices()  # sources in pool order
    plans: dict[int, dict[str, list[tuple[str, float, str]]]] = {}
    for i, (expert, owner) in enumerate(zip(expert_ids, owners, strict=True)):
        if client is not None and int(owner) != client:
            continue
        lo, hi = a.indptr[i], a.indptr[i + 1]
        row = [
            (expert_ids[j], float(w), hashes[expert_ids[j]])
            for j, w in zip(a.indices[lo:hi].tolist(), a.data[lo:hi].tolist(), strict=True)
            if w > 0
        ]
        plans.setdefault(int(owner), {})[expert] = row
    return plans


DENSE_RECORD_LIMIT = 512  # up to this many experts, aggregation.jsonl holds A and R in full


def aggregation_record(
    ids: Sequence[str], proxies: np.ndarray, matrix: sparse.csr_matrix
) -> dict[str, Any]:
    """What ``aggregation.jsonl`` keeps of one recompute: A's kept entries (CSR, always) and,
    for a pool of at most :data:`DENSE_RECORD_LIMIT` experts, A and R as full lists (R is
    ``M x M``: at thousands of experts it alone would be hundreds of megabytes per line)."""
    record: dict[str, Any] = {
        "expert_ids": list(ids),
        "matrix_sparse": {
            "indptr": matrix.indptr.tolist(),
            "indices": matrix.indices.tolist(),
            "data": np.round(matrix.data, 5).tolist(),
        },
    }
    if len(ids) <= DENSE_RECORD_LIMIT:
        record["matrix"] = np.round(matrix.toarray(), 5).tolist()
        record["correlation"] = np.round(correlation_matrix(proxies), 5).tolist()
    return record


def _restored_matrix(arrays: Mapping[str, np.ndarray], m: int) -> sparse.csr_matrix | None:
    """A from a checkpoint: CSR parts, or the dense ``matrix`` older checkpoints hold."""
    if "matrix/indptr" in arrays:
        parts = (arrays["matrix/data"], arrays["matrix/indices"], arrays["matrix/indptr"])
        return sparse.csr_matrix(parts, shape=(m, m))
    if "matrix" in arrays:
        return sparse.csr_matrix(arrays["matrix"])
    return None


def stale_clients(last_heard: Mapping[int, int], server_round: int, max_age: int) -> list[int]:
    """Clients whose last accepted reply is more than ``max_age`` rounds before ``server_round``.

    Parameters
    ----------
    last_heard : Mapping[int, int]
        Client id -> round of its last accepted training reply.
    server_round : int
        The round being closed.
    max_age : int
        Rounds a client may stay silent and keep its place in the pool.

    Returns
    -------
    list[int]
        The clients to drop, sorted.
    """
    return sorted(c for c, heard in last_heard.items() if server_round - heard > max_age)


# --------------------------------------------------------------------------------------------
# Flower strategy
# --------------------------------------------------------------------------------------------


@dataclass
class ExpertPool:
    """The latest proxies of every client-expert heard from, in pool order ``<client>/<k>``
    (client ids, :mod:`fedspecialists.protocol.identity`: they outlive node ids)."""

    proxies: dict[int, np.ndarray]  # client -> (K, d) gate vectors
    hashes: dict[int, list[str]]  # client -> K content hashes
    addresses: dict[int, str]  # client -> peer address

    def order(self) -> tuple[list[str], list[int], list[int], np.ndarray]:
        """Expert ids, their owners, their indices k and the ``(M, d)`` proxy matrix, clients
        sorted."""
        ids: list[str] = []
        owners: list[int] = []
        positions: list[int] = []
        rows = []
        for node in sorted(self.proxies):
            for k, row in enumerate(self.proxies[node]):
                ids.append(f"{node}/{k}")
                owners.append(node)
                positions.append(k)
                rows.append(row)
        return ids, owners, positions, np.asarray(rows, dtype=np.float64)


@dataclass
class FedMoEDARoundRecord(RoundRecord):
    """FedMoE-DA's round: the shared entries, peer traffic, the matrix A and the evaluation.

    Attributes
    ----------
    peer_bytes : dict[str, int] | None
        Bytes the clients fetched from peers: ``round`` and ``cumulative``.
    peer_fetches, peer_failures, peer_reused : int | None
        Peer experts fetched, fetches that failed, and experts a client already held.
    train_examples_per_domain : list[int] | None
        Training examples of the accepted replies, per domain.
    accuracy_after_training : dict[str, float | None] | None
        Each client's model as its local training left it, on its own test split: mean, std.
    aggregation : dict[str, Any] | None
        A when it was recomputed (:func:`aggregation_record`).
    aggregation_recomputed : bool | None
        Whether A was recomputed this round.
    same_domain_peer_share : dict[str, float] | None
        Share of A's peer weight between clients of one dominant domain, and its chance level.
    pool : dict[str, Any] | None
        Clients in the expert pool, and those that left it this round.
    personalised_accuracy : dict[str, Any] | None
        Each client's own model on its own test split: mean, std, per node.
    global_accuracy : dict[str, float | None] | None
        Each client's model on the shared global test set: mean, std.
    domain_accuracy : list[float] | None
        Personalised accuracy per domain, over all clients.
    routing : list[float] | None
        Flattened ``(domains x K)`` counts of the gate's top expert.
    """

    peer_bytes: dict[str, int] | None = None
    peer_fetches: int | None = None
    peer_failures: int | None = None
    peer_reused: int | None = None
    train_examples_per_domain: list[int] | None = None
    accuracy_after_training: dict[str, float | None] | None = None
    aggregation: dict[str, Any] | None = None
    aggregation_recomputed: bool | None = None
    same_domain_peer_share: dict[str, float] | None = None
    pool: dict[str, Any] | None = None
    personalised_accuracy: dict[str, Any] | None = None
    global_accuracy: dict[str, float | None] | None = None
    domain_accuracy: list[float] | None = None
    routing: list[float] | None = None


class DomainAwareMoEAggregation(RoundBookkeeping[FedMoEDARoundRecord], Strategy):
    """FedMoE-DA's server: FedAvg of the shared parts, aggregation matrix A, per-node sync plans.

    Each node gets its own message: ``shared`` (the FedAvg'd parameters of ``shared_parts``) and a
    ``config`` record with its sync plan (for each of its experts: source expert ids, weights,
    content hashes and owner addresses) and a signed per-round fetch grant. Replies carry the
    trained shared parts, the gate vectors (``proxies``), the experts' content hashes and the
    node's peer address; expert tensors never pass through here. Replies that fail validation
    are rejected with a logged reason and never enter aggregation or the pool.

    Parameters
    ----------
    initial_shared : Mapping[str, np.ndarray]
        Round-0 values of the parameters aggregated through the server; also the template every
        reply must match. Empty: nothing is aggregated (local only).
    shared_parts : Sequence[str]
        Model parts the server aggregates (``backbone``, ``gate``, ``experts``, ``head``).
    num_experts : int
        K per client.
    num_peers : int
        P of Eq. 9. ``exchange_experts`` is off when P = 0.
    tau : float
        Temperature of Eq. 10.
    interval : int
        I: A is recomputed every I rounds (and whenever the pool changes).
    self_weight : float
        s: each expert keeps at least this share of itself (``A' = s I + (1 - s) A``).
    mix_every : int
        Experts are mixed (plans sent, peers fetched) every this many rounds, from round 2.
    mix_within_client : bool
        Whether an expert may be matched with another expert of its own client (Eq. 9).
    same_index : bool
        Whether an expert is matched only with the experts at its own index k in other clients
        (experts that started from the same initial weights) [ours].
    peer_root : str | None
        Folder under which simulation nodes keep their expert stores (sent to the nodes).
    grant_ttl_s : float
        Lifetime of the per-round fetch grants.
    pool_max_age : int
        A client whose last accepted reply is more than this many rounds old leaves the pool
        (its proxies, hashes and address), so a node that stopped replying drops out of every
        sync plan; its next accepted reply brings it back.
    seed, fraction_train, min_replies, max_abs_value, on_round_end, absent_clients, pack_arrays
        As in ``TaskAdapterClustering``.
    """

    method = "fedmoe_da"
    exchanges_experts = True

    def __init__(
        self,
        initial_shared: Mapping[str, np.ndarray],
        shared_parts: Sequence[str],
        num_experts: int,
        num_peers: int = 5,
        tau: float = 1.0,
        interval: int = 1,
        self_weight: float = 0.0,
        mix_every: int = 3,
        mix_within_client: bool = True,
        same_index: bool = True,
        peer_root: str | None = None,
        grant_ttl_s: float = 900.0,
        pool_max_age: int = 5,
        seed: int = 0,
        fraction_train: float = 1.0,
        min_replies: int = 1,
        max_abs_value: float = 1.0e4,
        robust: RobustAggregation | None = None,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        absent_clients: FaultDraw | None = None,
        pack_arrays: bool = True,
    ) -> None:
        self.robust = robust or RobustAggregation()  # the backbone's; the plain mean by default
        check_mixing(num_peers, tau, self_weight)
        check_setting("fedmoe_da.interval", interval)
        check_setting("fedmoe_da.mix_every", mix_every)
        check_setting("fedmoe_da.pool_max_age", pool_max_age)
        self.init_rounds(
            FedMoEDARoundRecord,
            seed,
            fraction_train,
            min_replies,
            max_abs_value,
            on_round_end,
            absent_clients,
            pack_arrays,
        )
        self.shared = {k: np.asarray(v) for k, v in initial_shared.items()}
        self.template = dict(self.shared)
        self.shared_parts = list(shared_parts)
        self.num_experts = num_experts
        self.num_peers = num_peers
        self.exchange = self.exchanges_experts and num_peers > 0
        self.tau = tau
        self.interval = interval
        self.self_weight = self_weight
        self.mix_every = mix_every
        self.mix_within_client = mix_within_client
        self.same_index = same_index
        self.peer_root = peer_root
        self.grant_ttl_s = grant_ttl_s
        self.pool_max_age = pool_max_age
        self.pool = ExpertPool({}, {}, {})
        self.last_heard: dict[int, int] = {}  # client -> round of its last accepted reply
        self.dominant_domain: dict[int, int] = {}  # client -> its domain; metrics only
        self.matrix: sparse.csr_matrix | None = None  # A, its kept entries
        self.matrix_ids: list[str] = []
        self.grants = GrantIssuer()
        self.peer_bytes_total = 0
        self.run_key: str | None = None  # names the clients' personal files (the server sets it)

    @classmethod
    def from_config(
        cls,
        cfg: MoERunConfig,
        initial_shared: Mapping[str, np.ndarray],
        shared_parts: Sequence[str],
        peer_root: str,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> DomainAwareMoEAggregation:
        """This strategy with its settings read from the experiment config (``fedmoe_da.*``)."""
        return cls(
            initial_shared,
            shared_parts,
            peer_root=peer_root,
            on_round_end=on_round_end,
            **cls.config_kwargs(cfg),
        )

    @classmethod
    def config_kwargs(cls, cfg: MoERunConfig) -> dict[str, Any]:
        """The constructor's keyword arguments this method takes from ``cfg``."""
        fm = cfg.fedmoe_da
        return {
            "num_experts": cfg.moe.num_experts,
            "num_peers": fm.num_peers,
            "tau": fm.tau,
            "interval": fm.interval,
            "self_weight": fm.self_weight,
            "mix_every": fm.mix_every,
            "mix_within_client": fm.mix_within_client,
            "same_index": fm.same_index,
            "grant_ttl_s": cfg.peer.grant_ttl_s,
            "pool_max_age": fm.pool_max_age,
            "seed": cfg.seed,
            "fraction_train": cfg.federation.fraction_train,
            "min_replies": cfg.federation.min_replies,
            "max_abs_value": cfg.validation.max_abs_value,
            "robust": RobustAggregation.from_settings(cfg.robust, cfg.train),
            "absent_clients": absent_clients(cfg),
            "pack_arrays": cfg.federation.pack_arrays,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "shared_parts": self.shared_parts,
            "exchange_experts": self.exchange,
            "num_experts": self.num_experts,
            "num_peers": self.num_peers,
            "tau": self.tau,
            "interval": self.interval,
            "self_weight": self.self_weight,
            "mix_every": self.mix_every,
            "mix_within_client": self.mix_within_client,
            "same_index": self.same_index,
            "pool_max_age": self.pool_max_age,
            "fraction_train": self.fraction_train,
            "min_replies": self.min_replies,
            "robust": self.robust,
        }

    # -- messages ------------------------------------------------------------------------------
    def instruction(self, node: int, server_round: int, phase: str) -> Instruction:
        """What ``node`` is sent for ``phase``: the shared parts and, when training with expert
        exchange, a fetch grant and (in a mixing round) its sync plan."""
        message = Instruction(
            server_round=server_round,
            share=list(self.shared_parts),
            exchange=self.exchange,
            peer_root=self.peer_root,
            shared=state_to_record(self.shared) if self.shared else None,
            run_key=self.run_key,
        )
        if phase == "train" and self.exchange:
            message.grant_key = self.grants.public_key
            message.grant = self.grants.issue(server_round, node, self.grant_ttl_s)
            if mix_round(server_round, self.mix_every):
                message.plans = {
                    int(expert.split("/")[1]): [
                        Source(i, w, h, self.pool.addresses[int(i.split("/")[0])])
                        for i, w, h in sources
                    ]
                    for expert, sources in self.plan_for(self.client_of(node)).items()
                }
        return message

    def plan_for(self, client: int) -> dict[str, list[tuple[str, float, str]]]:
        """A client's sync plan from the current A and the latest hashes (empty before A)."""
        if self.matrix is None or client not in self.pool.proxies:
            return {}
        ids, owners, _, _ = self.pool.order()
        if ids != self.matrix_ids:
            return {}
        flat = {f"{n}/{k}": h for n, hs in self.pool.hashes.items() for k, h in enumerate(hs)}
        return sync_plans(self.matrix, ids, owners, flat, client=client).get(client, {})

    def _message(self, node: int, server_round: int, phase: str) -> Message:
        return Message(
            content=self.instruction(node, server_round, phase).to_record(),
            message_type=MessageType.TRAIN if phase == "train" else MessageType.EVALUATE,
            dst_node_id=node,
        )

    # -- checkpoint ------------------------------------------------------------------------------
    def method_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The shared parts (``shared/<tensor>``), the pool's proxies (``proxies/<client>``),
        A (``matrix``), and as JSON the hashes, addresses, plans' ids and the grant key."""
        arrays = {f"shared/{k}": v for k, v in self.shared.items()}
        arrays.update({f"proxies/{c}": p for c, p in self.pool.proxies.items()})
        if self.matrix is not None:  # A's kept entries, CSR
            arrays["matrix/indptr"] = self.matrix.indptr
            arrays["matrix/indices"] = self.matrix.indices
            arrays["matrix/data"] = self.matrix.data
        state = {
            "hashes": {str(c): h for c, h in self.pool.hashes.items()},
            "addresses": {str(c): a for c, a in self.pool.addresses.items()},
            "dominant_domain": {str(c): d for c, d in self.dominant_domain.items()},
            "last_heard": {str(c): r for c, r in self.last_heard.items()},
            "matrix_ids": self.matrix_ids,
            "peer_bytes_total": self.peer_bytes_total,
            # The same key after a resume: owners already trust it (checkpoint folder is 0700).
            "grant_key": self.grants.private_key_hex(),
            "run_key": self.run_key,
        }
        return arrays, state

    def method_restore(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        self.shared = {k[len("shared/") :]: v for k, v in arrays.items() if k.startswith("shared/")}
        self.pool = ExpertPool(
            {int(k.split("/")[1]): v for k, v in arrays.items() if k.startswith("proxies/")},
            {int(c): list(h) for c, h in state["hashes"].items()},
            {int(c): str(a) for c, a in state["addresses"].items()},
        )
        self.matrix = _restored_matrix(arrays, len(state["matrix_ids"]))
        self.matrix_ids = list(state["matrix_ids"])
        self.dominant_domain = {int(c): int(d) for c, d in state["dominant_domain"].items()}
        self.last_heard = {int(c): int(r) for c, r in state["last_heard"].items()}
        self.peer_bytes_total = int(state["peer_bytes_total"])
        self.grants = GrantIssuer.from_private_hex(str(state["grant_key"]))
        self.run_key = state["run_key"]

    # -- Strategy API --------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.begin_train_round(server_round, grid)
        return self.ledger.count_messages(
            "train", [self._message(node, server_round, "train") for node in nodes]
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = self.screen_replies(
            "train", replies, lambda node, content: self._parse_train_reply(content)
        )
        accepted = [(node, shared, meta) for node, (shared, meta) in screened if meta is not None]
        self._record_peer_traffic(accepted)
        if self.too_few_replies(server_round, len(accepted)):
            return None, None
        train_loss = self._aggregate_shared(accepted)
        if self.exchange:
            self._update_pool(server_round, accepted)
        return None, MetricRecord({"train-loss": train_loss})

    def _record_peer_traffic(self, accepted: list[Accepted]) -> None:
        peer_bytes = sum(m.peer_bytes for _, _, m in accepted)
        self.peer_bytes_total += peer_bytes
        self.record.peer_bytes = {"round": peer_bytes, "cumulative": self.peer_bytes_total}
        self.record.peer_fetches = sum(m.peer_fetches for _, _, m in accepted)
        self.record.peer_failures = sum(m.peer_failures for _, _, m in accepted)
        # peer experts a client already held (same hash): not fetched again
        self.record.peer_reused = sum(m.peer_reused for _, _, m in accepted)

    def _aggregate_shared(self, accepted: list[Accepted]) -> float:
        """FedAvg of the shared parts (weighted by examples); records loss and local accuracy."""
        examples = [float(m.num_examples) for _, _, m in accepted]
        if self.shared:  # every client started from the current aggregate (what clipping needs)
            self.shared = self._robust_backbone(accepted, examples)
        train_loss = sum(
            m.train_loss * n for (_, _, m), n in zip(accepted, examples, strict=True)
        ) / sum(examples)
        after = [
            (m.after_training_correct or 0) / m.after_training_total
            for _, _, m in accepted
            if m.after_training_total
        ]
        counts = [m.domain_examples for _, _, m in accepted if m.domain_examples is not None]
        if counts and len({len(c) for c in counts}) == 1:
            self.record.train_examples_per_domain = np.sum(counts, axis=0).astype(int).tolist()
        self.record.train_loss = train_loss
        self.record.aggregated = True
        # Each client's model as its local training left it (own backbone), own test split.
        self.record.accuracy_after_training = {
            "mean": float(np.mean(after)) if after else None,
            "std": float(np.std(after)) if after else None,
        }
        return train_loss

    def _robust_backbone(
        self, accepted: list[Accepted], examples: list[float]
    ) -> dict[str, np.ndarray]:
        """The backbone's aggregate (:attr:`robust`), opposed updates left out and recorded."""
        states = [shared for _, shared, _ in accepted]
        references = [self.shared] * len(states)
        opposed = self.robust.opposed(states, references)
        if self.robust.drop_opposed_updates:
            self.record_dropped(
                [
                    (
                        accepted[i][0],
                        f"node {accepted[i][0]} (backbone): opposed to the median backbone "
                        f"update, cosine {cosine:.3f}",
                    )
                    for i, cosine in sorted(opposed.items())
                ]
            )
        kept = [i for i in range(len(states)) if i not in opposed]
        kept_states, kept_refs = [states[i] for i in kept], [references[i] for i in kept]
        counts = [int(examples[i]) for i in kept]  # what the step clip reads
        if self.robust.clips:
            cut = self.robust.clipped_norms(kept_states, kept_refs, counts)
            self.record_clipped(
                [
                    (
                        accepted[kept[j]][0],
                        f"node {accepted[kept[j]][0]} (backbone): norm {a:.4g} -> {b:.4g}",
                    )
                    for j, (a, b) in sorted(cut.items())
                ]
            )
        return self.robust(kept_states, [examples[i] for i in kept], kept_refs, counts)

    def _update_pool(self, server_round: int, accepted: list[Accepted]) -> None:
        for node, _, meta in accepted:
            client = self.client_of(node)  # the pool outlives node ids (a resumed run)
            if meta.domain_examples is not None:
                self.dominant_domain[client] = int(np.argmax(meta.domain_examples))
            proxies = meta.gate_proxies()
            assert proxies is not None and meta.hashes is not None  # checked with the reply
            self.pool.proxies[client] = proxies
            self.pool.hashes[client] = meta.hashes
            self.pool.addresses[client] = str(meta.address)
            self.last_heard[client] = server_round
        self._drop_stale_clients(server_round)
        ids, owners, positions, proxies = self.pool.order()
        if (
            self.matrix is None
            or ids != self.matrix_ids
            or recompute_round(server_round, self.interval)
        ):
            self.matrix = sparse_aggregation_matrix(
                proxies,
                self.num_peers,
                self.tau,
                self.self_weight,
                owners=None if self.mix_within_client else owners,
                positions=positions if self.same_index else None,
            )
            self.matrix_ids = ids
            self.record.aggregation = aggregation_record(ids, proxies, self.matrix)
            if all(o in self.dominant_domain for o in owners):  # diagnostic only
                share, chance = same_domain_share(self.matrix, owners, self.dominant_domain)
                if np.isfinite(share):  # NaN when no expert takes from a peer (s = 1)
                    self.record.same_domain_peer_share = {"share": share, "chance": chance}
        self.record.aggregation_recomputed = self.record.aggregation is not None

    def _drop_stale_clients(self, server_round: int) -> None:
        """Remove from the pool every client last heard from more than ``pool_max_age`` rounds
        ago; records the pool's size and who left it this round."""
        stale = stale_clients(self.last_heard, server_round, self.pool_max_age)
        for client in stale:
            for part in (self.pool.proxies, self.pool.hashes, self.pool.addresses, self.last_heard):
                part.pop(client, None)
        self.record.pool = {"clients": len(self.pool.proxies), "dropped": stale}

    def _parse_train_reply(self, content: RecordDict) -> tuple[str | None, Parsed]:
        """Validate one reply; return (reason it is rejected, or None; (shared, the reply))."""
        try:
            reply = TrainReply.from_record(content)
            return None, (self._shared_of(reply), self._checked_experts(reply))
        except ProtocolError as exc:
            return str(exc), ({}, None)

    def _shared_of(self, reply: TrainReply) -> dict[str, np.ndarray]:
        """The reply's trained shared parts, checked against the template (``{}``: none)."""
        if not self.template:
            return {}
        if reply.shared is None:
            raise ProtocolError("no 'shared' parameters")
        shared = record_to_numpy(reply.shared)
        reason = check_adapter(shared, self.template, self.max_abs_value)
        if reason is not None:
            raise ProtocolError(f"shared parameters: {reason}")
        return shared

    def _checked_experts(self, reply: TrainReply) -> TrainReply:
        """With expert exchange: the reply's proxies ``(K, d)``, K hashes and its address."""
        if not self.exchange:
            return reply
        proxies = reply.gate_proxies()
        if reply.proxies is None or reply.hashes is None:
            raise ProtocolError("no gate proxies / expert hashes")
        if proxies is None or proxies.ndim != 2 or proxies.shape[0] != self.num_experts:
            raise ProtocolError(f"gate proxies must be ({self.num_experts}, d)")
        expected = next(iter(self.pool.proxies.values()), proxies).shape
        if proxies.shape != expected or not np.all(np.isfinite(proxies)):
            raise ProtocolError(
                f"gate proxies of shape {proxies.shape} (expected {expected}) or non-finite"
            )
        if float(np.max(np.abs(proxies))) > self.max_abs_value:
            raise ProtocolError("gate proxies above validation.max_abs_value")
        if len(reply.hashes) != self.num_experts:
            raise ProtocolError(f"expert hashes must be {self.num_experts} SHA-256 hex digests")
        return reply

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Every node evaluates the model it holds now: shared parts from here, the rest its own.
        return self.ledger.count_messages(
            "evaluate",
            [
                self._message(node, server_round, "evaluate")
                for node in sorted(grid.get_node_ids(), key=self.client_of)
            ],
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        sums = EvaluationSums()
        counted = self.ledger.count_replies("evaluate", replies)
        # Client order, not arrival order: the means over nodes are float sums.
        for reply in sorted(counted, key=lambda r: self.client_of(r.metadata.src_node_id)):
            if reply.has_error():
                log_failed_reply(reply, "evaluate")
                continue
            try:
                sums.add(
                    reply.metadata.src_node_id, EvaluateReply.from_record(reply_content(reply))
                )
            except ProtocolError as exc:
                log_rejected_reply(reply.metadata.src_node_id, "evaluate", str(exc))
        sums.fill(self.record)
        self.close_round()
        out: dict[str, float] = {}
        if sums.personal:
            out["personalised-accuracy"] = float(np.mean(list(sums.personal.values())))
            out["global-accuracy"] = float(np.mean(list(sums.global_acc.values())))
        return MetricRecord(out) if out else None  # type: ignore[arg-type]


@dataclass
class EvaluationSums:
    """What one round's evaluation replies add up to (per node, per domain, routing)."""

    personal: dict[str, float] = field(default_factory=dict)
    global_acc: dict[str, float] = field(default_factory=dict)
    domain_correct: np.ndarray | None = None
    domain_total: np.ndarray | None = None
    routing: np.ndarray | None = None

    def add(self, node: int, m: EvaluateReply) -> None:
        """One node's evaluation (its personal test total is > 0)."""
        self.personal[str(node)] = m.personal_correct / m.personal_total
        if m.global_total > 0:  # 0: a site with its own data only
            self.global_acc[str(node)] = m.global_correct / m.global_total
        dc = np.asarray(m.domain_correct, dtype=np.float64)
        dt = np.asarray(m.domain_total, dtype=np.float64)
        self.domain_correct = dc if self.domain_correct is None else self.domain_correct + dc
        self.domain_total = dt if self.domain_total is None else self.domain_total + dt
        if m.routing is not None:
            r = np.asarray(m.routing, dtype=np.float64)
            self.routing = r if self.routing is None else self.routing + r

    def fill(self, record: FedMoEDARoundRecord) -> None:
        """Set the round record's evaluation fields."""
        pvals, gvals = list(self.personal.values()), list(self.global_acc.values())
        record.personalised_accuracy = {
            "mean": float(np.mean(pvals)) if pvals else None,
            "std": float(np.std(pvals)) if pvals else None,
            "per_node": self.personal,
        }
        record.global_accuracy = {
            "mean": float(np.mean(gvals)) if gvals else None,
            "std": float(np.std(gvals)) if gvals else None,
        }
        record.mean_accuracy = float(np.mean(pvals)) if pvals else None
        if self.domain_total is not None and self.domain_correct is not None:
            total = self.domain_total
            accuracy = np.divide(
                self.domain_correct, total, out=np.zeros_like(total), where=total > 0
            )
            record.domain_accuracy = accuracy.round(5).tolist()
        if self.routing is not None:
            record.routing = self.routing.tolist()  # flattened (domains x K) counts
