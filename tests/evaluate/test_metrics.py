"""Held-out AUC against sklearn's roc_auc_score and a hand-worked example."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

import deepcontent.evaluate.metrics as metrics_module
from deepcontent.evaluate.metrics import heldout_auc, per_user_auc, popularity_auc, popularity_scores


def test_hand_worked_example():
    # 1 user, 6 items with scores 6, 5, 4, 3, 2, 1 (item 0 best).
    # train: item 0 (excluded from the candidates); test: items 2 and 4.
    # candidates 1..5 ranked 1 > 2 > 3 > 4 > 5; positives 2 (beats 3, 4, 5 among negatives 1, 3, 5
    # -> beats 3 and 5 = 2 of 3) and 4 (beats 5 = 1 of 3): AUC = (2 + 1) / (2 * 3) = 0.5.
    X = np.ones((1, 1))
    Y = np.array([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0]]))
    test = sp.csr_matrix(np.array([[0, 0, 1, 0, 1, 0]]))
    assert heldout_auc(X, Y, train, test) == pytest.approx(0.5)
    # the train item's high score must not matter: with it a positive the naive AUC would differ
    test2 = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0]]))  # item 1: best candidate
    assert heldout_auc(X, Y, train, test2) == pytest.approx(1.0)


def test_ties_count_one_half():
    X = np.ones((1, 1))
    Y = np.array([[1.0], [1.0], [1.0], [0.0]])
    test = sp.csr_matrix(np.array([[1, 0, 0, 0]]))
    # positive ties with 2 negatives (½ each) and beats 1: (0.5 + 0.5 + 1) / 3
    assert heldout_auc(X, Y, sp.csr_matrix((1, 4)), test) == pytest.approx(2 / 3)


@pytest.mark.parametrize("batch_values", [None, 50], ids=["one-batch", "many-batches"])
def test_matches_sklearn_per_user(monkeypatch, batch_values):
    if batch_values is not None:
        monkeypatch.setattr(metrics_module, "_BATCH_VALUES", batch_values)
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    X = rng.normal(size=(n_users, 4))
    Y = rng.normal(size=(n_items, 4))
    Y[5] = Y[6]  # exact ties in the scores
    train = sp.csr_matrix(rng.random((n_users, n_items)) < 0.2).astype(np.float64)
    test_dense = (rng.random((n_users, n_items)) < 0.15) & ~(train.toarray() > 0)
    test_dense[3] = False  # a user without held-out items is skipped
    test = sp.csr_matrix(test_dense).astype(np.float64)
    users, auc = per_user_auc(X, Y, train, test)
    scores = X @ Y.T
    expected = {}
    for u in range(n_users):
        cand = train[u].toarray()[0] == 0
        y_true = test[u].toarray()[0][cand] > 0
        if y_true.any() and not y_true.all():
            expected[u] = roc_auc_score(y_true, scores[u][cand])
    assert list(users) == sorted(expected)
    np.testing.assert_allclose(auc, [expected[u] for u in users], rtol=1e-12)
    assert heldout_auc(X, Y, train, test) == pytest.approx(np.mean(list(expected.values())))


def test_test_items_also_in_train_are_ignored():
    X = np.ones((1, 1))
    Y = np.array([[3.0], [2.0], [1.0]])
    train = sp.csr_matrix(np.array([[1, 0, 0]]))
    test = sp.csr_matrix(np.array([[1, 0, 1]]))  # item 0 is in both: only item 2 is a positive
    assert heldout_auc(X, Y, train, test) == pytest.approx(0.0)


def test_max_users_samples_deterministically():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(50, 3)), rng.normal(size=(20, 3))
    train = sp.csr_matrix(rng.random((50, 20)) < 0.2).astype(float)
    test = sp.csr_matrix((rng.random((50, 20)) < 0.2) & ~(train.toarray() > 0)).astype(float)
    u1, a1 = per_user_auc(X, Y, train, test, max_users=10, seed=3)
    u2, _ = per_user_auc(X, Y, train, test, max_users=10, seed=3)
    u_all, a_all = per_user_auc(X, Y, train, test)
    assert len(u1) == 10 and list(u1) == list(u2) and set(u1) <= set(u_all)
    np.testing.assert_allclose(a1, a_all[np.searchsorted(u_all, u1)])


def test_popularity_baseline():
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [5, 2, 1, 0]], dtype=float))
    np.testing.assert_array_equal(popularity_scores(train), [3, 2, 1, 0])  # distinct users, not plays
    test = sp.csr_matrix(np.array([[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float))
    # user 0: positive 2 (pop 1) vs negative 3 (pop 0) -> 1; user 1: 1 (pop 2) vs 2, 3 -> 1;
    # user 2: positive 3 (pop 0), no negative left -> skipped
    assert popularity_auc(train, test) == pytest.approx(1.0)
    ones = np.ones((3, 1))
    assert heldout_auc(ones, popularity_scores(train)[:, None], train, test) == popularity_auc(train, test)


def test_average_ranks_equal_scipy_rankdata():
    from scipy.stats import rankdata

    rng = np.random.default_rng(2)
    scores = np.round(rng.normal(size=(6, 40)), 1)  # plenty of ties
    scores[0, :5] = -np.inf
    rows = np.repeat(np.arange(6), 7)
    cols = rng.integers(0, 40, size=len(rows))
    want = rankdata(scores, method="average", axis=1)[rows, cols]
    np.testing.assert_allclose(metrics_module._average_ranks(scores, rows, cols), want)


def test_non_finite_factors_are_refused():
    m = sp.csr_matrix(np.eye(3))
    Y = np.ones((3, 2))
    Y[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"item_factors has 1 of 3 rows with NaN/inf"):
        heldout_auc(np.ones((3, 2)), Y, m, m)


def test_shape_errors():
    X, Y = np.ones((2, 3)), np.ones((4, 3))
    m = sp.csr_matrix((2, 4))
    with pytest.raises(ValueError, match=r"train_user_items is \(2, 4\) but test_user_items is \(2, 5\)"):
        heldout_auc(X, Y, m, sp.csr_matrix((2, 5)))
    with pytest.raises(ValueError, match=r"factors are for 2 users and 3 items"):
        heldout_auc(X, Y[:3], m, m)
    assert np.isnan(heldout_auc(X, Y, m, m))  # nobody to evaluate
