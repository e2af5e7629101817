"""Benchmark: the train stage with every clip resident vs a cache a quarter of the catalog.

    python tests/benchmarks/bench_train_cache.py [--catalog-mib 2048] [--seconds 10] [--seeds 2]
                                                 [--epochs 4] [--windows-per-clip 1] [--json]
                                                 [--paths resident,streaming] [--set KEY=VALUE ...]

In one run it publishes a synthetic catalog straight into a ``file://`` deployment (no audio):
``--catalog-mib`` of float16 log-mel clips of ``--seconds`` (128 bands) whose factors can be
learnt from them (each song has a latent vector z; its clip is a spectral envelope of z with
frame-level noise, its item factors are a linear map of z plus noise; 80% train, 10% valid,
10% test songs), then trains the paper CNN with the train stage (Ray Train, 2 CPU workers)

* **resident**: ``train.cache_bytes`` larger than any worker's shard (the fast path), and
* **streaming**: ``train.cache_bytes`` = a quarter of the catalog's spectrogram bytes, so each
  worker's shard (about half the catalog's train + valid clips) spills to local disk and
  streams back every epoch,

each for ``--seeds`` seeds, same epochs and steps. It reports per run the validation NMSE,
samples/s, the cache path each split took and the workers' peak RSS (``ru_maxrss``, the larger
of the two workers), and the summary: mean ± sd of the NMSE per path, their difference against
the seed-to-seed sd, and the streaming runs' peak worker RSS against ``cache_bytes + 1 GiB``.
Per run it also prints rank 0's resident set at each epoch's end by kind (``anon``: private
memory, clips included; ``file``: mapped libraries; ``shmem``: shared memory the worker touched,
Ray's object-store pages it read its blocks from).

The last line of output is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

for _key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from deepcontent import datasets  # noqa: E402
from deepcontent.config import load_config  # noqa: E402
from deepcontent.datasets import SPECTROGRAM_SCHEMA, TRACKS_SCHEMA, factors_table  # noqa: E402
from deepcontent.storage import Storage, join  # noqa: E402

N_MELS, LATENT, FACTORS = 128, 8, 16


def log(msg: str) -> None:
    print(f"[bench_train_cache {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def publish_catalog(storage: Storage, *, clips: int, frames: int, seed: int, shard_clips: int = 256) -> int:
    """Learnable synthetic inputs in the train stage's contracts; returns the spectrogram bytes."""
    rng = np.random.default_rng(seed)
    basis = np.cumsum(rng.standard_normal((LATENT, N_MELS)), axis=1) / np.sqrt(N_MELS)  # smooth envelopes
    mixing = rng.standard_normal((LATENT, FACTORS))
    z = rng.standard_normal((clips, LATENT))
    track_ids = [f"TRCACHE{i:011d}" for i in range(clips)]
    song_ids = [f"SOCACHE{i:011d}" for i in range(clips)]
    run = "bench-inputs"

    def put(dataset: datasets.Dataset, tables) -> None:
        files = []
        for k, t in enumerate(tables):
            f = join(dataset.staging(storage, run), f"part-{k:05d}.parquet")
            storage.write_parquet(t, f, compression="none")
            files.append(f)
        storage.publish(dataset.uri(storage), run_id=run, files=files, meta={"settings_key": "bench"})

    # one play per song: the stage needs a listening catalog (its factors are the targets here)
    put(datasets.PLAYS, [pa.table({"user_id": ["u0"] * clips, "song_id": song_ids, "play_count": [1] * clips},
                                  schema=datasets.PLAYS.schema)])
    put(datasets.TRACKS, [pa.table({"track_id": track_ids, "song_id": song_ids, "artist": ["bench"] * clips,
                                    "title": ["bench"] * clips, "audio_uri": [None] * clips}, schema=TRACKS_SCHEMA)])

    def shards():
        for s in range(0, clips, shard_clips):
            idx = np.arange(s, min(clips, s + shard_clips))
            envelope = np.log1p(np.exp(z[idx] @ basis))  # (m, bands), softplus
            noise = rng.standard_normal((len(idx), N_MELS, frames), dtype=np.float32)
            mel = (envelope[:, :, None] * (1.0 + 0.5 * noise)).astype(np.float16)
            yield pa.table({
                "track_id": [track_ids[i] for i in idx], "audio_sha256": ["0" * 64] * len(idx),
                "sample_rate": pa.array([22050] * len(idx), pa.int32()), "hop_length": pa.array([512] * len(idx), pa.int32()),
                "n_mels": pa.array([N_MELS] * len(idx), pa.int32()), "n_frames": pa.array([frames] * len(idx), pa.int32()),
                "mel": pa.array([m.tobytes() for m in mel], pa.binary()), "harmonic": pa.nulls(len(idx), pa.binary()),
                "percussive": pa.nulls(len(idx), pa.binary()), "settings_key": ["bench"] * len(idx)},
                schema=SPECTROGRAM_SCHEMA)

    put(datasets.SPECTROGRAMS, shards())
    split = ["valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train" for i in range(clips)]
    factors = z @ mixing + 0.5 * rng.standard_normal((clips, FACTORS))
    put(datasets.factors("plays", "item_factors"),
        [factors_table(song_ids, factors, id_column="song_id", run_id=run, split=split)])
    put(datasets.factors("plays", "user_factors"),
        [factors_table(["u0"], rng.standard_normal((1, FACTORS)), id_column="user_id", run_id=run)])
    return clips * frames * N_MELS * 2


def train_once(storage: Storage, root: str, *, cache_bytes: int, seed: int, args) -> dict:
    from deepcontent.registry import registered
    from deepcontent.stages import StageContext, run_stage

    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={storage.root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{root}/catalog.db",
        "train.num_workers=2", "train.threads_per_worker=1", f"train.batch_size={args.batch_size}",
        f"train.windows_per_clip={args.windows_per_clip}", f"train.epochs={args.epochs}",
        f"train.patience={args.epochs + 1}", f"train.seed={seed}", f"train.cache_bytes={cache_bytes}",
        f"train.spill_dir={root}/spill", *args.set])
    t0 = time.perf_counter()
    ctx = StageContext(cfg, storage)
    try:
        result = run_stage("train", cfg, ctx)
    finally:
        ctx.close()
    curve = registered(storage, result.model_version)["curve"]
    return {"seed": seed, "cache_bytes": cache_bytes, "valid_nmse": round(result.metrics["valid_nmse"], 4),
            "train": curve[-1]["cache"]["train"], "valid": curve[-1]["cache"]["valid"],
            "clip_bytes_held": curve[-1]["cache"]["clip_bytes_held"],
            "worker_peak_rss_gib": round(max(h["worker_peak_rss_bytes"] for h in curve) / 2**30, 3),
            # the peak so far at the end of each epoch: epoch 0's is the load's (or the first epoch's)
            "worker_peak_rss_gib_by_epoch": [round(h["worker_peak_rss_bytes"] / 2**30, 3) for h in curve],
            # rank 0's resident set at each epoch's end by kind: private, libraries, shared memory
            "worker_rss_parts_gib_by_epoch": [{k: round(v / 2**30, 3) for k, v in h.get("worker_rss_parts_bytes", {}).items()}
                                              for h in curve],
            "samples_per_s": round(float(np.median([h["samples_per_s"] for h in curve])), 1),
            "ingest_s": curve[0]["load_s"], "stage_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog-mib", type=int, default=2048, help="spectrogram bytes of the synthetic catalog")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    ap.add_argument("--seeds", type=int, default=2, help="training seeds per path")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--windows-per-clip", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--paths", default="resident,streaming", help="which runs: resident, streaming or both")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (e.g. train.prefetch_batches=1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bad = [p for p in args.paths.split(",") if p not in ("resident", "streaming")]
    if bad or not args.paths:
        ap.error(f"--paths takes resident, streaming or both (comma-separated), got {args.paths!r}")

    frames = 1 + int(args.seconds * 22050) // 512
    clips = max(64, args.catalog_mib * 2**20 // (frames * N_MELS * 2))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-train-cache-", dir="/tmp") as tmp:
        os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
        os.makedirs(os.environ["RAY_TMPDIR"])
        os.makedirs(os.path.join(tmp, "spill"))
        storage = Storage(f"file://{tmp}/store")
        storage.ensure_root()
        log(f"publishing {clips} learnable synthetic clips of {frames} frames ({args.catalog_mib} MiB)")
        catalog_bytes = publish_catalog(storage, clips=clips, frames=frames, seed=0)
        paths = {"resident": 4 * catalog_bytes, "streaming": catalog_bytes // 4}
        paths = {p: paths[p] for p in args.paths.split(",")}
        for seed in range(args.seeds):
            for path, cache in paths.items():
                log(f"training: {path} (train.cache_bytes {cache / 2**30:.2f} GiB), seed {seed}")
                runs.append({"path": path, **train_once(storage, tmp, cache_bytes=cache, seed=seed, args=args)})
                log(json.dumps(runs[-1]))

    def stats(path: str) -> dict:
        nmse = np.asarray([r["valid_nmse"] for r in runs if r["path"] == path])
        return {"nmse_mean": round(float(nmse.mean()), 4), "nmse_sd": round(float(nmse.std(ddof=1)), 4) if len(nmse) > 1 else None,
                "worker_peak_rss_gib": max(r["worker_peak_rss_gib"] for r in runs if r["path"] == path),
                "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in runs if r["path"] == path])), 1)}

    summary = {p: stats(p) for p in paths}
    sds = [s["nmse_sd"] for s in summary.values() if s["nmse_sd"] is not None]
    out = {"catalog_gib": round(catalog_bytes / 2**30, 3), "clips": clips, "clip_frames": frames,
           "overrides": args.set, "runs": runs, **summary, "seed_sd": round(float(np.mean(sds)), 4) if sds else None}
    if "streaming" in summary:
        out["streaming_cache_gib"] = round(paths["streaming"] / 2**30, 3)
        out["streaming_rss_within_cache_plus_1gib"] = summary["streaming"]["worker_peak_rss_gib"] <= paths["streaming"] / 2**30 + 1.0
    if len(summary) == 2:
        out["nmse_difference"] = round(summary["streaming"]["nmse_mean"] - summary["resident"]["nmse_mean"], 4)
        out["streaming_vs_resident_samples_per_s"] = round(summary["streaming"]["samples_per_s"]
                                                           / summary["resident"]["samples_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
