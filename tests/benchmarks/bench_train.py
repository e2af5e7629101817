"""Benchmark: the train stage (Ray Train + Ray Data, end to end) vs a plain PyTorch loop.

    python tests/benchmarks/bench_train.py [--clips 384] [--seconds 15] [--factors 32]
                                           [--workers 2] [--batch-size 64] [--windows-per-clip 64]
                                           [--epochs 12] [--json]

In one run it:

1. starts the embedded S3 server and publishes synthetic inputs in the stage's contracts:
   ``--clips`` log-mel clips of ``--seconds`` (float16, 128 bands) in Parquet shards, tracks,
   and item / user factors (80% train, 20% valid songs);
2. runs :func:`deepcontent.stages.train.run` with the paper CNN on ``--workers`` CPU
   workers (one torch thread each, DDP over gloo), ``--batch-size`` per worker, a fixed
   ``--epochs`` (no early stop). ``ray_samples_per_s`` = train windows processed / the
   workers' wall time from entering the train function to the last epoch's report: it
   includes the Ray Data ingest of the shards from S3, the DDP all-reduces, per-epoch
   validation and the checkpoint uploads (it excludes starting Ray and the worker processes,
   reported separately as ``ray_overhead_s`` with the registry writes). ``ray_steady_samples_per_s`` is the median
   per-epoch training rate;
3. runs the same model in a plain single-process loop over in-memory tensors (random windows
   pre-cut into one tensor) with the same compute: ``workers × threads`` torch threads and
   the same global batch (``workers × batch``), for as many windows as Ray trained on, half
   before and half after the Ray run (the machine may be shared; the mean is reported):
   ``plain_samples_per_s``;
4. runs the same DDP set-up without Ray (``torch.multiprocessing``, gloo, ``--workers``
   processes of ``--threads`` threads, in-memory tensors): ``plain_ddp_samples_per_s``, to
   tell what DDP itself costs on this machine from what Ray adds;
5. ``ratio`` = ray / plain (target >= 0.8); ``steady_ratio`` = ray steady / plain.

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
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from deepcontent.config import load_config  # noqa: E402
from deepcontent import datasets  # noqa: E402
from deepcontent.datasets import SPECTROGRAM_SCHEMA, TRACKS_SCHEMA, factors_table  # noqa: E402
from deepcontent.storage import Storage, join  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def publish_inputs(storage: Storage, *, clips: int, frames: int, factors: int, seed: int) -> None:
    """Synthetic spectrograms, tracks and factors in the train stage's input contracts."""
    rng = np.random.default_rng(seed)
    track_ids = [f"TRBENCH{i:011d}" for i in range(clips)]
    song_ids = [f"SOBENCH{i:011d}" for i in range(clips)]
    run = "bench-inputs"

    def put(dataset: datasets.Dataset, tables: list[pa.Table]) -> None:
        files = []
        for k, t in enumerate(tables):
            f = join(dataset.staging(storage, run), f"part-{k:05d}.parquet")
            storage.write_parquet(t, f, compression="none")
            files.append(f)
        storage.publish(dataset.uri(storage), run_id=run, files=files, meta={"settings_key": "bench"})

    tracks = pa.table({"track_id": track_ids, "song_id": song_ids, "artist": ["bench"] * clips,
                       "title": ["bench"] * clips, "audio_uri": [None] * clips}, schema=TRACKS_SCHEMA)
    put(datasets.TRACKS, [tracks])
    shards, per = [], 32
    for s in range(0, clips, per):
        rows = []
        for i in range(s, min(s + per, clips)):
            # log-mel-like: non-negative, float16
            mel = np.abs(rng.standard_normal((128, frames))).astype(np.float16) * 2
            rows.append({"track_id": track_ids[i], "audio_sha256": "0" * 64, "sample_rate": 22050, "hop_length": 512,
                         "n_mels": 128, "n_frames": frames, "mel": mel.tobytes(), "harmonic": None, "percussive": None,
                         "settings_key": "bench"})
        shards.append(pa.Table.from_pylist(rows, schema=SPECTROGRAM_SCHEMA))
    put(datasets.SPECTROGRAMS, shards)
    split = ["train" if i % 5 else "valid" for i in range(clips)]
    put(datasets.factors("plays", "item_factors"),
        [factors_table(song_ids, rng.standard_normal((clips, factors)), id_column="song_id", run_id=run, split=split)])
    put(datasets.factors("plays", "user_factors"),
        [factors_table(["u0"], rng.standard_normal((1, factors)), id_column="user_id", run_id=run)])


def plain_loop(*, n_samples: int, batch: int, threads: int, factors: int, frames: int, seed: int) -> float:
    """Samples/s of the same model in one process over in-memory tensors."""
    import torch

    from deepcontent.models import PaperCNN
    from deepcontent.train.losses import mse_loss

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n_windows = min(n_samples, 2048)
    x = (torch.rand((n_windows, 128, frames), generator=g) * 2).to(torch.float16)
    y = torch.randn((n_windows, factors), generator=g)
    model = PaperCNN(n_factors=factors, n_frames=frames)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step(i: int) -> None:
        idx = torch.randint(0, n_windows, (batch,), generator=g)
        loss = mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):  # warm-up (allocator, kernels)
        step(i)
    steps = max(1, n_samples // batch)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - t0)


def _ddp_worker(rank: int, world: int, port: int, n_samples: int, batch: int, threads: int, factors: int, frames: int,
                seed: int, out) -> None:
    import torch
    import torch.distributed as dist

    from deepcontent.models import PaperCNN
    from deepcontent.train.losses import mse_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(seed)
    model = torch.nn.parallel.DistributedDataParallel(PaperCNN(n_factors=factors, n_frames=frames),
                                                      gradient_as_bucket_view=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + rank)
    n_windows = 1024
    x = (torch.rand((n_windows, 128, frames), generator=g) * 2).to(torch.float16)
    y = torch.randn((n_windows, factors), generator=g)

    def step() -> None:
        idx = torch.randint(0, n_windows, (batch,), generator=g)
        loss = mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    steps = max(1, n_samples // (batch * world))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    if rank == 0:
        out.put(steps * batch * world / (time.perf_counter() - t0))
    dist.destroy_process_group()


def plain_ddp(*, n_samples: int, world: int, batch: int, threads: int, factors: int, frames: int, seed: int) -> float:
    """Samples/s of the same DDP set-up as the Ray workers (gloo, ``world`` processes) without
    Ray: separates what DDP itself costs on this machine from what Ray adds."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, n_samples, batch, threads, factors, frames, seed, out))
             for r in range(world)]
    for p in procs:
        p.start()
    rate = out.get(timeout=900)
    for p in procs:
        p.join()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=384)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--factors", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per Ray worker")
    ap.add_argument("--batch-size", type=int, default=64, help="per Ray worker (train.batch_size)")
    ap.add_argument("--windows-per-clip", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import ray

    from deepcontent.engines.s3server import EmbeddedS3Server
    from deepcontent.registry import registered
    from deepcontent.stages import StageContext, run_stage

    frames = 1 + int(args.seconds * 22050) // 512
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir="/tmp") as tmp:
        os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
        os.makedirs(os.environ["RAY_TMPDIR"])
        with EmbeddedS3Server(os.path.join(tmp, "s3"), log_file=os.path.join(tmp, "rclone.log")) as server:
            storage = Storage("s3://bench/root", endpoint_url=server.endpoint_url, credentials=server.credentials)
            storage.ensure_root()
            log(f"publishing {args.clips} synthetic clips of {frames} frames")
            publish_inputs(storage, clips=args.clips, frames=frames, factors=args.factors, seed=args.seed)
            cfg = load_config(None, environ={}, overrides=[
                f"storage.root={storage.root}", "storage.embedded_s3=false",
                f"train.num_workers={args.workers}", f"train.threads_per_worker={args.threads}",
                f"train.batch_size={args.batch_size}", f"train.windows_per_clip={args.windows_per_clip}",
                f"train.epochs={args.epochs}", f"train.patience={args.epochs + 1}", f"train.seed={args.seed}",
            ])
            plain_batch, plain_threads = args.batch_size * args.workers, args.threads * args.workers
            n_plain = args.epochs * args.windows_per_clip * int(0.8 * args.clips)
            # the plain loop runs before and after Ray (the machine may be shared): mean of both
            log(f"plain loop: 1 process × {plain_threads} threads, batch {plain_batch}")
            plain_before = plain_loop(n_samples=n_plain // 2, batch=plain_batch, threads=plain_threads,
                                      factors=args.factors, frames=cfg.train.window_frames, seed=args.seed)
            log(f"Ray Train: {args.workers} workers × {args.threads} thread, batch {args.batch_size}/worker")
            t0 = time.perf_counter()
            result = run_stage("train", cfg, StageContext(cfg, storage))
            wall = time.perf_counter() - t0
            assert not ray.is_initialized()
            curve = registered(storage, result.model_version)["curve"]
    samples = sum(h["samples"] for h in curve)
    worker_s = curve[-1]["worker_elapsed_s"]
    ray_rate = samples / worker_s
    steady = float(np.median([h["samples_per_s"] for h in curve]))
    log(f"plain loop again: 1 process × {plain_threads} threads, batch {plain_batch}")
    plain_after = plain_loop(n_samples=n_plain // 2, batch=plain_batch, threads=plain_threads, factors=args.factors,
                             frames=cfg.train.window_frames, seed=args.seed)
    plain = (plain_before + plain_after) / 2
    log(f"plain DDP without Ray: {args.workers} processes × {args.threads} thread, batch {args.batch_size}")
    ddp = plain_ddp(n_samples=n_plain // 2, world=args.workers, batch=args.batch_size, threads=args.threads,
                    factors=args.factors, frames=cfg.train.window_frames, seed=args.seed)
    out = {
        "ray_samples_per_s": round(ray_rate, 1), "plain_samples_per_s": round(plain, 1), "ratio": round(ray_rate / plain, 3),
        "ray_steady_samples_per_s": round(steady, 1), "steady_ratio": round(steady / plain, 3),
        "plain_before_samples_per_s": round(plain_before, 1), "plain_after_samples_per_s": round(plain_after, 1),
        "plain_ddp_samples_per_s": round(ddp, 1), "ray_steady_vs_plain_ddp": round(steady / ddp, 3),
        "ray_epoch_samples_per_s": [round(h["samples_per_s"]) for h in curve],
        "samples": samples, "epochs": len(curve),
        "ray_worker_s": round(worker_s, 2), "ray_ingest_s": curve[0]["load_s"],
        "ray_overhead_s": round(wall - worker_s, 2), "ray_stage_wall_s": round(wall, 2),
        "workers": args.workers, "threads_per_worker": args.threads, "batch_per_worker": args.batch_size,
        "plain_batch": plain_batch, "plain_threads": plain_threads, "clips": args.clips, "clip_frames": frames,
        "window_frames": cfg.train.window_frames, "factors": args.factors, "cpus": os.cpu_count(),
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>26}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
