"""The WMF objective against a brute-force dense computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import deepcontent.factorize.objective as objective_module
from deepcontent.factorize.objective import observed_scores, wmf_objective, wmf_objective_from_confidence
from deepcontent.interactions.weighting import confidence_matrix


def dense_objective(counts: np.ndarray, X: np.ndarray, Y: np.ndarray, *, alpha, eps, regularization) -> float:
    """Σ over every (u, i) of c (p − xᵀy)² + λ(‖X‖² + ‖Y‖²), straight from the definition."""
    p = (counts > 0).astype(np.float64)
    c = 1.0 + alpha * np.log1p(counts / eps)  # = 1 where counts == 0
    S = X @ Y.T
    return float(np.sum(c * (p - S) ** 2) + regularization * (np.sum(X**2) + np.sum(Y**2)))


@pytest.fixture
def tiny():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 30, size=(9, 7)).astype(np.float64) * (rng.random((9, 7)) < 0.35)
    counts[4] = 0  # a user with no plays
    counts[:, 2] = 0  # an item with no plays
    X = rng.normal(size=(9, 3))
    Y = rng.normal(size=(7, 3))
    return counts, X, Y


@pytest.mark.parametrize("alpha, eps, lam", [(2.0, 1.0, 0.1), (40.0, 1e-2, 0.0), (0.0, 1.0, 3.0)])
def test_matches_brute_force(tiny, alpha, eps, lam):
    counts, X, Y = tiny
    got = wmf_objective(sp.csr_matrix(counts), X, Y, alpha=alpha, eps=eps, regularization=lam)
    want = dense_objective(counts, X, Y, alpha=alpha, eps=eps, regularization=lam)
    assert got == pytest.approx(want, rel=1e-12)


def test_float32_factors_accumulate_in_float64(tiny):
    counts, X, Y = tiny
    got = wmf_objective(sp.csr_matrix(counts), X.astype(np.float32), Y.astype(np.float32),
                        alpha=2.0, eps=1.0, regularization=0.1)
    want = dense_objective(counts, X.astype(np.float32).astype(np.float64), Y.astype(np.float32).astype(np.float64),
                           alpha=2.0, eps=1.0, regularization=0.1)
    assert got == pytest.approx(want, rel=1e-10)


def test_hand_worked_zero_factors():
    # With X = Y = 0 every score is 0: the loss is Σ_observed c_ui (unobserved pairs contribute 0).
    counts = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 3.0]]))
    got = wmf_objective(counts, np.zeros((2, 4)), np.zeros((2, 4)), alpha=2.0, eps=1.0, regularization=5.0)
    assert got == pytest.approx((1 + 2 * np.log(2)) + (1 + 2 * np.log(4)))


def test_from_confidence_is_the_same(tiny):
    counts, X, Y = tiny
    conf = confidence_matrix(sp.csr_matrix(counts), alpha=2.0, eps=1.0)
    assert wmf_objective_from_confidence(conf, X, Y, regularization=0.5) == pytest.approx(
        wmf_objective(sp.csr_matrix(counts), X, Y, alpha=2.0, eps=1.0, regularization=0.5), rel=1e-14)


def test_chunked_scores_equal_unchunked(tiny, monkeypatch):
    counts, X, Y = tiny
    m = sp.csr_matrix(counts)
    whole = observed_scores(m, X, Y)
    monkeypatch.setattr(objective_module, "_CHUNK_VALUES", 5)  # one or two nonzeros per chunk
    np.testing.assert_allclose(observed_scores(m, X, Y), whole, rtol=1e-15)
    rows, cols = m.nonzero()
    np.testing.assert_allclose(whole, np.einsum("ij,ij->i", X[rows], Y[cols]))


def test_shape_errors_name_the_shapes(tiny):
    counts, X, Y = tiny
    m = sp.csr_matrix(counts)
    with pytest.raises(ValueError, match=r"9 users x 7 items but factors are for 8 users and 7 items"):
        wmf_objective(m, X[:8], Y, alpha=1.0, eps=1.0, regularization=0.1)
    with pytest.raises(ValueError, match=r"differ in rank: 3 vs 2"):
        wmf_objective(m, X, Y[:, :2], alpha=1.0, eps=1.0, regularization=0.1)
    with pytest.raises(ValueError, match=r"regularization .* got -1"):
        wmf_objective(m, X, Y, alpha=1.0, eps=1.0, regularization=-1)


def test_bad_counts_rejected(tiny):
    counts, X, Y = tiny
    m = sp.csr_matrix(counts)
    m.data[0] = np.inf
    with pytest.raises(ValueError, match="1 inf"):
        wmf_objective(m, X, Y, alpha=1.0, eps=1.0, regularization=0.1)
