"""calibration.stats: the pure functions behind thresholds.yaml, on numbers with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from calibration import stats


# ---------------------------------------------------------------- binomial intervals


@pytest.mark.parametrize("n", [20, 100, 3000])
def test_clopper_pearson_matches_closed_forms_at_the_edges(n: int) -> None:
    alpha = 1 - stats.CONFIDENCE
    lo, hi = stats.clopper_pearson(0, n)
    assert lo == 0.0
    assert hi == pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-9)  # k=0: 1 - (a/2)^(1/n)
    lo, hi = stats.clopper_pearson(n, n)
    assert hi == 1.0
    assert lo == pytest.approx((alpha / 2) ** (1 / n), rel=1e-9)


def test_clopper_pearson_refuses_impossible_counts() -> None:
    with pytest.raises(stats.StatsError, match="k <= n"):
        stats.clopper_pearson(5, 4)


# ---------------------------------------------------------------- quantile threshold


def test_quantile_threshold_is_the_conformal_order_statistic() -> None:
    scores = np.arange(1, 101, dtype=float)  # 1..100
    t = stats.quantile_threshold(scores, 0.05)
    # ceil(0.95 * 101) = 96th smallest -> 96, with 4 scores above it
    assert t.threshold == 96.0
    assert t.exceedances == 4
    assert t.expected_rate == pytest.approx(5 / 101)
    assert t.ci == stats.clopper_pearson(4, 100)
    assert t.warnings == ()


def test_quantile_threshold_controls_the_false_alarm_rate_on_average() -> None:
    """Uniform scores: the true false-alarm rate at threshold t is 1 - t. Over many calibrations its mean is at most
    the target (conservative) but not far below it, and the stated interval covers it about 95% of the time."""
    rng = np.random.default_rng(7)
    rate, n, runs = 0.05, 200, 1000
    true_rates, covered = [], 0
    for _ in range(runs):
        t = stats.quantile_threshold(rng.uniform(size=n), rate)
        fa = 1.0 - t.threshold
        true_rates.append(fa)
        covered += t.ci[0] <= fa <= t.ci[1]
    mean = float(np.mean(true_rates))
    assert 0.04 < mean <= rate + 0.003  # expected (k+1)/(n+1) = 10/201 = 0.0498
    assert covered / runs >= 0.93


def test_unresolvable_rate_warns_with_the_frames_needed() -> None:
    scores = np.random.default_rng(0).normal(size=100)
    t = stats.quantile_threshold(scores, 0.001)
    assert t.threshold == scores.max()
    text = " ".join(t.warnings)
    assert "3000" in text and "100 good frames" in text


def test_too_few_frames_is_an_error() -> None:
    with pytest.raises(stats.StatsError, match=f"at least {stats.MIN_FRAMES}"):
        stats.quantile_threshold(np.arange(stats.MIN_FRAMES - 1, dtype=float), 0.1)


def test_nan_scores_are_refused() -> None:
    scores = np.arange(50, dtype=float)
    scores[3] = np.nan
    with pytest.raises(stats.StatsError, match="NaN"):
        stats.choose_image_threshold(scores, 0.05)


# ---------------------------------------------------------------- generalised Pareto tail


def test_gpd_extrapolates_an_exponential_tail() -> None:
    """Exponential scores: P(X > x) = exp(-x). 1000 frames cannot resolve 1e-3 by counting (3/N = 3e-3); over 20
    calibrations the tail fit's true false-alarm rate is centred on the target, within a factor 4 nearly always."""
    true_rates = []
    for seed in range(20):
        fit = stats.fit_gpd_tail(np.random.default_rng(seed).exponential(size=1000))
        assert fit.sound, fit.problems
        true_rates.append(math.exp(-fit.threshold_for(1e-3)))
    ratio = np.asarray(true_rates) / 1e-3
    assert 0.5 < float(np.median(ratio)) < 2.0
    assert np.mean((ratio > 0.25) & (ratio < 4.0)) >= 0.9


def test_auto_picks_the_tail_fit_below_the_resolution_and_states_its_interval() -> None:
    scores = np.random.default_rng(0).exponential(size=1000)
    t = stats.choose_image_threshold(scores, 1e-3, n_boot=40)
    assert t.strategy == "gpd"
    true_rate = math.exp(-t.threshold)
    assert t.model_ci is not None and t.model_ci[0] <= true_rate <= t.model_ci[1]
    assert t.ci[0] <= true_rate <= t.ci[1]  # the data-only binomial interval holds too (it is just wide)
    assert any("3000" in w for w in t.warnings)


def test_gpd_unsound_on_a_heavy_tail_falls_back_to_the_quantile() -> None:
    scores = np.random.default_rng(4).pareto(0.7, size=400)  # shape ~1.4: far outside the sound range
    fit = stats.fit_gpd_tail(scores)
    assert not fit.sound and "shape" in fit.problems[0]
    t = stats.choose_image_threshold(scores, 1e-3)
    assert t.strategy == "quantile"
    assert t.threshold == scores.max()
    assert any("no tail extrapolation" in w for w in t.warnings)
    with pytest.raises(stats.StatsError, match="not sound"):
        stats.gpd_threshold(scores, 1e-3)


def test_gpd_needs_enough_frames_for_a_tail() -> None:
    fit = stats.fit_gpd_tail(np.random.default_rng(5).exponential(size=50))
    assert not fit.sound and "at least 80" in fit.problems[0]


def test_resolvable_rate_uses_the_quantile_even_in_auto() -> None:
    scores = np.random.default_rng(6).exponential(size=400)
    assert stats.choose_image_threshold(scores, 0.01).strategy == "quantile"  # 3/400 < 1%


# ---------------------------------------------------------------- labelled defects


def test_best_f1_threshold_by_hand() -> None:
    # goods 0..3, defects 2.5, 4, 5: between 2 and 2.5 -> tp 3, fp 1 -> F1 6/7; above 3 -> tp 2, fp 0 -> 0.8
    best = stats.best_f1_threshold([0, 1, 2, 3], [2.5, 4, 5])
    assert best.threshold == pytest.approx(2.25)
    assert best.f1 == pytest.approx(6 / 7)
    assert (best.precision, best.recall) == (pytest.approx(0.75), 1.0)


def test_best_f1_prefers_the_higher_of_equal_thresholds() -> None:
    best = stats.best_f1_threshold([0, 1], [5, 6])  # anything in (1, 5) is perfect: take the middle of 1 and 5
    assert best.f1 == 1.0 and best.threshold == pytest.approx(3.0)


def test_miss_rates_per_type_and_overall() -> None:
    m = stats.miss_rates({"pit": [1.0, 3.0], "scratch": [0.5, 0.6, 4.0]}, threshold=2.0)
    assert m["pit"]["missed"] == 1 and m["pit"]["miss_rate"] == 0.5
    assert m["scratch"]["missed"] == 2 and m["all"]["n"] == 5 and m["all"]["missed"] == 3
    assert m["all"]["ci_low"] < 0.6 < m["all"]["ci_high"]


# ---------------------------------------------------------------- pixel thresholds (regions: tests/test_regions.py)


def test_pixel_thresholds_keep_good_frames_free_of_regions_at_the_rate() -> None:
    import cv2

    rng = np.random.default_rng(8)
    maps = np.stack([cv2.GaussianBlur(rng.normal(size=(32, 32)).astype(np.float32), (0, 0), 1.5) for _ in range(200)])
    p = stats.fit_pixel_thresholds(maps, 0.05)
    # conformal index of 200 maxima at 5%: ceil(0.95 * 201) = 191st smallest -> 9 frames above
    assert p.pixel_threshold == pytest.approx(np.sort(maps.max(axis=(1, 2)))[190])
    assert p.frames_with_regions <= 9
    assert 1 <= p.min_defect_area <= max(1, int(stats.MAX_MIN_AREA_SHARE * 32 * 32))


# ---------------------------------------------------------------- shift against the bundle's training statistics


@pytest.mark.parametrize("score_stats", [
    {},  # an old bundle without statistics
    {"n": 16},  # the template bundle: a count only
    {"mean": None, "std": "n/a"},  # junk values are ignored, not trusted
])
def test_shift_check_tolerates_missing_statistics(score_stats: dict) -> None:
    assert stats.score_shift_warning(np.random.default_rng(0).normal(size=100) + 50, score_stats) is None


def test_shift_check_flags_a_moved_median_and_not_a_matching_one() -> None:
    train = {"mean": 1.0, "std": 0.1, "p50": 1.0, "p95": 1.16, "p99": 1.23, "max": 1.4, "n": 500}
    rng = np.random.default_rng(1)
    assert stats.score_shift_warning(rng.normal(1.0, 0.1, 300), train) is None
    warning = stats.score_shift_warning(rng.normal(2.0, 0.1, 300), train)
    assert warning is not None and "training" in warning and "camera setting" in warning


def test_shift_check_works_from_quantiles_alone() -> None:
    assert stats.score_shift_warning(np.full(50, 3.0), {"p50": 1.0, "p95": 1.2}) is not None
    assert stats.score_shift_warning(np.full(50, 3.0), {"p99": 2.0}) is not None  # all above the training p99


def test_score_quantile_keys() -> None:
    q = stats.score_quantiles(np.arange(1001, dtype=float))
    assert set(q) == {"p50", "p90", "p95", "p99", "p99.9", "min", "max", "mean", "std"}
    assert q["p99.9"] == pytest.approx(999.0)
