"""Fold-in: the vectorised half-step against the per-row reference, and cold-start use."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import deepcontent.factorize.foldin as foldin_module
from deepcontent.evaluate.metrics import heldout_auc
from deepcontent.factorize.factory import make_factorizer
from deepcontent.factorize.foldin import fold_in, solve_rows
from deepcontent.factorize.reference import als_half_step_reference
from deepcontent.interactions.weighting import confidence_matrix

from planted_data import PARAMS

WEIGHTS = {k: PARAMS[k] for k in ("alpha", "eps", "regularization")}


def random_counts(n_rows: int, n_cols: int, *, seed: int) -> sp.csr_matrix:
    """Rows with 0..n_cols plays, so every power-of-two bucket and the empty row occur."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for r in range(n_rows):
        k = int(rng.integers(0, n_cols + 1)) if r % 5 else 0
        rows += [r] * k
        cols += list(rng.choice(n_cols, k, replace=False))
    data = rng.integers(1, 50, len(rows)).astype(np.float64)
    return sp.csr_matrix((data, (rows, cols)), shape=(n_rows, n_cols))


@pytest.mark.parametrize("budget", [None, 64], ids=["default-batches", "tiny-batches"])
def test_solve_rows_equals_reference_half_step(monkeypatch, budget):
    if budget is not None:
        monkeypatch.setattr(foldin_module, "_BATCH_VALUES", budget)
    counts = random_counts(40, 70, seed=0)
    conf = confidence_matrix(counts, alpha=3.0, eps=0.5)
    Y = np.random.default_rng(1).normal(size=(70, 6))
    got = solve_rows(conf, Y, regularization=0.3)
    want = als_half_step_reference(conf, Y, regularization=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_rows_without_plays_are_zero_and_dtype_follows_fixed_factors():
    counts = sp.csr_matrix(np.array([[0, 0, 0], [2, 0, 1], [0, 0, 0]], dtype=np.float64))
    Y = np.random.default_rng(0).normal(size=(3, 2))
    out64 = fold_in(counts, Y, alpha=1.0, eps=1.0, regularization=0.1)
    out32 = fold_in(counts, Y.astype(np.float32), alpha=1.0, eps=1.0, regularization=0.1)
    assert out64.dtype == np.float64 and out32.dtype == np.float32
    assert not out64[0].any() and not out64[2].any() and out64[1].any()
    np.testing.assert_allclose(out32, out64, rtol=1e-5)
    empty = fold_in(sp.csr_matrix((4, 3)), Y, alpha=1.0, eps=1.0, regularization=0.1)
    assert empty.shape == (4, 2) and not empty.any()


def test_single_row_matches_closed_form():
    # One row, one play: (YᵀY + (c − 1) y yᵀ + λI) x = c y.
    Y = np.array([[1.0, 0.0], [0.0, 2.0]])
    counts = sp.csr_matrix(np.array([[0.0, 3.0]]))
    c = 1 + 2.0 * np.log(1 + 3.0 / 1.0)
    A = Y.T @ Y + (c - 1) * np.outer(Y[1], Y[1]) + 0.5 * np.eye(2)
    want = np.linalg.solve(A, c * Y[1])
    np.testing.assert_allclose(fold_in(counts, Y, alpha=2.0, eps=1.0, regularization=0.5)[0], want)


def test_errors_name_the_problem():
    Y = np.zeros((3, 4))  # rank-deficient fixed factors
    counts = sp.csr_matrix(np.array([[1.0, 0, 2]]))
    with pytest.raises(ValueError, match=r"singular normal equations .*\(regularization=0.0\)"):
        fold_in(counts, Y, alpha=1.0, eps=1.0, regularization=0.0)
    with pytest.raises(ValueError, match=r"fixed_factors must be \(3, f\) .* got \(2, 4\)"):
        fold_in(counts, Y[:2], alpha=1.0, eps=1.0, regularization=0.1)
    bad = counts.copy()
    bad.data[0] = -1
    with pytest.raises(ValueError, match="1 negative"):
        fold_in(bad, Y, alpha=1.0, eps=1.0, regularization=0.1)


def test_new_users_fold_in_to_fitted_user_factors(planted):
    # The reference ALS ends on an item step; one more exact user step from the fitted item
    # factors lands (almost) where the fitted user factors already are.
    X, Y = make_factorizer("reference", **{**PARAMS, "iterations": 25}).fit(planted.train)
    folded = fold_in(planted.train, Y, **WEIGHTS)
    has_plays = np.diff(planted.train.indptr) > 0
    cos = np.einsum("ij,ij->i", folded[has_plays], X[has_plays]) / (
        np.linalg.norm(folded[has_plays], axis=1) * np.linalg.norm(X[has_plays], axis=1))
    assert cos.mean() > 0.99, cos.mean()


def test_cold_start_items_folded_in_rank_their_held_out_users(planted):
    # Cold start: items unseen by the fit get factors from their plays with user factors fixed,
    # and those factors rank each item's held-out listeners above the users who never played it.
    train, test = planted.train, planted.test
    rng = np.random.default_rng(7)
    played = np.flatnonzero(np.bincount(train.indices, minlength=train.shape[1]) >= 5)
    cold = np.sort(rng.choice(played, 20, replace=False))
    keep = np.ones(train.shape[1], dtype=bool)
    keep[cold] = False
    warm_train = train[:, keep]
    X, _ = make_factorizer("implicit", num_threads=1, **PARAMS).fit(warm_train)
    item_users_train = train[:, cold].T.tocsr()  # (20, n_users): the cold items' plays
    item_users_test = test[:, cold].T.tocsr()
    Y_cold = fold_in(item_users_train, X, **WEIGHTS)
    # per-item AUC: the same function with the roles of users and items swapped
    auc = heldout_auc(Y_cold, X, item_users_train, item_users_test)
    assert auc > 0.85, auc
