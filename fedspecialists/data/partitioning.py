"""Splitting items by shares: the integer arithmetic under every Dirichlet partition here.

Kept free of heavy imports (datasets, pandas, scikit-learn): the mixture-of-experts ClientApp
uses it in every message's fresh process in a deployment.
"""

from __future__ import annotations

import numpy as np


def split_counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Split ``n`` items into integer counts proportional to ``shares`` (largest remainder).

    Each entry gets ``floor(n * p)``; the items left over go one each to the entries with the
    largest fractional parts (ties to the lower index). A zero share always gets 0.

    Parameters
    ----------
    n
        Number of items (>= 0).
    shares
        Non-negative 1-D weights; normalised here.

    Returns
    -------
    np.ndarray
        int64 counts summing exactly to ``n``.
    """
    weights = np.asarray(shares, dtype=float)
    if n < 0 or weights.ndim != 1 or (weights < 0).any():
        raise ValueError("need n >= 0 and non-negative 1-D shares")
    total = weights.sum()
    if total <= 0:
        if n == 0:
            return np.zeros(len(weights), dtype=np.int64)
        raise ValueError("cannot split items over all-zero shares")
    exact = n * weights / total
    counts = np.floor(exact).astype(np.int64)
    fraction = np.where(weights > 0, exact - counts, -np.inf)
    left = n - int(counts.sum())
    order = np.argsort(-fraction, kind="stable")
    counts[order[:left]] += 1
    return counts
