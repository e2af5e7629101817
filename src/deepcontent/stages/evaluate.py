"""Stage ``evaluate``: the papers' cold-start experiment, source-task NMSE, transfer, report.

The protocol (``docs/architecture.md``): WMF was fitted on users × **train songs** only (user
factors X); every method predicts factors y′ for the **test songs** from their audio alone, and
users are ranked over the test songs by s_ui = x_u·y′_i against who actually played them
(``user_items_test``). No test song's plays reach factorisation, training or model selection;
the only method that sees them is the ``upper_bound``: test-song factors folded in from their
own plays with X fixed.

The stage trains no CNN and fits no WMF: it reads what earlier stages published and
registered. Methods (``evaluate.methods``):

``random``, ``bow_linear``, ``bow_mlp``, ``kmeans_linear``
                    fixed-feature regressors fitted here on the train split
                    (:mod:`deepcontent.evaluate.regressors`).
``cnn_mse``/``cnn_wpe``/``deep_cnn``/``raw_cnn``
                    the registered model variant of that name (``models/variants/<name>.json``,
                    trained by the train stage; the pipeline adds the variants its evaluation
                    needs to ``train.variants``). A variant trained on other factors than the
                    published ones is refused. Clip predictions are window averages.
``upper_bound``     fold-in from the test plays.

Top-k metrics are named honestly (:func:`~deepcontent.evaluate.metrics.cutoff_name`): with
fewer test songs than ``evaluate.map_k``, "mAP@500" is the full-list mAP and is reported as
``map_full``; ``metrics.json``'s ``protocol`` section says, per number, what it is (the k asked
for, the number of candidates; the transfer protocols).

Also: validation NMSE per regressor (source task); tag prediction from the tag WMF
(``factors/tags``, fitted by the factorize stage); transfer with CNN features (predicted
factors, penultimate layer) vs spherical K-means features — nested-CV linear-SVM accuracy on
the GTZAN-layout folder, stratified over clips and, where the folder has a grouping (its own
``groups.csv`` or ``transfer.group_level``), grouped over artists / albums with the 1-NN from
another group (the machinery of the ``transfer`` stage, :mod:`deepcontent.stages.transfer`) —
and tag AUC on the MagnaTagATune-layout set, their clips decoded through the spectrogram job's
isolated decoder; the embedding dimension most correlated with each hand-crafted descriptor;
and a self-contained HTML report. Outputs go to
``<root>/evaluate/<run_id>/{metrics.json,report.html}`` and a copy to ``evaluate.report_dir``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import ITEM_INDEX, SPECTROGRAMS, SPLITS, TAG_INDEX, TAGS, TRACKS, USER_INDEX, WAVEFORMS
from deepcontent.errors import InputMissingError, TrainingDataError
from deepcontent.evaluate.metrics import cold_start_metrics, describe_cutoffs, metric_label, tag_prediction_metrics
from deepcontent.evaluate.regressors import FixedFeatures, SplitArrays
from deepcontent.factorize.foldin import fold_in
from deepcontent.manifest import log
from deepcontent.registry import load_model, registered, variant_pointer
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.stages.factorize import factors_by_index
from deepcontent.stages.train import load_training_data
from deepcontent.storage import Storage, join
from deepcontent.train.variants import VARIANTS

__all__ = ["REPLICATE_OWNS", "STAGE", "catalog_seed", "evaluate_once", "gtzan_clips", "needed_variants", "replicate",
           "replicate_config", "run", "target_clip_mels"]

STAGE = "evaluate"
FIXED_FEATURE_METHODS = ("random", "bow_linear", "bow_mlp", "kmeans_linear")


def needed_variants(cfg: Config) -> list[str]:
    """The registered model variants the configured evaluation reads."""
    ec = cfg.evaluate
    names = [m for m in ec.methods if m in VARIANTS]
    if ec.tag_prediction and "cnn_tags" in ec.tag_methods:
        names.append("cnn_tags")
    return names


# ----------------------------------------------------------------------------- inputs
class _Inputs:
    """Users, test songs and their clips, and the regression split, loaded once for every method."""

    def __init__(self, cfg: Config, storage: Storage) -> None:
        files = datasets.csr_exports(storage, needed_by="evaluate")
        self.files = files
        test_plays = datasets.load_csr(storage, files["user_items_test.npz"])
        n_users = test_plays.shape[0]
        # X: the WMF user factors, by user index (users without train plays have none: left out)
        self.user_factors, self.has_factors = factors_by_index(
            storage, datasets.factors("plays", "user_factors"), USER_INDEX, id_column="user_id", n_rows=n_users)

        # test songs: split == test, at least one test play, and a track with a spectrogram
        items = ITEM_INDEX.read(storage)
        splits = SPLITS.read(storage)
        split_of = dict(zip(splits["song_id"].to_pylist(), splits["split"].to_pylist()))
        tracks = TRACKS.read(storage, columns=["track_id", "song_id", "artist", "title"])
        spec = SPECTROGRAMS.read(storage, columns=["track_id", "n_mels", "n_frames", "mel"])
        has_spec = set(spec["track_id"].to_pylist())
        track_of: dict[str, str] = {}
        self.names: dict[str, str] = {}
        for t, s, a, ti in zip(*(tracks[c].to_pylist() for c in ("track_id", "song_id", "artist", "title"))):
            if t in has_spec and s not in track_of:
                track_of[s] = t
            self.names[t] = f"{a} – {ti}"
        played = np.diff(test_plays.tocsc().indptr) > 0
        song_ids, idx = items["song_id"].to_pylist(), items["idx"].to_pylist()
        test = [(i, s) for s, i in zip(song_ids, idx) if split_of.get(s) == "test" and i < len(played) and played[i]
                and s in track_of]
        self.dropped_test_songs = sum(1 for s in song_ids if split_of.get(s) == "test") - len(test)
        self.test_cols = np.array([i for i, _ in test], np.int64)
        self.test_tracks = [track_of[s] for _, s in test]
        self.test_plays = test_plays[:, self.test_cols].tocsr()
        self.eval_users = np.flatnonzero(self.has_factors & (np.diff(self.test_plays.indptr) > 0))
        self._spec, self._by_track = spec, {t: i for i, t in enumerate(spec["track_id"].to_pylist())}
        self.test_mels = self.mels_of(self.test_tracks)
        # the train stage's own split and standardisation
        self.data = load_training_data(storage)
        self.split = self.arrays(self.data, self.test_mels)

    def mels_of(self, track_ids: list[str]) -> list[np.ndarray]:
        """Log-mels ``(n_mels, n_frames)`` float32 of tracks that have a spectrogram."""
        rows = self._spec.take(pa.array([self._by_track[t] for t in track_ids], pa.int64()))
        return datasets.mel_arrays(rows, dtype=np.float32)

    def arrays(self, data, test_mels: list[np.ndarray]) -> SplitArrays:
        return SplitArrays(train_clips=self.mels_of(data.train["track_id"].to_pylist()),
                           y_train=datasets.vectors(data.train["target"]),
                           valid_clips=self.mels_of(data.valid["track_id"].to_pylist()),
                           y_valid=datasets.vectors(data.valid["target"]), test_clips=test_mels,
                           target_mean=data.target_mean, target_std=data.target_std)


def _fixed_features(cfg: Config, split: SplitArrays) -> FixedFeatures:
    ec = cfg.evaluate
    return FixedFeatures(split, compression=cfg.spectrograms.compression, words_grid=cfg.train.baseline_words,
                         kmeans_centroids=ec.kmeans_centroids, mlp_epochs=ec.mlp_epochs, seed=ec.seed)


# ----------------------------------------------------------------------------- registered models
def _variant_model(storage: Storage, name: str, *, matrix: str) -> tuple[Any, dict, str, dict]:
    """``(model, artifact, version, metadata)`` of the registered variant ``name``, checked to be
    trained on the published ``matrix`` factors."""
    pointer = variant_pointer(storage, name)
    hint = f"run `deepcontent train train.variants=[{name}]` (the pipeline adds the variants its evaluation needs)"
    if pointer is None:
        raise InputMissingError(f"evaluate method {name!r} needs the registered model variant {name!r}; {hint}")
    version = pointer["model_version"]
    meta = registered(storage, version) or {}
    factors_ds = datasets.factors(matrix, "item_factors")
    trained_on, current = meta.get("inputs", {}).get(factors_ds.key), factors_ds.run_id(storage)
    if trained_on != current:
        raise InputMissingError(f"evaluate method {name!r}: variant model {version} was trained on {factors_ds.key} "
                                f"run {trained_on}, but the published factors are run {current}; {hint}")
    model, artifact = load_model(storage, version)
    return model, artifact, version, meta


def _curve(meta: dict) -> dict:
    curve = meta.get("curve", [])
    return {"epoch": [h["epoch"] for h in curve], "train_loss": [h["train_loss"] for h in curve],
            "valid_nmse": [h["valid_nmse"] for h in curve]}


def _cnn(name: str, storage: Storage, inp: _Inputs, cache: dict) -> tuple[np.ndarray, dict]:
    from deepcontent.embed.pooling import clip_outputs

    model, artifact, version, meta = _variant_model(storage, name, matrix="plays")
    kw = dict(n_frames=artifact["window_frames"], target_mean=artifact["target_mean"], target_std=artifact["target_std"])
    pred, emb = clip_outputs(model, inp.test_mels, **kw)
    cache.setdefault("cnn_models", {})[name] = (model, kw, version)
    cache.setdefault("test_embeddings", {})[name] = (pred, emb)
    cache.setdefault("curves", {})[name] = _curve(meta)
    return pred, {"valid_nmse": meta.get("metrics", {}).get("valid_nmse"), "model_version": version}


def _raw_cnn(storage: Storage, inp: _Inputs, cache: dict) -> tuple[np.ndarray, dict]:
    """The raw-audio front end + paper CNN (thesis ch. 5) on the test songs' published waveforms."""
    from deepcontent.embed.pooling import clip_outputs

    model, artifact, version, meta = _variant_model(storage, "raw_cnn", matrix="plays")
    waves = WAVEFORMS.require(storage, needed_by="evaluate method 'raw_cnn'")
    # only the test songs' waveforms: the train / valid ones are most of the dataset
    table = WAVEFORMS.read(storage, columns=["track_id", "n_mels", "n_frames", "mel"],
                           filters=pc.field("track_id").isin(inp.test_tracks))
    clips = dict(zip(table["track_id"].to_pylist(), datasets.mel_arrays(table, dtype=np.float32)))
    have = [t for t in inp.test_tracks if t in clips]
    # a test song whose audio did not decode gets the train mean (counted below)
    pred = np.tile(np.asarray(artifact["target_mean"], np.float32), (len(inp.test_tracks), 1))
    if have:
        pred_have, _ = clip_outputs(model, [clips[t] for t in have], n_frames=artifact["window_frames"],
                                    target_mean=artifact["target_mean"], target_std=artifact["target_std"],
                                    windows_per_forward=16)
        rows = {t: i for i, t in enumerate(have)}
        for i, t in enumerate(inp.test_tracks):
            if t in rows:
                pred[i] = pred_have[rows[t]]
    cache.setdefault("curves", {})["raw_cnn"] = _curve(meta)
    return pred, {"valid_nmse": meta.get("metrics", {}).get("valid_nmse"), "model_version": version,
                  "test_songs_without_audio": len(inp.test_tracks) - len(have),
                  "waveform_tracks_left_out": len(waves.get("left_out", {}))}


def _cold_start_method(name: str, cfg: Config, storage: Storage, inp: _Inputs, fixed: FixedFeatures,
                       cache: dict) -> tuple[np.ndarray, dict]:
    if name in FIXED_FEATURE_METHODS:
        return getattr(fixed, name)()
    if name == "upper_bound":
        fc = cfg.factorize
        return fold_in(sp.csr_matrix(inp.test_plays.T), inp.user_factors, alpha=fc.alpha, eps=fc.eps,
                       regularization=fc.regularization), {}
    if name == "raw_cnn":
        return _raw_cnn(storage, inp, cache)
    if name == "pretrained_linear":
        return _pretrained_linear(cfg, storage, inp, cache)
    return _cnn(name, storage, inp, cache)


def _pretrained_linear(cfg: Config, storage: Storage, inp: _Inputs, cache: dict) -> tuple[np.ndarray, dict]:
    """Ridge (penalty chosen on valid) from the pretrained backbone's penultimate layer to the
    factors; the backbone itself is not trained on this catalog."""
    from deepcontent.evaluate.regressors import BackboneFeatures

    ec = cfg.evaluate
    registry = storage.with_root(ec.pretrained_registry_root) if ec.pretrained_registry_root else storage
    pointer = variant_pointer(registry, ec.pretrained_model)
    version = pointer["model_version"] if pointer else ec.pretrained_model
    if registered(registry, version) is None:
        raise InputMissingError(f"evaluate method 'pretrained_linear' needs the pretrained model "
                                f"{ec.pretrained_model!r} in {registry.uri('models')}; run `deepcontent pretrain` there "
                                f"(and set evaluate.pretrained_registry_root to that catalog's root)")
    model, artifact = load_model(registry, version)
    features = BackboneFeatures(model, artifact["window_frames"])
    pred, info = FixedFeatures.linear(features, inp.split)
    cache.setdefault("backbones", {})["pretrained_linear"] = (model, artifact, version)
    return pred, {**info, "model_version": version, "pretrained_on": artifact.get("pretrained_on")}


# ----------------------------------------------------------------------------- tag source task
def _tag_prediction(cfg: Config, storage: Storage, inp: _Inputs, fixed: FixedFeatures) -> dict:
    """The ISMIR 2014 tag source task: the tag WMF (train songs) gives song factors U and tag
    factors V; each regressor predicts U′ for the test songs from audio, and the tag scores
    A′ = U′Vᵀ rank the test songs per tag against their actual tags. Reported per method: mean
    per-tag AUC and mAP (over all test songs), and validation NMSE.

    Test songs are those of the cold-start experiment that have at least one tag; tags count
    when they have factors (they occur on train songs) and at least one test song."""
    from deepcontent.embed.pooling import clip_outputs

    ec, fc = cfg.evaluate, cfg.factorize
    files = inp.files
    if "item_tags_train.npz" not in files or datasets.load_csr(storage, files["item_tags_train.npz"]).nnz == 0:
        return {"skipped": "no tags on train songs: the catalog has no tag matrix to factorise"}
    if datasets.factors("tags", "tag_factors").pointer(storage) is None:
        return {"skipped": "no tag factors published: run `deepcontent factorize` with factorize.matrices including tags"}
    try:
        data = load_training_data(storage, matrix="tags")
    except TrainingDataError as exc:
        return {"skipped": str(exc)[:300]}

    tags_test = datasets.load_csr(storage, files["item_tags_test.npz"])[inp.test_cols].tocsr()
    tagged = np.flatnonzero(np.diff(tags_test.indptr) > 0)
    if len(tagged) < 2:
        return {"skipped": f"{len(tagged)} test songs with tags: too few to rank"}
    tags_test = tags_test[tagged]  # tagged test songs × tags
    truth = tags_test.T.tocsr()  # tags × test songs
    V, has_v = factors_by_index(storage, datasets.factors("tags", "tag_factors"), TAG_INDEX, id_column="tag",
                                n_rows=truth.shape[0])
    eval_tags = np.flatnonzero(has_v & (np.diff(truth.indptr) > 0))
    split = inp.arrays(data, [inp.test_mels[i] for i in tagged])

    def method(name):
        if name == "random":
            return np.random.default_rng(ec.seed).standard_normal((len(tagged), V.shape[1])).astype(np.float32), {}
        if name == "bow_linear":  # the vocabulary chosen on the listening targets, ridge refitted on tags
            return FixedFeatures.linear(fixed.vocabulary(), split)
        if name == "kmeans_linear":
            return FixedFeatures.linear(fixed.kmeans(), split)
        if name == "cnn_tags":
            model, artifact, version, meta = _variant_model(storage, "cnn_tags", matrix="tags")
            pred, _ = clip_outputs(model, split.test_clips, n_frames=artifact["window_frames"],
                                   target_mean=artifact["target_mean"], target_std=artifact["target_std"])
            return pred, {"valid_nmse": meta.get("metrics", {}).get("valid_nmse"), "model_version": version}
        # upper bound: the test songs folded in from their own tags with V fixed
        return fold_in(tags_test, V, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization), {}

    out = {}
    for name in ec.tag_methods:
        t0 = time.perf_counter()
        U, info = method(name)
        m = tag_prediction_metrics(V, U, tags_test, tags=eval_tags)
        out[name] = {"auc": float(m["auc"]), "map": float(m["map"]), **info}
        log.info("evaluate: tag prediction %-13s AUC %.4f  mAP %.4f  (%.1fs)", name, out[name]["auc"], out[name]["map"],
                 time.perf_counter() - t0)
    return {"methods": out, "test_songs": int(len(tagged)), "tags": int(len(eval_tags)),
            "train_songs": data.counts["train_songs"]}


# ----------------------------------------------------------------------------- transfer
def target_clip_mels(cfg: Config, storage: Storage, uris: list[str], *,
                     hpss: bool = False) -> tuple[dict[str, list[np.ndarray]], list[int], dict[str, str]]:
    """Log-mels of target-set clips at ``uris`` (not in the catalog: decoded here, through the
    spectrogram job's isolated decoder), the indices that decoded, and ``{uri: reason}`` for
    those that did not (left out, counted).

    Returns ``{"mel": [...]}`` — plus ``"harmonic"`` and ``"percussive"`` with ``hpss`` — each a
    list of float32 ``(n_mels, n_frames)`` arrays, one per kept clip."""
    from deepcontent.stages.transfer import decode_clips

    clips, kept, skipped = decode_clips(cfg, storage, uris, hpss=hpss, stage=STAGE)
    return {p: [np.asarray(m, np.float32) for m in v] for p, v in clips.items()}, kept, skipped


def gtzan_clips(cfg: Config, storage: Storage, *, hpss: bool = False) -> tuple[dict[str, list[np.ndarray]], list[str], dict[str, str]]:
    """The GTZAN-layout folder (``<genre>/<clip>``): float32 log-mels, genre labels, and
    ``{uri: reason}`` of the clips left out."""
    from deepcontent.stages.transfer import read_target_folder

    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    target = read_target_folder(cfg, storage, base, hpss=hpss, stage=STAGE)
    clips = target.mels[cfg.spectrograms.mel_settings().key()]
    return ({p: [np.asarray(m, np.float32) for m in v] for p, v in clips.items()}, target.labels,
            {join(base, k): r for k, r in target.left_out.items()})


def _transfer_features(cfg: Config, fixed: FixedFeatures, cache: dict, mels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Transfer features of target-set clips: spherical K-means (the dictionary learnt on the
    catalog's train clips), and per evaluated CNN variant its predicted factors and penultimate
    layer (window averages); each averaged over ``transfer.excerpts_per_track`` excerpts of
    ``transfer.excerpt_seconds`` from the middle of the clip."""
    from deepcontent.embed.pooling import clip_outputs
    from deepcontent.evaluate.regressors import BackboneFeatures
    from deepcontent.stages.transfer import excerpt_features, excerpt_frames

    frames, count = excerpt_frames(cfg, cfg.spectrograms.mel_settings()), cfg.transfer.excerpts_per_track
    feats = {"kmeans": excerpt_features(fixed.kmeans().transform, mels, frames=frames, count=count)}
    for name, (model, kw, _) in cache.get("cnn_models", {}).items():
        pred, emb = excerpt_features(lambda views: clip_outputs(model, views, **kw), mels, frames=frames, count=count)
        feats[f"{name}_factors"], feats[f"{name}_penultimate"] = pred, emb
    for name, (model, artifact, _) in cache.get("backbones", {}).items():  # a pretrained backbone alone
        features = BackboneFeatures(model, artifact["window_frames"])
        feats["pretrained_penultimate"] = excerpt_features(features.transform, mels, frames=frames, count=count)
    return feats


def _transfer(cfg: Config, storage: Storage, fixed: FixedFeatures, cache: dict) -> dict:
    """GTZAN-layout genre accuracy per feature set — nested CV stratified over clips, grouped over
    the folder's groups (its own ``groups.csv``, or ``transfer.group_level``) and the 1-NN from
    another group; with ``evaluate.late_fusion`` also the harmonic / percussive / original late
    fusion of each — and the MTAT-layout tag AUC."""
    from deepcontent.evaluate.transfer import late_fusion_svm_accuracy
    from deepcontent.stages.transfer import jsonable, protocol_results, read_target_folder

    ec, tc = cfg.evaluate, cfg.transfer
    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    target = read_target_folder(cfg, storage, base, group_level=tc.group_level, hpss=ec.late_fusion, stage=STAGE)
    clips = target.mels[cfg.spectrograms.mel_settings().key()]
    labels, groups = target.labels, target.groups
    skipped = {join(base, k): r for k, r in target.left_out.items()}
    mels = clips["mel"]
    counts = [labels.count(g) for g in set(labels)]
    if len(counts) < 2 or min(counts) < 2:
        return {"gtzan": {"skipped": f"{len(mels)} clips in {len(counts)} genres: too few for a nested "
                                     f"cross-validation", "clips_left_out": skipped}}
    feats = _transfer_features(cfg, fixed, cache, mels)
    out = {name: protocol_results(cfg, name, x, labels, groups, folds=ec.transfer_folds, seed=ec.seed, stage=STAGE)
           for name, x in feats.items()}
    if ec.late_fusion:
        # the same feature extractors on each HPSS component, one SVM per component, scores averaged
        parts = {p: _transfer_features(cfg, fixed, cache, clips[p]) for p in ("harmonic", "percussive")}
        for name, x in feats.items():
            views = [x, parts["harmonic"][name], parts["percussive"][name]]
            if "mean" not in out[name]:
                continue
            fused = jsonable(late_fusion_svm_accuracy(views, labels, folds=out[name]["folds"],
                                                      inner_folds=out[name]["inner_folds"], seed=ec.seed))
            fused.update(stratified_mean=fused["mean"], stratified_std=fused["std"])
            if groups is not None and out[name].get("grouped"):
                g = jsonable(late_fusion_svm_accuracy(views, labels, groups=groups, folds=tc.grouped_folds,
                                                      inner_folds=tc.inner_folds, max_logo_groups=tc.max_logo_groups,
                                                      seed=ec.seed))
                fused.update(grouped=g, grouped_accuracy=g["accuracy"], grouped_std=g["std"])
            else:
                fused.update(grouped_accuracy=None, grouped_std=None,
                             grouped_skipped=out[name].get("grouped_skipped", "no grouping"))
            out[f"{name}_hpss_fusion"] = fused
    log.info("evaluate: GTZAN-layout transfer accuracy %s",
             ", ".join(f"{n} {r['mean']:.3f}±{r['std']:.3f}" for n, r in out.items() if "mean" in r))
    out.update(clips_found=target.found, clips_used=len(target.keys), grouping=target.grouping)
    if skipped:
        out["clips_left_out"] = skipped
    result = {"gtzan": out}
    mtat = _mtat(cfg, storage, fixed, cache)
    if mtat:
        result["mtat"] = mtat
    return result


def _jsonable(r: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else _jsonable(v) if isinstance(v, dict) else v)
            for k, v in r.items()}


def _mtat(cfg: Config, storage: Storage, fixed: FixedFeatures, cache: dict) -> dict:
    """Tag AUC (top-50 and all tags, the transfer paper's part split) on the MagnaTagATune-layout
    set: ``annotations_final.csv`` + clips, features as for GTZAN."""
    from deepcontent.evaluate.transfer import mtat_tag_auc

    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.mtat)
    ann = join(base, "annotations_final.csv")
    if not storage.exists(ann):
        return {}
    rows = list(csv.reader(io.StringIO(storage.read_bytes(ann).decode("utf-8")), delimiter="\t"))
    header, rows = rows[0], [r for r in rows[1:] if r]
    tag_names = header[1:-1]
    clips, kept, skipped = target_clip_mels(cfg, storage, [join(base, r[-1]) for r in rows])
    mels = clips["mel"]
    tags = [[int(v) for v in rows[i][1:-1]] for i in kept]
    paths = [rows[i][-1] for i in kept]
    if len(mels) < 20:
        return {"skipped": f"{len(mels)} usable MagnaTagATune-layout clips: too few", "clips_left_out": skipped}
    T = np.asarray(tags, np.int8)
    out = {}
    for name, x in _transfer_features(cfg, fixed, cache, mels).items():
        try:
            out[name] = _jsonable(mtat_tag_auc(x, T, paths, top=50, seed=cfg.evaluate.seed))
        except ValueError as exc:  # e.g. no tag with both classes in the test parts
            out[name] = {"skipped": str(exc)}
    if skipped:
        out["clips_left_out"] = skipped
    log.info("evaluate: MTAT-layout tag AUC (%d clips, %d tags) %s", len(mels), len(tag_names),
             ", ".join(f"{n} {r['top50']['auc_mean']:.3f}" for n, r in out.items() if isinstance(r, dict) and "top50" in r))
    return out


def _interpretation(cfg: Config, inp: _Inputs, cache: dict) -> dict:
    """Per hand-crafted descriptor, the CNN embedding dimension that correlates most with it
    over the test songs (thesis §4.6)."""
    from deepcontent.evaluate.descriptors import mel_descriptors
    from deepcontent.evaluate.transfer import descriptor_correlations

    emb = cache.get("test_embeddings", {})
    if not emb or len(inp.test_mels) < 5:
        return {}
    sc = cfg.spectrograms
    rows = [mel_descriptors(m, sample_rate=sc.sample_rate, hop_length=sc.hop_length, compression=sc.compression)
            for m in inp.test_mels]
    descriptors = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out = {}
    for name, (pred, penult) in emb.items():
        out[f"{name}_penultimate"] = _jsonable(descriptor_correlations(penult, descriptors))
        out[f"{name}_factors"] = _jsonable(descriptor_correlations(pred, descriptors))
    return out


# ----------------------------------------------------------------------------- report data
def _figures(storage: Storage, inp: _Inputs, cache: dict) -> dict:
    from deepcontent.embed.similarity import top_k_cosine

    fig: dict[str, Any] = {"training_curves": cache.get("curves", {})}
    tags = TAGS.read(storage) if TAGS.pointer(storage) else None
    top_tag: dict[str, str] = {}
    if tags is not None and tags.num_rows:
        for t, tag, w in sorted(zip(*(tags[c].to_pylist() for c in ("track_id", "tag", "weight"))), key=lambda r: -r[2]):
            top_tag.setdefault(t, tag)
    emb = cache.get("test_embeddings", {})
    if emb:
        name = "cnn_mse" if "cnn_mse" in emb else next(iter(emb))
        pred, penult = emb[name]
        fig["embedding_map"] = {"points": penult, "labels": [top_tag.get(t, "untagged") for t in inp.test_tracks],
                                "method": f"the {name} model's penultimate layer"}
        upper = cache.get("upper_bound")
        if upper is not None and len(inp.test_tracks) > 3:
            wmf_idx, _ = top_k_cosine(upper, k=5)
            pred_idx, _ = top_k_cosine(pred, k=5)
            fig["neighbors"] = [{"query": inp.names.get(inp.test_tracks[q], inp.test_tracks[q]),
                                 "wmf": [inp.names.get(inp.test_tracks[j], "") for j in wmf_idx[q]],
                                 "predicted": [inp.names.get(inp.test_tracks[j], "") for j in pred_idx[q]]}
                                for q in range(min(4, len(inp.test_tracks)))]
    return fig


# ----------------------------------------------------------------------------- repeated runs
#: What a seed replicate re-derives under its own root (see :func:`replicate`); every other key
#: (canonical tables, spectrograms, waveforms, matrices, the raw catalog) is this catalog's.
REPLICATE_OWNS = ("factors", "models", "runs", "train", "evaluate", "warehouse", "quarantine")


def catalog_seed(cfg: Config) -> int | None:
    """The seed the catalog itself stands for: its factorize, train and evaluate seeds when they
    are one value, else None (every seed of ``evaluate.seeds`` is then a replicate)."""
    seeds = {cfg.factorize.seed, cfg.train.seed, cfg.evaluate.seed}
    return next(iter(seeds)) if len(seeds) == 1 else None


def replicate_config(cfg: Config, seed: int, *, catalog_root: str | None = None) -> Config:
    """The config of seed ``seed``'s replicate: that seed for the cold-start WMF, every CNN
    variant and every regressor; the listening matrix only (tags and transfer are reported for
    the catalog itself); a warehouse namespace and report folder of its own. A pretrained
    backbone is the catalog's (``catalog_root``) unless it comes from another root already."""
    ec = cfg.evaluate
    return cfg.model_copy(update={
        "factorize": cfg.factorize.model_copy(update={"seed": seed, "matrices": ("plays",)}),
        "train": cfg.train.model_copy(update={"seed": seed, "variants": ()}),
        "evaluate": ec.model_copy(update={"seed": seed, "seeds": (), "transfer": False, "tag_prediction": False,
                                          "report_dir": str(Path(ec.report_dir) / "replicates" / f"seed-{seed}"),
                                          "pretrained_registry_root": ec.pretrained_registry_root or catalog_root}),
        "warehouse": cfg.warehouse.model_copy(update={"namespace": f"{cfg.warehouse.namespace}_seed{seed}"}),
    })


def replicate(cfg: Config, ctx: StageContext, seed: int) -> dict:
    """Seed ``seed``'s cold-start results: the factorize stage, the CNN variants the evaluation
    reads and the evaluation itself, on :func:`replicate_config` and a storage overlay
    (``<root>/replicates/seed-<seed>/`` holds what it re-derives; the split, clips and play
    matrices are the catalog's). Each stage is incremental there as anywhere: a second
    ``--seeds`` run reuses the replicate's factors and models."""
    from deepcontent.stages import StageContext as Context, run_stage
    from deepcontent.stages.train import train_model
    from deepcontent.train.variants import variant_config

    cfg_s = replicate_config(cfg, seed, catalog_root=ctx.storage.root)
    root = ctx.storage.uri("replicates", f"seed-{seed}")
    storage_s = ctx.storage.overlay(root, owns=REPLICATE_OWNS)
    log.info("evaluate: seed %d — replicate under %s (WMF, %s and the regressors refitted)", seed, root,
             ", ".join(needed_variants(cfg_s)) or "no CNN")
    ctx_s = Context(cfg_s, storage_s, spark=ctx.spark if cfg.factorize.backend == "spark" else None)
    try:
        run_stage("factorize", cfg_s, ctx_s)
        for name in needed_variants(cfg_s):
            train_model(variant_config(cfg_s, name), ctx_s, promote=False)
        result = evaluate_once(cfg_s, ctx_s)
    finally:
        ctx_s.close()
    return {"cold_start": result.details["cold_start"], "root": root, "manifest": result.manifest_uri}


def _seed_results(cfg: Config, ctx: StageContext) -> dict[int, dict]:
    """Replicates of every seed of ``evaluate.seeds`` the catalog does not stand for."""
    base = catalog_seed(cfg)
    todo = [s for s in dict.fromkeys(cfg.evaluate.seeds) if s != base]
    if todo and needed_variants(replicate_config(cfg, todo[0])):
        ctx.ensure_ray()  # one Ray session for every replicate's training
    return {s: replicate(cfg, ctx, s) for s in todo}


def _seeds_section(cfg: Config, replicates: dict[int, dict], cold: dict) -> dict:
    """``metrics.json``'s ``seeds``: the per-seed cold-start tables, their mean ± sd, the
    orderings that hold (intervals apart) and every method's paired difference to
    ``evaluate.seeds_reference``."""
    from deepcontent.evaluate.metrics import seed_differences, seed_summary, separated_orderings

    base = catalog_seed(cfg)
    per_seed = {s: r["cold_start"] for s, r in replicates.items()}
    if base in cfg.evaluate.seeds:
        per_seed[base] = cold
    summary = seed_summary(per_seed)
    if cfg.evaluate.seeds_reference not in summary:
        log.warning("evaluate: evaluate.seeds_reference=%r is not among the methods evaluated (%s): no paired "
                    "differences", cfg.evaluate.seeds_reference, ", ".join(summary))
    metrics = [k for k, v in next(iter(summary.values())).items() if isinstance(v, dict)] if summary else []
    return {"seeds": sorted(per_seed), "catalog_seed": base if base in per_seed else None,
            "cold_start": summary, "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)},
            "orderings": {m: [list(p) for p in separated_orderings(summary, metric=m)] for m in metrics},
            "differences": {"reference": cfg.evaluate.seeds_reference,
                            "methods": seed_differences(per_seed, reference=cfg.evaluate.seeds_reference)},
            "replicates": {str(s): r["root"] for s, r in replicates.items()},
            "protocol": "per seed: the cold-start WMF, every regressor and every CNN variant refitted with that seed "
                        "on the same song split; mean and sample sd over seeds; an ordering a > b is listed when "
                        "mean_a - sd_a > mean_b + sd_b"}


# ----------------------------------------------------------------------------- stage
def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage; see the module docstring. With ``evaluate.seeds``, the seeds the catalog
    does not stand for run first as replicates (:func:`replicate`), then the catalog's own
    evaluation reports their mean ± sd beside its own table."""
    replicates = _seed_results(cfg, ctx) if cfg.evaluate.seeds else {}
    return evaluate_once(cfg, ctx, replicates=replicates if cfg.evaluate.seeds else None)


def evaluate_once(cfg: Config, ctx: StageContext, *, replicates: dict[int, dict] | None = None) -> StageResult:
    """One evaluation of the catalog in ``ctx`` (``replicates``: other seeds' results to
    summarise with it)."""
    from deepcontent.evaluate.report import render_report
    from deepcontent.evaluate.transfer import PROTOCOL_NOTES

    storage, ec = ctx.storage, cfg.evaluate
    with StageRun(STAGE, cfg, storage, sections=("evaluate", "train", "factorize")) as run:
        with run.timed("load"):
            inp = _Inputs(cfg, storage)
        log.info("evaluate: %d test songs (%d dropped: no test plays or no spectrogram), %d users with test plays",
                 len(inp.test_tracks), inp.dropped_test_songs, len(inp.eval_users))
        if not len(inp.test_tracks) or not len(inp.eval_users):
            raise TrainingDataError(f"evaluate: no test songs with plays and spectrograms ({inp.dropped_test_songs} "
                                    f"dropped); the catalog is too small for the cold-start protocol")
        fixed = _fixed_features(cfg, inp.split)
        cache: dict[str, Any] = {}
        cold, source = {}, {}
        for name in ec.methods:
            t0 = time.perf_counter()
            with run.timed(name):
                factors, info = _cold_start_method(name, cfg, storage, inp, fixed, cache)
                if name == "upper_bound":
                    cache["upper_bound"] = factors
                m = cold_start_metrics(inp.user_factors, factors, inp.test_plays, users=inp.eval_users, map_k=ec.map_k,
                                       ndcg_k=ec.ndcg_k, recall_k=ec.recall_k)
            cold[name] = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in m.items()}
            if info:
                source[name] = info
            log.info("evaluate: %-13s %s  (%.1fs)", name,
                     "  ".join(f"{metric_label(k)} {v:.4f}" for k, v in cold[name].items() if isinstance(v, float)),
                     time.perf_counter() - t0)
        tags = {}
        if ec.tag_prediction:
            with run.timed("tag_prediction"):
                tags = _tag_prediction(cfg, storage, inp, fixed)
        transfer = {}
        if ec.transfer:
            with run.timed("transfer"):
                transfer = _transfer(cfg, storage, fixed, cache)
        with run.timed("interpretation"):
            interpretation = _interpretation(cfg, inp, cache)
        protocol = {"cold_start": describe_cutoffs(map_k=ec.map_k, ndcg_k=ec.ndcg_k, recall_k=ec.recall_k,
                                                   n_candidates=len(inp.test_tracks)),
                    "transfer": PROTOCOL_NOTES}
        seeds = _seeds_section(cfg, replicates, cold) if replicates is not None else None
        if seeds is not None:
            for metric, pairs in seeds["orderings"].items():
                log.info("evaluate: over seeds %s, %s orderings that hold: %s", seeds["seeds"], metric_label(metric),
                         ", ".join(f"{a} > {b}" for a, b in pairs) or "none")
        metrics = {"cold_start": cold, "source": source, "tag_prediction": tags, "transfer": transfer,
                   **({"seeds": seeds} if seeds is not None else {}),
                   "interpretation": interpretation, "protocol": protocol,
                   "run": {"run_id": run.run_id, "test_songs": len(inp.test_tracks), "users": len(inp.eval_users),
                           "train_songs": inp.data.counts["train_songs"], "valid_songs": inp.data.counts["valid_songs"]}}
        with run.timed("report"):
            html = render_report(metrics, figures_data=_figures(storage, inp, cache), out_path=None,
                                 title="deepcontent — cold-start and transfer evaluation")
            out = storage.uri(datasets.EVALUATE, run.run_id)
            storage.write_json(join(out, "metrics.json"), metrics)
            storage.write_bytes(join(out, "report.html"), html.encode())
            local = Path(ec.report_dir)
            local.mkdir(parents=True, exist_ok=True)
            (local / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            (local / "report.html").write_text(html)
        outputs = {"metrics": join(out, "metrics.json"), "report": join(out, "report.html"),
                   "local_report": str(local.resolve() / "report.html")}
        log.info("evaluate: report %s (copy at %s)", outputs["report"], outputs["local_report"])
        return run.succeed(counts={"test_songs": len(inp.test_tracks), "users": len(inp.eval_users), "methods": len(cold)},
                           outputs=outputs, record={"metrics": metrics}, cold_start=cold, source=source,
                           tag_prediction=tags, transfer=transfer, protocol=protocol, report=outputs["local_report"],
                           **({"seeds": seeds} if seeds is not None else {}))
