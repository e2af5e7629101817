"""Stage ``train`` (Ray Train + Ray Data): spectrograms + item factors -> a registered model.

1. :func:`~deepcontent.train.data.build_targets` joins tracks, spectrogram ids and the
   ``plays`` item factors into standardised train / valid targets (test songs never enter).
2. The model version is derived from the config, the input run ids and the code version
   (:func:`~deepcontent.train.registry.model_version`); if it is already registered, the stage
   returns without starting Ray.
3. A :class:`ray.train.torch.TorchTrainer` runs :func:`~deepcontent.train.loop.train_loop_per_worker`
   on ``train.num_workers`` DDP workers, fed by Ray Data from the spectrogram shards. Checkpoints
   are persisted under ``<root>/train/ray/<model_version>/`` through the Storage's own pyarrow
   filesystem; ``FailureConfig(max_failures)`` restarts a failed worker group from the latest
   checkpoint, and a driver re-run of an interrupted version resumes from it too (Ray Train
   restores a run with the same name and storage path).
4. The best epoch's weights (by validation NMSE) are registered:
   ``models/<model_version>/model.pt`` + ``model.json`` (metrics, curve) and
   ``models/production.json``; the run manifest carries the curve and metrics.

Optionally (``train.baseline``) the BoW-MFCC + linear baseline is fitted on the same split
and its validation NMSE recorded next to the CNN's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from deepcontent.config import Config
from deepcontent.factorize.stage import factors_by_index, factors_dataset
from deepcontent.manifest import RunManifest, StageResult, code_version, log
from deepcontent.matrices import EXPORTS, USER_INDEX, export_files, load_csr
from deepcontent.storage import Storage, join, new_run_id
from deepcontent.train.backend import Backend, resolve_backend
from deepcontent.train.checkpoint_fs import checkpoint_filesystem
from deepcontent.train.data import TrainingData, TrainingDataError, build_targets
from deepcontent.train.ingest import clip_data_config, clip_datasets
from deepcontent.train.loop import CHECKPOINT_FILE, model_kwargs, train_loop_per_worker
from deepcontent.train.registry import ARTIFACT_FORMAT, PRODUCTION, model_version, register, registered, version_uri

__all__ = ["STAGE", "TrainResult", "clip_features", "run_train", "steps_per_epoch"]

STAGE = "train"
RAY_PREFIX = "train/ray"


@dataclass
class TrainResult(StageResult):
    """:class:`StageResult` plus the model version and its metrics (valid NMSE, curve length,
    baseline NMSE when fitted)."""

    model_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model_version": self.model_version, "metrics": self.metrics}


def steps_per_epoch(*, n_train_clips: int, windows_per_clip: int, batch_size: int, num_workers: int) -> int:
    """Optimiser steps per epoch, the same on every worker: enough that the global batches
    cover ``windows_per_clip`` random windows of every train clip."""
    return max(1, math.ceil(n_train_clips * windows_per_clip / (batch_size * num_workers)))


def clip_features(tc) -> str:
    """The clip dataset a train config reads: log-mel spectrograms or mono waveforms."""
    from deepcontent.spectrograms import SPECTROGRAMS
    from deepcontent.waveforms import WAVEFORMS

    return WAVEFORMS if tc.input == "waveform" else SPECTROGRAMS


def _wpe_payload(cfg: Config, storage: Storage, data: TrainingData):
    """``(item_users confidence CSR (n_items × n_users), user_factors (n_users, f))`` for WPE,
    both indexed like the matrices exports (users without factors get zero rows)."""
    from deepcontent.interactions.weighting import confidence_matrix

    if (pc.min(data.train["item_idx"]).as_py() or 0) < 0:
        raise TrainingDataError(f"train.loss=wpe needs every train song in {storage.uri('matrices/item_index')}; "
                                f"some are missing (re-run `deepcontent matrices` and `factorize`)")
    exports = storage.published(storage.uri(EXPORTS))
    if exports is None:
        raise TrainingDataError(f"train.loss=wpe needs the play matrix exports at {storage.uri(EXPORTS)}")
    files = export_files(storage, exports)
    user_items = load_csr(storage, files["user_items_train.npz"])
    conf = confidence_matrix(user_items, alpha=cfg.factorize.alpha, eps=cfg.factorize.eps, dtype=np.float32)
    item_users = conf.T.tocsr()
    x, _ = factors_by_index(storage, factors_dataset("plays", "user_factors"), USER_INDEX, id_column="user_id",
                            n_rows=user_items.shape[0])
    return item_users, x


def _fit(cfg: Config, storage: Storage, data: TrainingData, backend: Backend, version: str, steps: int):
    """Run the TorchTrainer; returns Ray Train's :class:`Result`."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    need = tc.num_workers * tc.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    if have < need:  # Ray Train would wait for them silently (or for an autoscaler to add them)
        log.warning("train: %d workers × %g CPUs need %g CPUs but the Ray cluster has %g now; training starts "
                    "when they are available (lower train.num_workers or train.cpus_per_worker)", tc.num_workers,
                    tc.cpus_per_worker, need, have)
    # Progress bars are noise in job logs; the stage logs its own progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, path = storage.filesystem(storage.uri(RAY_PREFIX))
    fs = checkpoint_filesystem(fs)
    loop_config = {
        "train": tc.model_dump(mode="python"), "backend": backend, "n_factors": data.n_factors, "n_mels": data.n_mels,
        "steps_per_epoch": steps, "valid_variance": data.valid_variance,
        "target_mean": data.target_mean.tolist(), "target_std": data.target_std.tolist(),
        "wpe": ray.put(_wpe_payload(cfg, storage, data)) if tc.loss == "wpe" else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend.torch_backend),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=backend.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=version, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
        ),
        datasets=clip_datasets(storage, files=data.spectrogram_files, train=data.train, valid=data.valid,
                               num_cpus=tc.ingest_cpus, concurrency=tc.ingest_concurrency),
        dataset_config=clip_data_config(),
    )
    return trainer.fit()


def _final_state(result) -> dict:
    import torch

    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {result.path}")
    with result.checkpoint.as_directory() as d:
        return torch.load(f"{d}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=True)


def run_train(cfg: Config, storage: Storage, *, promote: bool = True) -> TrainResult:
    """Run the stage; see the module docstring. Starts Ray (``init_ray(cfg.ray)``) when it is
    not running and shuts it down again afterwards; a Ray session the caller started is kept.
    ``promote=False`` registers the model without making it the production model (the
    evaluation stage's model variants)."""
    tc = cfg.train
    backend = resolve_backend(tc)
    data = build_targets(storage, features=clip_features(tc), matrix=tc.targets)
    code = code_version()
    version = model_version(cfg, inputs=data.inputs, code=code)
    outputs = {"model": version_uri(storage, version, "model.pt"), "metadata": version_uri(storage, version, "model.json"),
               "production": storage.uri(PRODUCTION), "checkpoints": join(storage.uri(RAY_PREFIX), version)}
    existing = registered(storage, version)
    if existing is not None:
        log.info("train: model %s is already registered (valid NMSE %.4f); nothing to do", version,
                 existing["metrics"]["valid_nmse"])
        return TrainResult(existing["run_id"], False, counts=existing.get("counts", {}), outputs=outputs,
                           manifest_uri=existing.get("manifest"), model_version=version, metrics=existing["metrics"])

    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("train"))
    manifest.inputs = {**data.inputs, "code_version": code, "model_version": version}
    steps = steps_per_epoch(n_train_clips=data.train.num_rows, windows_per_clip=tc.windows_per_clip,
                            batch_size=tc.batch_size, num_workers=tc.num_workers)
    log.info("train: %s — %s on %d train / %d valid tracks, %d factors, %d workers (%s), %d steps/epoch × ≤%d epochs",
             version, tc.model, data.train.num_rows, data.valid.num_rows, data.n_factors, tc.num_workers,
             backend.torch_backend, steps, tc.epochs)

    baseline = None
    if tc.baseline:
        from deepcontent.train.baseline import fit_bow_baseline

        with manifest.timed("baseline"):
            baseline = fit_bow_baseline(cfg, storage, data=data)
        log.info("train: BoW-MFCC + linear baseline valid NMSE %.4f (%d words, l2 %g)", baseline["valid_nmse"],
                 baseline["n_words"], baseline["l2"])

    import ray

    from deepcontent.engines.ray import init_ray

    started_here = not ray.is_initialized()
    try:
        init_ray(cfg.ray)
        with manifest.timed("fit"):
            result = _fit(cfg, storage, data, backend, version, steps)
    except Exception as exc:
        manifest.outputs = {"checkpoints": outputs["checkpoints"]}
        uri = manifest.write(storage, status="failed")
        raise RuntimeError(f"train: run {run_id} (model {version}) failed: {type(exc).__name__}: {exc}; "
                           f"checkpoints and worker errors under {outputs['checkpoints']}, manifest {uri}") from exc
    finally:
        if started_here:
            ray.shutdown()

    with manifest.timed("register"):
        state = _final_state(result)
        history = state["history"]
        if state["best_state"] is None:
            raise RuntimeError(f"train: run {run_id} never produced a finite validation NMSE; curve {history}")
        metrics = {
            "valid_nmse": state["best_nmse"], "best_epoch": state["best_epoch"], "epochs_run": len(history),
            "stopped_early": len(history) < tc.epochs, "final_train_loss": history[-1]["train_loss"],
            "attempts": max(h["attempt"] for h in history) + 1,
            "train_samples_per_s": float(np.median([h["samples_per_s"] for h in history])),
        }
        if baseline is not None:
            metrics["baseline_valid_nmse"] = baseline["valid_nmse"]
        params = model_kwargs(tc, n_mels=data.n_mels)
        artifact = {
            "format": ARTIFACT_FORMAT, "model_version": version, "model": tc.model, "model_params": params,
            "n_factors": data.n_factors, "n_mels": data.n_mels, "window_frames": tc.window_frames,
            "input": tc.input, "targets": tc.targets,
            "target_mean": data.target_mean.tolist(), "target_std": data.target_std.tolist(),
            "state_dict": state["best_state"],
            "spectrograms": {"settings_key": data.settings_key, "sample_rate": cfg.spectrograms.sample_rate,
                             "hop_length": cfg.spectrograms.hop_length, "n_mels": data.n_mels,
                             "compression": cfg.spectrograms.compression},
            "train_config": tc.model_dump(mode="json"),
        }
        manifest_uri = storage.uri("runs", STAGE, f"{run_id}.json")
        metadata = {
            "run_id": run_id, "metrics": metrics, "curve": history, "inputs": manifest.inputs, "code_version": code,
            "train_config": tc.model_dump(mode="json"), "counts": data.counts, "baseline": baseline,
            "manifest": manifest_uri, "checkpoints": outputs["checkpoints"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # embed reads log-mels and publishes listening factors: no other kind may become production
        listening = tc.input == "log_mel" and tc.targets == "plays"
        if promote and not listening:
            log.info("train: %s reads %s and predicts %s factors; registered without becoming the production model",
                     version, tc.input, tc.targets)
        register(storage, version=version, artifact=artifact, metadata=metadata, promote=promote and listening)

    manifest.counts = {**data.counts, "epochs": len(history), "steps_per_epoch": steps}
    manifest.outputs = outputs
    # Not fields of RunManifest: to_dict() writes every attribute, so the curve lands in the JSON.
    manifest.metrics = metrics
    manifest.curve = history
    manifest.write(storage, status="succeeded")
    log.info("train: registered %s — valid NMSE %.4f at epoch %d of %d; manifest %s", version, metrics["valid_nmse"],
             metrics["best_epoch"], len(history), manifest_uri)
    return TrainResult(run_id, True, counts=manifest.counts, outputs=outputs, manifest_uri=manifest_uri,
                       model_version=version, metrics=metrics)
