"""Stage ``matrices`` (Spark): canonical plays and tags -> id maps, splits and sparse matrices.

Outputs (under ``matrices/``):

``user_index``, ``item_index``, ``tag_index``
    ``(user_id|song_id|tag, idx)``. Stable: an id keeps its index across runs; ids seen for the
    first time are appended (in sorted order, so a run is deterministic).
``splits``
    ``(song_id, split)`` with split ∈ {train, valid, test}, from a seeded hash of the song id
    (or of the artist with ``matrices.split_level=artist``, so no artist straddles splits).
``plays_coo``
    ``(user_idx, item_idx, play_count, split)`` Parquet, the matrix for Spark consumers.
``user_items_<split>.npz``
    CSR exports (users × items, global indices, duplicates summed) for single-node solvers,
    one per split: factorisation reads ``train`` only, so test songs' plays never reach it.
``item_tags_<split>.npz``
    items × tags CSR of Last.fm weights for tags on at least ``matrices.min_tag_count``
    distinct songs (the papers keep tags occurring more than once).
``quarantine/matrices``
    Plays that must not reach a solver: ``nonpositive_count``, ``absurd_count`` (above
    ``matrices.max_play_count``), ``unknown_song`` (no index: not in the track list), with the
    canonical file they came from.

The id maps, splits and CSR maths are pure functions in :mod:`deepcontent.interactions.indexing`.
Spark tasks read the canonical Parquet parts through :class:`~deepcontent.storage.Storage`,
map ids with the broadcast index (Arrow ``index_in``, no shuffle join) and write COO parts; the
driver builds the CSR exports and publishes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import EXPORTS, ITEM_INDEX, PLAYS, PLAYS_COO, SPLITS, TAG_INDEX, TAGS, TRACKS, USER_INDEX
from deepcontent.errors import InputMissingError
from deepcontent.interactions.indexing import (
    SPLIT_NAMES,
    assign_splits,
    extend_index,
    lookup,
    max_duplicates,
    save_npz_bytes,
    to_csr,
)
from deepcontent.manifest import log
from deepcontent.stages.base import QuarantineCheck, StageContext, StageResult, StageRun
from deepcontent.storage import Storage, join

__all__ = ["STAGE", "run"]

STAGE = "matrices"
QUARANTINE = datasets.quarantine(STAGE)
_SUMMARY_DDL = "file string, rows long, records long, quarantined string, q_file string"


# ----------------------------------------------------------------------------- Spark tasks
def _unique_users_task(storage: Storage):
    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        for batch in batches:
            for uri in batch.column("file").to_pylist():
                users = storage.read_parquet(uri, columns=["user_id"])["user_id"]
                yield pa.RecordBatch.from_arrays([pc.unique(users.combine_chunks())], names=["user_id"])

    return run


def _coo_task(storage: Storage, run_id: str, bc, max_count: int):
    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        user_index, item_index, item_split = bc.value
        out_dir = PLAYS_COO.staging(storage, run_id)
        q_dir = QUARANTINE.staging(storage, run_id)
        for batch in batches:
            for part, uri in zip(batch.column("part").to_pylist(), batch.column("file").to_pylist()):
                plays = storage.read_parquet(uri)
                users = lookup(user_index, plays["user_id"].combine_chunks(), id_column="user_id")
                items = lookup(item_index, plays["song_id"].combine_chunks(), id_column="song_id")
                counts = plays["play_count"].to_numpy().astype(np.int64)
                nonpos = counts <= 0
                absurd = counts > max_count
                unknown = (items < 0) & ~nonpos & ~absurd
                bad = nonpos | absurd | unknown | (users < 0)
                q_rows = []
                for mask, reason, detail in (
                    (nonpos, "nonpositive_count", "play count {c} is not positive"),
                    (absurd, "absurd_count", f"play count {{c}} exceeds matrices.max_play_count={max_count}"),
                    (unknown, "unknown_song", "song {s} has no item index (not in the track list)"),
                ):
                    for i in np.flatnonzero(mask):
                        q_rows.append({"stage": STAGE, "source": f"{uri}#row={i}", "reason": reason,
                                       "detail": detail.format(c=counts[i], s=plays["song_id"][int(i)].as_py()),
                                       "run_id": run_id})
                good = ~bad
                coo = pa.table({
                    "user_idx": pa.array(users[good].astype(np.int32)),
                    "item_idx": pa.array(items[good].astype(np.int32)),
                    "play_count": pa.array(counts[good].astype(np.int32)),
                    "split": pa.array(item_split[items[good]]),
                }, schema=PLAYS_COO.schema)
                f = join(out_dir, f"part-{part:05d}.parquet")
                storage.write_parquet(coo, f)
                q_file = ""
                if q_rows:
                    q_file = join(q_dir, f"part-{part:05d}.parquet")
                    storage.write_parquet(pa.Table.from_pylist(q_rows, schema=QUARANTINE.schema), q_file)
                reasons = Counter(r["reason"] for r in q_rows)
                yield pa.RecordBatch.from_pylist([{"file": f, "rows": coo.num_rows, "records": plays.num_rows,
                                                   "quarantined": json.dumps(reasons), "q_file": q_file}])

    return run


# ----------------------------------------------------------------------------- driver
def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage; see the module docstring."""
    storage, spark = ctx.storage, ctx.spark
    m = cfg.matrices
    with StageRun(STAGE, cfg, storage) as run:
        outputs = {d.key: run.uri(d) for d in (USER_INDEX, ITEM_INDEX, TAG_INDEX, SPLITS, PLAYS_COO, EXPORTS, QUARANTINE)}
        inputs = {d.key: d.run_id(storage) for d in (TRACKS, PLAYS, TAGS)}
        if inputs[TRACKS.key] is None or inputs[PLAYS.key] is None:
            raise InputMissingError(f"matrices needs published {TRACKS.key} and {PLAYS.key}; run `deepcontent ingest` first")
        datasets.require_plays(storage, needed_by="matrices")
        fingerprint = hashlib.sha256(json.dumps([inputs, cfg.fingerprint("matrices")], sort_keys=True).encode()).hexdigest()[:24]
        done = run.previous(fingerprint, warehouse=ctx.warehouse)
        if done is not None:
            log.info("matrices: inputs unchanged since run %s; nothing to do", done["run_id"])
            return run.unchanged(done["run_id"], outputs=outputs)
        run.manifest.inputs = {**inputs, "fingerprint": fingerprint}
        log.info("matrices: run %s", run.run_id)

        with run.timed("index"):
            # The id maps only grow (stable indices): built on the published ones, so a
            # concurrent run that extended them first turns this publish into a conflict.
            run.plan_on(USER_INDEX, ITEM_INDEX, TAG_INDEX)
            tracks = TRACKS.read(storage, columns=["track_id", "song_id", "artist"])
            item_index = extend_index(ITEM_INDEX.read_or_empty(storage), tracks["song_id"].combine_chunks(), id_column="song_id")
            play_files = PLAYS.files(storage)
            df = spark.createDataFrame([(f,) for f in play_files], "file string").repartition(max(1, len(play_files)))
            uniq_users = df.mapInArrow(_unique_users_task(storage), "user_id string").toArrow()["user_id"]
            user_index = extend_index(USER_INDEX.read_or_empty(storage), pc.unique(uniq_users.combine_chunks()),
                                      id_column="user_id")
        with run.timed("splits"):
            song_ids = item_index["song_id"].to_pylist()
            group = None
            if m.split_level == "artist":
                artist_of = dict(zip(tracks["song_id"].to_pylist(), tracks["artist"].to_pylist()))
                group = [artist_of.get(s) or s for s in song_ids]
            split = assign_splits(song_ids, seed=m.split_seed, fractions=tuple(m.split_fractions), group_keys=group)
            order = np.argsort(item_index["idx"].to_numpy())
            item_split = np.empty(item_index.num_rows, dtype=object)
            item_split[item_index["idx"].to_numpy()] = split
            splits = pa.table({"song_id": item_index["song_id"], "split": pa.array(split, pa.string())}).take(pa.array(order))

        with run.timed("plays"):
            bc = spark.sparkContext.broadcast((user_index, item_index, item_split))
            df = spark.createDataFrame([(i, f) for i, f in enumerate(play_files)], "part int, file string")
            df = df.repartition(max(1, len(play_files)))
            summary = df.mapInArrow(_coo_task(storage, run.run_id, bc, m.max_play_count), _SUMMARY_DDL).toArrow()
            bc.unpersist()
        reasons: Counter = Counter()
        for r in summary["quarantined"].to_pylist():
            reasons.update(json.loads(r))
        records = int(pc.sum(summary["records"]).as_py() or 0)
        run.add_quarantine_files(summary["q_file"].to_pylist())
        run.check_quarantine([QuarantineCheck(reasons, records, unit="plays")], limit=m.max_quarantine_fraction)

        with run.timed("csr"):
            coo_files = summary["file"].to_pylist()
            coo = storage.read_parquet(coo_files)
            shape = (user_index.num_rows, item_index.num_rows)
            split_col = coo["split"].to_numpy(zero_copy_only=False)
            rows, cols, vals = coo["user_idx"].to_numpy(), coo["item_idx"].to_numpy(), coo["play_count"].to_numpy()
            export_files, nnz = [], {}
            for name in SPLIT_NAMES:
                sel = split_col == name
                csr = to_csr(rows[sel], cols[sel], vals[sel], shape=shape)
                nnz[name] = int(csr.nnz)
                f = run.part_uri(EXPORTS, f"user_items_{name}.npz")
                storage.write_bytes(f, save_npz_bytes(csr))
                export_files.append(f)
            del coo, rows, cols, vals, split_col
        with run.timed("tags"):
            tag_index, tag_files, tag_counts = _tag_matrices(run, tracks, item_index, item_split, m.min_tag_count,
                                                             m.min_tag_weight)
            export_files += tag_files

        with run.timed("publish"):
            for dataset, table in ((USER_INDEX, user_index), (ITEM_INDEX, item_index), (TAG_INDEX, tag_index),
                                   (SPLITS, splits)):
                run.publish(dataset, [run.write_part(dataset, table)])
            run.publish(PLAYS_COO, coo_files)
            run.publish_quarantine()
            run.publish(EXPORTS, export_files, meta={"input_fingerprint": fingerprint, "shape": list(shape),
                                                     "n_tags": tag_index.num_rows})
        with run.timed("warehouse"):
            wh = ctx.warehouse
            tables = {USER_INDEX: user_index, ITEM_INDEX: item_index, TAG_INDEX: tag_index, SPLITS: splits}
            wh.ensure_tables([d.table for d in tables])
            for dataset, table in tables.items():
                run.committed(dataset.table, wh.replace(dataset.table, [table], run_id=run.run_id))
            run.commit_quarantine(wh)
        split_counts = Counter(split.tolist())
        counts = {"users": user_index.num_rows, "items": item_index.num_rows, "tags": tag_index.num_rows,
                  "play_records": records, **{f"nnz_{k}": v for k, v in nnz.items()},
                  **{f"songs_{k}": split_counts.get(k, 0) for k in SPLIT_NAMES}, **tag_counts}
        log.info("matrices: %d users × %d items (nnz train/valid/test %s), %d tags; quarantined %s",
                 shape[0], shape[1], "/".join(str(nnz[k]) for k in SPLIT_NAMES), tag_index.num_rows, dict(reasons) or "none")
        return run.succeed(counts=counts, quarantined=dict(reasons), outputs=outputs, fingerprint=fingerprint)


def _tag_matrices(run: StageRun, tracks: pa.Table, item_index: pa.Table, item_split: np.ndarray, min_count: int,
                  min_weight: int):
    """items × tags CSR per split (Last.fm weights; a song takes the max weight over its tracks).
    Tags weighted below ``min_weight`` stay in the canonical tags but not in the matrix (a
    weight-0 Last.fm tag would otherwise be an explicit zero the WMF cannot take)."""
    storage = run.storage
    tags = TAGS.read_or_empty(storage)  # empty when the catalog has no tags
    light = pc.less(tags["weight"], min_weight)
    below = int(pc.sum(light).as_py() or 0)
    if below:
        tags = tags.filter(pc.invert(light))
    song_of = lookup(pa.table({"track_id": tracks["track_id"], "idx": pa.array(np.arange(tracks.num_rows, dtype=np.int32))}),
                     tags["track_id"].combine_chunks(), id_column="track_id")
    known = song_of >= 0
    items = lookup(item_index, pc.take(tracks["song_id"], pa.array(song_of[known])), id_column="song_id")
    tag_col = pc.filter(tags["tag"], pa.array(known)).combine_chunks()
    weights = tags["weight"].to_numpy()[known]
    # keep tags on at least min_count distinct songs
    pairs = pa.table({"item": pa.array(items), "tag": tag_col}).group_by(["tag", "item"]).aggregate([])
    per_tag = pairs.group_by("tag").aggregate([("item", "count")])
    kept = per_tag.filter(pc.greater_equal(per_tag["item_count"], min_count))["tag"].combine_chunks()
    tag_index = extend_index(TAG_INDEX.read_or_empty(storage), kept, id_column="tag")
    keep = pc.is_in(tag_col, value_set=kept).to_numpy(zero_copy_only=False)
    tcol = lookup(tag_index, tag_col, id_column="tag")
    items, tcol, weights = items[keep], tcol[keep], weights[keep]
    shape = (item_index.num_rows, tag_index.num_rows)
    files = []
    for name in SPLIT_NAMES:
        sel = item_split[items] == name if len(items) else np.zeros(0, bool)
        # a song with several tagged tracks takes the strongest weight, not the sum
        m = max_duplicates(items[sel], tcol[sel], weights[sel], shape)
        f = run.part_uri(EXPORTS, f"item_tags_{name}.npz")
        storage.write_bytes(f, save_npz_bytes(m))
        files.append(f)
    return tag_index, files, {"tag_pairs": int(keep.sum()), "tags_below_min_weight": below}
