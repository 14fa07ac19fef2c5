"""Representation similarity: linear CKA and debiased linear CKA, as pure functions on arrays.

CKA (Kornblith et al., 2019) compares two representations of the same N images, (N, D1) and
(N, D2), whatever their widths. With linear kernels K = X Xᵀ and L = Y Yᵀ:

* linear CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), with the biased estimator
  HSIC(K, L) = tr(K H L H) / (N - 1)², H the centring matrix;
* debiased CKA uses the unbiased HSIC estimator of Song et al. (2012), whose value for two
  independent representations is near 0 rather than a positive bias that grows with D / N.

Both are invariant to orthogonal transforms and isotropic scaling of either argument.
The functions work on Gram matrices, so a layer x layer matrix computes each Gram once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _gram(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, N) linear-kernel Gram matrix, float64."""
    features = np.asarray(features, dtype=np.float64)
    return features @ features.T


def _center(gram: np.ndarray) -> np.ndarray:
    """H K H, H = I - 11ᵀ/N."""
    means = gram.mean(axis=0)
    return gram - means[None, :] - means[:, None] + means.mean()


def _unbiased_terms(gram: np.ndarray) -> np.ndarray:
    """K with its diagonal zeroed, the form the unbiased HSIC estimator works on."""
    tilde = gram.copy()
    np.fill_diagonal(tilde, 0.0)
    return tilde


def _hsic_unbiased(k_tilde: np.ndarray, l_tilde: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, up to the constant 1 / (N (N - 3)) that cancels in CKA."""
    n = k_tilde.shape[0]
    k_sums, l_sums = k_tilde.sum(axis=0), l_tilde.sum(axis=0)
    return float(
        np.sum(k_tilde * l_tilde)
        + k_sums.sum() * l_sums.sum() / ((n - 1) * (n - 2))
        - 2.0 * (k_sums @ l_sums) / (n - 2)
    )


class _Prepared:
    """A representation's Gram in the form ``kind`` needs, and its self-similarity."""

    def __init__(self, features: np.ndarray, kind: str, gram: np.ndarray | None = None):
        """From (N, D) ``features``, or from their (N, N) ``gram`` when it is given."""
        if kind not in ("linear", "debiased"):
            raise ValueError(f"CKA kind must be 'linear' or 'debiased', got {kind!r}")
        gram = _gram(features) if gram is None else gram
        self.kind = kind
        self.matrix = _center(gram) if kind == "linear" else _unbiased_terms(gram)
        self.self_similarity = self.similarity(self)

    def permuted(self, order: np.ndarray) -> _Prepared:
        """The same representation with its images in ``order``: centring and the unbiased-HSIC
        form commute with a permutation, so the prepared matrix is re-indexed, not recomputed."""
        copy = object.__new__(_Prepared)
        copy.kind, copy.matrix, copy.self_similarity = (self.kind, self.matrix[np.ix_(order, order)],
                                                        self.self_similarity)
        return copy

    def similarity(self, other: _Prepared) -> float:
        if self.kind == "linear":
            return float(np.sum(self.matrix * other.matrix))
        return _hsic_unbiased(self.matrix, other.matrix)


def _cka(a: _Prepared, b: _Prepared) -> float:
    denominator = np.sqrt(max(a.self_similarity, 0.0) * max(b.self_similarity, 0.0))
    return float(a.similarity(b) / denominator) if denominator > 0 else float("nan")


def _check(x: np.ndarray, y: np.ndarray, kind: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs (N, D1) and (N, D2) arrays of the same N, got {x.shape} and {y.shape}")
    if kind == "debiased" and x.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 samples")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (N, D1) and (N, D2) representations of the same N inputs, in [0, 1]."""
    _check(x, y, "linear")
    return _cka(_Prepared(x, "linear"), _Prepared(y, "linear"))


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA (unbiased HSIC): near 0 for independent representations."""
    _check(x, y, "debiased")
    return _cka(_Prepared(x, "debiased"), _Prepared(y, "debiased"))


def cka_matrix(
    features_a: list[np.ndarray], features_b: list[np.ndarray] | None = None, kind: str = "linear"
) -> np.ndarray:
    """(len(a), len(b)) CKA between every pair of representations (b defaults to a)."""
    prepared_a = [_Prepared(f, kind) for f in features_a]
    prepared_b = prepared_a if features_b is None else [_Prepared(f, kind) for f in features_b]
    matrix = np.empty((len(prepared_a), len(prepared_b)))
    for i, a in enumerate(prepared_a):
        for j, b in enumerate(prepared_b):
            if features_b is None and j < i:
                matrix[i, j] = matrix[j, i]
            else:
                matrix[i, j] = _cka(a, b)
    return matrix


def subsample_rows(n_rows: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted, seeded row indices: all rows, or ``max_rows`` of them (Gram matrices are N x N)."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=max_rows, replace=False))


# --- The similarity panel: four views of "how alike are two representations of the same images" ---
#
# * CKA, linear and debiased (above);
# * mutual k-NN alignment (Huh et al. 2024, "The Platonic Representation Hypothesis"): for each
#   image, the share of its k nearest neighbours (cosine) the two spaces agree on; averaged;
# * RSA: Spearman correlation of the two representational dissimilarity matrices (cosine
#   distances, upper triangles), as rsatoolbox's "spearman" RDM comparison;
# * angular Procrustes distance (Williams et al. 2021): arccos of the nuclear norm of XᵀY for
#   centred, unit-Frobenius-norm X and Y (0: the same up to rotation, reflection and scale; pi/2:
#   nothing in common). Reported as a distance; the others as similarities.
#
# Each measure's null is a permutation test: the rows of one side are shuffled (the images no
# longer correspond) and the measure recomputed; the p-value is (1 + #{null >= observed}) /
# (1 + permutations) (for the distance, <=). Its interval is a bootstrap over images (see panel()).

PANEL = ("cka", "cka_debiased", "mutual_knn", "rsa", "procrustes")
LOWER_IS_CLOSER = {"procrustes"}


def _unit(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_membership(features: np.ndarray, k: int) -> np.ndarray:
    """(N, N) boolean: row i marks the k nearest neighbours (cosine) of image i, itself excluded."""
    unit = _unit(features)
    return _top_k(unit @ unit.T, k)


def _top_k(similarity: np.ndarray, k: int) -> np.ndarray:
    """(N, N) boolean: row i marks the k most similar others of i (``similarity`` is overwritten
    on its diagonal)."""
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    member = np.zeros(similarity.shape, dtype=bool)
    np.put_along_axis(member, nearest, True, axis=1)
    return member


def mutual_knn_per_image(x: np.ndarray, y: np.ndarray, k: int = 10) -> np.ndarray:
    """(N,) for each image, |kNN_x(i) ∩ kNN_y(i)| / k; the alignment is its mean."""
    if k >= len(x):
        raise ValueError(f"mutual k-NN needs k < N, got k={k} for N={len(x)}")
    return (knn_membership(x, k) & knn_membership(y, k)).sum(axis=1) / k


def _rdm_ranks(features: np.ndarray) -> np.ndarray:
    """(N, N) ranks of the cosine-distance RDM's upper-triangle entries, centred, in square form
    (the diagonal 0): Spearman's correlation of two RDMs is the Pearson correlation of these."""
    from scipy.spatial.distance import pdist, squareform
    from scipy.stats import rankdata

    ranks = rankdata(pdist(np.asarray(features, dtype=np.float64), "cosine"))
    return squareform(ranks - ranks.mean())


def _rsa_from_ranks(rx: np.ndarray, ry: np.ndarray) -> float:
    return float(np.sum(rx * ry) / np.sqrt(np.sum(rx * rx) * np.sum(ry * ry)))


def rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation of the two cosine-distance RDMs' upper triangles."""
    return _rsa_from_ranks(_rdm_ranks(x), _rdm_ranks(y))


def _procrustes_basis(features: np.ndarray) -> np.ndarray:
    """Centred, unit-Frobenius-norm features in at most N columns (an orthogonal change of basis
    that keeps every inner product, so the nuclear norm below is unchanged and cheap)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    x = x / max(np.linalg.norm(x), 1e-12)
    if x.shape[1] > x.shape[0]:
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        x = u * s
    return x


def _procrustes_from_bases(bx: np.ndarray, by: np.ndarray) -> float:
    cross = bx.T @ by
    if min(cross.shape) <= 512:
        nuclear = np.linalg.svd(cross, compute_uv=False).sum()
    else:  # wide layers: the eigenvalues of the smaller square, about 3x faster, accurate to about 1e-7
        small = cross @ cross.T if cross.shape[0] <= cross.shape[1] else cross.T @ cross
        nuclear = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0.0, None)).sum()
    return float(np.arccos(np.clip(nuclear, 0.0, 1.0)))


def procrustes_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Angular orthogonal-Procrustes distance in [0, pi/2]."""
    return _procrustes_from_bases(_procrustes_basis(x), _procrustes_basis(y))


@dataclass(frozen=True)
class Similarity:
    """One measure between two representations: value, bootstrap interval, permutation p-value and
    the null's mean and 95th percentile (5th for a distance)."""

    measure: str
    value: float
    lo: float
    hi: float
    p_value: float
    null_mean: float
    null_edge: float
    n: int


class _Side:
    """What every measure needs of one representation, computed once."""

    def __init__(self, features: np.ndarray, k: int):
        self.features = np.asarray(features, dtype=np.float64)
        self.gram = _gram(self.features)
        self.linear, self.debiased = _Prepared(None, "linear", self.gram), _Prepared(None, "debiased", self.gram)
        unit = _unit(self.features)
        self.cosine = unit @ unit.T
        self.member = knn_membership(self.features, k)
        self.ranks = _rdm_ranks(self.features)
        self.basis = _procrustes_basis(self.features)

    def resampled(self, rows: np.ndarray, same: np.ndarray) -> np.ndarray:
        """The RDM entries of the bootstrap sample ``rows`` (with repeats), the pairs of one image
        drawn twice (``same``) left out: both copies would agree trivially."""
        upper = np.triu(~same, 1)  # pairs of two different images
        return 1.0 - self.cosine[np.ix_(rows, rows)][upper]


def _cka_from_grams(k: np.ndarray, l_gram: np.ndarray, kind: str) -> float:
    return _cka(_Prepared(None, kind, k), _Prepared(None, kind, l_gram))


def _measure(a: _Side, b: _Side, order: np.ndarray | None, k: int) -> dict[str, float]:
    """Every measure with b's rows taken in ``order`` (None: as they are)."""
    # b's prepared matrices are permuted as they are (no recomputation per permutation).
    def shuffled(matrix: np.ndarray) -> np.ndarray:
        return matrix if order is None else matrix[np.ix_(order, order)]

    found = {}
    for name, prepared_a, prepared_b in (("cka", a.linear, b.linear), ("cka_debiased", a.debiased, b.debiased)):
        found[name] = _cka(prepared_a, prepared_b if order is None else prepared_b.permuted(order))
    found["mutual_knn"] = float((a.member & shuffled(b.member)).sum(axis=1).mean() / k)
    found["rsa"] = _rsa_from_ranks(a.ranks, shuffled(b.ranks))
    found["procrustes"] = _procrustes_from_bases(a.basis, b.basis if order is None else b.basis[order])
    return found


def panel(x: np.ndarray, y: np.ndarray, k: int = 10, permutations: int = 200, bootstrap: int = 200,
          confidence: float = 0.95, seed: int = 0) -> dict[str, Similarity]:
    """Every measure of :data:`PANEL` between (N, D1) ``x`` and (N, D2) ``y`` (rows: the same
    images), each with its permutation null and a percentile bootstrap interval over images.

    Intervals (percentile bootstrap over images, resampled with replacement): for RSA the pair of an
    image drawn twice is left out of the RDMs (both copies would agree trivially). The other four
    change with the number of images (biased CKA is inflated at small N, mutual k-NN and the
    Procrustes angle move with N) or need distinct images (debiased CKA): each is computed on the
    distinct images a resample drew, centred on the resamples' mean and rescaled by sqrt(m / (N - m))
    to the spread of N images (a subsampling bootstrap). On repeated samples from one distribution
    the intervals' width matched the sampling spread (ratio about 1.0 for CKA, RSA and Procrustes,
    1.1-1.25 for debiased CKA and mutual k-NN: a little conservative); the tests hold that.
    """
    _check(x, y, "debiased")
    if k >= len(x) - 1:
        raise ValueError(f"the similarity panel needs k < N - 1, got k={k} for N={len(x)}")
    a, b = _Side(x, k), _Side(y, k)
    observed = _measure(a, b, None, k)
    rng = np.random.default_rng(seed)
    nulls = {m: np.empty(permutations) for m in PANEL}
    for i in range(permutations):
        for measure, value in _measure(a, b, rng.permutation(len(x)), k).items():
            nulls[measure][i] = value
    n = len(x)
    boots = {m: np.full(bootstrap, np.nan) for m in PANEL}
    raw = {m: np.full(bootstrap, np.nan) for m in _SUBSAMPLED}
    sizes = np.zeros(bootstrap)
    for i in range(bootstrap):
        rows = rng.integers(0, n, n)
        same = rows[:, None] == rows[None, :]
        boots["rsa"][i] = _resampled_rsa(a.resampled(rows, same), b.resampled(rows, same))
        distinct = np.unique(rows)
        sizes[i] = len(distinct)
        for measure, value in _subsample_measures(a, b, distinct, k).items():
            raw[measure][i] = value
    if bootstrap:
        # The other four change with the number of images itself (biased CKA, mutual k-NN and the
        # Procrustes angle), or need distinct images (debiased CKA): each is computed on the m
        # distinct images a resample drew, centred on the resamples' mean (which removes the shift
        # a smaller N causes) and rescaled by sqrt(m / (N - m)), the ratio of the spread of N
        # images to that of m drawn without replacement, around the full-sample value.
        scale = np.sqrt(sizes / np.maximum(n - sizes, 1))
        for measure, values in raw.items():
            boots[measure] = observed[measure] + (values - values.mean()) * scale
    found = {}
    tail = (1 - confidence) / 2
    for measure in PANEL:
        null, value = nulls[measure], observed[measure]
        closer = null <= value if measure in LOWER_IS_CLOSER else null >= value
        p_value = (1 + int(closer.sum())) / (1 + permutations) if permutations else float("nan")
        edge = np.quantile(null, 0.05 if measure in LOWER_IS_CLOSER else 0.95) if permutations else float("nan")
        kept = boots[measure][~np.isnan(boots[measure])]
        low, high = np.quantile(kept, [tail, 1 - tail]) if len(kept) else (float("nan"),) * 2
        found[measure] = Similarity(measure, value, float(low), float(high), p_value,
                                    float(null.mean()) if permutations else float("nan"), float(edge), len(x))
    return found


_SUBSAMPLED = ("cka", "cka_debiased", "mutual_knn", "procrustes")


def _subsample_measures(a: _Side, b: _Side, rows: np.ndarray, k: int) -> dict[str, float]:
    """CKA (both), mutual k-NN and Procrustes of the distinct images ``rows``, from the prepared sides."""
    index = np.ix_(rows, rows)

    def member(side: _Side) -> np.ndarray:
        return _top_k(side.cosine[index], k)  # fancy indexing copies: the side's matrix is untouched

    def basis(side: _Side) -> np.ndarray:
        centred = side.basis[rows] - side.basis[rows].mean(axis=0)
        return centred / max(np.linalg.norm(centred), 1e-12)

    return {"cka": _cka_from_grams(a.gram[index], b.gram[index], "linear"),
            "cka_debiased": _cka_from_grams(a.gram[index], b.gram[index], "debiased"),
            "mutual_knn": float((member(a) & member(b)).sum(axis=1).mean() / k),
            "procrustes": _procrustes_from_bases(basis(a), basis(b))}


def _resampled_rsa(distances_a: np.ndarray, distances_b: np.ndarray) -> float:
    """RSA of one bootstrap resample's RDM entries."""
    from scipy.stats import rankdata

    ranks_a, ranks_b = rankdata(distances_a), rankdata(distances_b)
    ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    return float(ranks_a @ ranks_b / np.sqrt((ranks_a @ ranks_a) * (ranks_b @ ranks_b)))


def panel_values(x: np.ndarray, y: np.ndarray, k: int = 10) -> dict[str, float]:
    """Every measure of :data:`PANEL`, values only (no null, no interval)."""
    return _measure(_Side(x, k), _Side(y, k), None, k)


def panel_matrices_between(features_a: list[np.ndarray], features_b: list[np.ndarray],
                           k: int = 10) -> dict[str, np.ndarray]:
    """(len(a), len(b)) matrix of every :data:`PANEL` measure between each representation of ``a``
    and each of ``b`` (two models' blocks on the same images), values only."""
    sides_a, sides_b = [_Side(f, k) for f in features_a], [_Side(f, k) for f in features_b]
    for side in sides_a + sides_b:
        side.gram = side.cosine = None
    matrices = {m: np.empty((len(sides_a), len(sides_b))) for m in PANEL}
    for i, a in enumerate(sides_a):
        for j, b in enumerate(sides_b):
            for measure, value in _measure(a, b, None, k).items():
                matrices[measure][i, j] = value
    return matrices


def panel_matrices(features: list[np.ndarray], k: int = 10) -> dict[str, np.ndarray]:
    """(L, L) matrix of every :data:`PANEL` measure between every pair of ``features`` (the same N
    images each, e.g. a model's blocks), values only; each representation is prepared once."""
    sides = [_Side(f, k) for f in features]
    for side in sides:  # values need only the prepared forms: free the raw N x N matrices
        side.gram = side.cosine = None
    matrices = {m: np.empty((len(sides), len(sides))) for m in PANEL}
    for i, a in enumerate(sides):
        for j in range(i, len(sides)):
            for measure, value in _measure(a, sides[j], None, k).items():
                matrices[measure][i, j] = matrices[measure][j, i] = value
    return matrices
