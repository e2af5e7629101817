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
3. a nightly (``--nightly`` of the tracks changed, as many new): the stage's update of that
   index (``nightly.update_s``) beside a full search on the same new vectors
   (``nightly.full_s``), both with recall@k on the same seeded queries;
4. ``exact_seconds_projected``: the exact search of those queries
   (:func:`deepcontent.embed.ann.exact_neighbors_of`: the BLAS product against all tracks and
   the group-maximum top-k) timed and scaled to every track.

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


def nightly(x: np.ndarray, x_nightly: np.ndarray, idx: np.ndarray, score: np.ndarray, full_index, *, args,
            defaults) -> dict:
    """A nightly on the same catalog: ``len(x_nightly) / 2`` tracks get new vectors and as many
    are new. Side by side, the stage's two ways to its lists: updating the full run's index
    (:mod:`deepcontent.embed.neighbor_update`, from the exported index bytes and the published
    lists, as the stage reads them) and a full search (build, tune, search) on the new vectors;
    both end with recall@k on the same seeded exact queries."""
    import pyarrow as pa

    from deepcontent.embed import neighbor_update as nu

    n, m, k = x.shape[0], x_nightly.shape[0] // 2, args.k
    rng = np.random.default_rng(args.seed + 1)
    changed = np.sort(rng.choice(n, m, replace=False))
    x_now = np.vstack([x, x_nightly[m:]])
    x_now[changed] = x_nightly[:m]
    ids, ids_now = pa.array(np.arange(n)), pa.array(np.arange(n + m))
    unit, unit_now = ann.unit_rows(x), ann.unit_rows(x_now)
    kk = idx.shape[1]
    published = pa.table({"track_id": pa.array(np.repeat(np.arange(n), kk)), "neighbor_track_id": pa.array(idx.ravel()),
                          "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), n)),
                          "score": pa.array(score.ravel())})
    index_bytes = ann.index_to_bytes(full_index)  # what the full run exported
    row_hashes = ann.row_hashes(unit)
    sample = ann.sample_queries(n + m, size=args.queries, seed=args.seed)

    t0 = time.perf_counter()
    index = ann.index_from_bytes(index_bytes)
    plan = nu.plan_update(row_track_ids=ids, row_alive=np.ones(n, bool), row_hashes=row_hashes, track_ids=ids_now,
                          hashes=ann.row_hashes(unit_now))
    prev_idx, prev_score = nu.previous_lists(published, ids_now, k=k)
    got, _, affected, _, searched_again = nu.update_neighbors(index, unit=unit_now, plan=plan, prev_neighbors=prev_idx,
                                              prev_scores=prev_score, k=k, reverse_candidates=defaults.reverse_candidates)
    update_recall = ann.recall_at_k(got[sample], ann.exact_neighbors_of(unit_now, sample, k=k))
    update_s = time.perf_counter() - t0
    del index, got

    t0 = time.perf_counter()
    _, _, full_report, _ = search_all(unit_now, k=k, method=args.index, params=ann.default_params(args.index, n=n + m, k=k),
                                      seed=args.seed, recall_queries=args.queries, min_recall=defaults.min_recall,
                                      max_search_effort=defaults.max_search_effort)
    full_s = time.perf_counter() - t0
    return {"changed": m, "new": m, "lists_changed": int(len(affected)), "searched_again": searched_again, "update_s": round(update_s, 1),
            "update_recall_at_k": round(update_recall, 5), "full_s": round(full_s, 1),
            "full_recall_at_k": full_report["recall_at_k"], "update_over_full": round(update_s / full_s, 3)}


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
    p.add_argument("--nightly", type=float, default=0.01,
                   help="then a nightly where this fraction of the tracks changes and as many are new: the "
                        "stage's index update vs a full search on the same vectors (0: skip)")
    p.add_argument("--json", action="store_true", help="only the JSON line")
    args = p.parse_args(argv)

    m = int(round(args.nightly * args.tracks))
    x_all = clustered(args.tracks + 2 * m, args.dim, clusters=args.clusters, spread=args.spread, seed=args.seed)
    x, x_nightly = x_all[:args.tracks], x_all[args.tracks:]
    t0 = time.perf_counter()
    unit = ann.unit_rows(x)
    params = ann.default_params(args.index, n=args.tracks, k=args.k)
    defaults = NeighborsConfig()  # the stage's gate and effort ceiling
    idx, scores, report, index = search_all(unit, k=args.k, method=args.index, params=params, seed=args.seed,
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
    if m:
        result["nightly"] = nightly(x, x_nightly, idx, scores, index, args=args, defaults=defaults)
    if not args.json:
        print(f"{args.tracks} × {args.dim}-d, k={args.k}: {args.index} {seconds:.0f} s end to end, "
              f"recall@{args.k} {report['recall_at_k']:.4f}; exact projected {result['exact_seconds_projected']:.0f} s",
              file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
