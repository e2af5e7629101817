"""Stage ``maintain``: keep the Iceberg tables fast to read as nightly upserts pile up.

Upserts are merge-on-read (:mod:`deepcontent.table_merge`): each nightly adds a few small data
files and position-delete files per partition, and one snapshot per table. For every warehouse
table that exists (``maintain.tables``, default all), this stage

1. **compacts** each partition whose position deletes mask ``maintain.min_deleted_fraction`` of
   its rows, or that holds ``maintain.min_files`` or more data files, into fresh data files with the deletes applied (one snapshot per table, tagged with the
   run id; the rows are unchanged);
2. **expires** snapshots older than ``maintain.older_than_hours`` beyond the last
   ``maintain.retain_last`` (time travel to them ends; their unreferenced files become orphans
   that the object store's lifecycle rules or Iceberg's orphan-file removal reclaim).

A table that needs neither gets no commit, so a re-run right after does nothing. The manifest
records, per table, what was compacted and expired and the snapshot id it produced.
"""

from __future__ import annotations

from deepcontent.config import Config
from deepcontent.manifest import log
from deepcontent.stages.base import StageContext, StageResult, StageRun

__all__ = ["STAGE", "run"]

STAGE = "maintain"


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Compact and expire every configured table; see the module docstring."""
    from deepcontent.warehouse import TABLE_NAMES

    mc, warehouse = cfg.maintain, ctx.warehouse
    names = list(mc.tables or TABLE_NAMES)
    with StageRun(STAGE, cfg, ctx.storage) as run:
        report, changed = {}, False
        for name in names:
            if not warehouse.catalog.table_exists(warehouse.identifier(name)):
                continue
            with run.timed(name):
                out = warehouse.maintain(name, run_id=run.run_id, older_than_s=mc.older_than_hours * 3600,
                                         retain_last=mc.retain_last, min_files=mc.min_files,
                                         min_deleted_fraction=mc.min_deleted_fraction)
            report[name] = out
            if out["partitions"]:
                run.committed(name, True)
            changed = changed or bool(out["partitions"] or out["snapshots_expired"])
            if out["partitions"] or out["snapshots_expired"]:
                log.info("maintain: %s — %d partition(s) compacted (%d files, %d delete files folded), "
                         "%d snapshot(s) expired", name, out["partitions"], out["files_removed"],
                         out["delete_files_removed"], out["snapshots_expired"])
        counts = {k: sum(r[k] for r in report.values())
                  for k in ("partitions", "files_removed", "delete_files_removed", "snapshots_expired")}
        if not changed:
            log.info("maintain: %d table(s) need no compaction or expiry", len(report))
            return run.unchanged(counts=counts, tables=report)
        return run.succeed(counts=counts, published=bool(counts["partitions"]), tables=report)
