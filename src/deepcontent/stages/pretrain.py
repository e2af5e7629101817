"""Stage ``pretrain`` (Ray Train + Ray Data): every clip of the catalog -> a pretrained backbone.

A service has far more audio than listening data; the train stage learns only from tracks with
WMF factors. This stage learns from all of it, played or not, without labels:

1. :func:`pretraining_clips` takes every published spectrogram (the clip dataset the train
   stage reads) and holds out ``pretrain.valid_fraction`` of the tracks by a hash of their id
   (stable as the catalog grows) to score the objective each epoch.
2. The model version is derived from the pretrain config, the spectrograms' run id and the
   code version; if it is registered already, nothing trains.
3. The train loop runs with the contrastive objective
   (:class:`~deepcontent.train.objectives.Contrastive`): two random windows of each clip, each
   augmented on its own (gain, time and frequency masks), through the backbone whose output
   layer is a projection; InfoNCE with the other clips of the batch as negatives. Same Ray Data
   ingest, clip cache (resident or streamed), DDP, checkpoints to ``<root>/train/ray/<version>``
   and resumption after a lost worker as ``train``.
4. The best epoch's weights are registered under ``models/<version>/`` (never promoted: they
   predict no factors) with what they were pretrained on, and ``models/variants/pretrained.json``
   names them, so ``train.init_from=pretrained`` (``train.init_registry_root`` = this catalog's
   root when training another catalog) fine-tunes them to WMF factors.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import CHECKPOINTS, SPECTROGRAMS
from deepcontent.errors import StageError, TrainingDataError
from deepcontent.manifest import code_version, log
from deepcontent.registry import ARTIFACT_FORMAT, register, registered, version_uri
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.storage import Storage, join
from deepcontent.train.data import TrainingData

__all__ = ["STAGE", "VARIANT", "pretraining_clips", "pretrain_version", "run"]

STAGE = "pretrain"
#: The registry name of the last pretrained backbone (``models/variants/pretrained.json``).
VARIANT = "pretrained"
#: Pretrain settings that change how a run executes, not what it learns.
OPERATIONAL = frozenset({"max_failures", "checkpoints_to_keep", "epoch_hook", "prefetch_batches", "cpus_per_worker",
                         "ingest_cpus", "ingest_concurrency", "spill_dir", "corpus"})


def _held_out(track_ids: list[str], *, fraction: float, seed: int) -> np.ndarray:
    """``(n,)`` bool: the tracks whose hash falls below ``fraction`` (stable per id and seed)."""
    cut = int(fraction * 2**32)
    return np.fromiter((int.from_bytes(hashlib.sha256(f"{seed}:{t}".encode()).digest()[:4], "big") < cut
                        for t in track_ids), dtype=bool, count=len(track_ids))


def pretraining_clips(clips: pa.Table, *, valid_fraction: float, seed: int, where: str = "the clip dataset") -> dict:
    """Train / held-out tables of every clip (pure).

    Parameters
    ----------
    clips : pa.Table
        ``(track_id, n_mels, n_frames)`` of the published spectrograms.
    valid_fraction : float
        Share of tracks held out to score the objective.
    seed : int

    Returns
    -------
    dict
        ``train`` / ``valid``: ``(track_id, item_idx = -1, target = [0.0], n_frames)`` (the train
        loop's clip contract; contrastive training reads no target), ``n_mels``, ``counts``.

    Raises
    ------
    TrainingDataError
        If the clips mix band counts, or either part would have fewer than 2 clips.
    """
    mels = set(clips["n_mels"].to_pylist())
    if len(mels) > 1:
        raise TrainingDataError(f"clips at {where} mix n_mels values {sorted(mels)}; recompute them with one setting")
    ids = clips["track_id"].to_pylist()
    held = _held_out(ids, fraction=valid_fraction, seed=seed)

    def table(mask: np.ndarray) -> pa.Table:
        rows = pa.array(np.flatnonzero(mask))
        n = len(rows)
        return pa.table({"track_id": pc.take(clips["track_id"], rows), "item_idx": pa.array(np.full(n, -1, np.int32)),
                         "target": datasets.vector_column(np.zeros((n, 1), np.float32)),
                         "n_frames": pc.take(clips["n_frames"], rows).cast(pa.int64())})

    train, valid = table(~held), table(held)
    if train.num_rows < 2 or valid.num_rows < 2:
        raise TrainingDataError(f"pretraining needs at least 2 clips to train on and 2 held out; {where} has "
                                f"{clips.num_rows} clips ({train.num_rows} / {valid.num_rows} with "
                                f"pretrain.valid_fraction={valid_fraction})")
    return {"train": train, "valid": valid, "n_mels": int(next(iter(mels))),
            "counts": {"clips": clips.num_rows, "train_clips": train.num_rows, "valid_clips": valid.num_rows}}


def pretrain_version(cfg: Config, *, inputs: dict[str, str], code: str) -> str:
    """``pretrain-<model>-<16 hex>`` from the pretrain config (operational keys excluded), the
    spectrogram settings, the input run ids and the code version."""
    import json

    pc_ = {k: v for k, v in cfg.pretrain.model_dump(mode="json").items() if k not in OPERATIONAL}
    blob = json.dumps({"pretrain": pc_, "spectrograms": cfg.fingerprint("spectrograms"),
                       "inputs": dict(sorted(inputs.items())), "code": code}, sort_keys=True, default=str)
    return f"pretrain-{cfg.pretrain.model}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _training_data(storage: Storage, cfg: Config) -> TrainingData:
    pointer = SPECTROGRAMS.require(storage, needed_by="pretrain")
    files = SPECTROGRAMS.files(storage)
    clips = (storage.read_parquet(files, columns=["track_id", "n_mels", "n_frames"]) if files
             else SPECTROGRAMS.schema.empty_table().select(["track_id", "n_mels", "n_frames"]))
    pc_ = cfg.pretrain
    parts = pretraining_clips(clips, valid_fraction=pc_.valid_fraction, seed=pc_.seed, where=SPECTROGRAMS.uri(storage))
    return TrainingData(train=parts["train"], valid=parts["valid"], target_mean=np.zeros(1, np.float32),
                        target_std=np.ones(1, np.float32), valid_variance=1.0, spectrogram_files=files,
                        inputs={SPECTROGRAMS.key: pointer["run_id"]}, settings_key=pointer.get("settings_key"),
                        n_mels=parts["n_mels"], counts=parts["counts"])


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Pretrain (or find registered) the backbone; see the module docstring."""
    from deepcontent.registry import point_variant
    from deepcontent.stages.train import fit_on_ray, steps_per_epoch
    from deepcontent.train.backend import resolve_backend

    storage, pc_ = ctx.storage, cfg.pretrain
    tc = pc_.train_config()
    if pc_.epoch_hook:
        from deepcontent.hooks import check_hook

        check_hook(pc_.epoch_hook, field="pretrain.epoch_hook")
    if cfg.train.window_frames != pc_.window_frames:
        log.warning("pretrain: pretrain.window_frames=%d but train.window_frames=%d: train.init_from will refuse "
                    "this backbone until they agree", pc_.window_frames, cfg.train.window_frames)
    backend = resolve_backend(tc)
    data = _training_data(storage, cfg)
    code = code_version()
    version = pretrain_version(cfg, inputs=data.inputs, code=code)
    outputs = {"model": version_uri(storage, version, "model.pt"), "metadata": version_uri(storage, version, "model.json"),
               "variant": storage.uri("models", "variants", f"{VARIANT}.json"),
               "checkpoints": join(storage.uri(CHECKPOINTS), version)}
    with StageRun(STAGE, cfg, storage, sections=("pretrain", "spectrograms")) as run:
        existing = registered(storage, version)
        if existing is not None:
            log.info("pretrain: backbone %s is already registered (held-out InfoNCE %.4f); nothing to do", version,
                     existing["metrics"]["valid_loss"])
            point_variant(storage, VARIANT, version=version)
            return StageResult(existing["run_id"], False, existing.get("counts", {}), {}, outputs,
                               existing.get("manifest"), {"model_version": version, "metrics": existing["metrics"]})
        run.manifest.inputs = {**data.inputs, "code_version": code, "model_version": version}
        steps = steps_per_epoch(n_train_clips=data.train.num_rows, windows_per_clip=tc.windows_per_clip,
                                batch_size=tc.batch_size, num_workers=tc.num_workers)
        log.info("pretrain: %s — %s on %d clips (%d held out), projection %d, temperature %g, %d workers (%s), "
                 "%d steps/epoch × ≤%d epochs", version, pc_.model, data.train.num_rows, data.valid.num_rows,
                 pc_.projection_dim, pc_.temperature, tc.num_workers, backend.torch_backend, steps, tc.epochs)
        objective = {"kind": "contrastive", "temperature": pc_.temperature, "time_masks": pc_.time_masks,
                     "time_mask_frames": pc_.time_mask_frames, "freq_masks": pc_.freq_masks,
                     "freq_mask_bands": pc_.freq_mask_bands, "valid_pairs": pc_.valid_pairs}
        ctx.ensure_ray()
        with run.timed("fit"):
            try:
                result = fit_on_ray(tc, storage, data, backend, run_name=version, steps=steps,
                                    n_outputs=pc_.projection_dim, objective=objective, stage=STAGE)
            except Exception as exc:
                raise StageError(f"pretrain: run {run.run_id} (model {version}) failed: {type(exc).__name__}: {exc}; "
                                 f"checkpoints and worker errors under {outputs['checkpoints']}") from exc

        with run.timed("register"):
            from deepcontent.stages.train import _final_state

            state = _final_state(result)
            history = state["history"]
            if state["best_state"] is None:
                raise StageError(f"pretrain: run {run.run_id} never produced a finite held-out loss; curve {history}")
            best = next((h for h in history if h["epoch"] == state["best_epoch"]), {})
            metrics = {"valid_loss": state["best_score"], "valid_top1": best.get("valid_top1"),
                       "best_epoch": state["best_epoch"], "epochs_run": len(history),
                       "final_train_loss": history[-1]["train_loss"],
                       "attempts": max(h["attempt"] for h in history) + 1,
                       "train_samples_per_s": float(np.median([h["samples_per_s"] for h in history]))}
            pretrained_on = {"catalog": pc_.corpus or storage.root, "spectrograms_run": data.inputs[SPECTROGRAMS.key],
                             "clips": data.counts["clips"], "objective": objective}
            register(storage, version=version, artifact=_artifact(cfg, data, version, state["best_state"], pretrained_on),
                     metadata={"run_id": run.run_id, "metrics": metrics, "curve": history, "inputs": run.manifest.inputs,
                               "code_version": code, "pretrain_config": pc_.model_dump(mode="json"),
                               "counts": data.counts, "pretrained_on": pretrained_on,
                               "manifest": storage.uri("runs", STAGE, f"{run.run_id}.json"),
                               "checkpoints": outputs["checkpoints"],
                               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                     promote=False, variant=VARIANT)
        log.info("pretrain: registered %s — held-out InfoNCE %.4f (top-1 %.3f) at epoch %d of %d", version,
                 metrics["valid_loss"], metrics["valid_top1"] or float("nan"), metrics["best_epoch"], len(history))
        return run.succeed(counts={**data.counts, "epochs": len(history), "steps_per_epoch": steps}, outputs=outputs,
                           record={"curve": history}, model_version=version, metrics=metrics)


def _artifact(cfg: Config, data: TrainingData, version: str, best_state: dict, pretrained_on: dict) -> dict[str, Any]:
    from deepcontent.train.loop import model_kwargs

    pc_ = cfg.pretrain
    tc = pc_.train_config()
    dim = pc_.projection_dim
    settings = cfg.spectrograms.mel_settings()
    return {
        "format": ARTIFACT_FORMAT, "model_version": version, "model": pc_.model,
        "model_params": model_kwargs(tc, n_mels=data.n_mels), "n_factors": dim, "n_mels": data.n_mels,
        "window_frames": pc_.window_frames, "input": "log_mel", "targets": "contrastive",
        # the "factors" of this net are its projection: identity standardisation
        "target_mean": [0.0] * dim, "target_std": [1.0] * dim, "state_dict": best_state,
        "spectrograms": {"settings_key": data.settings_key, "sample_rate": cfg.spectrograms.sample_rate,
                         "hop_length": cfg.spectrograms.hop_length, "n_mels": data.n_mels,
                         "compression": cfg.spectrograms.compression,
                         "mel_settings": settings.to_dict() if settings.key() == data.settings_key else None},
        "pretrained_on": pretrained_on, "pretrain_config": pc_.model_dump(mode="json"),
    }
