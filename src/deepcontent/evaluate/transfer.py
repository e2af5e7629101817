"""Transfer evaluation (ISMIR 2014): how well learned features serve other tasks.

Pure functions over feature matrices (n_clips, d):

- :func:`nested_cv_svm_accuracy` — genre-style classification (GTZAN, Unique, 1517-Artists):
  linear L2-SVMs, C chosen by an inner stratified CV, accuracy over an outer stratified CV.
- :func:`grouped_nested_cv_svm_accuracy` — the same with a grouping per clip (artist, album,
  source): no group is ever on both sides of a split, outer or inner (:func:`group_splits`:
  leave-one-group-out when the groups are few, stratified grouped k-fold otherwise).
- :func:`cross_group_nn_accuracy` — 1-nearest-neighbour accuracy where the neighbour must come
  from another group (cosine on standardised features).
- :func:`transfer_protocols` — all three for one feature set, with fold counts fitted to the
  data, as the ``transfer`` command and the evaluation report them.

Why groups: a stratified k-fold over the tracks of a real collection puts songs of one artist,
album or soundtrack on both sides of the split, and a classifier that recognises the artist
(its production, its recording chain, a recurring tone) scores well without knowing the genre
(Sturm's artist-filter critique of GTZAN). A grouped protocol holds out whole groups, so what it
measures is what carries over to music the model has never heard.
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

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

__all__ = [
    "DEFAULT_CS",
    "MTAT_SPLITS",
    "PROTOCOL_NOTES",
    "FoldFeatures",
    "cross_group_nn_accuracy",
    "descriptor_correlations",
    "group_splits",
    "grouped_nested_cv_svm_accuracy",
    "label_retrieval_map",
    "late_fusion",
    "late_fusion_svm_accuracy",
    "most_frequent_tags",
    "mtat_part_split",
    "mtat_tag_auc",
    "nested_cv_svm_accuracy",
    "tag_auc",
    "transfer_protocols",
]

# A log grid wide enough for standardised features of a few hundred to a few thousand dims.
DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_MAX_ITER = 5000

#: What each number of a transfer result means (written into ``metrics.json`` beside them).
PROTOCOL_NOTES: dict[str, str] = {
    "stratified_mean": "accuracy of a linear L2-SVM (liblinear, squared hinge), features standardised on the "
                       "training part, by nested stratified k-fold over clips: mean over the outer folds (folds: "
                       "min(transfer.folds, clips of the smallest class)); C chosen by an inner stratified k-fold on "
                       "each outer training part (ties: the smallest C). Clips of one artist / album / source may sit "
                       "on both sides of a split.",
    "stratified_std": "population standard deviation of the stratified outer-fold accuracies (the ± of \"0.88 ± 0.02\")",
    "grouped_accuracy": "the same SVM with no group (artist, album, source) on both sides of any split, outer or "
                        "inner: leave-one-group-out when there are at most transfer.max_logo_groups groups, else "
                        "a stratified grouped k-fold (transfer.grouped_folds); the inner loop choosing C is a "
                        "stratified grouped k-fold over the outer training part's groups. Pooled: correct clips / "
                        "clips, every clip held out once (folds differ in size). Protocol, folds and groups are in "
                        "'grouped'. A class absent from a training part cannot be predicted (counted in "
                        "'folds_missing_a_test_class').",
    "grouped_std": "standard deviation of the grouped outer-fold accuracies",
    "grouped_1nn_accuracy": "for each clip, the label of its nearest clip from another group (cosine similarity on "
                            "features standardised over all clips); nothing is trained, every clip with a clip of "
                            "another group is scored",
    "any_1nn_accuracy": "the same with any other clip as the neighbour (leave-one-out 1-NN): the gap to "
                        "grouped_1nn_accuracy is how much 'similar' meant 'same group'",
    "retrieval_map": "query by example: for each clip every other clip ranked by cosine similarity (features "
                     "standardised over all clips); relevant = same label; mean average precision over the clips "
                     "with a relevant other clip (retrieval_map_se: its standard error over those queries; "
                     "retrieval_chance: a random ranking's)",
    "kmeans": "spherical K-means (PCA-whitened 4-frame windows, max-pooled activations) fitted, for the SVMs, on "
              "each outer fold's training clips only (the inner loop reuses it); for the 1-NN, on every clip "
              "(unsupervised, no label seen)",
    "svm_fits_not_converged": "liblinear fits (every inner-grid fit and refit) that stopped at the iteration limit "
                              "before converging, usually at the largest C: counted here instead of printed",
    "excerpts": "features of transfer.excerpts_per_track excerpts of transfer.excerpt_seconds from the middle of each "
                "track, averaged per track",
}

#: Features fitted per outer fold: called with the outer training indices (int64, sorted), it
#: returns ``(n, d)`` features of *every* clip, whatever it learns unsupervised (a K-means
#: dictionary) learnt from those training clips only; the held-out fold never reaches it.
FoldFeatures = Callable[[np.ndarray], np.ndarray]


class _NotConverged:
    """Counts liblinear's "failed to converge" warnings instead of printing them (a grid point
    with a large C on a few hundred clips often stops at max_iter; one line per fit would flood
    the console); other warnings pass through. ``count`` goes into the result."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._caught = self._cm.__enter__()
        warnings.simplefilter("always", ConvergenceWarning)
        self.count = 0
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for w in self._caught:
            if issubclass(w.category, ConvergenceWarning):
                self.count += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


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
    features : np.ndarray, (n, d), or FoldFeatures
        A matrix, or a function of the outer training indices (:data:`FoldFeatures`) for
        features with an unsupervised part fitted on the training folds only; the inner loop
        choosing C reuses the outer fold's features.
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
        order of the confusion matrix's rows and columns), ``accuracy`` (clips right / n, pooled
        over the folds), ``protocol`` (``"stratified_kfold"``), ``folds``, ``inner_folds``.
    """
    return _nested_cv([features], labels, folds=folds, inner_folds=inner_folds, Cs=Cs, seed=seed)


def grouped_nested_cv_svm_accuracy(
    features: np.ndarray | FoldFeatures,
    labels: Sequence,
    groups: Sequence,
    *,
    folds: int = 10,
    inner_folds: int = 5,
    max_logo_groups: int = 30,
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict:
    """Accuracy of a linear L2-SVM by nested cross-validation over *groups* (artists, albums,
    sources): no group has clips on both sides of any split.

    Outer splits: :func:`group_splits` (leave-one-group-out up to ``max_logo_groups`` groups,
    else ``folds``-fold :class:`~sklearn.model_selection.StratifiedGroupKFold`). Inner splits,
    choosing C on the outer training part: ``StratifiedGroupKFold`` with
    ``min(inner_folds, groups in that part)`` folds over its groups, so no group leaks between
    inner train and validation either; inner splits whose training side holds a single class
    are dropped, and with none left the smallest C (the most regularised) is taken. An outer
    training part that holds a single class predicts that class. A class absent from an outer
    training part cannot be predicted, and its held-out clips count as errors (the fold is
    counted in ``folds_missing_a_test_class``) — leave-one-group-out on a genre with one
    artist is then 0 for that genre, as it should be.

    Parameters
    ----------
    features : np.ndarray, (n, d), or FoldFeatures
        As in :func:`nested_cv_svm_accuracy`.
    labels, groups : sequence, (n,)
        Class label and group of each clip.
    folds, inner_folds, max_logo_groups : int
    Cs, seed
        As in :func:`nested_cv_svm_accuracy`.

    Returns
    -------
    dict
        The keys of :func:`nested_cv_svm_accuracy`, with ``accuracy`` the pooled accuracy
        (every clip is held out exactly once, and folds differ in size, so this — not the mean
        of the fold accuracies, ``mean`` — is the grouped figure), ``protocol``
        (``"leave_one_group_out"`` or ``"stratified_group_kfold"``), ``folds`` (outer folds
        used), ``groups`` (distinct groups), ``fold_sizes``, ``folds_missing_a_test_class``.
    """
    return _nested_cv([features], labels, folds=folds, inner_folds=inner_folds, Cs=Cs, seed=seed, groups=groups,
                      max_logo_groups=max_logo_groups)


def late_fusion_svm_accuracy(
    feature_sets: Sequence[np.ndarray],
    labels: Sequence,
    *,
    folds: int = 10,
    inner_folds: int = 5,
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
    groups: Sequence | None = None,
    max_logo_groups: int = 30,
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
    groups, max_logo_groups
        With ``groups``, the protocol of :func:`grouped_nested_cv_svm_accuracy` instead.
    """
    if isinstance(feature_sets, np.ndarray) or not len(feature_sets):
        raise ValueError("feature_sets must be a non-empty sequence of (n, d) arrays")
    return _nested_cv(list(feature_sets), labels, folds=folds, inner_folds=inner_folds, Cs=Cs, seed=seed,
                      groups=groups, max_logo_groups=max_logo_groups)


def group_splits(
    labels: Sequence,
    groups: Sequence,
    *,
    folds: int = 10,
    max_logo_groups: int = 30,
    seed: int = 0,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Outer splits that never put one group on both sides.

    Parameters
    ----------
    labels, groups : sequence, (n,)
    folds : int >= 2
        Folds of the grouped k-fold (at most the number of groups).
    max_logo_groups : int >= 2
        Up to this many distinct groups: leave-one-group-out (one fold per group,
        :class:`~sklearn.model_selection.LeaveOneGroupOut`); beyond it
        :class:`~sklearn.model_selection.StratifiedGroupKFold` (shuffled with ``seed``), which
        keeps each fold's class proportions as close to the whole as whole groups allow.

    Returns
    -------
    splits : list of (train, test)
        Index arrays (int64), every clip in exactly one test part.
    info : dict
        ``protocol`` (``"leave_one_group_out"`` / ``"stratified_group_kfold"``), ``folds``,
        ``groups``.
    """
    y, g = _check_groups(labels, groups)
    folds = _check_folds(folds, "folds")
    max_logo_groups = _check_folds(max_logo_groups, "max_logo_groups")
    uniq = np.unique(g)
    if len(uniq) < 2:
        raise ValueError(f"groups has {len(uniq)} distinct value(s) ({uniq.tolist()!r}); a grouped protocol needs at "
                         f"least 2")
    X = np.zeros((len(y), 1))
    if len(uniq) <= max_logo_groups:
        splits, protocol = list(LeaveOneGroupOut().split(X, y, g)), "leave_one_group_out"
    else:
        k = min(folds, len(uniq))
        with warnings.catch_warnings():  # "the least populated class has only m members": expected here
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y, g))
        protocol = "stratified_group_kfold"
    splits = [(np.asarray(tr, np.int64), np.asarray(te, np.int64)) for tr, te in splits if len(te) and len(tr)]
    for tr, te in splits:  # the one property everything rests on
        assert not set(g[tr].tolist()) & set(g[te].tolist())
    return splits, {"protocol": protocol, "folds": len(splits), "groups": int(len(uniq))}


def _check_groups(labels, groups) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (n,), got shape {y.shape}")
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have one entry per label ({y.shape[0]}), got shape {g.shape}")
    return y, g


def _inner_splits(y: np.ndarray, g: np.ndarray | None, *, inner_folds: int, seed: int) -> list:
    """Inner (train, valid) splits of one outer training part; grouped when ``g`` is given,
    keeping only splits whose training side holds at least two classes."""
    X = np.zeros((len(y), 1))
    if g is None:
        return list(StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed).split(X, y))
    n_groups = len(np.unique(g))
    if n_groups < 2:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splits = StratifiedGroupKFold(n_splits=min(inner_folds, n_groups), shuffle=True,
                                      random_state=seed).split(X, y, g)
        return [(tr, va) for tr, va in splits if len(va) and len(np.unique(y[tr])) >= 2]


def _class_scores(model, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Decision scores ``(n, n_classes)`` in the order of ``classes``; a class the model never
    saw scores -inf (never predicted). Two classes: LinearSVC's one signed score s (positive =
    its second class) becomes the columns (-s, s), so argmax decides as its sign does."""
    d = np.asarray(model.decision_function(X), dtype=np.float64)
    seen = np.searchsorted(classes, model.classes_)
    out = np.full((X.shape[0], len(classes)), -np.inf)
    if d.ndim == 1:
        out[:, seen[0]], out[:, seen[1]] = -d, d
    else:
        out[:, seen] = d
    return out


class _OneClass:
    """The model of a training part with a single class: it predicts that class."""

    def __init__(self, label) -> None:
        self.classes_ = np.asarray([label])

    def decision_function(self, X):
        return np.zeros((X.shape[0], 1))


def _fold_features(f, train: np.ndarray, n: int, name: str) -> np.ndarray:
    if callable(f):
        return _check_features(f(train), n, name=name)
    return f


def _nested_cv(feature_sets: list, labels, *, folds: int, inner_folds: int, Cs, seed: int, groups=None,
               max_logo_groups: int = 30) -> dict:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (n,), got shape {y.shape}")
    names = ["features" if len(feature_sets) == 1 else f"feature_sets[{i}]" for i in range(len(feature_sets))]
    Xs = [f if callable(f) else _check_features(f, len(y), name=name) for f, name in zip(feature_sets, names)]
    folds, inner_folds = _check_folds(folds, "folds"), _check_folds(inner_folds, "inner_folds")
    # ascending, because GridSearchCV breaks ties by grid order: a tie goes to the smallest C
    cs = sorted(_check_cs(Cs))
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"labels need at least 2 classes, got {classes.tolist()!r}")
    if groups is None:
        smallest = int(counts.min())
        rarest = classes[int(np.argmin(counts))].item()
        # an outer training part keeps at least count - ceil(count / folds) examples of a class
        if smallest < folds or smallest - -(-smallest // folds) < inner_folds:
            raise ValueError(
                f"class {rarest!r} has {smallest} examples: too few for {folds} outer × {inner_folds} inner "
                f"stratified folds"
            )
        g = None
        outer = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros((len(y), 1)), y))
        info = {"protocol": "stratified_kfold", "folds": folds, "inner_folds": inner_folds}
    else:
        y, g = _check_groups(y, groups)
        outer, info = group_splits(y, g, folds=folds, max_logo_groups=max_logo_groups, seed=seed)
        info = {**info, "inner_folds": inner_folds, "fold_sizes": [int(len(te)) for _, te in outer],
                "folds_missing_a_test_class": 0}
    per_fold, chosen = [], []
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    with _NotConverged() as not_converged:
        for train, test in outer:
            scores, cs_fold = [], []
            ytr = y[train]
            inner = _inner_splits(ytr, None if g is None else g[train], inner_folds=inner_folds, seed=seed)
            for f, name in zip(Xs, names):
                X = _fold_features(f, train, len(y), name)
                if len(np.unique(ytr)) < 2:
                    model, c = _OneClass(ytr[0]), cs[0]
                elif not inner:  # nothing to choose C on (one group, or one class, in every inner split)
                    model = make_pipeline(StandardScaler(), _svm(cs[0], seed)).fit(X[train], ytr)
                    c = cs[0]
                else:
                    model = GridSearchCV(
                        make_pipeline(StandardScaler(), _svm(1.0, seed)),
                        {"linearsvc__C": list(cs)},
                        cv=inner,
                        scoring="accuracy",
                        refit=True,
                        n_jobs=1,
                    )
                    model.fit(X[train], ytr)
                    c = float(model.best_params_["linearsvc__C"])
                scores.append(_class_scores(model, X[test], classes))
                cs_fold.append(float(c))
            fused = late_fusion(scores) if len(scores) > 1 else scores[0]
            pred = classes[np.argmax(fused, axis=1)]
            per_fold.append(float(np.mean(pred == y[test])))
            chosen.append(cs_fold[0] if len(Xs) == 1 else cs_fold)
            confusion += confusion_matrix(y[test], pred, labels=classes)
            if g is not None and set(np.unique(y[test]).tolist()) - set(np.unique(ytr).tolist()):
                info["folds_missing_a_test_class"] += 1
    return {
        "mean": float(np.mean(per_fold)),
        "std": float(np.std(per_fold)),
        "per_fold": per_fold,
        "chosen_C": chosen,
        "confusion": confusion.tolist(),
        "classes": classes.tolist(),
        "accuracy": float(np.trace(confusion) / max(int(confusion.sum()), 1)),
        "svm_fits_not_converged": not_converged.count,
        **info,
    }


# -- nearest neighbour across groups -----------------------------------------------------------

def cross_group_nn_accuracy(features: np.ndarray, labels: Sequence, groups: Sequence | None = None, *,
                            block: int = 1024) -> dict:
    """1-nearest-neighbour label accuracy where the neighbour must come from another group.

    Features are standardised per dimension over all clips (a constant dimension becomes 0)
    and compared by cosine similarity; for each clip the most similar clip of a *different*
    group (ties: the lowest index) lends its label. Nothing is fitted on labels, so every clip
    is scored. Beside it, the same with any other clip as the neighbour (leave-one-out 1-NN):
    the gap between the two is how much "similar" meant "same artist / album / source".

    Parameters
    ----------
    features : np.ndarray, (n, d)
    labels : sequence, (n,)
    groups : sequence, (n,), or None
        None: only the any-clip accuracy.
    block : int
        Rows of the similarity matrix per step (memory ``block × n`` floats).

    Returns
    -------
    dict
        ``accuracy`` (across groups; NaN without groups or when no clip has a clip of another
        group), ``n_scored``, ``n_without_candidate`` (clips whose group holds every clip),
        ``any_accuracy`` (any other clip), ``n``.
    """
    F = _check_features(features)
    y = np.asarray(labels)
    if y.shape != (F.shape[0],):
        raise ValueError(f"labels must have one entry per row of features ({F.shape[0]}), got shape {y.shape}")
    g = None if groups is None else _check_groups(y, groups)[1]
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    n = F.shape[0]
    if n < 2:
        raise ValueError(f"nearest-neighbour accuracy needs at least 2 clips, got {n}")
    std = F.std(axis=0)
    Z = (F - F.mean(axis=0)) / np.where(std > 0, std, 1.0)
    norm = np.linalg.norm(Z, axis=1, keepdims=True)
    Z = Z / np.where(norm > 0, norm, 1.0)
    any_right = 0
    right = scored = 0
    for s in range(0, n, block):
        rows = np.arange(s, min(n, s + block))
        sim = Z[rows] @ Z.T  # (b, n)
        sim[np.arange(len(rows)), rows] = -np.inf  # never itself
        any_right += int(np.count_nonzero(y[np.argmax(sim, axis=1)] == y[rows]))
        if g is not None:
            sim[g[rows][:, None] == g[None, :]] = -np.inf
            has = np.isfinite(sim).any(axis=1)
            nn = np.argmax(sim, axis=1)
            scored += int(has.sum())
            right += int(np.count_nonzero((y[nn] == y[rows]) & has))
    return {
        "accuracy": float(right / scored) if scored else float("nan"),
        "n_scored": int(scored),
        "n_without_candidate": int(n - scored) if g is not None else None,
        "any_accuracy": float(any_right / n),
        "n": int(n),
    }


def label_retrieval_map(features: np.ndarray, labels: Sequence, *, block: int = 512) -> dict:
    """Query-by-example retrieval: for each clip, every other clip ranked by cosine similarity
    (features standardised over all clips, as for the 1-NN); relevant = same label (the same
    source package, album, genre). Mean average precision over the clips that have a relevant
    other clip.

    Parameters
    ----------
    features : np.ndarray [shape=(n, d)]
    labels : sequence [shape=(n,)]
    block : int
        Queries per similarity block (memory ``block × n``).

    Returns
    -------
    dict
        ``map``, ``map_se`` (its standard error over the queries: sample sd of the average
        precisions / √n_queries), ``n_queries`` (clips with a relevant other clip) and
        ``chance`` (the mAP of a random ranking, about the mean share of relevant clips).

    >>> round(label_retrieval_map(np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), ["a", "a", "b", "b"])["map"], 3)
    1.0
    """
    F = _check_features(features)
    y = np.asarray(labels)
    n = len(y)
    if n != F.shape[0]:
        raise ValueError(f"features have {F.shape[0]} rows but labels has {n}")
    std = F.std(axis=0)
    Z = (F - F.mean(axis=0)) / np.where(std > 0, std, 1.0)
    norm = np.linalg.norm(Z, axis=1, keepdims=True)
    Z = Z / np.where(norm > 0, norm, 1.0)
    aps, chance = [], []
    for s in range(0, n, block):
        rows = np.arange(s, min(n, s + block))
        sim = Z[rows] @ Z.T
        sim[np.arange(len(rows)), rows] = -np.inf  # never itself
        order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]  # itself last, dropped
        rel = y[order] == y[rows][:, None]
        hits = rel.sum(axis=1)
        cum = np.cumsum(rel, axis=1)
        ranks = np.arange(1, n)
        for i in np.flatnonzero(hits):
            aps.append(float((cum[i][rel[i]] / ranks[rel[i]]).mean()))
            chance.append(hits[i] / (n - 1))
    se = float(np.std(aps, ddof=1) / np.sqrt(len(aps))) if len(aps) > 1 else float("nan")
    return {"map": float(np.mean(aps)) if aps else float("nan"), "map_se": se, "n_queries": len(aps),
            "chance": float(np.mean(chance)) if chance else float("nan")}


# -- every protocol for one feature set ---------------------------------------------------------

def _fitted_folds(counts: np.ndarray, folds: int, inner_folds: int) -> tuple[int, int] | None:
    """The most outer and inner stratified folds (up to the asked ones) that the smallest class
    allows, or None when not even 2 × 2 fit."""
    smallest = int(counts.min())
    k = min(folds, smallest)
    if k < 2:
        return None
    inner = min(inner_folds, smallest - -(-smallest // k))
    return (k, inner) if inner >= 2 else None


def transfer_protocols(
    features: np.ndarray | FoldFeatures,
    labels: Sequence,
    groups: Sequence | None = None,
    *,
    folds: int = 10,
    inner_folds: int = 5,
    grouped_folds: int = 10,
    max_logo_groups: int = 30,
    Cs: Iterable[float] = DEFAULT_CS,
    seed: int = 0,
    nn_features: np.ndarray | None = None,
) -> dict:
    """Stratified and grouped nested-CV accuracy and the cross-group 1-NN accuracy of one
    feature set: what the ``transfer`` command reports per feature set.

    Fold counts are fitted to the data: the stratified protocol takes ``min(folds, smallest
    class)`` outer folds and as many inner ones (up to ``inner_folds``) as its training parts
    allow; the numbers used are in the result.

    Parameters
    ----------
    features : np.ndarray, (n, d), or FoldFeatures
    labels : sequence, (n,)
    groups : sequence, (n,), or None
        None: the grouped numbers are None, with the reason in ``grouped_skipped``.
    folds, inner_folds : int
        Stratified outer and inner folds (and the grouped protocol's inner folds).
    grouped_folds, max_logo_groups : int
        See :func:`group_splits`.
    Cs, seed
        As in :func:`nested_cv_svm_accuracy`.
    nn_features : np.ndarray, (n, d), optional
        Features for the 1-NN when ``features`` is a :data:`FoldFeatures` (nothing is trained
        there, so they may be fitted on every clip); default: ``features`` itself.

    Returns
    -------
    dict
        The stratified result of :func:`nested_cv_svm_accuracy` at top level (``mean``,
        ``std``, ``per_fold``, ``confusion``, ... — what the report draws), plus
        ``stratified_mean``, ``stratified_std``, ``grouped_accuracy`` (pooled),
        ``grouped_std`` (over folds), ``grouped_1nn_accuracy``, ``any_1nn_accuracy``, ``dim``,
        and the full ``grouped`` and ``nearest_neighbour`` results; a protocol that cannot run
        gives None with its reason in ``stratified_skipped`` / ``grouped_skipped``.
    """
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"labels need at least 2 classes, got {classes.tolist()!r}")
    out: dict = {}
    fitted = _fitted_folds(counts, _check_folds(folds, "folds"), _check_folds(inner_folds, "inner_folds"))
    if fitted is None:
        out.update(stratified_mean=None, stratified_std=None,
                   stratified_skipped=f"class {classes[int(np.argmin(counts))].item()!r} has {int(counts.min())} "
                                      f"clip(s): too few for 2 outer × 2 inner stratified folds")
    else:
        strat = nested_cv_svm_accuracy(features, y, folds=fitted[0], inner_folds=fitted[1], Cs=Cs, seed=seed)
        out.update(strat)
        out.update(stratified_mean=strat["mean"], stratified_std=strat["std"])
    X_nn = nn_features if nn_features is not None else (None if callable(features) else features)
    if X_nn is None:
        raise ValueError("nn_features is needed when features is a function of the training folds")
    if groups is None:
        out.update(grouped_accuracy=None, grouped_std=None, grouped_1nn_accuracy=None,
                   grouped_skipped="no grouping of the clips (give a groups file or a group level)")
        nn = cross_group_nn_accuracy(X_nn, y)
    else:
        g = _check_groups(y, groups)[1]
        nn = cross_group_nn_accuracy(X_nn, y, g)
        if len(np.unique(g)) < 2:
            out.update(grouped_accuracy=None, grouped_std=None,
                       grouped_skipped=f"{len(np.unique(g))} group: a grouped protocol needs at least 2")
        else:
            grouped = grouped_nested_cv_svm_accuracy(features, y, g, folds=grouped_folds, inner_folds=inner_folds,
                                                     max_logo_groups=max_logo_groups, Cs=Cs, seed=seed)
            out.update(grouped=grouped, grouped_accuracy=grouped["accuracy"], grouped_std=grouped["std"])
        out["grouped_1nn_accuracy"] = None if np.isnan(nn["accuracy"]) else nn["accuracy"]
    retrieval = label_retrieval_map(X_nn, y)
    out.update(any_1nn_accuracy=nn["any_accuracy"], nearest_neighbour=nn, dim=int(np.shape(X_nn)[1]),
               retrieval_map=retrieval["map"], retrieval_map_se=retrieval["map_se"],
               retrieval_chance=retrieval["chance"])
    return out


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
