"""latentmap.neighbours: the exact search against a scipy reference, the approximate searches'
measured recall, the search a config chooses, and the outlier scores."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import neighbours

from helpers import ROOT, cosine_knn


def test_nearest_and_outlier_scores_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(120, 16)).astype(np.float32)
    labels = rng.integers(0, 3, 120)
    indices, distances = neighbours.nearest(points, 5)
    ref_indices, ref_distances = cosine_knn(points.astype(np.float64), 5)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(distances, ref_distances, atol=1e-5)
    queries = np.array([3, 50, 7])
    q_indices, q_distances = neighbours.nearest(points, 5, queries)
    np.testing.assert_array_equal(q_indices, ref_indices[queries])
    np.testing.assert_allclose(q_distances, ref_distances[queries], atol=1e-5)
    scores = neighbours.outlier_scores(indices, distances, labels)
    np.testing.assert_allclose(scores["outlier_score"], ref_distances.mean(axis=1), atol=1e-5)
    expected_share = np.array([np.mean(labels[ref_indices[i]] != labels[i]) for i in range(120)])
    np.testing.assert_allclose(scores["neighbour_disagreement"], expected_share)


def test_the_search_follows_the_config_not_the_process():
    """A UMAP run's neighbours come from pynndescent (UMAP's graph compiles it), every other
    reducer's from HNSW, whatever ran before in the process (a sweep's jobs share one)."""
    from omegaconf import OmegaConf

    for reducer, expected in (("umap.UMAP", "pynndescent"), ("sklearn.decomposition.PCA", "hnsw"),
                              ("openTSNE.sklearn.TSNE", "hnsw"), ("sklearn.manifold.TSNE", "hnsw")):
        assert neighbours.search_for(OmegaConf.create({"_target_": reducer})) == expected
    for name in ("umap", "pca", "tsne", "opentsne"):  # the shipped reducer configs
        node = OmegaConf.load(ROOT / "conf" / "reducer" / f"{name}.yaml")
        assert neighbours.search_for(node) == ("pynndescent" if name == "umap" else "hnsw")


_THREADS_UNDER_SKLEARN_LIMIT = """
import sys
import numpy as np
from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
free = _openmp_effective_n_threads()
if sys.argv[1] == "bare":
    import faiss
else:  # the run's way: an approximate search of every image, then scikit-learn's exact search
    from latentmap import neighbours
    space = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    assert neighbours.every_nearest(space, 5, "euclidean", exact_up_to=100).method == "hnsw"
from sklearn.utils.parallel import _get_threadpool_controller
# What kneighbors does: limit every BLAS to one thread, then count the OpenMP threads it may use.
with _get_threadpool_controller().limit(limits=1, user_api="blas"):
    print(free, _openmp_effective_n_threads())
"""


def test_scikit_learns_exact_search_keeps_every_core_after_faiss():
    """faiss's OpenBLAS is built on OpenMP: imported plainly, scikit-learn's one-thread BLAS limit
    in kneighbors becomes OpenMP's, and its search runs on one core. Through
    ``neighbours.faiss_module`` (the approximate search's import) it keeps every core. In a fresh
    process with the machine's own thread counts (the suite's workers share the cores out)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}

    def threads(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _THREADS_UNDER_SKLEARN_LIMIT, mode], env=env, check=True,
                             capture_output=True, text=True).stdout
        free, limited = map(int, out.split()[-2:])
        return free, limited

    free, bare = threads("bare")
    if free < 2:
        pytest.skip(f"{free} core: no thread to lose")
    if bare == free:  # faiss's BLAS here is not an OpenMP OpenBLAS (another platform's or a later wheel)
        pytest.skip("this faiss leaves scikit-learn's threads alone: nothing to guard against")
    assert bare == 1
    assert threads("run") == (free, free)


def _structured(n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """(points, unit rows) of 6 clusters in 16 dimensions."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 4
    points = (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 16))).astype(np.float32)
    return points, points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("search", ["hnsw", "pynndescent"])
def test_every_nearest_is_exact_up_to_the_limit_and_measures_its_recall_above(search):
    """Below metrics.exact_neighbours: the brute-force reference. Above: faiss's HNSW graph, or
    pynndescent's (a UMAP run's choice), whose recall (against the same reference on the sampled
    queries) is what it reports, high on structured data."""
    points, space = _structured(1500)
    reference, ref_distances = cosine_knn(points.astype(np.float64), 8)
    exact = neighbours.every_nearest(space, 8, "cosine", exact_up_to=1500)
    assert exact.method == "exact" and exact.recall is None
    np.testing.assert_array_equal(exact.indices, reference)
    np.testing.assert_allclose(exact.distances, ref_distances, atol=1e-5)  # cosine distances, as sklearn's

    approximate = neighbours.every_nearest(space, 8, "cosine", exact_up_to=1000, seed=3, search=search)
    assert approximate.method == search
    assert len(approximate.recall) == neighbours.RECALL_QUERIES
    queries = np.sort(np.random.default_rng(3).choice(1500, neighbours.RECALL_QUERIES, replace=False))
    true_recall = [len(set(approximate.indices[q]) & set(reference[q])) / 8 for q in queries]
    np.testing.assert_allclose(approximate.recall, true_recall)
    assert approximate.recall.mean() > 0.9
    assert not (approximate.indices == np.arange(1500)[:, None]).any()  # never a point itself
    np.testing.assert_allclose(approximate.distance_error,
                               approximate.distances[queries].mean(1) / ref_distances[queries].mean(1) - 1, atol=1e-4)


def test_rows_left_short_by_the_graph_are_searched_exactly():
    """Candidate lists holding the row itself, gaps (-1) and too few others: the row and the gaps are
    dropped, the rest re-ranked by exact distance, and a row left with fewer than k is searched
    exactly (brute force), so every row gets k true others, nearest first."""
    points, _ = _structured(300)
    exact, exact_distances = neighbours.nearest(points, 4, metric="euclidean")
    candidates = np.full((300, 6), -1)
    candidates[:, 0] = np.arange(300)  # itself, first, as a graph returns it
    candidates[:, 1:6] = exact[:, [3, 2, 1, 0, 0]]  # the true four, out of order, then one more
    candidates[::7, 2:] = -1  # every 7th row: one other left, too few
    indices, distances = neighbours._own_removed(points, candidates, 4)
    full = np.arange(300) % 7 != 0
    np.testing.assert_array_equal(indices[full], exact[full])  # re-ranked: nearest first
    np.testing.assert_allclose(distances[full], exact_distances[full], rtol=1e-5)
    np.testing.assert_array_equal(indices[~full], exact[~full])  # searched exactly
    np.testing.assert_allclose(distances[~full], exact_distances[~full], rtol=1e-5)
    assert not (indices == np.arange(300)[:, None]).any() and (np.diff(distances, axis=1) >= 0).all()


def test_candidates_are_measured_in_blocks_on_every_core_as_in_one_pass():
    """_own_removed measures the candidates' distances in blocks of rows in threads: the same
    float32 distances, to the bit, as numpy's one pass over every row (each row's first k
    candidates other than itself, nearest first), in every row of several blocks."""
    rng = np.random.default_rng(4)
    n, k = 9000, 5
    points = rng.normal(size=(n, 24)).astype(np.float32)
    candidates = rng.integers(0, n, (n, 7))
    candidates[:, 0] = np.arange(n)  # itself first, as a graph returns it: the other 6 are the row's
    candidates[:, 1:] = np.where(candidates[:, 1:] == np.arange(n)[:, None], (candidates[:, 1:] + 1) % n,
                                 candidates[:, 1:])
    indices, distances = neighbours._own_removed(points, candidates, k)
    first = candidates[:, 1 : k + 1]  # the first k others, in the list's order
    whole = np.linalg.norm(points[first] - points[:, None, :], axis=2)  # (N, k): one pass
    order = np.argsort(whole, axis=1, kind="stable")
    np.testing.assert_array_equal(distances, np.take_along_axis(whole, order, 1))
    np.testing.assert_array_equal(indices, np.take_along_axis(first, order, 1))
