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

    def __init__(self, features: np.ndarray, kind: str):
        if kind not in ("linear", "debiased"):
            raise ValueError(f"CKA kind must be 'linear' or 'debiased', got {kind!r}")
        gram = _gram(features)
        self.kind = kind
        self.matrix = _center(gram) if kind == "linear" else _unbiased_terms(gram)
        self.self_similarity = self.similarity(self)

    def similarity(self, other: "_Prepared") -> float:
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
