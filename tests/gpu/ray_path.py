"""The GPU checks' train step through the real stages, where Ray is installed: the catalog of
:mod:`gpu_checks` published in the stages' contracts under a ``file://`` root, the train stage
with ``train.use_gpu=true`` (Ray Train, one worker per GPU, NCCL, bf16) and the embed stage with
``embed.use_gpu=true`` (Ray Data actors, one GPU each)."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from gpu_checks import FACTORS, N_MELS, GpuSampler, log


def _publish(storage, cat: dict) -> None:
    from deepcontent import datasets
    from deepcontent.datasets import SPECTROGRAM_SCHEMA, TRACKS_SCHEMA, factors_table
    from deepcontent.storage import join

    mels, factors = cat["mels"], cat["factors"]
    n, frames = len(mels), mels.shape[2]
    tracks = [f"TRGPU{i:013d}" for i in range(n)]
    songs = [f"SOGPU{i:013d}" for i in range(n)]
    run = "gpu-checks"

    def put(dataset, tables) -> None:
        files = []
        for k, t in enumerate(tables):
            f = join(dataset.staging(storage, run), f"part-{k:05d}.parquet")
            storage.write_parquet(t, f, compression="none")
            files.append(f)
        storage.publish(dataset.uri(storage), run_id=run, files=files, meta={"settings_key": "gpu-checks"})

    put(datasets.PLAYS, [pa.table({"user_id": ["u0"] * n, "song_id": songs, "play_count": [1] * n},
                                  schema=datasets.PLAYS.schema)])
    put(datasets.TRACKS, [pa.table({"track_id": tracks, "song_id": songs, "artist": ["gpu"] * n, "title": ["gpu"] * n,
                                    "audio_uri": [None] * n}, schema=TRACKS_SCHEMA)])
    shards = []
    for s in range(0, n, 256):
        idx = range(s, min(n, s + 256))
        shards.append(pa.table({
            "track_id": [tracks[i] for i in idx], "audio_sha256": [f"{i:064d}" for i in idx],
            "sample_rate": pa.array([22050] * len(idx), pa.int32()), "hop_length": pa.array([512] * len(idx), pa.int32()),
            "n_mels": pa.array([N_MELS] * len(idx), pa.int32()), "n_frames": pa.array([frames] * len(idx), pa.int32()),
            "mel": pa.array([mels[i].tobytes() for i in idx], pa.binary()), "harmonic": pa.nulls(len(idx), pa.binary()),
            "percussive": pa.nulls(len(idx), pa.binary()), "settings_key": ["gpu-checks"] * len(idx)},
            schema=SPECTROGRAM_SCHEMA))
    put(datasets.SPECTROGRAMS, shards)
    split = ["valid" if i % 10 == 0 else "train" for i in range(n)]
    put(datasets.factors("plays", "item_factors"), [factors_table(songs, factors, id_column="song_id", run_id=run,
                                                                  split=split)])
    put(datasets.factors("plays", "user_factors"),
        [factors_table(["u0"], np.zeros((1, FACTORS)), id_column="user_id", run_id=run)])


def train_ray(args, cat: dict, workdir: str) -> dict:
    import torch

    from deepcontent.config import load_config
    from deepcontent.registry import load_model, registered
    from deepcontent.stages import StageContext, run_stage
    from deepcontent.storage import Storage

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    storage = Storage(f"file://{workdir}/store")
    storage.ensure_root()
    _publish(storage, cat)
    use_gpu = "true" if args.device == "cuda" else "false"
    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={storage.root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{workdir}/catalog.db",
        f"train.use_gpu={use_gpu}", f"train.num_workers={max(1, gpus)}", f"train.batch_size={args.batch_size}",
        f"train.threads_per_worker={args.threads}", "train.epochs=3", "train.patience=4",
        f"train.cpus_per_worker={args.threads}", f"embed.use_gpu={use_gpu}", f"embed.actors={max(1, gpus)}",
        "embed.in_process_max_clips=0"])
    ctx = StageContext(cfg, storage)
    try:
        log(f"train stage: Ray Train, {max(1, gpus)} worker(s), use_gpu={use_gpu}")
        with GpuSampler() as sampler:
            result = run_stage("train", cfg, ctx)
        curve = registered(storage, result.model_version)["curve"]
        log("embed stage: Ray Data actors, embed.use_gpu")
        t0 = time.perf_counter()
        run_stage("embed", cfg, ctx)
        embed_s = time.perf_counter() - t0
    finally:
        ctx.close()
    model, artifact = load_model(storage, result.model_version)
    steady = float(np.median([h["samples_per_s"] for h in curve]))
    compute = _compute_only(model, artifact, cat, args)
    return {"path": "ray-train", "world_size": max(1, gpus), "process_group": "nccl" if gpus else "gloo",
            "precision": "bf16" if gpus else "fp32", "train_samples_per_s": round(steady, 1),
            "compute_only_samples_per_s": round(compute, 1), "input_bound": bool(steady < 0.8 * compute * max(1, gpus)),
            "valid_nmse": result.metrics["valid_nmse"], "embed_stage_clips_per_s": round(len(cat["mels"]) / embed_s, 1),
            **sampler.summary(), "_state": {k: v.cpu() for k, v in model.state_dict().items()},
            "_window": artifact["window_frames"]}


def _compute_only(model, artifact, cat: dict, args) -> float:
    """Training steps on one pre-cut batch of windows on one device: the rate without input."""
    import torch

    from deepcontent.models import build_model
    from deepcontent.train.losses import mse_loss

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    net = build_model("paper_cnn", n_factors=FACTORS, **artifact["model_params"]).to(device)
    opt = torch.optim.Adam(net.parameters())
    w = artifact["window_frames"]
    x = torch.from_numpy(cat["mels"][: args.batch_size, :, :w].astype(np.float32)).to(device)
    y = torch.zeros((len(x), FACTORS), device=device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None

    def step():
        if amp:
            with amp():
                pred = net(x)
        else:
            pred = net(x)
        loss = mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.train_steps * len(x) / (time.perf_counter() - t0)


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
