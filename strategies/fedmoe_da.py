"""FedMoE-DA: domain-aware fine-grained aggregation of mixture-of-experts (Zhan et al., 2024).

The paper's body is not available; this is our reading of its Eq. 8-11 (see
``shared/docs/METHODS.md``, section 2). The pool holds every client's experts, M = N * K of them;
expert i is represented by its gate vector pi_i (the row of the gating network's last linear layer
that scores it), and experts are mixed across clients by the similarity of those proxies:

* Eq. 8  r_ij = cos(pi_i, pi_j)                                   (correlation of expert proxies)
* Eq. 9  m_ij = 1  iff  r_ij >= the (P+1)-th largest value of row i  (itself and its P most
  related experts; ties keep more)
* Eq. 10 a_ij = m_ij exp(r_ij / tau) / sum_l m_il exp(r_il / tau)
* Eq. 11 theta_i <- sum_j a_ij theta_j

A is recomputed every I rounds and reused in between. P = 0 means no expert aggregation (A = I).

This module holds the maths as pure functions (arrays in, arrays out). The Flower strategy and the
peer-to-peer expert exchange are not built yet (issue 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.common import weighted_mean


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


def top_p_mask(correlation: np.ndarray, p: int) -> np.ndarray:
    """Eq. 9: keep, in each row, every entry at least the row's (P+1)-th largest value.

    Ties at the threshold are all kept, so a row can keep more than P+1 entries. ``p = 0`` keeps
    only the diagonal (no aggregation) and ``p >= M - 1`` keeps everything.

    Returns
    -------
    np.ndarray
        ``(M, M)`` 0/1 float mask.
    """
    if p < 0:
        raise ValueError(f"P must be >= 0, not {p}")
    m = correlation.shape[0]
    if p == 0:
        return np.eye(m)
    if p >= m - 1:
        return np.ones((m, m))
    threshold = -np.sort(-correlation, axis=1)[:, p]  # (P+1)-th largest of each row
    mask = (correlation >= threshold[:, None]).astype(np.float64)
    np.fill_diagonal(mask, 1.0)  # an expert always keeps itself
    return mask


def aggregation_matrix(correlation: np.ndarray, p: int, tau: float) -> np.ndarray:
    """Eq. 9-10: the row-stochastic aggregation matrix A.

    Parameters
    ----------
    correlation : np.ndarray
        ``(M, M)`` matrix R of Eq. 8.
    p : int
        Number of most related experts each expert is mixed with (besides itself).
    tau : float
        Softmax temperature (> 0): small tau -> weight on the most similar; large -> uniform.

    Returns
    -------
    np.ndarray
        ``(M, M)``; row i holds expert i's mixing weights, summing to 1.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, not {tau}")
    mask = top_p_mask(correlation, p)
    logits = np.where(mask > 0, correlation / tau, -np.inf)
    logits = logits - logits.max(axis=1, keepdims=True)  # stable softmax over kept entries
    weights = np.exp(logits) * mask
    return weights / weights.sum(axis=1, keepdims=True)


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
    if interval < 1:
        raise ValueError(f"the recompute interval I must be >= 1, not {interval}")
    return (server_round - 1) % interval == 0


def sync_plans(
    matrix: np.ndarray,
    expert_ids: Sequence[str],
    owners: Sequence[int],
    hashes: Mapping[str, str],
) -> dict[int, dict[str, list[tuple[str, float, str]]]]:
    """Each client's sync plan: for each of its experts, the experts to mix, with weights and the
    content hash every owner reported (checked by the fetching client).

    Parameters
    ----------
    matrix : np.ndarray
        ``(M, M)`` aggregation matrix A.
    expert_ids : Sequence[str]
        Pool order, e.g. ``"<node>/<k>"``.
    owners : Sequence[int]
        Owner node of each pooled expert.
    hashes : Mapping[str, str]
        Expert id -> content hash reported by its owner.

    Returns
    -------
    dict[int, dict[str, list[tuple[str, float, str]]]]
        node -> its expert id -> ``[(source expert id, weight, hash), ...]`` (zero weights dropped).
    """
    plans: dict[int, dict[str, list[tuple[str, float, str]]]] = {}
    for i, (expert, owner) in enumerate(zip(expert_ids, owners, strict=True)):
        row = [
            (expert_ids[j], float(matrix[i, j]), hashes[expert_ids[j]])
            for j in np.flatnonzero(matrix[i] > 0).tolist()
        ]
        plans.setdefault(int(owner), {})[expert] = row
    return plans
