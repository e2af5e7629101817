"""Benchmark: WMF with benfred/implicit vs Spark MLlib ALS on a synthetic Taste-Profile-like matrix.

    python tests/benchmarks/bench_als.py [--users 51000] [--songs 19200] [--nnz 2400000]
                                         [--factors 50] [--iterations 15] [--json]

Defaults are about 1/20 of the Taste Profile. In one run it:

1. builds the play matrix with the synthetic world's generator (``deepcontent.synth.world``:
   songs with hidden communities and popularity, users with tastes, power-law counts), plays only;
2. holds out 10% of each user's plays (at least one, for users with two or more) as test;
3. fits ``implicit`` (all cores) and ``spark`` (``local[*]``, one BLAS/OpenMP thread per task,
   session and JIT warmed on a tiny fit first) on train with the same parameters and seed;
   ``*_s_per_iter`` = wall time of the whole ``fit`` call / iterations;
4. fits the numpy ``reference`` and ``implicit`` on a small sub-matrix (``--ref-users`` random
   users × their ``--ref-items`` most played songs) and compares their WMF objectives
   (``objective_rel_diff`` = |implicit − reference| / reference);
5. computes held-out AUC (mean per-user AUC over ``--auc-users`` sampled users) for implicit,
   spark and the popularity baseline.

The last line of output is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

for _key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_key, "1")

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from deepcontent.evaluate.metrics import heldout_auc, popularity_auc  # noqa: E402
from deepcontent.factorize.factory import make_factorizer  # noqa: E402
from deepcontent.factorize.objective import wmf_objective  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_als {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def world_matrix(n_users: int, n_songs: int, nnz: int, *, seed: int) -> sp.csr_matrix:
    """users × songs play counts from the synthetic world (plays only, no audio)."""
    from deepcontent.synth.world import iter_plays, make_songs, make_users, n_communities

    songs = make_songs(n_songs, seed=seed, with_attributes=False)
    # Users' distinct-song draws saturate a little below the requested mean; 1.1 compensates.
    users = make_users(n_users, n_comm=n_communities(n_songs), mean_songs=1.1 * nnz / n_users, seed=seed)
    rows, cols, vals = [], [], []
    for u, s, c in iter_plays(songs, users, seed=seed):
        rows.append(u)
        cols.append(s)
        vals.append(c)
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    return sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n_users, n_songs))


def holdout(user_items: sp.csr_matrix, *, fraction: float, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per user, a random ``fraction`` of the plays (at least one; none for one-play users) as test."""
    rng = np.random.default_rng(seed)
    m = user_items.tocsr()
    counts = np.diff(m.indptr)
    rows = np.repeat(np.arange(m.shape[0]), counts)
    # random order within each row: sort by (row, random key)
    order = np.lexsort((rng.random(m.nnz), rows))
    rank = np.empty(m.nnz, dtype=np.int64)
    rank[order] = np.arange(m.nnz) - m.indptr[rows[order]]
    n_test = np.where(counts >= 2, np.maximum(1, np.round(fraction * counts)).astype(np.int64), 0)
    is_test = rank < n_test[rows]

    def part(mask):
        return sp.csr_matrix((m.data[mask], (rows[mask], m.indices[mask])), shape=m.shape)

    return part(~is_test), part(is_test)


def subsample(user_items: sp.csr_matrix, *, n_users: int, n_items: int, seed: int) -> sp.csr_matrix:
    """Random users × their most played items, rows/columns with nothing dropped."""
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(user_items.shape[0], size=min(n_users, user_items.shape[0]), replace=False))
    sub = user_items[users]
    items = np.sort(np.argsort(-np.bincount(sub.indices, minlength=sub.shape[1]), kind="stable")[:n_items])
    sub = sub[:, items].tocsr()
    sub = sub[np.diff(sub.indptr) > 0]
    return sub[:, np.bincount(sub.indices, minlength=sub.shape[1]) > 0].tocsr()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=51_000)
    ap.add_argument("--songs", type=int, default=19_200)
    ap.add_argument("--nnz", type=int, default=2_400_000, help="approximate plays (user-song pairs)")
    ap.add_argument("--factors", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--eps", type=float, default=1.0)
    ap.add_argument("--regularization", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--auc-users", type=int, default=10_000, help="users sampled for held-out AUC")
    ap.add_argument("--ref-users", type=int, default=1_500, help="reference sub-matrix users")
    ap.add_argument("--ref-items", type=int, default=1_000, help="reference sub-matrix items")
    ap.add_argument("--no-spark", action="store_true", help="skip the Spark fit")
    ap.add_argument("--json", action="store_true", help="print only progress on stderr and the JSON result")
    args = ap.parse_args()
    params = dict(factors=args.factors, alpha=args.alpha, eps=args.eps, regularization=args.regularization,
                  iterations=args.iterations, seed=args.seed)
    weights = dict(alpha=args.alpha, eps=args.eps, regularization=args.regularization)

    t0 = time.perf_counter()
    plays = world_matrix(args.users, args.songs, args.nnz, seed=args.seed)
    gen_s = time.perf_counter() - t0
    train, test = holdout(plays, fraction=0.1, seed=args.seed)
    log(f"matrix {plays.shape[0]}x{plays.shape[1]}, {plays.nnz} plays ({gen_s:.1f}s); "
        f"train {train.nnz}, test {test.nnz}")

    t0 = time.perf_counter()
    X_impl, Y_impl = make_factorizer("implicit", num_threads=0, **params).fit(train)
    implicit_s = time.perf_counter() - t0
    log(f"implicit fit {implicit_s:.1f}s")

    spark_s = spark_auc = spark_reg = None
    if not args.no_spark:
        from deepcontent.config import SparkConfig
        from deepcontent.engines.spark import spark_session

        spark = spark_session(SparkConfig(master="local[*]", conf={"spark.ui.enabled": "false"}))
        warm = sp.random(200, 100, density=0.1, format="csr", random_state=0)
        warm.data[:] = 1.0
        make_factorizer("spark", spark=spark, **{**params, "iterations": 2}).fit(warm)  # JVM/JIT up
        spark_factorizer = make_factorizer("spark", spark=spark, **params)
        t0 = time.perf_counter()
        X_spark, Y_spark = spark_factorizer.fit(train)
        spark_s = time.perf_counter() - t0
        spark_reg = spark_factorizer.last_reg_param
        log(f"spark fit {spark_s:.1f}s (regParam {spark_reg:.3g})")
        spark.stop()

    t0 = time.perf_counter()
    implicit_auc = heldout_auc(X_impl, Y_impl, train, test, max_users=args.auc_users, seed=args.seed)
    if spark_s is not None:
        spark_auc = heldout_auc(X_spark, Y_spark, train, test, max_users=args.auc_users, seed=args.seed)
    pop_auc = popularity_auc(train, test, max_users=args.auc_users, seed=args.seed)
    log(f"AUCs {time.perf_counter() - t0:.1f}s")

    sub = subsample(train, n_users=args.ref_users, n_items=args.ref_items, seed=args.seed)
    t0 = time.perf_counter()
    X_ref, Y_ref = make_factorizer("reference", **params).fit(sub)
    ref_s = time.perf_counter() - t0
    X_si, Y_si = make_factorizer("implicit", num_threads=0, **params).fit(sub)
    ref_obj = wmf_objective(sub, X_ref, Y_ref, **weights)
    impl_obj = wmf_objective(sub, X_si, Y_si, **weights)
    log(f"reference on {sub.shape[0]}x{sub.shape[1]} ({sub.nnz} plays): {ref_s:.1f}s")

    implicit_per_iter = implicit_s / args.iterations
    spark_per_iter = None if spark_s is None else spark_s / args.iterations
    out = {
        "users": int(plays.shape[0]),
        "songs": int(plays.shape[1]),
        "nnz": int(plays.nnz),
        "train_nnz": int(train.nnz),
        "test_nnz": int(test.nnz),
        "factors": args.factors,
        "iterations": args.iterations,
        "cores": os.cpu_count(),
        "generate_s": round(gen_s, 2),
        "implicit_s_per_iter": round(implicit_per_iter, 4),
        "spark_s_per_iter": None if spark_per_iter is None else round(spark_per_iter, 4),
        "spark_reg_param": spark_reg,
        "reference_shape": list(sub.shape),
        "reference_nnz": int(sub.nnz),
        "reference_objective": ref_obj,
        "implicit_objective": impl_obj,
        "objective_rel_diff": abs(impl_obj - ref_obj) / ref_obj,
        "implicit_heldout_auc": implicit_auc,
        "spark_heldout_auc": spark_auc,
        "popularity_auc": pop_auc,
        "ratio_spark_vs_implicit": None if spark_per_iter is None else spark_per_iter / implicit_per_iter,
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>24}: {v}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
