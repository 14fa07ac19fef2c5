"""Uncertainty of a run's numbers: a confidence interval for each metric from a seeded bootstrap
over images of its per-image scores (``scipy.stats.bootstrap``, BCa).

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


@dataclass(frozen=True)
class Interval:
    """A metric's value (the mean of its per-image scores) and its confidence interval."""

    value: float
    lo: float
    hi: float
    n: int  # images scored


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
        return Interval(value, float("nan"), float("nan"), len(scores))
    if np.ptp(scores) == 0:  # every resample has the same mean: no spread to estimate
        return Interval(value, value, value, len(scores))
    with warnings.catch_warnings():  # BCa's own note on near-degenerate data is not a user's concern
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap((scores,), np.mean, n_resamples=resamples, confidence_level=confidence,
                           method="BCa", vectorized=True, rng=np.random.default_rng(seed))
    return Interval(value, float(result.confidence_interval.low), float(result.confidence_interval.high),
                    len(scores))


def intervals(per_image: dict[str, np.ndarray], resamples: int, confidence: float,
              seed: int) -> dict[str, Interval]:
    """:func:`interval` of every metric's per-image scores, each with its own seeded resampling."""
    return {name: interval(scores, resamples, confidence, seed + i)
            for i, (name, scores) in enumerate(per_image.items())}
