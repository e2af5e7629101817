"""Stage ``transfer``: genre-style transfer on any GTZAN-layout folder, without a catalog.

::

    deepcontent transfer DIR_OR_URI [--model VERSION|all|production|none] [--groups FILE | --group-level 2]

The folder is ``<label>/<clip>`` (``<label>/<group>/<clip>`` with ``--group-level 2``), any codec
the decoder reads (libsndfile, then ffmpeg), any length: every clip is decoded through the
spectrogram job's isolated decoder (:func:`decode_clips`) with the configured log-mel settings
(and again with a model's own, where they differ), cut into ``transfer.excerpts_per_track``
excerpts of ``transfer.excerpt_seconds`` from the middle of the track
(:mod:`deepcontent.evaluate.clip_features`), and each feature set averages its excerpt features
back to one row per track. Feature sets (``transfer.features``):

``<model>_factors`` / ``<model>_penultimate``
    every registered listening model's predicted factors and penultimate layer (window
    averages), and a pretrained backbone's penultimate layer (``deepcontent pretrain``; its
    outputs are a projection, not factors): ``transfer.model`` = ``all`` (production and every
    variant trained on plays, and the pretrained backbone),
    ``production``, a variant name, a model version, or ``none``;
``kmeans``
    spherical K-means (ISMIR 2014 §3.3) fitted on the **training folds only** of each outer fold
    (:data:`~deepcontent.evaluate.transfer.FoldFeatures`);
``logmel_stats`` / ``mfcc_stats``
    mean and standard deviation over time of each log-mel band / of 13 MFCCs + Δ + ΔΔ.

For each, :func:`~deepcontent.evaluate.transfer.transfer_protocols`: linear L2-SVM accuracy by
nested CV stratified over clips, the same grouped over artists / albums / sources (from a groups
file, the folder's own ``groups.csv``, or a folder level; leave-one-group-out or grouped k-fold,
inner loop grouped too), and the 1-NN accuracy with the neighbour from another group.

Every object under the folder is accounted for: ``clips_used + len(clips_left_out) =
clips_found`` (the folder's groups file is not a clip); a clip that does not decode is left out
with its reason. With ``--model none`` nothing is read but the folder (and the groups file).
Outputs: ``<root>/transfer/<run_id>/{metrics.json,report.html}`` and a copy in
``transfer.report_dir``; the command's JSON holds one object per feature set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepcontent.config import Config
from deepcontent.errors import InputMissingError, TrainingDataError
from deepcontent.evaluate.target_folder import GROUPS_FILE, layout, parse_groups_csv
from deepcontent.manifest import Progress, log
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.storage import Storage, join, relative_key

__all__ = ["STAGE", "TargetFolder", "decode_clips", "folder_uri", "read_target_folder", "run"]

STAGE = "transfer"


# ----------------------------------------------------------------------------- the folder
def folder_uri(path: str) -> str:
    """A folder argument as a URI: ``s3://…`` and ``file://…`` as they are, a local path
    (relative to the working directory) as ``file://<absolute path>``."""
    if "://" in path:
        return path.rstrip("/")
    return "file://" + os.path.abspath(os.path.expanduser(path)).rstrip("/")


def decode_clips(cfg: Config, storage: Storage, uris: list[str], *, settings=None, hpss: bool = False,
                 stage: str = STAGE) -> tuple[dict[str, list[np.ndarray]], list[int], dict[str, str]]:
    """Log-mels of clips at ``uris`` (not in the catalog: decoded here, through the spectrogram
    job's isolated decoder), the indices that decoded, and ``{uri: "reason: detail"}`` for those
    that did not (left out, counted, logged).

    Returns ``{"mel": [...]}`` — plus ``"harmonic"`` and ``"percussive"`` with ``hpss`` — each a
    list of float16 ``(n_mels, n_frames)`` arrays, one per kept clip (``settings``: a
    :class:`~deepcontent.audio.settings.MelSettings`, default the configured ones)."""
    from deepcontent.engines.sandbox import ClipDecoder, Failure

    sc = cfg.spectrograms
    settings = settings or sc.mel_settings()
    if hpss != settings.hpss:
        settings = dataclasses.replace(settings, hpss=hpss)
    parts = ("mel", "harmonic", "percussive") if hpss else ("mel",)
    clips: dict[str, list[np.ndarray]] = {p: [] for p in parts}
    kept, skipped = [], {}
    progress = Progress(stage, "clips decoded", len(uris))
    with ClipDecoder(storage, sc.compute_fn, settings=settings, timeout_s=sc.decode_timeout_s,
                     memory_limit_mb=sc.decoder_memory_mb, max_bytes=sc.max_audio_bytes) as decoder:
        for i, data, failure in decoder.fetch([(u, None) for u in uris]):
            result = failure or decoder.decode(data)
            progress.update()
            if isinstance(result, Failure):  # a missing or undecodable clip: recorded, the rest goes on
                detail = result.detail
                if detail.startswith(f"{result.reason}:"):  # the decoder's message already leads with it
                    detail = detail[len(result.reason) + 1:].strip()
                skipped[uris[i]] = f"{result.reason}: {detail}"[:300]
                log.warning("%s: clip %s left out: %s", stage, uris[i], skipped[uris[i]])
                continue
            for p in parts:
                clips[p].append(np.asarray(result[p], np.float16))
            kept.append(i)
    return clips, kept, skipped


@dataclass
class TargetFolder:
    """A decoded GTZAN-layout folder.

    Attributes
    ----------
    uri : str
    keys, labels : list of str
        The clips used (relative to the folder) and their class.
    groups : list of str or None
    grouping : dict
        Where the groups came from (``source``, ``groups``, ``unused_rows``), or ``{"source": None}``.
    mels : dict
        ``{settings key: {"mel": [...], ...}}``: per log-mel setting decoded, one array per clip used.
    left_out : dict
        ``{key: "reason: detail"}``.
    found : int
        Objects under the folder (the groups file aside): ``len(keys) + len(left_out)``.
    """

    uri: str
    keys: list[str]
    labels: list[str]
    groups: list[str] | None
    grouping: dict
    mels: dict[str, dict[str, list[np.ndarray]]]
    left_out: dict[str, str]
    found: int


def _groups_uri(storage: Storage, folder: str, groups_file: str) -> str:
    if "://" in groups_file:
        return groups_file
    local = os.path.abspath(os.path.expanduser(groups_file))
    if os.path.exists(local):
        return "file://" + local
    inside = join(folder, groups_file)
    if storage.exists(inside):
        return inside
    raise InputMissingError(f"groups file {groups_file!r} not found (neither {local} nor {inside})")


def _grouping(cfg: Config, storage: Storage, folder: str, *, groups_file: str | None,
              group_level: int | None) -> tuple[dict | None, int | None, dict]:
    """``(groups map or None, group level or None, description)``."""
    if group_level is not None:
        return None, group_level, {"source": f"folder level {group_level} (<label>/<group>/<clip>)"}
    if groups_file is not None:
        uri = _groups_uri(storage, folder, groups_file)
    else:
        uri = join(folder, GROUPS_FILE)
        if not storage.exists(uri):
            return None, None, {"source": None}
    if not storage.exists(uri):
        raise InputMissingError(f"groups file {uri} not found")
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return parse_groups_csv(text, source=uri), None, {"source": uri}


def read_target_folder(cfg: Config, storage: Storage, folder: str, *, settings: list | None = None,
                       groups_file: str | None = None, group_level: int | None = None, hpss: bool = False,
                       stage: str = STAGE) -> TargetFolder:
    """List, label, group and decode a GTZAN-layout folder.

    Parameters
    ----------
    folder : str
        Its URI (:func:`folder_uri`).
    settings : list of MelSettings, optional
        Every log-mel setting a feature set needs (default: the configured one); a clip is used
        only when it decodes under all of them, so every feature set sees the same clips.
    groups_file, group_level
        The grouping (see :class:`~deepcontent.config.TransferConfig`); neither: the folder's own
        ``groups.csv`` when it has one.
    hpss : bool
        Decode harmonic and percussive log-mels too (late fusion).
    """
    settings = settings or [cfg.spectrograms.mel_settings()]
    objects = storage.list(folder)
    own_groups = join(folder, GROUPS_FILE)
    groups, level, grouping = _grouping(cfg, storage, folder, groups_file=groups_file, group_level=group_level)
    skip = {own_groups, grouping.get("source")}
    keys = {relative_key(folder, o.uri): o.uri for o in objects if o.uri not in skip}
    lay = layout(keys, groups=groups, group_level=level, non_audio_extensions=cfg.ingest.non_audio_extensions)
    if groups is not None:
        grouping["unused_rows"] = lay.unused_groups
        if lay.unused_groups:
            log.warning("%s: %d rows of the groups file %s name no clip of the folder", stage, lay.unused_groups,
                        grouping["source"])
    left_out = dict(lay.left_out)
    keep = list(range(len(lay.keys)))
    mels: dict[str, dict[str, list[np.ndarray]]] = {}
    by_key: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    log.info("%s: %s: %d objects, %d clips to decode (%d left out before decoding)", stage, folder, len(keys),
             len(lay.keys), len(left_out))
    for s in dict.fromkeys(settings):  # each distinct setting once
        todo = list(keep)
        if not todo:
            by_key[s.key()] = {}
            continue
        clips, kept, skipped = decode_clips(cfg, storage, [keys[lay.keys[i]] for i in todo], settings=s, hpss=hpss,
                                            stage=stage)
        for uri, reason in skipped.items():
            left_out[relative_key(folder, uri)] = reason
        by_key[s.key()] = {todo[j]: {p: clips[p][n] for p in clips} for n, j in enumerate(kept)}
        keep = [todo[j] for j in kept]
    for k, per in by_key.items():
        parts = next(iter(per.values())).keys() if per else ("mel",)
        mels[k] = {p: [per[i][p] for i in keep] for p in parts}
    if groups is not None or level is not None:
        grouping["groups"] = len({lay.groups[i] for i in keep})
    return TargetFolder(uri=folder, keys=[lay.keys[i] for i in keep], labels=[lay.labels[i] for i in keep],
                        groups=None if lay.groups is None else [lay.groups[i] for i in keep], grouping=grouping,
                        mels=mels, left_out=dict(sorted(left_out.items())), found=len(keys))


# ----------------------------------------------------------------------------- features
def excerpt_frames(cfg: Config, settings) -> int | None:
    """Frames of one excerpt at ``settings`` (None: whole tracks)."""
    sec = cfg.transfer.excerpt_seconds
    return None if sec is None else max(1, round(sec * settings.sample_rate / settings.hop_length))


def excerpt_features(fn: Callable[[list[np.ndarray]], Any], clips: list[np.ndarray], *, frames: int | None,
                     count: int):
    """``fn`` of every excerpt of ``clips``, averaged per clip. ``fn`` returns one ``(n, d)``
    array or a tuple of them (a model's factors and penultimate layer); so does this."""
    from deepcontent.evaluate.clip_features import average_by_track, excerpts

    views, owner = excerpts(clips, excerpt_frames=frames, count=count)
    out = fn(views)
    if isinstance(out, tuple):
        return tuple(average_by_track(o, owner, len(clips)) for o in out)
    return average_by_track(out, owner, len(clips))


@dataclass
class _Model:
    name: str
    version: str
    network: Any
    artifact: dict
    settings: Any


def _variant_names(storage: Storage) -> list[str]:
    prefix = storage.uri("models", "variants")
    return sorted(Path(o.uri).stem for o in storage.list(prefix) if o.uri.endswith(".json"))


def resolve_models(cfg: Config, storage: Storage) -> tuple[list[_Model], dict[str, str]]:
    """The listening models ``transfer.model`` names, loaded, and ``{name: reason}`` for those
    of ``all`` that cannot give features (another input, tag targets, no full settings)."""
    from deepcontent.api import load_model
    from deepcontent.registry import PRODUCTION, model_registry, variant_pointer

    choice = cfg.transfer.model.strip()
    if choice == "none" or "models" not in cfg.transfer.features:
        return [], {}
    reg = model_registry(cfg, storage)
    wanted: list[tuple[str, str]] = []  # (name, version)
    left_out: dict[str, str] = {}
    if choice in ("all", "production"):
        if reg.exists(reg.uri(PRODUCTION)):
            wanted.append(("production", reg.read_json(reg.uri(PRODUCTION))["model_version"]))
        elif choice == "production":
            raise InputMissingError(f"transfer.model=production but no model is in production ({reg.uri(PRODUCTION)}); "
                                    f"train one, name a version, or use --model none")
        if choice == "all":
            for name in _variant_names(reg):
                pointer = variant_pointer(reg, name)
                if pointer:
                    wanted.append((name, pointer["model_version"]))
            if not wanted:
                left_out["registry"] = f"no registered model under {reg.uri('models')}: fixed-feature baselines only"
    else:
        pointer = variant_pointer(reg, choice)
        wanted.append((choice, pointer["model_version"]) if pointer else (choice, choice))
    models, seen = [], {}
    for name, version in wanted:
        if version in seen:
            left_out[name] = f"same model as {seen[version]} ({version})"
            continue
        try:
            m = load_model(version, storage=reg)
        except ValueError as exc:  # reads waveforms, or registered without full settings
            if choice not in ("all",):
                raise
            left_out[name] = str(exc)[:300]
            continue
        targets = m.artifact.get("targets", "plays")
        if targets not in ("plays", "contrastive") and choice == "all":
            left_out[name] = f"trained on {targets} targets, not listening data"
            continue
        seen[version] = name
        models.append(_Model(name, version, m.network, m.artifact, m.settings))
    return models, left_out


def _kmeans_fold_features(cfg: Config, mels: list[np.ndarray], *, frames: int | None, count: int):
    """Spherical K-means features fitted on the training clips given: a FoldFeatures, and the
    same fitted on every clip (for the 1-NN, where nothing is trained)."""
    from deepcontent.evaluate.clip_features import excerpts
    from deepcontent.models.baselines import SphericalKMeansFeatures

    tc = cfg.transfer

    def fitted(train: np.ndarray) -> np.ndarray:
        views, _ = excerpts([mels[i] for i in train], excerpt_frames=frames, count=count)
        n_frames = sum(v.shape[1] for v in views)
        k = max(2, min(tc.kmeans_centroids, n_frames // 8))
        # no more windows than the training clips hold (sampling 100,000 of a small folder's few
        # thousand would only repeat them, at the cost of a much larger fit)
        km = SphericalKMeansFeatures(k, seed=tc.seed, max_windows=max(k, min(100_000, n_frames))).fit(views)
        return excerpt_features(km.transform, mels, frames=frames, count=count)

    return fitted


def feature_sets(cfg: Config, folder: TargetFolder, models: list[_Model]) -> dict[str, tuple[Any, np.ndarray | None]]:
    """``{name: (features or FoldFeatures, 1-NN features or None)}`` of ``transfer.features``."""
    from deepcontent.embed.pooling import clip_outputs
    from deepcontent.evaluate.clip_features import logmel_statistics, mfcc_statistics

    tc, sc = cfg.transfer, cfg.spectrograms
    base = sc.mel_settings()
    mels = folder.mels[base.key()]["mel"]
    frames, count = excerpt_frames(cfg, base), tc.excerpts_per_track
    out: dict[str, tuple[Any, np.ndarray | None]] = {}
    for m in models:
        clips = folder.mels[m.settings.key()]["mel"]
        a = m.artifact
        t0 = time.perf_counter()
        pred, emb = excerpt_features(
            lambda views: clip_outputs(m.network, views, n_frames=a["window_frames"], target_mean=a["target_mean"],
                                       target_std=a["target_std"]),
            clips, frames=excerpt_frames(cfg, m.settings), count=count)
        if m.artifact.get("targets") != "contrastive":  # a pretrained backbone's outputs are a projection, not factors
            out[f"{m.name}_factors"] = (pred, None)
        out[f"{m.name}_penultimate"] = (emb, None)
        log.info("%s: features of model %s (%s) in %.1fs", STAGE, m.name, m.version, time.perf_counter() - t0)
    if "kmeans" in tc.features:
        fold = _kmeans_fold_features(cfg, mels, frames=frames, count=count)
        out["kmeans"] = (fold, None)  # the 1-NN features are fitted on every clip when needed
    if "logmel_stats" in tc.features:
        out["logmel_stats"] = (excerpt_features(logmel_statistics, mels, frames=frames, count=count), None)
    if "mfcc_stats" in tc.features:
        out["mfcc_stats"] = (excerpt_features(lambda v: mfcc_statistics(v, compression=base.compression), mels,
                                              frames=frames, count=count), None)
    return out


def protocol_results(cfg: Config, name: str, features, labels: list[str], groups: list[str] | None, *,
                     folds: int, seed: int | None = None, stage: str = STAGE) -> dict:
    """:func:`~deepcontent.evaluate.transfer.transfer_protocols` of one feature set (the
    ``transfer`` section's inner folds, grouped folds and seed unless ``seed`` is given), logged."""
    from deepcontent.evaluate.transfer import transfer_protocols

    tc = cfg.transfer
    t0 = time.perf_counter()
    nn = features(np.arange(len(labels))) if callable(features) else None
    r = transfer_protocols(features, labels, groups, folds=folds, inner_folds=tc.inner_folds,
                           grouped_folds=tc.grouped_folds, max_logo_groups=tc.max_logo_groups,
                           seed=tc.seed if seed is None else seed, nn_features=nn)
    r = jsonable(r)
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    g = r.get("grouped") or {}
    log.info("%s: %-24s stratified %s ± %s | grouped %s (%s, %s folds) | 1-NN other group %s  (%.1fs)", stage, name,
             fmt(r.get("stratified_mean")), fmt(r.get("stratified_std")), fmt(r.get("grouped_accuracy")),
             g.get("protocol", "no grouping"), g.get("folds", "-"), fmt(r.get("grouped_1nn_accuracy")),
             time.perf_counter() - t0)
    return r


def jsonable(r):
    if isinstance(r, dict):
        return {k: jsonable(v) for k, v in r.items()}
    if isinstance(r, (list, tuple)):
        return [jsonable(v) for v in r]
    if isinstance(r, np.ndarray):
        return r.tolist()
    if isinstance(r, np.generic):
        return r.item()
    if isinstance(r, float) and np.isnan(r):
        return None
    return r


# ----------------------------------------------------------------------------- stage
def _folder(cfg: Config, storage: Storage) -> str:
    tc = cfg.transfer
    if tc.folder:
        return folder_uri(tc.folder)
    return storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage; see the module docstring."""
    from deepcontent.evaluate.report import render_report
    from deepcontent.evaluate.transfer import PROTOCOL_NOTES

    storage, tc = ctx.storage, cfg.transfer
    with StageRun(STAGE, cfg, storage, sections=("transfer", "spectrograms")) as run:
        folder = _folder(cfg, storage)
        with run.timed("models"):
            models, models_left_out = resolve_models(cfg, storage)
        settings = list(dict.fromkeys([cfg.spectrograms.mel_settings(), *(m.settings for m in models)]))
        with run.timed("decode"):
            target = read_target_folder(cfg, storage, folder, settings=settings, groups_file=tc.groups_file,
                                        group_level=tc.group_level)
        if not target.found:
            raise InputMissingError(f"transfer: no objects under {folder}; expected a GTZAN-layout folder "
                                    f"<label>/<clip> (a local path or a storage URI)")
        classes = Counter(target.labels)
        if len(classes) < 2:
            raise TrainingDataError(f"transfer: {len(target.keys)} usable clips in {len(classes)} label folder(s) "
                                    f"{sorted(classes)} under {folder} ({len(target.left_out)} left out: "
                                    f"{dict(Counter(r.split(':')[0] for r in target.left_out.values()))}); "
                                    f"a classifier needs at least 2 labels")
        log.info("%s: %d clips in %d classes%s; %d left out", STAGE, len(target.keys), len(classes),
                 f", {target.grouping['groups']} groups ({target.grouping['source']})" if target.groups else "",
                 len(target.left_out))
        with run.timed("features"):
            sets = feature_sets(cfg, target, models)
        results = {}
        for i, (name, (feats, _)) in enumerate(sets.items()):
            with run.timed(name):
                log.info("%s: feature set %d/%d %s", STAGE, i + 1, len(sets), name)
                results[name] = protocol_results(cfg, name, feats, target.labels, target.groups, folds=tc.folds)
        reasons = Counter(r.split(":", 1)[0] for r in target.left_out.values())
        metrics = {
            "folder": folder,
            "clips_found": target.found,
            "clips_used": len(target.keys),
            "clips_left_out": target.left_out,
            "left_out_reasons": dict(reasons),
            "classes": dict(sorted(classes.items())),
            "grouping": target.grouping,
            "excerpts": {"seconds": tc.excerpt_seconds, "per_track": tc.excerpts_per_track},
            "models": {m.name: m.version for m in models},
            "models_left_out": models_left_out,
            "feature_sets": results,
            "protocol": PROTOCOL_NOTES,
        }
        with run.timed("report"):
            html = render_report({"transfer": {_label(folder): results}, "run": {"run_id": run.run_id, "folder": folder,
                                  "clips_used": len(target.keys), "clips_left_out": len(target.left_out),
                                  "grouping": str(target.grouping.get("source"))}},
                                 title=f"deepcontent — transfer on {_label(folder)}", sections=("transfer",))
            out = storage.uri("transfer", run.run_id)
            storage.write_json(join(out, "metrics.json"), metrics)
            storage.write_bytes(join(out, "report.html"), html.encode())
            local = Path(tc.report_dir)
            local.mkdir(parents=True, exist_ok=True)
            (local / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            (local / "report.html").write_text(html)
        outputs = {"metrics": join(out, "metrics.json"), "report": join(out, "report.html"),
                   "local_report": str(local.resolve() / "report.html")}
        log.info("%s: report %s (copy at %s)", STAGE, outputs["report"], outputs["local_report"])
        return run.succeed(counts={"clips_found": target.found, "clips_used": len(target.keys),
                                   "clips_left_out": len(target.left_out), "feature_sets": len(results)},
                           quarantined=dict(reasons), outputs=outputs, **metrics)


def _label(folder: str) -> str:
    return folder.rstrip("/").rsplit("/", 1)[-1] or folder
