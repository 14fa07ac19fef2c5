"""Uncertainty of a run's numbers: a confidence interval for each metric from a seeded bootstrap
over images of its per-image scores (``scipy.stats.bootstrap``: BCa up to :data:`BCA_MAX_IMAGES`
images, percentile above, where BCa's jackknife would cost N^2 time and memory: 29 s and 3 GB a
metric at 20,000 images), and the paired comparison of
two runs on the same images (the mean per-image difference, its bootstrap interval, and a paired
sign-flip permutation test, ``scipy.stats.permutation_test``).

What an interval covers: the variation from which images were scored, with the fitted model, the
2-D map and the cross-validation folds held as they are. It does not cover the reducer's seed,
the choice of folds, or training another model.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from latentmap.errors import ConfigError, require_int

log = logging.getLogger(__name__)

# BCa needs a jackknife over the images (an N x N-1 array); above this many images the percentile
# interval is used, which at these sizes differs from BCa by far less than the interval's width.
BCA_MAX_IMAGES = 2000
# Resamples evaluated at once: bounds the bootstrap's memory to BATCH x N floats.
BATCH = 100


@dataclass(frozen=True)
class Interval:
    """A metric's value (the mean of its per-image scores) and its confidence interval."""

    value: float
    lo: float
    hi: float
    n: int  # images scored
    method: str = "BCa"  # "BCa", "percentile", "degenerate" (all scores equal) or "off"


def check(resamples, confidence) -> None:
    """``metrics.bootstrap`` (resamples; 0 turns intervals off) and ``metrics.confidence``."""
    require_int("metrics.bootstrap", resamples, 0, "metrics.bootstrap=1000, or 0: no intervals")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"metrics.confidence={confidence!r} must be a fraction in (0, 1), e.g. 0.95")


def interval(scores: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """The mean of ``scores`` (N,) with its bootstrap BCa interval over images (NaN bounds when
    ``resamples`` is 0). Scores that are all equal give the degenerate interval [value, value]."""
    from scipy.stats import bootstrap

    scores = np.asarray(scores, dtype=np.float64)
    value = float(scores.mean())
    if resamples == 0:
        return Interval(value, float("nan"), float("nan"), len(scores), "off")
    if np.ptp(scores) == 0:  # every resample has the same mean: no spread to estimate
        return Interval(value, value, value, len(scores), "degenerate")
    method = "BCa" if len(scores) <= BCA_MAX_IMAGES else "percentile"
    with warnings.catch_warnings():  # BCa's own note on near-degenerate data is not a user's concern
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap((scores,), np.mean, n_resamples=resamples, confidence_level=confidence,
                           method=method, vectorized=True, batch=BATCH, rng=np.random.default_rng(seed))
    return Interval(value, float(result.confidence_interval.low), float(result.confidence_interval.high),
                    len(scores), method)


def intervals(per_image: dict[str, np.ndarray], resamples: int, confidence: float,
              seed: int) -> dict[str, Interval]:
    """:func:`interval` of every metric's per-image scores, each with its own seeded resampling."""
    return {name: interval(scores, resamples, confidence, seed + i)
            for i, (name, scores) in enumerate(per_image.items())}


@dataclass(frozen=True)
class Difference:
    """A metric of run A against run B on the same images: their means, the mean of the per-image
    differences A - B with its confidence interval, and the two-sided p-value of "no difference"."""

    a: float
    b: float
    difference: float
    lo: float
    hi: float
    p_value: float
    n: int


def paired(a: np.ndarray, b: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
           seed: int = 0) -> Difference:
    """A against B, image by image: (N,) per-image scores of the same images in the same order.

    The interval resamples images, each keeping its pair (a paired bootstrap of the mean
    difference, BCa); the p-value flips the sign of each image's difference at random
    (``permutation_test`` with ``permutation_type="samples"``), the paired test of equal means.
    """
    from scipy.stats import permutation_test

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same images: {a.shape} vs {b.shape}")
    ci = interval(a - b, resamples, confidence, seed)
    if np.all(a == b):
        p_value = 1.0
    else:
        test = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                permutation_type="samples", n_resamples=max(resamples, 1), alternative="two-sided",
                                batch=BATCH, rng=np.random.default_rng(seed))
        p_value = float(test.pvalue)
    return Difference(float(a.mean()), float(b.mean()), ci.value, ci.lo, ci.hi, p_value, len(a))


# --- Label-free geometry of an embedding, with intervals -------------------------------------------
#
# * TwoNN intrinsic dimension (Facco et al. 2017), in its maximum-likelihood form (Denti et al.
#   2022): with mu_i the ratio of image i's second to first nearest-neighbour distance, the
#   dimension is 1 / mean(log mu_i). The per-image terms make its interval a plain bootstrap over
#   images (of 1 / mean). scikit-dimension's skdim.id.TwoNN (a least-squares fit of the same
#   distribution) is the reference the tests hold it against.
# * RankMe (Garrido et al. 2023), the effective rank of Roy & Vetterli (2007): exp of the entropy
#   of the singular values normalised to sum 1. It is reported without an interval: resampling
#   images changes the spectrum's shape itself (a resample's RankMe sits below the full sample's,
#   every time), so a bootstrap interval would not cover the value. Its depth curve is read
#   against the other blocks' values, not against an interval.

GEOMETRY_METRICS = ("twonn_id", "rankme")


def twonn_log_ratios(points: np.ndarray) -> np.ndarray:
    """(N',) log(r2 / r1) of each point with two distinct nearest neighbours (euclidean); points
    with a duplicate (r1 = 0) are left out, as TwoNN requires."""
    from sklearn.neighbors import NearestNeighbors

    points = np.asarray(points, dtype=np.float64)
    distances, _ = NearestNeighbors(n_neighbors=3).fit(points).kneighbors(points)
    r1, r2 = distances[:, 1], distances[:, 2]
    keep = r1 > 0
    return np.log(r2[keep] / r1[keep])


def twonn_id(points: np.ndarray) -> float:
    return float(1.0 / twonn_log_ratios(points).mean())


def effective_rank(points: np.ndarray) -> float:
    """RankMe: exp(-sum p log p), p the singular values of ``points`` divided by their sum."""
    singular = np.linalg.svd(np.asarray(points, dtype=np.float64), compute_uv=False)
    return _entropy_rank(singular)


def _entropy_rank(singular: np.ndarray) -> float:
    p = singular[singular > 0] / singular.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def geometry(points: np.ndarray, resamples: int, confidence: float, seed: int) -> dict[str, Interval]:
    """TwoNN dimension (with its bootstrap interval over images; NaN bounds when ``resamples`` is 0)
    and RankMe (no interval, see above) of (N, D) ``points``, the embedding as its geometry sees it."""
    from scipy.stats import bootstrap

    points = np.asarray(points, dtype=np.float64)
    if len(points) < 3:  # TwoNN needs two neighbours a point
        nan = float("nan")
        return {"twonn_id": Interval(nan, nan, nan, len(points), "off"),
                "rankme": Interval(effective_rank(points), nan, nan, len(points), "off")}
    ratios = twonn_log_ratios(points)
    value = float(1.0 / ratios.mean())
    if resamples and len(ratios) > 1 and np.ptp(ratios) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = bootstrap((ratios,), lambda s, axis=-1: 1.0 / s.mean(axis=axis), n_resamples=resamples,
                               confidence_level=confidence, vectorized=True, batch=BATCH,
                               method="BCa" if len(ratios) <= BCA_MAX_IMAGES else "percentile",
                               rng=np.random.default_rng(seed))
        twonn = Interval(value, float(result.confidence_interval.low), float(result.confidence_interval.high),
                         len(ratios), "BCa" if len(ratios) <= BCA_MAX_IMAGES else "percentile")
    else:
        twonn = Interval(value, float("nan"), float("nan"), len(ratios), "off")

    # RankMe: the value only. A bootstrap resample (or a subsample) changes the spectrum's shape
    # itself: at 1,000 images x 96 dimensions every one of 50 resamples fell below the full-sample
    # value (36.2 against [35.5, 35.9]), so no resampling interval would cover it.
    rankme = Interval(effective_rank(points), float("nan"), float("nan"), len(points), "off")
    return {"twonn_id": twonn, "rankme": rankme}
