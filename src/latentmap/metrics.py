"""Quality of a 2-D map and of the embedding it came from: pure functions on arrays.

All neighbourhood metrics use k = ``metrics.k``.

The embedding space has one geometry, ``metrics.distance`` (cosine by default, or euclidean),
used by every computation on the embeddings: the embedding-side neighbours of trustworthiness and
continuity, silhouette_hd, knn_acc_hd, and (in the runner) the neighbours, the outlier scores and
what the reducer is fitted on.

* ``silhouette_hd``: silhouette of the true labels in the embedding space.
* ``silhouette_2d``: silhouette of the true labels in the 2-D map (euclidean).
* ``trustworthiness``: trustworthiness as scikit-learn defines it (Venna & Kaski): are the map's
  k nearest neighbours also near in the embedding? 1 is perfect. Computed exactly, in
  blocks of rows, in float64 and in memory linear in N (see :func:`trustworthiness`).
* ``continuity``: the converse: are the embedding's k nearest neighbours kept near in the map?
  It is trustworthiness with the two spaces swapped.
* ``knn_acc_hd`` / ``knn_acc_2d``: accuracy of a k-NN classifier (in the embedding's geometry,
  euclidean in the map), out of fold under seeded, stratified ``metrics.folds``-fold cross-validation.
"""

from __future__ import annotations

import logging

import numpy as np

from latentmap import settings
from latentmap.errors import ConfigError

log = logging.getLogger(__name__)

LABEL_METRICS = ("silhouette_hd", "silhouette_2d", "knn_acc_hd", "knn_acc_2d")


def embedding_space(embeddings: np.ndarray, distance: str) -> np.ndarray:
    """The embeddings as the one geometry sees them, for computations that work in euclidean space
    (neighbour ranks of trustworthiness and continuity, the reducers): L2-normalised rows for cosine
    (their euclidean order is the cosine order), the embeddings themselves for euclidean."""
    settings.require("metrics.distance", distance)
    if distance == "euclidean":
        return embeddings
    space = np.empty(embeddings.shape, dtype=np.float32)  # (N, D) on the unit sphere
    for start in range(0, len(embeddings), 1 << 16):  # in blocks: no full-size temporaries at 1M images
        block = np.asarray(embeddings[start : start + (1 << 16)], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        space[start : start + len(block)] = block / np.where(norms > 0, norms, 1)
    return space


def check_spread(space: np.ndarray, feature: str) -> None:
    """A ConfigError when every row of ``space`` (the embeddings as the geometry sees them) is the same
    point: copies of one image, or a layer whose output does not depend on its input, leave nothing
    to map or score (the linear probe had no feature left and failed in a traceback). Read in blocks
    that stop at the first block with a second point: about a millisecond on real data."""
    first = np.asarray(space[:1], dtype=np.float32)
    if not np.isfinite(first).all():
        return  # not a question of spread
    # the same up to float32 rounding, coordinate by coordinate: grey images as unit rows (model.size=1)
    # differed in the 7th digit, and were mapped and scored (trustworthiness 1.000 of a map of one point)
    tolerance = 1e-5 * np.abs(first) + 1e-7 * float(np.abs(first).max(initial=0.0))
    for start in range(0, len(space), 1 << 14):
        block = np.asarray(space[start : start + (1 << 14)], dtype=np.float32)
        if not (np.abs(block - first) <= tolerance).all():  # NaN counts as apart
            return
    raise ConfigError(f"every image's embedding ({feature}) is the same point, so there is nothing to map or "
                      f"score: check that the images differ (dataset.path or dataset.name) and, for a model, try "
                      f"another layer= or pool=")


NEIGHBOUR_METRICS = ("trustworthiness", "continuity")


def trustworthiness_per_point(embeddings: np.ndarray, coords: np.ndarray, k: int,
                              block_bytes: int = 64 << 20) -> np.ndarray:
    """(N,) per-image trustworthiness of ``coords`` (N, 2) as a map of ``embeddings`` (N, D): for
    image i, ``1 - 2 / (k (2N - 3k - 1)) * sum over its k map neighbours j of max(0, r(i, j) - k)``,
    r(i, j) the rank of j among i's neighbours in the embedding. Their mean is exactly
    ``sklearn.manifold.trustworthiness`` (Venna & Kaski), computed in memory linear in N.

    scikit-learn sorts the full N x N distance matrix (7.5 GB at N = 20,000). Here one block of
    rows at a time gets its distances to all points, and the rank of each map neighbour j of i is
    1 + the number of points closer to i than j: no sort, no N x N array. ``block_bytes`` bounds
    the working memory of a block. Values equal scikit-learn's when no two distances from a point
    tie (with ties, scikit-learn's order among equals is its sort's; here a tie ranks first).
    Distances are computed in float64: equal to scikit-learn's on float64 input, and free of the
    float32 rounding scikit-learn's own result shows on float32 input (about 1e-6).
    """
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import NearestNeighbors

    embeddings = np.asarray(embeddings, dtype=np.float64)  # (N, D); float64 distances, so ranks
    coords = np.asarray(coords, dtype=np.float64)  # (N, 2); do not depend on float32 rounding
    n = len(embeddings)
    if k >= n / 2:
        raise ValueError(f"k={k} must be < N/2 = {n / 2}")
    map_neighbours = NearestNeighbors(n_neighbors=k).fit(coords).kneighbors(return_distance=False)  # (N, k)
    rows_per_block = max(1, int(block_bytes // (n * 9)))  # float64 distances + one boolean mask
    penalty = np.zeros(n, dtype=np.int64)  # (N,) rank penalty of each image
    for start in range(0, n, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, n))
        distances = pairwise_distances(embeddings[rows], embeddings)  # (b, N)
        distances[np.arange(len(rows)), rows] = np.inf  # a point is not its own neighbour
        thresholds = np.take_along_axis(distances, map_neighbours[rows], axis=1)  # (b, k)
        # One pass per neighbour: count_nonzero on a 2-D mask is 7x faster than a (b, N, k) mask.
        ranks = 1 + np.stack([np.count_nonzero(distances < thresholds[:, [j]], axis=1) for j in range(k)], axis=1)
        penalty[rows] = np.clip(ranks - k, 0, None).sum(axis=1)
    return 1.0 - penalty * (2.0 / (k * (2.0 * n - 3.0 * k - 1.0)))


def trustworthiness(embeddings: np.ndarray, coords: np.ndarray, k: int, block_bytes: int = 64 << 20) -> float:
    """Trustworthiness (scikit-learn's definition): the mean of :func:`trustworthiness_per_point`."""
    return float(trustworthiness_per_point(embeddings, coords, k, block_bytes).mean())


def continuity_per_point(embeddings: np.ndarray, coords: np.ndarray, k: int) -> np.ndarray:
    """(N,) per-image continuity: trustworthiness with the roles of the two spaces exchanged."""
    return trustworthiness_per_point(coords, embeddings, k)


def continuity(embeddings: np.ndarray, coords: np.ndarray, k: int) -> float:
    """Continuity: trustworthiness with the roles of the two spaces exchanged."""
    return float(continuity_per_point(embeddings, coords, k).mean())


def silhouette(points: np.ndarray, labels: np.ndarray, metric: str) -> float:
    return float(silhouette_per_point(points, labels, metric).mean())


def silhouette_per_point(points: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    """(N,) silhouette of each image (``sklearn.metrics.silhouette_samples``); the mean is the score."""
    from sklearn.metrics import silhouette_samples

    return silhouette_samples(np.asarray(points, dtype=np.float64), labels, metric=metric)  # float64, as the ranks


def folds_of(labels: np.ndarray, folds: int, seed: int, quiet: bool = False):
    """The seeded, stratified folds every cross-validated metric uses (fewer when a class is smaller;
    said in the log unless ``quiet``: half-samples of small classes)."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    smallest_class = int(counts[counts > 0].min())
    splits = max(2, min(folds, smallest_class))
    if splits != folds and not quiet:
        log.warning("cross-validation: the smallest class has %d images, using %d folds instead of %d",
                    smallest_class, splits, folds)
    return StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)


def knn_correct(points: np.ndarray, labels: np.ndarray, k: int, folds: int, metric: str, seed: int) -> np.ndarray:
    """(N,) 1.0 where a k-NN classifier trained on the other folds labels the image right, else 0.0:
    out-of-fold predictions under seeded, stratified cross-validation (``cross_val_predict``)."""
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k, metric=metric)
    predicted = cross_val_predict(classifier, points, labels, cv=folds_of(labels, folds, seed))
    return (predicted == labels).astype(np.float64)


def knn_accuracy(points: np.ndarray, labels: np.ndarray, k: int, folds: int, metric: str, seed: int) -> float:
    """k-NN classification accuracy: the share of images labelled right out of fold."""
    return float(knn_correct(points, labels, k, folds, metric, seed).mean())


def scored_rows(max_points, labels: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """Sorted rows the metrics are computed on: all ``n``, or a seeded, class-stratified sample of
    ``max_points`` (``metrics.max_points``; None: all)."""
    from latentmap.data import balanced_order

    if max_points is None:
        return np.arange(n)
    settings.require("metrics.max_points", max_points)
    if n <= max_points:
        return np.arange(n)
    return np.sort(balanced_order(labels, n, seed)[:max_points])


def check(n_samples: int, labels: np.ndarray | None, k: int, folds: int, capped_by: str | None = None,
          halves: int = 0, names: list[str] | None = None) -> None:
    """Raise a one-line ConfigError for metric settings the data cannot support. ``capped_by``: the
    setting that made the scored sample smaller than the dataset (``metrics.max_points``), if any;
    ``halves``: the half-samples the intervals recompute every metric on (``metrics.bootstrap``);
    ``names``: the class names, to name a class that is too small."""
    settings.require("metrics.k", k)
    if k >= n_samples / 2:
        more = f"more images (raise {capped_by}, now {n_samples})" if capped_by else "more images"
        if n_samples < 3:  # no k >= 1 has k < N/2
            raise ConfigError(f"N={n_samples} scored images are too few: trustworthiness needs k < N/2 with k >= 1, "
                              f"so use {more}: at least 3")
        raise ConfigError(
            f"metrics.k={k} is too large for N={n_samples} images: trustworthiness needs "
            f"k < N/2, so use metrics.k<={(n_samples - 1) // 2} or {more}"
        )
    if labels is None:
        return
    settings.require("metrics.folds", folds)
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    if present < 2:
        raise ConfigError(
            f"the dataset has {present} class; silhouette and k-NN accuracy need at least 2: "
            "add images of another class, or skip the label metrics: an unlabelled flat folder with "
            "dataset=imagefolder, dataset.label_column=null with dataset=hf"
        )
    if counts[counts > 0].min() < 2:
        single = np.flatnonzero(counts == 1)
        which = ", ".join(repr(names[c]) if names and c < len(names) else str(c) for c in single[:5])
        more = f" and {len(single) - 5} more" if len(single) > 5 else ""
        raise ConfigError(
            f"{'a class has' if len(single) == 1 else f'{len(single)} classes have'} only 1 image ({which}{more}); "
            "k-NN accuracy needs at least 2 per class: add images to it (or raise dataset.limit, where one is set), "
            "or drop the class"
        )
    if halves and counts.max() < 4:
        more_images = f"raise {capped_by}" if capped_by else "add images, or raise dataset.limit where one is set"
        # A half-sample keeps half of each class (at least 1): with at most 3 images a class, every
        # class of a half has 1 image, and no stratified split of it into folds exists.
        raise ConfigError(
            f"every class has at most {int(counts.max())} images: the intervals recompute each metric on "
            "half-samples, which would hold 1 image a class, too few to cross-validate; use at least 4 images "
            f"in a class ({more_images}), or metrics.bootstrap=0 for no intervals")
    train_size = n_samples - int(np.ceil(n_samples / min(folds, counts[counts > 0].min())))
    if k > train_size:
        raise ConfigError(
            f"metrics.k={k} is too large: each k-NN training fold has only {train_size} images"
        )


def centroid_distances(points: np.ndarray, labels: np.ndarray, n_classes: int, metric: str) -> np.ndarray:
    """(C, C) distances between class means of ``points`` (N, D); NaN rows for empty classes."""
    from sklearn.metrics import pairwise_distances

    centres = np.full((n_classes, points.shape[1]), np.nan)
    for c in range(n_classes):
        if (labels == c).any():
            centres[c] = points[labels == c].mean(axis=0)
    present = ~np.isnan(centres[:, 0])
    matrix = np.full((n_classes, n_classes), np.nan)
    matrix[np.ix_(present, present)] = pairwise_distances(centres[present], metric=metric)
    return matrix


def per_image_hd(embeddings: np.ndarray, labels: np.ndarray | None, k: int = 10, folds: int = 5,
                 seed: int = 0, distance: str = "cosine") -> dict[str, np.ndarray]:
    """(N,) per-image scores of the metrics of the embedding alone, in its geometry ``distance``:
    silhouette_hd and knn_acc_hd (none for unlabelled data)."""
    if labels is None:
        return {}
    return {"silhouette_hd": silhouette_per_point(embeddings, labels, distance),
            "knn_acc_hd": knn_correct(embeddings, labels, k, folds, distance, seed)}


def per_image_2d(embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray | None, k: int = 10,
                 folds: int = 5, seed: int = 0, distance: str = "cosine") -> dict[str, np.ndarray]:
    """(N,) per-image scores of the metrics of a 2-D map: trustworthiness, continuity (neighbours in
    the embedding by ``distance``, in the map euclidean) and, for labelled data, silhouette_2d and
    knn_acc_2d."""
    high = embedding_space(embeddings, distance)
    scores = {"trustworthiness": trustworthiness_per_point(high, coords, k),
              "continuity": continuity_per_point(high, coords, k)}
    if labels is not None:
        scores["silhouette_2d"] = silhouette_per_point(coords, labels, "euclidean")
        scores["knn_acc_2d"] = knn_correct(coords, labels, k, folds, "euclidean", seed)
    return scores


# The readouts of latentmap.probes (labelled data, the embedding only).
PROBE_METRICS = ("knn_acc_weighted", "probe_acc", "probe_balanced_acc")
ORDER = NEIGHBOUR_METRICS + ("silhouette_hd", "silhouette_2d", "knn_acc_hd", "knn_acc_2d") + PROBE_METRICS
# Each metric in a few words, for the pages' captions (docs/concepts.md defines each in full).
MEANING = {
    "trustworthiness": "whether the map's neighbours are neighbours in the embedding (1 is perfect)",
    "continuity": "whether the embedding's neighbours stay neighbours in the map (1 is perfect)",
    "silhouette_hd": "how far the classes stand apart in the embedding space (-1 to 1)",
    "silhouette_2d": "how far the classes stand apart in the 2-D map (-1 to 1)",
    "knn_acc_hd": "the k-NN classifier's accuracy in the embedding space, out of fold",
    "knn_acc_2d": "the k-NN classifier's accuracy in the 2-D map, out of fold",
    "knn_acc_weighted": "DINO's weighted k-NN accuracy in the embedding space, out of fold",
    "probe_acc": "the linear probe's accuracy, out of fold",
    "probe_balanced_acc": "the linear probe's balanced accuracy (the mean of the classes' recalls), out of fold",
    "twonn_id": "the embedding's intrinsic dimension (TwoNN)",
    "rankme": "the embedding's effective rank (RankMe)",
    "knn_acc": "the k-NN classifier's accuracy in the embedding space, out of fold",
    "nmi_kmeans": "how well k-means clusters of the embedding match the classes (normalised mutual information)",
    "ari_kmeans": "how well k-means clusters of the embedding match the classes (adjusted Rand index)",
    "nmi_hdbscan": "how well HDBSCAN clusters of the embedding match the classes (normalised mutual information)",
    "ari_hdbscan": "how well HDBSCAN clusters of the embedding match the classes (adjusted Rand index)",
}


def per_image(
    embeddings: np.ndarray,
    coords: np.ndarray,
    labels: np.ndarray | None,
    k: int = 10,
    folds: int = 5,
    seed: int = 0,
    distance: str = "cosine",
) -> dict[str, np.ndarray]:
    """Every metric's (N,) per-image scores; each metric is the mean of its scores. Label metrics
    are skipped (and said so) for unlabelled data."""
    check(len(embeddings), labels, k, folds)
    if labels is None:
        log.info("unlabelled dataset: skipping %s", ", ".join(LABEL_METRICS))
    found = {**per_image_2d(embeddings, coords, labels, k, folds, seed, distance),
             **per_image_hd(embeddings, labels, k, folds, seed, distance)}
    return {name: found[name] for name in ORDER if name in found}


def score(
    embeddings: np.ndarray,
    coords: np.ndarray,
    labels: np.ndarray | None,
    k: int = 10,
    folds: int = 5,
    seed: int = 0,
    distance: str = "cosine",
) -> dict[str, float]:
    """All metrics of one run: the means of :func:`per_image`."""
    return {name: float(values.mean())
            for name, values in per_image(embeddings, coords, labels, k, folds, seed, distance).items()}
