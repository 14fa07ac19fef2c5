"""Calibration on data whose truth is known: do a run's 95% intervals cover, and does the paired test
of two equally good runs say "different" only 5% of the time?

R datasets are drawn from one Gaussian mixture (C classes in D dimensions, class means on a sphere
of radius ``separation``, unit noise), each scored as a run scores it (cosine geometry, a PCA map,
k-NN, weighted k-NN, the probe, TwoNN; intervals from :mod:`latentmap.resampling`). The truth of a
metric is the mean of its R estimates (the estimand at this N, as a run's number is an estimate at
its N); coverage is the share of intervals that contain it, with its Monte Carlo standard error
sqrt(c (1 - c) / R). Beside it, the same draws are scored with the interval latentmap used before
(a BCa bootstrap of the per-image scores), so the table shows before and after from one run.

The paired test: each draw's images are seen through views ``image + noise``: two with the same noise
level (a true null: exchangeable runs) and one with less noise (a real difference, for power),
compared as compare.py compares two runs. Before: the sign-flip permutation test of per-image
differences.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

class Mixture(NamedTuple):
    """C classes in D dimensions, class means on a sphere of radius ``separation``, unit noise;
    ``ratio``: each class has ``ratio`` times the images of the one before (1: balanced)."""

    classes: int
    dims: int
    separation: float
    ratio: float = 1.0

    def counts(self, n: int) -> np.ndarray:
        """(C,) images of each class in a draw of n (see :func:`_counts`)."""
        return _counts(self.ratio ** np.arange(self.classes, dtype=np.float64), n)


def _counts(shares: np.ndarray, n: int) -> np.ndarray:
    """(C,) images of each class in a draw of n: n x its share, rounded down, the rest to the largest
    classes (every draw of n has the same counts, as a stratified sample has)."""
    shares = np.asarray(shares, dtype=np.float64) / np.sum(shares)
    counts = np.floor(shares * n).astype(int)
    counts[np.argsort(-shares, kind="stable")[: n - counts.sum()]] += 1
    return counts


MIXTURES = {  # name: the mixture; k-NN accuracy of a view
    "mixture-hard": Mixture(10, 64, 3.4),  # about 0.75
    "mixture-easy": Mixture(10, 64, 5.0),  # about 0.98: near the boundary, where binomial intervals matter
    # A long tail: the largest class 31% of the images, the smallest 1.2% (6 of 500).
    "mixture-imbalanced": Mixture(10, 64, 3.4, ratio=0.7),  # about 0.71
    # Many small classes: 50 of 10 images each at N = 500.
    "mixture-many": Mixture(50, 64, 5.0),  # about 0.71
}
# Or a run's own images as the population: "features:<folder>" names a run's arrays folder (its
# artifacts' arrays/, holding embeddings.npy and labels.npy); each draw takes N of its images without replacement,
# each class in its share of the population.
FEATURES = "features:"


@functools.lru_cache(maxsize=2)
def features(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """A run's images as a population: its embeddings (float64) and labels (0..C-1), the embeddings
    scaled so that a dimension's variance within a class is 1 on average, as in the mixtures (the
    paired test's view noise is then on the same scale). The origin is kept: the cosine geometry a
    run scores depends on it."""
    root = Path(folder)
    points = np.load(root / "embeddings.npy", allow_pickle=False).astype(np.float64)
    labels = np.load(root / "labels.npy", allow_pickle=False)
    if len(points) != len(labels) or (labels < 0).any():
        raise ValueError(f"{root}: a population needs one class label >= 0 for each row of embeddings.npy "
                         f"({len(points)} rows, {len(labels)} labels, {int((labels < 0).sum())} unlabelled)")
    _, labels = np.unique(labels, return_inverse=True)
    within = np.mean([points[labels == c].var(axis=0).mean() for c in range(labels.max() + 1)])
    return points / np.sqrt(within), labels


@dataclass(frozen=True)
class Settings:
    n: int = 500
    halves: int = 30
    k: int = 10
    folds: int = 5
    confidence: float = 0.95
    view_noise: float = 0.6  # the paired test's views: image + noise of this SD
    better_noise: float = 0.3  # view C's noise: a real difference
    fraction: float = 0.5  # of each class in a half-sample
    # The 2-D map: "pca" fits PCA on every draw (what a run does: the map's own variation is then
    # part of the truth's spread) and, with refit_map, again on every half-sample (a PCA run's
    # metrics.refit_map), its map metrics also scored with the draw's map reused on every half beside
    # them (the "held fixed" columns); "fixed": the mixture's population PCA, the same projection for
    # every draw and half (checks the intervals against what they claim to cover); a reducer option of
    # conf/reducer ("umap", "tsne", "opentsne"): that reducer as a run configures it, fitted on every
    # draw (its random_state the draw's seed) and, with refit_map, on every half-sample.
    map: str = "pca"
    refit_map: bool = True
    paired: bool = True  # also the paired test's views (three scorings a draw, five with refit_map)
    # Also what the published table sets beside the run's intervals: the map held fixed (with
    # refit_map) and the per-image bootstrap ("before"). The suite's check scores the run's alone.
    beside: bool = True


def draw(mixture: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) points and (n,) labels of one draw: the mixture's class counts (balanced unless its
    ratio says otherwise), means fixed by the mixture; or N images of a ``features:<folder>``
    population, drawn without replacement, each class in its share."""
    if mixture.startswith(FEATURES):
        population, classes = features(mixture[len(FEATURES):])
        if n > len(population):
            raise ValueError(f"{mixture}: a draw of {n} images from a population of {len(population)}")
        rng = np.random.default_rng(seed)
        counts = _counts(np.bincount(classes), n)
        rows = np.concatenate([rng.choice(np.flatnonzero(classes == c), count, replace=False)
                               for c, count in enumerate(counts)])
        rng.shuffle(rows)
        return population[rows], classes[rows]
    mix = MIXTURES[mixture]
    means = np.random.default_rng(12345).normal(size=(mix.classes, mix.dims))
    means *= mix.separation / np.linalg.norm(means, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % mix.classes if mix.ratio == 1.0 else np.repeat(np.arange(mix.classes), mix.counts(n))
    rng.shuffle(labels)
    return means[labels] + rng.normal(size=(n, mix.dims)), labels


@functools.lru_cache(maxsize=4)
def population_projection(mixture: str, noise: float) -> np.ndarray:
    """(D, 2) the top two principal axes of the mixture's cosine geometry (100,000 points, or a
    features population's every image, plus view noise): a map that does not depend on the draw."""
    from sklearn.decomposition import PCA

    from latentmap import metrics

    if mixture.startswith(FEATURES):
        points = features(mixture[len(FEATURES):])[0]
    else:
        points, _ = draw(mixture, 100_000, seed=999_999)
    points = points + np.random.default_rng(999_999).normal(scale=noise, size=points.shape)
    return PCA(2, random_state=0).fit(metrics.embedding_space(points, "cosine")).components_.T


@functools.lru_cache(maxsize=4)
def reducer_config(name: str):
    """The ``reducer`` node of a run with ``reducer=<name>`` (conf/ composed as run.py composes it)."""
    from hydra import compose, initialize_config_dir

    from latentmap.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"reducer={name}", "reducer_seed=0"]).reducer


def _fit_map(space: np.ndarray, settings: Settings, seed: int) -> np.ndarray:
    """(N, 2) the draw's map of ``space`` as a run with ``reducer=<settings.map>`` fits it (PCA for
    "pca"), seeded with ``seed``."""
    if settings.map == "pca":
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(space)
    from omegaconf import OmegaConf

    from latentmap import reduce

    node = reducer_config(settings.map).copy()
    OmegaConf.update(node, "random_state", seed)
    return reduce.maps(node, space, seed)[0]


def _score(points: np.ndarray, labels: np.ndarray, settings: Settings, seed: int, halves, projection=None,
           refit_map: bool | None = None):
    """One view scored as a run scores it (``refit_map`` None: the settings' map, every metric), or,
    with ``refit_map`` given, its map metrics with the half-samples' maps refitted or not (no probe)."""
    from latentmap import metrics, resampling

    space = metrics.embedding_space(points, "cosine")
    coords = _fit_map(space, settings, seed) if projection is None else space @ projection

    def refit(rows: np.ndarray, fit: int) -> np.ndarray:  # a run's metrics.refit_map
        return _fit_map(space[rows], settings, seed)

    refitting = projection is None and (settings.refit_map if refit_map is None else refit_map)
    evaluation = resampling.evaluate(points, [coords], labels, halves, k=settings.k, folds=settings.folds,
                                     seed=seed, distance="cosine", refit=refit if refitting else None,
                                     probe=refit_map is None)
    return evaluation, resampling.intervals(evaluation, halves, settings.confidence)


def _sign_flip_p(a: np.ndarray, b: np.ndarray, seed: int) -> float:
    """The per-image paired test latentmap used before: a sign-flip permutation test of a - b."""
    from scipy.stats import permutation_test

    if np.all(a == b):
        return 1.0
    return float(permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                  permutation_type="samples", n_resamples=999,
                                  rng=np.random.default_rng(seed)).pvalue)


def replicate(mixture: str, settings: Settings, seed: int) -> dict:
    """One draw seen through three views: A and B with the same noise (B is also the run whose
    intervals are checked; A against B is a true null) and C with less noise (C against B: a real
    difference). Returns each metric's value and interval (after and before) and the paired tests'
    p-values (after and before)."""
    from latentmap import resampling, stats

    points, labels = draw(mixture, settings.n, seed)
    halves = resampling.halves(labels, settings.n, settings.halves, seed, settings.fraction)
    rng = np.random.default_rng([seed, 7])
    projection = population_projection(mixture, settings.view_noise) if settings.map == "fixed" else None
    noises = (("A", settings.view_noise), ("B", settings.view_noise), ("C", settings.better_noise))
    # Only the views scored are drawn (coverage-only draws keep the noise they always had).
    views_points = {name: points + rng.normal(scale=noise, size=points.shape) for name, noise in noises
                    if settings.paired or name == "B"}
    views = {name: _score(view, labels, settings, seed, halves, projection) for name, view in views_points.items()}
    evaluation, found = views["B"]
    row = {"seed": seed}
    # Beside the refitted maps' intervals, the same draws' map metrics with the map held fixed (what a
    # run gave before metrics.refit_map): their coverage and paired null test.
    held = {}
    if settings.map != "fixed" and settings.refit_map and settings.beside:
        held = {name: _score(views_points[name], labels, settings, seed, halves, refit_map=False)
                for name in (("A", "B") if settings.paired else ("B",))}
    for name, ci in found.items():
        row[f"{name}"], row[f"{name}_lo"], row[f"{name}_hi"] = ci.value, ci.lo, ci.hi
        scores = evaluation.per_image.get(name)
        # before: a BCa bootstrap of the per-image scores (only beside the run's intervals)
        if scores is not None and name != "twonn_id" and settings.beside:
            before = stats.interval(scores, 1000, settings.confidence, seed) if np.ptp(scores) > 0 else None
            row[f"{name}_before_lo"] = before.lo if before else scores.mean()
            row[f"{name}_before_hi"] = before.hi if before else scores.mean()
    if held:
        for name, ci in held["B"][1].items():
            if name in resampling.MAP_METRICS:
                row[f"{name}_fixed_lo"], row[f"{name}_fixed_hi"] = ci.lo, ci.hi
                if "A" in held:
                    row[f"null_{name}_p_fixed"] = stats.paired_halves(
                        held["A"][0].values[name], held["B"][0].values[name], held["A"][0].resampled[name],
                        held["B"][0].resampled[name], halves.scale, settings.n, settings.confidence).p_value
    for case, other in ((("null", "A"), ("real", "C")) if settings.paired else ()):
        ev_a = views[other][0]
        for name in ev_a.values:
            if name == "twonn_id":
                continue
            found_pair = stats.paired_halves(ev_a.values[name], evaluation.values[name], ev_a.resampled[name],
                                             evaluation.resampled[name], halves.scale, settings.n, settings.confidence)
            row[f"{case}_{name}_p"] = found_pair.p_value
            row[f"{case}_{name}_p_before"] = _sign_flip_p(ev_a.per_image[name], evaluation.per_image[name], seed)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per metric: coverage after and before (with Monte Carlo errors), mean width over 3.92 x the
    estimates' SD, and the paired test's rejection rate at 0.05 under the null and the real
    difference, after and before."""
    import pandas as pd

    table = pd.DataFrame(rows)
    r = len(table)
    out = []
    metric_names = [c for c in table.columns if f"{c}_lo" in table.columns]
    for name in metric_names:
        values = table[name].to_numpy()
        truth, spread = values.mean(), values.std(ddof=1)
        entry = {"metric": name, "R": r, "truth": truth, "true_sd": spread}
        for label, suffix in (("after", ""), ("before", "_before"), ("fixed", "_fixed")):
            if f"{name}{suffix}_lo" not in table:
                continue
            lo, hi = table[f"{name}{suffix}_lo"].to_numpy(), table[f"{name}{suffix}_hi"].to_numpy()
            covered = float(np.mean((lo <= truth) & (truth <= hi)))
            entry[f"coverage_{label}"] = covered
            entry[f"coverage_{label}_mc"] = float(np.sqrt(covered * (1 - covered) / r))
            entry[f"width_ratio_{label}"] = float(np.nanmean(hi - lo) / (3.92 * spread)) if spread > 0 else np.nan
        for case in ("null", "real"):
            for label, suffix in (("after", ""), ("before", "_before"), ("fixed", "_fixed")):
                column = f"{case}_{name}_p{suffix}"
                if column in table:
                    rate = float(np.mean(table[column].to_numpy() < 0.05))
                    entry[f"{case}_reject_{label}"] = rate
                    entry[f"{case}_reject_{label}_mc"] = float(np.sqrt(rate * (1 - rate) / r))
        out.append(entry)
    return out


def run(mixture: str, replications: int, settings: Settings, seed: int = 0, jobs: int = 1) -> list[dict]:
    """``replications`` draws of ``mixture`` scored in ``jobs`` processes (each on one BLAS thread),
    with a progress bar; returns :func:`summarise`'s table."""
    from joblib import Parallel, delayed
    from tqdm import tqdm

    seeds = [seed * 100_000 + r for r in range(replications)]
    rows = list(tqdm(Parallel(n_jobs=jobs, return_as="generator")(delayed(_one)(mixture, settings, s) for s in seeds),
                     total=replications, desc=f"calibration {mixture} N={settings.n}", unit="draw"))
    return summarise(rows)


def _one(mixture: str, settings: Settings, seed: int) -> dict:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return replicate(mixture, settings, seed)


def per_class_null(per_class: int, replications: int, classes: int = 10, k: int = 10, halves: int = 30,
                   seed: int = 0) -> dict[str, float]:
    """False rejections of the per-class paired test (:func:`latentmap.audit.per_class_differences`, as
    the fine-tuning study tests each class) where there is no difference: each draw is a mixture of
    ``classes`` classes of ``per_class`` images seen through two views with the same noise (two
    equally good models), compared class by class on k-NN accuracy. Returns the share of tests with
    p < 0.05 and p < 0.01 by the rule the study uses (``chosen``), and by the half-sample test
    alone (``halves``), with the number of tests."""
    from latentmap import audit, resampling

    rng = np.random.default_rng(seed)
    found: dict[str, list[float]] = {"chosen": [], "halves": []}
    names = [str(c) for c in range(classes)]
    for draw in range(replications):
        n, dims = per_class * classes, 20
        labels = np.repeat(np.arange(classes), per_class)
        points = rng.normal(size=(classes, dims))[labels] * 0.8 + rng.normal(size=(n, dims))
        views = [points + 0.7 * rng.normal(size=(n, dims)) for _ in range(2)]
        split = resampling.halves(labels, n, halves, seed + draw)
        scored = [resampling.evaluate(view, None, labels, split, k=k, folds=5, seed=seed + draw,
                                      distance="euclidean", weighted_k=20, temperature=0.07, probe=False)
                  for view in views]
        table = audit.per_class_differences(labels, names, scored[1], scored[0], split.scale, 0.95,
                                            scores=("knn_acc_hd",))
        found["chosen"] += table["p_value"].dropna().tolist()
        exact_below, audit.EXACT_BELOW = audit.EXACT_BELOW, 0  # every class by its half-samples
        try:
            table = audit.per_class_differences(labels, names, scored[1], scored[0], split.scale, 0.95,
                                                scores=("knn_acc_hd",))
        finally:
            audit.EXACT_BELOW = exact_below
        found["halves"] += table["p_value"].dropna().tolist()
    rates = {}
    for rule, values in found.items():
        values = np.asarray(values)
        rates.update({f"{rule}_p05": float((values < 0.05).mean()), f"{rule}_p01": float((values < 0.01).mean()),
                      f"{rule}_tests": len(values)})
    return rates
