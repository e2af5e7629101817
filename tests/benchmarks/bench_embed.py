"""Benchmark: the ``embed`` stage vs the model's forward pass alone, and what a nightly run
with 1% new tracks costs next to a full run.

    python tests/benchmarks/bench_embed.py [--songs 400] [--clip-seconds 10] [--new-fraction 0.01]
                                           [--train-songs 80] [--json]

In one run, on the embedded S3 server and an Iceberg SQL catalog in SQLite (both in a temp dir):

1. **A model, untimed.** A separate small catalog (``--train-songs``, same clip length and
   format) goes through ingest -> spectrograms -> matrices -> factorize -> train (two quick
   epochs): its only purpose is a registered model. The model is then registered in the measured
   deployment, which holds nothing else but the raw catalog of ``--songs`` WAV clips of
   ``--clip-seconds``.
2. **Engines, timed apart.** Ray is started once (``seconds_ray_start``) and the Spark session
   once (``seconds_spark_start``, with a first job and the catalog opened) before any clock;
   both runs below use the same running engines, the way one ``deepcontent nightly`` process
   shares them between its stages. Neither start-up is in any figure except
   ``incremental_cost_ratio_with_startup``.
3. **Full run** (``seconds_full``): the ``nightly`` stage (``deepcontent.stages.nightly``) (ingest -> spectrograms -> embed -> neighbors) on that deployment. Nothing is up to
   date, so everything is recomputed: every track ingested, every clip decoded, every clip
   embedded and committed, every neighbour list computed. That is what a user pays for the
   catalog from scratch (a new deployment, or new spectrogram settings).
4. **Incremental run** (``seconds_incremental``): ``new_tracks`` = ``--new-fraction`` of the
   catalog (at least one) are added to the raw catalog as a label would add them (WAV files in
   the MSD-style folders, lines appended to ``unique_tracks.txt``), then the same nightly runs
   again. ``incremental_cost_ratio`` = incremental / full (target <= 0.1);
   ``incremental_cost_ratio_with_startup`` adds Ray and Spark start-up to both, as a cron job
   starting a fresh CLI process every night would pay it.
5. ``embed_clips_per_s``: the ``embed`` stage of the full run, end to end — ``run_embed`` from
   the spectrogram shards in object storage to the Iceberg ``embeddings`` table committed, with
   every clip pending — clips embedded / its wall time (``seconds_embed``, measured around the
   stage's runner; Ray already running). ``embed_seconds_full`` is the stage's own breakdown
   (plan, inference = the Ray Data pipeline including actor start-up and model loads, commit).
6. ``forward_clips_per_s``: the same clips, decoded into memory beforehand, through
   ``deepcontent.embed.pooling.clip_outputs`` with the same registered model
   (``deepcontent.train.registry.load_model``), in one process with ``embed.actors ×
   embed.threads_per_actor`` torch threads (the embed actors' threads together), in chunks of
   ``embed.clips_per_batch`` clips with ``embed.windows_per_forward`` as the actors do, after one
   warm-up chunk. It runs after the full run and again after the incremental one (the machine
   may be shared): ``seconds_forward`` is the mean of both.
7. ``ratio`` = embed / forward (target >= 0.7). What bounds it on this machine:
   ``embed_server_cpu_s`` (the S3 server's CPU time during the embed stage, from ``/proc``),
   ``forward_cpu_s`` (the forward pass's CPU time), ``seconds_read_input`` /
   ``read_input_reader_cpu_s`` / ``read_input_server_cpu_s`` (reading every shard the way the
   actors do, into the same arrays, in this one process: wall, reader CPU, server CPU), and
   ``ratio_ceiling_read_plus_forward`` = forward CPU / (forward CPU + reader CPU + server CPU of
   that read): on cores the forward pass keeps busy, the most an embed stage could reach with no
   engine, staging or commit cost of its own.
8. Breakdowns, to tell where the time goes: ``stages_full_s`` / ``stages_incremental_s`` (each
   nightly stage's wall time, from the nightly summary), ``embed_seconds_incremental`` (the embed
   stage's plan / inference / commit in the incremental run), and ``load_avg_1m`` (the machine's
   1-minute load average at the start and at the end: on a shared machine, read the figures
   with it).

The last line of output is the JSON result.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from deepcontent.stages import StageContext, run_stage  # noqa: E402
from deepcontent.config import load_config  # noqa: E402
from deepcontent.engines.s3server import EmbeddedS3Server  # noqa: E402
from deepcontent.manifest import setup_logging  # noqa: E402
from deepcontent.storage import Storage, join  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_embed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_config(root: str, catalog_db: str, *, songs: int, users: int, clip_seconds: float, extra: list[str]):
    return load_config(None, environ={}, overrides=[
        f"storage.root={root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{catalog_db}",
        f"synth.songs={songs}", f"synth.users={users}", f"synth.clip_seconds={clip_seconds}",
        "synth.audio_format=wav", "synth.gtzan_per_genre=0", "synth.mtat_clips=0", "spark.master=local[2]",
        *extra,
    ])


def train_model(cfg, storage: Storage) -> tuple[str, float]:
    """ingest -> spectrograms -> matrices -> factorize -> train on a separate catalog; the model
    version and the seconds that starting Spark (session + a first job) took."""
    ctx = StageContext(cfg, storage)
    t0 = time.perf_counter()
    ctx.spark.range(100).count()
    spark_start_s = time.perf_counter() - t0
    for name in ("ingest", "spectrograms", "matrices", "factorize", "train"):
        log(f"model catalog: {name}")
        result = run_stage(name, cfg, ctx)
    ctx.warehouse.close()  # Spark and Ray stay up for the measured runs
    return result.model_version, spark_start_s


def register_copy(src: Storage, dst: Storage, version: str) -> None:
    """Register ``version`` of ``src``'s registry in ``dst``'s, as production."""
    import io

    import torch

    from deepcontent.registry import register, registered, version_uri

    artifact = torch.load(io.BytesIO(src.read_bytes(version_uri(src, version, "model.pt"))), weights_only=True)
    meta = {k: v for k, v in registered(src, version).items() if k not in ("model_version", "model_uri")}
    register(dst, version=version, artifact=artifact, metadata=meta)


def add_tracks(cfg, storage: Storage, n: int) -> list[str]:
    """Put ``n`` new tracks in the raw catalog: WAV clips in the MSD-style folders and lines
    appended to unique_tracks.txt (no plays yet: new releases)."""
    from deepcontent.synth.attributes import GENRES, sample_attributes
    from deepcontent.synth.audio import FORMAT_EXTENSIONS, encode_audio, render_clip
    from deepcontent.synth.generate import msd_subdir

    s = cfg.synth
    raw = lambda key: storage.raw_uri(cfg.storage.raw_prefix, key)  # noqa: E731
    rng = np.random.default_rng(12345)
    ids, lines = [], []
    for i in range(n):
        track_id = f"TRZZNEW{i:011d}"
        audio = render_clip(sample_attributes(GENRES[i % len(GENRES)], rng), seconds=s.clip_seconds,
                            sample_rate=s.sample_rate, seed=777 + i)
        uri = join(raw(cfg.sources.audio), msd_subdir(track_id), f"{track_id}{FORMAT_EXTENSIONS[s.audio_format]}")
        storage.write_bytes(uri, encode_audio(audio, sample_rate=s.sample_rate, fmt=s.audio_format))
        lines.append(f"{track_id}<SEP>SOZZNEW{i:011d}<SEP>New Artist<SEP>New Song {i}\n")
        ids.append(track_id)
    tracks_uri = raw(cfg.sources.tracks)
    storage.write_bytes(tracks_uri, storage.read_bytes(tracks_uri) + "".join(lines).encode())
    return ids


def read_clips(storage: Storage) -> list[np.ndarray]:
    """Every published spectrogram, read the way an embed actor reads its work items (row group
    by row group through the Storage's S3 client) and turned into arrays with the actors' own
    :func:`~deepcontent.datasets.mel_arrays`."""
    from deepcontent.datasets import SPECTROGRAMS, mel_arrays
    from deepcontent.embed.inference import CLIP_COLUMNS

    clips: list[np.ndarray] = []
    for uri in SPECTROGRAMS.files(storage):
        for _, rows in storage.read_row_groups(uri, columns=CLIP_COLUMNS):
            clips += mel_arrays(rows, copy=True)
    return clips


def forward_seconds(model, artifact, clips: list[np.ndarray], *, threads: int, clips_per_batch: int,
                    windows_per_forward: int) -> tuple[float, float]:
    """Wall and CPU time (all threads of this process) of ``clip_outputs`` over ``clips`` with
    ``threads`` torch threads."""
    import torch

    from deepcontent.embed.pooling import clip_outputs

    kw = dict(n_frames=int(artifact["window_frames"]), target_mean=np.asarray(artifact["target_mean"], np.float32),
              target_std=np.asarray(artifact["target_std"], np.float32), windows_per_forward=windows_per_forward)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        clip_outputs(model, clips[:clips_per_batch], **kw)  # warm-up: allocator, kernels
        t0, cpu0 = time.perf_counter(), time.process_time()
        for s in range(0, len(clips), clips_per_batch):
            clip_outputs(model, clips[s : s + clips_per_batch], **kw)
        return time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        torch.set_num_threads(previous)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=400, help="tracks in the measured catalog")
    ap.add_argument("--clip-seconds", type=float, default=10.0)
    ap.add_argument("--new-fraction", type=float, default=0.01, help="new tracks for the incremental run")
    ap.add_argument("--train-songs", type=int, default=80, help="tracks of the separate catalog the model is trained on")
    ap.add_argument("--json", action="store_true", help="only progress on stderr and the JSON result")
    args = ap.parse_args()
    setup_logging()

    import ray

    from deepcontent.engines.ray import init_ray
    import deepcontent.stages.embed as embed_stage
    from deepcontent.synth.generate import generate
    from deepcontent.registry import load_model

    new_tracks = max(1, round(args.songs * args.new_fraction))
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-embed-", dir="/tmp") as tmp:
        os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
        os.makedirs(os.environ["RAY_TMPDIR"])
        with EmbeddedS3Server(os.path.join(tmp, "s3"), log_file=os.path.join(tmp, "rclone.log")) as server:
            def storage_at(root: str) -> Storage:
                st = Storage(root, endpoint_url=server.endpoint_url, credentials=server.credentials)
                st.ensure_root()
                return st

            cfg = make_config("s3://bench/catalog", os.path.join(tmp, "catalog.db"), songs=args.songs,
                              users=max(1000, 5 * args.songs), clip_seconds=args.clip_seconds,
                              extra=["synth.mismatch_fraction=0"])
            train_cfg = make_config("s3://bench/model", os.path.join(tmp, "model.db"), songs=args.train_songs,
                                    users=max(600, 10 * args.train_songs), clip_seconds=args.clip_seconds,
                                    extra=["factorize.factors=16", "train.epochs=2", "train.batch_size=16"])
            storage, train_storage = storage_at(cfg.storage.root), storage_at(train_cfg.storage.root)

            # Both catalogs first: the generator forks its workers, which must not inherit Ray.
            log(f"generating the measured catalog ({args.songs} songs of {args.clip_seconds:g}s, WAV) and "
                f"the model's ({args.train_songs} songs), untimed")
            generate(cfg, storage)
            generate(train_cfg, train_storage)

            t0 = time.perf_counter()
            init_ray(cfg.ray)
            ray_start_s = time.perf_counter() - t0
            log(f"Ray started in {ray_start_s:.1f}s")

            version, spark_start_s = train_model(train_cfg, train_storage)
            log(f"Spark started in {spark_start_s:.1f}s; model {version} registered in the measured catalog")
            register_copy(train_storage, storage, version)

            ctx = StageContext(cfg, storage)
            ctx.spark.range(100).count()  # the session the model run started, already warm
            ctx.warehouse.ensure_tables()

            embed_runs: list[dict] = []
            embed_run = embed_stage.run

            def timed_embed(stage_cfg, stage_ctx):  # the nightly's embed, timed with the server's CPU
                t, server_cpu = time.perf_counter(), server.cpu_seconds()
                result = embed_run(stage_cfg, stage_ctx)
                embed_runs.append({"seconds": time.perf_counter() - t, "result": result,
                                   "server_cpu_s": server.cpu_seconds() - server_cpu})
                return result

            embed_stage.run = timed_embed

            def nightly() -> dict:
                return run_stage("nightly", cfg, ctx).to_dict()

            ec = cfg.embed
            threads = ec.actors * ec.threads_per_actor
            try:
                log("full run: nightly on the catalog with nothing up to date")
                t0 = time.perf_counter()
                full = nightly()
                full_s = time.perf_counter() - t0
                tracks = full["stages"]["spectrograms"]["counts"]["computed"]
                clips = embed_runs[0]["result"].counts["embedded"]
                assert full["new"] == clips == tracks, full
                embed_s = embed_runs[0]["seconds"]

                model, artifact = load_model(storage, version)
                # Reading the input alone, as the actors read it, in this one process: wall time,
                # this process's CPU (the reader's share) and the server's.
                server_cpu0, cpu0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
                decoded = read_clips(storage)
                read_s = time.perf_counter() - t0
                reader_cpu_s = time.process_time() - cpu0
                read_server_cpu_s = server.cpu_seconds() - server_cpu0
                assert len(decoded) == clips
                log(f"forward pass alone: {clips} clips, 1 process × {threads} torch threads")
                fwd = [forward_seconds(model, artifact, decoded, threads=threads, clips_per_batch=ec.clips_per_batch,
                                       windows_per_forward=ec.windows_per_forward)]

                ids = add_tracks(cfg, storage, new_tracks)
                log(f"incremental run: nightly after adding {len(ids)} tracks")
                t0 = time.perf_counter()
                incr = nightly()
                incr_s = time.perf_counter() - t0
                assert incr["new"] == new_tracks and incr["changed"] == 0, incr

                log("forward pass alone, again")
                fwd.append(forward_seconds(model, artifact, decoded, threads=threads, clips_per_batch=ec.clips_per_batch,
                                           windows_per_forward=ec.windows_per_forward))
            finally:
                embed_stage.run = embed_run
                ctx.close()
                ray.shutdown()

    forward_s = float(np.mean([w for w, _ in fwd]))
    forward_cpu_s = float(np.mean([c for _, c in fwd]))
    server_cpu_s = embed_runs[0]["server_cpu_s"]
    embed_rate, forward_rate = clips / embed_s, clips / forward_s
    startup = ray_start_s + spark_start_s
    windows = int(sum(-(-c.shape[1] // int(artifact["window_frames"])) for c in decoded))
    out = {
        "embed_clips_per_s": round(embed_rate, 1),
        "forward_clips_per_s": round(forward_rate, 1),
        "ratio": round(embed_rate / forward_rate, 3),
        "incremental_cost_ratio": round(incr_s / full_s, 3),
        "incremental_cost_ratio_with_startup": round((incr_s + startup) / (full_s + startup), 3),
        "clips": clips,
        "new_tracks": new_tracks,
        "actors": ec.actors,
        "threads_per_actor": ec.threads_per_actor,
        "forward_threads": threads,
        "windows": windows,
        "clip_seconds": args.clip_seconds,
        "seconds_embed": round(embed_s, 2),
        "seconds_forward": round(forward_s, 2),
        "seconds_forward_runs": [round(w, 2) for w, _ in fwd],
        "forward_cpu_s": round(forward_cpu_s, 2),
        "embed_server_cpu_s": round(server_cpu_s, 2),
        "seconds_read_input": round(read_s, 2),
        "read_input_reader_cpu_s": round(reader_cpu_s, 2),
        "read_input_server_cpu_s": round(read_server_cpu_s, 2),
        # On cores the forward pass keeps busy, reading the input (the reader's CPU and the
        # server's) comes on top of the forward pass's CPU: a stage with no engine, staging or
        # commit cost of its own could reach at most this.
        "ratio_ceiling_read_plus_forward": round(forward_cpu_s / (forward_cpu_s + reader_cpu_s + read_server_cpu_s), 3),
        "seconds_full": round(full_s, 2),
        "seconds_incremental": round(incr_s, 2),
        "seconds_ray_start": round(ray_start_s, 2),
        "seconds_spark_start": round(spark_start_s, 2),
        "stages_full_s": {k: v["seconds"] for k, v in full["stages"].items()},
        "stages_incremental_s": {k: v["seconds"] for k, v in incr["stages"].items()},
        "embed_seconds_full": embed_runs[0]["result"].seconds,
        "embed_seconds_incremental": embed_runs[1]["result"].seconds,
        "cpus": os.cpu_count(),
        "load_avg_1m": [round(load_start, 1), round(os.getloadavg()[0], 1)],
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>36}: {v}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
