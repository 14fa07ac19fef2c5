"""Confidence intervals: what we add around scipy.stats.bootstrap, checked by coverage."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import stats


def test_95_percent_intervals_cover_a_known_rate_about_95_percent_of_the_time():
    """400 seeded trials of 200 independent 0/1 scores at rate 0.7: the exact binomial interval."""
    rng = np.random.default_rng(2026)
    covered = 0
    for trial in range(400):
        correct = (rng.random(200) < 0.7).astype(np.float64)
        ci = stats.interval(correct, resamples=1000, confidence=0.95, seed=trial)
        assert ci.lo <= ci.value <= ci.hi and ci.n == 200 and ci.value == correct.mean()
        covered += ci.lo <= 0.7 <= ci.hi
    assert 0.93 <= covered / 400 <= 0.99, covered / 400


def test_a_rate_near_one_keeps_its_coverage_where_the_bootstrap_lost_it():
    """Bernoulli scores at 0.995, N = 300: the bootstrap of the scores covered 0.78 of the time
    (often every score is 1: a zero-width interval); the exact binomial covers at least 0.95."""
    rng = np.random.default_rng(5)
    covered = np.mean([(lambda ci: ci.lo <= 0.995 <= ci.hi)(stats.interval((rng.random(300) < 0.995).astype(float)))
                       for _ in range(400)])
    assert covered >= 0.95, covered


def test_wider_with_fewer_images_and_higher_confidence_and_seeded():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.5, 0.2, 400)
    few, many = stats.interval(scores[:50], seed=1), stats.interval(scores, seed=1)
    assert few.hi - few.lo > many.hi - many.lo
    assert stats.interval(scores, confidence=0.99, seed=1).hi - stats.interval(scores, confidence=0.99, seed=1).lo > (
        many.hi - many.lo)
    assert stats.interval(scores, seed=1) == many  # the same seed, the same interval


def test_no_zero_width_interval_for_a_proportion_and_switched_off():
    from scipy.stats import binomtest

    every = stats.interval(np.ones(50))  # 50 of 50 right: Clopper-Pearson's [0.929, 1], not [1, 1]
    reference = binomtest(50, 50).proportion_ci(0.95, method="exact")
    assert every.lo == pytest.approx(reference.low, abs=1e-9) and every.hi == 1.0 and every.method == "exact binomial"
    assert every.lo == pytest.approx(0.9289, abs=1e-4)
    constant = stats.interval(np.full(20, 3.0))  # not a proportion: no interval, and the reason
    assert np.isnan(constant.lo) and constant.method.startswith("none")
    off = stats.interval(np.arange(10.0), resamples=0)
    assert off.value == 4.5 and np.isnan(off.lo) and np.isnan(off.hi) and off.method == "off"


def test_large_samples_switch_to_the_percentile_interval_which_agrees_with_bca_there():
    """BCa's jackknife is quadratic in N; above BCA_MAX_IMAGES the percentile interval is used. At
    that size both methods agree to a small part of the interval's width."""
    from scipy.stats import bootstrap

    scores = np.random.default_rng(7).beta(8, 2, stats.BCA_MAX_IMAGES + 1)  # skewed, like neighbour recall
    ours = stats.interval(scores, 1000, 0.95, seed=3)
    bca = bootstrap((scores,), np.mean, n_resamples=1000, method="BCa", rng=np.random.default_rng(3))
    assert ours.method == "percentile" and stats.interval(scores[:-1], seed=3).method == "BCa"
    width = ours.hi - ours.lo
    assert abs(ours.lo - bca.confidence_interval.low) < 0.1 * width
    assert abs(ours.hi - bca.confidence_interval.high) < 0.1 * width


def test_clopper_pearson_matches_scipy_and_the_half_sample_interval_of_a_proportion_is_binomial():
    from scipy.stats import binomtest

    for successes, n in ((0, 20), (7, 20), (20, 20), (412, 500)):
        reference = binomtest(successes, n).proportion_ci(0.95, method="exact")
        assert stats.clopper_pearson(successes, n, 0.95) == pytest.approx((reference.low, reference.high), abs=1e-9)
    # Half-samples with no spread: the binomial interval at all n images, never zero width.
    ci = stats.from_halves(1.0, np.ones(30), 1.0, 50, 0.95, proportion=True)
    assert ci.lo == pytest.approx(binomtest(50, 50).proportion_ci(0.95, "exact").low) and ci.hi == 1
    # Spread: the effective size is p (1 - p) / SE^2 (SE inflated by t / z), at most n.
    rng = np.random.default_rng(0)
    resampled = 0.8 + rng.normal(0, 0.02, 30)
    ci = stats.from_halves(0.8, resampled, 1.0, 1000, 0.95, proportion=True)
    from scipy.stats import norm, t

    se = np.std(resampled, ddof=1) * t.ppf(0.975, 29) / norm.ppf(0.975)
    effective = 0.8 * 0.2 / se ** 2
    assert f"n_eff={effective:.0f}" in ci.method
    assert (ci.lo, ci.hi) == pytest.approx(stats.clopper_pearson(0.8 * effective, effective, 0.95))


def test_a_t_interval_from_half_samples_and_none_without_spread():
    from scipy.stats import t

    resampled = np.array([0.40, 0.42, 0.38, 0.41, 0.39, 0.40])
    ci = stats.from_halves(0.5, resampled, 1.0, 100, 0.95)
    half = t.ppf(0.975, 5) * np.std(resampled, ddof=1)
    assert (ci.lo, ci.hi) == pytest.approx((0.5 - half, 0.5 + half)) and "t" in ci.method
    assert stats.from_halves(0.99, resampled + 0.58, 1.0, 100, 0.95, bounds=(0, 1)).hi == 1.0  # clipped
    flat = stats.from_halves(0.5, np.full(6, 0.5), 1.0, 100, 0.95)
    assert np.isnan(flat.lo) and flat.method.startswith("none")
    assert stats.from_halves(0.5, np.array([0.5, np.nan]), 1.0, 100, 0.95).method.startswith("none")


def test_paired_halves_is_students_t_on_the_half_sample_differences():
    from scipy.stats import t as student
    from scipy.stats import ttest_1samp

    same = stats.paired_halves(0.7, 0.7, np.full(10, 0.6), np.full(10, 0.6), 1.0, 300)
    assert (same.difference, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 0.02, 30), rng.normal(0.78, 0.02, 30)
    found = stats.paired_halves(0.8, 0.78, a, b, 1.0, 300)
    # With the half-samples' differences centred on the full-sample difference, this is the one-sample t.
    centred = (a - b) - (a - b).mean() + 0.02
    reference = ttest_1samp(centred, 0.0)
    scale = np.sqrt(len(centred))  # the t test divides the SD by sqrt(B); the half-sample SE does not
    assert found.p_value == pytest.approx(2 * student.sf(reference.statistic / scale, 29))
    assert found.lo < 0.02 < found.hi


def test_holm_and_benjamini_hochberg_adjustments():
    from scipy.stats import false_discovery_control

    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    holm = stats.adjust(p, "holm")
    # Holm by hand: sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, made monotone.
    np.testing.assert_allclose(holm[:4], [0.04, 0.09, 0.09, 0.5])
    assert np.isnan(holm[4])
    np.testing.assert_allclose(stats.adjust(p, "bh")[:4], false_discovery_control(p[:4], method="bh"))
    with pytest.raises(ValueError, match="holm or bh"):
        stats.adjust(p, "bonferroni")


@pytest.mark.parametrize("dimension", [2, 6])
def test_twonn_finds_the_dimension_of_a_subspace_and_of_a_sphere_and_agrees_with_skdim(dimension):
    """Points filling a d-dimensional linear subspace, and points on a d-sphere, both rotated into 40
    dimensions: TwoNN (from the run's one pass, with its half-sample interval) is about d, its
    interval reaches d, and it is close to scikit-dimension's TwoNN."""
    import skdim

    from latentmap import resampling

    rng = np.random.default_rng(dimension)
    rotation = np.linalg.qr(rng.normal(size=(40, 40)))[0]
    flat = rng.normal(size=(1500, dimension)) @ rotation[:dimension]
    ball = rng.normal(size=(1500, dimension + 1))
    sphere = (ball / np.linalg.norm(ball, axis=1, keepdims=True)) @ rotation[: dimension + 1]
    for points in (flat, sphere):
        halves = resampling.halves(None, len(points), 30, 0)
        evaluation = resampling.evaluate(points, None, None, halves, k=10, folds=5, seed=0, distance="euclidean")
        found = resampling.intervals(evaluation, halves, 0.95)["twonn_id"]
        assert found.value == pytest.approx(stats.twonn_id(points), rel=1e-9)
        assert abs(found.value - dimension) < 0.12 * dimension and found.lo < found.value < found.hi
        assert found.lo < dimension * 1.1 and found.hi > dimension * 0.9
        assert found.value == pytest.approx(skdim.id.TwoNN().fit(points).dimension_, rel=0.08)


def test_rankme_is_the_entropy_rank_of_known_singular_values():
    rng = np.random.default_rng(0)
    singular = np.array([5.0, 3.0, 1.0, 0.5])
    u = np.linalg.qr(rng.normal(size=(400, 4)))[0]
    v = np.linalg.qr(rng.normal(size=(30, 4)))[0]
    p = singular / singular.sum()
    assert stats.effective_rank(u * singular @ v.T) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)



def test_a_value_without_an_interval_is_said_so_not_printed_as_nan():
    """The run's log lines (clusters, the closing line) print ``0.000 (no interval: ...)`` where
    there is none, not ``[nan, nan]``."""
    from latentmap import stats

    assert str(stats.Interval(0.151, 0.036, 0.339, 10, "t")) == "0.151 [0.036, 0.339]"
    assert str(stats.Interval(0.0, np.nan, np.nan, 10, "none: no spread across half-samples")) == (
        "0.000 (no interval: no spread across half-samples)")
    assert stats.shown(0.5, None, None) == "0.500 (no interval)"


def test_a_paired_difference_s_interval_stops_where_a_difference_can():
    """A silhouette (in [-1, 1]) differs by at most 2: at a confidence close to 1 the t interval
    reached -2.17; with the metric's bounds it stops at -2 and 2, and the p-value is unchanged."""
    from latentmap import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.1, 0.3, 10), rng.normal(0.3, 0.3, 10)
    free = stats.paired_halves(0.1, 0.3, a, b, 1.0, 500, confidence=0.999999)
    bounded = stats.paired_halves(0.1, 0.3, a, b, 1.0, 500, confidence=0.999999, bounds=(-1.0, 1.0))
    assert free.lo < -2 and bounded.lo == -2.0 and bounded.hi == min(free.hi, 2.0)
    assert bounded.p_value == free.p_value and bounded.difference == free.difference
    usual, plain = (stats.paired_halves(0.1, 0.3, a, b, 1.0, 500, bounds=bounds) for bounds in ((-1.0, 1.0), None))
    assert (usual.lo, usual.hi) == (plain.lo, plain.hi)  # an interval inside the bounds is untouched


def test_half_samples_equal_up_to_float_rounding_give_no_interval_not_a_zero_width_one():
    """ari_hdbscan printed 0.326 [0.326, 0.326] beside nmi_hdbscan's "no interval: no spread": its
    half-sample values were equal but for float rounding (a standard deviation of about 1e-17)."""
    value = 0.1 + 0.2  # 0.30000000000000004
    rounded = np.array([0.3, value, 0.3, value])  # equal, as sums in another order give them
    assert 0 < np.std(rounded, ddof=1) < 1e-15
    found = stats.from_halves(value, rounded, 1.0, 100, 0.95)
    assert np.isnan(found.lo) and np.isnan(found.hi) and found.method == "none: no spread across half-samples"
    spread = stats.from_halves(0.3, np.array([0.29, 0.31, 0.30, 0.32]), 1.0, 100, 0.95)
    assert spread.lo < 0.3 < spread.hi  # a real spread keeps its interval


def test_two_runs_equal_but_for_float_rounding_are_not_called_different():
    """Two runs whose half-sample values differ only by float rounding (differences of about 1e-17)
    got t of about 5 and a small p-value: a spurious difference in compare.py. They are equal now."""
    a = np.array([0.3, 0.1 + 0.2, 0.3, 0.1 + 0.2, 0.3])
    b = np.full(5, 0.3)
    found = stats.paired_halves(0.1 + 0.2, 0.3, a, b, 1.0, 300)
    assert found.p_value == 1.0 and found.lo == found.hi == 0.0
