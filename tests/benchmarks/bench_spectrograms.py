"""Benchmark: the Spark spectrogram job vs the same pure function in one process vs naive librosa.

    python tests/benchmarks/bench_spectrograms.py [--clips 1000] [--json]

Generates ``--clips`` 30 s 44.1 kHz stereo MP3 clips into the embedded S3 server and ingests
them, then measures in the same run:

* ``spark_clips_per_s_per_core``: ``run_spectrograms`` end to end (clips read from S3, decoded
  in isolated child processes, Parquet shards written and published) on ``local[*]``, divided by
  the cores Spark used; the session is started and warmed before the clock starts, the Python
  workers' own start-up is counted;
* ``inprocess_clips_per_s_per_core``: ``compute_log_mel`` over the same files read from local
  disk, one process, one thread;
* ``naive_clips_per_s_per_core``: ``librosa.load(sr=22050)`` + ``melspectrogram`` + log1p over the
  same files, one thread;
* ``ratio_vs_naive`` = spark / naive and ``spark_overhead`` = 1 − spark / inprocess;
* ``projected_hours_1m_clips_100_cores`` = 1e6 / (spark rate per core × 100) / 3600;
* ``s3_read_cpu_ms_per_clip``: CPU that reading one clip through the embedded S3 server costs
  on this machine (client + server process), measured over the same clips: in the embedded
  default the server shares the cores with the decoders, which a cluster's remote store does not.

The last line of output is the JSON result.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from deepcontent.audio.features import compute_log_mel, naive_log_mel  # noqa: E402
from deepcontent.config import SparkConfig, load_config  # noqa: E402
from deepcontent.engines.s3server import EmbeddedS3Server  # noqa: E402
from deepcontent.engines.spark import spark_session  # noqa: E402
from deepcontent.stages import StageContext, run_stage  # noqa: E402
from deepcontent.manifest import setup_logging  # noqa: E402
from deepcontent.storage import Storage  # noqa: E402
from deepcontent.synth.generate import generate  # noqa: E402


def _s3_read_cpu_ms(storage: Storage, server: EmbeddedS3Server, prefix: str) -> float:
    """Client + server CPU per clip for reading every clip once through the S3 server."""
    objs = storage.list(prefix)
    server_0, client_0 = server.cpu_seconds(), os.times()
    for o in objs:
        storage.read_bytes(o.uri)
    client_1 = os.times()
    client = client_1.user + client_1.system - client_0.user - client_0.system
    return (client + server.cpu_seconds() - server_0) / max(len(objs), 1) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--json", action="store_true", help="only progress on stderr and the JSON result")
    ap.add_argument("--workdir", default=None, help="keep the generated catalog here (reused if present)")
    args = ap.parse_args()
    setup_logging()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-spec-"))
    cores = os.cpu_count() or 1
    with EmbeddedS3Server(work / "s3") as server:
        storage = Storage("s3://bench", endpoint_url=server.endpoint_url, credentials=server.credentials)
        storage.ensure_root()
        cfg = load_config(None, environ={}, overrides=[
            "storage.root=s3://bench", "storage.embedded_s3=false", f"synth.songs={args.clips}",
            f"synth.users={max(200, args.clips)}", "synth.mismatch_fraction=0", "synth.lastfm_format=none",
            "synth.gtzan_per_genre=0", "synth.mtat_clips=0", f"spark.master=local[{cores}]",
        ])
        spark = spark_session(SparkConfig(master=f"local[{cores}]", conf={"spark.ui.enabled": "false"}))
        if not storage.published(storage.uri("canonical/tracks")):
            generate(cfg, storage)
            run_stage("ingest", cfg, StageContext(cfg, storage, spark=spark))
        for name in ("features/spectrograms", "features/audio_index", "quarantine/spectrograms"):
            storage.delete_prefix(storage.uri(name))
        spark.range(100).count()
        t0 = time.perf_counter()
        result = run_stage("spectrograms", cfg, StageContext(cfg, storage, spark=spark))
        spark_s = time.perf_counter() - t0
        spark.stop()
        clips = result.counts["computed"]
        s3_cpu_ms = _s3_read_cpu_ms(storage, server, storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.audio))

        files = sorted((work / "s3" / "bench" / cfg.storage.raw_prefix / cfg.sources.audio).rglob("*.mp3"))
        datas = [f.read_bytes() for f in files]
        settings = cfg.spectrograms.mel_settings()
        compute_log_mel(datas[0], settings=settings)  # warm caches, as a long-lived worker would be
        naive_log_mel(datas[0], settings=settings)
        t0 = time.perf_counter()
        for d in datas:
            compute_log_mel(d, settings=settings)
        inproc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for d in datas:
            naive_log_mel(d, settings=settings)
        naive_s = time.perf_counter() - t0
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    spark_rate = clips / spark_s / cores
    inproc_rate = len(datas) / inproc_s
    naive_rate = len(datas) / naive_s
    out = {
        "clips": clips,
        "cores": cores,
        "spark_s": round(spark_s, 2),
        "spark_clips_per_s_per_core": round(spark_rate, 2),
        "inprocess_clips_per_s_per_core": round(inproc_rate, 2),
        "naive_clips_per_s_per_core": round(naive_rate, 2),
        "ratio_vs_naive": round(spark_rate / naive_rate, 3),
        "spark_overhead": round(1 - spark_rate / inproc_rate, 3),
        "projected_hours_1m_clips_100_cores": round(1e6 / (spark_rate * 100) / 3600, 2),
        "s3_read_cpu_ms_per_clip": round(s3_cpu_ms, 2),
        "inprocess_ms_per_clip": round(1000 / inproc_rate, 2),
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>36}: {v}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
