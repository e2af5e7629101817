"""Benchmark: all-tracks top-k neighbours at catalog scale, approximate index vs exact search.

    python tests/benchmarks/bench_neighbors.py [--tracks 1000000] [--dim 50] [--k 10]
                                               [--queries 2000] [--index hnsw|ivf] [--json]

In one run it:

1. draws ``--tracks`` clustered vectors (``--clusters`` Gaussian centres, noise ``--spread``;
   shaped like WMF item factors: tracks of one style share a direction);
2. runs the ``neighbors`` stage's search (``deepcontent.stages.neighbors.search_all``) exactly as
   the stage does beyond ``neighbors.exact_max_tracks``: normalise, build the index, search
   ``--queries`` seeded tracks exactly, raise the search effort while the index's recall@k on
   them is below the stage's ``min_recall`` (``effort_tries``), search every track for its
   ``--k`` nearest others and measure the recall@k of those rows. ``seconds`` is all of it,
   end to end;
3. ``exact_seconds_projected``: the exact search of those queries (the same BLAS product
   ``top_k_cosine`` does, against all tracks) timed and scaled to every track.

The last line of output is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np

from deepcontent.embed import ann
from deepcontent.config import NeighborsConfig
from deepcontent.stages.neighbors import search_all


def clustered(n: int, d: int, *, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 18):  # in chunks: no float64 copy of the whole matrix
        m = min(n, s + (1 << 18)) - s
        out[s:s + m] = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracks", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=2000, help="seeded exact queries for recall@k")
    p.add_argument("--index", choices=["hnsw", "ivf"], default="hnsw")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="only the JSON line")
    args = p.parse_args(argv)

    x = clustered(args.tracks, args.dim, clusters=args.clusters, spread=args.spread, seed=args.seed)
    t0 = time.perf_counter()
    unit = ann.unit_rows(x)
    del x
    params = ann.default_params(args.index, n=args.tracks, k=args.k)
    defaults = NeighborsConfig()  # the stage's gate and effort ceiling
    idx, _, report, _ = search_all(unit, k=args.k, method=args.index, params=params, seed=args.seed,
                                   recall_queries=args.queries, min_recall=defaults.min_recall,
                                   max_search_effort=defaults.max_search_effort)
    seconds = time.perf_counter() - t0
    exact_per_query = report["seconds"]["recall"] / report["recall_queries"]
    result = {
        "tracks": args.tracks, "dim": args.dim, "k": args.k, "index": args.index, "params": report["params"],
        "effort_tries": report["effort_tries"],
        "seconds": round(seconds, 1), "phases_s": report["seconds"],
        "recall_at_10" if args.k == 10 else f"recall_at_{args.k}": report["recall_at_k"],
        "recall_queries": report["recall_queries"],
        "exact_seconds_projected": round(exact_per_query * args.tracks, 1),
        "speedup_vs_exact": round(exact_per_query * args.tracks / seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
    }
    if not args.json:
        print(f"{args.tracks} × {args.dim}-d, k={args.k}: {args.index} {seconds:.0f} s end to end, "
              f"recall@{args.k} {report['recall_at_k']:.4f}; exact projected {result['exact_seconds_projected']:.0f} s",
              file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
