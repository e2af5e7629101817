"""Stage ``neighbors``: top-k cosine neighbours per track -> the ``similar_tracks`` table.

1. It reads one model version's vectors from the ``embeddings`` table (``neighbors.vector``:
   the predicted factors by default, the listening-behaviour space the papers' neighbour tables
   use), sorted by track id.
2. **Exact or approximate, by size.** Up to ``neighbors.exact_max_tracks`` vectors it searches
   exactly (:func:`deepcontent.embed.similarity.top_k_cosine`); beyond, it builds a faiss index
   (:mod:`deepcontent.embed.ann`; ``neighbors.index``: HNSW by default, or IVF) and searches it
   for every track, in this process or in ``neighbors.query_tasks`` Ray tasks that share the
   index through the object store.
3. **Recall is measured, not assumed.** An approximate run also searches
   ``neighbors.recall_queries`` seeded queries exactly. Before the full search it searches that
   sample in the index and, while recall@k is below ``neighbors.min_recall``, doubles the
   search effort (``ef_search`` / ``nprobe``) up to ``neighbors.max_search_effort`` times the
   configured one; the recall of the published rows and the efforts tried go in the manifest.
   Still below ``neighbors.min_recall``, the run fails and commits nothing.
4. **Index export.** The index (``index.faiss``), the track id of each of its rows
   (``ids.parquet``) and, in the published pointer, its method, parameters and measured recall
   are published under ``<root>/indexes/<model_version>/`` so a serving system can load them.
5. **One commit.** ``(track_id, neighbor_track_id, rank, score, model_version)`` rows are
   upserted in one commit. Neighbours of every track are recomputed when any vector changed (a
   new track can become anyone's neighbour); when the vectors are those of the last completed
   run (same digest, same settings) nothing is searched or committed, so a re-run with nothing
   new makes no snapshot.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.config import Config
from deepcontent.datasets import vectors
from deepcontent.embed import ann
from deepcontent.embed.similarity import top_k_cosine
from deepcontent.errors import StageError
from deepcontent.manifest import log
from deepcontent.registry import model_registry, production_version
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.storage import join, safe_key

__all__ = ["STAGE", "NeighborsRecallError", "index_uri", "run", "search_all"]

STAGE = "neighbors"


class NeighborsRecallError(StageError):
    """The approximate index found too few of the true neighbours (``neighbors.min_recall``)."""


def index_uri(storage, model_version: str) -> str:
    """Where the exported index of ``model_version`` is published."""
    return storage.uri("indexes", safe_key(model_version.replace("/", "_")))


def search_all(unit: np.ndarray, *, k: int, method: str, params: dict, seed: int, recall_queries: int,
               min_recall: float | None = None, max_search_effort: int = 1, block_rows: int = 2048,
               query=None) -> tuple[np.ndarray, np.ndarray, dict, object]:
    """Every row's ``k`` nearest other rows, and how it was done.

    Parameters
    ----------
    unit : np.ndarray [shape=(n, d), dtype=float32]
        Unit-norm rows (:func:`deepcontent.embed.ann.unit_rows`).
    method : {"exact", "hnsw", "ivf"}
    params : dict
        The index parameters (:func:`deepcontent.embed.ann.default_params` and overrides).
    min_recall : float, optional
        The recall@k the search effort is raised towards (see ``max_search_effort``).
    max_search_effort : int >= 1
        How far the search effort (``ef_search`` / ``nprobe``) may be raised above ``params``':
        before the full search, the seeded sample is searched and, while its recall@k is below
        ``min_recall``, the effort doubles, up to this multiple. How hard a catalog's vectors are
        to index depends on the vectors (clustered ones are easy, near-uniform ones hard), so a
        fixed effort that suits one catalog fails another; searching 2,000 queries again costs
        little next to the build. 1 keeps ``params`` as given.
    query : callable, optional
        ``query(index, unit, k) -> (neighbors, scores)`` searching every row (the Ray fan-out);
        default: :func:`deepcontent.embed.ann.search_index` in this process.

    Returns
    -------
    neighbors : np.ndarray [shape=(n, min(k, n - 1)), dtype=int64]
        -1 where an approximate index returned fewer rows.
    scores : np.ndarray [shape=(n, min(k, n - 1)), dtype=float32]
    report : dict
        ``method``, ``params`` (those searched with), ``seconds`` per phase and, for an index,
        ``recall_at_k`` with ``recall_queries`` and ``effort_tries`` (the sample's recall at each
        effort tried).
    index : faiss.Index or None
    """
    if max_search_effort < 1:
        raise ValueError(f"max_search_effort must be at least 1, got {max_search_effort}")
    t0 = time.perf_counter()
    if method == "exact":
        idx, score = top_k_cosine(unit, k=k, block_rows=block_rows)
        return idx, score, {"method": "exact", "params": {}, "seconds": {"search": round(time.perf_counter() - t0, 3)}}, None
    params = dict(params)
    index = ann.build_index(unit, spec=ann.IndexSpec(method, params), seed=seed)
    t1 = time.perf_counter()
    sample = ann.sample_queries(unit.shape[0], size=recall_queries, seed=seed)
    truth = ann.exact_neighbors_of(unit, sample, k=k)
    t2 = time.perf_counter()
    key = ann.search_effort_key(method)
    ceiling, tries = int(params[key]) * int(max_search_effort), []
    while True:
        found, _ = ann.search_index(index, unit, sample, k=k)
        tries.append({key: int(params[key]), "recall_at_k": round(ann.recall_at_k(found, truth), 5)})
        if min_recall is None or tries[-1]["recall_at_k"] >= min_recall or params[key] >= ceiling:
            break
        raised = ann.set_search_effort(index, method=method, value=min(2 * int(params[key]), ceiling))
        if raised == params[key]:  # an IVF index already visits every cell
            break
        params[key] = raised
    t3 = time.perf_counter()
    if query is None:
        idx, score = ann.search_index(index, unit, slice(None), k=k)
    else:
        idx, score = query(index, unit, k)
    t4 = time.perf_counter()
    # The reported recall is that of the rows as they will be published (the full search).
    recall = ann.recall_at_k(idx[sample], truth)
    report = {"method": method, "params": params, "recall_at_k": round(recall, 5), "recall_queries": len(sample),
              "effort_tries": tries,
              "seconds": {"build": round(t1 - t0, 3), "recall": round(t2 - t1, 3), "tune": round(t3 - t2, 3),
                          "search": round(t4 - t3, 3)}}
    return idx, score, report, index


def _search_rows(index_bytes, unit: np.ndarray, start: int, stop: int, k: int, threads: int):
    """A Ray task's share: rows ``[start, stop)`` searched in the shared index."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    return ann.search_index(ann.index_from_bytes(index_bytes), unit, slice(start, stop), k=k)


def _ray_query(*, tasks: int, cpus: float):
    """A ``query`` for :func:`search_all` that fans the rows out over ``tasks`` Ray tasks."""
    import ray

    def query(index, unit, k):
        index_ref, unit_ref = ray.put(ann.index_to_bytes(index)), ray.put(unit)
        remote = ray.remote(num_cpus=cpus)(_search_rows)
        bounds = np.linspace(0, unit.shape[0], tasks + 1).astype(int)
        parts = ray.get([remote.remote(index_ref, unit_ref, int(a), int(b), k, int(cpus))
                         for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return query


def _similar_rows(track_ids: pa.ChunkedArray, idx: np.ndarray, score: np.ndarray, *, version: str,
                  owners: np.ndarray | None = None) -> pa.Table:
    """``similar_tracks`` rows from the neighbour matrix (Arrow takes, no Python lists); only the
    lists of ``owners`` (positions) when given."""
    if owners is not None:
        idx, score = idx[owners], score[owners]
    else:
        owners = np.arange(idx.shape[0], dtype=np.int64)
    n, kk = idx.shape
    found = idx.ravel() >= 0
    owner = np.repeat(owners, kk)[found]
    ids = track_ids.combine_chunks()
    return pa.table({
        "track_id": ids.take(pa.array(owner)),
        "neighbor_track_id": ids.take(pa.array(idx.ravel()[found])),
        "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), n)[found], pa.int32()),
        # Rounded so that a recomputation on the same vectors compares equal whatever the BLAS.
        "score": pa.array(np.round(score.ravel()[found], 6), pa.float32()),
        "model_version": pa.array(np.full(int(found.sum()), version, dtype=object), pa.string()),
    })


def _export_index(run: StageRun, index, rows: pa.Table, *, version: str, report: dict, meta: dict) -> str:
    """Publish the index, its row -> track map and its description under ``indexes/``.

    ``rows`` (``ids.parquet``) has one row per index id: ``row``, ``track_id``, ``alive`` (an
    updated index keeps the rows of changed and removed tracks in its graph: a serving system
    skips the dead ones) and ``vector_hash`` (what the next nightly compares against)."""
    storage = run.storage
    uri = index_uri(storage, version)
    staging = storage.staging_uri(uri, run.run_id)
    files = [join(staging, "index.faiss"), join(staging, "ids.parquet")]
    storage.write_bytes(files[0], ann.index_to_bytes(index).tobytes())
    storage.write_parquet(rows, files[1])
    run.storage.publish(uri, run_id=run.run_id, files=files, meta={
        "stage": STAGE, "model_version": version, "metric": "inner product of L2-normalised vectors (cosine)",
        "method": report["method"], "params": report["params"], "recall_at_k": report.get("recall_at_k"),
        "recall_queries": report.get("recall_queries"), **meta})
    return uri


def _index_rows(track_ids, alive: np.ndarray, hashes: np.ndarray) -> pa.Table:
    return pa.table({"row": pa.array(np.arange(len(alive), dtype=np.int64)), "track_id": track_ids,
                     "alive": pa.array(np.asarray(alive, bool)), "vector_hash": pa.array(np.asarray(hashes, np.uint64))})


def _build_params(params: dict, method: str) -> dict:
    """The parameters an index is built with (its search effort aside)."""
    key = ann.search_effort_key(method)
    return {k: v for k, v in params.items() if k != key}


def _update(run: StageRun, nc, *, version: str, emb: pa.Table, unit: np.ndarray, hashes: np.ndarray, method: str,
            params: dict, warehouse) -> tuple | None:
    """The incremental search (:mod:`deepcontent.embed.neighbor_update`) from the index the last
    run exported, or None (with the reason logged) where a full search is due. ``hashes``:
    :func:`~deepcontent.embed.ann.row_hashes` of ``unit``."""
    from pyiceberg.expressions import EqualTo

    from deepcontent.embed import neighbor_update as nu

    def full(reason: str) -> None:
        log.info("neighbors: full search (%s)", reason)
        return None

    uri = index_uri(run.storage, version)
    pointer = run.storage.published(uri)
    if pointer is None:
        return full("no exported index yet")
    if (pointer.get("method"), pointer.get("vector"), pointer.get("k")) != (method, nc.vector, nc.k) or \
            _build_params(pointer.get("params") or {}, method) != _build_params(params, method):
        return full("the index settings changed")
    files = run.storage.published_files(uri)
    rows = run.storage.read_parquet(next(f for f in files if f.endswith("ids.parquet")))
    if "vector_hash" not in rows.column_names:
        return full("the exported index predates incremental updates")
    n = unit.shape[0]
    track_ids = emb["track_id"].combine_chunks()
    alive = rows["alive"].to_numpy(zero_copy_only=False)
    plan = nu.plan_update(row_track_ids=rows["track_id"].combine_chunks(), row_alive=alive,
                          row_hashes=rows["vector_hash"].to_numpy(zero_copy_only=False), track_ids=track_ids,
                          hashes=hashes)
    churn = plan.churn / n
    if churn > nc.max_incremental_fraction:
        return full(f"{plan.churn} of {n} tracks added, changed or removed: over "
                    f"neighbors.max_incremental_fraction = {nc.max_incremental_fraction}")
    dead = len(plan.dead_rows) / (len(alive) + len(plan.add_pos))
    if dead > nc.rebuild_dead_fraction:
        return full(f"{dead:.1%} of the index's rows would be dead: over neighbors.rebuild_dead_fraction = "
                    f"{nc.rebuild_dead_fraction}")
    published = warehouse.read("similar_tracks", EqualTo("model_version", version),
                               columns=["track_id", "neighbor_track_id", "rank", "score"])
    owners = pc.unique(published["track_id"])
    alive_ids = pc.take(rows["track_id"], pa.array(np.flatnonzero(alive)))
    if len(owners) != len(alive_ids) or not pc.all(pc.is_in(alive_ids, value_set=owners)).as_py():
        # e.g. a run that committed its lists and died before exporting its index
        return full("the published lists and the exported index disagree")
    prev_neighbors, prev_scores = nu.previous_lists(published, track_ids, k=nc.k)
    del published
    index = ann.index_from_bytes(np.frombuffer(run.storage.read_bytes(next(f for f in files if f.endswith("index.faiss"))),
                                               dtype=np.uint8))
    index_params = dict(pointer["params"])  # with the search effort the last full run settled on
    t0 = time.perf_counter()
    idx, score, affected, pos_of_row, searched_again = nu.update_neighbors(
        index, unit=unit, plan=plan, prev_neighbors=prev_neighbors, prev_scores=prev_scores, k=nc.k,
        reverse_candidates=nc.reverse_candidates)
    t1 = time.perf_counter()
    sample = ann.sample_queries(n, size=nc.recall_queries, seed=nc.seed)
    recall = ann.recall_at_k(idx[sample], ann.exact_neighbors_of(unit, sample, k=nc.k))
    t2 = time.perf_counter()
    if recall < nc.min_recall:
        return full(f"the updated lists' recall@{nc.k} = {recall:.4f} is below neighbors.min_recall = {nc.min_recall}")
    report = {"method": method, "params": index_params, "recall_at_k": round(recall, 5), "recall_queries": len(sample),
              "incremental": {"changed": len(plan.changed_pos), "new": len(plan.add_pos) - len(plan.changed_pos),
                              "removed": len(plan.gone_rows), "lists_changed": len(affected),
                              "searched_again": searched_again,
                              "dead_rows": len(plan.dead_rows), "index_rows": int(index.ntotal)},
              "seconds": {"update": round(t1 - t0, 3), "recall": round(t2 - t1, 3)}}
    row_ids = pa.concat_arrays([rows["track_id"].combine_chunks(), pc.take(track_ids, pa.array(plan.add_pos))])
    state = _index_rows(row_ids, pos_of_row >= 0,
                        np.concatenate([rows["vector_hash"].to_numpy(zero_copy_only=False), hashes[plan.add_pos]]))
    log.info("neighbors: updated the last index: %d changed, %d new, %d removed tracks; %d lists updated "
             "(%d searched again)", report["incremental"]["changed"], report["incremental"]["new"],
             report["incremental"]["removed"], len(affected), searched_again)
    return idx, score, report, index, affected, state


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage for ``embed.model_version`` (default: production); see the module docstring."""
    import faiss
    from pyiceberg.expressions import EqualTo

    nc, warehouse = cfg.neighbors, ctx.warehouse
    version = cfg.embed.model_version or production_version(model_registry(cfg, ctx.storage))
    with StageRun(STAGE, cfg, ctx.storage) as run:
        warehouse.ensure_tables(["similar_tracks"])
        outputs = {"table": ".".join(warehouse.identifier("similar_tracks"))}
        with run.timed("read"):
            emb = warehouse.read("embeddings", EqualTo("model_version", version), columns=["track_id", nc.vector])
            emb = emb.sort_by("track_id")
        if emb.num_rows < 2:
            log.info("neighbors: %d embedded track(s) for %s; nothing to compare", emb.num_rows, version)
            return run.unchanged(outputs=outputs, counts={"tracks": emb.num_rows})
        unit = ann.unit_rows(vectors(emb[nc.vector]))
        n = unit.shape[0]
        method = ann.choose_method(n, exact_max_tracks=nc.exact_max_tracks, index=nc.index)
        params = {**ann.default_params(method, n=n, k=nc.k), **nc.index_params} if method != "exact" else {}
        # What this run would compute from: the vectors (and their order) and every setting.
        digest = hashlib.sha256(unit.tobytes())
        for chunk in emb["track_id"].chunks:
            digest.update(b"".join(b.to_pybytes() for b in chunk.buffers() if b is not None))
        settings = {"k": nc.k, "vector": nc.vector, "method": method, "params": params, "seed": nc.seed,
                    "min_recall": nc.min_recall, "max_search_effort": nc.max_search_effort, "export": nc.export_index and method != "exact"}
        fingerprint = f"{version}:{digest.hexdigest()}:{json.dumps(settings, sort_keys=True)}"
        run.manifest.inputs = {"model_version": version, "vector": nc.vector, "tracks": n}
        if run.previous(fingerprint, scope=safe_key(version.replace("/", "_")), warehouse=warehouse) is not None:
            log.info("neighbors: %d vectors of %s are those of the last completed run; nothing to do", n, version)
            return run.unchanged(outputs=outputs, counts={"tracks": n})

        log.info("neighbors: %d tracks × %d-d (%s), %s search%s", n, unit.shape[1], version, method,
                 f" ({nc.query_tasks} Ray tasks)" if method != "exact" and nc.query_tasks else "")
        updated = None
        hashes = ann.row_hashes(unit) if method != "exact" else None  # what the exported index records
        if method != "exact" and nc.incremental:
            with run.timed("update"):
                updated = _update(run, nc, version=version, emb=emb, unit=unit, hashes=hashes, method=method,
                                  params=params, warehouse=warehouse)
        if updated is not None:
            idx, score, report, index, owners, index_rows = updated
        else:
            query = None
            if method != "exact" and nc.query_tasks:
                ctx.ensure_ray()
                query = _ray_query(tasks=nc.query_tasks, cpus=nc.cpus_per_task)
            with run.timed("search"):
                idx, score, report, index = search_all(unit, k=nc.k, method=method, params=params, seed=nc.seed,
                                                       recall_queries=nc.recall_queries, min_recall=nc.min_recall,
                                                       max_search_effort=nc.max_search_effort,
                                                       block_rows=nc.block_rows, query=query)
            owners = None
            index_rows = _index_rows(emb["track_id"], np.ones(n, bool), hashes) if index is not None else None
        run.manifest.index = report  # in the manifest whether the run goes on or fails here
        if method != "exact":
            log.info("neighbors: %s recall@%d = %.4f on %d exact queries (min %.2f)", method, nc.k,
                     report["recall_at_k"], report["recall_queries"], nc.min_recall)
            if report["recall_at_k"] < nc.min_recall:
                key = ann.search_effort_key(method)
                raise NeighborsRecallError(
                    f"neighbors: the {method} index {report['params']} found recall@{nc.k} = {report['recall_at_k']:.4f} "
                    f"on {report['recall_queries']} seeded exact queries, below neighbors.min_recall = {nc.min_recall}, "
                    f"with {key} raised as far as neighbors.max_search_effort = {nc.max_search_effort} allows "
                    f"(tried {[t[key] for t in report['effort_tries']]}); nothing committed. Allow more effort "
                    f"(neighbors.max_search_effort), build a denser index (neighbors.index_params, e.g. m or nlist) "
                    f"or set neighbors.exact_max_tracks above {n}")
        rows = _similar_rows(emb["track_id"], idx, score, version=version, owners=owners)
        with run.timed("commit"):
            committed = run.committed("similar_tracks", warehouse.upsert("similar_tracks", rows, run_id=run.run_id))
        if index is not None and nc.export_index:
            with run.timed("export"):
                outputs["index"] = _export_index(run, index, index_rows, version=version, report=report,
                                                 meta={"tracks": n, "index_rows": int(index.ntotal), "dim": int(unit.shape[1]),
                                                       "k": nc.k, "vector": nc.vector, "faiss": faiss.__version__})
        counts = {"tracks": n, "k": idx.shape[1], "rows": rows.num_rows}
        log.info("neighbors: %s %d tracks × %d neighbours for %s", "committed" if committed else "unchanged:",
                 n, idx.shape[1], version)
        return run.succeed(counts=counts, outputs=outputs, published=committed or "index" in outputs,
                           fingerprint=fingerprint, scope=safe_key(version.replace("/", "_")), index=report)
