"""Ranking metrics for factor models.

``heldout_auc`` is the paper's per-user AUC (van den Oord et al. 2013, thesis §4.6): for each
user with held-out items, rank every item the user did *not* interact with in training by the
score x_uᵀy_i; the AUC is the probability that a held-out item outranks a non-interacted one
(ties count one half, as in ``sklearn.metrics.roc_auc_score``); the metric is the mean over
users.

Per user it is the Mann–Whitney statistic from the average ranks of the held-out items among
the candidates, U = Σ ranks − p(p + 1)/2, AUC = U / (p·q) for p held-out items and q other
candidates. Users are scored in batches (one matmul per batch); the ranks of the few held-out
items are counted against their row rather than by sorting every row.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from deepcontent.interactions.weighting import canonical_csr

__all__ = ["heldout_auc", "per_user_auc", "popularity_auc", "popularity_scores"]

_BATCH_VALUES = 1 << 23  # scores per batch of users (~64 MB in float64)


def _check_inputs(user_factors, item_factors, train_user_items, test_user_items):
    X = np.asarray(user_factors)
    Y = np.asarray(item_factors)
    train = canonical_csr(train_user_items, name="train_user_items")
    test = canonical_csr(test_user_items, name="test_user_items")
    if train.shape != test.shape:
        raise ValueError(f"train_user_items is {train.shape} but test_user_items is {test.shape}")
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"factors must be (n_users, f) and (n_items, f), got {X.shape} and {Y.shape}")
    for name, f in (("user_factors", X), ("item_factors", Y)):
        bad = int(np.count_nonzero(~np.isfinite(f).all(axis=1))) if f.size else 0
        if bad:
            raise ValueError(f"{name} has {bad} of {f.shape[0]} rows with NaN/inf")
    if (X.shape[0], Y.shape[0]) != train.shape:
        raise ValueError(
            f"factors are for {X.shape[0]} users and {Y.shape[0]} items but the matrices are {train.shape}"
        )
    return X, Y, train, test


def _average_ranks(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """1-based average ranks (ties share the mean rank, as ``scipy.stats.rankdata(method="average")``)
    of the entries ``scores[rows, cols]`` within their rows of ``scores`` (b, n_items).

    Counts, per entry, the row's scores below and equal to it: O(n_entries × n_items) cheap
    comparisons, much less than sorting every row when the entries (held-out items) are few.
    """
    out = np.empty(len(rows), dtype=np.float64)
    per_chunk = max(1, _BATCH_VALUES // max(scores.shape[1], 1))
    for start in range(0, len(rows), per_chunk):
        r, c = rows[start : start + per_chunk], cols[start : start + per_chunk]
        row_scores = scores[r]  # (k, n_items)
        value = scores[r, c][:, None]
        below = np.count_nonzero(row_scores < value, axis=1)
        equal = np.count_nonzero(row_scores == value, axis=1)  # includes the entry itself
        out[start : start + len(r)] = below + (equal + 1) / 2.0
    return out


def per_user_auc(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    train_user_items: sp.spmatrix,
    test_user_items: sp.spmatrix,
    *,
    max_users: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user held-out AUC.

    Parameters
    ----------
    user_factors : np.ndarray, (n_users, f)
    item_factors : np.ndarray, (n_items, f)
        Scores are ``user_factors @ item_factors.T``.
    train_user_items : sparse, (n_users, n_items)
        Training interactions: these items are removed from the user's candidates.
    test_user_items : sparse, (n_users, n_items)
        Held-out interactions (positives). A test item also present in train is ignored.
    max_users : int or None
        Evaluate a uniform random sample of this many eligible users (None: all).
    seed : int
        For the user sample.

    Returns
    -------
    users : np.ndarray, int64, (n_eval,)
        Users evaluated: ≥ 1 held-out item and ≥ 1 negative candidate (sorted).
    auc : np.ndarray, float64, (n_eval,)
    """
    X, Y, train, test = _check_inputs(user_factors, item_factors, train_user_items, test_user_items)
    n_items = train.shape[1]
    # positives: test minus train (boolean pattern, so values never matter)
    train_pat = train.astype(bool).astype(np.int8)
    test_pat = test.astype(bool).astype(np.int8)
    pos = (test_pat - test_pat.multiply(train_pat)).tocsr()
    pos.eliminate_zeros()
    n_pos = np.diff(pos.indptr)
    n_train = np.diff(train.indptr)
    n_neg = n_items - n_train - n_pos
    users = np.flatnonzero((n_pos > 0) & (n_neg > 0))
    if max_users is not None and len(users) > max_users:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1 or None, got {max_users!r}")
        rng = np.random.default_rng(seed)
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    auc = np.empty(len(users), dtype=np.float64)
    Yt = np.ascontiguousarray(Y.T, dtype=np.float64)
    per_batch = max(1, _BATCH_VALUES // max(n_items, 1))
    for start in range(0, len(users), per_batch):
        batch = users[start : start + per_batch]
        scores = X[batch].astype(np.float64) @ Yt  # (b, n_items)
        # Train items go to -inf: below every candidate, so each positive's rank among all items
        # is its rank among the candidates plus the user's number of train items.
        tr = train[batch]
        scores[np.repeat(np.arange(len(batch)), np.diff(tr.indptr)), tr.indices] = -np.inf
        pb = pos[batch]
        pos_rows = np.repeat(np.arange(len(batch)), np.diff(pb.indptr))
        rank_sum = np.bincount(pos_rows, weights=_average_ranks(scores, pos_rows, pb.indices),
                               minlength=len(batch))
        p, q, t = n_pos[batch], n_neg[batch], n_train[batch]
        # Mann–Whitney: U = Σ ranks of positives among candidates − p(p + 1)/2; AUC = U / (p q)
        auc[start : start + len(batch)] = (rank_sum - p * t - p * (p + 1) / 2.0) / (p * q)
    return users, auc


def heldout_auc(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    train_user_items: sp.spmatrix,
    test_user_items: sp.spmatrix,
    *,
    max_users: int | None = None,
    seed: int = 0,
) -> float:
    """Mean per-user AUC of held-out items among the items each user did not play in train.

    See :func:`per_user_auc` for the parameters. Returns NaN when no user qualifies.
    """
    _, auc = per_user_auc(user_factors, item_factors, train_user_items, test_user_items,
                          max_users=max_users, seed=seed)
    return float(np.mean(auc)) if len(auc) else float("nan")


def popularity_scores(train_user_items: sp.spmatrix) -> np.ndarray:
    """Item popularity: number of distinct users with a training interaction, float64 (n_items,)."""
    train = canonical_csr(train_user_items, name="train_user_items")
    return np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)


def popularity_auc(
    train_user_items: sp.spmatrix,
    test_user_items: sp.spmatrix,
    *,
    max_users: int | None = None,
    seed: int = 0,
) -> float:
    """:func:`heldout_auc` of the popularity baseline (every user ranks items by popularity):
    user factors = ones (n_users, 1), item factors = popularity (n_items, 1)."""
    popularity = popularity_scores(train_user_items)
    ones = np.ones((train_user_items.shape[0], 1))
    return heldout_auc(ones, popularity[:, None], train_user_items, test_user_items,
                       max_users=max_users, seed=seed)
