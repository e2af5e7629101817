"""Stage ``train`` (Ray Train + Ray Data): clips + item factors -> registered models.

1. :func:`load_training_data` reads tracks, the clip dataset (``features/spectrograms``, or
   ``features/waveforms`` for the raw-audio net) and the item factors, and
   :func:`~deepcontent.train.data.training_targets` turns them into standardised train / valid
   targets (test songs never enter).
2. The model version is derived from the config, the input run ids and the code version
   (:func:`~deepcontent.registry.model_version`); if it is already registered, nothing trains.
3. A :class:`ray.train.torch.TorchTrainer` runs :func:`~deepcontent.train.loop.train_loop_per_worker`
   on ``train.num_workers`` DDP workers, fed by Ray Data from the clip shards. Checkpoints are
   persisted under ``<root>/train/ray/<model_version>/`` through the Storage's own pyarrow
   filesystem; ``FailureConfig(max_failures)`` restarts a failed worker group from the latest
   checkpoint, and a driver re-run of an interrupted version resumes from it too (Ray Train
   restores a run with the same name and storage path).
4. The best epoch's weights (by validation NMSE) are registered (:mod:`deepcontent.registry`):
   ``models/<model_version>/model.pt`` + ``model.json`` (metrics, curve) and
   ``models/production.json``; the run manifest carries the curve and metrics.
5. Each name in ``train.variants`` (:mod:`deepcontent.train.variants`: ``cnn_wpe``,
   ``deep_cnn``, ``raw_cnn``, ``cnn_tags``, ...) is trained the same way from the config with
   that variant's settings and registered under ``models/variants/<name>.json``, never
   promoted. Only a log-mel model of the listening factors ever becomes production.

Optionally (``train.baseline``) the BoW-MFCC + linear baseline is fitted on the same split and
its validation NMSE recorded next to the CNN's.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import CHECKPOINTS, EXPORTS, ITEM_INDEX, SPECTROGRAMS, TRACKS, USER_INDEX, WAVEFORMS
from deepcontent.errors import InputMissingError, StageError, TrainingDataError
from deepcontent.manifest import code_version, log
from deepcontent.registry import (
    ARTIFACT_FORMAT,
    PRODUCTION,
    load_model,
    model_version,
    point_variant,
    register,
    registered,
    variant_pointer,
    version_uri,
)
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.stages.factorize import factors_by_index
from deepcontent.storage import Storage, join
from deepcontent.train.backend import Backend, resolve_backend
from deepcontent.train.clip_cache import cache_budgets, split_clip_bytes
from deepcontent.train.data import TrainingData, training_targets
from deepcontent.train.variants import variant_config

__all__ = ["STAGE", "clip_dataset", "fit_on_ray", "load_training_data", "pretrained_init", "run", "steps_per_epoch",
           "train_model"]

STAGE = "train"


def steps_per_epoch(*, n_train_clips: int, windows_per_clip: int, batch_size: int, num_workers: int) -> int:
    """Optimiser steps per epoch, the same on every worker: enough that the global batches
    cover ``windows_per_clip`` random windows of every train clip."""
    return max(1, math.ceil(n_train_clips * windows_per_clip / (batch_size * num_workers)))


def clip_dataset(tc) -> datasets.Dataset:
    """The clip dataset a train config reads: log-mel spectrograms or mono waveforms."""
    return WAVEFORMS if tc.input == "waveform" else SPECTROGRAMS


def load_training_data(storage: Storage, *, features: datasets.Dataset = SPECTROGRAMS,
                       matrix: str = "plays") -> TrainingData:
    """Read the inputs of a training set and build its targets.

    Parameters
    ----------
    features : Dataset
        ``SPECTROGRAMS`` (log-mels) or ``WAVEFORMS`` (same schema with one channel).
    matrix : {"plays", "tags"}
        Whose item factors are the targets: the listening WMF or the tag WMF.

    Raises
    ------
    InputMissingError
        If an input was never published (naming the stage to run).
    TrainingDataError
        As :func:`~deepcontent.train.data.training_targets`.
    """
    if matrix not in ("plays", "tags"):
        raise ValueError(f"matrix must be 'plays' or 'tags', got {matrix!r}")
    items_ds = datasets.factors(matrix, "item_factors")
    others_ds = datasets.factors(matrix, "user_factors" if matrix == "plays" else "tag_factors")
    pointers = {d.key: d.require(storage, needed_by="train") for d in (TRACKS, features, items_ds, others_ds)}
    inputs = {key: p["run_id"] for key, p in pointers.items()}
    for optional in (ITEM_INDEX, EXPORTS):  # the item columns WPE uses, and the play matrix it reads
        if (rid := optional.run_id(storage)) is not None:
            inputs[optional.key] = rid
    clip_files = features.files(storage)
    clips = (storage.read_parquet(clip_files, columns=["track_id", "n_mels", "n_frames"]) if clip_files
             else features.schema.empty_table().select(["track_id", "n_mels", "n_frames"]))
    data = training_targets(tracks=TRACKS.read(storage, columns=["track_id", "song_id"]), clips=clips,
                            item_factors=items_ds.read(storage),
                            item_index=ITEM_INDEX.read(storage) if ITEM_INDEX.key in inputs else None,
                            where=features.uri(storage))
    return TrainingData(spectrogram_files=clip_files, inputs=inputs, settings_key=pointers[features.key].get("settings_key"),
                        **data)


def _wpe_payload(cfg: Config, storage: Storage, data: TrainingData):
    """``(item_users confidence CSR (n_items × n_users), user_factors (n_users, f))`` for WPE,
    both indexed like the matrices exports (users without factors get zero rows)."""
    from deepcontent.interactions.weighting import confidence_matrix

    if (pc.min(data.train["item_idx"]).as_py() or 0) < 0:
        raise TrainingDataError(f"train.loss=wpe needs every train song in {ITEM_INDEX.uri(storage)}; "
                                f"some are missing (re-run `deepcontent matrices` and `factorize`)")
    user_items = datasets.load_csr(storage, datasets.csr_exports(storage, needed_by="train.loss=wpe")["user_items_train.npz"])
    conf = confidence_matrix(user_items, alpha=cfg.factorize.alpha, eps=cfg.factorize.eps, dtype=np.float32)
    x, _ = factors_by_index(storage, datasets.factors("plays", "user_factors"), USER_INDEX, id_column="user_id",
                            n_rows=user_items.shape[0])
    return conf.T.tocsr(), x


def fit_on_ray(tc, storage: Storage, data: TrainingData, backend: Backend, *, run_name: str, steps: int,
               n_outputs: int | None = None, objective: dict | None = None, wpe=None, init_state=None,
               stage: str = STAGE):
    """Run the TorchTrainer over ``data``'s clips with the settings of ``tc`` (a TrainConfig);
    returns Ray Train's :class:`Result`. Checkpoints go to ``<root>/train/ray/<run_name>``.

    ``n_outputs``: the net's output size (default the targets' factors; a projection for the
    contrastive objective); ``objective``: None for regression, else the
    :func:`~deepcontent.train.objectives.make_objective` spec; ``wpe``: the WPE payload;
    ``init_state``: a pretrained net's state dict to start from (its output layer aside)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from deepcontent.engines.checkpoint_fs import checkpoint_filesystem
    from deepcontent.train.clip_data import clip_data_config, clip_datasets
    from deepcontent.train.loop import train_loop_per_worker

    need = tc.num_workers * tc.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    if have < need:  # Ray Train would wait for them silently (or for an autoscaler to add them)
        log.warning("%s: %d workers × %g CPUs need %g CPUs but the Ray cluster has %g now; training starts "
                    "when they are available (lower %s.num_workers or %s.cpus_per_worker)", stage, tc.num_workers,
                    tc.cpus_per_worker, need, have, stage, stage)
    # Progress bars are noise in job logs; the stage logs its own progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, path = storage.filesystem(storage.uri(CHECKPOINTS))
    n_outputs = n_outputs or data.n_factors
    clip_bytes = {split: split_clip_bytes(table["n_frames"], n_mels=data.n_mels, n_factors=data.n_factors,
                                          min_frames=tc.window_frames) for split, table in (("train", data.train),
                                                                                           ("valid", data.valid))}
    budgets = cache_budgets(tc.cache_bytes, train_bytes=clip_bytes["train"], valid_bytes=clip_bytes["valid"])
    per_worker = {k: v / tc.num_workers for k, v in clip_bytes.items()}
    log.info("%s: clips ≈ %s train + %s valid per worker; cache_bytes %s gives %s / %s: %s", stage,
             _gib(per_worker["train"]), _gib(per_worker["valid"]), _gib(tc.cache_bytes), _gib(budgets["train"]),
             _gib(budgets["valid"]), "resident" if all(per_worker[k] <= budgets[k] for k in budgets)
             else f"beyond it, spilled to {tc.spill_dir or 'the temp dir'} and streamed each epoch")
    loop_config = {
        "cache": budgets, "objective": objective,
        "train": tc.model_dump(mode="python"), "backend": backend, "n_factors": n_outputs, "n_targets": data.n_factors,
        "n_mels": data.n_mels, "steps_per_epoch": steps, "valid_variance": data.valid_variance,
        "target_mean": data.target_mean.tolist(), "target_std": data.target_std.tolist(),
        "wpe": ray.put(wpe) if wpe is not None else None,
        "init_state": ray.put(init_state) if init_state is not None else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend.torch_backend),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=backend.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=path, storage_filesystem=checkpoint_filesystem(fs),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
        ),
        datasets=clip_datasets(storage, files=data.spectrogram_files, train=data.train, valid=data.valid,
                               num_cpus=tc.ingest_cpus, concurrency=tc.ingest_concurrency),
        dataset_config=clip_data_config(),
    )
    return trainer.fit()


def pretrained_init(cfg: Config, storage: Storage, *, n_mels: int) -> tuple[str, dict, dict] | None:
    """``(version, backbone state dict, what it was pretrained on)`` of ``train.init_from``
    (a version, or a variant name such as ``pretrained``, in ``train.init_registry_root`` or
    this catalog's registry), checked to fit the configured model; None without it.

    Raises
    ------
    InputMissingError
        If the model is not registered.
    ValueError
        If its architecture, parameters, band count or window differ from the train config's
        (its output layer aside: a projection there, the factors here).
    """
    from deepcontent.train.loop import model_kwargs

    tc = cfg.train
    if not tc.init_from:
        return None
    registry = storage.with_root(tc.init_registry_root) if tc.init_registry_root else storage
    pointer = variant_pointer(registry, tc.init_from)
    version = pointer["model_version"] if pointer else tc.init_from
    if registered(registry, version) is None:
        raise InputMissingError(f"train.init_from={tc.init_from!r}: no such model version or variant in "
                                f"{registry.uri('models')}; run `deepcontent pretrain` there first")
    _, artifact = load_model(registry, version)
    want = {"model": tc.model, "model_params": model_kwargs(tc, n_mels=n_mels), "n_mels": n_mels,
            "window_frames": tc.window_frames}
    have = {k: artifact.get(k) for k in want}
    if have != want:
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        raise ValueError(f"train.init_from={tc.init_from!r} ({version}) does not fit train's model: "
                         f"{', '.join(f'{k} is {a!r} there, {b!r} here' for k, (a, b) in diff.items())}")
    return version, artifact["state_dict"], artifact.get("pretrained_on") or {}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _final_state(result) -> dict:
    import torch

    from deepcontent.train.loop import CHECKPOINT_FILE

    if result.checkpoint is None:
        raise StageError(f"training finished without a checkpoint under {result.path}")
    with result.checkpoint.as_directory() as d:
        return torch.load(f"{d}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=True)


def _baseline(cfg: Config, storage: Storage, data: TrainingData) -> dict:
    """The BoW-MFCC + linear baseline (thesis §4.5.1) on the CNN's own split and targets."""
    from deepcontent.models.baselines import select_bow_linear

    spec = storage.read_parquet(data.spectrogram_files, columns=["track_id", "n_mels", "n_frames", "mel"])

    def clips(targets):
        pos = pc.index_in(targets["track_id"], value_set=spec["track_id"])
        if pos.null_count:
            raise TrainingDataError(f"{pos.null_count} target tracks have no spectrogram; the inputs changed during the run")
        return datasets.mel_arrays(spec.take(pos)), datasets.vectors(targets["target"])

    (train_mels, y_train), (valid_mels, y_valid) = clips(data.train), clips(data.valid)
    sel = select_bow_linear(train_mels, y_train, valid_mels, y_valid, words_grid=cfg.train.baseline_words,
                            compression=cfg.spectrograms.compression, seed=cfg.train.seed)
    from deepcontent.train.losses import nmse

    return {"valid_nmse": sel.valid_nmse, "n_words": sel.words, "l2": sel.l2, "valid_nmse_grid": sel.grid,
            "train_nmse": nmse(sel.model.predict(sel.x_train), y_train), "n_components": sel.bow.n_components_,
            "train_tracks": len(train_mels), "valid_tracks": len(valid_mels)}


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Train (or find registered) the production model and every ``train.variants`` entry.

    The result is the production model's (``model_version``, ``metrics``) with ``variants``:
    ``{name: {"model_version", "published", "valid_nmse"}}``."""
    datasets.require_plays(ctx.storage, needed_by="train")
    if cfg.train.epoch_hook:
        from deepcontent.hooks import check_hook

        check_hook(cfg.train.epoch_hook, field="train.epoch_hook")  # in the driver, before Ray starts
    main = train_model(cfg, ctx, promote=True)
    variants = {}
    for name in cfg.train.variants:
        r = train_model(variant_config(cfg, name), ctx, promote=False)
        variants[name] = {"model_version": r.model_version, "published": r.published,
                          "valid_nmse": r.metrics.get("valid_nmse")}
    if variants:
        main.details["variants"] = variants
    return main


def train_model(cfg: Config, ctx: StageContext, *, promote: bool = True) -> StageResult:
    """Train and register one model from ``cfg.train`` (a variant's config registers under
    ``train.variant``); ``promote=False`` never makes it the production model."""
    storage, tc = ctx.storage, cfg.train
    backend = resolve_backend(tc)
    data = load_training_data(storage, features=clip_dataset(tc), matrix=tc.targets)
    init = pretrained_init(cfg, storage, n_mels=data.n_mels)
    if init:  # the backbone is an input: its version names the model, as the data's run ids do
        data.inputs["pretrained_model"] = init[0]
    code = code_version()
    version = model_version(cfg, inputs=data.inputs, code=code)
    outputs = {"model": version_uri(storage, version, "model.pt"), "metadata": version_uri(storage, version, "model.json"),
               "production": storage.uri(PRODUCTION), "checkpoints": join(storage.uri(CHECKPOINTS), version)}
    with StageRun(STAGE, cfg, storage) as run:
        existing = registered(storage, version)
        if existing is not None:
            log.info("train: model %s is already registered (valid NMSE %.4f); nothing to do", version,
                     existing["metrics"]["valid_nmse"])
            if tc.variant:
                point_variant(storage, tc.variant, version=version)
            return StageResult(existing["run_id"], False, existing.get("counts", {}), {}, outputs,
                               existing.get("manifest"), {"model_version": version, "metrics": existing["metrics"]})

        run.manifest.inputs = {**data.inputs, "code_version": code, "model_version": version}
        steps = steps_per_epoch(n_train_clips=data.train.num_rows, windows_per_clip=tc.windows_per_clip,
                                batch_size=tc.batch_size, num_workers=tc.num_workers)
        log.info("train: %s%s — %s on %d train / %d valid tracks, %d factors, %d workers (%s), %d steps/epoch × ≤%d epochs",
                 version, f" (variant {tc.variant})" if tc.variant else "", tc.model, data.train.num_rows,
                 data.valid.num_rows, data.n_factors, tc.num_workers, backend.torch_backend, steps, tc.epochs)

        baseline = None
        if tc.baseline:
            with run.timed("baseline"):
                baseline = _baseline(cfg, storage, data)
            log.info("train: BoW-MFCC + linear baseline valid NMSE %.4f (%d words, l2 %g)", baseline["valid_nmse"],
                     baseline["n_words"], baseline["l2"])

        ctx.ensure_ray()
        with run.timed("fit"):
            try:
                result = fit_on_ray(tc, storage, data, backend, run_name=version, steps=steps,
                                    wpe=_wpe_payload(cfg, storage, data) if tc.loss == "wpe" else None,
                                    init_state=init[1] if init else None)
            except Exception as exc:
                raise StageError(f"train: run {run.run_id} (model {version}) failed: {type(exc).__name__}: {exc}; "
                                 f"checkpoints and worker errors under {outputs['checkpoints']}") from exc

        with run.timed("register"):
            state = _final_state(result)
            history = state["history"]
            if state["best_state"] is None:
                raise StageError(f"train: run {run.run_id} never produced a finite validation NMSE; curve {history}")
            metrics = _metrics(state, tc, baseline)
            pretrained = {"model_version": init[0], "pretrained_on": init[2]} if init else None
            artifact = {**_artifact(cfg, data, version, state["best_state"]), "pretrained_from": pretrained}
            register(storage, version=version, artifact=artifact,
                     metadata={**_metadata(run, metrics, history, data, code, baseline, outputs),
                               "pretrained_from": pretrained},
                     promote=promote and _listening(tc), variant=tc.variant)
            if promote and not _listening(tc):
                log.info("train: %s reads %s and predicts %s factors; registered without becoming the production model",
                         version, tc.input, tc.targets)

        log.info("train: registered %s — valid NMSE %.4f at epoch %d of %d", version, metrics["valid_nmse"],
                 metrics["best_epoch"], len(history))
        return run.succeed(counts={**data.counts, "epochs": len(history), "steps_per_epoch": steps}, outputs=outputs,
                           record={"curve": history}, model_version=version, metrics=metrics)


def _listening(tc) -> bool:
    """embed reads log-mels and publishes listening factors: no other kind may become production."""
    return tc.input == "log_mel" and tc.targets == "plays"


def _metrics(state: dict, tc, baseline: dict | None) -> dict[str, Any]:
    history = state["history"]
    metrics = {
        "valid_nmse": state["best_score"], "best_epoch": state["best_epoch"], "epochs_run": len(history),
        "stopped_early": len(history) < tc.epochs, "final_train_loss": history[-1]["train_loss"],
        "attempts": max(h["attempt"] for h in history) + 1,
        "train_samples_per_s": float(np.median([h["samples_per_s"] for h in history])),
    }
    if baseline is not None:
        metrics["baseline_valid_nmse"] = baseline["valid_nmse"]
    return metrics


def _artifact(cfg: Config, data: TrainingData, version: str, best_state: dict) -> dict[str, Any]:
    from deepcontent.train.loop import model_kwargs

    tc = cfg.train
    return {
        "format": ARTIFACT_FORMAT, "model_version": version, "model": tc.model,
        "model_params": model_kwargs(tc, n_mels=data.n_mels), "n_factors": data.n_factors, "n_mels": data.n_mels,
        "window_frames": tc.window_frames, "input": tc.input, "targets": tc.targets,
        "target_mean": data.target_mean.tolist(), "target_std": data.target_std.tolist(), "state_dict": best_state,
        "spectrograms": {"settings_key": data.settings_key, "sample_rate": cfg.spectrograms.sample_rate,
                         "hop_length": cfg.spectrograms.hop_length, "n_mels": data.n_mels,
                         "compression": cfg.spectrograms.compression,
                         # every setting, so audio can be embedded outside the batch job
                         # (deepcontent.embed_audio); only when they are what the clips used
                         "mel_settings": (settings.to_dict() if (settings := cfg.spectrograms.mel_settings()).key()
                                          == data.settings_key else None)},
        "train_config": tc.model_dump(mode="json"),
    }


def _metadata(run: StageRun, metrics: dict, history: list, data: TrainingData, code: str, baseline: dict | None,
              outputs: dict) -> dict[str, Any]:
    tc = run.cfg.train
    return {
        "run_id": run.run_id, "metrics": metrics, "curve": history, "inputs": run.manifest.inputs, "code_version": code,
        "train_config": tc.model_dump(mode="json"), "counts": data.counts, "baseline": baseline, "variant": tc.variant,
        "manifest": run.storage.uri("runs", STAGE, f"{run.run_id}.json"), "checkpoints": outputs["checkpoints"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
