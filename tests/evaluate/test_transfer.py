"""Transfer evaluation on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from deepcontent.evaluate.transfer import (
    descriptor_correlations,
    late_fusion,
    late_fusion_svm_accuracy,
    most_frequent_tags,
    mtat_part_split,
    mtat_tag_auc,
    nested_cv_svm_accuracy,
    tag_auc,
)

CS = (0.01, 1.0)


def _clusters(n_per_class: int, n_classes: int, d: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * spread
    labels = np.repeat(np.array([f"genre{c}" for c in range(n_classes)]), n_per_class)
    X = centres[np.repeat(np.arange(n_classes), n_per_class)] + rng.normal(size=(n_classes * n_per_class, d))
    return X, labels


# -- nested CV --------------------------------------------------------------------------------

def test_separable_clusters_are_classified_perfectly():
    X, y = _clusters(30, 3, 10, spread=10.0, seed=0)
    got = nested_cv_svm_accuracy(X, y, folds=10, inner_folds=5, Cs=CS, seed=0)
    assert got["mean"] == pytest.approx(1.0) and got["std"] == pytest.approx(0.0)
    assert len(got["per_fold"]) == 10 and len(got["chosen_C"]) == 10
    assert set(got["chosen_C"]) <= set(CS)
    assert got["classes"] == ["genre0", "genre1", "genre2"]
    # perfect: the confusion matrix is diagonal with the class counts
    assert got["confusion"] == [[30, 0, 0], [0, 30, 0], [0, 0, 30]]


def test_random_labels_score_near_chance_and_confusion_sums_to_n():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(160, 6))
    y = np.repeat(np.arange(4), 40)
    rng.shuffle(y)
    got = nested_cv_svm_accuracy(X, y, folds=8, inner_folds=4, Cs=CS, seed=1)
    assert 0.1 < got["mean"] < 0.4  # chance is 0.25
    C = np.array(got["confusion"])
    assert C.shape == (4, 4) and C.sum() == 160
    np.testing.assert_array_equal(C.sum(axis=1), [40, 40, 40, 40])  # each clip tested exactly once
    # the outer folds are equal-sized, so the mean of the fold accuracies is the trace / n
    assert got["mean"] == pytest.approx(np.trace(C) / 160)
    assert got["classes"] == [0, 1, 2, 3]


def test_late_fusion_of_complementary_views_beats_each_view():
    # view A tells classes 0 and 1 apart (and from 2/3) but not 2 from 3; view B the reverse —
    # as harmonic and percussive spectrograms each carry part of a genre. Averaged decision
    # scores recover all four classes.
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 30)
    centre_a = np.array([[6, 0], [0, 6], [-3, -3], [-3, -3]], float)
    centre_b = np.array([[-3, -3], [-3, -3], [6, 0], [0, 6]], float)
    A = centre_a[y] + rng.normal(size=(120, 2))
    B = centre_b[y] + rng.normal(size=(120, 2))
    kw = dict(folds=5, inner_folds=3, Cs=CS, seed=0)
    alone = [nested_cv_svm_accuracy(X, y, **kw)["mean"] for X in (A, B)]
    fused = late_fusion_svm_accuracy([A, B], y, **kw)
    assert max(alone) < 0.8 and fused["mean"] > 0.95, (alone, fused["mean"])
    assert len(fused["chosen_C"]) == 5 and all(len(c) == 2 for c in fused["chosen_C"])
    assert np.array(fused["confusion"]).sum() == 120


def test_two_classes_are_decided_by_the_sign_of_the_score():
    # two classes: LinearSVC gives one signed score per clip (positive = the second class)
    X, y = _clusters(20, 2, 3, spread=12.0, seed=5)
    kw = dict(folds=5, inner_folds=3, Cs=CS, seed=0)
    for got in (nested_cv_svm_accuracy(X, y, **kw), late_fusion_svm_accuracy([X, X[:, :2]], y, **kw)):
        assert got["mean"] == pytest.approx(1.0)
        assert got["confusion"] == [[20, 0], [0, 20]] and got["classes"] == ["genre0", "genre1"]


def test_late_fusion_of_one_view_with_itself_is_that_view():
    X, y = _clusters(20, 3, 4, spread=1.0, seed=4)
    kw = dict(folds=5, inner_folds=3, Cs=CS, seed=2)
    single, fused = nested_cv_svm_accuracy(X, y, **kw), late_fusion_svm_accuracy([X, X], y, **kw)
    assert fused["per_fold"] == single["per_fold"] and fused["confusion"] == single["confusion"]
    with pytest.raises(ValueError, match="feature_sets"):
        late_fusion_svm_accuracy([], y, **kw)
    with pytest.raises(ValueError, match=r"feature_sets\[1\] has 5 rows"):
        late_fusion_svm_accuracy([X, X[:5]], y, **kw)


def test_nested_cv_is_deterministic_and_validates():
    X, y = _clusters(12, 2, 4, spread=1.0, seed=2)
    a = nested_cv_svm_accuracy(X, y, folds=4, inner_folds=3, Cs=CS, seed=5)
    b = nested_cv_svm_accuracy(X, y, folds=4, inner_folds=3, Cs=CS, seed=5)
    assert a == b
    with pytest.raises(ValueError, match=r"class 'genre0' has 12 examples: too few for 20 outer"):
        nested_cv_svm_accuracy(X, y, folds=20, Cs=CS)
    with pytest.raises(ValueError, match=r"too few for 4 outer × 10 inner"):
        nested_cv_svm_accuracy(X, y, folds=4, inner_folds=10, Cs=CS)
    with pytest.raises(ValueError, match=r"Cs must be a non-empty sequence of positive numbers, got \(0.0,\)"):
        nested_cv_svm_accuracy(X, y, Cs=(0.0,))
    with pytest.raises(ValueError, match=r"features has 3 rows but the labels have 24"):
        nested_cv_svm_accuracy(X[:3], y)
    with pytest.raises(ValueError, match=r"at least 2 classes, got \['a'\]"):
        nested_cv_svm_accuracy(X, np.array(["a"] * 24))
    with pytest.raises(ValueError, match=r"folds must be an integer >= 2, got 1"):
        nested_cv_svm_accuracy(X, y, folds=1)


# -- MagnaTagATune split and tags --------------------------------------------------------------

def test_mtat_part_split():
    paths = [f"{h}/artist_{i}-track.mp3" for i, h in enumerate("0123456789abcdef")]
    std = mtat_part_split(paths, scheme="standard")
    assert std["train"].sum() == 12 and std["valid"].sum() == 1 and std["test"].sum() == 3
    assert list(np.flatnonzero(std["valid"])) == [12]  # folder c
    assert list(np.flatnonzero(std["test"])) == [13, 14, 15]  # folders d, e, f
    paper = mtat_part_split(paths)  # the paper's split is the default
    assert paper["train"].sum() == 11 and list(np.flatnonzero(paper["valid"])) == [11, 12]
    for split in (std, paper):
        together = split["train"].astype(int) + split["valid"] + split["test"]
        assert (together == 1).all()  # disjoint and covering
    assert mtat_part_split(["C", "/d/x.mp3"], scheme="standard")["valid"].tolist() == [True, False]
    with pytest.raises(ValueError, match=r"parts\[1\] = 'g/x.mp3'"):
        mtat_part_split(["0/a.mp3", "g/x.mp3"])
    with pytest.raises(ValueError, match=r"scheme must be one of .* got 'x'"):
        mtat_part_split(["0"], scheme="x")


def test_most_frequent_tags():
    T = np.array([[1, 0, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0]])
    # counts 2, 1, 3, 1: tag 2, then 0, then 1 and 3 tied (lower index first)
    assert most_frequent_tags(T, n=3).tolist() == [2, 0, 1]
    assert most_frequent_tags(sp.csr_matrix(T), n=10).tolist() == [2, 0, 1, 3]
    assert most_frequent_tags(T, n=1, rows=np.array([True, True, False])).tolist() == [0]
    with pytest.raises(ValueError, match=r"binary \(0/1\), found 2"):
        most_frequent_tags(T * 2)


def _tag_world(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 320
    X = rng.normal(size=(n, 8))
    parts = [f"{'0123456789abcdef'[i % 16]}/clip{i}.mp3" for i in range(n)]
    T = np.zeros((n, 4), dtype=int)
    T[:, 0] = X[:, 0] + 0.1 * rng.normal(size=n) > 0.3  # learnable from feature 0
    T[:, 1] = rng.random(n) < 0.5  # unrelated to the features
    T[:, 2] = X[:, 1] - X[:, 2] > 0.5  # learnable, less frequent
    test = mtat_part_split(parts)["test"]
    T[:, 3] = (~test) & (rng.random(n) < 0.3)  # never positive in the test part
    return X, T, parts


def test_tag_auc_recovers_learnable_tags():
    X, T, parts = _tag_world()
    split = mtat_part_split(parts)
    got = tag_auc(X, T, train_mask=split["train"], valid_mask=split["valid"], test_mask=split["test"], Cs=CS)
    auc = got["per_tag_auc"]
    assert auc[0] > 0.95 and auc[2] > 0.95
    assert 0.3 < auc[1] < 0.7
    assert math.isnan(auc[3])  # one class only in the test part: skipped
    assert got["n_tags_evaluated"] == 3 and got["n_tags_skipped"] == 1
    assert got["auc_mean"] == pytest.approx(np.nanmean(auc))
    assert got["chosen_C"] in CS and set(got["valid_auc_by_C"]) == set(CS)
    assert got["tags"] == [0, 1, 2, 3]


def test_mtat_tag_auc_top_and_all():
    X, T, parts = _tag_world(1)
    got = mtat_tag_auc(X, T, parts, top=2, Cs=CS)
    assert set(got) == {"top2", "all"}
    assert got["top2"]["tags"] == most_frequent_tags(T, n=2).tolist()
    assert got["all"]["n_tags_evaluated"] == 3
    by_tag = dict(zip(got["all"]["tags"], got["all"]["per_tag_auc"]))
    for t, a in zip(got["top2"]["tags"], got["top2"]["per_tag_auc"]):
        if got["top2"]["chosen_C"] == got["all"]["chosen_C"]:
            assert a == pytest.approx(by_tag[t])


def test_tag_auc_validates_masks():
    X, T, parts = _tag_world()
    split = mtat_part_split(parts)
    with pytest.raises(ValueError, match=r"train_mask and test_mask overlap on 60 clips"):
        tag_auc(X, T, train_mask=split["train"] | split["test"], valid_mask=split["valid"],
                test_mask=split["test"], Cs=CS)
    with pytest.raises(ValueError, match=r"valid_mask must be a boolean mask of shape \(320,\)"):
        tag_auc(X, T, train_mask=split["train"], valid_mask=split["valid"].astype(int),
                test_mask=split["test"], Cs=CS)
    with pytest.raises(ValueError, match=r"tags must index the 4 tag columns, got 0..7"):
        tag_auc(X, T, train_mask=split["train"], valid_mask=split["valid"], test_mask=split["test"],
                tags=np.array([0, 7]), Cs=CS)


# -- late fusion ------------------------------------------------------------------------------

def test_late_fusion():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(late_fusion([a, b]), [[2.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(late_fusion([a, b], weights=[3, 1]), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match=r"one shape, got \[\(2, 2\), \(2, 3\)\]"):
        late_fusion([a, np.zeros((2, 3))])
    with pytest.raises(ValueError, match=r"weights must be 2 non-negative numbers"):
        late_fusion([a, b], weights=[1, -1])
    with pytest.raises(ValueError, match=r"empty"):
        late_fusion([])


def test_late_fusion_of_complementary_models_beats_each():
    # model A sees classes 0/1 well and guesses on 2; model B the reverse: the average is right
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 50)
    onehot = np.eye(3)[y]
    a = onehot * np.array([2.0, 2.0, 0.0]) + 0.4 * rng.normal(size=(150, 3))
    b = onehot * np.array([0.0, 2.0, 2.0]) + 0.4 * rng.normal(size=(150, 3))
    acc = lambda s: float(np.mean(s.argmax(axis=1) == y))  # noqa: E731
    assert acc(late_fusion([a, b])) > max(acc(a), acc(b)) + 0.1


# -- descriptor correlations ------------------------------------------------------------------

def test_descriptor_correlations_recover_planted_dimensions():
    rng = np.random.default_rng(4)
    E = rng.normal(size=(200, 16))
    E[:, 3] = 7.0  # a dead unit: constant, r undefined, must not win or crash
    loudness = 2.0 * E[:, 5] + 0.1 * rng.normal(size=200)
    onset_rate = -E[:, 11] + 0.2 * rng.normal(size=200)
    onset_rate[:10] = np.nan  # missing for a few clips
    got = descriptor_correlations(E, {"loudness": loudness, "onset_rate": onset_rate,
                                      "constant": np.ones(200)})
    assert got["loudness"]["dim"] == 5 and got["loudness"]["r"] > 0.99
    assert got["onset_rate"]["dim"] == 11 and got["onset_rate"]["r"] < -0.95
    want = np.corrcoef(E[10:, 11], onset_rate[10:])[0, 1]
    assert got["onset_rate"]["r"] == pytest.approx(want, rel=1e-10)
    assert got["constant"]["dim"] is None and math.isnan(got["constant"]["r"])
    with pytest.raises(ValueError, match=r"descriptor 'x' has shape \(3,\), expected \(200,\)"):
        descriptor_correlations(E, {"x": np.ones(3)})


def test_svm_fits_that_stop_at_max_iter_are_counted_not_printed(monkeypatch):
    import warnings

    from deepcontent.evaluate import transfer

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 40)), np.repeat([0, 1, 2], 20)
    monkeypatch.setattr(transfer, "_MAX_ITER", 1)  # liblinear cannot converge in one iteration
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes fails the test
        result = nested_cv_svm_accuracy(X, y, folds=3, inner_folds=2, Cs=(1.0, 10.0))
    assert result["svm_fits_not_converged"] > 0
    monkeypatch.setattr(transfer, "_MAX_ITER", 5000)
    assert nested_cv_svm_accuracy(X, y, folds=3, inner_folds=2, Cs=(0.01,))["svm_fits_not_converged"] == 0
