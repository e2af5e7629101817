"""Merge-on-read upserts for the Iceberg tables: cost in the change, not in the table.

A copy-on-write upsert rewrites every data file that holds a changed key; with a nightly's
changes spread over the whole catalog that is every file, so its cost (and the driver's memory)
grows with the table. Here an upsert instead:

1. reads only the key columns and the columns that decide "changed" (``change_columns`` of the
   table declaration; the ``audio_sha256`` of an embedding, not its vectors) of the data files
   in the partitions the incoming keys fall in, with each row's file and position
   (:func:`stored_keys`), skipping rows earlier position deletes removed;
2. decides per incoming row: new, changed (the stored copy differs, or the key is stored more
   than once) or the same (:func:`plan_merge`, pure Arrow/numpy);
3. writes the new and changed rows as new data files, and the stored copies of the changed keys
   as Iceberg *position deletes* (one small delete file per data file touched; a data file
   whose every live row goes is dropped instead), committed in one snapshot
   (:class:`MergeOnReadCommit`).

Every Iceberg reader (pyiceberg, Spark, Trino, DuckDB) applies position deletes; ``deepcontent
maintain`` compacts partitions that gathered delete files or small files back into clean data
files (:func:`compact_partitions`).
"""

from __future__ import annotations

import io
import itertools
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
    FileFormat,
    ManifestContent,
    ManifestEntry,
    ManifestEntryStatus,
    ManifestWriterV2,
)
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _OverwriteFiles

if TYPE_CHECKING:
    from pyiceberg.table import Table, Transaction

__all__ = ["MergePlan", "MergeOnReadCommit", "compact_partitions", "partition_values", "plan_merge", "stored_keys"]

#: Iceberg's reserved field ids of a position-delete file's columns.
PATH_FIELD_ID, POS_FIELD_ID = 2147483546, 2147483545
DELETE_SCHEMA = pa.schema([
    pa.field("file_path", pa.string(), nullable=False, metadata={b"PARQUET:field_id": str(PATH_FIELD_ID).encode()}),
    pa.field("pos", pa.int64(), nullable=False, metadata={b"PARQUET:field_id": str(POS_FIELD_ID).encode()}),
])
_FILE, _POS, _SRC, _DST = "__file", "__pos", "__src", "__dst"


# ----------------------------------------------------------------------------- planning (pure)
@dataclass
class MergePlan:
    """What an upsert writes.

    Attributes
    ----------
    write : np.ndarray [shape=(n_incoming,), dtype=bool]
        Incoming rows to write (new or changed).
    delete_file, delete_pos : np.ndarray [shape=(n_deletes,)]
        Stored rows to delete: index into the stored files, row position in that file.
    n_new, n_changed : int
    """

    write: np.ndarray
    delete_file: np.ndarray
    delete_pos: np.ndarray
    n_new: int
    n_changed: int

    @property
    def empty(self) -> bool:
        return not self.write.any() and not len(self.delete_pos)


def _equal(x: pa.ChunkedArray, y: pa.ChunkedArray) -> np.ndarray:
    from deepcontent.warehouse import _column_equal  # the one row-equality rule of the warehouse

    return _column_equal(x, y)


def plan_merge(incoming: pa.Table, stored: pa.Table, *, keys: Sequence[str], compare: Sequence[str]) -> MergePlan:
    """Which incoming rows to write and which stored rows to delete.

    Parameters
    ----------
    incoming : pa.Table
        ``keys`` + ``compare`` columns of the rows to upsert (keys unique).
    stored : pa.Table
        The same columns of the stored rows, plus ``__file`` (int32) and ``__pos`` (int64).
    keys, compare : sequence of str
        Key columns; columns whose difference makes a row "changed".

    Returns
    -------
    MergePlan
        A stored key that appears more than once counts as changed, so every copy is deleted
        and one row written.
    """
    n = incoming.num_rows
    # Parquet reads give string where the table's Arrow schema says large_string: align types.
    stored = pa.table({c: stored[c].cast(incoming[c].type) if c in incoming.column_names else stored[c]
                       for c in stored.column_names})
    # A hash probe on the most selective key column first: a nightly's 10k keys against a
    # million stored rows leaves ~10k candidates for the exact multi-column join (the join of
    # everything would build on the million).
    probe = max(keys, key=lambda k: len(pc.unique(incoming[k])))
    stored = stored.filter(pc.is_in(stored[probe], value_set=pc.unique(incoming[probe])))
    src = incoming.select(list(keys)).append_column(_SRC, pa.array(np.arange(n, dtype=np.int64)))
    dst = stored.select(list(keys)).append_column(_DST, pa.array(np.arange(stored.num_rows, dtype=np.int64)))
    matched = src.join(dst, keys=list(keys), join_type="inner")
    src_idx = np.asarray(matched[_SRC].to_numpy(), dtype=np.int64)
    dst_idx = np.asarray(matched[_DST].to_numpy(), dtype=np.int64)
    same = np.ones(len(src_idx), dtype=bool)
    if len(src_idx):
        a, b = incoming.take(pa.array(src_idx)), stored.take(pa.array(dst_idx))
        for col in compare:
            same &= _equal(a[col], b[col])
    changed = np.zeros(n, dtype=bool)
    changed[src_idx[~same]] = True
    changed[np.bincount(src_idx, minlength=n) > 1] = True
    is_new = np.ones(n, dtype=bool)
    is_new[src_idx] = False
    gone = dst_idx[changed[src_idx]]
    files = np.asarray(stored[_FILE].to_numpy(), dtype=np.int32)[gone] if len(gone) else np.zeros(0, np.int32)
    pos = np.asarray(stored[_POS].to_numpy(), dtype=np.int64)[gone] if len(gone) else np.zeros(0, np.int64)
    return MergePlan(write=is_new | changed, delete_file=files, delete_pos=pos, n_new=int(is_new.sum()),
                     n_changed=int(changed.sum()))


# ----------------------------------------------------------------------------- reading the stored keys
def partition_values(tbl: "Table", data: pa.Table) -> set[tuple] | None:
    """The partition tuples (current spec) the rows of ``data`` fall in; None when the table
    is unpartitioned (every file may hold any key)."""
    spec, schema = tbl.spec(), tbl.schema()
    if spec.is_unpartitioned():
        return None
    cols = []
    for f in spec.fields:
        source = schema.find_field(f.source_id)
        cols.append(f.transform.pyarrow_transform(source.field_type)(data[source.name].combine_chunks()).to_pylist())
    return set(zip(*cols))


def _live_positions(tbl: "Table", task, n_rows: int) -> np.ndarray:
    """Row positions of the task's data file that no position delete removed."""
    alive = np.ones(n_rows, dtype=bool)
    path = task.file.file_path
    for d in task.delete_files:
        with tbl.io.new_input(d.file_path).open() as f:
            t = pq.read_table(f, columns=["file_path", "pos"])
        mine = t.filter(pc.equal(t["file_path"], path))["pos"].to_numpy()
        alive[mine[mine < n_rows]] = False
    return np.flatnonzero(alive)


def stored_keys(tbl: "Table", *, columns: Sequence[str], partitions: set[tuple] | None,
                row_filter=None, threads: int = 4) -> tuple[pa.Table, list]:
    """The live rows' ``columns`` of the data files in ``partitions`` (all files when None),
    with ``__file`` / ``__pos``, and the scan tasks (``__file`` indexes them).

    Only these columns are read (Parquet projection), so an embeddings table's vectors never
    leave storage. ``row_filter`` prunes manifests and files (e.g. one model version); files
    are read ``threads`` at a time.
    """
    from pyiceberg.expressions import AlwaysTrue

    spec_id = tbl.spec().spec_id
    tasks = list(tbl.scan(row_filter=row_filter if row_filter is not None else AlwaysTrue()).plan_files())
    if partitions is not None:
        # Files of an older (e.g. unpartitioned) spec may hold any key: always read.
        tasks = [t for t in tasks if t.file.spec_id != spec_id or tuple(t.file.partition) in partitions]

    def read(i: int) -> pa.Table:
        task = tasks[i]
        with tbl.io.new_input(task.file.file_path).open() as f:
            t = pq.read_table(f, columns=list(columns))
        live = _live_positions(tbl, task, t.num_rows) if task.delete_files else None
        pos = np.arange(t.num_rows, dtype=np.int64) if live is None else live.astype(np.int64)
        if live is not None:
            t = t.take(pa.array(live))
        return t.append_column(_FILE, pa.array(np.full(t.num_rows, i, np.int32))).append_column(_POS, pa.array(pos))

    if not tasks:
        from pyiceberg.io.pyarrow import schema_to_pyarrow

        empty = schema_to_pyarrow(tbl.schema(), include_field_ids=False).empty_table().select(list(columns))
        return empty.append_column(_FILE, pa.array([], pa.int32())).append_column(_POS, pa.array([], pa.int64())), tasks
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        parts = list(pool.map(read, range(len(tasks))))
    return pa.concat_tables(parts, promote_options="permissive").combine_chunks(), tasks


# ----------------------------------------------------------------------------- committing
class _PositionDeleteManifestWriter(ManifestWriterV2):
    """A v2 manifest listing position-delete files (pyiceberg writes only data manifests)."""

    def content(self) -> ManifestContent:
        return ManifestContent.DELETES

    @property
    def _meta(self) -> dict[str, str]:
        return {**super()._meta, "content": "deletes"}


def _delete_target(delete_file: DataFile) -> str | None:
    lower, upper = delete_file.lower_bounds or {}, delete_file.upper_bounds or {}
    lo, hi = lower.get(PATH_FIELD_ID), upper.get(PATH_FIELD_ID)
    return lo.decode() if lo is not None and lo == hi else None


class MergeOnReadCommit(_OverwriteFiles):
    """One snapshot that adds data files and position-delete files and drops data files.

    pyiceberg's overwrite producer handles added and dropped data files; this adds a manifest of
    position-delete files, drops delete files whose data file is gone, and counts the deletes
    in the snapshot summary. Use as ``with MergeOnReadCommit.of(tx, properties) as c: ...``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._added_delete_files: list[DataFile] = []
        self._dropped_delete_paths: set[str] = set()

    @classmethod
    def of(cls, tx: "Transaction", snapshot_properties: dict[str, str]) -> "MergeOnReadCommit":
        has_snapshot = tx.table_metadata.current_snapshot() is not None
        return cls(operation=Operation.OVERWRITE if has_snapshot else Operation.APPEND, transaction=tx,
                   io=tx._table.io, snapshot_properties=snapshot_properties)

    def add_delete_file(self, delete_file: DataFile) -> "MergeOnReadCommit":
        self._added_delete_files.append(delete_file)
        return self

    def drop_delete_file(self, path: str) -> "MergeOnReadCommit":
        """Forget a delete file (its rows were compacted away)."""
        self._dropped_delete_paths.add(path)
        return self

    def _existing_manifests(self):
        snapshot = self._transaction.table_metadata.snapshot_by_name(name=self._target_branch)
        if snapshot is None:
            return []
        gone = {f.file_path for f in self._deleted_data_files}
        out = []
        for manifest in snapshot.manifests(io=self._io):
            if not gone and not self._dropped_delete_paths:
                out.append(manifest)
                continue
            entries = manifest.fetch_manifest_entry(io=self._io, discard_deleted=True)
            if manifest.content == ManifestContent.DATA:
                keep = [e for e in entries if e.data_file.file_path not in gone]
            else:
                keep = [e for e in entries if e.data_file.file_path not in self._dropped_delete_paths
                        and _delete_target(e.data_file) not in gone]
            if len(keep) == len(entries):
                out.append(manifest)
            elif keep:
                spec = self.spec(manifest.partition_spec_id)
                writer = (self.new_manifest_writer(spec) if manifest.content == ManifestContent.DATA
                          else self._delete_writer(spec))
                with writer:
                    for e in keep:
                        writer.add_entry(ManifestEntry.from_args(
                            status=ManifestEntryStatus.EXISTING, snapshot_id=e.snapshot_id,
                            sequence_number=e.sequence_number, file_sequence_number=e.file_sequence_number,
                            data_file=e.data_file))
                out.append(writer.to_manifest_file())
        return out

    def _delete_writer(self, spec) -> _PositionDeleteManifestWriter:
        return _PositionDeleteManifestWriter(spec=spec, schema=self.schema(), output_file=self.new_manifest_output(),
                                             snapshot_id=self._snapshot_id, avro_compression=self._compression)

    def _manifests(self):
        manifests = super()._manifests()
        by_spec: dict[int, list[DataFile]] = {}
        for f in self._added_delete_files:
            by_spec.setdefault(f.spec_id or 0, []).append(f)
        for spec_id, files in by_spec.items():
            writer = self._delete_writer(self.spec(spec_id))
            with writer:
                for f in files:
                    writer.add(ManifestEntry.from_args(status=ManifestEntryStatus.ADDED, snapshot_id=self._snapshot_id,
                                                       sequence_number=None, file_sequence_number=None, data_file=f))
            manifests.append(writer.to_manifest_file())
        return manifests

    def _summary(self, snapshot_properties=None):
        # The summary collector counts position-delete files among the added files by content.
        saved = self._added_data_files
        self._added_data_files = saved + self._added_delete_files
        try:
            return super()._summary(snapshot_properties or {})
        finally:
            self._added_data_files = saved


def write_position_deletes(tbl: "Table", data_file: DataFile, positions: np.ndarray) -> DataFile:
    """A position-delete file removing ``positions`` of ``data_file`` (one file per data file,
    its path as both bounds so readers match it to that file only)."""
    positions = np.unique(np.asarray(positions, dtype=np.int64))
    table = pa.table({"file_path": pa.array(np.full(len(positions), data_file.file_path, dtype=object), pa.string()),
                      "pos": pa.array(positions)}, schema=DELETE_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    path = f"{tbl.location().rstrip('/')}/data/deletes/{uuid.uuid4()}-deletes.parquet"
    with tbl.io.new_output(path).create(overwrite=True) as f:
        f.write(buf.getvalue())
    bound = data_file.file_path.encode()
    out = DataFile.from_args(
        content=DataFileContent.POSITION_DELETES, file_path=path, file_format=FileFormat.PARQUET,
        partition=data_file.partition, record_count=len(positions), file_size_in_bytes=buf.tell(),
        lower_bounds={PATH_FIELD_ID: bound, POS_FIELD_ID: int(positions[0]).to_bytes(8, "little", signed=True)},
        upper_bounds={PATH_FIELD_ID: bound, POS_FIELD_ID: int(positions[-1]).to_bytes(8, "little", signed=True)})
    out.spec_id = data_file.spec_id  # not a field of the struct: set as pyiceberg's readers do
    return out


def write_data_files(tx: "Transaction", commit: MergeOnReadCommit, parts: Iterable[pa.Table]) -> int:
    """Write ``parts`` as data files of the transaction's table (partitioned and sized by
    pyiceberg) and add them to ``commit``; returns the rows written."""
    from pyiceberg.io.pyarrow import _dataframe_to_data_files

    counter, rows = itertools.count(0), 0
    for part in parts:
        if part.num_rows == 0:
            continue
        for f in _dataframe_to_data_files(table_metadata=tx.table_metadata, df=part, io=tx._table.io,
                                          write_uuid=commit.commit_uuid, counter=counter):
            commit.append_data_file(f)
        rows += part.num_rows
    return rows


def apply_deletes(tbl: "Table", commit: MergeOnReadCommit, tasks: list, plan: MergePlan) -> int:
    """Add the plan's deletes to ``commit``: a data file losing every live row is dropped, any
    other gets a position-delete file. Returns the number of stored rows deleted."""
    if not len(plan.delete_pos):
        return 0
    order = np.argsort(plan.delete_file, kind="stable")
    files, pos = plan.delete_file[order], plan.delete_pos[order]
    bounds = np.flatnonzero(np.diff(files)) + 1
    for chunk_f, chunk_p in zip(np.split(files, bounds), np.split(pos, bounds)):
        task = tasks[int(chunk_f[0])]
        live = task.file.record_count - sum(d.record_count for d in task.delete_files)
        if len(np.unique(chunk_p)) >= live:
            commit.delete_data_file(task.file)
        else:
            commit.add_delete_file(write_position_deletes(tbl, task.file, chunk_p))
    return len(pos)


# ----------------------------------------------------------------------------- maintenance
def compact_partitions(tbl: "Table", *, run_properties: dict[str, str], min_files: int = 8,
                       min_deleted_fraction: float = 0.1) -> dict:
    """Rewrite every partition whose position deletes mask at least ``min_deleted_fraction`` of
    its rows, or that has at least ``min_files`` data files, into fresh data files (deletes
    applied), in one snapshot. Returns counts; commits nothing when no partition needs it.

    The thresholds keep compaction from undoing merge-on-read: a nightly's scattered changes
    leave a few deletes in every partition, and rewriting them all every night would cost the
    whole table again."""
    from pyiceberg.io.pyarrow import ArrowScan

    tasks = list(tbl.scan().plan_files())
    groups: dict[tuple, list] = {}
    for t in tasks:
        groups.setdefault((t.file.spec_id, tuple(t.file.partition)), []).append(t)
    def needs(group) -> bool:
        rows = sum(t.file.record_count for t in group)
        deleted = sum(d.record_count for t in group for d in t.delete_files)
        return len(group) >= min_files or (deleted > 0 and deleted >= min_deleted_fraction * rows)

    todo = [g for g in groups.values() if needs(g)]
    if not todo:
        return {"partitions": 0, "files_removed": 0, "delete_files_removed": 0, "rows": 0}
    removed, dropped_deletes, rows = 0, set(), 0
    with tbl.transaction() as tx:
        with MergeOnReadCommit.of(tx, run_properties) as commit:
            scan = ArrowScan(tx.table_metadata, tbl.io, tbl.schema(), row_filter=__import__(
                "pyiceberg.expressions", fromlist=["AlwaysTrue"]).AlwaysTrue())

            def parts():
                for group in todo:
                    yield scan.to_table(group)

            rows = write_data_files(tx, commit, parts())
            for group in todo:
                for t in group:
                    commit.delete_data_file(t.file)
                    removed += 1
                    for d in t.delete_files:
                        dropped_deletes.add(d.file_path)
            for path in dropped_deletes:
                commit.drop_delete_file(path)
    return {"partitions": len(todo), "files_removed": removed, "delete_files_removed": len(dropped_deletes),
            "rows": rows}
