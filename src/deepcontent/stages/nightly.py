"""The ``nightly`` job: re-embed what is new or changed in the catalog, and publish.

It runs ``nightly.stages`` (by default ingest -> spectrograms -> embed -> neighbors) with the
production model. Each of those stages is incremental on its own, which is what makes the job
safe to re-run after any failure:

* ingest publishes nothing when its raw inputs are unchanged;
* spectrograms decode only tracks whose audio object is new or changed (and a changed object
  whose content hash is the same is not decoded again);
* embed embeds only (track, audio SHA-256) pairs that have no row for the production model, so
  a track is re-embedded exactly when its audio content changed;
* neighbors recomputes the top-k lists and commits only if a row differs.

So a second run right after a successful one publishes nothing and makes no table snapshot. The
job writes a summary to ``runs/nightly/<run_id>.json``: tracks new / changed / quarantined, what
each stage published, and durations.
"""

from __future__ import annotations

import time

from deepcontent.config import Config
from deepcontent.manifest import log
from deepcontent.registry import model_registry, production_version
from deepcontent.stages.base import StageContext, StageResult, StageRun

__all__ = ["STAGE", "run"]

STAGE = "nightly"


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run ``nightly.stages`` in order on ``ctx`` (one Spark session, Ray and warehouse for all)
    and write the summary.

    Returns
    -------
    StageResult
        Whose details hold the summary: ``run_id``, ``status``, ``model_version``, ``new``,
        ``changed``, ``quarantined`` (per stage), ``published`` (stage names), ``stages``
        (``{name: {"published", "counts", "quarantined", "run_id", "seconds"}}``), ``seconds``
        and ``summary_uri`` (the manifest).
    """
    from deepcontent.stages import run_stage

    version = cfg.embed.model_version or production_version(model_registry(cfg, ctx.storage))  # fail before any work
    t_start = time.perf_counter()
    per_stage: dict[str, dict] = {}
    status = "failed"
    with StageRun(STAGE, cfg, ctx.storage, sections=("nightly", "embed", "neighbors")) as run:
        try:
            for name in cfg.nightly.stages:
                log.info("nightly: %s …", name)
                t0 = time.perf_counter()
                with run.timed(name):
                    result = run_stage(name, cfg, ctx)
                per_stage[name] = {"published": bool(result.published), "counts": result.counts,
                                   "quarantined": result.quarantined, "run_id": result.run_id,
                                   "seconds": round(time.perf_counter() - t0, 2)}
            status = "succeeded"
        finally:
            emb = per_stage.get("embed", {}).get("counts", {})
            summary = {
                "run_id": run.run_id, "status": status, "model_version": version,
                "new": int(emb.get("new", 0)), "changed": int(emb.get("changed", 0)),
                "quarantined": {n: sum(s["quarantined"].values()) for n, s in per_stage.items() if s["quarantined"]},
                "published": [n for n, s in per_stage.items() if s["published"]],
                "stages": per_stage, "seconds": round(time.perf_counter() - t_start, 2),
            }
            counts = {"new": summary["new"], "changed": summary["changed"], "published_stages": len(summary["published"])}
            if status != "succeeded":  # the summary of what ran goes into the failed manifest too
                run.manifest.summary = summary
        summary["summary_uri"] = run.storage.uri("runs", STAGE, f"{run.run_id}.json")
        result = run.succeed(counts=counts, published=bool(summary["published"]), record={"summary": summary})
        result.details.update(summary)  # the CLI prints the summary: its "published" lists the stages
    log.info("nightly: %s — %d new, %d changed tracks; published: %s; %.1fs; summary %s", status, summary["new"],
             summary["changed"], ", ".join(summary["published"]) or "nothing", summary["seconds"], summary["summary_uri"])
    return result
