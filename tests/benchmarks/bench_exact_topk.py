"""Benchmark: the exact recall reference's top-k, a partial sort of every row vs group maxima.

    python tests/benchmarks/bench_exact_topk.py [--tracks 200000] [--queries 2000] [--dim 50]
                                                [--k 10] [--repeats 3] [--json]

Every approximate neighbours run checks its recall against exact search on ``--queries`` seeded
tracks (:func:`deepcontent.embed.ann.exact_neighbors_of`). Both sides here do that same work on
the same clustered unit vectors, in blocks of the same size: the similarity product of a block
of queries against every track, the query itself excluded, then the ``--k`` best columns per row

* ``argpartition``: a partial sort of each whole row (the reference before
  :func:`deepcontent.embed.ann.top_k_columns`), then the k sorted;
* ``group_max``: :func:`~deepcontent.embed.ann.top_k_columns` (columns dealt into groups of 64,
  each group's maximum, only the k best groups sorted).

It prints the best of ``--repeats`` seconds of each side, the time of the product alone, the
speed-up, and whether both sides returned the same columns. The last line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from deepcontent.embed import ann


def clustered_unit(n: int, d: int, *, seed: int, clusters: int = 1000, spread: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return ann.unit_rows(x)


def argpartition_top_k(sims: np.ndarray, *, k: int) -> np.ndarray:
    """The former reference: partial sort of every row, then the k sorted by (-score, column)."""
    n = sims.shape[1]
    cand = np.argpartition(sims, n - k, axis=1)[:, n - k:]
    order = np.lexsort((cand, -np.take_along_axis(sims, cand, axis=1)), axis=1)
    return np.take_along_axis(cand, order, axis=1)


def timed(unit: np.ndarray, rows: np.ndarray, *, k: int, top_k, block_bytes: int = 256 << 20) -> tuple[float, np.ndarray]:
    """Seconds and result of the exact search of ``rows`` with ``top_k`` (None: the product only)."""
    n = unit.shape[0]
    block = max(1, min(1024, block_bytes // (4 * n)))
    out = np.empty((len(rows), k), np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(rows), block):
        q = rows[s : s + block]
        sims = unit[q] @ unit.T
        sims[np.arange(len(q)), q] = -np.inf
        if top_k is not None:
            out[s : s + len(q)] = top_k(sims, k=k)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracks", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="only the JSON line")
    args = p.parse_args(argv)

    unit = clustered_unit(args.tracks, args.dim, seed=args.seed)
    rows = ann.sample_queries(args.tracks, size=args.queries, seed=args.seed)
    best: dict[str, float] = {}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # the sides alternate, so drift on the machine hits both
        for name, fn in (("product_only", None), ("argpartition", argpartition_top_k), ("group_max", ann.top_k_columns)):
            seconds, out = timed(unit, rows, k=args.k, top_k=fn)
            best[name] = min(best.get(name, np.inf), seconds)
            results[name] = out
    result = {
        "tracks": args.tracks, "queries": len(rows), "dim": args.dim, "k": args.k, "repeats": args.repeats,
        "seconds": {name: round(s, 3) for name, s in best.items()},
        "speedup": round(best["argpartition"] / best["group_max"], 2),
        "top_k_only_speedup": round((best["argpartition"] - best["product_only"])
                                    / max(best["group_max"] - best["product_only"], 1e-9), 2),
        "same_columns": bool((results["argpartition"] == results["group_max"]).all()),
    }
    if not args.json:
        print(f"{len(rows)} exact queries against {args.tracks} tracks: argpartition {best['argpartition']:.2f} s, "
              f"group maxima {best['group_max']:.2f} s (product alone {best['product_only']:.2f} s)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
