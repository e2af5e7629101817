"""Stage ``neighbors``: top-k cosine neighbours per track -> the ``similar_tracks`` table.

:func:`top_k_cosine` is the maths (numpy in, numpy out): rows are L2-normalised once, then
each block of ``block_rows`` query rows is multiplied against all rows (one BLAS product per
block, memory ``block_rows × n``) and the k best are selected with ``argpartition``. It is exact;
at 1M tracks × 50 dims one pass is ~10^13 multiply-adds, which is where an ANN index would take
over (not built yet).

:func:`run_neighbors` reads one model version's vectors from the ``embeddings`` table
(``neighbors.vector``: the predicted factors by default, the listening-behaviour space the
papers' neighbour tables use) and upserts ``(track_id, neighbor_track_id, rank, score,
model_version)`` rows in one commit. Neighbours of every track are recomputed (a new track can
become anyone's neighbour), but the upsert commits nothing when no row changed, so a re-run with
nothing new makes no snapshot.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from deepcontent.config import Config
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.storage import Storage, new_run_id

__all__ = ["STAGE", "run_neighbors", "top_k_cosine"]

STAGE = "neighbors"


def top_k_cosine(vectors: np.ndarray, *, k: int, block_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar other rows of every row.

    Parameters
    ----------
    vectors : np.ndarray [shape=(n, d)]
        One vector per item. All-zero rows have no direction: their similarity to anything is 0.
    k : int >= 1
        Neighbours per row; at most ``n - 1`` are returned.
    block_rows : int >= 1
        Query rows per matrix product.

    Returns
    -------
    neighbors : np.ndarray [shape=(n, min(k, n - 1)), dtype=int64]
        Row indices, most similar first; a row is never its own neighbour. Ties go to the lower
        index.
    scores : np.ndarray [shape=(n, min(k, n - 1)), dtype=float32]
        Cosine similarities, in [-1, 1], non-increasing along each row.

    Raises
    ------
    ValueError
        If ``vectors`` is not 2-D and finite, or ``k`` / ``block_rows`` < 1.
    """
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"vectors has {bad} row(s) with NaN or inf; quarantine them before searching")
    for name, v in (("k", k), ("block_rows", block_rows)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    n = x.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    out_idx = np.empty((n, kk), np.int64)
    out_score = np.empty((n, kk), np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        sims = unit[start:stop] @ unit.T  # (b, n)
        rows = np.arange(stop - start)
        sims[rows, start + rows] = -np.inf  # never yourself
        cand = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < n else np.argsort(-sims, axis=1)[:, :kk]
        cand_scores = np.take_along_axis(sims, cand, axis=1)
        # Sort the k candidates: by score descending, then index ascending. (Among scores tied
        # exactly at the k-th place argpartition keeps an arbitrary subset: still a correct top-k.)
        order = np.lexsort((cand, -cand_scores), axis=1)
        out_idx[start:stop] = np.take_along_axis(cand, order, axis=1)
        out_score[start:stop] = np.take_along_axis(cand_scores, order, axis=1)
    return out_idx, out_score


def run_neighbors(cfg: Config, storage: Storage, warehouse) -> StageResult:
    """Run the stage for ``embed.model_version`` (default: production); see the module docstring."""
    from deepcontent.embed.stage import embedding_matrix, production_version

    nc = cfg.neighbors
    version = cfg.embed.model_version or production_version(storage)
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("neighbors"))
    warehouse.ensure_tables(["similar_tracks"])
    outputs = {"table": ".".join(warehouse.identifier("similar_tracks"))}
    with manifest.timed("read"):
        emb = warehouse.read("embeddings", f"model_version = '{version}'", columns=["track_id", nc.vector])
        emb = emb.sort_by("track_id")
    if emb.num_rows < 2:
        log.info("neighbors: %d embedded track(s) for %s; nothing to compare", emb.num_rows, version)
        return StageResult(run_id, False, {"tracks": emb.num_rows}, {}, outputs)
    with manifest.timed("search"):
        idx, score = top_k_cosine(embedding_matrix(emb, nc.vector), k=nc.k, block_rows=nc.block_rows)
    ids = np.asarray(emb["track_id"].to_pylist(), dtype=object)
    n, kk = idx.shape
    rows = pa.table({
        "track_id": pa.array(np.repeat(ids, kk).tolist(), pa.string()),
        "neighbor_track_id": pa.array(ids[idx.ravel()].tolist(), pa.string()),
        "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), n), pa.int32()),
        # Rounded so that a recomputation on the same vectors compares equal whatever the BLAS.
        "score": pa.array(np.round(score.ravel(), 6), pa.float32()),
        "model_version": pa.array([version] * (n * kk), pa.string()),
    })
    with manifest.timed("commit"):
        committed = warehouse.upsert("similar_tracks", rows, run_id=run_id)
    manifest.counts = {"tracks": n, "k": kk, "rows": rows.num_rows}
    manifest.inputs = {"model_version": version, "vector": nc.vector}
    manifest.outputs = outputs
    if not committed:
        log.info("neighbors: %d tracks × %d neighbours unchanged for %s; nothing committed", n, kk, version)
        return StageResult(run_id, False, manifest.counts, {}, outputs)
    uri = manifest.write(storage, status="succeeded")
    log.info("neighbors: committed %d tracks × %d neighbours for %s; manifest %s", n, kk, version, uri)
    return StageResult(run_id, True, manifest.counts, {}, outputs, uri)
