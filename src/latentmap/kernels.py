"""Small compiled loops where numpy would need an (N, N) temporary or a Python loop per image.

Each function is compiled by numba once per cache folder and kept there (``cache=True``: in
``~/.cache/latentmap/numba`` when a run set it, see :mod:`latentmap.jit`; else numba's own choice, beside
this file or in the user's cache), a few seconds for them all: a fresh process loads machine code
instead of compiling. Each has a plain-numpy definition it is tested against
(tests/test_kernels.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, nogil=True)
def closer_in_plane(points: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(m, k) for each point i of ``points`` (m, 2) and each of its ``neighbours`` j (m, k) indices
    into ``points``, -1 for none): how many other points lie strictly closer to i than j, by
    euclidean distance (0 where j is -1). The rank of j among i's neighbours is 1 + that count.

    Brute force: for each i the squared distances to all m points, then for each neighbour j a count
    of those below its own (the same float64 number, so ties are never counted). Both loops are
    straight passes over one array that the compiler vectorises: an order of magnitude faster, for
    10,000 points with 10 neighbours each, than a k-d tree's radius counts (the radii are long: an
    embedding's neighbours mostly lie far apart in a 2-D map).
    """
    m, k = neighbours.shape
    counts = np.zeros((m, k), dtype=np.int64)
    xs, ys = np.ascontiguousarray(points[:, 0]), np.ascontiguousarray(points[:, 1])
    for i in prange(m):
        x, y = xs[i], ys[i]
        squared = np.empty(m)
        for j in range(m):
            dx, dy = xs[j] - x, ys[j] - y
            squared[j] = dx * dx + dy * dy
        for s in range(k):
            j = neighbours[i, s]
            if j < 0:
                continue
            radius = squared[j]
            closer = 0
            for t in range(m):
                closer += squared[t] < radius
            counts[i, s] = closer - (1 if radius > 0 else 0)  # not i itself (at 0)
    return counts


def count_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(b, L) for each row r of ``values`` (b, N) and each of its ``thresholds`` (b, L): how many
    entries of row r are strictly below ``thresholds[r, l]`` (``np.searchsorted(np.sort(row),
    t, side="left")``, without sorting the row). One pass over the row for all L
    (:func:`_count_sorted`): an entry at or above the largest threshold (three quarters of a row in
    the metric pass) is skipped, any other placed among the sorted thresholds by binary search; 2 to
    3 times as fast as a pass a threshold (its first form) on the metric pass's rows of 20,000 with
    60 and 110 thresholds. (The same for :func:`closer_in_plane` was 5 times slower: nearly every
    point of a map lies within a continuity neighbour's radius.) The thresholds are sorted and the
    scratch allocated here, so that the compiled loop allocates nothing in its threads: a first
    version that did raised the 100,000-image run's peak memory from 2.85 to 3.44 GB (measured
    twice; malloc's per-thread arenas, presumably)."""
    order = np.argsort(thresholds, axis=1, kind="stable")
    counts = np.zeros(thresholds.shape, dtype=np.int64)
    if thresholds.shape[1]:
        _count_sorted(values, np.take_along_axis(thresholds, order, axis=1), order, np.zeros_like(counts), counts)
    return counts


@njit(cache=True, parallel=True, nogil=True)
def _count_sorted(values: np.ndarray, limits: np.ndarray, order: np.ndarray, tally: np.ndarray,
                  counts: np.ndarray) -> None:
    """:func:`count_below`'s loop, into ``counts``: each row's thresholds sorted (``limits``, their
    columns ``order``), each entry below the largest tallied at the first limit above it
    (``tally``, zeros), the running tally then the count below each limit."""
    b, n = values.shape
    width = limits.shape[1]
    for r in prange(b):
        top = limits[r, width - 1]
        for t in range(n):
            value = values[r, t]
            if value < top:
                low, high = 0, width - 1  # binary search: the first limit above the value
                while low < high:
                    middle = (low + high) >> 1
                    if limits[r, middle] > value:
                        high = middle
                    else:
                        low = middle + 1
                tally[r, low] += 1
        running = 0
        for i in range(width):
            running += tally[r, i]
            counts[r, order[r, i]] = running


@njit(cache=True, parallel=True, nogil=True)
def positions_in(items: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """(m, a) for each row r: where each of ``items[r]`` (m, a) first appears in ``lists[r]`` (m, b),
    -1 where it does not: ``np.where(match.any(2), match.argmax(2), -1)`` of ``match = items[:, :, None]
    == lists[:, None, :]``, without its (m, a, b) array (66 MB a half-sample at 20,000 images)."""
    m, a = items.shape
    b = lists.shape[1]
    found = np.full((m, a), -1, dtype=np.int64)
    for r in prange(m):
        for i in range(a):
            item = items[r, i]
            for j in range(b):
                if lists[r, j] == item:
                    found[r, i] = j
                    break
    return found


def plane_class_sums(points: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(m, classes) for each point i of ``points`` (m, 2): the sum of its euclidean distances to the
    points of each class (``labels`` (m,) in 0..classes-1), the silhouette's terms of a map refitted
    on a half-sample. The same sums as ``pairwise_distances(points) @ onehot(labels)``, without the
    (m, m) array (800 MB at a half of 20,000). The points are put in class order first, so that each
    class is one contiguous run the compiled loop sums without a scatter (it vectorises)."""
    order = np.argsort(labels, kind="stable")
    ordered = np.ascontiguousarray(points[order], dtype=np.float64)
    bounds = np.searchsorted(labels[order], np.arange(classes + 1))
    sums = np.empty((len(points), classes))
    sums[order] = _class_run_sums(np.ascontiguousarray(ordered[:, 0]), np.ascontiguousarray(ordered[:, 1]), bounds)
    return sums


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def _class_run_sums(xs: np.ndarray, ys: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """:func:`plane_class_sums`' loop on points in class order (class c: rows bounds[c]..bounds[c+1])."""
    m, classes = len(xs), len(bounds) - 1
    sums = np.zeros((m, classes))
    for i in prange(m):
        x, y = xs[i], ys[i]
        for c in range(classes):
            total = 0.0
            for j in range(bounds[c], bounds[c + 1]):
                dx, dy = xs[j] - x, ys[j] - y
                total += np.sqrt(dx * dx + dy * dy)
            sums[i, c] = total
    return sums
