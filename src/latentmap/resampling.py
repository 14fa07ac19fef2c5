"""Every metric of a run, on all scored images and on each of B seeded half-samples, from one blocked
distance pass: the half-samples are what the intervals and the paired comparisons are built from.

Why half-samples. A run's metrics are not means of independent per-image scores: the cross-validated
readouts share their training images, silhouette, trustworthiness and continuity are pairwise, and
the neighbours of an image depend on which other images are there. An interval from resampling the
per-image scores therefore comes out too narrow (it covered 79-92% of the time where 95% was asked).
Here each metric is *recomputed* on class-stratified half-samples drawn without replacement: folds,
neighbour sets, ranks and the probe are all redone within the half. For a statistic that is
(asymptotically) a mean, the spread of its value over half-samples of N/2 images around their own
mean equals its sampling spread at N images, up to the factor sqrt(m / (N - m)) (1 at m = N/2);
centring on the half-samples' own mean removes the shift a smaller sample causes (k-NN accuracy
rises with more training images). :mod:`latentmap.stats` turns the spread into intervals and
paired tests; the calibration bench measures their coverage.

The 2-D map. With ``refit`` (a run's ``metrics.refit_map``: by default for PCA, whose fit costs
little) each half-sample's map metrics are those of a map refitted on that half's images, so that
the intervals carry what the fit adds: which plane PCA picks moves the map's silhouette more than
which images are drawn, and a map held fixed covered it 83-86% of the time where 95% was asked
(docs/calibration.md). The refitted maps' neighbours are found in each half's own map (a k-d tree);
their embedding ranks come from the one pass below (the half's map neighbours are known before it).
Without ``refit`` the fitted map is held fixed (the intervals then cover the choice of images for
this map). The linear probe's inverse regularisation C is held fixed (each half-sample refits the
probe at the C the full sample's inner cross-validation chose for that fold).

One pass. Each block of rows gets its distances to every scored image once, in the embedding (float64)
and in each map. From that block come: each image's nearest neighbours in sorted order (long enough to
give its k-NN within any training fold of any half-sample), the rank of each map neighbour in the
embedding and of each embedding neighbour in the map (for trustworthiness and continuity), and the
per-class distance sums of the silhouettes. A half-sample's neighbours are the full sample's
neighbours restricted to its images; where a list runs short the k-NN falls back to an exact search.
A rank beyond the embedding's neighbour list is exact on the full sample and, on a half-sample,
for trustworthiness, the count of its members among the closer images is taken at its expected
value given the list (the members are spread at random over the ranks beyond it): a half-sample's
value then keeps 97-99% of the exact values' spread across halves (measured on the calibration
mixture; tests/test_resampling.py holds the error's mean and spread under 30% of the values'
spread), and no distance pass per half-sample is needed. Continuity's ranks are in the 2-D map,
where exact counting is cheap (a k-d tree), and its map-far embedding neighbours make the
expected count lose 10-30% of its spread, so it is counted exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import KW_ONLY, dataclass, field, replace

import numpy as np

log = logging.getLogger(__name__)

# Metrics whose value is a proportion of images (their intervals are exact binomial at the design's
# effective sample size, see latentmap.stats.from_halves).
PROPORTIONS = ("knn_acc_hd", "knn_acc_2d", "knn_acc_weighted", "probe_acc", "probe_balanced_acc")
MAP_METRICS = ("trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d")
# Row blocks of the pass hold about this many bytes of float64 distances and their sorted copies.
BLOCK_BYTES = 96 << 20


def balanced_undercovers(smallest: int, largest: int) -> bool:
    """Whether the balanced probe accuracy's interval is in the regime where the calibration found it
    too narrow: a class of fewer than 20 scored images beside one at least 4 times its size (the
    long-tailed mixture: 6 to 155 images a class, coverage 0.89-0.93, half-sample SE 0.88 of the true
    spread; docs/calibration.md). Balanced classes of 10 images covered 1.00."""
    return smallest < 20 and largest >= 4 * smallest


@dataclass(frozen=True)
class Halves:
    """B class-stratified half-samples of N scored images: ``members`` (B, N) bool."""

    members: np.ndarray
    seed: int

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def scale(self) -> float:
        """sqrt(m / (N - m)): the spread of m images drawn without replacement, rescaled to N's."""
        n, m = self.members.shape[1], int(self.members[0].sum()) if self.count else 0
        return float(np.sqrt(m / max(n - m, 1)))

    @property
    def digest(self) -> str:
        """A short hash of the memberships: two runs can be paired on their half-samples exactly
        when their digests agree."""
        return hashlib.sha256(np.packbits(self.members).tobytes() + str(self.members.shape).encode()).hexdigest()[:16]


def halves(labels: np.ndarray | None, n: int, count: int, seed: int, fraction: float = 0.5) -> Halves:
    """``count`` seeded half-samples of ``n`` images, each class halved (floor(n_c / 2) of its
    images, at least 1); unlabelled data are halved as a whole."""
    rng = np.random.default_rng([seed, 0x5EED])
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    members = np.zeros((count, n), dtype=bool)
    for b in range(count):
        for rows in groups:
            members[b, rng.choice(rows, max(1, int(len(rows) * fraction)), replace=False)] = True
    return Halves(members, seed)


@dataclass
class Evaluation:
    """The metrics on all scored images (``per_image``: (N,) scores whose mean is the metric;
    ``values``: the metric) and on each half-sample (``resampled``: (B,) values, NaN where a
    half-sample could not give one)."""

    per_image: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    resampled: dict[str, np.ndarray] = field(default_factory=dict)
    fits: dict[str, list[float]] = field(default_factory=dict)  # map metrics: each fit's value
    # For the data audit: the per-image scores on each half-sample's members ((rows, scores) per
    # half, for the per-class intervals), and the probe's out-of-fold predictions and probabilities.
    halved: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    probe_predicted: np.ndarray | None = None
    probe_probabilities: np.ndarray | None = None
    map_refitted: bool = False  # the half-samples' map metrics are on maps refitted on each half

    def merge(self, other: Evaluation) -> None:
        """Take ``other``'s metrics in (the probe's, computed beside these), after this one's own."""
        for mine, theirs in ((self.per_image, other.per_image), (self.values, other.values),
                             (self.resampled, other.resampled), (self.fits, other.fits), (self.halved, other.halved)):
            mine.update(theirs)
        if other.probe_predicted is not None:
            self.probe_predicted, self.probe_probabilities = other.probe_predicted, other.probe_probabilities


def _list_length(k: int, folds: int, n: int) -> int:
    """Sorted neighbours kept per image: enough for k within a training fold of a half-sample
    (about 0.5 x (1 - 1/folds) of the list qualifies) with a wide margin (short lists fall back to
    an exact search)."""
    return int(min(n - 1, max(4 * k, np.ceil(4.0 * k / (1.0 - 1.0 / max(folds, 2))) + 10)))


def _sorted_neighbours(distances: np.ndarray, length: int) -> np.ndarray:
    """(b, length) column indices of each row's ``length`` smallest entries, nearest first."""
    top = np.argpartition(distances, length - 1, axis=1)[:, :length]
    order = np.argsort(np.take_along_axis(distances, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


@dataclass
class _Space:
    """One space's sorted neighbour lists (N, L) with their distances, and, for the other space's
    list, each entry's rank here on the full sample (1 + images strictly closer)."""

    nearest: np.ndarray
    distances: np.ndarray
    _: KW_ONLY  # the rest by name: a field added among them cannot take another's value unnoticed
    ranks_of_other: np.ndarray | None = None
    class_sums: np.ndarray | None = None  # (N, C, B + 1) distance sums to each class, per half-sample
    ranks_of_extra: np.ndarray | None = None  # the pass's ``extra`` columns' ranks here (refitted maps)


def _pairwise(points: np.ndarray, rows: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """(b, N) float64 euclidean distances of ``points[rows]`` to every row of ``points`` (N, D)
    float64, given ``squared_norms`` (N,), every row's squared norm (``np.einsum("ij,ij->i",
    points, points)``). scikit-learn's ``pairwise_distances`` step by step, bit for bit (tested),
    without what it repeats for every block on the whole array: its input checks and the N
    squared norms (a third of a 20,000 x 768 pass)."""
    block = points[rows]
    distances = -2 * (block @ points.T)
    distances += np.einsum("ij,ij->i", block, block)[:, None]
    distances += squared_norms[None, :]
    np.maximum(distances, 0, out=distances)
    return np.sqrt(distances, out=distances)


def _pass(high: np.ndarray, low: np.ndarray | None, length_high: int, length_low: int,
          sum_weights_high: np.ndarray | None, sum_weights_low: np.ndarray | None,
          extra: np.ndarray | None = None) -> tuple[_Space, _Space | None]:
    """The one blocked distance pass over ``high`` (N, D) float64 and, when given, the map ``low``
    (N, 2): sorted neighbour lists of both, cross ranks for trustworthiness and continuity, and the
    silhouettes' class-distance sums (``sum_weights``: (N, W) per-class membership weights).
    ``extra`` (N, T) columns (-1: none) get their ranks in the embedding on the full sample too
    (``ranks_of_extra`` of the first space): the neighbours of each image in the maps refitted on
    half-samples."""
    from latentmap import kernels

    if not np.isfinite(high).all() or (low is not None and not np.isfinite(low).all()):
        raise ValueError("the metrics got NaN or infinite values: the embeddings or the map hold some "
                         "(a model's overflow in fp16? try precision=fp32)")
    n = len(high)
    rows_per_block = max(1, int(BLOCK_BYTES // (n * 8 * (4 if low is not None else 2))))
    high_nearest = np.empty((n, length_high), dtype=np.int64)
    high_dist = np.empty((n, length_high))
    high_sums = None if sum_weights_high is None else np.empty((n, sum_weights_high.shape[1]))
    if low is not None:
        low_nearest = np.empty((n, length_low), dtype=np.int64)
        low_dist = np.empty((n, length_low))
        rank_high_of_low = np.empty((n, length_low), dtype=np.int64)  # trustworthiness
        rank_low_of_high = np.empty((n, length_high), dtype=np.int64)  # continuity
        low_sums = None if sum_weights_low is None else np.empty((n, sum_weights_low.shape[1]))
    extra_ranks = None if extra is None else np.zeros(extra.shape, dtype=np.int64)
    high_norms = np.einsum("ij,ij->i", high, high)
    low_norms = None if low is None else np.einsum("ij,ij->i", low, low)
    for start in range(0, n, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, n))
        local = np.arange(len(rows))
        dh = _pairwise(high, rows, high_norms)  # (b, N)
        if high_sums is not None:
            dh[local, rows] = 0.0
            high_sums[rows] = dh @ sum_weights_high
        dh[local, rows] = np.inf  # an image is not its own neighbour
        nearest = _sorted_neighbours(dh, length_high)
        high_nearest[rows], high_dist[rows] = nearest, np.take_along_axis(dh, nearest, axis=1)
        at_extra = None
        if extra is not None:
            columns = extra[rows]
            at_extra = np.where(columns >= 0, np.take_along_axis(dh, np.maximum(columns, 0), axis=1), -np.inf)
        if low is None:
            if at_extra is not None:
                extra_ranks[rows] = 1 + kernels.count_below(dh, at_extra)
            continue
        dl = _pairwise(low, rows, low_norms)
        if low_sums is not None:
            dl[local, rows] = 0.0
            low_sums[rows] = dl @ sum_weights_low
        dl[local, rows] = np.inf
        found = _sorted_neighbours(dl, length_low)
        low_nearest[rows], low_dist[rows] = found, np.take_along_axis(dl, found, axis=1)
        # Full-sample ranks: 1 + the number of images strictly closer (a tie ranks first, as in
        # metrics.trustworthiness_per_point), counted in each row without sorting it.
        at_high = np.take_along_axis(dh, found, axis=1)  # map neighbours' distances in the embedding
        at_low = np.take_along_axis(dl, nearest, axis=1)  # embedding neighbours' distances in the map
        if at_extra is None:
            rank_high_of_low[rows] = 1 + kernels.count_below(dh, at_high)
        else:  # one count over the row for both
            both = 1 + kernels.count_below(dh, np.hstack([at_high, at_extra]))
            rank_high_of_low[rows], extra_ranks[rows] = both[:, :length_low], both[:, length_low:]
        rank_low_of_high[rows] = 1 + kernels.count_below(dl, at_low)
    high_space = _Space(high_nearest, high_dist, class_sums=high_sums, ranks_of_extra=extra_ranks)
    if low is None:
        return high_space, None
    high_space.ranks_of_other = rank_low_of_high
    return high_space, _Space(low_nearest, low_dist, ranks_of_other=rank_high_of_low, class_sums=low_sums)


# --- per half-sample evaluation from the lists ---------------------------------------------------


def _fold_of(labels: np.ndarray | None, member: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each member image (-1 for the others), the seeded stratified folds of
    :func:`latentmap.metrics.folds_of` on the members."""
    from latentmap.metrics import folds_of

    fold = np.full(len(member), -1, dtype=np.int64)
    rows = np.flatnonzero(member)
    # A half of a 2-image class has 1 image: StratifiedKFold says so, which the caller's context
    # hides (_probe_beside: this runs beside the probe's thread, so it must leave the warnings alone).
    for f, (_, test) in enumerate(folds_of(labels[rows], folds, seed, quiet=True).split(rows, labels[rows])):
        fold[rows[test]] = f
    return fold


def _first_eligible(nearest: np.ndarray, eligible: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask (n, L) of each row's first k eligible entries, rows that have fewer than k)."""
    counts = np.cumsum(eligible, axis=1)
    return eligible & (counts <= k), counts[:, -1] < k


def _exact_neighbours(points: np.ndarray, query: int, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of ``candidates`` to image ``query`` (indices, euclidean distances), exactly."""
    distances = np.linalg.norm(points[candidates] - points[query], axis=1)
    take = np.argsort(distances, kind="stable")[:k]
    return candidates[take], distances[take]


def _knn_predictions(space: _Space, points: np.ndarray, labels: np.ndarray, fold: np.ndarray, k: int,
                     n_classes: int, weight=None) -> np.ndarray:
    """(N,) out-of-fold k-NN predictions of the member images (fold >= 0; -1 elsewhere): the first
    k members of another fold in each sorted list vote (uniformly, or ``weight(distances)`` per
    row); ties go to the smaller class, as scikit-learn's KNeighborsClassifier."""
    rows = np.flatnonzero(fold >= 0)
    nearest, distances = space.nearest[rows], space.distances[rows]
    eligible = (fold[nearest] >= 0) & (fold[nearest] != fold[rows][:, None])
    take, short = _first_eligible(nearest, eligible, k)
    votes = np.zeros((len(rows), n_classes))
    if weight is None:
        np.add.at(votes, (np.nonzero(take)[0], labels[nearest[take]]), 1.0)
    else:
        picked = np.where(take, distances, np.inf)
        np.add.at(votes, (np.nonzero(take)[0], labels[nearest[take]]), weight(picked)[take])
    for r in np.flatnonzero(short):  # the list ran short: search this image's training images exactly
        i = rows[r]
        candidates = np.flatnonzero((fold >= 0) & (fold != fold[i]))
        found, found_distances = _exact_neighbours(points, i, candidates, k)
        votes[r] = 0.0
        weights = np.ones(len(found)) if weight is None else weight(found_distances[None, :])[0]
        np.add.at(votes[r], labels[found], weights)
    predicted = np.full(len(fold), -1, dtype=np.int64)
    predicted[rows] = votes.argmax(axis=1)
    return predicted


def _trust(source: _Space, target: _Space, member: np.ndarray, k: int, n: int) -> tuple[np.ndarray, int]:
    """Per-member-image trustworthiness of ``source``'s neighbourhoods as judged in ``target``:
    each member's first k member neighbours in ``source`` are ranked among the members in
    ``target`` (exact within ``target``'s list, the expected count beyond it). Returns the
    (members,) scores and the number of images whose list held fewer than k members."""
    from latentmap import kernels

    rows = np.flatnonzero(member)
    m = len(rows)
    nearest = source.nearest[rows]  # (m, Ls) candidates in the source space
    take, short = _first_eligible(nearest, member[nearest], k)
    # Where each candidate sits in the target's list (-1: beyond it).
    target_lists = target.nearest[rows]  # (m, Lt)
    position = kernels.positions_in(nearest, target_lists)  # (m, Ls)
    in_target = member[target_lists]  # (m, Lt)
    before = np.cumsum(in_target, axis=1) - in_target  # members closer than each list entry
    listed = in_target.sum(axis=1)  # members in the target list
    length = target_lists.shape[1]
    full_rank = source.ranks_of_other[rows]  # (m, Ls): rank in the target on all N images
    if m == n:  # every image: ranks are the full ranks, exactly
        ranks = full_rank.astype(np.float64)
    else:
        expected = listed[:, None] + (full_rank - 1 - length) * ((m - 1 - listed[:, None]) / max(n - 1 - length, 1))
        exact = np.take_along_axis(before, np.maximum(position, 0), axis=1)
        ranks = 1.0 + np.where(position >= 0, exact, np.maximum(expected, listed[:, None]))
    penalty = np.where(take, np.clip(ranks - k, 0, None), 0.0).sum(axis=1)
    return 1.0 - penalty * (2.0 / (k * (2.0 * m - 3.0 * k - 1.0))), int(short.sum())


def _continuity(source: _Space, coords: np.ndarray, member: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Per-member-image continuity on a half-sample, exactly: each member's first k member
    neighbours in the embedding (from ``source``'s lists) ranked among the members in the 2-D map by
    counting the members strictly closer (:func:`latentmap.kernels.closer_in_plane`). (The expected
    count beyond a list, which serves trustworthiness, would drop a real part of continuity's
    spread: its embedding neighbours mostly lie far apart in a map.) Returns the scores and the
    short lists."""
    from latentmap import kernels

    rows = np.flatnonzero(member)
    m = len(rows)
    nearest = source.nearest[rows]
    take, short = _first_eligible(nearest, member[nearest], k)
    local = np.cumsum(member) - 1  # each member's row among the members
    slots = np.full((m, k), -1, dtype=np.int64)  # each member's taken neighbours, as member rows
    position = np.cumsum(take, axis=1) - 1  # which of the k slots each taken entry fills
    which, column = np.nonzero(take)
    slots[which, position[which, column]] = local[nearest[which, column]]
    ranks = 1 + kernels.closer_in_plane(np.ascontiguousarray(coords[rows], dtype=np.float64), slots)
    penalty = np.where(slots >= 0, np.clip(ranks - k, 0, None), 0).sum(axis=1)
    return 1.0 - penalty * (2.0 / (k * (2.0 * m - 3.0 * k - 1.0))), int(short.sum())


def _silhouette(sums: np.ndarray, labels: np.ndarray, member: np.ndarray, column: slice) -> np.ndarray:
    """(members,) silhouettes from (N, W) class-distance sums; ``column`` picks this half-sample's
    C columns (distances to each class's members)."""
    rows = np.flatnonzero(member)
    counts = np.bincount(labels[rows], minlength=sums[:, column].shape[1]).astype(np.float64)
    class_sums = sums[rows][:, column]  # (m, C)
    # Distances are >= 0: sums within rounding of 0 (identical points; cosine sums are n - u.sum(u))
    # are 0, so that a = b = 0 gives scikit-learn's silhouette of 0.
    class_sums = np.where(class_sums < 1e-12 * np.maximum(counts, 1), 0.0, class_sums)
    own = labels[rows]
    own_count = counts[own]
    a = class_sums[np.arange(len(rows)), own] / np.maximum(own_count - 1, 1)
    means = np.where(counts > 0, class_sums / np.maximum(counts, 1), np.inf)
    means[np.arange(len(rows)), own] = np.inf
    b = means.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (b - a) / np.maximum(a, b)
    return np.where(own_count > 1, np.nan_to_num(s), 0.0)


def _twonn(space: _Space, member: np.ndarray) -> np.ndarray:
    """(members with two distinct neighbours,) log(r2 / r1) among the members (euclidean)."""
    rows = np.flatnonzero(member)
    nearest, distances = space.nearest[rows], space.distances[rows]
    take, short = _first_eligible(nearest, member[nearest], 2)
    picked = np.where(take, distances, np.nan)
    order = np.sort(picked, axis=1)[:, :2]  # the two nearest members (NaN where missing)
    keep = ~short & (order[:, 0] > 0)
    return np.log(order[keep, 1] / order[keep, 0])


def _twonn_value(log_ratios: np.ndarray) -> float:
    """1 / mean(log(r2 / r1)), or NaN where it is undefined (no ratios, or every r2 = r1: a grid)."""
    with np.errstate(over="ignore", divide="ignore"):
        mean = float(np.mean(log_ratios)) if len(log_ratios) else float("nan")
    return 1.0 / mean if np.isfinite(mean) and mean > 0 else float("nan")


# --- maps refitted on half-samples ----------------------------------------------------------------


def _map_neighbours(coords: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(m, count) each point's nearest others in the map ``coords`` (m, 2), nearest first, with their
    distances (a k-d tree; a point is not its own neighbour, duplicates included)."""
    import numba
    from scipy.spatial import cKDTree

    m = len(coords)
    count = min(count, m - 1)
    # As many threads as the compiled kernels take (a process's share of the cores where it has one).
    distances, found = cKDTree(coords).query(coords, count + 1, workers=numba.get_num_threads())
    found, distances = found.reshape(m, -1), distances.reshape(m, -1)
    keep = found != np.arange(m)[:, None]
    keep[keep.all(axis=1), -1] = False  # a duplicate came before the point itself: drop the last
    return found[keep].reshape(m, count), distances[keep].reshape(m, count)


@dataclass
class _Refit:
    """One half-sample's refitted map: its members (global rows), their coordinates, each member's
    nearest others in it (rows among the members, nearest first), and its first k of them (global
    rows), whose embedding ranks the pass adds."""

    rows: np.ndarray
    coords: np.ndarray
    lists: np.ndarray
    first: np.ndarray


def _refit_halves(refit, members: np.ndarray, fit: int, k: int, length: int) -> list[_Refit]:
    """The map refitted on each half-sample (``refit(rows, fit)`` -> (m, 2), or, where ``refit`` has
    it, ``refit.each(list of rows, fit)`` -> those maps in order, which may fit several at once), with
    a progress bar."""
    from latentmap import progress

    log.info("fitting the 2-D map again on each of %d half-samples (metrics.refit_map)", len(members))
    halves = [np.flatnonzero(member) for member in members]
    each = getattr(refit, "each", None)
    maps = each(halves, fit) if each is not None else (refit(rows, fit) for rows in halves)
    with contextlib.closing(maps):  # a fit's error: the others stopped and undone now, not when collected
        fitted = progress.steps(zip(halves, maps), f"refitting the 2-D map on {len(members)} half-samples",
                                total=len(members), unit="half")
        found = [_checked_refit(rows, coords, k, length) for rows, coords in fitted]
    return found


def _checked_refit(rows: np.ndarray, coords: np.ndarray, k: int, length: int) -> _Refit:
    """One half-sample's refitted map (``coords`` of the images ``rows``), checked, with its lists."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape != (len(rows), 2):
        raise ValueError(f"the map refitted on a half-sample of {len(rows)} images has shape {coords.shape}, "
                         f"not ({len(rows)}, 2)")
    if not np.isfinite(coords).all():
        raise ValueError("the map refitted on a half-sample holds NaN or infinite values "
                         "(metrics.refit_map=false holds the run's map fixed instead)")
    lists = (_map_neighbours(coords, max(k, length))[0].astype(np.int32) if len(rows) > 1 else
             np.zeros((len(rows), 0), dtype=np.int32))
    return _Refit(rows, coords, lists, rows[lists[:, :k]])


def _extra_columns(refits: list[_Refit], n: int, k: int) -> np.ndarray:
    """(N, B k) each image's first k neighbours in each half's refitted map (-1: not a member):
    the pass ranks them in the embedding."""
    extra = np.full((n, len(refits) * k), -1, dtype=np.int64)
    for b, half in enumerate(refits):
        extra[half.rows, b * k: b * k + half.first.shape[1]] = half.first
    return extra


def _refitted_metrics(half: _Refit, b: int, space_h: _Space, member: np.ndarray, labels: np.ndarray | None,
                      k: int, n: int, n_classes: int, folds: int, seed: int) -> dict:
    """The map metrics of half-sample ``b`` on its own refitted map, per member image: trustworthiness
    (the half's map neighbours ranked in the embedding as :func:`_trust` ranks them), continuity
    (exact in the refitted map), the map's silhouette (its exact class-distance sums) and the map's
    k-NN accuracy (its own neighbour lists, exact fallback)."""
    from latentmap import kernels

    m = len(half.rows)
    coords = np.zeros((n, 2))
    coords[half.rows] = half.coords
    found: dict[str, np.ndarray] = {}
    if k < m / 2:
        ranks = space_h.ranks_of_extra[:, b * k: (b + 1) * k]
        nearest = np.zeros((n, k), dtype=np.int64)
        nearest[half.rows] = half.first
        found["trustworthiness"] = _trust(_Space(nearest, np.zeros((n, k)), ranks_of_other=ranks), space_h, member, k,
                                          n)[0]
        found["continuity"] = _continuity(space_h, coords, member, k)[0]
    if labels is not None:
        own = np.ascontiguousarray(labels[half.rows], dtype=np.int64)
        sums = np.zeros((n, n_classes))
        sums[half.rows] = kernels.plane_class_sums(np.ascontiguousarray(half.coords), own, n_classes)
        found["silhouette_2d"] = _silhouette(sums, labels, member, slice(0, n_classes))
        nearest = np.zeros((n, half.lists.shape[1]), dtype=np.int64)
        nearest[half.rows] = half.rows[half.lists]
        fold = _fold_of(labels, member, folds, seed)  # uniform votes: the lists' distances are not needed
        predicted = _knn_predictions(_Space(nearest, np.zeros(nearest.shape)), coords, labels, fold, k, n_classes)
        found["knn_acc_2d"] = (predicted[member] == labels[member]).astype(np.float64)
    return found


def _class_weights(labels: np.ndarray, members: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, (B + 1) C) one-hot class membership of each image in each of the full sample and the
    half-samples: the silhouettes' class sums are distances @ this."""
    onehot = np.eye(n_classes)[labels]  # (N, C)
    everyone = np.vstack([np.ones(members.shape[1], dtype=bool), members])  # (B + 1, N)
    return (everyone.T[:, :, None] * onehot[:, None, :]).reshape(len(labels), -1)


def evaluate(embeddings: np.ndarray, maps: list[np.ndarray] | None, labels: np.ndarray | None, halves_: Halves,
             *, k: int, folds: int, seed: int, distance: str, weighted_k: int = 20, temperature: float = 0.07,
             probe: bool = True, probe_halves: int | None = None, refit=None) -> Evaluation:
    """Every metric on the scored images (N, D) and on each half-sample: trustworthiness, continuity,
    the silhouettes, the k-NN accuracies (map metrics averaged over ``maps``, the reducer's fits),
    DINO's weighted k-NN, the linear probe (refitted on the first ``probe_halves`` half-samples)
    and TwoNN's dimension. Label metrics are left out for unlabelled data; with no ``maps`` only
    the embedding's own metrics are computed (the studies). With ``refit(rows, fit)`` -> (m, 2), the
    fit-th map fitted again on the images ``rows``, each half-sample's map metrics are those of its
    own map (module docstring); without it the maps are held fixed."""
    from latentmap.metrics import embedding_space

    n = len(embeddings)
    members = halves_.members
    count = halves_.count
    raw = np.asarray(embeddings, dtype=np.float64)
    high = np.asarray(embedding_space(embeddings, distance), dtype=np.float64)  # (N, D), euclidean order
    n_classes = 0 if labels is None else int(labels.max()) + 1
    length = _list_length(max(k, weighted_k if labels is not None else k, 2), folds, n)
    length_low = _list_length(max(k, 2), folds, n)
    weights = None
    if labels is not None and (count + 1) * n_classes <= 4096:
        weights = _class_weights(labels, members, n_classes)
    out = Evaluation()
    everyone = np.ones(n, dtype=bool)
    samples = [everyone, *members]
    sums_high = None
    cosine = distance == "cosine"
    if labels is not None and cosine and weights is not None:  # cosine sums need no distance pass
        unit = raw / np.where((norms := np.linalg.norm(raw, axis=1, keepdims=True)) > 0, norms, 1)
        class_means = weights.T @ unit  # ((B + 1) C, D) sums of unit rows per class and sample
        sums_high = weights.sum(axis=0)[None, :] - unit @ class_means.T  # (N, (B + 1) C) sums of 1 - cos
    fits = maps or [None]
    accumulated: dict[str, list] = {}
    high_space = None
    # Each fit's (map, embedding lists, map lists, direct silhouettes): every pass before the probe
    # starts (a run with reducer.repeats = R holds R fits' lists at once, about 0.1 GB each at 20,000).
    passes = []
    refitted = [None] * len(fits)
    for fit, coords in enumerate(fits):
        low = None if coords is None else np.asarray(coords, dtype=np.float64)
        if refit is not None and low is not None and count:
            refitted[fit] = _refit_halves(refit, members, fit, k, length_low)
        # The map's class sums: of every sample, or of the full sample only where each half has a map of its own.
        low_weights = (None if labels is None or weights is None or low is None else
                       weights if refitted[fit] is None else weights[:, :n_classes])
        space_h, space_l = _pass(high, low, length, length_low,
                                 None if (labels is None or weights is None or cosine or fit) else weights,
                                 low_weights, None if refitted[fit] is None else _extra_columns(refitted[fit], n, k))
        if high_space is None:
            high_space = space_h
            if sums_high is None and space_h.class_sums is not None:
                sums_high = space_h.class_sums
        # Silhouettes without a class-sum matrix (many classes x half-samples) are matrix products:
        # computed here, on every core, not in the one-BLAS-thread block below.
        direct = (None if labels is None or low is None or space_l.class_sums is not None else
                  [_direct_silhouette(low, labels, member, "euclidean")
                   for member in (samples if refitted[fit] is None else samples[:1])])
        passes.append((low, space_h, space_l, direct))
    direct_hd = (None if labels is None or sums_high is not None else
                 [_direct_silhouette(raw, labels, member, distance) for member in samples])
    refits = count if probe_halves is None else min(probe_halves, count)
    # The probe's fits run beside the lists' metrics below (in a thread: _probe_beside); its values
    # join the others' after them, in the same order as when it ran last.
    with _probe_beside(probe and labels is not None, raw, labels, members, folds, seed, refits) as probed:
        for fit, (low, space_h, space_l, direct) in enumerate(passes):
            if low is None:
                continue
            short = 0
            for b, member in enumerate(samples):
                m = int(member.sum())
                found: dict[str, float | np.ndarray] = {}
                if b and refitted[fit] is not None:  # the half's own map
                    found = _refitted_metrics(refitted[fit][b - 1], b - 1, space_h, member, labels, k, n, n_classes,
                                              folds, seed)
                elif k < m / 2:  # trustworthiness and continuity need k < N / 2 (scikit-learn's rule)
                    found["trustworthiness"], s1 = _trust(space_l, space_h, member, k, n)
                    found["continuity"], s2 = (_trust(space_h, space_l, member, k, n) if m == n
                                               else _continuity(space_h, low, member, k))
                    short += s1 + s2
                if labels is not None and "knn_acc_2d" not in found:
                    column = slice(b * n_classes, (b + 1) * n_classes)
                    if space_l.class_sums is not None:
                        found["silhouette_2d"] = _silhouette(space_l.class_sums, labels, member, column)
                    else:
                        found["silhouette_2d"] = direct[b]
                    fold = _fold_of(labels, member, folds, seed)
                    predicted = _knn_predictions(space_l, low, labels, fold, k, n_classes)
                    found["knn_acc_2d"] = (predicted[member] == labels[member]).astype(np.float64)
                for name, values in found.items():
                    accumulated.setdefault(name, [[] for _ in samples])[b].append(values)
            if short:
                log.debug("trustworthiness/continuity: %d half-sample neighbour lists held fewer than k members", short)
        for name, per_sample in accumulated.items():
            out.per_image[name] = np.mean(per_sample[0], axis=0)  # the mean over the reducer's fits
            out.fits[name] = [float(v.mean()) for v in per_sample[0]]
            out.resampled[name] = np.array([np.mean([v.mean() for v in fits_]) if fits_ else np.nan
                                            for fits_ in per_sample[1:]])

        if labels is not None:
            def weight(d: np.ndarray) -> np.ndarray:
                """DINO's vote exp(similarity / T), scaled by each row's largest term (no underflow; the
                winner is unchanged): similarity = cosine (1 - d^2 / 2 on unit rows) or -d."""
                nearest = d.min(axis=1, keepdims=True)
                gap = (d ** 2 - nearest ** 2) / 2 if cosine else d - nearest
                return np.exp(-gap / temperature)

            hd = {name: [] for name in ("silhouette_hd", "knn_acc_hd", "knn_acc_weighted")}
            for b, member in enumerate(samples):
                column = slice(b * n_classes, (b + 1) * n_classes)
                if sums_high is not None:
                    hd["silhouette_hd"].append(_silhouette(sums_high, labels, member, column))
                else:
                    hd["silhouette_hd"].append(direct_hd[b])
                fold = _fold_of(labels, member, folds, seed)
                correct = labels[member]
                hd["knn_acc_hd"].append(
                    (_knn_predictions(high_space, high, labels, fold, k, n_classes)[member] == correct).astype(float))
                hd["knn_acc_weighted"].append((_knn_predictions(high_space, high, labels, fold, weighted_k, n_classes,
                                                                weight)[member] == correct).astype(float))
            for name, values in hd.items():
                out.per_image[name] = values[0]
                out.resampled[name] = np.array([v.mean() for v in values[1:]])
                out.halved[name] = [(np.flatnonzero(member), v) for member, v in zip(members, values[1:])]
    if probed:
        out.merge(probed[0])
    out.map_refitted = any(half is not None for half in refitted)

    ratios = [_twonn(high_space, member) for member in samples]
    out.per_image["twonn_log_ratio"] = ratios[0]
    out.resampled["twonn_id"] = np.array([_twonn_value(r) for r in ratios[1:]])
    out.values = {name: float(values.mean()) for name, values in out.per_image.items() if name != "twonn_log_ratio"}
    out.values["twonn_id"] = _twonn_value(ratios[0])
    return out


def _direct_silhouette(points: np.ndarray, labels: np.ndarray, member: np.ndarray, metric: str) -> np.ndarray:
    """scikit-learn's silhouettes of the members (many classes x half-samples: no class-sum matrix)."""
    from latentmap.metrics import silhouette_per_point

    rows = np.flatnonzero(member)
    if len(np.unique(labels[rows])) < 2:
        return np.zeros(len(rows))
    return silhouette_per_point(points[rows], labels[rows], metric)


def _quiet_fits() -> None:
    """Hide, in the current warnings context, what the probe's and the folds' fits say that a run
    handles itself: lbfgs stopping at its iteration limit (counted in the log:
    :func:`latentmap.probes.linear_probe_fit`) and scikit-learn's note that a half-sample's class
    is smaller than the folds (a half of a 2-image class)."""
    from sklearn.exceptions import ConvergenceWarning

    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)


@contextlib.contextmanager
def _probe_beside(enabled: bool, raw: np.ndarray, labels: np.ndarray, members: np.ndarray, folds: int, seed: int,
                  refits: int):
    """Run the probe (:func:`_probe`) in a thread while the caller's block runs; yields a list that
    holds the probe's :class:`Evaluation` after the block (empty when not ``enabled``).

    The block (the metrics from the neighbour lists, after every distance pass) and the probe's fits
    are independent, and each is deterministic on its own, so their values are those of one after
    the other (tested). Beside each other they fill the core that the block's single-threaded steps
    leave idle (docs/performance.md has the figures).

    BLAS: the probe fits with one BLAS thread (``probes.one_thread``), and OpenBLAS's thread count is
    the process's, not a thread's. So the block runs with one BLAS thread too, whether the probe runs
    or not: a matrix product's last bits can depend on the threads that computed it, and the block's
    values must not depend on when the probe's fits began or ended. The distance passes, the block's
    heavy products, run before (on every core).

    Warnings: ``catch_warnings`` saves and restores the process's filters, so two threads that use
    it at once can leave them changed (it is not thread-safe before Python 3.14). The probe's
    thread saves and restores them around its fits; the block must leave them alone, so this
    context hides what the block's folds would have hidden themselves (:func:`_quiet_fits`), and
    restores the filters after both.
    """
    from latentmap import probes

    with warnings.catch_warnings(), probes.one_thread():
        _quiet_fits()
        if not enabled:
            yield []
            return
        from concurrent.futures import ThreadPoolExecutor

        def run() -> Evaluation:
            found = Evaluation()
            with probes.one_thread():  # OpenMP's thread count is per thread: this one's too
                _probe(found, raw, labels, members, folds, seed, refits)
            return found

        probed: list[Evaluation] = []
        with ThreadPoolExecutor(1, thread_name_prefix="latentmap-probe") as pool:
            future = pool.submit(run)
            yield probed
            probed.append(future.result())


def _probe(out: Evaluation, raw: np.ndarray, labels: np.ndarray, members: np.ndarray, folds: int, seed: int,
           refits: int) -> None:
    """The linear probe on all images (C by inner cross-validation) and refitted on the first
    ``refits`` half-samples at the C chosen most often."""
    from latentmap import probes

    count = len(members)
    chosen = probes.linear_probe_fit(raw, labels, folds, seed)
    out.probe_predicted, out.probe_probabilities = chosen.predicted, chosen.probabilities
    out.per_image["probe_acc"] = (chosen.predicted == labels).astype(np.float64)
    out.halved["probe_acc"] = []
    out.per_image["probe_balanced_acc"] = out.per_image["probe_acc"] * probes.balanced_weights(labels)
    accuracy, balanced = np.full(count, np.nan), np.full(count, np.nan)

    def refit(b: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(members[b])
        return rows, probes.linear_probe_refit(raw[rows], labels[rows], folds, seed, chosen.inverse_penalty)

    # Each refit is deterministic on its own (one BLAS thread): side by side in threads on large
    # half-samples, the same predictions in about 0.6x the time. The warnings state is saved and
    # restored in this thread (scikit-learn's fits set it in theirs); lbfgs stopping at its limit
    # and a half's class smaller than the folds are not shown.
    with warnings.catch_warnings():
        _quiet_fits()
        refitted = probes.fits_side_by_side(refit, list(range(refits)), len(raw) // 2 * raw.shape[1])
    for b, (rows, predicted) in enumerate(refitted):
        right = (predicted == labels[rows]).astype(np.float64)
        out.halved["probe_acc"].append((rows, right))
        accuracy[b], balanced[b] = right.mean(), (right * probes.balanced_weights(labels[rows])).mean()
    out.resampled["probe_acc"], out.resampled["probe_balanced_acc"] = accuracy, balanced


# Where a metric's value can lie, for clipping its t interval.
_BOUNDS = {"trustworthiness": (0.0, 1.0), "continuity": (0.0, 1.0), "silhouette_hd": (-1.0, 1.0),
           "silhouette_2d": (-1.0, 1.0), "twonn_id": (0.0, np.inf)}


def bounds_of(metric: str) -> tuple[float, float] | None:
    """The values ``metric`` can take (a proportion: [0, 1]), or None where it has no bounds."""
    return (0.0, 1.0) if metric in PROPORTIONS else _BOUNDS.get(metric)


def intervals(evaluation: Evaluation, halves_: Halves, confidence: float) -> dict:
    """Each metric's :class:`latentmap.stats.Interval` from its half-samples (``off`` without any),
    its method saying what it holds fixed (the 2-D map for the map's metrics unless it was refitted
    on each half-sample, C for the probe)."""
    from latentmap import stats

    found = {}
    for name, value in evaluation.values.items():
        n = len(evaluation.per_image.get(name, evaluation.per_image.get("twonn_log_ratio", [])))
        if halves_.count == 0:
            found[name] = stats.Interval(value, float("nan"), float("nan"), n, "off")
            continue
        refitted = name in MAP_METRICS and evaluation.map_refitted
        held = ("the 2-D map" if name in MAP_METRICS and not refitted else
                "the probe's C" if name.startswith("probe") else "")
        found[name] = stats.from_halves(value, evaluation.resampled[name], halves_.scale, n, confidence,
                                        proportion=name in PROPORTIONS, bounds=_BOUNDS.get(name), held=held)
        if refitted and np.isfinite(found[name].lo):
            found[name] = replace(found[name], method=f"{found[name].method}; the 2-D map refitted on each half-sample")
    return found
