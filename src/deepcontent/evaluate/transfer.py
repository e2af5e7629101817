"""Transfer evaluation (ISMIR 2014): how well learned features serve other tasks.

Pure functions over feature matrices (n_clips, d):

- :func:`nested_cv_svm_accuracy` — genre-style classification (GTZAN, Unique, 1517-Artists):
  linear L2-SVMs, C chosen by an inner stratified CV, accuracy over an outer stratified CV.
- :func:`tag_auc` — MagnaTagATune-style tagging: one linear classifier per tag, C chosen on a
  validation part, ROC AUC per tag on the test part; :func:`mtat_part_split`,
  :func:`most_frequent_tags` and :func:`mtat_tag_auc` give the standard top-50 / all-tags setup.
- :func:`late_fusion` — averages decision scores of models trained on different inputs
  (original / harmonic / percussive spectrograms); :func:`late_fusion_svm_accuracy` is the
  nested-CV accuracy of such a fusion.
- :func:`descriptor_correlations` — which embedding dimension tracks each hand-crafted
  descriptor (loudness, onset rate…), by Pearson r.

Features are standardised with statistics of the training part only, so nothing about the test
clips leaks into the classifier. The classifier is scikit-learn's ``LinearSVC`` (liblinear, as
in the paper): L2 penalty, squared hinge loss — the L2-SVM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

__all__ = [
    "DEFAULT_CS",
    "MTAT_SPLITS",
    "descriptor_correlations",
    "late_fusion",
    "late_fusion_svm_accuracy",
    "most_frequent_tags",
    "mtat_part_split",
    "mtat_tag_auc",
    "nested_cv_svm_accuracy",
    "tag_auc",
]

# A log grid wide enough for standardised features of a few hundred to a few thousand dims.
DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_MAX_ITER = 5000


def _svm(C: float, seed: int) -> LinearSVC:
    return LinearSVC(C=C, penalty="l2", loss="squared_hinge", dual="auto", max_iter=_MAX_ITER, random_state=seed)


def _check_features(features, n: int | None = None, *, name: str = "features") -> np.ndarray:
    F = np.asarray(features, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {F.shape}")
    if n is not None and F.shape[0] != n:
        raise ValueError(f"{name} has {F.shape[0]} rows but the labels have {n}")
    bad = int(np.count_nonzero(~np.isfinite(F).all(axis=1)))
    if bad:
        raise ValueError(f"{name} has {bad} of {F.shape[0]} rows with NaN/inf")
    return F


def _check_cs(Cs) -> tuple[float, ...]:
    cs = tuple(float(c) for c in Cs)
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"Cs must be a non-empty sequence of positive numbers, got {Cs!r}")
    return cs


def _check_folds(folds, name: str) -> int:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {folds!r}")
    return int(folds)


# -- genre-style classification ---------------------------------------------------------------

def nested_cv_svm_accuracy(
    features: np.ndarray,
    labels: Sequence,
    *,
    folds: int = 10,
    inner_folds: int = 5,
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict:
    """Accuracy of a linear L2-SVM by nested stratified cross-validation.

    For each of ``folds`` outer stratified folds: standardise on the training part, pick C by
    ``inner_folds``-fold stratified CV on that training part (mean accuracy; ties go to the
    smallest C, the most regularised), refit on the whole training part, predict the held-out
    fold.

    Parameters
    ----------
    features : np.ndarray, (n, d)
    labels : sequence, (n,)
        Class labels (strings or integers).
    folds, inner_folds : int
        Outer and inner fold counts; every class needs at least ``folds`` examples, and at least
        ``inner_folds`` of them in every outer training part.
    Cs : iterable of float
        Candidate C values.
    seed : int
        Fold shuffling and liblinear's coordinate order.

    Returns
    -------
    dict
        ``mean``, ``std`` (population std over the outer folds, as in "0.882 ± 0.024"),
        ``per_fold`` (list of accuracies), ``chosen_C`` (list, one per outer fold),
        ``confusion`` (list of lists, (n_classes, n_classes), rows = true class, columns =
        predicted, summed over the outer folds, so it sums to n), ``classes`` (sorted labels, the
        order of the confusion matrix's rows and columns).
    """
    return _nested_cv([features], labels, folds=folds, inner_folds=inner_folds, Cs=Cs, seed=seed)


def late_fusion_svm_accuracy(
    feature_sets: Sequence[np.ndarray],
    labels: Sequence,
    *,
    folds: int = 10,
    inner_folds: int = 5,
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict:
    """Nested-CV accuracy of late fusion: one L2-SVM per feature set (e.g. features of the
    original, harmonic and percussive spectrograms of the same clips), each with its own C
    chosen by the inner CV, decision scores averaged (:func:`late_fusion`) on the held-out fold.

    Parameters
    ----------
    feature_sets : sequence of np.ndarray, each (n, d_i)
        Rows are the same clips in the same order; widths may differ.
    labels, folds, inner_folds, Cs, seed
        As in :func:`nested_cv_svm_accuracy`, whose result this returns too (``chosen_C`` is
        then one list per outer fold with one C per feature set). The outer folds are the same
        as :func:`nested_cv_svm_accuracy`'s for the same ``seed``, so the two are comparable fold
        by fold.
    """
    if isinstance(feature_sets, np.ndarray) or not len(feature_sets):
        raise ValueError("feature_sets must be a non-empty sequence of (n, d) arrays")
    return _nested_cv(list(feature_sets), labels, folds=folds, inner_folds=inner_folds, Cs=Cs, seed=seed)


def _nested_cv(feature_sets: list, labels, *, folds: int, inner_folds: int, Cs, seed: int) -> dict:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (n,), got shape {y.shape}")
    Xs = [_check_features(f, len(y), name="features" if len(feature_sets) == 1 else f"feature_sets[{i}]")
          for i, f in enumerate(feature_sets)]
    folds, inner_folds = _check_folds(folds, "folds"), _check_folds(inner_folds, "inner_folds")
    # ascending, because GridSearchCV breaks ties by grid order: a tie goes to the smallest C
    cs = sorted(_check_cs(Cs))
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"labels need at least 2 classes, got {classes.tolist()!r}")
    smallest = int(counts.min())
    rarest = classes[int(np.argmin(counts))].item()
    # an outer training part keeps at least count - ceil(count / folds) examples of a class
    if smallest < folds or smallest - -(-smallest // folds) < inner_folds:
        raise ValueError(
            f"class {rarest!r} has {smallest} examples: too few for {folds} outer × {inner_folds} inner "
            f"stratified folds"
        )
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    per_fold, chosen = [], []
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for train, test in outer.split(Xs[0], y):
        scores, cs_fold = [], []
        for X in Xs:
            search = GridSearchCV(
                make_pipeline(StandardScaler(), _svm(1.0, seed)),
                {"linearsvc__C": list(cs)},
                cv=StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed),
                scoring="accuracy",
                refit=True,
                n_jobs=1,
            )
            search.fit(X[train], y[train])
            scores.append(search.decision_function(X[test]))
            cs_fold.append(float(search.best_params_["linearsvc__C"]))
        fused = late_fusion(scores) if len(scores) > 1 else scores[0]
        # two classes: one signed score (positive = classes[1]), as LinearSVC itself decides
        pred = classes[(fused > 0).astype(int)] if fused.ndim == 1 else classes[np.argmax(fused, axis=1)]
        per_fold.append(float(np.mean(pred == y[test])))
        chosen.append(cs_fold[0] if len(Xs) == 1 else cs_fold)
        confusion += confusion_matrix(y[test], pred, labels=classes)
    return {
        "mean": float(np.mean(per_fold)),
        "std": float(np.std(per_fold)),
        "per_fold": per_fold,
        "chosen_C": chosen,
        "confusion": confusion.tolist(),
        "classes": classes.tolist(),
    }


# -- MagnaTagATune-style tagging --------------------------------------------------------------

# MagnaTagATune's clips sit in 16 folders ("parts") named 0–9, a–f by the first character of
# ``mp3_path``. "standard": parts 0–b train, c validation, d–f test (12 / 1 / 3), the split used
# by most MTAT tagging results; "ismir2014": parts 1–11 train, 12–13 validation, 14–16 test in
# 1-based numbering (folders 0–a / b–c / d–f), the split of the ISMIR 2014 transfer paper.
MTAT_SPLITS: dict[str, dict[str, str]] = {
    "standard": {"train": "0123456789ab", "valid": "c", "test": "def"},
    "ismir2014": {"train": "0123456789a", "valid": "bc", "test": "def"},
}


def mtat_part_split(parts: Iterable[str], *, scheme: str = "ismir2014") -> dict[str, np.ndarray]:
    """Train / validation / test masks from MagnaTagATune parts.

    Parameters
    ----------
    parts : iterable of str, (n,)
        Each clip's ``mp3_path`` (``"f/american_bach_soloists-….mp3"``) or just its folder
        (``"f"``); the part is the leading folder, one hex digit 0–f (case-insensitive).
    scheme : {"ismir2014", "standard"}
        ``"ismir2014"`` (default, the transfer paper's protocol): parts 0–a train, b–c
        validation, d–f test (its "1–11 / 12–13 / 14–16"). ``"standard"``: parts 0–b train,
        c validation, d–f test (the common auto-tagging split). See
        :data:`MTAT_SPLITS`.

    Returns
    -------
    dict
        ``{"train", "valid", "test"}`` → boolean masks (n,), disjoint and covering every clip.
    """
    if scheme not in MTAT_SPLITS:
        raise ValueError(f"scheme must be one of {sorted(MTAT_SPLITS)}, got {scheme!r}")
    folders = []
    for i, p in enumerate(parts):
        head = str(p).replace("\\", "/").lstrip("/").split("/", 1)[0].lower()
        if len(head) != 1 or head not in "0123456789abcdef":
            raise ValueError(f"parts[{i}] = {p!r}: the leading folder must be one hex digit 0–f")
        folders.append(head)
    folders = np.asarray(folders, dtype="<U1")
    return {name: np.isin(folders, list(chars)) for name, chars in MTAT_SPLITS[scheme].items()}


def _check_tag_matrix(tag_matrix, n: int | None = None) -> np.ndarray:
    T = np.asarray(tag_matrix.toarray() if hasattr(tag_matrix, "toarray") else tag_matrix)
    if T.ndim != 2:
        raise ValueError(f"tag_matrix must be 2-D (n, n_tags), got shape {T.shape}")
    if n is not None and T.shape[0] != n:
        raise ValueError(f"tag_matrix has {T.shape[0]} rows but features have {n}")
    bad = ~np.isin(T, (0, 1))
    if bad.any():
        raise ValueError(f"tag_matrix must be binary (0/1), found {T[bad].flat[0].item()!r}")
    return T.astype(bool)


def most_frequent_tags(tag_matrix, *, n: int = 50, rows: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``n`` most frequent tags (column sums of ``tag_matrix`` (n_clips, n_tags)
    over ``rows``, a boolean mask or None for all clips), most frequent first; equal counts keep
    the lower index first. ``np.arange(n_tags)`` is "all tags"."""
    T = _check_tag_matrix(tag_matrix)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    counts = (T if rows is None else T[np.asarray(rows, dtype=bool)]).sum(axis=0)
    return np.argsort(-counts, kind="stable")[: int(n)]


def _masks(n: int, **masks) -> dict[str, np.ndarray]:
    out = {}
    for name, m in masks.items():
        m = np.asarray(m)
        if m.shape != (n,) or m.dtype != bool:
            raise ValueError(f"{name} must be a boolean mask of shape ({n},), got dtype {m.dtype} and shape {m.shape}")
        out[name] = m
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = int(np.count_nonzero(out[a] & out[b]))
            if overlap:
                raise ValueError(f"{a} and {b} overlap on {overlap} clips")
    return out


def _both_classes(T: np.ndarray) -> np.ndarray:
    s = T.sum(axis=0)
    return (s > 0) & (s < T.shape[0])


def tag_auc(
    features: np.ndarray,
    tag_matrix,
    *,
    train_mask: np.ndarray,
    valid_mask: np.ndarray,
    test_mask: np.ndarray,
    tags: np.ndarray | None = None,
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict:
    """Per-tag ROC AUC of one-vs-rest linear L2-SVMs, C chosen on the validation part.

    For each tag and each C, an SVM is fitted on the (standardised) training part; its decision
    scores give a validation AUC and a test AUC. One C is chosen for the whole tag set: the one
    with the best mean validation AUC over the tags with both classes in train and validation
    (ties: the smallest C). The result is the test AUC at that C, averaged over the tags with both
    classes in train and test (the others cannot be trained or scored and are left out, counted
    in ``n_tags_skipped``). The validation part only chooses C; the final classifiers are the
    ones fitted on the training part.

    Parameters
    ----------
    features : np.ndarray, (n, d)
    tag_matrix : array or sparse, (n, n_tags), binary
    train_mask, valid_mask, test_mask : np.ndarray of bool, (n,)
        Disjoint parts (see :func:`mtat_part_split`).
    tags : np.ndarray of int or None
        Columns to evaluate (e.g. :func:`most_frequent_tags`); None: all.
    Cs : iterable of float
    seed : int
        liblinear's coordinate order.

    Returns
    -------
    dict
        ``auc_mean`` (NaN when no tag qualifies), ``per_tag_auc`` (list, one per entry of
        ``tags``, NaN where skipped), ``tags`` (list of column indices), ``chosen_C``,
        ``valid_auc_by_C`` ({C: mean validation AUC}), ``n_tags_evaluated``, ``n_tags_skipped``.
    """
    F = _check_features(features)
    T = _check_tag_matrix(tag_matrix, F.shape[0])
    m = _masks(F.shape[0], train_mask=train_mask, valid_mask=valid_mask, test_mask=test_mask)
    cs = sorted(_check_cs(Cs))
    cols = np.arange(T.shape[1]) if tags is None else np.asarray(tags, dtype=np.int64).ravel()
    if cols.size and (cols.min() < 0 or cols.max() >= T.shape[1]):
        raise ValueError(f"tags must index the {T.shape[1]} tag columns, got {cols.min()}..{cols.max()}")
    scaler = StandardScaler().fit(F[m["train_mask"]])
    Xtr, Xva, Xte = (scaler.transform(F[m[k]]) for k in ("train_mask", "valid_mask", "test_mask"))
    Ttr, Tva, Tte = (T[m[k]][:, cols] for k in ("train_mask", "valid_mask", "test_mask"))
    trainable = _both_classes(Ttr)
    scored_valid = trainable & _both_classes(Tva)
    scored_test = trainable & _both_classes(Tte)
    valid_auc = np.full((len(cs), len(cols)), np.nan)
    test_auc = np.full((len(cs), len(cols)), np.nan)
    for t in np.flatnonzero(scored_valid | scored_test):
        for ci, C in enumerate(cs):
            svm = _svm(C, seed).fit(Xtr, Ttr[:, t])
            if scored_valid[t]:
                valid_auc[ci, t] = roc_auc_score(Tva[:, t], svm.decision_function(Xva))
            if scored_test[t]:
                test_auc[ci, t] = roc_auc_score(Tte[:, t], svm.decision_function(Xte))
    if scored_valid.any():
        mean_valid = valid_auc[:, scored_valid].mean(axis=1)
        best = int(np.argmax(mean_valid))  # first maximum = smallest C
    else:
        # nothing to choose on: the most regularised C
        mean_valid, best = np.full(len(cs), np.nan), 0
    per_tag = test_auc[best]
    return {
        "auc_mean": float(np.nanmean(per_tag)) if scored_test.any() else float("nan"),
        "per_tag_auc": per_tag.tolist(),
        "tags": cols.tolist(),
        "chosen_C": cs[best],
        "valid_auc_by_C": {c: float(v) for c, v in zip(cs, mean_valid)},
        "n_tags_evaluated": int(scored_test.sum()),
        "n_tags_skipped": int(len(cols) - scored_test.sum()),
    }


def mtat_tag_auc(
    features: np.ndarray,
    tag_matrix,
    parts: Iterable[str],
    *,
    top: int = 50,
    scheme: str = "ismir2014",
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict:
    """The MagnaTagATune protocol: :func:`tag_auc` on the ``top`` most frequent tags (counted
    over all clips, as the usual top-50 list is) and on all tags, with the parts split of
    :func:`mtat_part_split`. Returns ``{f"top{top}": …, "all": …}``."""
    split = mtat_part_split(parts, scheme=scheme)
    kw = dict(train_mask=split["train"], valid_mask=split["valid"], test_mask=split["test"], Cs=Cs, seed=seed)
    return {
        f"top{top}": tag_auc(features, tag_matrix, tags=most_frequent_tags(tag_matrix, n=top), **kw),
        "all": tag_auc(features, tag_matrix, tags=None, **kw),
    }


# -- fusion and interpretation ----------------------------------------------------------------

def late_fusion(scores_list: Sequence[np.ndarray], *, weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of per-model decision scores (e.g. SVMs on original, harmonic and percussive
    spectrogram features).

    Parameters
    ----------
    scores_list : sequence of np.ndarray, each (n, n_classes) (or (n,))
        Same shape for every model. Decision scores of different models are on comparable scales
        when each model's features were standardised, as in this module.
    weights : sequence of float or None
        One non-negative weight per model (normalised to sum 1); None: equal weights.

    Returns
    -------
    np.ndarray, float64, the shape of one entry. ``argmax(axis=1)`` gives the fused class.
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in scores_list]
    if not arrays:
        raise ValueError("scores_list is empty")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"scores_list entries must have one shape, got {[a.shape for a in arrays]}")
    if weights is None:
        w = np.full(len(arrays), 1.0 / len(arrays))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(arrays),) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(arrays)} non-negative numbers, not all 0, got {weights!r}")
        w = w / w.sum()
    return np.tensordot(w, np.stack(arrays), axes=1)


def descriptor_correlations(embedding: np.ndarray, descriptors: Mapping[str, np.ndarray]) -> dict:
    """The embedding dimension most correlated with each descriptor.

    Parameters
    ----------
    embedding : np.ndarray, (n, d)
        One row per clip; must be finite.
    descriptors : mapping name -> np.ndarray (n,)
        Hand-crafted descriptors (loudness, onset rate, …). Clips where a descriptor is NaN are
        left out for that descriptor.

    Returns
    -------
    dict
        ``{name: {"dim": int, "r": float}}``: the dimension with the largest |Pearson r| and its
        signed r. Constant embedding dimensions (r undefined) are never chosen; a descriptor that
        is constant, or has fewer than 3 clips, gets ``{"dim": None, "r": nan}``.
    """
    E = _check_features(embedding, name="embedding")
    out = {}
    for name, values in descriptors.items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (E.shape[0],):
            raise ValueError(f"descriptor {name!r} has shape {v.shape}, expected ({E.shape[0]},)")
        ok = ~np.isnan(v)
        if np.isinf(v[ok]).any():
            raise ValueError(f"descriptor {name!r} has inf values")
        e, x = E[ok], v[ok]
        if len(x) < 3:
            out[name] = {"dim": None, "r": float("nan")}
            continue
        ec = e - e.mean(axis=0)
        xc = x - x.mean()
        denom = np.sqrt((ec**2).sum(axis=0) * (xc**2).sum())
        # a constant column (or descriptor) has zero spread: r undefined, reported as NaN
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denom > 0, (ec * xc[:, None]).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)
        if np.isnan(r).all():
            out[name] = {"dim": None, "r": float("nan")}
            continue
        dim = int(np.nanargmax(np.abs(r)))
        out[name] = {"dim": dim, "r": float(np.clip(r[dim], -1.0, 1.0))}
    return out
