"""Confidence intervals: what we add around scipy.stats.bootstrap, checked by coverage."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import stats
from latentmap.errors import ConfigError


def test_95_percent_intervals_cover_a_known_rate_about_95_percent_of_the_time():
    """400 seeded trials of 200 per-image correctness scores drawn at rate 0.7."""
    rng = np.random.default_rng(2026)
    covered = 0
    for trial in range(400):
        correct = (rng.random(200) < 0.7).astype(np.float64)
        ci = stats.interval(correct, resamples=1000, confidence=0.95, seed=trial)
        assert ci.lo <= ci.value <= ci.hi and ci.n == 200 and ci.value == correct.mean()
        covered += ci.lo <= 0.7 <= ci.hi
    assert 0.93 <= covered / 400 <= 0.97, covered / 400


def test_wider_with_fewer_images_and_higher_confidence_and_seeded():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.5, 0.2, 400)
    few, many = stats.interval(scores[:50], seed=1), stats.interval(scores, seed=1)
    assert few.hi - few.lo > many.hi - many.lo
    assert stats.interval(scores, confidence=0.99, seed=1).hi - stats.interval(scores, confidence=0.99, seed=1).lo > (
        many.hi - many.lo)
    assert stats.interval(scores, seed=1) == many  # the same seed, the same interval


def test_degenerate_and_switched_off():
    assert stats.interval(np.ones(30)) == stats.Interval(1.0, 1.0, 1.0, 30, "degenerate")  # every image right
    off = stats.interval(np.arange(10.0), resamples=0)
    assert off.value == 4.5 and np.isnan(off.lo) and np.isnan(off.hi) and off.method == "off"


def test_large_samples_switch_to_the_percentile_interval_which_agrees_with_bca_there():
    """BCa's jackknife is quadratic in N; above BCA_MAX_IMAGES the percentile interval is used. At
    that size both methods agree to a small part of the interval's width."""
    from scipy.stats import bootstrap

    scores = np.random.default_rng(7).beta(8, 2, stats.BCA_MAX_IMAGES + 1)  # skewed, like trustworthiness
    ours = stats.interval(scores, 1000, 0.95, seed=3)
    bca = bootstrap((scores,), np.mean, n_resamples=1000, method="BCa", rng=np.random.default_rng(3))
    assert ours.method == "percentile" and stats.interval(scores[:-1], seed=3).method == "BCa"
    width = ours.hi - ours.lo
    assert abs(ours.lo - bca.confidence_interval.low) < 0.1 * width
    assert abs(ours.hi - bca.confidence_interval.high) < 0.1 * width


@pytest.mark.parametrize("resamples,confidence,message", [
    (-1, 0.95, "metrics.bootstrap=-1 must be an integer >= 0"),
    ("many", 0.95, "metrics.bootstrap='many'"),
    (1000, 95, r"metrics.confidence=95 must be a fraction in \(0, 1\)"),
    (1000, True, "metrics.confidence=True"),
])
def test_bad_settings_are_one_line(resamples, confidence, message):
    with pytest.raises(ConfigError, match=message):
        stats.check(resamples, confidence)


def test_paired_difference_of_identical_scores_is_exactly_zero():
    scores = np.random.default_rng(1).random(80)
    same = stats.paired(scores, scores.copy())
    assert (same.difference, same.lo, same.hi, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_difference_finds_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(3)
    base = rng.random(300)
    better = stats.paired(base + 0.05 + rng.normal(0, 0.05, 300), base)
    assert better.lo > 0 and better.p_value < 0.01 and better.difference == pytest.approx(0.05, abs=0.01)
    null = stats.paired(base + rng.normal(0, 0.05, 300), base)
    assert null.lo < 0 < null.hi and null.p_value > 0.05
    # The pairing matters: the same gap between two independent noisy samples is not resolved.
    unpaired = stats.paired(rng.random(300) + 0.05, rng.permutation(base))
    assert unpaired.hi - unpaired.lo > 5 * (better.hi - better.lo)


@pytest.mark.parametrize("dimension", [2, 6])
def test_twonn_finds_the_dimension_of_a_subspace_and_of_a_sphere_and_agrees_with_skdim(dimension):
    """Points filling a d-dimensional linear subspace, and points on a d-sphere, both rotated into 40
    dimensions: TwoNN is about d, within its interval's reach, and close to scikit-dimension's TwoNN."""
    import skdim

    rng = np.random.default_rng(dimension)
    rotation = np.linalg.qr(rng.normal(size=(40, 40)))[0]
    flat = rng.normal(size=(1500, dimension)) @ rotation[:dimension]
    ball = rng.normal(size=(1500, dimension + 1))
    sphere = (ball / np.linalg.norm(ball, axis=1, keepdims=True)) @ rotation[: dimension + 1]
    for points in (flat, sphere):
        found = stats.geometry(points, 300, 0.95, 0)["twonn_id"]
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
    found = stats.geometry(u * singular @ v.T, 200, 0.95, 0)["rankme"]  # no interval, and it says so
    assert np.isnan(found.lo) and np.isnan(found.hi) and found.method == "off"
