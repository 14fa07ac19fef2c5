"""Reducers: an estimator with ``fit_transform`` named by ``_target_``, and what latentmap adds
around it: a PCA step (``reducer.pca_dims``), fit-on-a-sample (``reducer.fit_sample``), and the
limits each estimator has, checked against the data's size before any work.

The limits live in one table, :data:`CONSTRAINTS`, keyed by ``_target_``; an estimator that is not
in it gets :data:`DEFAULT_CONSTRAINTS` (``perplexity`` and ``n_neighbors`` below N, where it has
them). Adding a reducer is one YAML file, plus a row here when it has limits of its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from latentmap import data, jit, settings
from latentmap.config import instantiate_node
from latentmap.errors import ConfigError

log = logging.getLogger(__name__)

# scikit-learn's t-SNE (exact, or Barnes-Hut in one thread) is refused above this many points.
SKLEARN_TSNE_MAX = 20_000


@dataclass
class Reducer:
    """A configured reducer: the estimator, and the steps latentmap adds around it."""

    estimator: object
    target: str  # its _target_, for messages and the constraints table
    pca_dims: int | None  # PCA to this many dimensions first (None: no PCA step)
    fit_sample: int | None  # fit on a seeded class-stratified sample of this size, transform all
    repeats: int = 1  # fits of the map, random_state + 0, 1, ...
    pca: object = None  # the fitted PCA step, once to_2d ran with pca_dims

    def place(self, points: np.ndarray) -> np.ndarray | None:
        """(P, 2) new points placed in the fitted map (the PCA step, then the estimator's
        ``transform``), or None for a reducer that cannot place new points (scikit-learn's t-SNE)."""
        if not hasattr(self.estimator, "transform"):
            return None
        points = np.asarray(points, dtype=np.float32)
        if self.pca is not None:
            points = self.pca.transform(points)
        with seeded_umap(), compiled_umap_distances(self.target), layout_releasing_gil(self.target):
            return np.asarray(self.estimator.transform(points), dtype=np.float32)


def build(node: DictConfig, fit: int = 0) -> Reducer:
    """The reducer of ``node``, with ``reducer.pca_dims``, ``reducer.fit_sample`` and
    ``reducer.repeats`` taken out; ``fit`` > 0 is the fit-th repeat (its ``random_state`` + ``fit``)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True)
    own = {key: settings.require(f"reducer.{key}", values.pop(key)) for key in ("pca_dims", "fit_sample", "repeats")}
    pca_dims, fit_sample, repeats = own["pca_dims"], own["fit_sample"], own["repeats"]
    if fit and isinstance(values.get("random_state"), int):
        values["random_state"] += fit
    estimator = instantiate_node(OmegaConf.create(values), "reducer")
    return Reducer(estimator, str(node._target_), pca_dims, fit_sample, repeats)


def maps(node: DictConfig, embeddings: np.ndarray, seed: int, labels: np.ndarray | None = None) -> list[np.ndarray]:
    """``reducer.repeats`` (N, 2) maps of ``embeddings``, fit r seeded with ``seed + r`` (the
    estimator's random_state, the PCA step and fit_sample's sample); the first is the plotted one."""
    return fitted_maps(node, embeddings, seed, labels)[0]


def fitted_maps(node: DictConfig, embeddings: np.ndarray, seed: int,
                labels: np.ndarray | None = None) -> tuple[list[np.ndarray], Reducer]:
    """(:func:`maps`, the plotted map's fitted reducer, which can :meth:`Reducer.place` new points)."""
    first = build(node)
    if first.repeats > 1:
        log.info("fitting %s %d times (reducer.repeats)", first.target, first.repeats)
    if first.pca_dims is not None and first.pca_dims >= min(embeddings.shape):
        log.info("reducer.pca_dims=%d: no PCA step, since the embeddings (%d x %d) have no more dimensions to "
                 "reduce", first.pca_dims, *embeddings.shape)
    found = list(to_2d_each(lambda fit: first if fit == 0 else build(node, fit), first.repeats,  # side by side
                            lambda fit: (embeddings, seed + fit, labels), len(embeddings)))  # where they can
    return found, first


# A constraint takes (estimator, N points it is fitted on) and raises ConfigError when N is wrong for it.
Constraint = Callable[[object, int], None]


def _sklearn_tsne_size(estimator: object, n: int) -> None:
    if n > SKLEARN_TSNE_MAX:
        raise ConfigError(
            f"reducer=tsne (scikit-learn) cannot take N={n} images: its t-SNE needs hours and "
            f"O(N^2) memory beyond {SKLEARN_TSNE_MAX}; use reducer=opentsne (FFT t-SNE; add "
            f"reducer.fit_sample={SKLEARN_TSNE_MAX} to fit on a sample and place the rest), or "
            f"dataset.limit={SKLEARN_TSNE_MAX}"
        )


def _perplexity_below_n(estimator: object, n: int) -> None:
    perplexity = getattr(estimator, "perplexity", None)
    if perplexity is not None and perplexity >= n:
        raise ConfigError(
            f"reducer.perplexity={perplexity} is too large for N={n} images: t-SNE needs "
            f"perplexity < N (try reducer.perplexity={max(1, n // 4)})"
        )


def _perplexity_below_a_third(estimator: object, n: int) -> None:
    perplexity = getattr(estimator, "perplexity", None)
    if perplexity is not None and 3 * perplexity >= n - 1:
        raise ConfigError(
            f"reducer.perplexity={perplexity} is too large for N={n} images: openTSNE needs "
            f"perplexity < (N - 1) / 3 (try reducer.perplexity={max(1, (n - 1) // 4)})"
        )


def _neighbours_below_n(estimator: object, n: int) -> None:
    n_neighbors = getattr(estimator, "n_neighbors", None)
    if n_neighbors is not None and n_neighbors >= n:
        raise ConfigError(
            f"reducer.n_neighbors={n_neighbors} is too large for N={n} images: UMAP needs "
            f"n_neighbors < N (try reducer.n_neighbors={max(2, min(15, n // 4))})"
        )


def _umap_size(estimator: object, n: int) -> None:
    if n < 4:  # its spectral start needs N > 3 (scipy's eigh failed on 3)
        raise ConfigError(f"N={n} images are too few for UMAP: use at least 4")


CONSTRAINTS: dict[str, tuple[Constraint, ...]] = {
    "sklearn.decomposition.PCA": (),
    "sklearn.manifold.TSNE": (_sklearn_tsne_size, _perplexity_below_n),
    "openTSNE.sklearn.TSNE": (_perplexity_below_a_third,),
    "umap.UMAP": (_umap_size, _neighbours_below_n),
}
DEFAULT_CONSTRAINTS: tuple[Constraint, ...] = (_perplexity_below_n, _neighbours_below_n)


def check(reducer: Reducer, n_samples: int) -> None:
    """Reject settings the data cannot support (naming both numbers) and maps that are not 2-D."""
    estimator = reducer.estimator
    capped = reducer.fit_sample is not None and reducer.fit_sample < n_samples
    if capped:
        if not hasattr(estimator, "transform"):
            raise ConfigError(
                f"reducer.fit_sample={reducer.fit_sample}: {reducer.target} cannot place points it was not "
                "fitted on (no transform); use reducer=opentsne, umap or pca for fit-on-a-sample, or dataset.limit"
            )
        n_samples = reducer.fit_sample
    if hasattr(estimator, "n_components"):  # latentmap draws and scores 2-D maps
        settings.require("reducer.n_components", estimator.n_components)
    for key in ("perplexity", "n_neighbors"):
        value = getattr(estimator, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                                  or not math.isfinite(value)):
            raise ConfigError(f"reducer.{key}={value!r} must be a positive number (e.g. reducer.{key}=15)")
    if reducer.target == "umap.UMAP" and isinstance(getattr(estimator, "n_neighbors", None), float):
        raise ConfigError(f"reducer.n_neighbors={estimator.n_neighbors!r} must be a whole number: UMAP counts "
                          f"neighbours (e.g. reducer.n_neighbors=15)")  # a numba TypingError, 68 lines
    params = estimator.get_params() if hasattr(estimator, "get_params") else {}
    try:  # an estimator's own default may be infinite (a limit that is off): only what was set is checked
        defaults = type(estimator)().get_params()
    except Exception:  # noqa: BLE001 - an estimator that needs arguments: every value is checked
        defaults = {}
    for key, value in params.items():  # NaN passes every comparison the libraries make (min_dist=nan)
        if isinstance(value, float) and not math.isfinite(value) and value != defaults.get(key):
            raise ConfigError(f"reducer.{key}={value!r} is not a finite number: set a number, or drop it for "
                              "the default")
    for constraint in CONSTRAINTS.get(reducer.target, DEFAULT_CONSTRAINTS):
        try:
            constraint(estimator, n_samples)
        except ConfigError as error:
            if not capped:
                raise
            raise ConfigError(f"{error}; the map is fitted on reducer.fit_sample={reducer.fit_sample} images: "
                              "or raise it") from None
    _library_rules(reducer)


def _library_rules(reducer: Reducer) -> None:
    """The estimator's own checks of its parameters, run before any work, as one ConfigError naming
    ``reducer.<key>`` and its value: a negative ``perplexity`` or ``min_dist``, an unknown ``metric``
    used to fail at the fit, after the run had started, in the library's words without the key.
    scikit-learn's estimators check with ``_validate_params`` (what their ``fit`` calls first);
    umap-learn's with ``_validate_parameters`` on a copy (what its ``fit`` calls, given the two
    attributes ``fit`` sets before it). Both are private: where they are missing or change, the fit
    checks as before."""
    import copy

    estimator = reducer.estimator
    try:
        if reducer.target == "umap.UMAP" and hasattr(estimator, "_validate_parameters"):
            trial = copy.copy(estimator)
            trial._initial_alpha, trial._raw_data = trial.learning_rate, np.zeros((4, 2), dtype=np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial._validate_parameters()
        elif hasattr(estimator, "_validate_params"):  # scikit-learn >= 1.2 (UMAP has it too, with no rules)
            estimator._validate_params()
    except (ValueError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        params = estimator.get_params() if hasattr(estimator, "get_params") else {}
        named = re.search(r"The '(\w+)' parameter", message)  # scikit-learn's wording
        mentioned = [name for name in sorted(params, key=len, reverse=True)
                     if re.search(rf"\b{re.escape(name)}\b", message)]
        try:  # of two keys a rule names (min_dist <= spread), the one set away from its default
            defaults = type(estimator)().get_params()
            mentioned.sort(key=lambda name: params.get(name) == defaults.get(name))
        except Exception:  # noqa: BLE001 - an estimator that needs arguments: the longest name first
            pass
        key = named[1] if named else (mentioned[0] if mentioned else None)
        if key is None:
            raise ConfigError(f"reducer ({reducer.target}): {message}; check the reducer.* overrides") from None
        raise ConfigError(f"reducer.{key}={params.get(key)!r} is refused by {reducer.target}: {message}; "
                          f"change reducer.{key}, or drop it for the default") from None
    except Exception:  # noqa: BLE001 - a private check that moved: the fit checks as before
        log.debug("could not check %s's parameters before the fit", reducer.target, exc_info=True)


@contextmanager
def seeded_umap() -> Iterator[None]:
    """umap-learn warns that a ``random_state`` forces one thread, even when ``n_jobs`` is already 1:
    latentmap seeds every map on purpose (conf/reducer/umap.yaml says so), so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"n_jobs value .* overridden to 1 by setting random_state",
                                category=UserWarning)
        yield


def to_2d(reducer: Reducer, embeddings: np.ndarray, seed: int = 0, labels: np.ndarray | None = None, *,
          in_thread: bool = False) -> np.ndarray:
    """(N, 2) map of ``embeddings`` (N, D), with the optional PCA step and fit-on-a-sample; bad
    estimator settings become ConfigError. ``in_thread``: one of :func:`to_2d_each`'s fits side by
    side, whose caller set up the warnings, the compiled distances and numba's cache once for all."""
    if reducer.pca_dims is not None and reducer.pca_dims < min(embeddings.shape):
        from sklearn.decomposition import PCA

        log.info("PCA to %d dimensions before %s", reducer.pca_dims, reducer.target)
        reducer.pca = PCA(n_components=reducer.pca_dims, random_state=seed)
        embeddings = reducer.pca.fit_transform(embeddings)  # (N, pca_dims)
    estimator = reducer.estimator
    if not in_thread:
        jit.enable()  # UMAP's numba code from the disk cache, when one is set (latentmap.jit)
    try:
        with contextlib.ExitStack() as stack:
            if not in_thread:  # a thread's caller opened these once for every fit (to_2d_each)
                stack.enter_context(seeded_umap())
                stack.enter_context(layout_releasing_gil(reducer.target))
            stack.enter_context(compiled_umap_distances(reducer.target))
            if reducer.fit_sample is not None and reducer.fit_sample < len(embeddings):
                rows = np.sort(data.balanced_order(labels, len(embeddings), seed)[: reducer.fit_sample])
                log.info("fitting %s on a class-stratified sample of %d of %d points; transforming all",
                         reducer.target, len(rows), len(embeddings))
                estimator.fit(np.asarray(embeddings[rows]))
                with fast_umap_transform(reducer.target, estimator):
                    coords = estimator.transform(embeddings)  # (N, 2)
            else:
                coords = estimator.fit_transform(embeddings)  # (N, 2)
    except ValueError as error:  # invalid estimator parameters surface as ValueError at fit
        first_line = (str(error).splitlines() or ["ValueError"])[0]
        raise ConfigError(f"reducer ({reducer.target}): {first_line}") from error
    return np.asarray(coords, dtype=np.float32)


# Seeded UMAP fits of fewer points than this run side by side in threads (:func:`side_by_side`): there
# umap-learn measures every distance (latentmap's compiled loop, which lets go of the GIL) and the
# layout is most of a fit. From it on pynndescent's graph, whose numba code holds the GIL, is a large
# part, and two fits hold twice the memory: not measured side by side, so one after another.
SIDE_BY_SIDE_BELOW = 4096


def to_2d_each(build: Callable[[int], Reducer], count: int,
               data: Callable[[int], tuple[np.ndarray, int, np.ndarray | None]], points: int,
               threads: int | None = None) -> Iterator[np.ndarray]:
    """``to_2d(build(i), *data(i))`` for i in 0..count-1 (fits of at most ``points`` points), in order,
    as each is ready.

    Each reducer is built in the calling thread when its fit is about to start, and no reference to
    it is kept once its map is made: a fitted estimator keeps the data it was fitted on (30 fitted
    half-samples held at once were 30 copies of half the embeddings). ``data(i)`` runs where the fit
    runs, so rows are copied one fit at a time.

    Seeded UMAP fits (:func:`side_by_side`) run in threads, one a usable core (``threads``: at most
    that many; 1: one after another), with the same maps bit for bit (tested): a seeded UMAP runs on
    one numba thread of its own (numba's thread count is a thread's), and its layout is umap-learn's
    own epoch function compiled to let go of the GIL (:func:`layout_releasing_gil`). The warnings
    filter, the compiled distances and numba's cache are set up once, in the calling thread:
    ``catch_warnings`` is not thread-safe before Python 3.14, and the one opened here restores the
    filters after the fits, whatever scikit-learn's input checks (which open it inside each fit) left
    in them. Closed early (an error, Ctrl-C), the fits not started are cancelled, the running ones
    finish, and everything set up is undone."""
    if count <= 0:
        return
    first: Reducer | None = build(0)
    allowed = side_by_side([first] * min(count, 2), points)
    workers = min(allowed, count, threads if threads is not None else allowed)
    if workers < 2:
        for i in range(count):
            reducer, first = (first if i == 0 else build(i)), None
            coords = to_2d(reducer, *data(i))
            del reducer
            yield coords
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    jit.enable()

    def fit(reducer: Reducer, i: int) -> np.ndarray:
        return to_2d(reducer, *data(i), in_thread=True)

    target = first.target
    with seeded_umap(), compiled_umap_distances(target), layout_releasing_gil(target), \
            ThreadPoolExecutor(workers, thread_name_prefix="latentmap-map") as pool:
        waiting: deque = deque()  # in order; at most two a thread: one running, one ready to start
        try:
            for i in range(count):
                reducer, first = (first if i == 0 else build(i)), None
                waiting.append(pool.submit(fit, reducer, i))
                del reducer
                if len(waiting) >= 2 * workers:
                    yield waiting.popleft().result()
            while waiting:
                yield waiting.popleft().result()
        finally:
            for future in waiting:  # closed early: what has not started does not start
                future.cancel()


def side_by_side(reducers: list[Reducer], points: int) -> int:
    """How many of these fits (of at most ``points`` points each) :func:`to_2d_each` runs at once: the
    usable cores where every one is a seeded umap-learn UMAP (one thread each) laid out in a euclidean
    plane without densMAP, fitted on all its points without a PCA step (a fit on a sample places the
    rest in forked processes; PCA's BLAS threads are its own), of fewer than
    :data:`SIDE_BY_SIDE_BELOW` points, and numba's threading layer, which UMAP's parallel helpers use
    even on one thread, is safe to enter from two threads at once (OpenMP or TBB; numba's own
    ``workqueue``, its fallback where neither is installed, aborts the process on concurrent use);
    else 1. Other reducers keep the cores busy on their own (scikit-learn's t-SNE, openTSNE, PCA)."""
    from latentmap.machine import usable_cores

    if (len(reducers) < 2 or points >= SIDE_BY_SIDE_BELOW or usable_cores() < 2 or not _fit_alike(reducers)
            or threading_layer() not in ("omp", "tbb")):
        return 1
    return usable_cores()


def _fit_alike(reducers: list[Reducer]) -> bool:
    """Whether every one is a seeded umap-learn UMAP of a euclidean plane without densMAP, fitted on
    all its points without a PCA step (:func:`side_by_side`'s rule, but for the machine and size)."""
    for reducer in reducers:
        estimator = reducer.estimator
        if (type(estimator).__module__.split(".")[0] != "umap" or type(estimator).__name__ != "UMAP"
                or not isinstance(getattr(estimator, "random_state", None), int)
                or getattr(estimator, "output_metric", "euclidean") != "euclidean"
                or getattr(estimator, "densmap", False) or reducer.fit_sample is not None
                or reducer.pca_dims is not None):
            return False
    return True


def threading_layer() -> str | None:
    """numba's threading layer in this process (``omp``, ``tbb``, ``workqueue``), chosen now if no
    parallel function has run yet (as a UMAP fit's own parallel helpers would), or None without numba
    or where none can start."""
    try:
        import numba

        numba.get_num_threads()  # chooses the layer (numba's _launch_threads) where nothing has yet
        return str(numba.threading_layer())
    except (ImportError, ValueError, RuntimeError):  # no layer could start
        return None


@contextmanager
def layout_releasing_gil(target: str) -> Iterator[None]:
    """While open, a UMAP's seeded layout runs its epochs with numba's copy of umap-learn's epoch
    function that lets go of the GIL (:func:`latentmap.jit.releasing_gil`): the same layout, bit for
    bit, and threads laying out maps side by side each use a core. Every latentmap fit and transform
    uses it, one after another too, so both run the same compiled code, from numba's cache files of
    its own: umap-learn's serial and parallel epochs shared one cache entry (an older cache may still
    hold the parallel loop there). Other reducers, and a umap-learn without that function, run as
    they are."""
    if not target.startswith("umap."):
        yield
        return
    import umap.layouts as layouts

    name = "_nb_optimize_layout_euclidean_single_epoch"
    original = getattr(layouts, name, None)
    if original is None or not hasattr(original, "py_func"):
        yield
        return
    setattr(layouts, name, jit.releasing_gil(original))
    try:
        yield
    finally:
        setattr(layouts, name, original)


@contextmanager
def compiled_umap_distances(target: str) -> Iterator[None]:
    """While open, a UMAP fit or transform on fewer than 4,096 points measures its distances in
    compiled loops (:mod:`latentmap.umap_pairwise`: the same matrix, bit for bit) instead of one
    Python call a pair. Other reducers run as they are."""
    if not target.startswith("umap."):
        yield
        return
    import umap.umap_ as module

    from latentmap import umap_pairwise

    original = getattr(module, "pairwise_distances", None)
    if not callable(original) or getattr(original, "compiled_by_latentmap", False):  # none, or already ours
        yield
        return
    module.pairwise_distances = umap_pairwise.compiled(original)
    try:
        yield
    finally:
        module.pairwise_distances = original


# UMAP's transform asks its neighbour index about the new points in blocks of this many rows
# (:func:`blocked_query`); the blocks, not the number of processes, fix the result.
QUERY_BLOCK = 16_384


@contextmanager
def fast_umap_transform(target: str, estimator: object) -> Iterator[None]:
    """While open, a fitted UMAP estimator's ``transform`` runs faster, three of its steps replaced:

    - its first placement of the new points, umap-learn's ``init_graph_transform`` (a loop over
      sparse rows in Python), by :func:`weighted_placement`: the same array, bit for bit, in about
      1/80 of the time;
    - its neighbour index's ``query`` by :func:`blocked_query`: the same searches in blocks of
      :data:`QUERY_BLOCK` new points, on every core where processes start by fork;
    - its layout, umap-learn's ``optimize_layout_euclidean`` (one thread in a seeded run), by
      :func:`blocked_layout`: the same layout, bit for bit, the new points split among the cores.

    Other reducers, and a UMAP fitted without an index (below 4,096 points it measures every
    distance), run as they are."""
    if not target.startswith("umap."):
        yield
        return
    import umap.umap_ as module

    placement = getattr(module, "init_graph_transform", None)
    layout = getattr(module, "optimize_layout_euclidean", None)
    index = getattr(estimator, "_knn_search_index", None)
    query = getattr(index, "query", None)
    own_query = index is not None and "query" in vars(index)  # the instance's own (not the class's)
    if callable(placement):
        module.init_graph_transform = weighted_placement
    if callable(layout):
        module.optimize_layout_euclidean = functools.partial(blocked_layout, layout)
    if callable(query):
        index.query = functools.partial(blocked_query, query)
    try:
        yield
    finally:
        if callable(placement):
            module.init_graph_transform = placement
        if callable(layout):
            module.optimize_layout_euclidean = layout
        if callable(query):
            if own_query:
                index.query = query
            else:
                del index.query


_BLOCKS: dict = {}  # what the forked workers of blocked_query and blocked_layout read (_on_forked_workers)


def blocked_query(query: Callable, points, k: int, **options):
    """pynndescent's ``query(points, k, **options)`` (UMAP's transform asks it for each new point's
    k nearest fitted points) as one call per block of :data:`QUERY_BLOCK` points, the blocks in
    worker processes (one a usable core) where processes start by fork, else one after another; the
    parts joined in order. Each call searches its block alone, from the index's seed, so the result
    is the same on any number of cores. It is not bit for bit one call over all the points: a
    search draws random numbers where its trees tie or its start runs short, and one call carries
    that state from point to point (0.3% of 200,000 noise-like points got other neighbours; 0.07% of
    a million were placed elsewhere). A million unit rows' search took 230-290 s in one process here
    (docs/performance.md)."""
    n = points.shape[0]
    if n <= QUERY_BLOCK:
        return query(points, k, **options)
    starts = list(range(0, n, QUERY_BLOCK))
    workers = _fork_workers(len(starts))
    parts = None
    if workers > 1:
        log.info("UMAP transform: the neighbours of %d points in %d blocks on %d processes", n, len(starts),
                 workers)
        query(points[:1], k, **options)  # an index's first query readies its search: here, not in each worker
        parts = _on_forked_workers(_query_block, starts, workers, "searching",
                                   query=query, points=points, k=k, options=options)
    if parts is None:
        parts = [query(points[start:start + QUERY_BLOCK], k, **options) for start in starts]
    if isinstance(parts[0], tuple):  # (indices, distances)
        return tuple(np.concatenate(column) for column in zip(*parts))
    return np.concatenate(parts)  # indices alone (return_distances=False)


def _fork_workers(blocks: int) -> int:
    """Worker processes for ``blocks`` independent blocks: one a usable core, no more than the
    blocks, and 1 (this process) where processes do not start by fork."""
    from latentmap.machine import forks_by_default, usable_cores

    return min(usable_cores(), blocks) if forks_by_default() else 1


def _on_forked_workers(task: Callable, items: list, workers: int, what: str, **shared) -> list | None:
    """``[task(item) for item in items]`` in ``workers`` forked processes, which read ``shared``
    from :data:`_BLOCKS` (inherited, not pickled); None where a worker stopped (killed for memory,
    say), for the caller to do the blocks in this process instead."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    _BLOCKS.update(shared)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(task, items))
    except BrokenProcessPool as error:
        log.warning("UMAP transform: a worker process stopped (%s); %s the blocks in this process", error, what)
        return None
    finally:
        _BLOCKS.clear()


def _query_block(start: int):
    """One block's search, in a worker forked by :func:`blocked_query` (which left its inputs in
    :data:`_BLOCKS`)."""
    query, points = _BLOCKS["query"], _BLOCKS["points"]
    return query(points[start:start + QUERY_BLOCK], _BLOCKS["k"], **_BLOCKS["options"])


# Below this many new points UMAP's transform lays them out in one process (a worker's start costs
# more than it saves).
LAYOUT_SPLIT_MIN = 50_000
# What blocked_layout reads of umap-learn's optimize_layout_euclidean's arguments.
_LAYOUT_ARGUMENTS = {"head_embedding", "tail_embedding", "head", "tail", "n_epochs", "epochs_per_sample", "parallel",
                     "verbose", "densmap", "move_other"}


def blocked_layout(layout: Callable, *args, **kwargs):
    """umap-learn's ``optimize_layout_euclidean(head_embedding, tail_embedding, head, tail, ...)`` as
    UMAP's transform calls it, the new points (head) split into one block a usable core, each laid
    out in a forked worker process; the fitted points (tail) stay where they are. Bit for bit the
    layout of one call (tested): with ``move_other`` off, a point moves only by its own edges (in
    their stored order) and its negative samples, which its own random state draws from the fixed
    fitted points, so no point's path depends on another's. Each edge's schedule
    (``epochs_per_sample``) was set on all edges before the call and travels with it. A seeded UMAP
    runs this layout in one thread (umap-learn's parallel one races), so on a million new points it
    took about 40 s of one core here while the other waited.

    Any other call (an unseeded UMAP's layout, already on every core; ``move_other``, densMAP, a
    list of epochs, fewer than :data:`LAYOUT_SPLIT_MIN` points, one core, no fork) is ``layout``'s
    own."""
    import inspect

    try:
        bound = inspect.signature(layout).bind(*args, **kwargs)
    except (TypeError, ValueError):  # not the layout this was written for: its own call
        return layout(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if not _LAYOUT_ARGUMENTS <= given.keys():
        return layout(*args, **kwargs)
    points = given["head_embedding"]
    n = len(points)
    workers = _fork_workers(n) if n >= LAYOUT_SPLIT_MIN else 1
    if (workers < 2 or given["parallel"] or given["move_other"] or given["densmap"]
            or not isinstance(given["n_epochs"], int) or np.ndim(points) != 2):
        return layout(*args, **kwargs)
    head = np.asarray(given["head"])
    bounds = [int(b) for b in np.linspace(0, n, workers + 1)]
    blocks = [np.flatnonzero((head >= low) & (head < high)) for low, high in zip(bounds[:-1], bounds[1:])]
    log.info("UMAP transform: the layout of %d points in %d blocks on %d processes", n, workers, workers)
    # One point's edges for one epoch: the layout compiled here (where the fit has not), not in each worker.
    one = blocks[0][head[blocks[0]] == head[blocks[0][0]]] if len(blocks[0]) else blocks[0]
    _layout_part(layout, given, one, int(head[one[0]]) if len(one) else 0, 1, n_epochs=1)
    parts = _on_forked_workers(_layout_block, list(range(workers)), workers, "laying out",
                               layout=layout, given=given, blocks=blocks, bounds=bounds)
    if parts is None:
        parts = [_layout_part(layout, given, blocks[b], bounds[b], bounds[b + 1] - bounds[b]) for b in range(workers)]
    for low, high, part in zip(bounds[:-1], bounds[1:], parts):
        points[low:high] = part
    return points


def _layout_part(layout: Callable, given: dict, edges: np.ndarray, low: int, count: int,
                 n_epochs: int | None = None) -> np.ndarray:
    """``layout`` of the new points ``low:low + count`` (a copy) by their ``edges`` (positions in
    ``given["head"]``), with the call's other arguments ``given``."""
    options = dict(given)
    head = np.asarray(given["head"])
    options.update(head_embedding=np.array(given["head_embedding"][low:low + count]),
                   head=np.ascontiguousarray(head[edges] - low, dtype=head.dtype),
                   tail=np.ascontiguousarray(np.asarray(given["tail"])[edges]),
                   epochs_per_sample=np.ascontiguousarray(np.asarray(given["epochs_per_sample"])[edges]),
                   verbose=False, tqdm_kwds=dict(given.get("tqdm_kwds") or {}))  # umap-learn writes into it
    if n_epochs is not None:
        options["n_epochs"] = n_epochs
    return layout(**options)


def _layout_block(b: int) -> np.ndarray:
    """Block ``b``'s layout, in a worker forked by :func:`blocked_layout` (its inputs in :data:`_BLOCKS`)."""
    bounds = _BLOCKS["bounds"]
    return _layout_part(_BLOCKS["layout"], _BLOCKS["given"], _BLOCKS["blocks"][b], bounds[b], bounds[b + 1] - bounds[b])


def weighted_placement(graph, embedding: np.ndarray) -> np.ndarray:
    """umap-learn's ``init_graph_transform``, by columns instead of by rows: each new point (a row of
    ``graph``, sparse (N, M), its weights to the M fitted points) at the weighted mean of its fitted
    neighbours' places in ``embedding`` (M, 2), at a fitted point's place where its weight is exactly 1
    (the first such), NaN where it has none. The same floating-point operations in the same order:
    each row's weights summed in numpy's pairwise order (:func:`_numpy_row_sums`), then its
    neighbours added in stored order, so the result is bit for bit umap-learn's (tested)."""
    graph = graph.tocsr()
    indptr, indices, weights = graph.indptr, graph.indices, graph.data
    counts = np.diff(indptr)
    result = np.zeros((graph.shape[0], embedding.shape[1]), dtype=np.float32)
    sums = np.zeros(graph.shape[0], dtype=weights.dtype)
    for length in np.unique(counts[counts > 0]):  # rows of one length at a time: one (rows, length) block
        rows = np.flatnonzero(counts == length)
        sums[rows] = _numpy_row_sums(weights[indptr[rows][:, None] + np.arange(length)])
    for j in range(int(counts.max(initial=0))):  # every row's j-th neighbour at once
        rows = np.flatnonzero(counts > j)
        at = indptr[rows] + j
        result[rows] += (weights[at] / sums[rows])[:, None] * embedding[indices[at]]
    exact = np.flatnonzero(weights == 1)  # a weight of 1: the new point is that fitted point
    if len(exact):
        rows, first = np.unique(np.searchsorted(indptr, exact, side="right") - 1, return_index=True)
        result[rows] = embedding[indices[exact[first]]]
    result[counts == 0] = np.nan
    return result


def _numpy_row_sums(block: np.ndarray) -> np.ndarray:
    """Each row's sum of ``block`` (rows, L), rounded as numpy's ``row.sum()`` rounds it: in order
    below 8 values, in 8 running sums combined pairwise up to 128, halves (at a multiple of 8)
    beyond. ``np.add.reduceat`` adds in order and differs in the last bit for 40% of UMAP's rows."""
    length = block.shape[1]
    if length > 128:
        half = length // 2 - (length // 2) % 8
        return _numpy_row_sums(block[:, :half]) + _numpy_row_sums(block[:, half:])
    if length < 8:
        total = block[:, 0].copy()
        for i in range(1, length):
            total += block[:, i]
        return total
    running = block[:, :8].copy()
    end = length - length % 8
    for start in range(8, end, 8):
        running += block[:, start:start + 8]
    r = running.T
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for i in range(end, length):
        total += block[:, i]
    return total
