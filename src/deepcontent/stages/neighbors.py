"""Stage ``neighbors``: top-k cosine neighbours per track -> the ``similar_tracks`` table.

It reads one model version's vectors from the ``embeddings`` table (``neighbors.vector``: the
predicted factors by default, the listening-behaviour space the papers' neighbour tables use),
searches them with :func:`deepcontent.embed.similarity.top_k_cosine` and upserts
``(track_id, neighbor_track_id, rank, score, model_version)`` rows in one commit. Neighbours of
every track are recomputed (a new track can become anyone's neighbour), but the upsert commits
nothing when no row changed, so a re-run with nothing new makes no snapshot.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from deepcontent.config import Config
from deepcontent.datasets import vectors
from deepcontent.embed.similarity import top_k_cosine
from deepcontent.manifest import log
from deepcontent.registry import model_registry, production_version
from deepcontent.stages.base import StageContext, StageResult, StageRun

__all__ = ["STAGE", "run"]

STAGE = "neighbors"


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage for ``embed.model_version`` (default: production); see the module docstring."""
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
        with run.timed("search"):
            idx, score = top_k_cosine(vectors(emb[nc.vector]), k=nc.k, block_rows=nc.block_rows)
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
        with run.timed("commit"):
            committed = run.committed("similar_tracks", warehouse.upsert("similar_tracks", rows, run_id=run.run_id))
        counts = {"tracks": n, "k": kk, "rows": rows.num_rows}
        run.manifest.inputs = {"model_version": version, "vector": nc.vector}
        if not committed:
            log.info("neighbors: %d tracks × %d neighbours unchanged for %s; nothing committed", n, kk, version)
            return run.unchanged(outputs=outputs, counts=counts)
        log.info("neighbors: committed %d tracks × %d neighbours for %s", n, kk, version)
        return run.succeed(counts=counts, outputs=outputs)
