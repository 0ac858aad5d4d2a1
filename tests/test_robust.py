"""Robust aggregation against values worked out by hand."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from test_training import BASE

from strategies.common import weighted_mean
from strategies.robust import (
    RobustAggregation,
    clip_outlier_norms,
    clip_step_outlier_norms,
    clip_to_median_norm,
    clip_update,
    coordinate_median,
    median_cosines,
    opposed_updates,
    outlier_norm_bound,
    step_outlier_norm_bounds,
    step_slope,
    trimmed_mean,
    update_norm,
    with_their_nodes,
)


def _s(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.asarray(values, np.float32)}


STATES = [_s(1.0, 10.0), _s(2.0, -4.0), _s(3.0, 0.0), _s(100.0, 1.0), _s(4.0, 2.0)]


def test_update_norm_and_clipping_by_hand() -> None:
    ref = {"w": np.asarray([1.0, 1.0], np.float32), "b": np.asarray([0.0], np.float32)}
    state = {"w": np.asarray([4.0, 1.0], np.float32), "b": np.asarray([4.0], np.float32)}
    assert update_norm(state, ref) == pytest.approx(5.0)  # sqrt(3^2 + 0 + 4^2)
    clipped = clip_update(state, ref, 1.0)  # scale 1/5
    assert_allclose(clipped["w"], [1.6, 1.0], rtol=1e-6)
    assert_allclose(clipped["b"], [0.8], rtol=1e-6)
    assert clipped["w"].dtype == np.float32
    untouched = clip_update(state, ref, 5.0)  # norm 5 <= 5: as it was
    assert_array_equal(untouched["w"], state["w"])


def test_coordinate_median_by_hand() -> None:
    # w[0]: 1, 2, 3, 100, 4 -> 3;  w[1]: 10, -4, 0, 1, 2 -> 1
    assert_array_equal(coordinate_median(STATES)["w"], np.asarray([3.0, 1.0], np.float32))
    # An even count averages the two middle values: 1, 2, 3, 100 -> 2.5
    assert coordinate_median(STATES[:4])["w"][0] == pytest.approx(2.5)


def test_trimmed_mean_by_hand() -> None:
    # beta 0.2 of 5 values drops 1 at each end. w[0]: 2, 3, 4 -> 3; w[1]: 0, 1, 2 -> 1
    assert_allclose(trimmed_mean(STATES, 0.2)["w"], [3.0, 1.0])
    # beta 0.1: floor(0.5) = 0 dropped, the plain mean: (1+2+3+100+4)/5 = 22
    assert trimmed_mean(STATES, 0.1)["w"][0] == pytest.approx(22.0)
    assert math.floor(0.4 * 5) == 2  # beta 0.4 drops 2 each end, the median is left
    assert_allclose(trimmed_mean(STATES, 0.4)["w"], [3.0, 1.0])


def test_the_default_is_the_weighted_mean_bit_for_bit() -> None:
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert_array_equal(
        RobustAggregation()(STATES, weights)["w"], weighted_mean(STATES, weights)["w"]
    )


def test_clipping_then_median_tames_a_scaled_update() -> None:
    ref = _s(0.0, 0.0)
    honest = [_s(1.0, 0.0), _s(0.0, 1.0), _s(0.6, 0.8)]
    attack = _s(1000.0, 0.0)  # a scaled update: clipped to norm 1 -> (1, 0)
    out = RobustAggregation("mean", clip_norm=1.0)([*honest, attack], None, [ref] * 4)
    assert_allclose(out["w"], [(1 + 0 + 0.6 + 1) / 4, (0 + 1 + 0.8 + 0) / 4], rtol=1e-6)
    with pytest.raises(ValueError, match="started from"):
        RobustAggregation(clip_norm=1.0)(honest)


def test_clipping_to_the_median_norm_by_hand() -> None:
    ref = _s(1.0, 1.0)
    # updates (3, 4) norm 5, (0, 2) norm 2, (-30, 40) norm 50: median norm 5
    states = [_s(4.0, 5.0), _s(1.0, 3.0), _s(-29.0, 41.0)]
    out = clip_to_median_norm(states, [ref] * 3)
    assert_array_equal(out[0]["w"], states[0]["w"])  # at the median: untouched
    assert_array_equal(out[1]["w"], states[1]["w"])  # below it: untouched
    assert_allclose(out[2]["w"], [1.0 - 3.0, 1.0 + 4.0], rtol=1e-6)  # (-30, 40) / 10
    # An even count: norms 5 and 2 -> median 3.5; (3, 4) cut to (2.1, 2.8)
    assert_allclose(clip_to_median_norm(states[:2], [ref] * 2)[0]["w"], [3.1, 3.8], rtol=1e-6)


def test_the_median_norm_tames_a_scaled_update_in_the_mean() -> None:
    ref = _s(0.0, 0.0)
    honest = [_s(1.0, 0.0), _s(0.0, 2.0), _s(0.0, 3.0)]
    attack = _s(100.0, 0.0)  # norms 1, 2, 3, 100: median 2.5, the attack cut to (2.5, 0)
    robust = RobustAggregation("mean", clip_to_median_norm=True)
    out = robust([*honest, attack], None, [ref] * 4)
    assert_allclose(out["w"], [(1 + 0 + 0 + 2.5) / 4, (0 + 2 + 2.5 + 0) / 4], rtol=1e-6)
    # with a fixed bound of 2 first: norms 1, 2, 2, 2 -> median 2, nothing more to cut
    both = RobustAggregation("mean", clip_norm=2.0, clip_to_median_norm=True)
    out = both([*honest, attack], None, [ref] * 4)
    assert_allclose(out["w"], [(1 + 0 + 0 + 2) / 4, (0 + 2 + 2 + 0) / 4], rtol=1e-6)
    with pytest.raises(ValueError, match="started from"):
        robust(honest)


def test_the_outlier_norm_bound_by_hand() -> None:
    # norms 1, 2, 3, 4, 100: median 3, |deviations| 2, 1, 0, 1, 97 -> MAD 1
    assert outlier_norm_bound([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(3 + 3 * 1.4826)
    # two norms: median 2, MAD 1 -> 2 + 4.4478, above both: nothing is an outlier
    assert outlier_norm_bound([1.0, 3.0]) == pytest.approx(2 + 3 * 1.4826)
    # more than half equal: MAD 0, the bound is the median
    assert outlier_norm_bound([2.0, 2.0, 5.0]) == pytest.approx(2.0)


def test_clipping_outlying_norms_only_by_hand() -> None:
    ref = _s(1.0, 1.0)
    # updates (1, 0), (0, 2), (3, 0), (0, 4), (-60, 80): norms 1, 2, 3, 4, 100 -> bound 7.4478
    updates = [(1.0, 0.0), (0.0, 2.0), (3.0, 0.0), (0.0, 4.0), (-60.0, 80.0)]
    states = [_s(1.0 + x, 1.0 + y) for x, y in updates]
    out = clip_outlier_norms(states, [ref] * 5)
    for i in range(4):  # honest sizes, some above the median: untouched (unlike the median clip)
        assert_array_equal(out[i]["w"], states[i]["w"])
    bound = 3 + 3 * 1.4826
    assert_allclose(out[4]["w"], [1.0 - 0.6 * bound, 1.0 + 0.8 * bound], rtol=1e-6)
    assert clip_outlier_norms([], []) == []


def test_the_clipped_norms_are_reported_by_index() -> None:
    ref = _s(1.0, 1.0)
    # updates (3, 4) norm 5, (0, 2) norm 2, (-30, 40) norm 50: median norm 5
    states = [_s(4.0, 5.0), _s(1.0, 3.0), _s(-29.0, 41.0)]
    median = RobustAggregation(clip_to_median_norm=True).clipped_norms(states, [ref] * 3)
    assert median.keys() == {2} and median[2] == pytest.approx((50.0, 5.0))
    # a fixed bound of 3: (3, 4) and (-30, 40) cut to 3
    fixed = RobustAggregation(clip_norm=3.0).clipped_norms(states, [ref] * 3)
    assert fixed.keys() == {0, 2}
    assert fixed[0] == pytest.approx((5.0, 3.0)) and fixed[2] == pytest.approx((50.0, 3.0))
    assert RobustAggregation().clipped_norms(states, [ref] * 3) == {}  # no clipping configured


def test_outlier_clipping_in_the_mean() -> None:
    ref = _s(0.0, 0.0)
    honest = [_s(1.0, 0.0), _s(0.0, 2.0), _s(0.0, 3.0)]
    attack = _s(100.0, 0.0)  # norms 1, 2, 3, 100: median 2.5, MAD 1 -> bound 2.5 + 4.4478
    robust = RobustAggregation("mean", clip_outlier_norms=True)
    out = robust([*honest, attack], None, [ref] * 4)
    bound = 2.5 + 3 * 1.4826
    assert_allclose(out["w"], [(1 + bound) / 4, (2 + 3) / 4], rtol=1e-6)
    with pytest.raises(ValueError, match="started from"):
        robust(honest)


def test_the_step_outlier_bounds_without_a_spread_in_steps_by_hand() -> None:
    # same steps: Hampel on the log norms 0, 0.1, -0.1, 0.2, ln 100: median 0.1,
    # |deviations| 0.1, 0, 0.2, 0.1, 4.5 -> MAD 0.1 -> bound exp(0.1 + 3 * 1.4826 * 0.1) for all
    norms = [1.0, math.exp(0.1), math.exp(-0.1), math.exp(0.2), 100.0]
    assert_allclose(
        step_outlier_norm_bounds(norms, [2] * 5), [math.exp(0.1 + 0.44478)] * 5, rtol=1e-9
    )
    assert_allclose(step_outlier_norm_bounds([0.3], [7]), [0.3], rtol=1e-12)  # one: its own
    with pytest.raises(ValueError, match="3 norms but 2"):
        step_outlier_norm_bounds([1.0, 2.0, 3.0], [1, 2])


# Steps 2, 2, 4, 4, 16 and 4 (log: a, a, 2a, 2a, 4a, 2a with a = ln 2); honest norms sqrt(steps),
# the last one 20. Siegel's slope, each point's median slope to the points of other steps:
# honest ones to honest ones 0.5; the attacker's to steps 2 (ln 20 - a/2) / a = 3.82, to steps
# 16 (2a - ln 20) / 2a = -1.16. Steps-2 points: median(0.5, 0.5, 0.5, 3.82) = 0.5; steps 4:
# 0.5; steps 16: median(0.5 x 4, -1.16) = 0.5; the attacker: median(3.82, 3.82, -1.16) = 3.82.
# The median of the six is 0.5. Residuals log norm - 0.5 log steps: 0 (honest) and ln 10:
# median 0, MAD 0, so each bound is sqrt(steps).
STEPS = [2, 2, 4, 4, 16, 4]
STEP_NORMS = [math.sqrt(2), math.sqrt(2), 2.0, 2.0, 4.0, 20.0]


def test_the_step_outlier_bounds_follow_the_fit_of_log_norm_on_log_steps() -> None:
    bounds = step_outlier_norm_bounds(STEP_NORMS, STEPS)
    assert_allclose(bounds, np.sqrt(STEPS), rtol=1e-9)


def test_the_step_slope_is_at_most_one() -> None:
    """Honest norms 0.5 at 2 steps, two scaled ones 10 and 12 at 8 steps (no honest update
    there to fit on): Siegel's slope ln 20 / ln 4 = 2.16 to 2.29 would pass through them; kept
    at 1. Residuals log norm - log steps: ln 0.25 (x 4), ln 1.25, ln 1.5: median ln 0.25, MAD 0,
    so each bound is steps / 4: 0.5 for the honest ones, 2 for the scaled ones."""
    bounds = step_outlier_norm_bounds([0.5, 0.5, 0.5, 0.5, 10.0, 12.0], [2, 2, 2, 2, 8, 8])
    assert_allclose(bounds, [0.5, 0.5, 0.5, 0.5, 2.0, 2.0], rtol=1e-9)


def test_the_step_slope_is_siegels_repeated_median_on_one_group() -> None:
    from scipy.stats import siegelslopes

    rng = np.random.default_rng(0)
    steps = rng.integers(1, 20, size=15)
    norms = np.exp(0.6 * np.log(steps) + rng.normal(0.0, 0.1, size=15))
    norms[:3] *= 10.0  # three scaled ones
    expected = siegelslopes(np.log(norms), np.log(steps.astype(np.float64)))[0]
    assert step_slope(norms.tolist(), steps.tolist()) == pytest.approx(expected, rel=1e-12)
    assert step_slope([1.0, 2.0], [3, 3]) == 0.0  # no two steps differ: no slope to fit


def test_one_slope_for_all_groups_by_hand() -> None:
    """Group 0: norms 1 at 2 steps and 2 at 8 steps, four of each: every point's median slope
    ln 2 / ln 4 = 0.5. Group 1: four honest norms 0.5 at 2 steps, scaled 10 and 12 at 8 steps:
    the honest points' median slopes (ln 20 / ln 4 + ln 24 / ln 4) / 2 = 2.23, the scaled ones'
    2.16 and 2.29. The 14 medians: eight 0.5 -> the slope is 0.5 (group 1 alone: 1, kept so
    from 2.2). Group 1's residuals log norm - 0.5 log steps: ln(0.5 / sqrt 2) four times, then
    larger: median ln(0.5 / sqrt 2), MAD 0, so the bounds are sqrt(steps) * 0.5 / sqrt 2: 0.5
    at 2 steps, 1.0 at 8 (group 1 fitted alone: 2.0)."""
    norms = [1.0] * 4 + [2.0] * 4 + [0.5] * 4 + [10.0, 12.0]
    steps = [2] * 4 + [8] * 4 + [2] * 4 + [8, 8]
    groups = [0] * 8 + [1] * 6
    assert step_slope(norms, steps, groups) == pytest.approx(0.5, rel=1e-12)
    assert step_slope(norms[8:], steps[8:]) == 1.0
    bounds = step_outlier_norm_bounds(norms[8:], steps[8:], slope=0.5)
    assert_allclose(bounds, [0.5] * 4 + [1.0, 1.0], rtol=1e-9)
    assert_allclose(step_outlier_norm_bounds(norms[8:], steps[8:])[4:], [2.0, 2.0], rtol=1e-9)


def test_clipping_norms_that_are_outliers_for_their_steps_by_hand() -> None:
    ref = _s(0.0, 0.0)
    states = [_s(n, 0.0) for n in STEP_NORMS[:5]] + [_s(0.0, 20.0)]
    out = clip_step_outlier_norms(states, [ref] * 6, STEPS)
    for i in range(5):  # data-rich honest updates are far above the median norm: untouched
        assert_allclose(out[i]["w"], states[i]["w"], rtol=1e-6)
    assert_allclose(out[5]["w"], [0.0, 2.0], rtol=1e-6)  # cut to sqrt(4)


# Examples 8, 8, 32, 32, 128, 32 at batch 16 and 2 epochs: 2, 2, 4, 4, 16, 4 steps (STEPS).
TRAIN = replace(BASE, batch_size=16)
EXAMPLES = [8, 8, 32, 32, 128, 32]


def test_the_step_clip_in_the_mean_takes_the_steps_from_the_examples() -> None:
    ref = _s(0.0, 0.0)
    states = [_s(n, 0.0) for n in STEP_NORMS[:5]] + [_s(0.0, 20.0)]
    robust = RobustAggregation("mean", clip_outlier_norms_for_steps=True, train=TRAIN)
    assert robust.local_steps(EXAMPLES) == STEPS
    out = robust(states, None, [ref] * 6, EXAMPLES)
    assert_allclose(out["w"], [(2 * math.sqrt(2) + 2 + 2 + 4) / 6, 2.0 / 6], rtol=1e-6)
    cut = robust.clipped_norms(states, [ref] * 6, EXAMPLES)
    assert cut.keys() == {5} and cut[5] == pytest.approx((20.0, 2.0))
    with pytest.raises(ValueError, match="examples"):
        robust(states, None, [ref] * 6)
    with pytest.raises(ValueError, match="train settings"):
        RobustAggregation(clip_outlier_norms_for_steps=True)
    pooled = robust.for_groups(states, [ref] * 6, EXAMPLES, [0] * 6)
    assert pooled.step_slope == pytest.approx(0.5) and pooled == robust
    assert RobustAggregation().for_groups(states, [ref] * 6, EXAMPLES, [0] * 6).step_slope is None
    fixed = RobustAggregation(
        clip_outlier_norms_for_steps=True, train=replace(TRAIN, local_steps=5)
    )
    assert fixed.local_steps(EXAMPLES) == [5] * 6  # train.local_steps: the same for everyone
    assert fixed == RobustAggregation(clip_outlier_norms_for_steps=True, train=TRAIN)


ZERO = _s(0.0, 0.0)
# Updates (against ZERO): three honest ones and a reversed one.
#   x: 1, 0, 1, -1 -> sorted -1, 0, 1, 1 -> median 0.5;  y: 0, 1, 1, -1 -> median 0.5
# consensus (0.5, 0.5): cos (1, 0) = cos (0, 1) = 1/sqrt(2); cos (1, 1) = 1; cos (-1, -1) = -1
FOUR = [_s(1.0, 0.0), _s(0.0, 1.0), _s(1.0, 1.0), _s(-1.0, -1.0)]


def test_median_cosines_by_hand() -> None:
    cosines = median_cosines(FOUR, [ZERO] * 4)
    assert_allclose(cosines, [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0, -1.0])
    # An update of zero (a slot without examples) has no direction: cosine 0, never opposed.
    assert median_cosines([*FOUR[:3], ZERO], [ZERO] * 4)[3] == 0.0
    # Against references other than zero: the same updates, the same cosines.
    ref = _s(5.0, -2.0)
    shifted = [_s(5.0 + s["w"][0], -2.0 + s["w"][1]) for s in FOUR]
    assert_allclose(median_cosines(shifted, [ref] * 4), cosines, rtol=1e-6)


def test_opposed_updates_by_hand() -> None:
    assert opposed_updates(FOUR, [ZERO] * 4) == pytest.approx({3: -1.0})
    # Two members give no majority direction: a group below three is never screened.
    assert opposed_updates(FOUR[2:], [ZERO] * 2) == {}
    # Groups are screened apart: the reversed update is alone with (1, 1) in group 1.
    assert opposed_updates(FOUR, [ZERO] * 4, labels=[0, 0, 1, 1]) == {}
    # Three updates each against the coordinate-wise median (1, 1, 1): every cosine is
    # (1 + 1 - 3) / (sqrt(11) sqrt(3)) < 0, so no majority: nothing is returned.
    spread = [{"w": np.asarray(v, np.float32)} for v in ([1, 1, -3], [1, -3, 1], [-3, 1, 1])]
    zero3 = {"w": np.zeros(3, np.float32)}
    assert_allclose(median_cosines(spread, [zero3] * 3), [-1 / math.sqrt(33)] * 3, rtol=1e-6)
    assert opposed_updates(spread, [zero3] * 3) == {}


def test_with_their_nodes_by_hand() -> None:
    # Node 4 sent index 3 (opposed) and index 4: index 4 goes too, on index 3's evidence.
    assert with_their_nodes({3: -1.0}, owners=[1, 2, 3, 4, 4]) == {4: 3}
    # Two opposed updates of node 4: its third update is charged to the most opposed one.
    owners = [1, 2, 3, 4, 4, 4, 5]
    assert with_their_nodes({3: -0.2, 4: -0.7}, owners) == {5: 4}
    # Nodes without an opposed update keep everything.
    assert with_their_nodes({}, owners) == {}
    # Leaving index 4 out would empty its group (label 1): it stays, its group keeps a mean.
    assert with_their_nodes({3: -1.0}, [1, 2, 3, 4, 4], labels=[0, 0, 0, 0, 1]) == {}
    assert with_their_nodes({3: -1.0}, [1, 2, 3, 4, 4, 5], labels=[0, 0, 0, 0, 1, 1]) == {4: 3}


def test_node_scope_only_when_asked() -> None:
    owners = [1, 2, 3, 4, 4]
    assert (
        RobustAggregation(drop_opposed_updates=True).with_their_nodes({3: -1.0}, owners, None) == {}
    )
    node = RobustAggregation(drop_opposed_updates=True, drop_opposed_scope="node")
    assert node.with_their_nodes({3: -1.0}, owners, None) == {4: 3}


def test_dropping_opposed_updates_is_off_by_default() -> None:
    assert RobustAggregation().opposed(FOUR, [ZERO] * 4) == {}
    on = RobustAggregation(drop_opposed_updates=True)
    assert on.opposed(FOUR, [ZERO] * 4) == pytest.approx({3: -1.0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "max"}, "rule"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"drop_opposed_updates": "yes"}, "drop_opposed_updates"),
        ({"clip_to_median_norm": 1}, "clip_to_median_norm"),
        ({"clip_outlier_norms": "yes"}, "clip_outlier_norms"),
        ({"clip_outlier_norms_for_steps": 1}, "clip_outlier_norms_for_steps"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RobustAggregation(**kwargs)
