"""Reducers: settings, the per-estimator constraints table, the PCA step and fit-on-a-sample."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from sklearn.decomposition import PCA

from latentmap import reduce
from latentmap.data import balanced_order
from latentmap.errors import ConfigError

from helpers import CONF, compose


def _reducer(name: str, *overrides: str) -> reduce.Reducer:
    return reduce.build(compose([f"reducer={name}", *overrides], "/tmp").reducer)


def test_settings_take_out_pca_dims_and_fit_sample_and_keep_every_override():
    reducer = _reducer("tsne", "reducer.perplexity=5", "reducer.pca_dims=50", "reducer.fit_sample=1000")
    assert reducer.estimator.perplexity == 5 and reducer.pca_dims == 50 and reducer.fit_sample == 1000
    assert reducer.target == "sklearn.manifold.TSNE" and "pca_dims" not in reducer.estimator.get_params()


def test_every_shipped_reducer_has_a_row_in_the_constraints_table():
    """A new reducer YAML must say its limits (an empty row is a statement too)."""
    from omegaconf import OmegaConf

    targets = {OmegaConf.load(path)._target_ for path in (CONF / "reducer").glob("*.yaml")}
    assert targets <= set(reduce.CONSTRAINTS), targets - set(reduce.CONSTRAINTS)


@pytest.mark.parametrize("name,overrides,n,message", [
    ("tsne", ["reducer.perplexity=40"], 32,
     r"reducer.perplexity=40 is too large for N=32 images: t-SNE needs perplexity < N"),
    ("opentsne", [], 32,
     r"reducer.perplexity=30 is too large for N=32 images: openTSNE needs perplexity < \(N - 1\) / 3"),
    ("umap", ["reducer.n_neighbors=32"], 32, "reducer.n_neighbors=32 is too large for N=32 images: UMAP needs"),
    ("pca", ["reducer.n_components=3"], 32, r"reducer.n_components=3 must be an integer equal to 2"),
    ("tsne", ["reducer.perplexity=abc"], 32, "reducer.perplexity='abc' must be a positive number"),
    ("umap", ["reducer.n_neighbors=abc"], 32, "reducer.n_neighbors='abc' must be a positive number"),
    ("opentsne", ["reducer.perplexity=-5"], 32, "reducer.perplexity=-5 must be a positive number"),
    ("umap", ["reducer.n_neighbors=0"], 32, "reducer.n_neighbors=0 must be a positive number"),
    # each a traceback from the library (numba's TypingError, curve_fit's RuntimeError, scipy's eigh)
    ("umap", ["reducer.n_neighbors=15.5"], 32, r"^reducer.n_neighbors=15.5 must be a whole number"),
    ("umap", ["reducer.min_dist=nan"], 32, r"^reducer.min_dist=nan is not a finite number"),
    ("tsne", ["reducer.perplexity=inf"], 32, r"^reducer.perplexity=inf must be a positive number"),
    ("umap", ["reducer.n_neighbors=2"], 3, r"^N=3 images are too few for UMAP: use at least 4$"),
    ("umap", ["reducer.n_neighbors=2", "reducer.fit_sample=3"], 100, r"^N=3 images are too few for UMAP: use at "
                                                                     r"least 4; the map is fitted on "
                                                                     r"reducer.fit_sample=3 images: or raise it"),
    # the libraries' own rules, before any work, naming the key (they failed at the fit, after the run began)
    ("tsne", ["reducer.learning_rate=-1"], 32, r"^reducer.learning_rate=-1 is refused by sklearn.manifold.TSNE: The "
                                               r"'learning_rate' parameter of TSNE must be"),
    ("tsne", ["reducer.metric=foo"], 32, r"^reducer.metric='foo' is refused by sklearn.manifold.TSNE: .*; change "
                                         r"reducer.metric, or drop it for the default$"),
    ("umap", ["reducer.min_dist=-0.1"], 32, r"^reducer.min_dist=-0.1 is refused by umap.UMAP: min_dist cannot be "
                                            r"negative; change reducer.min_dist"),
    ("umap", ["reducer.metric=foo"], 32, r"^reducer.metric='foo' is refused by umap.UMAP: metric is neither"),
    # a rule naming two keys names the one set away from its default (min_dist stays at umap's 0.1)
    ("umap", ["+reducer.spread=0.05"], 32, r"^reducer.spread=0.05 is refused by umap.UMAP: min_dist must be less"),
    ("umap", ["+reducer.n_epochs=-3"], 32, r"^reducer.n_epochs=-3 is refused by umap.UMAP: n_epochs must be"),
    ("pca", ["+reducer.svd_solver=bogus"], 32, r"^reducer.svd_solver='bogus' is refused by sklearn.decomposition.PCA"),
    ("tsne", [], reduce.SKLEARN_TSNE_MAX + 1, rf"reducer=tsne .*N={reduce.SKLEARN_TSNE_MAX + 1}.*reducer=opentsne"),
    ("tsne", ["reducer.fit_sample=1000"], 5000, "reducer.fit_sample=1000: sklearn.manifold.TSNE cannot place points"),
])
def test_constraints_refuse_in_one_line(name, overrides, n, message):
    with pytest.raises(ConfigError, match=message):
        reduce.check(_reducer(name, *overrides), n)


def test_constraints_allow_what_each_estimator_can_do():
    reduce.check(_reducer("tsne"), reduce.SKLEARN_TSNE_MAX)  # at the limit: allowed
    reduce.check(_reducer("opentsne", "reducer.fit_sample=1000"), 100_000)  # openTSNE can transform
    reduce.check(_reducer("opentsne", "reducer.perplexity=10"), 32)  # 3 * 10 < 31
    reduce.check(_reducer("umap", "reducer.n_neighbors=31"), 32)
    # fit_sample is what the estimator is fitted on: its size is what the limits see.
    reduce.check(_reducer("umap", "reducer.n_neighbors=50", "reducer.fit_sample=100"), 100_000)
    reduce.check(_reducer("umap", "reducer.n_neighbors=2"), 4)  # UMAP's least N
    with pytest.raises(ConfigError, match=r"^reducer.n_neighbors=15 is too large for N=15 images.*\)$"):
        reduce.check(_reducer("umap", "reducer.fit_sample=15"), 15)  # the sample is every image: not said
    with pytest.raises(ConfigError, match="reducer.n_neighbors=50 is too large for N=40.*fit_sample=40 images"):
        reduce.check(_reducer("umap", "reducer.n_neighbors=50", "reducer.fit_sample=40"), 100_000)


def test_an_estimator_outside_the_table_gets_the_default_constraints():
    from sklearn.manifold import Isomap

    isomap = reduce.Reducer(Isomap(n_neighbors=20, n_components=2), "sklearn.manifold.Isomap", None, None)
    assert isomap.target not in reduce.CONSTRAINTS
    reduce.check(isomap, 21)
    with pytest.raises(ConfigError, match="reducer.n_neighbors=20 is too large for N=20"):
        reduce.check(isomap, 20)


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="reducer.pca_dims=1 must be an integer >= 2"):
        _reducer("tsne", "reducer.pca_dims=1")
    with pytest.raises(ConfigError, match="reducer.fit_sample=-5"):
        _reducer("umap", "reducer.fit_sample=-5")
    with pytest.raises(ConfigError, match=r"reducer \(sklearn.manifold.TSNE\): The 'perplexity' parameter"):
        reduce.to_2d(_reducer("tsne", "reducer.perplexity=-3"), np.zeros((40, 3), np.float32))


def test_pca_dims_runs_pca_first():
    """PCA(2) after PCA(8) is PCA(2) of the data, up to each axis' sign."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 30)) * np.linspace(6, 1, 30)
    coords = reduce.to_2d(_reducer("pca", "+reducer.pca_dims=8"), points, seed=42)
    np.testing.assert_allclose(np.abs(coords), np.abs(PCA(2, random_state=42).fit_transform(points)), atol=1e-4)
    assert coords.dtype == np.float32 and coords.shape == (200, 2)


def test_fit_sample_fits_on_the_sample_and_transforms_all():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 20)) * np.linspace(5, 1, 20)
    labels = rng.integers(0, 5, 500)
    coords = reduce.to_2d(_reducer("pca", "reducer.fit_sample=100"), points, seed=42, labels=labels)
    rows = np.sort(balanced_order(labels, 500, 42)[:100])
    expected = PCA(2, random_state=42).fit(points[rows]).transform(points)
    np.testing.assert_allclose(coords, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(coords, PCA(2, random_state=42).fit_transform(points), atol=1e-3)


def test_weighted_placement_is_umaps_own_placement_bit_for_bit():
    """The vectorised first placement of UMAP's transform against umap-learn's loop: rows of 1 to 200
    weights (numpy's three summing orders), empty rows (NaN) and rows with a weight of exactly 1 (the
    fitted point's place), on float32 and float64 embeddings."""
    import scipy.sparse as sp
    from umap.umap_ import init_graph_transform

    rng = np.random.default_rng(3)
    fitted = 400
    lengths = np.concatenate([np.arange(0, 21), [64, 129, 136, 200], rng.integers(1, 16, 500)])
    rows, cols, weights = [], [], []
    for row, length in enumerate(lengths):
        rows += [row] * int(length)
        cols += list(rng.choice(fitted, size=int(length), replace=False))
        row_weights = (rng.random(int(length)) * rng.choice([1e-3, 1.0, 50.0], int(length))).astype(np.float32)
        if length > 3 and row % 7 == 0:
            row_weights[2:4] = 1.0  # two exact matches: the first stored (columns sorted) is the place
        weights += list(row_weights)
    graph = sp.csr_matrix((np.array(weights, np.float32), (rows, cols)), shape=(len(lengths), fitted))
    for dtype in (np.float32, np.float64):
        embedding = (rng.normal(size=(fitted, 2)) * 10).astype(dtype)
        ours, theirs = reduce.weighted_placement(graph, embedding), init_graph_transform(graph, embedding)
        assert ours.dtype == theirs.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)  # bit for bit, NaN rows included
    assert np.isnan(ours[0]).all() and not np.isnan(ours[1:]).any()


def test_umap_fit_sample_transform_is_umaps_own_with_blocked_searches(monkeypatch, caplog):
    """to_2d's UMAP transform (the fast placement, the searches in blocks on every core) against
    umap-learn's own transform whose index is asked block by block, in order, in this process."""
    import logging

    import umap.umap_

    from latentmap.machine import forks_by_default, usable_cores

    monkeypatch.setattr(reduce, "QUERY_BLOCK", 64)
    monkeypatch.setattr(reduce, "LAYOUT_SPLIT_MIN", 100)  # the layout in blocks too
    rng = np.random.default_rng(0)
    points = (rng.normal(size=(400, 10)) + np.repeat(np.eye(4, 10) * 6, 100, axis=0)).astype(np.float32)
    labels = np.repeat(np.arange(4), 100)
    reducer = _reducer("umap", "reducer.fit_sample=120", "+reducer.n_epochs=50",
                       "+reducer.force_approximation_algorithm=true")  # an index, as above 4,096 points
    original = umap.umap_.init_graph_transform
    with caplog.at_level(logging.INFO, logger="latentmap.reduce"):
        coords = reduce.to_2d(reducer, points, seed=0, labels=labels)
    if forks_by_default() and usable_cores() > 1:  # the blocks in worker processes, none of them lost
        assert f"7 blocks on {min(7, usable_cores())} processes" in caplog.text
        assert f"the layout of 400 points in {usable_cores()} blocks" in caplog.text
        assert "stopped" not in caplog.text
    index = reducer.estimator._knn_search_index
    assert umap.umap_.init_graph_transform is original and "query" not in vars(index)  # put back
    assert umap.umap_.optimize_layout_euclidean is umap.layouts.optimize_layout_euclidean
    asked = []

    def block_by_block(queries, k, **options):  # pynndescent's own query on each block of 64
        asked.append(len(queries))
        parts = [type(index).query(index, queries[start:start + 64], k, **options)
                 for start in range(0, len(queries), 64)]
        return tuple(np.concatenate(column) for column in zip(*parts))

    monkeypatch.setattr(index, "query", block_by_block, raising=False)
    with reduce.seeded_umap():
        expected = reducer.estimator.transform(points)  # umap-learn's transform, placement and layout
    assert asked == [400]
    np.testing.assert_array_equal(coords, expected)
    assert np.isfinite(coords).all() and coords.shape == (400, 2)


def test_blocked_layout_is_umaps_one_call_bit_for_bit(monkeypatch, caplog):
    """The transform's layout split among processes (3 here, whatever the machine), in this process
    when no worker can run them, and handed to umap-learn where it cannot be split, against
    umap-learn's one call: every new point's place bit for bit. The edges come in a shuffled order
    (each point's own kept in order), rows of 1 to 12 edges, some points without any."""
    import logging

    from umap.layouts import optimize_layout_euclidean
    from umap.umap_ import make_epochs_per_sample

    from latentmap.machine import forks_by_default

    rng = np.random.default_rng(5)
    new, fitted, epochs = 700, 150, 30
    tail_embedding = (rng.normal(size=(fitted, 2)) * 5).astype(np.float32)
    degree = rng.integers(0, 13, new)
    head = np.repeat(np.arange(new), degree).astype(np.int32)
    tail = rng.integers(0, fitted, len(head)).astype(np.int32)
    order = np.argsort(rng.random(len(head)), kind="stable")  # shuffled: blocks keep each point's order
    head, tail = head[order], tail[order]
    epochs_per_sample = make_epochs_per_sample(rng.random(len(head)).astype(np.float32), epochs)
    start = (rng.normal(size=(new, 2)) * 5).astype(np.float32)
    arguments = (tail_embedding, head, tail, epochs, fitted, epochs_per_sample, 1.58, 0.9,
                 np.array([3, 5, 7], dtype=np.int64), 1.0, 0.25, 5.0, False)
    expected = optimize_layout_euclidean(start.copy(), *arguments)
    monkeypatch.setattr(reduce, "LAYOUT_SPLIT_MIN", 100)
    monkeypatch.setattr("latentmap.machine.usable_cores", lambda: 3)
    with caplog.at_level(logging.INFO, logger="latentmap.reduce"):
        points = start.copy()
        found = reduce.blocked_layout(optimize_layout_euclidean, points, *arguments)
    assert found is points  # in place, as umap-learn's
    np.testing.assert_array_equal(found, expected)
    assert not np.array_equal(found, start) and np.isfinite(found).all()
    if forks_by_default():
        assert "the layout of 700 points in 3 blocks on 3 processes" in caplog.text
    monkeypatch.setattr(reduce, "_on_forked_workers", lambda *args, **kwargs: None)  # a worker stopped
    np.testing.assert_array_equal(reduce.blocked_layout(optimize_layout_euclidean, start.copy(), *arguments), expected)
    calls = []

    @functools.wraps(optimize_layout_euclidean)
    def counted(*args, **kwargs):
        calls.append(len(args[0]) if args else len(kwargs["head_embedding"]))
        return optimize_layout_euclidean(*args, **kwargs)

    moving = (tail_embedding.copy(), *arguments[1:])  # the fitted points move too (in place): a copy each
    moved = reduce.blocked_layout(counted, start.copy(), *moving, move_other=True)
    assert calls == [700]  # one call, umap-learn's own
    theirs = optimize_layout_euclidean(start.copy(), tail_embedding.copy(), *arguments[1:], move_other=True)
    np.testing.assert_array_equal(moved, theirs)
    assert not np.array_equal(moving[0], tail_embedding)  # they moved: umap-learn's move_other layout ran
    monkeypatch.setattr(reduce, "LAYOUT_SPLIT_MIN", 1000)
    reduce.blocked_layout(counted, start.copy(), *arguments)
    assert calls == [700, 700]  # below LAYOUT_SPLIT_MIN: one call


def test_blocked_query_in_processes_equals_the_blocks_one_after_another(monkeypatch, caplog):
    import logging

    from pynndescent import NNDescent

    from latentmap.machine import forks_by_default, usable_cores

    rng = np.random.default_rng(1)
    fitted, queries = rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(700, 16)).astype(np.float32)
    index = NNDescent(fitted, n_neighbors=15, random_state=0)
    monkeypatch.setattr(reduce, "QUERY_BLOCK", 100)
    blocks = [index.query(queries[start:start + 100], 10, epsilon=0.12) for start in range(0, 700, 100)]
    expected = tuple(np.concatenate(column) for column in zip(*blocks))
    with caplog.at_level(logging.INFO, logger="latentmap.reduce"):
        found = reduce.blocked_query(index.query, queries, 10, epsilon=0.12)
    for ours, theirs in zip(found, expected):
        np.testing.assert_array_equal(ours, theirs)
    if forks_by_default() and usable_cores() > 1:  # on every core: one process a core
        assert f"7 blocks on {min(7, usable_cores())} processes" in caplog.text
    monkeypatch.setattr("latentmap.machine.forks_by_default", lambda: False)  # spawn: in this process
    np.testing.assert_array_equal(reduce.blocked_query(index.query, queries, 10, epsilon=0.12)[0], expected[0])
    indices = reduce.blocked_query(index.query, queries, 10, epsilon=0.12, return_distances=False)
    np.testing.assert_array_equal(indices, expected[0])
    one = reduce.blocked_query(index.query, queries[:100], 10, epsilon=0.12)  # one block: one call
    np.testing.assert_array_equal(one[1], blocks[0][1])
    # the neighbours are the nearest: the distances pynndescent returns are the exact ones, ascending
    exact = np.linalg.norm(queries[:, None] - fitted[expected[0]], axis=-1)
    np.testing.assert_allclose(expected[1], exact, rtol=1e-5)
    assert (np.diff(expected[1], axis=1) >= 0).all()


def test_compiled_umap_distances_are_scikit_learns_bit_for_bit():
    """umap-learn's small-data distance matrix (scikit-learn's ``pairwise_distances`` calling umap-learn's
    numba distance once a pair) against the compiled loops: euclidean and cosine, float32 and float64,
    one array and two, with duplicate rows, a zero row and 1 to 1,280 dimensions."""
    from sklearn.metrics import pairwise_distances
    from umap import distances

    from latentmap import umap_pairwise

    compiled = umap_pairwise.compiled(pairwise_distances)
    rng = np.random.default_rng(5)
    for metric in (distances.euclidean, distances.cosine):
        for n, dim in ((40, 1), (150, 37), (90, 1280)):
            for dtype in (np.float32, np.float64):
                points = rng.normal(size=(n, dim)).astype(dtype)
                points[7], points[9] = points[3], 0.0
                other = rng.normal(size=(25, dim)).astype(dtype)
                for ours, theirs in ((compiled(points, metric=metric), pairwise_distances(points, metric=metric)),
                                     (compiled(points, other, metric=metric),
                                      pairwise_distances(points, other, metric=metric))):
                    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
                    np.testing.assert_array_equal(ours, theirs)
    assert set(umap_pairwise.KERNELS) == {distances.euclidean, distances.cosine}


def test_compiled_umap_distances_leave_everything_else_to_scikit_learn():
    """Another distance, keyword arguments, NaN, mixed dtypes or a sparse matrix: scikit-learn's own call."""
    import scipy.sparse as sp
    from umap import distances

    from latentmap import umap_pairwise

    calls = []

    def original(X, Y=None, metric="euclidean", **kwds):
        calls.append((metric, kwds))
        return "scikit-learn's"

    compiled = umap_pairwise.compiled(original)
    points = np.ones((4, 3), dtype=np.float32)
    nan = points.copy()
    nan[0, 0] = np.nan
    cases = [((points,), {"metric": distances.manhattan}), ((points,), {"metric": "euclidean"}),
             ((points,), {"metric": distances.minkowski, "p": 3}),
             ((points,), {"metric": distances.euclidean, "w": 1}), ((nan,), {"metric": distances.euclidean}),
             ((points, points.astype(np.float64)), {"metric": distances.euclidean}),
             ((sp.csr_matrix(points),), {"metric": distances.euclidean}),
             # strided rows (fastmath may sum them in another order), and empty input (scikit-learn raises)
             ((np.asfortranarray(points),), {"metric": distances.euclidean}),
             ((points[:, ::2],), {"metric": distances.euclidean}),
             ((points[:0],), {"metric": distances.euclidean}), ((points, points[:0]), {"metric": distances.cosine})]
    for args, kwds in cases:
        assert compiled(*args, **kwds) == "scikit-learn's"
    assert len(calls) == len(cases)
    assert compiled(points, metric=distances.euclidean).shape == (4, 4) and len(calls) == len(cases)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_umap_fit_and_transform_with_compiled_distances_are_umaps_own(metric):
    """A small-data UMAP fit (below 4,096 points it measures every distance) and transform through
    ``to_2d`` and ``place`` equal umap-learn's own calls to the bit, and the module is left as it was."""
    import umap
    import umap.umap_ as module

    original = module.pairwise_distances
    rng = np.random.default_rng(7)
    points = (rng.normal(size=(150, 24)) + 2 * rng.normal(size=(3, 24))[rng.integers(0, 3, 150)]).astype(np.float32)
    reducer = _reducer("umap", "reducer.n_neighbors=10", f"reducer.metric={metric}", "reducer_seed=4")
    ours = reduce.to_2d(reducer, points, seed=4)
    placed = reducer.place(points[:20] + 0.01)
    assert module.pairwise_distances is original
    with pytest.raises(RuntimeError), reduce.compiled_umap_distances("umap.UMAP"):  # restored after an error too
        with reduce.compiled_umap_distances("umap.UMAP"):  # nested: the wrapper is not wrapped again
            assert module.pairwise_distances.compiled_by_latentmap
            assert module.pairwise_distances.__closure__[0].cell_contents is original
        raise RuntimeError
    assert module.pairwise_distances is original
    with reduce.seeded_umap():
        estimator = umap.UMAP(n_neighbors=10, metric=metric, random_state=4, n_jobs=1)
        theirs = estimator.fit_transform(points)
        theirs_placed = estimator.transform(points[:20] + 0.01)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(placed, theirs_placed)


def test_seeded_umap_fits_side_by_side_are_the_maps_one_after_another(monkeypatch):
    """Seeded UMAP fits in threads (to_2d_each, as a run refits its map on the half-samples) give
    each map bit for bit as one after another does, and as umap-learn's own fit; they ran in the
    threads, with the epoch function that lets go of the GIL; umap-learn's layout and distances and
    the warnings filters are as they were afterwards, after an error in one fit and after the
    caller stopped reading early too."""
    import warnings

    import umap
    import umap.layouts as layouts
    import umap.umap_ as module

    import latentmap.machine
    from latentmap import jit

    monkeypatch.setattr(latentmap.machine, "usable_cores", lambda: 2)
    rng = np.random.default_rng(11)
    points = (rng.normal(size=(240, 16)) + 3 * rng.normal(size=(4, 16))[rng.integers(0, 4, 240)]).astype(np.float32)
    node = compose(["reducer=umap", "reducer.n_neighbors=8", "reducer_seed=5"], "/tmp").reducer
    subsets = [np.sort(np.random.default_rng(b).choice(240, 150, replace=False)) for b in range(8)]

    def data(i: int) -> tuple[np.ndarray, int, None]:
        return points[subsets[i]], 5 + i, None

    def build(i: int) -> reduce.Reducer:
        return reduce.build(node, i)

    epoch, distances = layouts._nb_optimize_layout_euclidean_single_epoch, module.pairwise_distances
    alone = list(reduce.to_2d_each(build, 4, data, 150, threads=1))
    filters = list(warnings.filters)  # after numba's cache was first turned on (it hides a warning of its own)
    started, original = [], reduce.to_2d

    def to_2d(*args, in_thread=False, **kwargs):
        started.append(in_thread)
        return original(*args, in_thread=in_thread, **kwargs)

    monkeypatch.setattr(reduce, "to_2d", to_2d)
    threaded = list(reduce.to_2d_each(build, 4, data, 150))
    assert started == [True] * 4, "the fits ran one after another: numba's threading layer is " + str(
        reduce.threading_layer())
    for a, b in zip(alone, threaded, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in alone}) == 4  # four different fits, not one map four times
    with reduce.seeded_umap():
        theirs = umap.UMAP(n_neighbors=8, random_state=5 + 2, n_jobs=1).fit_transform(points[subsets[2]])
    np.testing.assert_array_equal(threaded[2], theirs)
    released = jit.releasing_gil(epoch)
    assert released.signatures, "the copy that lets go of the GIL was never compiled: the layout did not use it"
    assert released.targetoptions["nogil"] and released.py_func.__qualname__.endswith("_nogil")  # its own cache files
    assert jit.releasing_gil(epoch) is released and jit.releasing_gil(released) is released

    def broken(i: int) -> tuple[np.ndarray, int, None]:
        if i == 2:
            raise RuntimeError("a half-sample that cannot be read")
        return data(i)

    with pytest.raises(RuntimeError, match="cannot be read"):
        list(reduce.to_2d_each(build, 4, broken, 150))
    assert layouts._nb_optimize_layout_euclidean_single_epoch is epoch and module.pairwise_distances is distances
    assert warnings.filters == filters
    before = len(started)
    fits = reduce.to_2d_each(build, 8, data, 150)
    np.testing.assert_array_equal(next(fits), alone[0])
    assert layouts._nb_optimize_layout_euclidean_single_epoch is released  # while the fits run
    fits.close()  # the caller stops early (an error of its own, Ctrl-C): the fits not started never start
    assert len(started) - before <= 4  # at most two a thread were handed out
    assert layouts._nb_optimize_layout_euclidean_single_epoch is epoch and module.pairwise_distances is distances
    assert warnings.filters == filters


def test_only_seeded_umap_fits_on_all_their_points_run_side_by_side(monkeypatch):
    """side_by_side: one thread a usable core for small seeded UMAP fits of all their points under a
    threading layer safe in two threads; one after another for PCA, t-SNE, an unseeded UMAP (on every
    core already), densMAP, a fit on a sample, a PCA step, fits of 4,096 points or more (pynndescent's
    graph, which holds the GIL), a single fit, numba's workqueue layer or none, and one core."""
    import latentmap.machine

    monkeypatch.setattr(latentmap.machine, "usable_cores", lambda: 4)
    monkeypatch.setattr(reduce, "threading_layer", lambda: "omp")
    two = lambda name, *overrides: [_reducer(name, *overrides), _reducer(name, *overrides)]  # noqa: E731
    assert reduce.side_by_side(two("umap"), 1000) == 4
    assert reduce.side_by_side(two("umap")[:1], 1000) == 1
    assert reduce.side_by_side(two("umap"), reduce.SIDE_BY_SIDE_BELOW) == 1
    for layer in ("workqueue", None):  # numba's own layer aborts on concurrent use; none: unknown
        monkeypatch.setattr(reduce, "threading_layer", lambda layer=layer: layer)
        assert reduce.side_by_side(two("umap"), 1000) == 1, layer
    monkeypatch.setattr(reduce, "threading_layer", lambda: "tbb")
    assert reduce.side_by_side(two("umap"), 1000) == 4
    for name, overrides in [("pca", ()), ("tsne", ()), ("opentsne", ()), ("umap", ("reducer.random_state=null",)),
                            ("umap", ("+reducer.densmap=true",)), ("umap", ("reducer.fit_sample=100",)),
                            ("umap", ("reducer.pca_dims=8",))]:
        assert reduce.side_by_side(two(name, *overrides), 1000) == 1, (name, overrides)
    monkeypatch.setattr(latentmap.machine, "usable_cores", lambda: 1)
    assert reduce.side_by_side(two("umap"), 1000) == 1


def test_repeated_umap_fits_are_each_its_own_seeded_fit_side_by_side(monkeypatch):
    """reducer.repeats: fit r of a UMAP is the one seeded with random_state + r, bit for bit, whether
    the fits ran one after another or side by side (they did), and the first (the plotted one, which
    places new points) is the returned reducer's."""
    import latentmap.machine

    rng = np.random.default_rng(3)
    points = (rng.normal(size=(160, 12)) + 3 * rng.normal(size=(3, 12))[rng.integers(0, 3, 160)]).astype(np.float32)
    node = compose(["reducer=umap", "reducer.n_neighbors=8", "reducer.repeats=3"], "/tmp").reducer
    alone = [reduce.to_2d(reduce.build(node, fit), points, 9 + fit) for fit in range(3)]
    monkeypatch.setattr(latentmap.machine, "usable_cores", lambda: 2)
    started, original = [], reduce.to_2d

    def to_2d(*args, in_thread=False, **kwargs):
        started.append(in_thread)
        return original(*args, in_thread=in_thread, **kwargs)

    monkeypatch.setattr(reduce, "to_2d", to_2d)
    found, first = reduce.fitted_maps(node, points, 9)
    assert started == [True, True, True]
    for a, b in zip(alone, found, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.estimator.embedding_, found[0])
