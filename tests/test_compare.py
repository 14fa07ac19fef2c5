"""CKA against the textbook formula, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap.compare import cka_matrix, debiased_cka, linear_cka


def _textbook_hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _textbook_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, term by term with explicit ones vectors."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def _textbook_cka(x, y, hsic) -> float:
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


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
