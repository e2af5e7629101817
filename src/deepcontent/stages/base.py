"""What every stage shares: the context it runs in, the skeleton of a run, and its result.

:class:`StageContext`
    Owns the storage, the warehouse and the engines of one command. Spark, Ray and the Iceberg
    catalog start on first use and are shared by every stage the command runs (one Spark
    session for a whole pipeline); engines handed in by a caller (a test's session) are used
    and never stopped.
:class:`StageRun`
    One run of a stage: its run id and manifest, the records it rejects, the one quarantine
    threshold gate, publishing, and the manifest written last. Used as a context manager, a
    run that raises leaves a ``failed`` manifest naming the error.
:class:`StageResult`
    What ``run(cfg, ctx)`` returns, the same for every stage.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.errors import QuarantineExceeded
from deepcontent.faults import crash_point
from deepcontent.manifest import RunManifest, log
from deepcontent.storage import Storage, join, new_run_id

if TYPE_CHECKING:
    from deepcontent.config import Config
    from deepcontent.datasets import Dataset
    from deepcontent.warehouse import Warehouse

__all__ = ["QuarantineCheck", "StageContext", "StageResult", "StageRun"]


# ----------------------------------------------------------------------------- result
@dataclass
class StageResult:
    """What a stage run returns.

    Attributes
    ----------
    run_id : str
        This run's id, or the id of the run whose outputs are current when there was nothing to do.
    published : bool
        Whether the run published (or committed) anything.
    counts, quarantined : dict
        Row counts, and quarantined records per reason.
    outputs : dict
        Output name -> URI or table.
    manifest_uri : str or None
        The run manifest (None when there was nothing to do).
    details : dict
        What is particular to the stage (a train run's ``model_version`` and ``metrics``, the
        evaluation's ``cold_start`` table, ...); also readable as attributes
        (``result.model_version``) and merged into :meth:`to_dict`.
    """

    run_id: str
    published: bool
    counts: dict[str, Any] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    manifest_uri: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        details = self.__dict__.get("details") or {}
        if name in details:
            return details[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or detail {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "published": self.published, "counts": self.counts,
                "quarantined": self.quarantined, "outputs": self.outputs, "manifest": self.manifest_uri,
                **self.details}


# ----------------------------------------------------------------------------- context
class StageContext:
    """Storage, warehouse and engines for the stages of one command.

    Parameters
    ----------
    cfg : Config
        Where the warehouse, Spark and Ray are configured (a stage may run with a variant of it).
    storage : Storage
    spark, warehouse : optional
        Engines the caller owns (a test's Spark session); used as they are and never stopped.
    """

    def __init__(self, cfg: "Config", storage: Storage, *, spark=None, warehouse: "Warehouse | None" = None) -> None:
        self.cfg, self.storage = cfg, storage
        self._spark, self._owns_spark = spark, spark is None
        self._warehouse, self._owns_warehouse = warehouse, warehouse is None
        self._ray_started = False

    @classmethod
    @contextmanager
    def open(cls, cfg: "Config") -> Iterator["StageContext"]:
        """The configured storage (the embedded S3 server started when configured) and a
        context on it; every engine started inside is stopped on exit."""
        from deepcontent.engines.context import open_storage

        with open_storage(cfg) as storage:
            ctx = cls(cfg, storage)
            try:
                yield ctx
            finally:
                ctx.close()

    @property
    def spark(self):
        """The Spark session (built from ``spark`` config on first use)."""
        if self._spark is None:
            from deepcontent.engines.spark import spark_session

            self._spark = spark_session(self.cfg.spark)
        return self._spark

    @property
    def warehouse(self) -> "Warehouse":
        """The Iceberg warehouse (opened from ``warehouse`` config on first use)."""
        if self._warehouse is None:
            from deepcontent.warehouse import Warehouse

            self._warehouse = Warehouse.from_config(self.cfg.warehouse, self.storage)
        return self._warehouse

    def ensure_ray(self) -> None:
        """Join or start Ray once for the command (a session already running is kept)."""
        import ray

        if not ray.is_initialized():
            from deepcontent.engines.ray import init_ray

            init_ray(self.cfg.ray)
            self._ray_started = True

    def close(self) -> None:
        """Stop what this context started."""
        if self._owns_spark and self._spark is not None:
            self._spark.stop()
            self._spark = None
        if self._owns_warehouse and self._warehouse is not None:
            self._warehouse.close()
            self._warehouse = None
        if self._ray_started:
            from deepcontent.engines.ray import shutdown_ray

            shutdown_ray()
            self._ray_started = False


# ----------------------------------------------------------------------------- run
@dataclass(frozen=True)
class QuarantineCheck:
    """One input's share of rejected records, for :meth:`StageRun.check_quarantine`:
    ``rejected`` per reason out of ``total`` ``unit`` (``"records"``, ``"clips"``...); ``label``
    names the input in the message (``"plays"``), or nothing when a stage has one input."""

    rejected: Mapping[str, int]
    total: int
    unit: str = "records"
    label: str = ""

    @property
    def count(self) -> int:
        return int(sum(self.rejected.values()))

    def describe(self) -> str:
        reasons = ", ".join(f"{r} {c:,}" for r, c in sorted(self.rejected.items()))
        share = self.count / self.total if self.total else 0.0
        return f"{self.label + ': ' if self.label else ''}{self.count:,} of {self.total:,} {self.unit} ({share:.1%}: {reasons})"


class StageRun:
    """The skeleton of one stage run.

    >>> with StageRun("matrices", cfg, storage, sections=("matrices",)) as run:
    ...     with run.timed("plays"):
    ...         ...
    ...     run.check_quarantine([QuarantineCheck(reasons, n_plays)], limit=cfg.matrices.max_quarantine_fraction)
    ...     run.publish(datasets.SPLITS, [run.write_part(datasets.SPLITS, splits)])
    ...     return run.succeed(counts=..., quarantined=reasons, outputs=...)

    Parameters
    ----------
    stage : str
        The stage name (manifests go to ``runs/<stage>/<run_id>.json``, rejected records to
        ``quarantine/<stage>``).
    cfg : Config
    storage : Storage
    sections : tuple of str
        Config sections whose fingerprint the manifest records.
    """

    def __init__(self, stage: str, cfg: "Config", storage: Storage, *, sections: tuple[str, ...] = ()) -> None:
        self.stage, self.cfg, self.storage = stage, cfg, storage
        self.run_id = new_run_id(stage)
        self.manifest = RunManifest(stage, self.run_id, cfg.public_dict(), cfg.fingerprint(*(sections or (stage,))))
        self.quarantine_dataset = datasets.quarantine(stage)
        self._rejected: list[pa.Table] = []
        self._quarantine_files: list[str] = []
        self._generations: dict[str, int] = {}
        self._committed: list[str] = []
        self._closed = False
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._closed:
            from deepcontent.manifest import redact_text

            self.manifest.error = redact_text(f"{type(exc).__name__}: {exc}")[:2000]
            try:
                self.manifest.write(self.storage, status="failed")
            except Exception:  # the original error matters more than its record
                log.warning("%s: could not write the failed run's manifest", self.stage, exc_info=True)
            self._closed = True

    def timed(self, what: str):
        """Context manager adding the block's wall time to the manifest's ``timings_s``."""
        return self.manifest.timed(what)

    # ------------------------------------------------------------------ outputs
    def uri(self, dataset: "Dataset") -> str:
        return dataset.uri(self.storage)

    def part_uri(self, dataset: "Dataset", name: str = "part-00000.parquet") -> str:
        """Where this run stages a part of ``dataset`` (invisible until published)."""
        return join(dataset.staging(self.storage, self.run_id), name)

    def write_part(self, dataset: "Dataset", table: pa.Table, *, name: str = "part-00000.parquet", **parquet) -> str:
        """Stage ``table`` as one Parquet part of ``dataset`` (cast to its schema); returns its URI."""
        uri = self.part_uri(dataset, name)
        if dataset.schema is not None:
            table = table.select(dataset.schema.names).cast(dataset.schema)
        self.storage.write_parquet(table, uri, **parquet)
        return uri

    def plan_on(self, *datasets_: "Dataset") -> None:
        """Record the published generation of datasets this run is about to read and then
        publish a successor of (a cumulative index, copy-on-write shards): their publish is
        refused with :class:`~deepcontent.errors.PublishConflict` if another run published
        them in between, instead of silently dropping that run's rows."""
        for dataset in datasets_:
            self._generations[dataset.key] = self.storage.generation(self.uri(dataset))

    def publish(self, dataset: "Dataset", files: list[str], *, meta: Mapping[str, Any] | None = None,
                keep_versions: int = 2) -> dict:
        """Make ``files`` the published version of ``dataset`` (one pointer write; on top of
        the generation :meth:`plan_on` recorded, when it did)."""
        crash_point(f"{self.stage}:before_publish:{dataset.key}")
        pointer = self.storage.publish(self.uri(dataset), run_id=self.run_id, files=files,
                                       meta={"stage": self.stage, **(meta or {})}, keep_versions=keep_versions,
                                       expected_generation=self._generations.get(dataset.key))
        if dataset.key in self._generations:
            self._generations[dataset.key] = pointer["generation"]
        crash_point(f"{self.stage}:after_publish:{dataset.key}")
        return pointer

    def committed(self, table: str, changed: bool) -> bool:
        """Note a warehouse write's outcome (``changed``: it committed a snapshot tagged with
        this run); the completion marker lists the tables, so a later "nothing to do" can
        check the warehouse still holds the commit. Returns ``changed``."""
        if changed:
            self._committed.append(table)
            from deepcontent.warehouse import COMMITS

            # The Iceberg snapshot this run produced, and the metadata file an engine opens.
            if (self.run_id, table) in COMMITS:
                snapshots = dict(getattr(self.manifest, "snapshots", {}) or {})
                snapshots[table] = COMMITS[(self.run_id, table)]
                self.manifest.snapshots = snapshots
        crash_point(f"{self.stage}:after_commit:{table}")
        return changed

    # ------------------------------------------------------------------ completion
    def marker_uri(self, scope: str = "") -> str:
        return self.storage.uri("runs", self.stage, "_completed", f"{scope or self.stage}.json")

    def previous(self, fingerprint: str, *, scope: str = "", warehouse: "Warehouse | None" = None) -> dict | None:
        """The completion marker of the last run that finished on these inputs, or None.

        A stage is done only when its last output is committed; the marker is written after
        that (by :meth:`succeed` with ``fingerprint``). A run killed at any point before leaves
        the old marker (another fingerprint) or none, so its re-run does the work again. With
        ``warehouse``, the tables the marked run committed must still hold its snapshots."""
        uri = self.marker_uri(scope)
        if not self.storage.exists(uri):
            return None
        try:
            marker = self.storage.read_json(uri)
        except Exception:  # noqa: BLE001 - an unreadable marker means "not done"
            return None
        if marker.get("fingerprint") != fingerprint:
            return None
        if warehouse is not None:
            for table in marker.get("committed_tables", []):
                if not warehouse.has_run(table, marker["run_id"]):
                    log.warning("%s: run %s finished on these inputs but table %s lacks its commit; running again",
                                self.stage, marker["run_id"], table)
                    return None
        return marker

    # ------------------------------------------------------------------ quarantine
    def reject(self, rejected: pa.Table) -> None:
        """Add ``(source, reason, detail)`` rows the driver rejected to this run's quarantine."""
        if rejected.num_rows:
            self._rejected.append(rejected.select(["source", "reason", "detail"]))

    def add_quarantine_files(self, files: Iterable[str]) -> None:
        """Quarantine parts that tasks wrote (:data:`~deepcontent.datasets.QUARANTINE_SCHEMA`)."""
        self._quarantine_files.extend(f for f in files if f)

    def quarantine_files(self) -> list[str]:
        """Every quarantine part of the run: the driver's rejects (written once, possibly empty,
        so the published quarantine always says what this run rejected) and the tasks' parts."""
        driver = self.part_uri(self.quarantine_dataset, "part-driver.parquet")
        if driver not in self._quarantine_files and (self._rejected or not self._quarantine_files):
            rows = (pa.concat_tables(self._rejected) if self._rejected
                    else datasets.REJECTED_SCHEMA.empty_table())
            self.storage.write_parquet(datasets.quarantine_table(rows, stage=self.stage, run_id=self.run_id), driver)
            self._quarantine_files.insert(0, driver)
        return list(self._quarantine_files)

    def check_quarantine(self, checks: Iterable[QuarantineCheck], *, limit: float) -> None:
        """The one threshold gate: when any input's rejected share exceeds ``limit``, publish
        the quarantine (and nothing else), write a ``failed`` manifest and raise
        :class:`~deepcontent.errors.QuarantineExceeded` with the counts per reason and where
        the quarantine is."""
        over = [c for c in checks if c.total and c.count / c.total > limit]
        if not over:
            return
        q_uri = self.uri(self.quarantine_dataset)
        self.publish(self.quarantine_dataset, self.quarantine_files(), meta={"failed": True})
        self.manifest.outputs = {self.quarantine_dataset.key: q_uri}
        self.manifest.quarantined = dict(sum((Counter(c.rejected) for c in over), Counter()))
        uri = self.manifest.write(self.storage, status="failed")
        self._closed = True
        raise QuarantineExceeded(
            f"{self.stage} quarantined more than {limit:.1%} of its input ({'; '.join(c.describe() for c in over)}); "
            f"nothing was published except the quarantine at {q_uri} (manifest {uri})")

    def publish_quarantine(self, *, meta: Mapping[str, Any] | None = None) -> str:
        """Publish this run's quarantine as ``quarantine/<stage>``; returns its URI."""
        self.publish(self.quarantine_dataset, self.quarantine_files(), meta=meta)
        return self.uri(self.quarantine_dataset)

    def commit_quarantine(self, warehouse: "Warehouse") -> bool:
        """Append this run's rejected records to the ``quarantine`` table (one commit tagged with
        the run id, nothing when the run rejected nothing), so downstream teams query every
        stage's rejects in one table. Call after :meth:`publish_quarantine`; returns whether it
        committed.

        Only rows whose ``run_id`` is this run's go in: a stage whose quarantine dataset carries
        earlier runs' rejects forward (spectrograms keeps every track whose current audio failed)
        adds each reject once, in the run that saw it. Idempotent per run id."""
        files = [f for f in self._quarantine_files if self.storage.exists(f)]
        rows = self.storage.read_parquet(files) if files else datasets.QUARANTINE_SCHEMA.empty_table()
        rows = rows.filter(pc.equal(rows["run_id"], self.run_id))
        if rows.num_rows == 0:
            return False
        warehouse.ensure_tables(["quarantine"])
        return self.committed("quarantine", warehouse.append("quarantine", rows, run_id=self.run_id))

    # ------------------------------------------------------------------ endings
    def succeed(self, *, counts: Mapping[str, Any] | None = None, quarantined: Mapping[str, int] | None = None,
                outputs: Mapping[str, str] | None = None, published: bool = True,
                record: Mapping[str, Any] | None = None, fingerprint: str | None = None, scope: str = "",
                **details: Any) -> StageResult:
        """Write the manifest (status ``succeeded``) and, with ``fingerprint``, the completion
        marker (last of all), and return the result. ``details`` go to the result and,
        JSON-able as they are, into the manifest; ``record`` only into the manifest (a training
        curve)."""
        if counts is not None:
            self.manifest.counts = dict(counts)
        if quarantined is not None:
            self.manifest.quarantined = dict(quarantined)
        if outputs is not None:
            self.manifest.outputs = dict(outputs)
        for key, value in {**details, **(record or {})}.items():
            setattr(self.manifest, key, value)  # RunManifest.to_dict writes every attribute
        uri = self.manifest.write(self.storage, status="succeeded")
        if fingerprint is not None:
            crash_point(f"{self.stage}:before_marker")
            self.storage.write_json(self.marker_uri(scope), {
                "run_id": self.run_id, "fingerprint": fingerprint, "manifest": uri,
                "committed_tables": sorted(set(self._committed)), "outputs": dict(self.manifest.outputs)})
        self._closed = True
        log.info("%s: run %s done in %.1fs; manifest %s", self.stage, self.run_id, time.perf_counter() - self.t0, uri)
        return StageResult(self.run_id, published, dict(self.manifest.counts), dict(self.manifest.quarantined),
                           dict(self.manifest.outputs), uri, dict(details))

    def unchanged(self, current_run_id: str | None = None, *, outputs: Mapping[str, str] | None = None,
                  counts: Mapping[str, Any] | None = None, **details: Any) -> StageResult:
        """Nothing to do: no manifest, no write; the result names the run whose outputs are
        current (this run's id when none is)."""
        self._closed = True
        return StageResult(current_run_id or self.run_id, False, dict(counts or {}), {}, dict(outputs or {}), None,
                           dict(details))
