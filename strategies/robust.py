"""Robust aggregation of parameter sets: norm clipping, coordinate-wise median, trimmed mean.

Pure functions on ``{tensor name: array}`` dicts, used inside an FL-TAC cluster and for
FedMoE-DA's backbone (``robust.*`` in the config). With the defaults (``mean``, no clipping)
the aggregate is the plain (weighted) mean, bit for bit.

* **Norm clipping** (``clip_norm``): each update ``x_i - r_i`` (against the parameters the
  client started from) is scaled down to L2 norm ``clip_norm`` over all its tensors together;
  a scaled-up or huge update then weighs no more than an honest one.
* **Clipping to the median norm** (``clip_to_median_norm``; the adaptive clipping of FLAME,
  Nguyen et al., 2022): the bound is the median of the group's update norms, so it needs no
  number from the user and follows the updates as they shrink over training. An update
  scaled up by a minority is cut to the size of a typical one; honest updates at or below the
  median are untouched.
* **Clipping outlying norms only** (``clip_outlier_norms``; Hampel's identifier on the norms):
  the bound is ``median + 3 * 1.4826 * MAD`` of the group's update norms (MAD: the median
  absolute deviation from their median; 1.4826 makes it a standard deviation for normal data,
  and 3 of those is the identifier's usual cut). Only an update whose size stands out from the
  group's is cut, so honest updates of data-rich clients keep their weight; with two updates
  nothing is cut (no majority size).
* **Clipping norms that are outliers for their local steps** (``clip_outlier_norms_for_steps``):
  an honest update's norm is set mostly by how many optimiser steps made it (a client's steps
  follow its example count), so the norms of one group spread widely but lie on a curve. The
  curve ``log norm = a + b log steps`` is fitted robustly (Siegel's repeated medians, with
  ``0 <= b <= 1``: a norm grows at most linearly with the steps; FL-TAC fits one ``b`` on all
  its clusters of a round, each with its own ``a``), and Hampel's identifier is
  applied to the residuals: an update is cut to ``exp(a + b log steps + 3 * 1.4826 * MAD(e))``
  (``a``: the residuals' median), the largest norm its steps make plausible. Honest updates of
  data-rich clients sit on the curve and keep their norm; one scaled up by a factor stands out
  by ``log factor`` whatever its size. The steps come from the example counts the clients
  report: a client that inflates its count widens its own bound (by at most the ratio of
  counts, the slope being at most 1).
* **Coordinate-wise median** (Yin et al., 2018): every coordinate is the median of the
  clients' values (unweighted); robust to fewer than half the clients being arbitrary.
* **Trimmed mean** (Yin et al., 2018): every coordinate drops the ``floor(beta * n)`` largest
  and smallest values, then averages the rest (unweighted).
* **Dropping opposed updates** (``drop_opposed_updates``): before any of the above, an update
  whose direction is against its group's consensus (negative cosine to the coordinate-wise
  median update) is left out, so a reversed (sign-flipped) update never enters the aggregate
  whatever the rule. A screen on direction only: a scaled update keeps its direction. With
  ``drop_opposed_scope: node`` the client is the unit of trust: every other update of a node
  that sent an opposed one is left out of that round too (FL-TAC: its other task slots).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedspecialists.budget import steps_per_round
from fedspecialists.config import ROBUST_KEYS, TrainSettings, check_section
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


def clip_to_group_bound(
    states: Sequence[State],
    references: Sequence[State],
    bound_of: Callable[[Sequence[float]], float | np.ndarray],
) -> list[dict[str, np.ndarray]]:
    """Every update clipped to ``bound_of(the group's update norms)``.

    Parameters
    ----------
    states, references : Sequence[State]
        ``n`` parameter sets and the parameters each started from.
    bound_of : Callable[[Sequence[float]], float | np.ndarray]
        The bound from the ``n`` update norms (``n >= 1``): one for all, or shape ``(n,)``,
        one for each update.

    Returns
    -------
    list[dict[str, np.ndarray]]
        ``n`` parameter sets; those whose update norm is at most its bound unchanged, the
        others :func:`clip_update`'d to it.
    """
    if not states:
        return []
    norms = [update_norm(s, r) for s, r in zip(states, references, strict=True)]
    bounds = np.broadcast_to(np.asarray(bound_of(norms), np.float64), (len(norms),))
    return [clip_update(s, r, float(b)) for s, r, b in zip(states, references, bounds, strict=True)]


def median_norm_bound(norms: Sequence[float]) -> float:
    """FLAME's bound: the median of the update norms."""
    return float(np.median(np.asarray(norms, np.float64)))


HAMPEL_CUT = 3.0  # MADs above the median at which a norm is an outlier (Hampel's usual cut)
MAD_TO_STD = 1.4826  # 1 / Phi^-1(3/4): the MAD of normal data times this is its std


def outlier_norm_bound(norms: Sequence[float]) -> float:
    """Hampel's bound on update norms: ``median + 3 * 1.4826 * median(|norm - median|)``."""
    arr = np.asarray(norms, np.float64)
    median = float(np.median(arr))
    mad = float(np.median(np.abs(arr - median)))
    return median + HAMPEL_CUT * MAD_TO_STD * mad


def _log_norms_and_steps(
    norms: Sequence[float], steps: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    if len(norms) != len(steps):
        raise ValueError(f"{len(norms)} norms but {len(steps)} step counts")
    log_norm = np.log(np.maximum(np.asarray(norms, np.float64), 1e-12))
    return log_norm, np.log(np.asarray(steps, np.float64))


def step_slope(
    norms: Sequence[float], steps: Sequence[int], groups: Sequence[int] | None = None
) -> float:
    """How update norms grow with local steps: Siegel's repeated-median slope of log norm on
    log steps, each update paired only with updates of its own group, kept in ``[0, 1]``.

    For each update, the median slope to the updates of its group with other steps; the slope
    is the median of those (updates without such a partner have none). One slope for all
    groups (one optimiser, learning rate and model: one law of growth), each group keeping its
    own scale; a group whose only updates with many steps are outliers borrows the slope of
    the others instead of being fitted through them. Robust while fewer than half the updates
    are outliers. Kept in ``[0, 1]``: an update is a sum of ``steps`` steps, so with steps of
    bounded size (AdamW's, bounded by its learning rate) its norm grows at most linearly with
    them; SGD with momentum takes growing steps at first, where this limit cuts tighter.

    Parameters
    ----------
    norms, steps : Sequence
        ``n`` update norms (zeros count as 1e-12) and their optimiser steps (each ``>= 1``).
    groups : Sequence[int] | None
        ``n`` group labels (one group if None).

    Returns
    -------
    float
        The slope; 0 when no group has updates of different steps.
    """
    log_norm, log_steps = _log_norms_and_steps(norms, steps)
    return _repeated_median_slope(log_norm, log_steps, groups)


def _repeated_median_slope(
    log_norm: np.ndarray, log_steps: np.ndarray, groups: Sequence[int] | None
) -> float:
    labels = np.zeros(len(log_norm), np.int64) if groups is None else np.asarray(groups)
    medians = []
    for i in range(len(log_norm)):
        partners = (labels == labels[i]) & (log_steps != log_steps[i])
        if partners.any():
            rise = log_norm[partners] - log_norm[i]
            medians.append(float(np.median(rise / (log_steps[partners] - log_steps[i]))))
    return float(np.clip(np.median(medians), 0.0, 1.0)) if medians else 0.0


def step_outlier_norm_bounds(
    norms: Sequence[float], steps: Sequence[int], slope: float | None = None
) -> np.ndarray:
    """Each update's largest plausible norm for the optimiser steps it took.

    ``log norm_i = b log steps_i + e_i`` with ``b`` the given ``slope``, or this group's
    :func:`step_slope`; then Hampel's identifier on the residuals:
    ``bound_i = exp(b log steps_i + median(e) + 3 * 1.4826 * MAD(e))``.

    Parameters
    ----------
    norms : Sequence[float]
        ``n`` update norms of one group (``n >= 1``; zeros count as 1e-12).
    steps : Sequence[int]
        ``n`` numbers of optimiser steps (each ``>= 1``).
    slope : float | None
        ``b`` (e.g. :func:`step_slope` over every group of the round); None: fitted here.

    Returns
    -------
    np.ndarray
        Shape ``(n,)``: the bounds. With one or two updates and no slope given, none is below
        its bound.
    """
    log_norm, log_steps = _log_norms_and_steps(norms, steps)
    b = _repeated_median_slope(log_norm, log_steps, None) if slope is None else slope
    fitted = b * log_steps
    residuals = log_norm - fitted
    centre = float(np.median(residuals))
    mad = float(np.median(np.abs(residuals - centre)))
    return np.exp(fitted + centre + HAMPEL_CUT * MAD_TO_STD * mad)


def clip_step_outlier_norms(
    states: Sequence[State],
    references: Sequence[State],
    steps: Sequence[int],
    slope: float | None = None,
) -> list[dict[str, np.ndarray]]:
    """Updates with a norm above :func:`step_outlier_norm_bounds` for their ``steps`` (and
    ``slope``) clipped to it; the rest unchanged (``n`` in, ``n`` out)."""
    return clip_to_group_bound(
        states, references, lambda n: step_outlier_norm_bounds(n, steps, slope)
    )


def clip_to_median_norm(
    states: Sequence[State], references: Sequence[State]
) -> list[dict[str, np.ndarray]]:
    """Every update clipped to the median L2 norm of the group's updates (``n`` in, ``n`` out)."""
    return clip_to_group_bound(states, references, median_norm_bound)


def clip_outlier_norms(
    states: Sequence[State], references: Sequence[State]
) -> list[dict[str, np.ndarray]]:
    """Updates with a norm above :func:`outlier_norm_bound` clipped to it; the rest unchanged."""
    return clip_to_group_bound(states, references, outlier_norm_bound)


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


MIN_GROUP_TO_SCREEN = 3  # two updates that disagree give no majority direction


def _flat_update(state: State, reference: State) -> np.ndarray:
    """``state - reference`` over all tensors (sorted by name), flattened, float64."""
    return np.concatenate(
        [
            (np.asarray(state[k], np.float64) - np.asarray(reference[k], np.float64)).ravel()
            for k in sorted(state)
        ]
    )


def median_cosines(states: Sequence[State], references: Sequence[State]) -> np.ndarray:
    """Cosine of each update to the coordinate-wise median of the group's updates.

    Parameters
    ----------
    states, references : Sequence[State]
        ``n`` parameter sets and the parameters each started from.

    Returns
    -------
    np.ndarray
        Shape ``(n,)``; 0 where an update or the median update is all zeros (no direction).
    """
    updates = np.stack([_flat_update(s, r) for s, r in zip(states, references, strict=True)])
    consensus = np.median(updates, axis=0)  # (D,)
    norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(consensus)  # (n,)
    dots = updates @ consensus
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def opposed_updates(
    states: Sequence[State], references: Sequence[State], labels: Sequence[int] | None = None
) -> dict[int, float]:
    """Members whose update points against their group's consensus: index -> its cosine.

    Within each group (equal ``labels``; one group if None) of at least
    :data:`MIN_GROUP_TO_SCREEN` members, a member is opposed when its update has a negative
    cosine to the group's coordinate-wise median update (:func:`median_cosines`). They are
    returned only while fewer than half of the group are opposed: otherwise there is no
    majority direction to trust, and nothing of that group is returned.
    """
    groups = np.zeros(len(states), np.int64) if labels is None else np.asarray(labels)
    opposed: dict[int, float] = {}
    for label in sorted(set(groups.tolist())):
        members = np.flatnonzero(groups == label).tolist()
        if len(members) < MIN_GROUP_TO_SCREEN:
            continue
        cosines = median_cosines([states[m] for m in members], [references[m] for m in members])
        against = {m: float(c) for m, c in zip(members, cosines, strict=True) if c < 0}
        if 2 * len(against) < len(members):
            opposed.update(against)
    return opposed


def with_their_nodes(
    opposed: Mapping[int, float], owners: Sequence[int], labels: Sequence[int] | None = None
) -> dict[int, int]:
    """The other updates of the nodes that sent an opposed update: index -> the index of its
    node's most opposed update (the evidence against it).

    An update stays where leaving it out would empty its group (equal ``labels``; one group if
    None): a group keeps its aggregate. ``opposed`` are never emptied (fewer than half of a
    group, :func:`opposed_updates`).
    """
    evidence: dict[int, int] = {}
    for i in sorted(opposed, key=lambda i: (opposed[i], i)):  # most opposed first
        evidence.setdefault(owners[i], i)
    groups = [0] * len(owners) if labels is None else list(labels)
    extra = {i: evidence[o] for i, o in enumerate(owners) if o in evidence and i not in opposed}
    kept = {i for i in range(len(owners)) if i not in opposed and i not in extra}
    alive = {groups[i] for i in kept}
    return {i: cause for i, cause in extra.items() if groups[i] in alive}


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
    clip_to_median_norm : bool
        Then clip every update to the median norm of the group's updates
        (:func:`clip_to_median_norm`).
    clip_outlier_norms : bool
        Then clip only the updates whose norm is an outlier of the group's
        (:func:`clip_outlier_norms`).
    clip_outlier_norms_for_steps : bool
        Then clip only the updates whose norm is an outlier for the optimiser steps they took
        (:func:`clip_step_outlier_norms`; the steps from each update's example count and
        ``train``).
    drop_opposed_updates : bool
        Leave out updates opposed to their group's median update (:func:`opposed_updates`);
        the strategy asks :meth:`opposed` which, logs them and aggregates the rest.
    drop_opposed_scope : str
        ``update`` (only the opposed updates) or ``node`` (also every other update of their
        nodes in that round: :meth:`with_their_nodes`).
    train : TrainSettings | None
        The run's ``train`` settings: how many steps a client takes for its examples
        (:func:`fedspecialists.budget.steps_per_round`). Needed by
        ``clip_outlier_norms_for_steps`` only; not a ``robust`` key, not compared or shown.
    step_slope : float | None
        The step clip's slope, set for one round by :meth:`for_groups` (None: each group
        fits its own); not compared or shown.
    """

    rule: str = "mean"
    trim_fraction: float = 0.1
    clip_norm: float | None = None
    clip_to_median_norm: bool = False
    clip_outlier_norms: bool = False
    clip_outlier_norms_for_steps: bool = False
    drop_opposed_updates: bool = False
    drop_opposed_scope: str = "update"
    train: TrainSettings | None = field(default=None, compare=False, repr=False)
    step_slope: float | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_section("robust", self, ROBUST_KEYS)
        if self.clip_outlier_norms_for_steps and self.train is None:
            raise ValueError(
                "robust.clip_outlier_norms_for_steps needs the run's train settings: "
                "RobustAggregation.from_settings(cfg.robust, cfg.train)"
            )

    @classmethod
    def from_settings(
        cls, settings: object, train: TrainSettings | None = None
    ) -> RobustAggregation:
        """From a config's ``robust`` section (every key of :data:`ROBUST_KEYS`) and its
        ``train`` section (the local steps behind each update)."""
        return cls(**{key: getattr(settings, key) for key in ROBUST_KEYS}, train=train)

    def for_groups(
        self,
        states: Sequence[State],
        references: Sequence[State],
        examples: Sequence[int],
        groups: Sequence[int],
    ) -> RobustAggregation:
        """This aggregation with the step clip's slope fitted on every group of a round at once
        (:func:`step_slope`); itself when that clip is off."""
        if not self.clip_outlier_norms_for_steps:
            return self
        norms = [update_norm(s, r) for s, r in zip(states, references, strict=True)]
        return replace(self, step_slope=step_slope(norms, self.local_steps(examples), groups))

    def local_steps(self, examples: Sequence[int]) -> list[int]:
        """The optimiser steps behind updates of clients with these example counts."""
        if self.train is None:
            raise ValueError("local steps need the run's train settings")
        return [steps_per_round(self.train, int(n)) for n in examples]

    def opposed(
        self,
        states: Sequence[State],
        references: Sequence[State],
        labels: Sequence[int] | None = None,
    ) -> dict[int, float]:
        """:func:`opposed_updates` when ``drop_opposed_updates`` is on, else nothing."""
        if not self.drop_opposed_updates:
            return {}
        return opposed_updates(states, references, labels)

    def with_their_nodes(
        self, opposed: Mapping[int, float], owners: Sequence[int], labels: Sequence[int] | None
    ) -> dict[int, int]:
        """:func:`with_their_nodes` with ``drop_opposed_scope: node``, else nothing."""
        if self.drop_opposed_scope != "node":
            return {}
        return with_their_nodes(opposed, owners, labels)

    def clipped(
        self,
        states: Sequence[State],
        references: Sequence[State],
        examples: Sequence[int] | None = None,
    ) -> Sequence[State]:
        """``states`` with their updates clipped: to ``clip_norm``, then to the median norm,
        then the outlying norms, then the norms outlying for their steps (``examples``: each
        update's example count, needed by that last clip only)."""
        if self.clip_norm is not None:
            bound = self.clip_norm
            states = [clip_update(s, r, bound) for s, r in zip(states, references, strict=True)]
        if self.clip_to_median_norm:
            states = clip_to_median_norm(states, references)
        if self.clip_outlier_norms:
            states = clip_outlier_norms(states, references)
        if self.clip_outlier_norms_for_steps:
            if examples is None:
                raise ValueError("clip_outlier_norms_for_steps needs each update's examples")
            steps = self.local_steps(examples)
            states = clip_step_outlier_norms(states, references, steps, self.step_slope)
        return states

    def clipped_norms(
        self,
        states: Sequence[State],
        references: Sequence[State],
        examples: Sequence[int] | None = None,
    ) -> dict[int, tuple[float, float]]:
        """``{index: (norm before, norm after)}`` of every update the configured clipping cuts
        (none without clipping): for the round's record."""
        if not self.clips:
            return {}
        after = self.clipped(states, references, examples)
        out = {}
        for i, (state, cut, ref) in enumerate(zip(states, after, references, strict=True)):
            before, now = update_norm(state, ref), update_norm(cut, ref)
            if now < before * (1.0 - 1e-9):  # not a float wobble of an untouched update
                out[i] = (before, now)
        return out

    @property
    def clips(self) -> bool:
        """Whether any clipping is configured (it needs the updates' references)."""
        return (
            self.clip_norm is not None
            or self.clip_to_median_norm
            or self.clip_outlier_norms
            or self.clip_outlier_norms_for_steps
        )

    def __call__(
        self,
        states: Sequence[State],
        weights: Sequence[float] | None = None,
        references: Sequence[State] | None = None,
        examples: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Aggregate ``states`` (``weights`` only for ``mean``; ``references``, the parameters
        each client started from, only for clipping; ``examples``, each client's example count,
        only for ``clip_outlier_norms_for_steps``)."""
        if self.clips:
            if references is None:
                raise ValueError("clipping needs the parameters each update started from")
            states = self.clipped(states, references, examples)
        if self.rule == "median":
            return coordinate_median(states)
        if self.rule == "trimmed_mean":
            return trimmed_mean(states, self.trim_fraction)
        return weighted_mean(states, weights)
