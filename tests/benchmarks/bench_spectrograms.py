"""Benchmark: the Spark spectrogram job vs the same pure function vs a naive librosa loop, same I/O.

    python tests/benchmarks/bench_spectrograms.py [--clips 1000] [--roots file,s3] [--json]

Generates ``--clips`` 30 s 44.1 kHz stereo MP3 clips once, ingests them into two catalogs with
the same bytes — a ``file://`` root and a bucket of the embedded S3 server — and, for each root,
measures three sides that all do the same I/O: read every clip from that root and write the
same float16 log-mel shards (Parquet, uncompressed, ``spectrograms.clips_per_task`` clips per
shard, row groups of 8) back to it.

* ``job``: ``run_stage("spectrograms")`` end to end on ``local[<cores>]`` (plan, tasks, isolated
  decoders, shards, publish), rate per core = clips / wall / cores. It runs twice on the same
  session, outputs deleted in between: ``job_cold`` is the first run, whose clock includes
  starting Spark's Python workers (≈ 2 s of PySpark's own start, then the project's imports);
  ``job`` is the second, with workers up — as the pure side, whose imports and caches are warmed
  before its clock starts, and as a stage finds them after an earlier one in a pipeline run.
* ``pure``: one process, one thread: read -> :func:`compute_log_mel` -> shard rows -> write.
* ``naive``: one process, one thread, the loop a user would write: read -> ``librosa.load(sr=
  22050, mono=True)`` -> ``librosa.feature.melspectrogram`` -> ``log1p`` -> float16 -> write.

Per root it prints ``spark_overhead`` = 1 − job rate per core / pure rate, ``ratio_vs_naive`` =
job rate per core / naive rate (and both ``_cold``), and per-clip cost breakdowns in milliseconds: ``read``,
``decode``, ``resample``, ``mel``, ``ipc`` (job only: the isolated decoder's round trip beyond
its own work), ``write``, and for the job ``other`` = wall × cores / clips − the rest (plan,
scheduling, Python workers, publish, idle cores at the end). On the S3 root
``server_cpu_ms_per_clip`` is the embedded server's CPU per clip during the job (on a cluster the
store is remote; here it shares the cores with the decoders).

The last line of output is the JSON result.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from deepcontent import datasets  # noqa: E402
from deepcontent.audio.features import compute_log_mel  # noqa: E402
from deepcontent.config import SparkConfig, load_config  # noqa: E402
from deepcontent.engines.s3server import EmbeddedS3Server  # noqa: E402
from deepcontent.engines.spark import spark_session  # noqa: E402
from deepcontent.manifest import setup_logging  # noqa: E402
from deepcontent.stages import StageContext, run_stage  # noqa: E402
from deepcontent.stages.spectrograms import CLIP_COSTS, spectrogram_table  # noqa: E402
from deepcontent.storage import Storage, join  # noqa: E402
from deepcontent.synth.generate import generate  # noqa: E402

STAGE_OUTPUTS = ("features/spectrograms", "features/audio_index", "quarantine/spectrograms")


def _config(root: str, clips: int, cores: int, catalog_db: Path):
    return load_config(None, environ={}, overrides=[
        f"storage.root={root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{catalog_db}",
        f"synth.songs={clips}",
        f"synth.users={max(200, clips)}", "synth.mismatch_fraction=0", "synth.lastfm_format=none",
        "synth.gtzan_per_genre=0", "synth.mtat_clips=0", f"spark.master=local[{cores}]",
    ])


def _catalogs(work: Path, server: EmbeddedS3Server, clips: int, cores: int, spark) -> dict[str, tuple]:
    """The same generated clips under a file:// root and in the S3 bucket, both ingested."""
    file_root = work / "file-root"
    file_storage = Storage(file_root.as_uri())
    file_storage.ensure_root()
    file_cfg = _config(file_root.as_uri(), clips, cores, work / "file-catalog.db")
    if not file_storage.published(file_storage.uri("canonical/tracks")):
        print(f"generating {clips} clips (once; --workdir keeps them)", file=sys.stderr)
        generate(file_cfg, file_storage)
        run_stage("ingest", file_cfg, StageContext(file_cfg, file_storage, spark=spark))
    s3_storage = Storage("s3://bench", endpoint_url=server.endpoint_url, credentials=server.credentials)
    s3_storage.ensure_root()
    s3_cfg = _config("s3://bench", clips, cores, work / "s3-catalog.db")
    if not s3_storage.published(s3_storage.uri("canonical/tracks")):
        raw = file_root / file_cfg.storage.raw_prefix
        for path in sorted(p for p in raw.rglob("*") if p.is_file()):  # uploaded through the S3 API
            s3_storage.write_bytes(s3_storage.raw_uri(s3_cfg.storage.raw_prefix, path.relative_to(raw).as_posix()),
                                   path.read_bytes())
        run_stage("ingest", s3_cfg, StageContext(s3_cfg, s3_storage, spark=spark))
    return {"file": (file_storage, file_cfg), "s3": (s3_storage, s3_cfg)}


def _tracks(storage: Storage) -> list[tuple[str, str]]:
    t = datasets.TRACKS.read(storage, columns=["track_id", "audio_uri"])
    return [(a, b) for a, b in zip(t["track_id"].to_pylist(), t["audio_uri"].to_pylist()) if b]


def _job(storage: Storage, cfg, spark, server: EmbeddedS3Server | None, cores: int) -> dict:
    for name in STAGE_OUTPUTS:
        storage.delete_prefix(storage.uri(name))
    cpu0 = server.cpu_seconds() if server else 0.0
    t0 = time.perf_counter()
    result = run_stage("spectrograms", cfg, StageContext(cfg, storage, spark=spark))
    wall = time.perf_counter() - t0
    server_cpu = (server.cpu_seconds() - cpu0) if server else None
    clips = result.counts["computed"]
    timings = storage.read_json(join(storage.uri("runs", "spectrograms"), f"{result.run_id}.json"))["timings_s"]
    per_clip = {c: 1000 * timings.get(f"clip_{c}", 0.0) / clips for c in CLIP_COSTS}
    per_clip["other"] = 1000 * wall * cores / clips - sum(per_clip.values())
    out = {"clips": clips, "seconds": wall, "clips_per_s_per_core": clips / wall / cores,
           "ms_per_clip": per_clip, "stage_seconds": {k: timings[k] for k in ("plan", "compute", "publish") if k in timings}}
    if server_cpu is not None:
        out["server_cpu_ms_per_clip"] = 1000 * server_cpu / clips
    return out


def _pure_row(data: bytes, settings) -> tuple[dict, dict]:
    r = compute_log_mel(data, settings=settings)
    return r, {k: r["seconds"][k] for k in ("decode", "resample", "mel")}


def _naive_row(data: bytes, settings) -> tuple[dict, dict]:
    """What a user would write with librosa: load (decode + downmix + resample), mel, log."""
    import librosa

    t0 = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    y, sr = librosa.load(io.BytesIO(data), sr=settings.sample_rate, mono=True)
    t1 = time.perf_counter()
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=settings.n_fft, hop_length=settings.hop_length,
                                         n_mels=settings.n_mels, fmin=settings.fmin, fmax=settings.fmax, power=2.0)
    mel = np.log1p(np.float32(settings.compression) * mel).astype(np.float16)
    r = {"mel": mel, "n_frames": mel.shape[1], "sample_rate": sr, "hop_length": settings.hop_length,
         "n_mels": settings.n_mels, "audio_sha256": digest}
    # librosa.load decodes and resamples in one call: both land in "decode".
    return r, {"decode": t1 - t0, "resample": 0.0, "mel": time.perf_counter() - t1}


def _loop(storage: Storage, cfg, tracks: list[tuple[str, str]], side: str) -> dict:
    """One process: read each clip from ``storage``, compute its row, write shards back."""
    settings = cfg.spectrograms.mel_settings()
    row = _pure_row if side == "pure" else _naive_row
    per = cfg.spectrograms.clips_per_task
    out_prefix = storage.uri("bench", side)
    storage.delete_prefix(out_prefix)
    first = storage.read_bytes(tracks[0][1])
    row(first, settings)  # warm caches and imports, as a long-lived worker would be
    costs = dict.fromkeys(("read", "decode", "resample", "mel", "write"), 0.0)
    t_start = time.perf_counter()
    for g in range(0, len(tracks), per):
        results = []
        for track_id, uri in tracks[g : g + per]:
            t0 = time.perf_counter()
            data = storage.read_bytes(uri)
            costs["read"] += time.perf_counter() - t0
            r, seconds = row(data, settings)
            for k, v in seconds.items():
                costs[k] += v
            results.append((track_id, r))
        t0 = time.perf_counter()
        storage.write_parquet(spectrogram_table(results, "bench", schema=datasets.SPECTROGRAMS.schema),
                              join(out_prefix, f"part-{g // per:05d}.parquet"), compression="none",
                              row_group_size=datasets.SHARD_ROW_GROUP)
        costs["write"] += time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    storage.delete_prefix(out_prefix)
    n = len(tracks)
    return {"clips": n, "seconds": wall, "clips_per_s_per_core": n / wall,
            "ms_per_clip": {k: 1000 * v / n for k, v in costs.items()}}


def _rounded(x):
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return round(x, 3) if isinstance(x, float) else x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000, help="clips to generate and process (default 1000)")
    ap.add_argument("--roots", default="file,s3", help="comma-separated roots to measure: file, s3 (default both)")
    ap.add_argument("--json", action="store_true", help="only progress on stderr and the JSON result")
    ap.add_argument("--workdir", default=None, help="keep the generated catalogs here (reused if present)")
    args = ap.parse_args()
    roots = [r.strip() for r in args.roots.split(",") if r.strip()]
    if not roots or set(roots) - {"file", "s3"}:
        ap.error(f"--roots takes file and/or s3, got {args.roots!r}")
    setup_logging()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-spec-")).resolve()
    cores = os.cpu_count() or 1
    out: dict = {"clips": args.clips, "cores": cores}
    with EmbeddedS3Server(work / "s3") as server:
        spark = spark_session(SparkConfig(master=f"local[{cores}]", conf={"spark.ui.enabled": "false"}))
        catalogs = _catalogs(work, server, args.clips, cores, spark)
        spark.range(100).count()
        for root in roots:
            storage, cfg = catalogs[root]
            print(f"[{root}] job, cold (first run: Python workers start)", file=sys.stderr)
            cold = _job(storage, cfg, spark, server if root == "s3" else None, cores)
            print(f"[{root}] job, warm (the same run again: workers up, as the pure side is warmed)", file=sys.stderr)
            job = _job(storage, cfg, spark, server if root == "s3" else None, cores)
            tracks = _tracks(storage)
            print(f"[{root}] pure function, one process", file=sys.stderr)
            pure = _loop(storage, cfg, tracks, "pure")
            print(f"[{root}] naive librosa loop, one process", file=sys.stderr)
            naive = _loop(storage, cfg, tracks, "naive")
            rate = job["clips_per_s_per_core"]
            out[root] = {
                "spark_overhead": 1 - rate / pure["clips_per_s_per_core"],
                "ratio_vs_naive": rate / naive["clips_per_s_per_core"],
                "spark_overhead_cold": 1 - cold["clips_per_s_per_core"] / pure["clips_per_s_per_core"],
                "ratio_vs_naive_cold": cold["clips_per_s_per_core"] / naive["clips_per_s_per_core"],
                "job_clips_per_s_per_core": rate,
                "job_cold_clips_per_s_per_core": cold["clips_per_s_per_core"],
                "pure_clips_per_s_per_core": pure["clips_per_s_per_core"],
                "naive_clips_per_s_per_core": naive["clips_per_s_per_core"],
                "projected_hours_1m_clips_100_cores": 1e6 / (rate * 100) / 3600,
                "breakdown_ms_per_clip": {"job": job["ms_per_clip"], "job_cold": cold["ms_per_clip"],
                                          "pure": pure["ms_per_clip"], "naive": naive["ms_per_clip"]},
                "job_stage_seconds": job["stage_seconds"],
                "seconds": {"job": job["seconds"], "job_cold": cold["seconds"], "pure": pure["seconds"],
                            "naive": naive["seconds"]},
            }
            if "server_cpu_ms_per_clip" in job:
                out[root]["server_cpu_ms_per_clip"] = job["server_cpu_ms_per_clip"]
        spark.stop()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    out = _rounded(out)
    if not args.json:
        print(json.dumps(out, indent=2), file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
