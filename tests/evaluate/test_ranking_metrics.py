"""Top-k ranking metrics (mAP@k, NDCG@k, recall@k, AUC) for the cold-start protocol: hand-worked
examples, the tie policy, agreement with scikit-learn and with a brute-force reference."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

import deepcontent.evaluate.metrics as metrics_module
from deepcontent.evaluate.metrics import (
    cold_start_metrics,
    cutoff_name,
    describe_cutoffs,
    map_at_k,
    metric_label,
    ndcg_at_k,
    per_user_auc,
    per_user_ranking_metrics,
    recall_at_k,
    tag_prediction_metrics,
)


def _row(*values):
    return sp.csr_matrix(np.array([values], dtype=np.float64))


# -- hand-worked examples ---------------------------------------------------------------------

# 1 user, 6 items scored 6, 5, 4, 3, 2, 1 (item 0 first); held out: items 1 and 3 -> ranks 2 and 4.
SCORES = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
HELD_OUT = _row(0, 1, 0, 1, 0, 0)


def test_hand_worked_average_precision():
    # AP@6 = (P@2 + P@4) / min(6, 2) = (1/2 + 2/4) / 2 = 0.5
    assert map_at_k(SCORES, HELD_OUT, k=6) == pytest.approx(0.5)
    # AP@3: only the hit at rank 2 is inside: (1/2) / min(3, 2) = 0.25
    assert map_at_k(SCORES, HELD_OUT, k=3) == pytest.approx(0.25)
    # AP@1: no hit in the top 1 -> 0 (normaliser min(1, 2) = 1)
    assert map_at_k(SCORES, HELD_OUT, k=1) == 0.0


def test_hand_worked_ndcg():
    # NDCG@3: DCG = 1/log2(1 + 2) = 0.630930; ideal = 1/log2(2) + 1/log2(3) = 1.630930 -> 0.386853
    assert ndcg_at_k(SCORES, HELD_OUT, k=3) == pytest.approx(0.386853, abs=1e-6)
    # NDCG@6: DCG = 1/log2(3) + 1/log2(5) = 0.630930 + 0.430677 = 1.061606; / 1.630930 = 0.650920
    assert ndcg_at_k(SCORES, HELD_OUT, k=6) == pytest.approx(0.650920, abs=1e-6)
    # NDCG@1: the top item is not relevant -> 0
    assert ndcg_at_k(SCORES, HELD_OUT, k=1) == 0.0


def test_hand_worked_recall_uses_capped_denominator():
    # recall@k = hits in top k / min(k, n_rel): @1 = 0/1, @2 = 1/2, @3 = 1/2, @4 = 2/2
    for k, want in [(1, 0.0), (2, 0.5), (3, 0.5), (4, 1.0)]:
        assert recall_at_k(SCORES, HELD_OUT, k=k) == pytest.approx(want), k
    # 3 relevant items at ranks 1, 2, 3 and k = 2: both slots hit -> 2 / min(2, 3) = 1 (not 2/3);
    # AP@2 = (1/1 + 2/2) / min(2, 3) = 1
    held = _row(1, 1, 1, 0, 0, 0)
    assert recall_at_k(SCORES, held, k=2) == pytest.approx(1.0)
    assert map_at_k(SCORES, held, k=2) == pytest.approx(1.0)


def test_hand_worked_auc_and_per_user_output():
    # negatives 0, 2, 4, 5; item 1 beats 2, 4, 5 (3), item 3 beats 4, 5 (2): AUC = 5 / (2 * 4)
    out = per_user_ranking_metrics(SCORES, HELD_OUT, map_k=6, ndcg_k=3, recall_k=3)
    assert list(out["users"]) == [0] and list(out["n_relevant"]) == [2] and out["n_skipped"] == 0
    assert out["auc"][0] == pytest.approx(0.625)
    assert out["ap"][0] == pytest.approx(0.5)
    assert out["ndcg"][0] == pytest.approx(0.386853, abs=1e-6)
    assert out["recall"][0] == pytest.approx(0.5)


def test_k_larger_than_n_items_acts_as_n_items():
    assert map_at_k(SCORES, HELD_OUT, k=10_000) == map_at_k(SCORES, HELD_OUT, k=6) == pytest.approx(0.5)
    assert ndcg_at_k(SCORES, HELD_OUT, k=10_000) == pytest.approx(0.650920, abs=1e-6)
    assert recall_at_k(SCORES, HELD_OUT, k=10_000) == 1.0


# -- ties -------------------------------------------------------------------------------------

def test_ties_rank_held_out_items_last_for_top_k_and_half_for_auc():
    # item 0 is held out and tied with items 1 and 2: pessimistic rank 3
    scores = np.array([[1.0, 1.0, 1.0, 0.0]])
    held = _row(1, 0, 0, 0)
    assert map_at_k(scores, held, k=4) == pytest.approx(1 / 3)  # P@3 = 1/3
    assert ndcg_at_k(scores, held, k=4) == pytest.approx(0.5)  # 1/log2(1 + 3) / 1
    assert recall_at_k(scores, held, k=2) == 0.0 and recall_at_k(scores, held, k=3) == 1.0
    # AUC: ties with 2 negatives (½ each), beats 1: (0.5 + 0.5 + 1) / 3
    assert per_user_ranking_metrics(scores, held)["auc"][0] == pytest.approx(2 / 3)


def test_tied_held_out_items_share_the_worst_positions():
    # scores 2, 1, 1, 1; held out: items 1 and 2, tied with item 3 -> ranks 3 and 4
    scores = np.array([[2.0, 1.0, 1.0, 1.0]])
    held = _row(0, 1, 1, 0)
    assert map_at_k(scores, held, k=4) == pytest.approx((1 / 3 + 2 / 4) / 2)  # 0.416667
    # AUC: each positive beats nothing among negatives 0, 3, ties with 3: (½ + ½) / (2 * 2) = 0.25
    assert per_user_ranking_metrics(scores, held)["auc"][0] == pytest.approx(0.25)


def test_constant_scores_earn_the_worst_ranking_whatever_the_item_order():
    scores = np.zeros((1, 5))
    for held in (_row(1, 1, 0, 0, 0), _row(0, 0, 0, 1, 1)):
        # ranks 4 and 5 wherever the held-out items sit: AP = (1/4 + 2/5) / 2
        assert map_at_k(scores, held, k=5) == pytest.approx(0.325)
        assert per_user_ranking_metrics(scores, held)["auc"][0] == pytest.approx(0.5)


def _brute_force(scores, held, k_map, k_ndcg, k_recall, exclude=None):
    """Definitions applied literally: sort each user's candidates best first, held-out items
    after non-held-out ones of equal score."""
    out = {}
    for u in range(scores.shape[0]):
        rel = held[u].toarray()[0] > 0
        cand = np.ones(scores.shape[1], bool) if exclude is None else exclude[u].toarray()[0] == 0
        rel = rel[cand]
        s = scores[u][cand]
        if not rel.any():
            continue
        order = np.lexsort((rel, -s))  # primary: score desc; then non-relevant first
        r = rel[order].astype(float)
        n_rel = int(rel.sum())
        prec = np.cumsum(r) / np.arange(1, len(r) + 1)
        ap = float((prec * r)[:k_map].sum() / min(k_map, n_rel))
        disc = 1 / np.log2(np.arange(2, len(r) + 2))
        ndcg = float((r * disc)[:k_ndcg].sum() / disc[: min(k_ndcg, n_rel)].sum())
        recall = float(r[:k_recall].sum() / min(k_recall, n_rel))
        out[u] = (ap, ndcg, recall)
    return out


@pytest.mark.parametrize("block_users", [None, 1, 7])
def test_matches_brute_force_with_many_ties(block_users):
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(60, 25)), 0)  # a handful of distinct values: ties everywhere
    held = sp.csr_matrix(rng.random((60, 25)) < 0.2).astype(float)
    exclude = sp.csr_matrix(rng.random((60, 25)) < 0.1).astype(float)
    for ex in (None, exclude):
        want = _brute_force(scores, held, 7, 5, 3, ex)
        out = per_user_ranking_metrics(scores, held, map_k=7, ndcg_k=5, recall_k=3,
                                       exclude_user_items=ex, block_users=block_users)
        assert list(out["users"]) == sorted(want)
        got = np.column_stack([out["ap"], out["ndcg"], out["recall"]])
        np.testing.assert_allclose(got, [want[u] for u in out["users"]], rtol=1e-12)


def test_tie_policy_does_not_depend_on_item_order():
    rng = np.random.default_rng(4)
    scores = np.round(rng.normal(size=(20, 15)), 0)
    held = sp.csr_matrix(rng.random((20, 15)) < 0.3).astype(float)
    perm = rng.permutation(15)
    a = per_user_ranking_metrics(scores, held, map_k=5, ndcg_k=5, recall_k=5)
    b = per_user_ranking_metrics(scores[:, perm], held[:, perm], map_k=5, ndcg_k=5, recall_k=5)
    for key in ("ap", "ndcg", "recall", "auc"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


# -- agreement with scikit-learn ---------------------------------------------------------------

def test_agrees_with_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 40
    scores = rng.normal(size=(n_users, n_items))  # continuous: no ties, where all policies agree
    held_dense = rng.random((n_users, n_items)) < 0.15
    held_dense[5] = False  # skipped
    held_dense[6] = True  # every item relevant: no negative, AUC undefined
    held = sp.csr_matrix(held_dense).astype(float)
    # k >= n_items: AP@k is sklearn's average precision over the whole ranking
    out = per_user_ranking_metrics(scores, held, map_k=n_items + 5, ndcg_k=5, recall_k=n_items)
    assert 5 not in out["users"] and out["n_skipped"] == 1 and len(out["users"]) == n_users - 1
    for i, u in enumerate(out["users"]):
        y = held_dense[u]
        assert out["ap"][i] == pytest.approx(average_precision_score(y, scores[u]), rel=1e-12)
        assert out["ndcg"][i] == pytest.approx(ndcg_score([y], [scores[u]], k=5), rel=1e-12)
        assert out["recall"][i] == 1.0
        if y.all():
            assert math.isnan(out["auc"][i])
        else:
            assert out["auc"][i] == pytest.approx(roc_auc_score(y, scores[u]), rel=1e-12)
    # the means skip the NaN AUC
    want_auc = np.mean([roc_auc_score(held_dense[u], scores[u]) for u in out["users"] if not held_dense[u].all()])
    assert cold_start_metrics(np.eye(n_users), scores.T, held, map_k=n_items)["auc"] == pytest.approx(want_auc)


def test_exclusions_agree_with_sklearn_on_the_remaining_candidates():
    rng = np.random.default_rng(1)
    n_users, n_items = 30, 25
    scores = rng.normal(size=(n_users, n_items))
    held = sp.csr_matrix(rng.random((n_users, n_items)) < 0.2).astype(float)
    exclude = sp.csr_matrix(rng.random((n_users, n_items)) < 0.3).astype(float)
    out = per_user_ranking_metrics(scores, held, map_k=n_items, ndcg_k=4, exclude_user_items=exclude)
    checked = 0
    for i, u in enumerate(out["users"]):
        cand = exclude[u].toarray()[0] == 0
        y = held[u].toarray()[0][cand] > 0  # a held-out item also excluded is ignored
        assert out["n_relevant"][i] == y.sum() > 0
        assert out["ap"][i] == pytest.approx(average_precision_score(y, scores[u][cand]), rel=1e-12)
        assert out["ndcg"][i] == pytest.approx(ndcg_score([y], [scores[u][cand]], k=4), rel=1e-12)
        if not y.all():
            assert out["auc"][i] == pytest.approx(roc_auc_score(y, scores[u][cand]), rel=1e-12)
        checked += 1
    assert checked > 20


def test_cold_start_auc_matches_per_user_auc_with_exclusions_as_train():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(40, 5)), rng.normal(size=(30, 5))
    Y[4] = Y[9]  # exact ties
    train = sp.csr_matrix(rng.random((40, 30)) < 0.2).astype(float)
    test = sp.csr_matrix(rng.random((40, 30)) < 0.2).astype(float)
    users, auc = per_user_auc(X, Y, train, test)
    out = per_user_ranking_metrics(X @ Y.T, test, exclude_user_items=train)
    ok = ~np.isnan(out["auc"])
    np.testing.assert_array_equal(out["users"][ok], users)
    np.testing.assert_allclose(out["auc"][ok], auc, rtol=1e-12)


# -- cold_start_metrics -----------------------------------------------------------------------

def test_cold_start_metrics_keys_and_agreement_with_score_matrix():
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(80, 6)), rng.normal(size=(120, 6))
    test = sp.csr_matrix(rng.random((80, 120)) < 0.05).astype(float)
    test_dense = test.toarray()
    test_dense[[3, 4]] = 0
    test = sp.csr_matrix(test_dense)
    got = cold_start_metrics(X, Y, test, block_users=9)
    # 120 candidate songs: "mAP@500" never cuts the list, so it is named the full-list mAP
    assert set(got) == {"map_full", "auc", "ndcg10", "recall50", "n_users", "n_skipped", "n_candidates"}
    assert got["n_candidates"] == 120
    n_eval = int((test_dense.sum(axis=1) > 0).sum())
    assert got["n_users"] == n_eval and got["n_skipped"] == 80 - n_eval
    S = X @ Y.T
    assert got["map_full"] == pytest.approx(map_at_k(S, test, k=500), rel=1e-12)
    assert got["ndcg10"] == pytest.approx(ndcg_at_k(S, test, k=10), rel=1e-12)
    assert got["recall50"] == pytest.approx(recall_at_k(S, test, k=50), rel=1e-12)
    per_user = per_user_ranking_metrics(S, test)
    assert got["auc"] == pytest.approx(np.mean(per_user["auc"]), rel=1e-12)
    # other cut-offs rename the keys; a user sample restricts the average
    other = cold_start_metrics(X, Y, test, map_k=20, ndcg_k=5, recall_k=7, users=np.array([0, 3, 10]))
    assert set(other) == {"map20", "auc", "ndcg5", "recall7", "n_users", "n_skipped", "n_candidates"}
    assert other["n_skipped"] == 1 and other["n_users"] == 2


def test_perfect_and_reversed_factors():
    # item factors equal to the held-out pattern make the held-out items score 1, the others 0
    rng = np.random.default_rng(6)
    held = (rng.random((20, 30)) < 0.2).astype(float)
    held[:, 0] = 1.0
    test = sp.csr_matrix(held)
    best = cold_start_metrics(np.eye(20), held.T, test, ndcg_k=3, recall_k=3)
    assert best["map_full"] == best["ndcg3"] == best["recall3"] == best["auc"] == 1.0
    worst = cold_start_metrics(np.eye(20), -held.T, test)
    assert worst["auc"] == 0.0 and worst["map_full"] < 0.5


def test_nobody_to_evaluate_gives_nan_and_counts_the_skipped():
    empty = sp.csr_matrix((4, 6))
    assert math.isnan(map_at_k(np.zeros((4, 6)), empty))
    got = cold_start_metrics(np.ones((4, 2)), np.ones((6, 2)), empty)
    assert math.isnan(got["map_full"]) and math.isnan(got["auc"]) and got["n_users"] == 0 and got["n_skipped"] == 4


def test_memory_stays_within_one_block(monkeypatch):
    # 3,000 users × 2,000 items: the full score matrix would be 48 MB; blocks of 50k scores
    # (0.4 MB) must keep the peak far below it.
    monkeypatch.setattr(metrics_module, "_BATCH_VALUES", 50_000)
    rng = np.random.default_rng(7)
    n_users, n_items = 3_000, 2_000
    X = rng.normal(size=(n_users, 8))
    Y = rng.normal(size=(n_items, 8))
    test = sp.random(n_users, n_items, density=0.003, format="csr", random_state=7)
    full_bytes = n_users * n_items * 8
    tracemalloc.start()
    try:
        got = cold_start_metrics(X, Y, test)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got["n_users"] > 2_500
    assert peak < full_bytes / 10, f"peak {peak / 1e6:.1f} MB vs full matrix {full_bytes / 1e6:.1f} MB"


# -- errors -----------------------------------------------------------------------------------

def test_errors_carry_the_bad_value():
    S = np.zeros((2, 3))
    m = sp.csr_matrix((2, 3))
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        map_at_k(S, m, k=0)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 2.5"):
        ndcg_at_k(S, m, k=2.5)
    with pytest.raises(ValueError, match=r"recall_k must be an integer >= 1, got True"):
        per_user_ranking_metrics(S, m, recall_k=True)
    with pytest.raises(ValueError, match=r"scores are for 2 users × 4 items but test_user_items is \(2, 3\)"):
        map_at_k(np.zeros((2, 4)), m)
    with pytest.raises(ValueError, match=r"2-D .* got shape \(3,\)"):
        map_at_k(np.zeros(3), m)
    bad = np.zeros((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in the row of user 1"):
        map_at_k(bad, sp.csr_matrix(np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"exclude_user_items is \(2, 2\) but test_user_items is \(2, 3\)"):
        map_at_k(S, m, exclude_user_items=sp.csr_matrix((2, 2)))
    with pytest.raises(ValueError, match=r"outside \[0, 2\), e.g. 5"):
        map_at_k(S, m, users=np.array([0, 5]))
    with pytest.raises(ValueError, match=r"duplicates, e.g. 1"):
        map_at_k(S, m, users=np.array([1, 0, 1]))
    with pytest.raises(ValueError, match=r"item_factors has 1 of 3 rows with NaN/inf"):
        cold_start_metrics(np.ones((2, 2)), np.array([[1.0, 0], [np.inf, 0], [0, 0]]), m)
    with pytest.raises(TypeError, match=r"test_user_items must be a scipy.sparse matrix"):
        map_at_k(S, np.zeros((2, 3)))


# -- tag prediction (A′ = U′Vᵀ, tags rank songs) -------------------------------------------------

def test_tag_prediction_metrics_by_hand():
    V = np.array([[1.0, 0.0], [0.0, 1.0]])           # 2 tags
    U = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 songs: A′ = U Vᵀ = U
    song_tags = sp.csr_matrix(np.array([[1, 0], [1, 0], [0, 1]]))  # songs × tags
    got = tag_prediction_metrics(V, U, song_tags)
    # tag 0 ranks songs 0 (2), 2 (1), 1 (0); tagged {0, 1} at ranks 1 and 3:
    #   AP = (1/1 + 2/3) / 2, AUC = 1 win of 2 pairs = 0.5
    # tag 1 scores songs 1 and 2 equally (1); tagged {2}: pessimistic rank 2, AP = 1/2;
    #   AUC = (1 win over song 0 + ½ for the tie with song 1) / 2 = 0.75
    assert got["n_tags"] == 2
    assert got["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert got["auc"] == pytest.approx((0.5 + 0.75) / 2)
    # only the tags asked for
    only = tag_prediction_metrics(V, U, song_tags, tags=np.array([1]))
    assert only["n_tags"] == 1 and only["auc"] == pytest.approx(0.75) and only["map"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"song_tags must be \(n_songs, n_tags\) = \(3, 2\), got \(2, 3\)"):
        tag_prediction_metrics(V, U, song_tags.T)


def test_tag_prediction_metrics_match_scikit_learn_per_tag():
    rng = np.random.default_rng(7)
    V, U = rng.normal(size=(6, 4)), rng.normal(size=(40, 4))
    tagged = rng.random((40, 6)) < 0.3
    tagged[0] = True  # every tag has a tagged song
    tagged[1] = False  # and an untagged one
    got = tag_prediction_metrics(V, U, sp.csr_matrix(tagged.astype(np.float32)))
    scores = U @ V.T  # songs × tags, continuous: no ties
    assert got["auc"] == pytest.approx(np.mean([roc_auc_score(tagged[:, t], scores[:, t]) for t in range(6)]))
    assert got["map"] == pytest.approx(np.mean([average_precision_score(tagged[:, t], scores[:, t]) for t in range(6)]))


# -- honest names ------------------------------------------------------------------------------

def test_a_cut_off_that_cuts_nothing_is_named_the_full_list_metric_with_its_k_recorded():
    rng = np.random.default_rng(11)
    X, Y = rng.normal(size=(40, 4)), rng.normal(size=(108, 4))  # 108 test songs, as in the demo
    test = sp.csr_matrix(rng.random((40, 108)) < 0.08).astype(float)
    got = cold_start_metrics(X, Y, test, map_k=500, ndcg_k=10, recall_k=50)
    assert "map500" not in got and {"map_full", "ndcg10", "recall50"} <= set(got)
    assert got["n_candidates"] == 108
    # the value is exactly the full-list mAP (k = the number of candidates)
    assert got["map_full"] == pytest.approx(map_at_k(X @ Y.T, test, k=108), rel=1e-12)
    # NDCG and recall likewise once their k reaches the candidates; recall is then 1 by construction
    full = cold_start_metrics(X, Y, test, map_k=108, ndcg_k=108, recall_k=200)
    assert {"map_full", "ndcg_full", "recall_full"} <= set(full) and full["recall_full"] == pytest.approx(1.0)
    # one below the number of candidates still cuts the list: the @k name stays
    assert "map107" in cold_start_metrics(X, Y, test, map_k=107)
    # what each name means, with the k that was asked for
    d = describe_cutoffs(map_k=500, ndcg_k=10, recall_k=50, n_candidates=108)
    assert set(d) == {"map_full", "ndcg10", "recall50"}
    assert d["map_full"]["k"] == 500 and d["map_full"]["full_list"] and d["map_full"]["n_candidates"] == 108
    assert "k=500" in d["map_full"]["description"] and "108" in d["map_full"]["description"]
    assert d["map_full"]["label"] == "mAP (full list)" and d["ndcg10"]["label"] == "NDCG@10"
    assert not d["ndcg10"]["full_list"]
    assert cutoff_name("map", 500, 9330) == "map500" and cutoff_name("ndcg", 10, 10) == "ndcg_full"
    assert metric_label("map500") == "mAP@500" and metric_label("recall_full") == "recall (full list)"
    with pytest.raises(ValueError, match="'mrr'"):
        cutoff_name("mrr", 5, 10)
