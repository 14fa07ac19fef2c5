"""umap-learn's distance matrix for small data, compiled.

Below 4,096 points UMAP measures every distance: scikit-learn's ``pairwise_distances`` with
umap-learn's own numba distance as a Python callable, one Python call a pair. For the default
run's 1,797 digits that is 1.6 million calls, more than half of the fit (6.3 s against 2.4 s
without them, 2 slow cores), and again in every half-sample's refitted map
(``metrics.refit_map``). Here the same numba distance is called from a compiled loop over the
pairs, in the order scikit-learn calls it (the upper triangle, then the diagonal), and written into
an array of the dtype scikit-learn gives: the same matrix, bit for bit (tests/test_reduce.py). The
loop runs on numba's threads, which a seeded UMAP fit sets to one (its ``transform`` uses every
core).

The equality rests on the compiler summing a distance's terms in the same order when it compiles
umap-learn's distance into this loop as when it compiles it alone (both with umap-learn's
``fastmath``); it does on this machine's CPU, and the test would show where it does not. Rows are
passed to the distance as scikit-learn passes them, so only C-contiguous input runs here (a
column-ordered array's rows are strided, and fastmath may sum those in another order).

Only the distances named in :data:`KERNELS` (the ones latentmap's configs use) run compiled; any
other metric, keyword arguments, sparse, empty, non-contiguous or non-finite input go to
scikit-learn as before. The loops are kept in numba's cache like :mod:`latentmap.kernels` (they
compile umap-learn's distances into themselves: after upgrading umap-learn alone, delete the cache
folder, as :mod:`latentmap.jit` says).
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
    """A dense, non-empty, C-contiguous, finite float32 or float64 matrix: rows that scikit-learn
    would pass to the distance as they are."""
    return (isinstance(array, np.ndarray) and array.ndim == 2 and array.size > 0
            and array.dtype in (np.float32, np.float64) and array.flags.c_contiguous
            and bool(np.isfinite(array).all()))


def compiled(original):
    """``original`` (scikit-learn's ``pairwise_distances``), with the distances of :data:`KERNELS`
    between plain arrays computed by the compiled loops."""

    def pairwise_distances(X, Y=None, metric="euclidean", **kwds):
        which = KERNELS.get(metric) if callable(metric) else None
        if (which is None or kwds or not _plain(X) or not (Y is None or _plain(Y))
                or (Y is not None and (Y.dtype != X.dtype or Y.shape[1] != X.shape[1]))):
            return original(X, Y, metric=metric, **kwds)
        if Y is None:
            out = np.empty((len(X), len(X)), dtype=X.dtype)
            _square(X, out, which)
        else:
            out = np.empty((len(X), len(Y)), dtype=X.dtype)
            _rect(X, Y, out, which)
        return out

    pairwise_distances.compiled_by_latentmap = True
    return pairwise_distances
