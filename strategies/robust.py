"""Robust aggregation of parameter sets: norm clipping, coordinate-wise median, trimmed mean.

Pure functions on ``{tensor name: array}`` dicts, used inside an FL-TAC cluster and for
FedMoE-DA's backbone (``robust.*`` in the config). With the defaults (``mean``, no clipping)
the aggregate is the plain (weighted) mean, bit for bit.

* **Norm clipping** (``clip_norm``): each update ``x_i - r_i`` (against the parameters the
  client started from) is scaled down to L2 norm ``clip_norm`` over all its tensors together;
  a scaled-up or huge update then weighs no more than an honest one.
* **Coordinate-wise median** (Yin et al., 2018): every coordinate is the median of the
  clients' values (unweighted); robust to fewer than half the clients being arbitrary.
* **Trimmed mean** (Yin et al., 2018): every coordinate drops the ``floor(beta * n)`` largest
  and smallest values, then averages the rest (unweighted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedspecialists.config import check_section
from strategies.common import weighted_mean

State = Mapping[str, np.ndarray]


def update_norm(state: State, reference: State) -> float:
    """L2 norm of ``state - reference`` over all tensors together."""
    total = 0.0
    for key, value in state.items():
        diff = np.asarray(value, np.float64) - np.asarray(reference[key], np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def clip_update(state: State, reference: State, max_norm: float) -> dict[str, np.ndarray]:
    """``reference + (state - reference) * min(1, max_norm / norm)``, in each tensor's dtype."""
    norm = update_norm(state, reference)
    if norm <= max_norm:
        return {k: np.asarray(v) for k, v in state.items()}
    scale = max_norm / norm
    out = {}
    for key, value in state.items():
        ref = np.asarray(reference[key], np.float64)
        clipped = ref + (np.asarray(value, np.float64) - ref) * scale
        out[key] = clipped.astype(np.asarray(value).dtype)
    return out


def coordinate_median(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of ``n`` parameter sets (each tensor ``(n, *shape)`` -> ``shape``)."""
    first = states[0]
    return {
        key: np.median(np.stack([np.asarray(s[key], np.float64) for s in states]), axis=0).astype(
            np.asarray(value).dtype
        )
        for key, value in first.items()
    }


def trimmed_mean(states: Sequence[State], fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``floor(fraction * n)`` largest and smallest."""
    n = len(states)
    cut = math.floor(fraction * n)  # < n / 2 for fraction < 0.5: something is always left
    out = {}
    for key, value in states[0].items():
        stacked = np.sort(np.stack([np.asarray(s[key], np.float64) for s in states]), axis=0)
        out[key] = stacked[cut : n - cut].mean(axis=0).astype(np.asarray(value).dtype)
    return out


@dataclass(frozen=True)
class RobustAggregation:
    """How one group of parameter sets is aggregated (``robust.*`` in the config).

    Parameters
    ----------
    rule : str
        ``mean`` (weighted, the methods' own rule), ``median`` or ``trimmed_mean``.
    trim_fraction : float
        ``beta`` of the trimmed mean, in ``[0, 0.5)``.
    clip_norm : float | None
        Clip every update to this L2 norm first (``None``: no clipping).
    """

    rule: str = "mean"
    trim_fraction: float = 0.1
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        check_section("robust", self, ("rule", "trim_fraction", "clip_norm"))

    def __call__(
        self,
        states: Sequence[State],
        weights: Sequence[float] | None = None,
        references: Sequence[State] | None = None,
    ) -> dict[str, np.ndarray]:
        """Aggregate ``states`` (``weights`` only for ``mean``; ``references``, the parameters
        each client started from, only for clipping)."""
        if self.clip_norm is not None:
            if references is None:
                raise ValueError("clipping needs the parameters each update started from")
            states = [
                clip_update(s, r, self.clip_norm) for s, r in zip(states, references, strict=True)
            ]
        if self.rule == "median":
            return coordinate_median(states)
        if self.rule == "trimmed_mean":
            return trimmed_mean(states, self.trim_fraction)
        return weighted_mean(states, weights)
