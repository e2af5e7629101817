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
from typing import Any, Callable

from deepcontent.config import Config
from deepcontent.manifest import RunManifest, log
from deepcontent.storage import Storage, new_run_id

__all__ = ["STAGE", "run_nightly"]

STAGE = "nightly"


def run_nightly(cfg: Config, storage: Storage, stages: dict[str, Callable[[], Any]]) -> dict:
    """Run the nightly stages in order and write the summary.

    Parameters
    ----------
    cfg : Config
    storage : Storage
    stages : dict of name -> zero-argument callable returning the stage's ``StageResult``
        The runner for every name in ``cfg.nightly.stages`` (the CLI binds them to one Spark
        session, Ray and warehouse).

    Returns
    -------
    summary : dict
        ``{"run_id", "model_version", "new", "changed", "quarantined", "published": [stages],
        "stages": {name: {"published", "counts", "quarantined", "seconds"}}, "seconds", "summary_uri"}``.
    """
    from deepcontent.embed.stage import production_version

    missing = [s for s in cfg.nightly.stages if s not in stages]
    if missing:
        raise ValueError(f"nightly: no runner for stage(s) {missing}; known: {sorted(stages)}")
    version = cfg.embed.model_version or production_version(storage)  # fail before any work
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("nightly", "embed", "neighbors"))
    t_start = time.perf_counter()
    per_stage: dict[str, dict] = {}
    status = "failed"
    try:
        for name in cfg.nightly.stages:
            log.info("nightly: %s …", name)
            t0 = time.perf_counter()
            with manifest.timed(name):
                result = stages[name]()
            per_stage[name] = {"published": bool(result.published), "counts": result.counts,
                               "quarantined": result.quarantined, "run_id": result.run_id,
                               "seconds": round(time.perf_counter() - t0, 2)}
        status = "succeeded"
    finally:
        emb = per_stage.get("embed", {}).get("counts", {})
        summary = {
            "run_id": run_id, "status": status, "model_version": version,
            "new": int(emb.get("new", 0)), "changed": int(emb.get("changed", 0)),
            "quarantined": {n: sum(s["quarantined"].values()) for n, s in per_stage.items() if s["quarantined"]},
            "published": [n for n, s in per_stage.items() if s["published"]],
            "stages": per_stage, "seconds": round(time.perf_counter() - t_start, 2),
        }
        manifest.counts = {"new": summary["new"], "changed": summary["changed"],
                           "published_stages": len(summary["published"])}
        manifest.summary = summary  # written with the manifest (every attribute goes to the JSON)
        summary["summary_uri"] = manifest.write(storage, status=status)
    log.info("nightly: %s — %d new, %d changed tracks; published: %s; %.1fs; summary %s", status, summary["new"],
             summary["changed"], ", ".join(summary["published"]) or "nothing", summary["seconds"], summary["summary_uri"])
    return summary
