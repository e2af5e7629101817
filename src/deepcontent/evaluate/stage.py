"""Stage ``evaluate``: the papers' cold-start experiment, source-task NMSE, transfer, report.

The protocol (``ARCHITECTURE.md``): WMF was fitted on users × **train songs** only (user
factors X); every method predicts factors y′ for the **test songs** from their audio alone, and
users are ranked over the test songs by s_ui = x_u·y′_i against who actually played them
(``user_items_test``). No test song's plays reach factorisation, training or model selection;
the only method that sees them is the ``upper_bound``: test-song factors folded in from their
own plays with X fixed.

Methods (``evaluate.methods``):

``random``          scores from a seeded standard normal y′.
``bow_linear``      BoW-MFCC (vocabulary size and ridge penalty chosen on valid) + linear regression.
``bow_mlp``         the same features + an MLP with 1,000 ReLU units.
``kmeans_linear``   spherical K-means features + linear regression (penalty chosen on valid).
``cnn_mse``/``cnn_wpe``/``deep_cnn``
                    a registered CNN (paper CNN with MSE or WPE loss, deeper CNN), trained by the
                    train stage if that configuration was never trained (registered without
                    becoming the production model); clip predictions are window averages.
``upper_bound``     fold-in from the test plays.

Also: validation NMSE per regressor (source task); transfer with CNN features (predicted
factors, penultimate layer) vs spherical K-means features — 10-fold nested-CV linear-SVM
accuracy on the GTZAN-layout folder and tag AUC (top 50 and all tags) on the
MagnaTagATune-layout set; the embedding dimension most correlated with each hand-crafted
descriptor (:mod:`deepcontent.evaluate.descriptors`); and a self-contained HTML report. Outputs go to
``<root>/evaluate/<run_id>/{metrics.json,report.html}`` and a copy to ``evaluate.report_dir``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from deepcontent.config import Config
from deepcontent.evaluate.metrics import cold_start_metrics, tag_prediction_metrics
from deepcontent.factorize.foldin import fold_in
from deepcontent.factorize.stage import factors_by_index, factors_dataset
from deepcontent.ingest import TAGS, TRACKS
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.matrices import EXPORTS, ITEM_INDEX, SPLITS, USER_INDEX, export_files, load_csr
from deepcontent.spectrograms import read_spectrograms
from deepcontent.storage import Storage, join, new_run_id

__all__ = ["STAGE", "EvaluateResult", "run_evaluate"]

STAGE = "evaluate"
L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
# Every variant states what it reads and predicts, so a base config of another kind (a raw-audio
# or tag model in ``train``) cannot leak into the cold-start methods.
_LISTENING = {"input": "log_mel", "targets": "plays"}
CNN_VARIANTS = {"cnn_mse": {"model": "paper_cnn", "loss": "mse", **_LISTENING},
                "cnn_wpe": {"model": "paper_cnn", "loss": "wpe", **_LISTENING},
                "deep_cnn": {"model": "deep_cnn", "loss": "mse", **_LISTENING}}


@dataclass
class EvaluateResult(StageResult):
    """:class:`StageResult` plus the metrics (``cold_start`` per method, ``source``, ``transfer``)
    and the local path of the HTML report."""

    metrics: dict[str, Any] = field(default_factory=dict)
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "cold_start": self.metrics.get("cold_start", {}),
                "source": self.metrics.get("source", {}), "tag_prediction": self.metrics.get("tag_prediction", {}),
                "transfer": self.metrics.get("transfer", {}),
                "report": self.report}


# ----------------------------------------------------------------------------- inputs
def _mels(table: pa.Table) -> list[np.ndarray]:
    return [np.frombuffer(m, np.float16).reshape(a, b).astype(np.float32)
            for m, a, b in zip(table["mel"].to_pylist(), table["n_mels"].to_pylist(), table["n_frames"].to_pylist())]


class _Split:
    """Users, test songs and their clips, loaded once for every method."""

    def __init__(self, storage: Storage) -> None:
        from deepcontent.train.data import build_targets, list_matrix

        exports = storage.published(storage.uri(EXPORTS))
        if exports is None:
            raise FileNotFoundError(f"evaluate needs the matrices at {storage.uri(EXPORTS)}; run the pipeline first")
        files = export_files(storage, exports)
        self.train_plays = load_csr(storage, files["user_items_train.npz"])
        test_plays = load_csr(storage, files["user_items_test.npz"])
        n_users = test_plays.shape[0]
        # X: the WMF user factors, by user index (users without train plays have none: left out)
        self.user_factors, self.has_factors = factors_by_index(
            storage, factors_dataset("plays", "user_factors"), USER_INDEX, id_column="user_id", n_rows=n_users)

        # test songs: split == test, at least one test play, and a track with a spectrogram
        items = storage.read_dataset(storage.uri(ITEM_INDEX))
        splits = storage.read_dataset(storage.uri(SPLITS))
        split_of = dict(zip(splits["song_id"].to_pylist(), splits["split"].to_pylist()))
        tracks = storage.read_dataset(storage.uri(TRACKS), columns=["track_id", "song_id", "artist", "title"])
        spec = read_spectrograms(storage, columns=["track_id", "n_mels", "n_frames", "mel"])
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
        by_track = {t: i for i, t in enumerate(spec["track_id"].to_pylist())}
        self._spec, self._by_track = spec, by_track
        self.track_of_song = track_of
        self.test_mels = _mels(spec.take(pa.array([by_track[t] for t in self.test_tracks], pa.int64())))

        # train / valid regressor data (the train stage's own split and standardisation)
        self.data = build_targets(storage)
        self.train_mels = _mels(spec.take(pa.array([by_track[t] for t in self.data.train["track_id"].to_pylist()], pa.int64())))
        self.valid_mels = _mels(spec.take(pa.array([by_track[t] for t in self.data.valid["track_id"].to_pylist()], pa.int64())))
        self.y_train = list_matrix(self.data.train["target"])
        self.y_valid = list_matrix(self.data.valid["target"])

    def mels_of(self, track_ids: list[str]) -> list[np.ndarray]:
        """Log-mels ``(n_mels, n_frames)`` float32 of tracks that have a spectrogram."""
        return _mels(self._spec.take(pa.array([self._by_track[t] for t in track_ids], pa.int64())))

    def raw(self, z: np.ndarray) -> np.ndarray:
        """Standardised predictions -> WMF units."""
        return (z * self.data.target_std + self.data.target_mean).astype(np.float32)


# ----------------------------------------------------------------------------- methods
def _nmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred - target) ** 2) / target.var(axis=0).mean())


def _linear_on_valid(x_train, y_train, x_valid, y_valid):
    from deepcontent.models.baselines import fit_linear

    scores = {l2: _nmse(fit_linear(x_train, y_train, l2=l2).predict(x_valid), y_valid) for l2 in L2_GRID}
    best = min(scores, key=scores.get)
    return fit_linear(x_train, y_train, l2=best), scores[best], best


def _bow(cfg: Config, s: _Split, cache: dict) -> tuple:
    """BoW features for train / valid / test with the vocabulary size (of ``train.baseline_words``)
    whose linear model does best on valid, as the train stage's baseline chooses it."""
    if "bow" not in cache:
        from deepcontent.models.baselines import BagOfWords

        max_words = max(2, sum(m.shape[1] for m in s.train_mels) // 4)
        best = None
        for words in sorted({min(int(w), max_words) for w in cfg.train.baseline_words}):
            bow = BagOfWords(words, compression=cfg.spectrograms.compression, seed=cfg.evaluate.seed).fit(s.train_mels)
            x_tr, x_va = bow.transform(s.train_mels), bow.transform(s.valid_mels)
            _, nmse, _ = _linear_on_valid(x_tr, s.y_train, x_va, s.y_valid)
            if best is None or nmse < best[0]:
                best = (nmse, words, bow, x_tr, x_va)
        _, words, bow, x_tr, x_va = best
        cache["bow"] = (x_tr, x_va, bow.transform(s.test_mels), words)
        cache["bow_model"] = bow
    return cache["bow"]


def _method_bow_linear(cfg, s, cache, rt):
    x_tr, x_va, x_te, words = _bow(cfg, s, cache)
    model, nmse, l2 = _linear_on_valid(x_tr, s.y_train, x_va, s.y_valid)
    return s.raw(model.predict(x_te)), {"valid_nmse": nmse, "l2": l2, "words": words}


def _method_bow_mlp(cfg, s, cache, rt):
    from deepcontent.models.baselines import fit_mlp

    x_tr, x_va, x_te, _ = _bow(cfg, s, cache)
    model = fit_mlp(x_tr, s.y_train, hidden=1000, epochs=cfg.evaluate.mlp_epochs, weight_decay=1e-4, dropout=0.5,
                    seed=cfg.evaluate.seed)
    return s.raw(model.predict(x_te)), {"valid_nmse": _nmse(model.predict(x_va), s.y_valid)}


def _kmeans(cfg: Config, s: _Split, cache: dict):
    if "kmeans" not in cache:
        from deepcontent.models.baselines import SphericalKMeansFeatures

        frames = sum(m.shape[1] for m in s.train_mels)
        k = max(2, min(cfg.evaluate.kmeans_centroids, frames // 8))
        km = SphericalKMeansFeatures(k, seed=cfg.evaluate.seed).fit(s.train_mels)
        cache["kmeans"] = km
    return cache["kmeans"]


def _method_kmeans_linear(cfg, s, cache, rt):
    km = _kmeans(cfg, s, cache)
    x_tr, x_va, x_te = km.transform(s.train_mels), km.transform(s.valid_mels), km.transform(s.test_mels)
    model, nmse, l2 = _linear_on_valid(x_tr, s.y_train, x_va, s.y_valid)
    return s.raw(model.predict(x_te)), {"valid_nmse": nmse, "l2": l2, "centroids": km.n_centroids}


def _variant(cfg: Config, **train: Any) -> Config:
    """``cfg`` with some ``train`` settings replaced, validated together (a raw-audio model and
    its waveform input must change at once)."""
    from deepcontent.config import TrainConfig

    return cfg.model_copy(update={"train": TrainConfig.model_validate({**cfg.train.model_dump(), **train})})


def _cnn(name: str):
    def method(cfg, s, cache, rt):
        from deepcontent.embed.pooling import clip_outputs
        from deepcontent.train.registry import load_model, registered
        from deepcontent.train.stage import run_train

        variant = _variant(cfg, **CNN_VARIANTS[name])
        rt.ensure_ray()
        result = run_train(variant, rt.storage, promote=False)
        model, artifact = load_model(rt.storage, result.model_version)
        kw = dict(n_frames=artifact["window_frames"], target_mean=artifact["target_mean"], target_std=artifact["target_std"])
        pred, emb = clip_outputs(model, s.test_mels, **kw)
        cache.setdefault("cnn_models", {})[name] = (model, kw, result.model_version)
        cache.setdefault("test_embeddings", {})[name] = (pred, emb)
        meta = registered(rt.storage, result.model_version) or {}
        curve = meta.get("curve", [])
        cache.setdefault("curves", {})[name] = {"epoch": [h["epoch"] for h in curve],
                                                 "train_loss": [h["train_loss"] for h in curve],
                                                 "valid_nmse": [h["valid_nmse"] for h in curve]}
        return pred, {"valid_nmse": result.metrics.get("valid_nmse"), "model_version": result.model_version}

    return method


def _method_raw_cnn(cfg, s, cache, rt):
    """The raw-audio front end + paper CNN (thesis ch. 5), trained with MSE on mono waveforms of
    the train / valid songs (:mod:`deepcontent.waveforms`); a window of ``train.window_frames``
    spectrogram frames is the same span of samples, and the front end's filters are one hop
    long so the back end sees the spectrogram's frame rate."""
    from deepcontent.embed.pooling import clip_outputs
    from deepcontent.train.registry import load_model, registered
    from deepcontent.train.stage import run_train
    from deepcontent.waveforms import WAVEFORMS, publish_waveforms

    from deepcontent.config import TrainConfig

    hop = cfg.spectrograms.hop_length
    tracks = s.data.train["track_id"].to_pylist() + s.data.valid["track_id"].to_pylist() + s.test_tracks
    waves = publish_waveforms(cfg, rt.storage, track_ids=tracks)
    frames = cfg.train.window_frames if cfg.train.input == "log_mel" else TrainConfig().window_frames
    variant = _variant(cfg, model="raw_audio", input="waveform", targets="plays", loss="mse",
                       window_frames=frames * hop, model_params={"filter_length": hop}, gain_db=0.0, baseline=False)
    rt.ensure_ray()
    result = run_train(variant, rt.storage, promote=False)
    model, artifact = load_model(rt.storage, result.model_version)
    # only the test songs' waveforms: the train / valid ones are most of the dataset
    table = rt.storage.read_dataset(rt.storage.uri(WAVEFORMS), columns=["track_id", "n_mels", "n_frames", "mel"],
                                    filters=pc.field("track_id").isin(s.test_tracks))
    clips = dict(zip(table["track_id"].to_pylist(), _mels(table)))
    have = [t for t in s.test_tracks if t in clips]
    # a test song whose audio did not decode again gets the train mean (counted below)
    pred = np.tile(np.asarray(artifact["target_mean"], np.float32), (len(s.test_tracks), 1))
    if have:
        pred_have, _ = clip_outputs(model, [clips[t] for t in have], n_frames=artifact["window_frames"],
                                    target_mean=artifact["target_mean"], target_std=artifact["target_std"],
                                    windows_per_forward=16)
        rows = {t: i for i, t in enumerate(have)}
        for i, t in enumerate(s.test_tracks):
            if t in rows:
                pred[i] = pred_have[rows[t]]
    curve = (registered(rt.storage, result.model_version) or {}).get("curve", [])
    cache.setdefault("curves", {})["raw_cnn"] = {"epoch": [h["epoch"] for h in curve],
                                                 "train_loss": [h["train_loss"] for h in curve],
                                                 "valid_nmse": [h["valid_nmse"] for h in curve]}
    return pred, {"valid_nmse": result.metrics.get("valid_nmse"), "model_version": result.model_version,
                  "test_songs_without_audio": len(s.test_tracks) - len(have),
                  "waveform_tracks_left_out": len(waves["left_out"])}


def _method_random(cfg, s, cache, rt):
    rng = np.random.default_rng(cfg.evaluate.seed)
    return rng.standard_normal((len(s.test_tracks), s.user_factors.shape[1])).astype(np.float32), {}


def _method_upper_bound(cfg, s, cache, rt):
    fc = cfg.factorize
    item_users = sp.csr_matrix(s.test_plays.T)
    return fold_in(item_users, s.user_factors, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization), {}


METHODS: dict[str, Callable] = {
    "random": _method_random, "bow_linear": _method_bow_linear, "bow_mlp": _method_bow_mlp,
    "kmeans_linear": _method_kmeans_linear, "cnn_mse": _cnn("cnn_mse"), "cnn_wpe": _cnn("cnn_wpe"),
    "deep_cnn": _cnn("deep_cnn"), "raw_cnn": _method_raw_cnn, "upper_bound": _method_upper_bound,
}


# ----------------------------------------------------------------------------- tag source task
def _tag_prediction(cfg: Config, storage: Storage, s: _Split, cache: dict, rt) -> dict:
    """The ISMIR 2014 tag source task: WMF on songs × tags (train songs; run here when missing)
    gives song factors U and tag factors V; each regressor predicts U′ for the test songs from
    audio, and the tag scores A′ = U′Vᵀ rank the test songs per tag against their actual tags.
    Reported per method: mean per-tag AUC and mAP (over all test songs), and validation NMSE.

    Test songs are those of the cold-start experiment that have at least one tag; tags count
    when they have factors (they occur on train songs) and at least one test song."""
    from deepcontent.factorize.stage import run_factorize
    from deepcontent.matrices import TAG_INDEX
    from deepcontent.train.data import TrainingDataError, build_targets, list_matrix

    ec, fc = cfg.evaluate, cfg.factorize
    files = export_files(storage, storage.published(storage.uri(EXPORTS)))
    if "item_tags_train.npz" not in files or load_csr(storage, files["item_tags_train.npz"]).nnz == 0:
        return {"skipped": "no tags on train songs: the catalog has no tag matrix to factorise"}
    tag_cfg = cfg.model_copy(update={"factorize": fc.model_copy(update={"matrix": "tags"})})
    run_factorize(tag_cfg, storage, rt.spark if fc.backend == "spark" else None)
    try:
        data = build_targets(storage, matrix="tags")
    except TrainingDataError as exc:
        return {"skipped": str(exc)[:300]}

    tags_test = load_csr(storage, files["item_tags_test.npz"])[s.test_cols].tocsr()
    tagged = np.flatnonzero(np.diff(tags_test.indptr) > 0)
    if len(tagged) < 2:
        return {"skipped": f"{len(tagged)} test songs with tags: too few to rank"}
    tags_test = tags_test[tagged]  # tagged test songs × tags
    truth = tags_test.T.tocsr()  # tags × test songs
    V, has_v = factors_by_index(storage, factors_dataset("tags", "tag_factors"), TAG_INDEX, id_column="tag",
                                n_rows=truth.shape[0])
    eval_tags = np.flatnonzero(has_v & (np.diff(truth.indptr) > 0))
    test_mels = [s.test_mels[i] for i in tagged]
    y_train, y_valid = list_matrix(data.train["target"]), list_matrix(data.valid["target"])

    def unstd(z):
        return (z * data.target_std + data.target_mean).astype(np.float32)

    def linear(features):
        x_tr = features.transform(s.mels_of(data.train["track_id"].to_pylist()))
        x_va = features.transform(s.mels_of(data.valid["track_id"].to_pylist()))
        model, nmse, l2 = _linear_on_valid(x_tr, y_train, x_va, y_valid)
        return unstd(model.predict(features.transform(test_mels))), {"valid_nmse": nmse, "l2": l2}

    def cnn_tags():
        from deepcontent.embed.pooling import clip_outputs
        from deepcontent.train.registry import load_model
        from deepcontent.train.stage import run_train

        rt.ensure_ray()
        result = run_train(_variant(cfg, model="paper_cnn", input="log_mel", targets="tags", loss="mse"), storage,
                           promote=False)
        model, artifact = load_model(storage, result.model_version)
        pred, _ = clip_outputs(model, test_mels, n_frames=artifact["window_frames"], target_mean=artifact["target_mean"],
                               target_std=artifact["target_std"])
        return pred, {"valid_nmse": result.metrics.get("valid_nmse"), "model_version": result.model_version}

    def method(name):
        if name == "random":
            rng = np.random.default_rng(ec.seed)
            return rng.standard_normal((len(tagged), V.shape[1])).astype(np.float32), {}
        if name == "bow_linear":
            _bow(cfg, s, cache)
            return linear(cache["bow_model"])
        if name == "kmeans_linear":
            return linear(_kmeans(cfg, s, cache))
        if name == "cnn_tags":
            return cnn_tags()
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
def _clip_mels(cfg: Config, storage: Storage, uris: list[str], *,
               hpss: bool = False) -> tuple[dict[str, list[np.ndarray]], list[int], dict[str, str]]:
    """Log-mels of the target-set clips at ``uris`` (decoded here: they are not in the catalog),
    the indices that decoded, and ``{uri: reason}`` for those that did not (left out, counted).

    Returns ``{"mel": [...]}`` — plus ``"harmonic"`` and ``"percussive"`` with ``hpss`` — each a
    list of float32 ``(n_mels, n_frames)`` arrays, one per kept clip."""
    from deepcontent.audio.features import compute_log_mel
    from deepcontent.spectrograms import mel_settings

    settings = mel_settings(cfg.spectrograms)
    if hpss != settings.hpss:
        settings = dataclasses.replace(settings, hpss=hpss)
    parts = ("mel", "harmonic", "percussive") if hpss else ("mel",)
    clips: dict[str, list[np.ndarray]] = {p: [] for p in parts}
    kept, skipped = [], {}
    for i, uri in enumerate(uris):
        try:
            result = compute_log_mel(storage.read_bytes(uri), settings=settings)
        except Exception as exc:  # a missing or undecodable clip: recorded, the rest goes on
            skipped[uri] = f"{getattr(exc, 'reason', type(exc).__name__)}: {exc}"[:300]
            log.warning("evaluate: target-set clip %s left out: %s", uri, skipped[uri])
            continue
        for p in parts:
            clips[p].append(np.asarray(result[p], np.float32))
        kept.append(i)
    return clips, kept, skipped


def _gtzan(cfg: Config, storage: Storage, *, hpss: bool = False) -> tuple[dict[str, list[np.ndarray]], list[str], dict[str, str]]:
    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    uris = [o.uri for o in storage.list(base)]
    clips, kept, skipped = _clip_mels(cfg, storage, uris, hpss=hpss)
    labels = [uris[i][len(base):].strip("/").split("/")[0] for i in kept]
    return clips, labels, skipped


def _transfer_features(cfg: Config, s: _Split, cache: dict, mels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Transfer features of target-set clips: spherical K-means, and per trained CNN variant its
    predicted factors and penultimate layer (window averages)."""
    from deepcontent.embed.pooling import clip_outputs

    feats = {"kmeans": _kmeans(cfg, s, cache).transform(mels)}
    for name, (model, kw, _) in cache.get("cnn_models", {}).items():
        pred, emb = clip_outputs(model, mels, **kw)
        feats[f"{name}_factors"], feats[f"{name}_penultimate"] = pred, emb
    return feats


def _transfer(cfg: Config, storage: Storage, s: _Split, cache: dict) -> dict:
    """GTZAN-layout genre accuracy (nested CV) per feature set — with ``evaluate.late_fusion``
    also the harmonic / percussive / original late fusion of each — and the MTAT-layout tag AUC."""
    from deepcontent.evaluate.transfer import late_fusion_svm_accuracy, nested_cv_svm_accuracy

    ec = cfg.evaluate
    clips, labels, skipped = _gtzan(cfg, storage, hpss=ec.late_fusion)
    mels = clips["mel"]
    if len(set(labels)) < 2 or min(labels.count(g) for g in set(labels)) < ec.transfer_folds:
        return {"gtzan": {"skipped": f"{len(mels)} clips in {len(set(labels))} genres: too few for "
                                     f"{ec.transfer_folds}-fold CV", "clips_left_out": skipped}}
    feats = _transfer_features(cfg, s, cache, mels)
    out = {}
    for name, x in feats.items():
        out[name] = _jsonable(nested_cv_svm_accuracy(x, labels, folds=ec.transfer_folds, seed=ec.seed))
    if ec.late_fusion:
        # the same feature extractors on each HPSS component, one SVM per component, scores averaged
        parts = {p: _transfer_features(cfg, s, cache, clips[p]) for p in ("harmonic", "percussive")}
        for name, x in feats.items():
            fused = late_fusion_svm_accuracy([x, parts["harmonic"][name], parts["percussive"][name]], labels,
                                             folds=ec.transfer_folds, seed=ec.seed)
            out[f"{name}_hpss_fusion"] = _jsonable(fused)
    log.info("evaluate: GTZAN-layout transfer accuracy %s",
             ", ".join(f"{n} {r['mean']:.3f}±{r['std']:.3f}" for n, r in out.items() if "mean" in r))
    if skipped:
        out["clips_left_out"] = skipped
    result = {"gtzan": out}
    mtat = _mtat(cfg, storage, s, cache)
    if mtat:
        result["mtat"] = mtat
    return result


def _jsonable(r: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else _jsonable(v) if isinstance(v, dict) else v)
            for k, v in r.items()}


def _mtat(cfg: Config, storage: Storage, s: _Split, cache: dict) -> dict:
    """Tag AUC (top-50 and all tags, the transfer paper's part split) on the MagnaTagATune-layout
    set: ``annotations_final.csv`` + clips, features as for GTZAN."""
    import csv

    from deepcontent.evaluate.transfer import mtat_tag_auc

    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.mtat)
    ann = join(base, "annotations_final.csv")
    if not storage.exists(ann):
        return {}
    rows = list(csv.reader(io.StringIO(storage.read_bytes(ann).decode("utf-8")), delimiter="\t"))
    header, rows = rows[0], [r for r in rows[1:] if r]
    tag_names = header[1:-1]
    clips, kept, skipped = _clip_mels(cfg, storage, [join(base, r[-1]) for r in rows])
    mels = clips["mel"]
    tags = [[int(v) for v in rows[i][1:-1]] for i in kept]
    paths = [rows[i][-1] for i in kept]
    if len(mels) < 20:
        return {"skipped": f"{len(mels)} usable MagnaTagATune-layout clips: too few", "clips_left_out": skipped}
    T = np.asarray(tags, np.int8)
    feats = _transfer_features(cfg, s, cache, mels)
    out = {}
    for name, x in feats.items():
        try:
            out[name] = _jsonable(mtat_tag_auc(x, T, paths, top=50, seed=cfg.evaluate.seed))
        except ValueError as exc:  # e.g. no tag with both classes in the test parts
            out[name] = {"skipped": str(exc)}
    if skipped:
        out["clips_left_out"] = skipped
    log.info("evaluate: MTAT-layout tag AUC (%d clips, %d tags) %s", len(mels), len(tag_names),
             ", ".join(f"{n} {r['top50']['auc_mean']:.3f}" for n, r in out.items() if isinstance(r, dict) and "top50" in r))
    return out


def _interpretation(cfg: Config, s: _Split, cache: dict) -> dict:
    """Per hand-crafted descriptor, the CNN embedding dimension that correlates most with it
    over the test songs (thesis §4.6)."""
    from deepcontent.evaluate.descriptors import mel_descriptors
    from deepcontent.evaluate.transfer import descriptor_correlations

    emb = cache.get("test_embeddings", {})
    if not emb or len(s.test_mels) < 5:
        return {}
    sc = cfg.spectrograms
    rows = [mel_descriptors(m, sample_rate=sc.sample_rate, hop_length=sc.hop_length, compression=sc.compression)
            for m in s.test_mels]
    descriptors = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out = {}
    for name, (pred, penult) in emb.items():
        out[f"{name}_penultimate"] = _jsonable(descriptor_correlations(penult, descriptors))
        out[f"{name}_factors"] = _jsonable(descriptor_correlations(pred, descriptors))
    return out


# ----------------------------------------------------------------------------- report data
def _figures(storage: Storage, s: _Split, cache: dict) -> dict:
    from deepcontent.embed.neighbors import top_k_cosine

    fig: dict[str, Any] = {"training_curves": cache.get("curves", {})}
    tags = storage.read_dataset(storage.uri(TAGS)) if storage.published(storage.uri(TAGS)) else None
    top_tag: dict[str, str] = {}
    if tags is not None and tags.num_rows:
        for t, tag, w in sorted(zip(*(tags[c].to_pylist() for c in ("track_id", "tag", "weight"))), key=lambda r: -r[2]):
            top_tag.setdefault(t, tag)
    emb = cache.get("test_embeddings", {})
    if emb:
        name = "cnn_mse" if "cnn_mse" in emb else next(iter(emb))
        pred, penult = emb[name]
        fig["embedding_map"] = {"points": penult, "labels": [top_tag.get(t, "untagged") for t in s.test_tracks],
                                "method": f"the {name} model's penultimate layer"}
        upper = cache.get("upper_bound")
        if upper is not None and len(s.test_tracks) > 3:
            wmf_idx, _ = top_k_cosine(upper, k=5)
            pred_idx, _ = top_k_cosine(pred, k=5)
            fig["neighbors"] = [{"query": s.names.get(s.test_tracks[q], s.test_tracks[q]),
                                 "wmf": [s.names.get(s.test_tracks[j], "") for j in wmf_idx[q]],
                                 "predicted": [s.names.get(s.test_tracks[j], "") for j in pred_idx[q]]}
                                for q in range(min(4, len(s.test_tracks)))]
    return fig


# ----------------------------------------------------------------------------- stage
def run_evaluate(cfg: Config, storage: Storage, rt) -> EvaluateResult:
    """Run the stage; ``rt`` provides ``storage`` and ``ensure_ray()`` (the CLI's runtime)."""
    from deepcontent.evaluate.report import render_report

    ec = cfg.evaluate
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("evaluate", "train", "factorize"))
    with manifest.timed("load"):
        s = _Split(storage)
    log.info("evaluate: %d test songs (%d dropped: no test plays or no spectrogram), %d users with test plays",
             len(s.test_tracks), s.dropped_test_songs, len(s.eval_users))
    if not len(s.test_tracks) or not len(s.eval_users):
        raise ValueError(f"evaluate: no test songs with plays and spectrograms ({s.dropped_test_songs} dropped); "
                         f"the catalog is too small for the cold-start protocol")
    cache: dict[str, Any] = {}
    cold, source = {}, {}
    for name in ec.methods:
        t0 = time.perf_counter()
        with manifest.timed(name):
            factors, info = METHODS[name](cfg, s, cache, rt)
            if name == "upper_bound":
                cache["upper_bound"] = factors
            m = cold_start_metrics(s.user_factors, factors, s.test_plays, users=s.eval_users, map_k=ec.map_k,
                                   ndcg_k=ec.ndcg_k, recall_k=ec.recall_k)
        cold[name] = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in m.items()}
        if info:
            source[name] = info
        log.info("evaluate: %-13s mAP@%d %.4f  AUC %.4f  NDCG@%d %.4f  recall@%d %.4f  (%.1fs)", name, ec.map_k,
                 m[f"map{ec.map_k}"], m["auc"], ec.ndcg_k, m[f"ndcg{ec.ndcg_k}"], ec.recall_k, m[f"recall{ec.recall_k}"],
                 time.perf_counter() - t0)
    tags = {}
    if ec.tag_prediction:
        with manifest.timed("tag_prediction"):
            tags = _tag_prediction(cfg, storage, s, cache, rt)
    transfer = {}
    if ec.transfer:
        with manifest.timed("transfer"):
            transfer = _transfer(cfg, storage, s, cache)
    with manifest.timed("interpretation"):
        interpretation = _interpretation(cfg, s, cache)
    metrics = {"cold_start": cold, "source": source, "tag_prediction": tags, "transfer": transfer,
               "interpretation": interpretation,
               "run": {"run_id": run_id, "test_songs": len(s.test_tracks), "users": len(s.eval_users),
                       "train_songs": s.data.counts["train_songs"], "valid_songs": s.data.counts["valid_songs"]}}
    with manifest.timed("report"):
        html = render_report(metrics, figures_data=_figures(storage, s, cache), out_path=None,
                             title="deepcontent — cold-start and transfer evaluation")
        out = storage.uri(STAGE, run_id)
        storage.write_json(join(out, "metrics.json"), metrics)
        storage.write_bytes(join(out, "report.html"), html.encode())
        local = Path(ec.report_dir)
        local.mkdir(parents=True, exist_ok=True)
        (local / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        (local / "report.html").write_text(html)
    manifest.counts = {"test_songs": len(s.test_tracks), "users": len(s.eval_users), "methods": len(cold)}
    manifest.outputs = {"metrics": join(out, "metrics.json"), "report": join(out, "report.html"),
                        "local_report": str(local.resolve() / "report.html")}
    manifest.metrics = metrics
    uri = manifest.write(storage, status="succeeded")
    log.info("evaluate: report %s (copy at %s); manifest %s", manifest.outputs["report"], manifest.outputs["local_report"], uri)
    return EvaluateResult(run_id, True, manifest.counts, {}, manifest.outputs, uri, metrics=metrics,
                          report=manifest.outputs["local_report"])
