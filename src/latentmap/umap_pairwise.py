"""umap-learn's distance matrix for small data, compiled.

Below 4,096 points UMAP measures every distance: scikit-learn's ``pairwise_distances`` with
umap-learn's own numba distance as a Python callable, one Python call per pair. For the default
run's 1,797 digits that is 1.6 million calls, about 5 s of a fit that otherwise takes 1 (2 cores,
slow night), and again in every half-sample's refitted map (``metrics.refit_map``). Here the same
numba distance is called from a compiled loop over the pairs (on every core), in the order
scikit-learn calls it (the upper triangle, then the diagonal), and written into an array of the
dtype scikit-learn gives: the same matrix, bit for bit (tests/test_reduce.py), a hundred times
faster or more.

Only the distances named in :data:`KERNELS` (the ones latentmap's configs use) run compiled; any
other metric, keyword arguments, sparse or non-finite input go to scikit-learn as before. The
loops are kept in numba's cache like :mod:`latentmap.kernels` (they compile umap-learn's distances
into themselves: after upgrading umap-learn alone, delete the cache folder, as :mod:`latentmap.jit` says).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from umap import distances


@njit(cache=True, nogil=True)
def _distance(which: int, x: np.ndarray, y: np.ndarray) -> float:
    """umap-learn's own numba distance number ``which`` (the order of :data:`KERNELS`)."""
    if which == 0:
        return distances.euclidean(x, y)
    return distances.cosine(x, y)


@njit(cache=True, parallel=True, nogil=True)
def _square(points: np.ndarray, out: np.ndarray, which: int) -> None:
    """scikit-learn's matrix of one array: each pair i < j once, then the diagonal, then mirrored."""
    n = points.shape[0]
    for i in prange(n):
        for j in range(i + 1, n):
            out[i, j] = _distance(which, points[i], points[j])
        out[i, i] = _distance(which, points[i], points[i])
    for i in prange(n):
        for j in range(i):
            out[i, j] = out[j, i]


@njit(cache=True, parallel=True, nogil=True)
def _rect(points: np.ndarray, other: np.ndarray, out: np.ndarray, which: int) -> None:
    """scikit-learn's matrix of two arrays: every cell."""
    for i in prange(points.shape[0]):
        for j in range(other.shape[0]):
            out[i, j] = _distance(which, points[i], other[j])


# umap-learn's numba distances that run compiled -> their number in _distance.
KERNELS = {distances.euclidean: 0, distances.cosine: 1}


def _plain(array) -> bool:
    """A dense, finite float32 or float64 matrix (what scikit-learn would pass on unchanged)."""
    return (isinstance(array, np.ndarray) and array.ndim == 2 and array.dtype in (np.float32, np.float64)
            and bool(np.isfinite(array).all()))


def compiled(original):
    """``original`` (scikit-learn's ``pairwise_distances``), with the distances of :data:`KERNELS`
    between plain arrays computed by the compiled loops."""

    def pairwise_distances(X, Y=None, metric="euclidean", **kwds):
        which = KERNELS.get(metric) if callable(metric) else None
        if (which is None or kwds or not _plain(X) or not (Y is None or _plain(Y))
                or (Y is not None and (Y.dtype != X.dtype or Y.shape[1] != X.shape[1]))):
            return original(X, Y, metric=metric, **kwds)
        points = np.ascontiguousarray(X)
        if Y is None:
            out = np.empty((len(points), len(points)), dtype=points.dtype)
            _square(points, out, which)
        else:
            other = np.ascontiguousarray(Y)
            out = np.empty((len(points), len(other)), dtype=points.dtype)
            _rect(points, other, out, which)
        return out

    return pairwise_distances
