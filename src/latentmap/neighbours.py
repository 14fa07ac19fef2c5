"""Nearest neighbours in the embedding space, and the outlier scores built on them.

The distance is the embedding space's one geometry (``metrics.distance``: cosine, 1 - cosine
similarity, by default; or euclidean), the one ``knn_acc_hd`` uses. A point is never its own
neighbour.

Every image's neighbours (:func:`every_nearest`, behind the outlier scores) are exact up to
``metrics.exact_neighbours`` images and approximate above: exact search costs N^2 (minutes at
100,000 images on a laptop's cores, hours at a million), while an approximate graph grows about as
N log N: faiss's HNSW, or in a UMAP run pynndescent's NN-descent, which UMAP's own graph compiles
(:func:`_approximate` says why, with the measurements). scikit-learn offers only exact search (its
trees do not help at hundreds of dimensions). The approximate search's recall is measured, not
assumed: the exact neighbours of a seeded sample of :data:`RECALL_QUERIES` images are found by
brute force and compared.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from latentmap.machine import usable_cores

log = logging.getLogger(__name__)

RECALL_QUERIES = 1000  # images whose exact neighbours measure the approximate index's recall


def nearest(embeddings: np.ndarray, k: int, queries: np.ndarray | None = None,
            metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), each (Q, k): the k nearest rows of ``embeddings`` to each query row
    (all rows when ``queries`` is None), nearest first, excluding the query itself, by ``metric``
    (``metrics.distance``: cosine or euclidean).

    scikit-learn's brute-force search works through the distance matrix in chunks
    (``sklearn.set_config(working_memory=...)``), so memory stays bounded at any N.
    """
    from sklearn.neighbors import NearestNeighbors

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not 1 <= k < len(embeddings):
        raise ValueError(f"k={k} must be in 1..{len(embeddings) - 1}")
    index = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(embeddings)
    if queries is None:
        distances, indices = index.kneighbors()  # excludes each point itself
        return indices, distances
    distances, indices = index.kneighbors(embeddings[queries], n_neighbors=k + 1)
    keep = indices != np.asarray(queries)[:, None]
    # Drop the query itself (or the farthest neighbour when a duplicate took its place).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)


def exact_limit(metrics_node) -> int | None:
    """``metrics.exact_neighbours``, checked: exact search up to this many images (None: always)."""
    from latentmap import settings

    return settings.require("metrics.exact_neighbours", metrics_node.exact_neighbours)


@dataclass(frozen=True)
class Neighbours:
    """The k nearest neighbours of every image, and how they were found."""

    indices: np.ndarray  # (N, k) rows, nearest first
    distances: np.ndarray  # (N, k) in metrics.distance
    method: str  # "exact", "hnsw" (faiss) or "pynndescent" (a UMAP run's)
    recall: np.ndarray | None = None  # (Q,) per sampled query: share of its exact k nearest found
    distance_error: np.ndarray | None = None  # (Q,) relative excess of its mean distance (outlier score)


def search_for(reducer_node) -> str:
    """The approximate search a run uses, from its config alone (so a config gives the same
    neighbours whatever ran before it in the process): ``pynndescent`` for a UMAP run, whose own
    graph compiles pynndescent's NN-descent in the process (its search is then the cheaper one),
    ``hnsw`` (faiss, nothing to compile) for every other reducer."""
    return "pynndescent" if str(reducer_node.get("_target_", "")).startswith("umap.") else "hnsw"


def every_nearest(space: np.ndarray, k: int, distance: str, exact_up_to: int | None,
                  seed: int = 0, search: str = "hnsw") -> Neighbours:
    """The k nearest neighbours of every row of ``space`` (``metrics.embedding_space``: unit rows for
    cosine), exact when there are at most ``exact_up_to`` rows (None: always), else from
    an approximate graph (``search``: ``hnsw`` or ``pynndescent``, see :func:`_approximate` and
    :func:`search_for`) with its recall measured on :data:`RECALL_QUERIES` seeded rows. Distances
    are in ``distance`` (cosine: ``|a - b|^2 / 2`` of the unit rows, which is 1 - cosine)."""
    def as_distance(euclidean: np.ndarray) -> np.ndarray:
        return euclidean**2 / 2 if distance == "cosine" else euclidean

    n = len(space)
    if exact_up_to is None or n <= exact_up_to:
        indices, euclidean = nearest(space, k, metric="euclidean")
        return Neighbours(indices, as_distance(euclidean), "exact")
    indices, euclidean, method = _approximate(space, k, seed, search)
    queries = np.sort(np.random.default_rng(seed).choice(n, min(RECALL_QUERIES, n), replace=False))
    log.info("measuring the index's recall: exact neighbours of %d sampled images", len(queries))
    exact, exact_euclidean = nearest(space, k, queries, metric="euclidean")
    recall = (indices[queries][:, :, None] == exact[:, None, :]).any(axis=2).mean(axis=1)
    found, true = as_distance(euclidean[queries]).mean(axis=1), as_distance(exact_euclidean).mean(axis=1)
    error = np.where(true > 0, (found - true) / np.where(true > 0, true, 1), 0.0)
    return Neighbours(indices, as_distance(euclidean), method, recall, error)


def faiss_module():
    """faiss, imported after scikit-learn's thread-pool controller exists.

    faiss's wheel brings its own OpenBLAS built on OpenMP, whose thread count is OpenMP's. scikit-learn's
    exact search (``kneighbors``) limits every BLAS it knows to one thread while it counts the OpenMP
    threads it may use; once it knows faiss's, that limit is OpenMP's too, and every exact search after
    faiss's import ran on one core (measured: 1,000 queries among 100,000 images, 4.2 s on one of two
    cores). scikit-learn makes its controller of the loaded libraries once, at first use: made before
    faiss loads, it leaves faiss's OpenBLAS alone, which scikit-learn's search never calls.
    """
    try:  # a private helper of scikit-learn's; without it, the import alone (slower, still right)
        from sklearn.utils.parallel import _get_threadpool_controller
    except ImportError:
        pass
    else:
        _get_threadpool_controller()
    # faiss's loader logs at INFO each SIMD build it tries and cannot find (this wheel has one build that
    # picks its instructions at run time): eight lines of "Could not load library" in a healthy run's log.
    loader = logging.getLogger("faiss.loader")
    if loader.level == logging.NOTSET:  # a level the user set stays
        loader.setLevel(logging.WARNING)
    import faiss

    return faiss


# faiss's HNSW graph: links per image, candidates kept while building, candidates while searching.
HNSW_LINKS, HNSW_BUILD, HNSW_SEARCH = 16, 80, 64


def _hnsw(space: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, euclidean distances), each (N, k): every row's k nearest other rows in faiss's HNSW
    graph of all rows (``IndexHNSWFlat``: :data:`HNSW_LINKS` links a row, built with
    :data:`HNSW_BUILD` candidates, searched with :data:`HNSW_SEARCH` for k + 1 from the row itself, the
    row then dropped).

    faiss draws each row's level in the graph from a fixed seed. Its maintainers do not promise that
    a multithreaded build is the same every time; here repeated builds of 20,000 and 40,000 rows
    gave the same neighbours.
    """
    faiss = faiss_module()
    n = len(space)
    log.info("approximate neighbours of %d images (faiss HNSW, %d links, search breadth %d)", n, HNSW_LINKS,
             HNSW_SEARCH)
    points = np.ascontiguousarray(space, dtype=np.float32)
    index = _hnsw_graph(points, k)
    # Each row's search starts at the row itself in the graph's bottom level (faiss's
    # search_level_0), not from the top: every query is a row of the graph, so the descent through
    # the upper levels would only find the way back to it.
    wanted = min(n, k + 1)
    entry, entry_distance = np.arange(n, dtype=np.int32)[:, None], np.zeros((n, 1), dtype=np.float32)
    found, indices = np.empty((n, wanted), dtype=np.float32), np.empty((n, wanted), dtype=np.int64)
    index.search_level_0(n, faiss.swig_ptr(points), wanted, faiss.swig_ptr(entry), faiss.swig_ptr(entry_distance),
                         faiss.swig_ptr(found), faiss.swig_ptr(indices))  # (N, k + 1), nearest first
    return _own_removed(points, indices, k)


def _hnsw_graph(points: np.ndarray, k: int):
    """faiss's HNSW graph of ``points`` (N, D) float32 with latentmap's settings (:data:`HNSW_LINKS`,
    :data:`HNSW_BUILD`), ready to search for k + 1 with :data:`HNSW_SEARCH` candidates."""
    faiss = faiss_module()
    index = faiss.IndexHNSWFlat(points.shape[1], HNSW_LINKS)
    index.hnsw.efConstruction = HNSW_BUILD
    index.add(points)
    index.hnsw.efSearch = max(HNSW_SEARCH, k + 1)
    return index


def _own_removed(space: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, euclidean distances), each (N, k), from candidate lists (N, c) that usually hold the
    row itself (and -1 for none): the row and the gaps dropped, the distances recomputed as the
    exact search computes them, nearest first; a row left with fewer than k is searched exactly."""
    n = len(space)
    points = np.ascontiguousarray(space, dtype=np.float32)
    keep = (indices != np.arange(n)[:, None]) & (indices >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    indices = np.take_along_axis(indices, order, 1)
    distances = np.empty(indices.shape, dtype=np.float64)

    def measure(rows: slice) -> None:  # numpy's gathers and reductions release the GIL
        distances[rows] = np.linalg.norm(points[np.maximum(indices[rows], 0)] - points[rows, None, :], axis=2)

    # Blocks of rows on every core (up to 8), 8,192 rows' differences held at once in all, as in one
    # block before (a 100,000 x 768 search's 11 candidates: 3.3 s on one core, 1.8 s on two, the
    # same distances).
    workers = min(usable_cores(), 8)
    step = 8192 // workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(measure, [slice(start, min(start + step, n)) for start in range(0, n, step)]))
    distances = np.where(np.take_along_axis(keep, order, 1), distances, np.inf)
    resorted = np.argsort(distances, axis=1, kind="stable")
    indices, distances = np.take_along_axis(indices, resorted, 1), np.take_along_axis(distances, resorted, 1)
    short = np.flatnonzero(np.isinf(distances).any(axis=1))  # rare: fewer than k found; search those exactly
    if len(short):
        indices[short], distances[short] = nearest(space, k, short, metric="euclidean")
    return indices.astype(np.int64), distances.astype(np.float32)


def _approximate(space: np.ndarray, k: int, seed: int, search: str = "hnsw") -> tuple[np.ndarray, np.ndarray, str]:
    """(indices, euclidean distances, method), each (N, k): every row's k nearest other rows, from
    faiss's HNSW graph, which compiles nothing, or with ``search="pynndescent"`` (a UMAP run, which
    has compiled it for its own graph: :func:`search_for`) from pynndescent's NN-descent graph.

    Chosen by a side-by-side bench (``python scripts/bench_search.py``; its figures, machine and date
    are in docs/performance.md): pynndescent's NN-descent recompiles in every process (numba cannot
    cache it) and more in a machine's first, while its search, once compiled, is the cheaper one on
    noise-like images, the hard case, at a little less recall. HNSW spares a PCA or t-SNE run the
    compile and is about ten times faster on real images. hnswlib, usearch, voyager and faiss's IVF
    were slower on the hard set or recalled less; HNSW over 8-bit or half-float rows was no faster.
    """
    if search not in ("hnsw", "pynndescent"):
        raise ValueError(f"search={search!r}: use 'hnsw' or 'pynndescent'")
    if search == "pynndescent":
        indices, distances = _nn_descent(space, k, seed)
        return indices, distances, "pynndescent"
    indices, distances = _hnsw(space, k)
    return indices, distances, "hnsw"


def _nn_descent(space: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """pynndescent's nearest-neighbour graph, built with 3k + 1 neighbours a point and cut to the k
    nearest other than the point. On noise-like pixels of 100,000 images (the hard case) recall at
    k = 10 was 0.18 with k + 1 candidates, 0.39 with 2k + 1 and 0.55 with 3k + 1, which took about
    1.6 times as long as 2k + 1."""
    from pynndescent import NNDescent

    from latentmap import jit

    jit.enable()  # pynndescent's numba code from the disk cache (latentmap.jit)
    n = len(space)
    log.info("approximate neighbours of %d images (pynndescent, as UMAP's graph, %d candidates a point)", n,
             min(n - 1, 3 * k + 1))
    index = NNDescent(np.ascontiguousarray(space, dtype=np.float32), metric="euclidean",
                      n_neighbors=min(n - 1, 3 * k + 1), random_state=seed, low_memory=True, compressed=True,
                      verbose=False)
    indices, distances = index.neighbor_graph  # (N, 3k + 1), nearest first, usually the point itself first
    return _own_removed(space, indices, k)


def outlier_scores(indices: np.ndarray, distances: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per image: ``outlier_score`` (mean distance to its k nearest neighbours) and, when
    labelled, ``neighbour_disagreement`` (share of those neighbours with another label)."""
    scores = {"outlier_score": distances.mean(axis=1).astype(np.float32)}
    if labels is not None:
        scores["neighbour_disagreement"] = (labels[indices] != labels[:, None]).mean(axis=1).astype(np.float32)
    return scores

