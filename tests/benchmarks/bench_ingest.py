"""Benchmark: Spark ingest of a Taste Profile triplets file vs a plain pyarrow.csv read.

    python tests/benchmarks/bench_ingest.py [--lines 5000000] [--json]

Generates a plays-only catalog (Taste Profile proportions: songs and users scaled to the
requested line count) into the embedded S3 server, then measures in the same run:

* ``spark_rows_per_s``: ``run_ingest`` end to end (S3 in, parse + validate + quarantine,
  Parquet out, published) on a local Spark session using every core; the session is started
  and warmed before the clock starts;
* ``arrow_rows_per_s``: ``pyarrow.csv.read_csv`` of the same file from local disk in one
  process (pyarrow's own thread pool, no validation, nothing written);
* ``ratio`` = spark / arrow.

The last line of output is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from deepcontent.config import SparkConfig, load_config
from deepcontent.engines.s3server import EmbeddedS3Server
from deepcontent.engines.spark import spark_session
from deepcontent.stages import StageContext, run_stage
from deepcontent.manifest import setup_logging
from deepcontent.storage import Storage
from deepcontent.synth.generate import generate

TASTE_LINES, TASTE_SONGS, TASTE_USERS = 48_373_586, 384_546, 1_019_318


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=5_000_000, help="approximate triplet lines to generate")
    ap.add_argument("--json", action="store_true", help="print only progress on stderr and the JSON result")
    ap.add_argument("--workdir", default=None, help="where the S3 server keeps its data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    args = ap.parse_args()
    setup_logging()

    scale = args.lines / TASTE_LINES
    songs = max(1_000, round(TASTE_SONGS * scale))
    users = max(100, round(TASTE_USERS * scale))
    # Users' distinct-song draws saturate a little below the mean; 1.1 brings the count close.
    mean = TASTE_LINES / TASTE_USERS * 1.1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    with EmbeddedS3Server(work / "s3") as server:
        storage = Storage("s3://bench", endpoint_url=server.endpoint_url, credentials=server.credentials)
        storage.ensure_root()
        cfg = load_config(None, environ={}, overrides=[
            "storage.root=s3://bench", "storage.embedded_s3=false", f"synth.songs={songs}", f"synth.users={users}",
            f"synth.mean_plays_per_user={mean}", "synth.audio=false", "synth.lastfm_format=none",
            "ingest.max_quarantine_fraction=0.2",
        ])
        t0 = time.perf_counter()
        summary = generate(cfg, storage)
        gen_s = time.perf_counter() - t0
        lines = summary["triplets"]
        local_path = work / "s3" / "bench" / cfg.storage.raw_prefix / cfg.sources.triplets
        size_mb = local_path.stat().st_size / 1e6

        spark = spark_session(SparkConfig(master="local[*]", conf={"spark.ui.enabled": "false"}))
        spark.range(100).count()  # JVM and Python workers up before the clock starts
        t0 = time.perf_counter()
        result = run_stage("ingest", cfg, StageContext(cfg, storage, spark=spark))
        spark_s = time.perf_counter() - t0
        spark.stop()

        t0 = time.perf_counter()
        table = pacsv.read_csv(
            local_path,
            read_options=pacsv.ReadOptions(column_names=["user_id", "song_id", "play_count"]),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string(), "song_id": pa.string(), "play_count": pa.int32()}),
        )
        arrow_s = time.perf_counter() - t0
        assert table.num_rows == lines, (table.num_rows, lines)
        del table
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    out = {
        "lines": lines,
        "file_mb": round(size_mb, 1),
        "songs": songs,
        "users": users,
        "cores": os.cpu_count(),
        "generate_s": round(gen_s, 2),
        "spark_s": round(spark_s, 2),
        "arrow_s": round(arrow_s, 2),
        "spark_rows_per_s": round(lines / spark_s),
        "arrow_rows_per_s": round(lines / arrow_s),
        "ratio": round((lines / spark_s) / (lines / arrow_s), 4),
        "plays_published": result.counts.get("plays"),
        "quarantined": result.quarantined,
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>18}: {v}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
