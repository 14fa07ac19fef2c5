"""CKA against the textbook formula, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import measures
from latentmap.measures import cka_matrix, debiased_cka, linear_cka


def _textbook_hsic(k: np.ndarray, l_gram: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l_gram @ h) / (n - 1) ** 2


def _textbook_unbiased_hsic(k: np.ndarray, l_gram: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, term by term with explicit ones vectors."""
    n = len(k)
    k, l_gram = k.copy(), l_gram.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l_gram, 0)
    one = np.ones(n)
    return (np.trace(k @ l_gram) + (one @ k @ one) * (one @ l_gram @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l_gram @ one) / (n * (n - 3))


def _textbook_cka(x, y, hsic) -> float:
    k, l_gram = x @ x.T, y @ y.T
    return hsic(k, l_gram) / np.sqrt(hsic(k, k) * hsic(l_gram, l_gram))


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = np.tanh(x @ rng.normal(size=(12, 7))) + 0.3 * rng.normal(size=(60, 7))  # other width
    return x, y


def test_linear_cka_equals_textbook(pair):
    x, y = pair
    assert linear_cka(x, y) == pytest.approx(_textbook_cka(x, y, _textbook_hsic), abs=1e-10)


def test_debiased_cka_equals_textbook(pair):
    x, y = pair
    assert debiased_cka(x, y) == pytest.approx(_textbook_cka(x, y, _textbook_unbiased_hsic), abs=1e-10)


@pytest.mark.parametrize("cka", [linear_cka, debiased_cka])
def test_invariances(cka, pair):
    x, y = pair
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(12, 12)))
    assert cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-10)
    assert cka(x, y) == pytest.approx(cka(y, x), abs=1e-12)
    assert 0.0 <= linear_cka(x, y) <= 1.0


def test_debiased_cka_of_independent_matrices_is_near_zero():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 300)), rng.normal(size=(200, 300))
    assert abs(debiased_cka(x, y)) < 0.02
    assert linear_cka(x, y) > 0.5  # the biased estimator's well-known inflation at D > N


def test_matrix_is_symmetric_with_unit_diagonal(pair):
    x, y = pair
    matrix = cka_matrix([x, y, x[:, :5]])
    np.testing.assert_allclose(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    assert matrix[0, 1] == pytest.approx(linear_cka(x, y))
    cross = cka_matrix([x], [y, x], kind="debiased")
    assert cross.shape == (1, 2) and cross[0, 1] == pytest.approx(1.0)


# --- The similarity panel, each measure against an independent computation ---

def _structured(n=120, seed=0):
    """Two views of the same 5-dimensional latent: related, of different widths."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 5))
    return latent @ rng.normal(size=(5, 40)), latent @ rng.normal(size=(5, 25)) + 0.3 * rng.normal(size=(n, 25))


def test_mutual_knn_is_the_brute_force_overlap_of_neighbour_sets():
    x, y = _structured()
    k = 7

    def neighbours(features):
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        sims = unit @ unit.T
        return [set(np.argsort(-np.delete(sims[i], i))[:k] + (np.argsort(-np.delete(sims[i], i))[:k] >= i))
                for i in range(len(features))]

    nx, ny = neighbours(x), neighbours(y)
    expected = np.array([len(a & b) / k for a, b in zip(nx, ny)])
    np.testing.assert_allclose(measures.mutual_knn_per_image(x, y, k), expected)


def test_rsa_is_spearman_of_the_cosine_rdms():
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    x, y = _structured()
    assert measures.rsa(x, y) == pytest.approx(spearmanr(pdist(x, "cosine"), pdist(y, "cosine")).statistic, abs=1e-12)


def test_procrustes_distance_matches_scipy_orthogonal_procrustes():
    from scipy.linalg import orthogonal_procrustes

    for x, y in (_structured(), _structured(n=30)):  # N > D, and N < D (the reduced basis)
        xc, yc = x - x.mean(0), y - y.mean(0)
        xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
        width = max(x.shape[1], y.shape[1])
        pad = lambda a, width=width: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731 - same width for scipy
        _, nuclear = orthogonal_procrustes(pad(xc), pad(yc))  # scale = the nuclear norm of XᵀY
        assert measures.procrustes_distance(x, y) == pytest.approx(np.arccos(min(nuclear, 1.0)), abs=1e-6)


def test_every_measure_is_invariant_to_rotation_and_isotropic_scale():
    x, y = _structured()
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(40, 40)))
    before, after = measures.panel_values(x, y), measures.panel_values(3.7 * x @ q, y)
    for measure in measures.PANEL:
        assert after[measure] == pytest.approx(before[measure], abs=1e-9), measure
    assert before["cka"] == pytest.approx(measures.linear_cka(x, y)) and before["procrustes"] < 0.8


def test_the_panel_nulls_tell_structure_from_independence():
    """Related views: every p-value is the smallest possible, intervals hold the value. Independent
    data: no p-value is small and each value sits near its null's mean."""
    x, y = _structured(n=150)
    related = measures.panel(x, y, k=10, permutations=99, bootstrap=60, seed=1)
    for measure, found in related.items():
        assert found.p_value == pytest.approx(1 / 100), measure
        assert found.lo <= found.value <= found.hi, measure
    rng = np.random.default_rng(5)
    independent = measures.panel(rng.normal(size=(150, 30)), rng.normal(size=(150, 20)), k=10, permutations=99,
                                bootstrap=0, seed=2)
    for measure, found in independent.items():
        assert found.p_value > 0.01, measure
        spread = abs(found.null_edge - found.null_mean) * 3
        assert abs(found.value - found.null_mean) <= spread + 1e-9, measure


def test_panel_intervals_have_the_sampling_spread_of_n_images():
    """24 samples of 100 images from one distribution: each measure's 95% interval, divided by 3.92,
    is about the standard deviation of the measure across the samples (mutual k-NN's interval is a
    little conservative, by design of its subsampling bootstrap)."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(10, 8)) * 0.3
    values, widths = {m: [] for m in measures.PANEL}, {m: [] for m in measures.PANEL}
    for r in range(24):
        x = rng.normal(size=(100, 10))
        found = measures.panel(x, x @ weights + rng.normal(size=(100, 8)), k=8, permutations=0, bootstrap=80, seed=r)
        for measure, result in found.items():
            values[measure].append(result.value)
            widths[measure].append(result.hi - result.lo)
    for measure in measures.PANEL:
        ratio = np.mean(widths[measure]) / 3.92 / np.std(values[measure])
        assert (0.75 if measure != "mutual_knn" else 0.9) < ratio < (1.35 if measure != "mutual_knn" else 1.9), (
            measure, ratio)
