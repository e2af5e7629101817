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

**Where the stages run.** Spark stages run in this process (its Spark session). Ray stages
(embed, neighbors, maintain) run here too when Ray is local (no ``ray.address``) or this process
is on the Ray cluster already (``auto``); with a cluster's address (``http://head:8265``, or a
``ray://`` one, which maps to the same head's dashboard) each goes to that cluster as a **Ray
job** through the Jobs API, shipping this process's deepcontent package and the run's config,
and the nightly waits for it (:func:`deepcontent.submit.run_ray_stage_job`). The nightly never
connects as a Ray Client. On Kubernetes the scheduled nightly is the Airflow DAG in
infra/airflow, one task per stage.
"""

from __future__ import annotations

import time

from deepcontent.config import Config
from deepcontent.manifest import log
from deepcontent.registry import model_registry, production_version
from deepcontent.stages.base import StageContext, StageResult, StageRun

#: ``ray.address`` values that mean Ray runs in or beside this process (no job submission).
IN_PROCESS_RAY = (None, "", "auto", "local")

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
        (``{name: {"published", "counts", "quarantined", "run_id", "manifest", "seconds"}}``), ``seconds``
        and ``summary_uri`` (the manifest).
    """
    from deepcontent.stages import STAGES, run_stage

    jobs_address = None if cfg.ray.address in IN_PROCESS_RAY else cfg.ray.address
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
                    if jobs_address and STAGES[name].engine == "ray":
                        result = _run_as_ray_job(name, cfg, jobs_address)
                    else:
                        result = run_stage(name, cfg, ctx)
                per_stage[name] = {"published": bool(result.published), "counts": result.counts,
                                   "quarantined": result.quarantined, "run_id": result.run_id,
                                   "manifest": result.manifest_uri, "seconds": round(time.perf_counter() - t0, 2)}
                if result.details.get("ray_job_id"):
                    per_stage[name]["ray_job_id"] = result.details["ray_job_id"]
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


def _run_as_ray_job(name: str, cfg: Config, address: str) -> StageResult:
    """Stage ``name`` as a Ray job on the cluster at ``address`` (Jobs API), as a StageResult."""
    from deepcontent.submit import run_ray_stage_job

    out = run_ray_stage_job(name, cfg, address=address, log=log)
    return StageResult(run_id=out["run_id"], published=bool(out.get("published")), counts=out.get("counts") or {},
                       quarantined=out.get("quarantined") or {}, outputs=out.get("outputs") or {},
                       manifest_uri=out.get("manifest"), details={"ray_job_id": out["ray_job_id"]})
