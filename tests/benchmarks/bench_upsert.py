"""Benchmark: a nightly upsert into the ``embeddings`` table at 100k and at 1M rows.

    python tests/benchmarks/bench_upsert.py [--small 100000] [--large 1000000] [--change 10000]
                                            [--dim 400] [--factors 50] [--json]

For each table size, in a fresh ``file://`` warehouse (SQLite catalog, Iceberg files on local
disk) and in a fresh child process (so peak RSS is that step's alone):

1. **first load**: ``Warehouse.upsert`` of every row, handed over in parts of 100,000 rows (as
   the embed stage hands over its staged files), timed;
2. **nightly**: one upsert of ``--change`` rows — half of them tracks whose audio changed (new
   ``audio_sha256`` and vectors), half new tracks — timed, with the child's peak RSS;
3. **nightly, proportional**: the same with 1% of that table's size.

The same ``--change`` rows go into both tables, so ``nightly_ratio`` = large / small measures how
the cost grows with the *table* (the acceptance: ≤ 3 at 10× the rows). The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

PART = 100_000


def rows(ids: np.ndarray, *, audio: str, dim: int, factors: int, seed: int) -> pa.Table:
    from deepcontent.datasets import vector_column

    rng = np.random.default_rng(seed)
    n = len(ids)
    return pa.table({
        "track_id": pa.array([f"TR{i:09d}" for i in ids]), "model_version": pa.array(["bench-v1"] * n),
        "predicted_factors": vector_column(rng.standard_normal((n, factors), dtype=np.float32)),
        "embedding": vector_column(rng.standard_normal((n, dim), dtype=np.float32)),
        "audio_sha256": pa.array([f"{audio}-{i}" for i in ids]),
        "computed_at": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    })


def child(args) -> dict:
    """One measured step in this (fresh) process."""
    from deepcontent.config import WarehouseConfig
    from deepcontent.storage import Storage
    from deepcontent.warehouse import Warehouse

    storage = Storage(f"file://{args.root}/store")
    storage.ensure_root()
    wh = Warehouse.from_config(WarehouseConfig(uri=f"sqlite:///{args.root}/catalog.db"), storage)
    wh.ensure_tables(["embeddings"])
    n = args.tracks
    if args.step == "load":
        def parts():
            for s in range(0, n, PART):
                yield rows(np.arange(s, min(n, s + PART)), audio="a", dim=args.dim, factors=args.factors, seed=s)
        t0 = time.perf_counter()
        wh.upsert("embeddings", parts, run_id="load")
    else:
        half = args.change // 2
        rng = np.random.default_rng(args.seed)
        changed = np.sort(rng.choice(n, size=half, replace=False))
        new = np.arange(n + args.seed * args.change, n + args.seed * args.change + args.change - half)
        data = pa.concat_tables([rows(changed, audio=f"night{args.seed}", dim=args.dim, factors=args.factors, seed=1),
                                 rows(new, audio="a", dim=args.dim, factors=args.factors, seed=2)])
        t0 = time.perf_counter()
        wh.upsert("embeddings", data, run_id=f"night-{args.seed}")
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def run_child(**kw) -> dict:
    argv = [sys.executable, __file__, "--child"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--change", type=int, default=10_000, help="rows of the fixed nightly (half changed, half new)")
    p.add_argument("--dim", type=int, default=400)
    p.add_argument("--factors", type=int, default=50)
    p.add_argument("--json", action="store_true")
    # child-process arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--tracks", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    result = {"change_rows": args.change, "dim": args.dim, "factors": args.factors}
    for label, n in (("small", args.small), ("large", args.large)):
        with tempfile.TemporaryDirectory(prefix=f"bench-upsert-{label}-") as root:
            common = {"root": root, "tracks": n, "dim": args.dim, "factors": args.factors}
            load = run_child(step="load", **common)
            nightly = run_child(step="nightly", change=args.change, seed=1, **common)
            proportional = run_child(step="nightly", change=max(2, n // 100), seed=2, **common)
            result[label] = {"tracks": n, "first_load_s": load["seconds"], "first_load_peak_rss_gib": load["peak_rss_gib"],
                             "nightly_s": nightly["seconds"], "nightly_peak_rss_gib": nightly["peak_rss_gib"],
                             "nightly_1pct_rows": max(2, n // 100), "nightly_1pct_s": proportional["seconds"],
                             "nightly_1pct_peak_rss_gib": proportional["peak_rss_gib"]}
            if not args.json:
                print(label, result[label], file=sys.stderr, flush=True)
    result["nightly_ratio"] = round(result["large"]["nightly_s"] / result["small"]["nightly_s"], 2)
    result["nightly_1pct_ratio"] = round(result["large"]["nightly_1pct_s"] / result["small"]["nightly_1pct_s"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
