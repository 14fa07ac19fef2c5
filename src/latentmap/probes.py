"""The standard readouts of a representation, each with per-image out-of-fold correctness, on the
same seeded, stratified folds as ``knn_acc_hd`` (:func:`latentmap.metrics.folds_of`):

* the linear probe (Alain & Bengio): standardised features, multinomial logistic regression, the
  inverse regularisation C chosen by an inner cross-validation on each training fold
  (scikit-learn's ``StandardScaler`` + ``LogisticRegressionCV``, C from a log grid by log loss on
  3 inner folds); ``probe_acc`` and
  ``probe_balanced_acc``;
* DINO's weighted k-NN (Caron et al., 2021): the k most similar training images vote for their
  class with weight exp(similarity / T); ``knn_acc_weighted``. Similarity is the cosine similarity
  for ``metrics.distance=cosine`` (DINO's choice) and the negative euclidean distance otherwise.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from latentmap.metrics import embedding_space, folds_of

log = logging.getLogger(__name__)

# The inverse regularisation strengths the inner cross-validation chooses from (a log grid).
PROBE_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
MAX_ITER = 500  # lbfgs iterations a fit may take (tolerance 1e-3)


def probe_options() -> dict:
    """``LogisticRegressionCV`` settings of the probe: C chosen by log loss (scikit-learn's coming
    default), plain L2, and the new fitted attributes where this scikit-learn has the switch."""
    import inspect

    from sklearn.linear_model import LogisticRegressionCV

    options = {"Cs": list(PROBE_CS), "scoring": "neg_log_loss", "max_iter": MAX_ITER, "tol": 1e-3}
    accepted = inspect.signature(LogisticRegressionCV).parameters
    if "use_legacy_attributes" in accepted:
        options.update(l1_ratios=(0.0,), use_legacy_attributes=False)
    return options


def neg_log_loss(estimator, x: np.ndarray, y: np.ndarray) -> float:
    """What scikit-learn's ``"neg_log_loss"`` scorer returns when ``LogisticRegressionCV`` (1.9 and
    later) scores a C on an inner test fold: the log loss over every class of the training labels
    (a class absent from the fold included), probabilities clipped to [eps, 1 - eps], a binary
    probe's from its positive column, with scikit-learn's own arithmetic (``x * np.log(p)``, zero
    where x is 0), so to the last bit; without the scorer's per-call input validation, which
    dominated on small folds, where a probe scores 7 Cs x 3 inner folds x 5 folds (tested against
    the scorer in tests/test_probes.py)."""
    proba = estimator.predict_proba(x)
    if proba.shape[1] == 2:  # the scorer keeps the positive class's column and rebuilds the other
        positive = proba[:, 1]
        proba = np.stack([1 - positive, positive], axis=1)
    eps = np.finfo(proba.dtype).eps
    proba = np.clip(proba, eps, 1 - eps)
    truth = np.zeros_like(proba)
    truth[np.arange(len(y)), np.searchsorted(estimator.classes_, y)] = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = truth * np.log(proba)
    terms = np.where(truth == 0.0, 0.0, terms)
    return -float(np.mean(-np.sum(terms, axis=1)))


@dataclass(frozen=True)
class ProbeFit:
    """The linear probe's out-of-fold predictions and the inverse regularisation C its inner
    cross-validation chose in each fold (the most frequent choice is what half-samples refit at)."""

    predicted: np.ndarray
    chosen: tuple[float, ...]
    probabilities: np.ndarray | None = None  # (N, C) out-of-fold class probabilities (C: labels.max() + 1)

    @property
    def inverse_penalty(self) -> float:
        values, counts = np.unique(self.chosen, return_counts=True)
        return float(values[counts.argmax()])


def _fold_features(points: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardised training and test features of one fold; with more dimensions than training
    images, written in an orthonormal basis of the training rows' span (see linear_probe_fit)."""
    train_x = np.asarray(points[train], dtype=np.float64)  # (n, D) copies, standardised in place
    test_x = np.asarray(points[test], dtype=np.float64)
    mean, scale = _standardiser(train_x)
    for x in (train_x, test_x):
        x -= mean
        x /= scale
    if train_x.shape[1] > len(train):  # the training rows' span: same fits, fewer dimensions
        # train_x = U S V^T: the eigenvectors U of the (n, n) Gram matrix give the span's basis
        # V = train_x^T U / S (3x faster than the SVD of the (n, D) rows); directions with
        # S below 1e-7 of the largest (the mean that standardising removed) are dropped.
        eigenvalues, vectors = np.linalg.eigh(train_x @ train_x.T)
        keep = eigenvalues > eigenvalues[-1] * 1e-14
        if not keep.any():  # every training row the same point: no direction, a probe that predicts by its intercept
            return np.zeros((len(train_x), 1)), np.zeros((len(test_x), 1))
        singular = np.sqrt(eigenvalues[keep])
        train_x, test_x = vectors[:, keep] * singular, (test_x @ train_x.T) @ (vectors[:, keep] / singular)
    return train_x, test_x


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the columns of ``x`` (n, D) float64, as ``StandardScaler().fit(x)`` computes
    them, to the last bit (its corrected two-pass variance; near-constant columns get scale 1), in
    half its time with the transform: no input validation or NaN handling, which our finite
    embeddings do not need (the probe standardises 5 folds x (1 + 30 half-samples) times a run)."""
    n = len(x)
    mean = x.sum(axis=0) / n
    centred = x - mean
    correction = centred.sum(axis=0)
    centred **= 2
    variance = (centred.sum(axis=0) - correction**2 / n) / n
    eps = np.finfo(np.float64).eps
    constant = variance <= n * eps * variance + (n * mean * eps) ** 2
    scale = np.sqrt(variance)
    scale[constant] = 1.0
    return mean, scale


# The probe's fits run side by side in threads (one BLAS thread each: its folds, and its
# half-sample refits) from this many numbers per fit's training set (rows x dimensions) on. On
# 2 cores, two threads gave the same predictions in 0.6 times the time for 6 refits of
# 10,000 x 768, 0.5-0.6 for the default run's 898 x 1,280 and 0.78 for 898 x 256, while 898 x 128
# gained 1.06x and 300 x 16 lost (0.78x): below it the fits are Python-bound and hold the GIL
# (docs/performance-log.md, "The probe's refits and UMAP's in threads").
PARALLEL_REFITS_FROM = 200_000


def refit_workers(size: int, refits: int) -> int:
    """Threads for ``refits`` fits of ``size`` numbers each (a training set's rows x dimensions): one
    per available core from :data:`PARALLEL_REFITS_FROM` on, else 1."""
    from latentmap.machine import usable_cores

    if size < PARALLEL_REFITS_FROM or refits < 2:
        return 1
    cores = usable_cores()
    return max(1, min(cores, refits))


def fits_side_by_side(fit, items: list, size: int) -> list:
    """``[fit(item) for item in items]``, in threads where :func:`refit_workers` says so (``size``:
    numbers in one fit's training set), in the items' order. ``fit`` must leave the warnings state
    alone (``catch_warnings`` is not thread-safe before Python 3.14): the caller handles warnings
    around this call, in its own thread."""
    from concurrent.futures import ThreadPoolExecutor

    workers = refit_workers(size, len(items))
    if workers == 1:
        return [fit(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fit, items))


def one_thread():
    """One BLAS thread for the probe's many small fits: several times faster than two (the threads'
    hand-offs cost more than the arithmetic of a 1,000 x 1,000 logistic regression)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def linear_probe_fit(points: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> ProbeFit:
    """Out-of-fold predictions of the linear probe, and each fold's chosen C.

    With more dimensions than training images (pixels, wide models on small sets), the standardised
    features are first written in an orthonormal basis of the training rows' span: an L2-penalised
    linear model's weights lie in that span (the representer theorem; the intercept is not
    penalised), so the probe, its inner cross-validation and its predictions are the same, and each
    fit has at most as many dimensions as images (25x faster for 3,072 pixels of 96 images).

    The fits that stopped at the iteration limit are not warned about one by one: they are counted
    from their ``n_iter_`` (the inner cross-validation's fits) and said in one log line. The
    warnings state is saved and restored around the folds' threads (scikit-learn's fits set it
    in each thread), in the calling thread, which may itself run beside the caller's other work
    (:func:`latentmap.resampling.evaluate`) as long as that leaves the warnings state alone.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    points = np.asarray(points, dtype=np.float64)
    predicted = np.empty(len(labels), dtype=labels.dtype)
    probabilities = np.zeros((len(labels), int(labels.max()) + 1))
    splits = list(folds_of(labels, folds, seed).split(points, labels))

    def fit_fold(split: tuple[np.ndarray, np.ndarray]):
        train, test = split
        train_x, test_x = _fold_features(points, train, test)
        counts = np.bincount(labels[train])
        inner = min(3, int(counts[counts > 0].min()))
        if inner >= 2:
            head = LogisticRegressionCV(cv=StratifiedKFold(inner, shuffle=True, random_state=seed),
                                        **{**probe_options(), "scoring": neg_log_loss})
        else:  # a class with one training image: no inner split is possible
            head = LogisticRegression(max_iter=MAX_ITER, tol=1e-3)
        head.fit(train_x, labels[train])
        c = float(np.ravel(head.C_)[0]) if hasattr(head, "C_") else float(head.C)
        stopped = int((np.asarray(head.n_iter_) >= MAX_ITER).sum())
        return c, head.predict(test_x), head.classes_, head.predict_proba(test_x), stopped

    with warnings.catch_warnings():  # in this thread: scikit-learn's own, in the fits' threads, are undone here
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted from n_iter_ instead
        fitted = fits_side_by_side(fit_fold, splits,
                                   len(points) * (len(splits) - 1) // len(splits) * points.shape[1])
    chosen = []
    for (_, test), (c, labels_of_test, classes, proba, _) in zip(splits, fitted):
        chosen.append(c)
        predicted[test] = labels_of_test
        probabilities[np.ix_(test, classes)] = proba  # a class absent in training: 0
    unconverged = sum(found[-1] for found in fitted)
    if unconverged:
        log.warning("linear probe: %d logistic-regression fits stopped at %d iterations before converging "
                    "(tolerance 1e-3)", unconverged, MAX_ITER)
    return ProbeFit(predicted, tuple(chosen), probabilities)


def linear_probe_predictions(points: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) out-of-fold predictions of the linear probe (:func:`linear_probe_fit`)."""
    with one_thread():
        return linear_probe_fit(points, labels, folds, seed).predicted


def linear_probe_refit(points: np.ndarray, labels: np.ndarray, folds: int, seed: int,
                       inverse_penalty: float) -> np.ndarray:
    """(n,) out-of-fold predictions of the probe on a half-sample, its C held at ``inverse_penalty``
    (the full sample's choice): the same folds rule and features, one fit per fold. It leaves the
    warnings state alone (it runs in threads: :func:`fits_side_by_side`); its caller decides what
    to show of them (a half of a 2-image class has 1 image, fits stopped at 500 iterations)."""
    from sklearn.linear_model import LogisticRegression

    predicted = np.empty(len(labels), dtype=labels.dtype)
    for train, test in folds_of(labels, folds, seed, quiet=True).split(points, labels):
        train_x, test_x = _fold_features(points, train, test)
        head = LogisticRegression(C=inverse_penalty, max_iter=MAX_ITER, tol=1e-3)
        head.fit(train_x, labels[train])
        predicted[test] = head.predict(test_x)
    return predicted


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """(N,) N / (C n_c) for an image of class c: the mean of weight x correctness is the balanced
    accuracy (the mean of the per-class recalls) over the C classes present."""
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    return len(labels) / (present * counts[labels])


def weighted_knn_predictions(points: np.ndarray, labels: np.ndarray, k: int, temperature: float, folds: int,
                             seed: int, distance: str = "cosine", block: int = 1024) -> np.ndarray:
    """(N,) out-of-fold predictions of DINO's weighted k-NN: for each test image, the ``k`` most
    similar training images vote for their class with weight exp(similarity / ``temperature``)."""
    points = np.asarray(embedding_space(points, distance), dtype=np.float32)  # unit rows for cosine
    n_classes = int(labels.max()) + 1
    predicted = np.empty(len(labels), dtype=labels.dtype)
    for train, test in folds_of(labels, folds, seed).split(points, labels):
        neighbours = min(k, len(train))
        for start in range(0, len(test), block):
            rows = test[start:start + block]
            if distance == "cosine":
                similarity = points[rows] @ points[train].T  # (b, T) cosine similarities
            else:
                from sklearn.metrics import pairwise_distances

                similarity = -pairwise_distances(points[rows], points[train])
            top = np.argpartition(-similarity, neighbours - 1, axis=1)[:, :neighbours]  # (b, k), any order
            nearest = np.take_along_axis(similarity, top, axis=1).astype(np.float64)  # (b, k)
            # exp(s / T), scaled by each row's largest term so that large euclidean distances do not
            # underflow to all-zero votes; a common factor per row leaves the vote's winner unchanged.
            weights = np.exp((nearest - nearest.max(axis=1, keepdims=True)) / temperature)
            votes = np.zeros((len(rows), n_classes))
            np.add.at(votes, (np.repeat(np.arange(len(rows)), neighbours), labels[train][top].ravel()), weights.ravel())
            predicted[rows] = votes.argmax(axis=1)
    return predicted


NAMES = ("knn_acc_weighted", "probe_acc", "probe_balanced_acc")


def per_image(points: np.ndarray, labels: np.ndarray, folds: int, seed: int, distance: str, weighted_k: int,
              temperature: float, linear: bool = True) -> dict[str, np.ndarray]:
    """(N,) per-image scores of the readouts: weighted k-NN and (``linear``) the linear probe's
    correctness, and its balanced-accuracy share (mean: the balanced accuracy)."""
    scores = {"knn_acc_weighted": (weighted_knn_predictions(points, labels, weighted_k, temperature, folds, seed,
                                                            distance) == labels).astype(np.float64)}
    if linear:
        correct = (linear_probe_predictions(points, labels, folds, seed) == labels).astype(np.float64)
        scores["probe_acc"] = correct
        scores["probe_balanced_acc"] = correct * balanced_weights(labels)
    return scores
