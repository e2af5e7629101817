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

The cold-start protocol scores users × *test* songs, which have no training plays, so nothing is
excluded by default: :func:`cold_start_metrics` gives mAP@500 (the paper's other metric), the
per-user AUC, NDCG@10 and recall@50 for one set of item factors, scoring one block of users at a
time. :func:`map_at_k`, :func:`ndcg_at_k`, :func:`recall_at_k` and
:func:`per_user_ranking_metrics` take a score matrix instead. Ties: the top-k metrics rank a
held-out item after every other candidate with the same score (pessimistic); the AUC counts a
tie one half.

Names are honest about the cut-off (:func:`cutoff_name`): a top-k metric whose k reaches the
number of candidate items never cuts the ranked list, so "mAP@500" over 108 test songs is the
full-list mAP and is named ``map_full`` (label "mAP (full list)"), not ``map500``; the k asked
for and the number of candidates are recorded beside it (:func:`describe_cutoffs`). The paper's
mAP@500 ranks 9,330 test songs; a full-list mAP over a hundred is not comparable with it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
from deepcontent.interactions.weighting import canonical_csr

__all__ = [
    "cold_start_metrics",
    "cutoff_name",
    "describe_cutoffs",
    "heldout_auc",
    "map_at_k",
    "metric_label",
    "ndcg_at_k",
    "per_user_auc",
    "per_user_ranking_metrics",
    "popularity_auc",
    "popularity_scores",
    "recall_at_k",
    "seed_differences",
    "seed_summary",
    "separated_orderings",
    "tag_prediction_metrics",
]

_BATCH_VALUES = 1 << 23  # scores per batch of users (~64 MB in float64)


def _check_factors(X: np.ndarray, Y: np.ndarray) -> None:
    """(n_users, f) and (n_items, f), finite; the message names the bad side and its count."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"factors must be (n_users, f) and (n_items, f), got {X.shape} and {Y.shape}")
    for name, f in (("user_factors", X), ("item_factors", Y)):
        bad = int(np.count_nonzero(~np.isfinite(f).all(axis=1))) if f.size else 0
        if bad:
            raise ValueError(f"{name} has {bad} of {f.shape[0]} rows with NaN/inf")


def _check_inputs(user_factors, item_factors, train_user_items, test_user_items):
    X = np.asarray(user_factors)
    Y = np.asarray(item_factors)
    train = canonical_csr(train_user_items, name="train_user_items")
    test = canonical_csr(test_user_items, name="test_user_items")
    if train.shape != test.shape:
        raise ValueError(f"train_user_items is {train.shape} but test_user_items is {test.shape}")
    _check_factors(X, Y)
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


# --------------------------------------------------------------------------------------------
# Top-k ranking metrics for the cold-start protocol
# --------------------------------------------------------------------------------------------
#
# Every metric here depends only on the ranks of a user's held-out items among the user's
# candidates, so no top-k list is built: each block of users' score rows is sorted once (numpy's
# vectorised sort does a 10k-item row in ~40 µs, faster than an argpartition of the same row) and
# the held-out items are binary-searched in it. That gives, per held-out item, how many
# candidates score >= and > it, from which the top-k metrics and the AUC all follow.
#
# Ties: for the top-k metrics (AP@k, NDCG@k, recall@k) a held-out item tied with other
# candidates is ranked *after* every tied non-held-out item (pessimistic), so a model that scores
# everything alike earns the worst ranking, never a lucky one that depends on item order. The AUC
# counts a tie one half, as everywhere in this module.


def _check_k(k, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    return int(k)


_TOP_K_METRICS = {"map": "mAP", "ndcg": "NDCG", "recall": "recall", "precision": "precision"}


def cutoff_name(metric: str, k: int, n_candidates: int) -> str:
    """The name of a top-k metric that says whether the cut-off cuts anything.

    ``f"{metric}{k}"`` (``"map500"``) when ``k < n_candidates``: the top k of a longer list;
    ``f"{metric}_full"`` (``"map_full"``) when ``k >= n_candidates``: the cut-off keeps every
    candidate, so the number is the metric of the full ranked list, whatever k was asked for.

    Parameters
    ----------
    metric : {"map", "ndcg", "recall", "precision"}
    k : int >= 1
    n_candidates : int >= 0
        Items each user's list ranks (the most any evaluated user has).
    """
    if metric not in _TOP_K_METRICS:
        raise ValueError(f"metric must be one of {sorted(_TOP_K_METRICS)}, got {metric!r}")
    k = _check_k(k, "k")
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, (int, np.integer)) or n_candidates < 0:
        raise ValueError(f"n_candidates must be an integer >= 0, got {n_candidates!r}")
    return f"{metric}_full" if k >= n_candidates else f"{metric}{k}"


def describe_cutoffs(*, map_k: int, ndcg_k: int, recall_k: int, n_candidates: int) -> dict:
    """What each cut-off of :func:`cold_start_metrics` means for ``n_candidates`` items.

    Returns
    -------
    dict
        ``{name: {"k": k asked for, "n_candidates": int, "full_list": bool, "label": str,
        "description": str}}``, one entry per metric, keyed by its :func:`cutoff_name`.
    """
    out = {}
    for metric, k in (("map", map_k), ("ndcg", ndcg_k), ("recall", recall_k)):
        name = cutoff_name(metric, k, n_candidates)
        full = name.endswith("_full")
        what = {"map": "mean average precision", "ndcg": "normalised discounted cumulative gain",
                "recall": "recall (hits / min(k, relevant))"}[metric]
        if full:
            text = (f"{what} over the full ranked list: k={k} >= the {n_candidates} candidate items, so the "
                    f"cut-off cuts nothing (not comparable with a {_TOP_K_METRICS[metric]}@{k} over a larger "
                    f"catalog)")
            if metric == "recall":
                text += "; every relevant item is in the list, so it is 1 by construction"
        else:
            text = f"{what} of the top {k} of {n_candidates} candidate items"
        out[name] = {"k": int(k), "n_candidates": int(n_candidates), "full_list": full, "label": metric_label(name),
                     "description": text}
    return out


def metric_label(name: str) -> str:
    """Display label of a metric key: ``map500`` -> ``mAP@500``, ``map_full`` -> ``mAP (full list)``,
    ``auc`` -> ``AUC``; other keys with underscores as spaces."""
    m = re.fullmatch(r"(map|ndcg|recall|precision)(\d+|_full)", name)
    if m:
        return _TOP_K_METRICS[m[1]] + (" (full list)" if m[2] == "_full" else "@" + m[2])
    return {"auc": "AUC", "valid_nmse": "valid NMSE", "tag_auc": "tag AUC"}.get(name, name.replace("_", " "))


def _heldout_positives(test_user_items, exclude_user_items):
    """Positives = held-out items not in ``exclude_user_items`` (int8 pattern, CSR), and the
    excluded pattern (or None)."""
    test = canonical_csr(test_user_items, name="test_user_items")
    test_pat = test.astype(bool).astype(np.int8)
    if exclude_user_items is None:
        pos, excl = test_pat, None
    else:
        exclude = canonical_csr(exclude_user_items, name="exclude_user_items")
        if exclude.shape != test.shape:
            raise ValueError(f"exclude_user_items is {exclude.shape} but test_user_items is {test.shape}")
        excl = exclude.astype(bool).astype(np.int8)
        excl.eliminate_zeros()
        pos = (test_pat - test_pat.multiply(excl)).tocsr()
    pos.eliminate_zeros()
    pos.sort_indices()
    return pos, excl


def _check_users(users, n_users: int) -> np.ndarray:
    if users is None:
        return np.arange(n_users, dtype=np.int64)
    u = np.asarray(users)
    if u.ndim != 1 or (u.size and not np.issubdtype(u.dtype, np.integer)):
        raise ValueError(f"users must be a 1-D array of user indices, got dtype {u.dtype} and shape {u.shape}")
    u = u.astype(np.int64)
    bad = u[(u < 0) | (u >= n_users)]
    if bad.size:
        raise ValueError(f"users has {bad.size} indices outside [0, {n_users}), e.g. {int(bad[0])}")
    s = np.sort(u)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise ValueError(f"users has duplicates, e.g. {int(dup[0])}")
    return s


def _count_at_least(scores: np.ndarray, indptr: np.ndarray, cols: np.ndarray, *, strict: bool):
    """Per entry ``scores[row, col]`` (CSR layout ``indptr``/``cols`` over the rows of ``scores``
    (b, n_items)): how many entries of its row are >= it, and (``strict``) how many are > it."""
    n_items = scores.shape[1]
    srt = np.sort(scores, axis=1)  # one vectorised sort per block
    ge = np.empty(len(cols), dtype=np.int64)
    gt = np.empty(len(cols), dtype=np.int64) if strict else None
    for r in range(scores.shape[0]):
        a, b = indptr[r], indptr[r + 1]
        if a == b:
            continue
        v = scores[r, cols[a:b]]
        ge[a:b] = n_items - np.searchsorted(srt[r], v, side="left")
        if strict:
            gt[a:b] = n_items - np.searchsorted(srt[r], v, side="right")
    return ge, gt


def _ranking_pass(score_rows, n_users: int, n_items: int, test_user_items, *, exclude_user_items,
                  users, map_k: int, ndcg_k: int, recall_k: int, with_auc: bool, block_users):
    """The one pass behind every top-k metric: ``score_rows(batch)`` returns the float64 score
    rows (len(batch), n_items) of a batch of user indices, as a fresh array."""
    pos, excl = _heldout_positives(test_user_items, exclude_user_items)
    if pos.shape != (n_users, n_items):
        raise ValueError(f"scores are for {n_users} users × {n_items} items but test_user_items is {pos.shape}")
    map_k, ndcg_k = _check_k(map_k, "map_k"), _check_k(ndcg_k, "ndcg_k")
    recall_k = _check_k(recall_k, "recall_k")
    if block_users is None:
        block_users = max(1, _BATCH_VALUES // max(n_items, 1))
    block_users = _check_k(block_users, "block_users")
    requested = _check_users(users, n_users)
    n_pos_all = np.diff(pos.indptr)
    n_excl_all = np.diff(excl.indptr) if excl is not None else np.zeros(n_users, dtype=np.int64)
    evaluated = requested[n_pos_all[requested] > 0]  # users with nothing held out are skipped
    p_all = n_pos_all[evaluated].astype(np.int64)
    q_all = (n_items - n_excl_all[evaluated] - p_all).astype(np.int64)  # other candidates
    n_eval = len(evaluated)
    ap, ndcg, recall = (np.empty(n_eval) for _ in range(3))
    auc = np.full(n_eval, np.nan)
    # ideal DCG of the first i relevant items, i = 0..min(ndcg_k, n_items)
    idcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, min(ndcg_k, n_items) + 2)))])
    for start in range(0, n_eval, block_users):
        batch = evaluated[start : start + block_users]
        scores = score_rows(batch)
        finite = np.isfinite(scores).all(axis=1)
        if not finite.all():
            u = int(batch[np.flatnonzero(~finite)[0]])
            raise ValueError(f"scores has NaN/inf in the row of user {u}")
        if excl is not None:
            # excluded items drop below every candidate, so they never count as >= a positive
            eb = excl[batch]
            scores[np.repeat(np.arange(len(batch)), np.diff(eb.indptr)), eb.indices] = -np.inf
        pb = pos[batch]
        rows = np.repeat(np.arange(len(batch)), np.diff(pb.indptr))
        ge, gt = _count_at_least(scores, pb.indptr, pb.indices, strict=with_auc)
        vals = scores[rows, pb.indices]
        # Order each user's positives best first; j = 1-based position among them. Within a group
        # of positives with equal scores, [g0, g1) are their 0-based positions in the row.
        order = np.lexsort((-vals, rows))
        rows, vals, ge = rows[order], vals[order], ge[order]
        row_start = pb.indptr[:-1][rows]
        new_group = np.ones(len(rows), dtype=bool)
        new_group[1:] = (rows[1:] != rows[:-1]) | (vals[1:] != vals[:-1])
        group = np.cumsum(new_group) - 1
        g0 = np.flatnonzero(new_group)
        g1 = np.append(g0[1:], len(rows))
        j = np.arange(len(rows)) - row_start + 1
        neg_ge = ge - (g1[group] - row_start)  # other candidates scoring >= the positive
        rank = j + neg_ge  # pessimistic: after every tied non-positive
        p, q = p_all[start : start + len(batch)], q_all[start : start + len(batch)]
        nb = len(batch)
        hit = rank <= map_k
        ap_sum = np.bincount(rows[hit], weights=j[hit] / rank[hit], minlength=nb)
        ap[start : start + nb] = ap_sum / np.minimum(map_k, p)
        hit = rank <= ndcg_k
        dcg = np.bincount(rows[hit], weights=1.0 / np.log2(rank[hit] + 1.0), minlength=nb)
        ndcg[start : start + nb] = dcg / idcg[np.minimum(ndcg_k, p)]
        hit = rank <= recall_k
        recall[start : start + nb] = np.bincount(rows[hit], minlength=nb) / np.minimum(recall_k, p)
        if with_auc:
            neg_gt = gt[order] - (g0[group] - row_start)  # other candidates scoring > the positive
            # Mann–Whitney per positive: negatives below count 1, tied negatives ½
            wins = (q[rows] - neg_ge) + 0.5 * (neg_ge - neg_gt)
            has_neg = q > 0
            auc[start : start + nb][has_neg] = (np.bincount(rows, weights=wins, minlength=nb)[has_neg]
                                                / (p[has_neg] * q[has_neg]))
    return {
        "users": evaluated,
        "n_relevant": p_all,
        "n_candidates": int((p_all + q_all).max()) if n_eval else int(n_items),
        "ap": ap,
        "ndcg": ndcg,
        "recall": recall,
        "auc": auc,
        "n_skipped": int(len(requested) - n_eval),
    }


def _dense_score_rows(scores):
    S = np.asarray(scores)
    if S.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_users, n_items) array, got shape {S.shape}")
    # fancy indexing copies the block, so the caller's array is never written to
    return S, (lambda batch: np.asarray(S[batch], dtype=np.float64))


def per_user_ranking_metrics(
    scores: np.ndarray,
    test_user_items: sp.spmatrix,
    *,
    map_k: int = 500,
    ndcg_k: int = 10,
    recall_k: int = 50,
    exclude_user_items: sp.spmatrix | None = None,
    users: np.ndarray | None = None,
    block_users: int | None = None,
) -> dict:
    """Per-user AP@k, NDCG@k, recall@k and AUC from a score matrix.

    Parameters
    ----------
    scores : np.ndarray, (n_users, n_items)
        Higher = recommended first; must be finite. Only one block of rows is copied at a time
        (a ``np.memmap`` works). For scores computed from factors use :func:`cold_start_metrics`,
        which never holds more than a block of them.
    test_user_items : sparse, (n_users, n_items)
        Held-out interactions: nonzero = relevant (values are ignored).
    map_k, ndcg_k, recall_k : int
        Cut-offs; a k larger than n_items acts as n_items.
    exclude_user_items : sparse, (n_users, n_items), or None
        Items removed from each user's candidates (e.g. the user's training plays when the test
        items are not cold). A held-out item that is also excluded is ignored. None: every item is
        a candidate, as in the cold-start protocol, where test songs have no training plays.
    users : np.ndarray of int, (n_requested,), or None
        Evaluate only these users (no duplicates; None: all).
    block_users : int or None
        Users per block (None: as many as fit ~8M scores).

    Returns
    -------
    dict with
        ``users`` int64 (n_eval,): the users evaluated, sorted — those with ≥ 1 held-out item;
        ``n_relevant`` int64 (n_eval,); ``ap``, ``ndcg``, ``recall`` float64 (n_eval,);
        ``auc`` float64 (n_eval,), NaN for a user with no other candidate;
        ``n_candidates`` int: the most candidate items any evaluated user ranks (n_items less
        the user's exclusions; n_items when nobody is evaluated);
        ``n_skipped`` int: requested users without any held-out item.

    Notes
    -----
    For a user with n_rel relevant items whose pessimistic ranks are r_1 < r_2 < … (see the
    module's tie policy):
    AP@k = Σ_{j: r_j ≤ k} (j / r_j) / min(k, n_rel) (precision at each hit, averaged over the
    hits an ideal list of length k could hold); NDCG@k = Σ_{r_j ≤ k} 1/log2(1 + r_j) divided by
    the ideal Σ_{i ≤ min(k, n_rel)} 1/log2(1 + i); recall@k = #{r_j ≤ k} / min(k, n_rel)
    (capped, so that a perfect list scores 1 even when n_rel > k).
    """
    S, rows = _dense_score_rows(scores)
    return _ranking_pass(rows, S.shape[0], S.shape[1], test_user_items,
                         exclude_user_items=exclude_user_items, users=users, map_k=map_k,
                         ndcg_k=ndcg_k, recall_k=recall_k, with_auc=True, block_users=block_users)


def _mean_or_nan(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def map_at_k(scores: np.ndarray, test_user_items: sp.spmatrix, *, k: int = 500,
             exclude_user_items: sp.spmatrix | None = None, users: np.ndarray | None = None) -> float:
    """Mean average precision at k (the 2013 paper's mAP@500) over users with ≥ 1 held-out item.

    AP@k = (1 / min(k, n_rel)) Σ_{i ≤ k} P@i · rel_i. ``scores`` (n_users, n_items) and
    ``test_user_items`` (n_users, n_items) as in :func:`per_user_ranking_metrics`, which also
    says the tie policy (pessimistic). Returns NaN when no user has a held-out item.
    """
    S, rows = _dense_score_rows(scores)
    k = _check_k(k, "k")
    out = _ranking_pass(rows, S.shape[0], S.shape[1], test_user_items, exclude_user_items=exclude_user_items,
                        users=users, map_k=k, ndcg_k=1, recall_k=1, with_auc=False, block_users=None)
    return _mean_or_nan(out["ap"])


def ndcg_at_k(scores: np.ndarray, test_user_items: sp.spmatrix, *, k: int = 10,
              exclude_user_items: sp.spmatrix | None = None, users: np.ndarray | None = None) -> float:
    """Mean NDCG@k (binary relevance, log2 discount, ideal DCG of min(k, n_rel) hits) over users
    with ≥ 1 held-out item; see :func:`per_user_ranking_metrics`. NaN when no user qualifies."""
    S, rows = _dense_score_rows(scores)
    k = _check_k(k, "k")
    out = _ranking_pass(rows, S.shape[0], S.shape[1], test_user_items, exclude_user_items=exclude_user_items,
                        users=users, map_k=1, ndcg_k=k, recall_k=1, with_auc=False, block_users=None)
    return _mean_or_nan(out["ndcg"])


def recall_at_k(scores: np.ndarray, test_user_items: sp.spmatrix, *, k: int = 50,
                exclude_user_items: sp.spmatrix | None = None, users: np.ndarray | None = None) -> float:
    """Mean recall@k = hits in the top k / min(k, n_rel) over users with ≥ 1 held-out item
    (capped denominator: a perfect top k scores 1); see :func:`per_user_ranking_metrics`."""
    S, rows = _dense_score_rows(scores)
    k = _check_k(k, "k")
    out = _ranking_pass(rows, S.shape[0], S.shape[1], test_user_items, exclude_user_items=exclude_user_items,
                        users=users, map_k=1, ndcg_k=1, recall_k=k, with_auc=False, block_users=None)
    return _mean_or_nan(out["recall"])


def cold_start_metrics(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    test_user_items: sp.spmatrix,
    *,
    users: np.ndarray | None = None,
    exclude_user_items: sp.spmatrix | None = None,
    map_k: int = 500,
    ndcg_k: int = 10,
    recall_k: int = 50,
    block_users: int | None = None,
) -> dict:
    """The cold-start report for one method: scores s_ui = x_uᵀy′_i of users × test songs.

    Parameters
    ----------
    user_factors : np.ndarray, (n_users, f)
        X from the factorisation of the training songs.
    item_factors : np.ndarray, (n_items, f)
        Factors of the test songs: predicted from audio, or folded in from their plays for the
        upper bound.
    test_user_items : sparse, (n_users, n_items)
        Who played which test song (the ground truth).
    users, exclude_user_items, map_k, ndcg_k, recall_k, block_users
        As in :func:`per_user_ranking_metrics`. Scores are computed one block of users at a time
        (float64), so 100k users × 10k songs never needs more than ~8M scores in memory.

    Returns
    -------
    dict
        ``{"map500", "auc", "ndcg10", "recall50"}``, each the mean over users with ≥ 1 held-out
        item (the AUC over those that also have another candidate; NaN when none), plus
        ``n_users`` (users evaluated), ``n_skipped`` (requested users with no held-out item) and
        ``n_candidates`` (items a user's list ranks). The names follow the cut-offs
        (:func:`cutoff_name`): ``f"map{map_k}"`` when ``map_k`` is below the number of candidates,
        ``"map_full"`` when it is not (108 test songs: "mAP@500" is the full-list mAP), and the
        same for NDCG and recall; :func:`describe_cutoffs` says what each one means.
    """
    X = np.asarray(user_factors)
    Y = np.asarray(item_factors)
    _check_factors(X, Y)
    Yt = np.ascontiguousarray(Y.T, dtype=np.float64)
    out = _ranking_pass(lambda batch: X[batch].astype(np.float64) @ Yt, X.shape[0], Y.shape[0],
                        test_user_items, exclude_user_items=exclude_user_items, users=users,
                        map_k=map_k, ndcg_k=ndcg_k, recall_k=recall_k, with_auc=True,
                        block_users=block_users)
    n = out["n_candidates"]
    return {
        cutoff_name("map", map_k, n): _mean_or_nan(out["ap"]),
        "auc": _mean_or_nan(out["auc"]),
        cutoff_name("ndcg", ndcg_k, n): _mean_or_nan(out["ndcg"]),
        cutoff_name("recall", recall_k, n): _mean_or_nan(out["recall"]),
        "n_users": int(len(out["users"])),
        "n_skipped": out["n_skipped"],
        "n_candidates": int(n),
    }


def tag_prediction_metrics(
    tag_factors: np.ndarray,
    song_factors: np.ndarray,
    song_tags: sp.spmatrix,
    *,
    tags: np.ndarray | None = None,
) -> dict:
    """Tag prediction from song factors (ISMIR 2014 source task): A′ = U′Vᵀ ranks the songs per tag.

    Parameters
    ----------
    tag_factors : np.ndarray, (n_tags, f)
        V from the WMF of the songs × tags matrix.
    song_factors : np.ndarray, (n_songs, f)
        U′ of the evaluated songs (predicted from audio, or folded in for an upper bound).
    song_tags : sparse, (n_songs, n_tags)
        The songs' actual tags (nonzero = tagged; weights are ignored).
    tags : np.ndarray of int or None
        Tags to evaluate (e.g. those that have factors); None: all. Tags without any tagged song
        among the evaluated ones are skipped.

    Returns
    -------
    dict
        ``auc`` (mean per-tag ROC AUC over the songs), ``map`` (mean per-tag average precision
        over the full ranking of the songs), ``n_tags`` (tags evaluated).
    """
    S = sp.csr_matrix(song_tags)
    if S.shape != (np.shape(song_factors)[0], np.shape(tag_factors)[0]):
        raise ValueError(f"song_tags must be (n_songs, n_tags) = ({np.shape(song_factors)[0]}, "
                         f"{np.shape(tag_factors)[0]}), got {S.shape}")
    n_songs = S.shape[0]
    # tags play the users' part: each ranks the songs by a′_ts = v_t·u′_s
    m = cold_start_metrics(tag_factors, song_factors, S.T.tocsr(), users=tags, map_k=max(n_songs, 1), ndcg_k=1,
                           recall_k=1)
    return {"auc": m["auc"], "map": m["map_full"], "n_tags": m["n_users"]}


# ----------------------------------------------------------------------------- repeated runs
def seed_summary(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict:
    """Mean ± sample standard deviation of every method's metrics over repeated runs.

    Parameters
    ----------
    per_seed : mapping
        ``{seed: {method: {metric: value}}}``; integer entries (counts such as ``n_users``)
        are carried over from the first seed, not averaged.

    Returns
    -------
    dict
        ``{method: {metric: {"mean", "sd", "values"}}}`` for the methods and float metrics
        every seed has; ``sd`` is the sample sd (``ddof=1``; 0.0 for a single seed).

    Raises
    ------
    ValueError
        If ``per_seed`` is empty.
    """
    if not per_seed:
        raise ValueError("seed_summary needs at least one seed's results")
    seeds = sorted(per_seed)
    methods = [m for m in per_seed[seeds[0]] if all(m in per_seed[s] for s in seeds)]
    out: dict = {}
    for method in methods:
        first = per_seed[seeds[0]][method]
        row: dict = {}
        for metric, value in first.items():
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                row[metric] = int(value)
                continue
            values = [float(per_seed[s][method][metric]) for s in seeds if metric in per_seed[s][method]]
            if len(values) != len(seeds):
                continue
            v = np.asarray(values, dtype=np.float64)
            row[metric] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                           "values": values}
        out[method] = row
    return out


def seed_differences(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]], *, reference: str) -> dict:
    """Each method minus ``reference``, seed by seed: mean ± sample sd of the paired differences.

    Seeds move every method together (the same seed's WMF factors are every regressor's
    target), so two methods' intervals can overlap while one beats the other on every seed;
    the paired difference's sd is the error bar of the comparison itself.

    Parameters
    ----------
    per_seed : mapping
        ``{seed: {method: {metric: value}}}``, as :func:`seed_summary` takes it.
    reference : str
        The method subtracted (e.g. ``"cnn_mse"``, the CNN from scratch).

    Returns
    -------
    dict
        ``{method: {metric: {"mean", "sd", "values", "wins"}}}`` for every other method and
        float metric that every seed has for both; ``wins`` counts the seeds where the method
        is above the reference. Empty when some seed lacks ``reference``.

    >>> per_seed = {0: {"a": {"auc": 0.70}, "b": {"auc": 0.72}}, 1: {"a": {"auc": 0.60}, "b": {"auc": 0.61}}}
    >>> d = seed_differences(per_seed, reference="a")["b"]["auc"]
    >>> round(d["mean"], 3), d["wins"]
    (0.015, 2)
    """
    seeds = sorted(per_seed)
    if not seeds or any(reference not in per_seed[s] for s in seeds):
        return {}
    out: dict = {}
    for method in per_seed[seeds[0]]:
        if method == reference or any(method not in per_seed[s] for s in seeds):
            continue
        row: dict = {}
        for metric, value in per_seed[seeds[0]][method].items():
            if not isinstance(value, (float, np.floating)):
                continue  # counts and flags are not compared
            pairs = [(per_seed[s][method].get(metric), per_seed[s][reference].get(metric)) for s in seeds]
            if any(a is None or b is None for a, b in pairs):
                continue
            d = np.asarray([float(a) - float(b) for a, b in pairs], dtype=np.float64)
            row[metric] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                           "values": d.tolist(), "wins": int((d > 0).sum())}
        out[method] = row
    return out


def separated_orderings(summary: Mapping[str, Mapping[str, Any]], *, metric: str) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` where method ``a`` beats ``b`` on ``metric`` with the intervals
    mean ± sd apart (``mean_a - sd_a > mean_b + sd_b``): the orderings repeated runs support.
    Methods without the metric are skipped; pairs come best-first.

    >>> s = {"x": {"auc": {"mean": 0.8, "sd": 0.01}}, "y": {"auc": {"mean": 0.7, "sd": 0.05}},
    ...      "z": {"auc": {"mean": 0.72, "sd": 0.05}}}
    >>> separated_orderings(s, metric="auc")
    [('x', 'z'), ('x', 'y')]
    """
    rows = [(m, r[metric]) for m, r in summary.items() if isinstance(r.get(metric), Mapping)]
    rows.sort(key=lambda mr: -mr[1]["mean"])
    out = []
    for i, (a, ra) in enumerate(rows):
        for b, rb in rows[i + 1:]:
            if ra["mean"] - ra["sd"] > rb["mean"] + rb["sd"]:
                out.append((a, b))
    return out
