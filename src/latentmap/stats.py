"""Uncertainty of a run's numbers, and of differences between runs.

* A run's metrics: each metric recomputed on B seeded, class-stratified half-samples
  (:mod:`latentmap.resampling`); :func:`from_halves` turns their spread into an interval. Proportions
  (the accuracies) get an exact binomial (Clopper-Pearson) interval at the effective sample size
  the half-samples measure (never more images than were scored, so never narrower than the
  binomial interval of independent images, and never zero-width: 50 of 50 right is [0.929, 1]);
  the others a t interval with B - 1 degrees of freedom.
* Two runs on the same images (:func:`paired_halves`): the difference of each metric, recomputed
  on the same half-samples in both runs, gives the paired difference's spread; its interval and
  p-value are Student's t with B - 1 degrees of freedom.
* Several p-values in one table: :func:`adjust` (Holm for a family of tests, Benjamini-Hochberg
  for a screen of many), said beside the table.
* Per-image scores that are independent (the neighbour search's recall on its sampled queries):
  :func:`interval`, exact binomial for 0/1 scores, else a seeded BCa bootstrap
  (``scipy.stats.bootstrap``; percentile above :data:`BCA_MAX_IMAGES`).

What an interval covers: which images were scored (drawn from the same distribution), with the
model and, for the map's metrics, the fitted 2-D map held as they are; the folds are redrawn in
every half-sample, so their choice is covered. The calibration bench (``python scripts/bench.py
--only calibration``) measures coverage and false rejection on data whose truth is known.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# BCa needs a jackknife over the images (an N x N-1 array); above this many images the percentile
# interval is used, which at these sizes differs from BCa by far less than the interval's width.
BCA_MAX_IMAGES = 2000
# Resamples evaluated at once: bounds the bootstrap's memory to BATCH x N floats.
BATCH = 100


@dataclass(frozen=True)
class Interval:
    """A metric's value and its confidence interval (NaN bounds where there is none: ``method``
    says why)."""

    value: float
    lo: float
    hi: float
    n: int  # images scored
    method: str = "BCa"

    def __str__(self) -> str:
        """``0.151 [0.036, 0.339]``, or ``0.000 (no interval: <why>)`` where it has none."""
        return shown(self.value, self.lo, self.hi, self.method)


def number(value: float, signed: bool = False) -> str:
    """A metric's value as the pages print it: three decimals, ``+`` before a positive difference
    (``signed``), and no ``-0.000`` (a value that rounds to zero is ``0.000``); ``-`` for NaN."""
    if value is None or not np.isfinite(value):
        return "-"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return "0.000" if float(text) == 0 else text


def interval_text(value: float, low: float, high: float, signed: bool = False) -> str:
    """``value [low, high]``, or the value alone without a finite interval."""
    bounds = (low, high)
    shown = all(v is not None and np.isfinite(v) for v in bounds)
    return number(value, signed) + (f" [{number(low, signed)}, {number(high, signed)}]" if shown else "")


def p_text(value: float) -> str:
    """A p-value as every page prints it: three significant digits, ``<1e-4`` below 1e-4 (the
    resolution of the tests behind them is coarser), ``-`` for a test not made."""
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.3g}" if value >= 1e-4 else "<1e-4"


def shown(value: float, lo: float | None, hi: float | None, why: str = "") -> str:
    """A value with its interval as a log line says it (:func:`interval_text`), or ``(no interval: why)``
    where it has none: no ``[nan, nan]``."""
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        return interval_text(value, lo, hi)
    reason = why.split(":", 1)[1].strip() if why.startswith("none:") else ""
    return f"{number(value)} (no interval{': ' + reason if reason else ''})"


def clopper_pearson(successes: float, n: float, confidence: float) -> tuple[float, float]:
    """The exact binomial interval of ``successes`` of ``n`` (both may be fractional: an effective
    count), from the beta distribution's quantiles."""
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    lo = 0.0 if successes <= 0 else float(beta.ppf(tail, successes, n - successes + 1))
    hi = 1.0 if successes >= n else float(beta.ppf(1 - tail, successes + 1, n - successes))
    return lo, hi


def from_halves(value: float, resampled: np.ndarray, scale: float, n: int, confidence: float,
                proportion: bool = False, bounds: tuple[float, float] | None = None,
                held: str = "") -> Interval:
    """The interval of a metric whose value on all ``n`` images is ``value`` and on B half-samples
    ``resampled`` (B,) (NaN: none). Its standard error is their standard deviation x ``scale``
    (sqrt(m / (N - m))). A proportion gets the exact binomial interval at the effective sample size
    p (1 - p) / SE^2 (at most ``n``; SE inflated by t/z for the B - 1 degrees of freedom of its
    estimate); other metrics value +- t x SE, clipped to ``bounds``. ``held`` names what the
    interval holds fixed, for the method column."""
    from scipy.stats import norm, t

    kept = np.asarray(resampled, dtype=np.float64)
    kept = kept[np.isfinite(kept)]
    suffix = f"; {held} held fixed" if held else ""
    if not np.isfinite(value):
        return Interval(value, float("nan"), float("nan"), n, "none: no value")
    if len(kept) < 2:
        return Interval(value, float("nan"), float("nan"), n, "none: fewer than 2 half-samples gave a value")
    tail = (1 - confidence) / 2
    quantile = float(t.ppf(1 - tail, len(kept) - 1))
    se = float(np.std(kept, ddof=1)) * scale
    if proportion:
        p = min(max(value, 0.5 / n), 1 - 0.5 / n)  # a rate of 0 or 1 still has binomial spread
        inflated = se * quantile / float(norm.ppf(1 - tail))
        effective = n if inflated == 0 else min(float(n), p * (1 - p) / inflated ** 2)
        lo, hi = clopper_pearson(value * effective, effective, confidence)
        return Interval(value, lo, hi, n, f"half-samples (B={len(kept)}), exact binomial at n_eff={effective:.0f}"
                                          f"{suffix}")
    if se <= 1e-12 * max(1.0, abs(value)):  # equal half-samples, up to float rounding: no width to give
        return Interval(value, float("nan"), float("nan"), n, "none: no spread across half-samples")
    lo, hi = value - quantile * se, value + quantile * se
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Interval(value, lo, hi, n, f"half-samples (B={len(kept)}), t{suffix}")


def interval(scores: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """The mean of independent per-image ``scores`` (N,) with its interval: exact binomial
    (Clopper-Pearson) for 0/1 scores or scores all equal within [0, 1]; else a seeded BCa
    bootstrap (percentile above :data:`BCA_MAX_IMAGES`). NaN bounds when ``resamples`` is 0."""
    from scipy.stats import bootstrap

    scores = np.asarray(scores, dtype=np.float64)
    value, n = float(scores.mean()), len(scores)
    if resamples == 0:
        return Interval(value, float("nan"), float("nan"), n, "off")
    binary = bool(np.all((scores == 0) | (scores == 1)))
    if binary or (np.ptp(scores) == 0 and 0 <= value <= 1):
        return Interval(value, *clopper_pearson(value * n, n, confidence), n, "exact binomial")
    if np.ptp(scores) == 0:
        return Interval(value, float("nan"), float("nan"), n, "none: every score equal")
    method = "BCa" if n <= BCA_MAX_IMAGES else "percentile"
    with warnings.catch_warnings():  # BCa's own note on near-degenerate data is not a user's concern
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap((scores,), np.mean, n_resamples=resamples, confidence_level=confidence,
                           method=method, vectorized=True, batch=BATCH, rng=np.random.default_rng(seed))
    return Interval(value, float(result.confidence_interval.low), float(result.confidence_interval.high), n, method)


def intervals(per_image: dict[str, np.ndarray], resamples: int, confidence: float,
              seed: int) -> dict[str, Interval]:
    """:func:`interval` of each independent score set, each with its own seeded resampling."""
    return {name: interval(scores, resamples, confidence, seed + i)
            for i, (name, scores) in enumerate(per_image.items())}


@dataclass(frozen=True)
class Difference:
    """A metric of run A against run B on the same images: their values, the difference A - B
    with its confidence interval, and the two-sided p-value of "no difference"."""

    a: float
    b: float
    difference: float
    lo: float
    hi: float
    p_value: float
    n: int

    @property
    def same_input(self) -> bool:
        """Equal in both runs on every half-sample (both runs share the metric's input: one
        embedding under two maps): no test to make."""
        return self.difference == 0 and self.lo == 0 and self.hi == 0


def paired_halves(a: float, b: float, resampled_a: np.ndarray, resampled_b: np.ndarray, scale: float, n: int,
                  confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> Difference:
    """A against B on the same images and the same half-samples: the difference of the values, its
    standard error from the half-samples' differences (their standard deviation x ``scale``), and
    Student's t with B - 1 degrees of freedom for the interval and the two-sided p-value. Runs that
    agree on every half-sample get [0, 0] and p = 1. With the metric's ``bounds`` (lo, hi), the
    interval stops where a difference can: at -(hi - lo) and hi - lo."""
    from scipy.stats import t

    differences = np.asarray(resampled_a, dtype=np.float64) - np.asarray(resampled_b, dtype=np.float64)
    differences = differences[np.isfinite(differences)]
    difference = float(a - b)
    if len(differences) < 2 or not np.isfinite(difference):
        return Difference(a, b, difference, float("nan"), float("nan"), float("nan"), n)
    se = float(np.std(differences, ddof=1)) * scale
    rounding = 1e-12 * max(1.0, abs(a), abs(b))  # what float sums in another order differ by
    if se <= rounding:  # equal differences on every half-sample (up to rounding): no test to make
        same = abs(difference) <= rounding
        return Difference(a, b, difference, *((0.0, 0.0, 1.0) if same else (float("nan"),) * 3), n)
    df = len(differences) - 1
    quantile = float(t.ppf(1 - (1 - confidence) / 2, df))
    p_value = float(2 * t.sf(abs(difference) / se, df))
    low, high = difference - quantile * se, difference + quantile * se
    if bounds is not None:
        widest = bounds[1] - bounds[0]
        low, high = max(low, -widest), min(high, widest)
    return Difference(a, b, difference, low, high, p_value, n)


def adjust(p_values, method: str = "holm") -> np.ndarray:
    """Adjusted p-values of one family of tests (NaN entries left out and kept NaN): ``holm``
    (Holm-Bonferroni, the family-wise error rate) or ``bh`` (Benjamini-Hochberg, the false discovery
    rate, ``scipy.stats.false_discovery_control``)."""
    from scipy.stats import false_discovery_control

    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p_values.shape, np.nan)
    finite = np.isfinite(p_values)
    if not finite.any():
        return adjusted
    p = p_values[finite]
    if method == "bh":
        adjusted[finite] = false_discovery_control(p, method="bh")
    elif method == "holm":
        order = np.argsort(p, kind="stable")
        steps = (len(p) - np.arange(len(p))) * p[order]
        holm = np.empty(len(p))
        holm[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
        adjusted[finite] = holm
    else:
        raise ValueError(f"adjust: method={method!r} is not holm or bh")
    return adjusted


ADJUSTMENTS = {"holm": "Holm (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}


# --- Label-free geometry of an embedding -----------------------------------------------------------
#
# * TwoNN intrinsic dimension (Facco et al. 2017), in its maximum-likelihood form (Denti et al.
#   2022): with mu_i the ratio of image i's second to first nearest-neighbour distance, the
#   dimension is 1 / mean(log mu_i). A run computes it in latentmap.resampling's pass, its interval
#   from half-samples (which cover the choice of images, not the estimator's own bias: TwoNN
#   underestimates high dimensions). scikit-dimension's skdim.id.TwoNN (a least-squares fit of the
#   same distribution) is the reference the tests hold it against.
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
