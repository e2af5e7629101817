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

Spark tasks read the canonical Parquet parts through :class:`~deepcontent.storage.Storage`,
map ids with the broadcast index (Arrow ``index_in``, no shuffle join) and write COO parts; the
driver builds the CSR exports and publishes.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from deepcontent.config import Config
from deepcontent.ingest import PLAYS, TAGS, TAGS_SCHEMA, TRACKS
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.storage import Storage, join, new_run_id

STAGE = "matrices"
BASE = "matrices"
USER_INDEX, ITEM_INDEX, TAG_INDEX = f"{BASE}/user_index", f"{BASE}/item_index", f"{BASE}/tag_index"
SPLITS, PLAYS_COO, EXPORTS = f"{BASE}/splits", f"{BASE}/plays_coo", f"{BASE}/csr"
QUARANTINE = "quarantine/matrices"
SPLIT_NAMES = ("train", "valid", "test")

def _index_schema(id_column: str) -> pa.Schema:
    return pa.schema([(id_column, pa.string()), ("idx", pa.int32())])


COO_SCHEMA = pa.schema([("user_idx", pa.int32()), ("item_idx", pa.int32()), ("play_count", pa.int32()), ("split", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("stage", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                               ("detail", pa.string()), ("run_id", pa.string())])
_SUMMARY_DDL = "file string, rows long, records long, quarantined string, q_file string"


class MatricesQuarantineExceeded(RuntimeError):
    pass


# ----------------------------------------------------------------------------- pure functions
def hash_unit(keys: list[str] | np.ndarray, *, seed: int) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per key (SHA-1 of ``seed:key``), shape ``(n,)``."""
    out = np.empty(len(keys), dtype=np.float64)
    prefix = f"{seed}:".encode()
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.sha1(prefix + k.encode()).digest()[:8], "big") / 2.0**64
    return out


def assign_splits(song_ids: list[str], *, seed: int, fractions: tuple[float, float, float],
                  group_keys: list[str] | None = None) -> np.ndarray:
    """``train``/``valid``/``test`` per song from a seeded hash of its group key (the song id
    itself, or e.g. its artist so a whole artist lands in one split). Shape ``(n,)`` str."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    u = hash_unit(group_keys if group_keys is not None else song_ids, seed=seed)
    cut1, cut2 = fractions[0], fractions[0] + fractions[1]
    return np.where(u < cut1, "train", np.where(u < cut2, "valid", "test"))


def extend_index(existing: pa.Table, ids: pa.Array, *, id_column: str) -> pa.Table:
    """Append ids not yet in ``existing`` (``id_column``, ``idx``) with the next indices, in sorted
    order; existing ids keep their index."""
    known = existing[id_column].combine_chunks() if existing.num_rows else pa.array([], pa.string())
    uniq = pc.unique(_flat(ids).cast(pa.string()))
    new = pc.filter(uniq, pc.invert(pc.is_in(uniq, value_set=known))) if len(known) else uniq
    new = pc.take(new, pc.array_sort_indices(new))
    start = int(pc.max(existing["idx"]).as_py()) + 1 if existing.num_rows else 0
    added = pa.table({id_column: new, "idx": pa.array(np.arange(start, start + len(new), dtype=np.int32))})
    return pa.concat_tables([existing.cast(added.schema), added]) if existing.num_rows else added


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def lookup(index: pa.Table, ids: pa.Array | pa.ChunkedArray, *, id_column: str) -> np.ndarray:
    """Index of each id (``-1`` where missing), shape ``(n,)`` int64."""
    pos = pc.index_in(_flat(ids), value_set=index[id_column].combine_chunks())
    idx = index["idx"].to_numpy()
    p = pos.to_numpy(zero_copy_only=False)
    out = np.full(len(ids), -1, dtype=np.int64)
    valid = ~np.isnan(p) if p.dtype.kind == "f" else np.ones(len(p), bool)
    out[valid] = idx[p[valid].astype(np.int64)]
    return out


def to_csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, *, shape: tuple[int, int]) -> sp.csr_matrix:
    """COO -> CSR float32 with duplicates summed, sorted indices."""
    m = sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.sort_indices()
    return m


def save_npz_bytes(m: sp.csr_matrix) -> bytes:
    buf = io.BytesIO()
    sp.save_npz(buf, m, compressed=False)
    return buf.getvalue()


def export_files(storage: Storage, exports: dict) -> dict[str, str]:
    """The published CSR exports by file name (``user_items_train.npz`` …) -> their URIs;
    ``exports`` is the exports dataset's pointer (``storage.published(storage.uri(EXPORTS))``)."""
    base = storage.uri(EXPORTS)
    return {f.rsplit("/", 1)[-1]: join(base, f) for f in exports["files"]}


def load_csr(storage: Storage, uri: str) -> sp.csr_matrix:
    return sp.load_npz(io.BytesIO(storage.read_bytes(uri))).tocsr()


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
        out_dir = storage.staging_uri(storage.uri(PLAYS_COO), run_id)
        q_dir = storage.staging_uri(storage.uri(QUARANTINE), run_id)
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
                }, schema=COO_SCHEMA)
                f = join(out_dir, f"part-{part:05d}.parquet")
                storage.write_parquet(coo, f)
                q_file = ""
                if q_rows:
                    q_file = join(q_dir, f"part-{part:05d}.parquet")
                    storage.write_parquet(pa.Table.from_pylist(q_rows, schema=QUARANTINE_SCHEMA), q_file)
                reasons = Counter(r["reason"] for r in q_rows)
                yield pa.RecordBatch.from_pylist([{"file": f, "rows": coo.num_rows, "records": plays.num_rows,
                                                   "quarantined": json.dumps(reasons), "q_file": q_file}])

    return run


# ----------------------------------------------------------------------------- driver
def run_matrices(cfg: Config, storage: Storage, spark) -> StageResult:
    """Run the stage; see the module docstring."""
    m = cfg.matrices
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("matrices"))
    outputs = {n: storage.uri(n) for n in (USER_INDEX, ITEM_INDEX, TAG_INDEX, SPLITS, PLAYS_COO, EXPORTS, QUARANTINE)}
    inputs = {n: (storage.published(storage.uri(n)) or {}).get("run_id") for n in (TRACKS, PLAYS, TAGS)}
    if inputs[TRACKS] is None or inputs[PLAYS] is None:
        raise FileNotFoundError(f"matrices needs published {TRACKS} and {PLAYS}; run `deepcontent ingest` first")
    fingerprint = hashlib.sha256(json.dumps([inputs, cfg.fingerprint("matrices")], sort_keys=True).encode()).hexdigest()[:24]
    current = storage.published(outputs[EXPORTS])
    if current is not None and current.get("input_fingerprint") == fingerprint:
        log.info("matrices: inputs unchanged since run %s; nothing to do", current["run_id"])
        return StageResult(current["run_id"], False, outputs=outputs)
    manifest.inputs = {**inputs, "fingerprint": fingerprint}
    log.info("matrices: run %s", run_id)

    with manifest.timed("index"):
        tracks = storage.read_dataset(storage.uri(TRACKS), columns=["track_id", "song_id", "artist"])
        item_index = extend_index(storage.read_published(storage.uri(ITEM_INDEX), schema=_index_schema("song_id")),
                                  tracks["song_id"].combine_chunks(), id_column="song_id")
        play_files = storage.published_files(storage.uri(PLAYS))
        df = spark.createDataFrame([(f,) for f in play_files], "file string").repartition(max(1, len(play_files)))
        uniq_users = df.mapInArrow(_unique_users_task(storage), "user_id string").toArrow()["user_id"]
        user_index = extend_index(storage.read_published(storage.uri(USER_INDEX), schema=_index_schema("user_id")),
                                  pc.unique(uniq_users.combine_chunks()), id_column="user_id")
    with manifest.timed("splits"):
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

    with manifest.timed("plays"):
        bc = spark.sparkContext.broadcast((user_index, item_index, item_split))
        df = spark.createDataFrame([(i, f) for i, f in enumerate(play_files)], "part int, file string").repartition(max(1, len(play_files)))
        summary = df.mapInArrow(_coo_task(storage, run_id, bc, m.max_play_count), _SUMMARY_DDL).toArrow()
        bc.unpersist()
    reasons: Counter = Counter()
    for r in summary["quarantined"].to_pylist():
        reasons.update(json.loads(r))
    records = int(pc.sum(summary["records"]).as_py() or 0)
    q_files = [f for f in summary["q_file"].to_pylist() if f]
    q_file_main = join(storage.staging_uri(outputs[QUARANTINE], run_id), "part-empty.parquet")
    if not q_files:
        storage.write_parquet(QUARANTINE_SCHEMA.empty_table(), q_file_main)
        q_files = [q_file_main]
    if records and sum(reasons.values()) / records > m.max_quarantine_fraction:
        storage.publish(outputs[QUARANTINE], run_id=run_id, files=q_files, meta={"stage": STAGE, "failed": True})
        uri = manifest.write(storage, status="failed")
        raise MatricesQuarantineExceeded(
            f"matrices quarantined {sum(reasons.values()):,} of {records:,} plays ({dict(reasons)}), more than "
            f"{m.max_quarantine_fraction:.1%}; nothing was published except the quarantine at {outputs[QUARANTINE]} (manifest {uri})")

    with manifest.timed("csr"):
        coo_files = summary["file"].to_pylist()
        coo = storage.read_parquet(coo_files)
        shape = (user_index.num_rows, item_index.num_rows)
        split_col = coo["split"].to_numpy(zero_copy_only=False)
        rows, cols, vals = coo["user_idx"].to_numpy(), coo["item_idx"].to_numpy(), coo["play_count"].to_numpy()
        export_dir = storage.staging_uri(outputs[EXPORTS], run_id)
        export_files, nnz = [], {}
        for name in SPLIT_NAMES:
            sel = split_col == name
            csr = to_csr(rows[sel], cols[sel], vals[sel], shape=shape)
            nnz[name] = int(csr.nnz)
            f = join(export_dir, f"user_items_{name}.npz")
            storage.write_bytes(f, save_npz_bytes(csr))
            export_files.append(f)
        del coo, rows, cols, vals, split_col
    with manifest.timed("tags"):
        tag_index_old = storage.read_published(storage.uri(TAG_INDEX), schema=_index_schema("tag"))
        tag_index, tag_files, tag_counts = _tag_matrices(storage, tracks, item_index, item_split, tag_index_old, m.min_tag_count,
                                                         export_dir)
        export_files += tag_files

    with manifest.timed("publish"):
        def put(name: str, table: pa.Table) -> None:
            f = join(storage.staging_uri(outputs[name], run_id), "part-00000.parquet")
            storage.write_parquet(table, f)
            storage.publish(outputs[name], run_id=run_id, files=[f], meta={"stage": STAGE})

        put(USER_INDEX, user_index)
        put(ITEM_INDEX, item_index)
        put(TAG_INDEX, tag_index)
        put(SPLITS, splits)
        storage.publish(outputs[PLAYS_COO], run_id=run_id, files=coo_files, meta={"stage": STAGE})
        storage.publish(outputs[QUARANTINE], run_id=run_id, files=q_files, meta={"stage": STAGE})
        storage.publish(outputs[EXPORTS], run_id=run_id, files=export_files,
                        meta={"stage": STAGE, "input_fingerprint": fingerprint, "shape": list(shape),
                              "n_tags": tag_index.num_rows})
    split_counts = Counter(split.tolist())
    manifest.counts = {"users": user_index.num_rows, "items": item_index.num_rows, "tags": tag_index.num_rows,
                       "play_records": records, **{f"nnz_{k}": v for k, v in nnz.items()},
                       **{f"songs_{k}": split_counts.get(k, 0) for k in SPLIT_NAMES}, **tag_counts}
    manifest.quarantined = dict(reasons)
    manifest.outputs = outputs
    uri = manifest.write(storage, status="succeeded")
    log.info("matrices: %d users × %d items (nnz train/valid/test %s), %d tags; quarantined %s; manifest %s",
             shape[0], shape[1], "/".join(str(nnz[k]) for k in SPLIT_NAMES), tag_index.num_rows, dict(reasons) or "none", uri)
    return StageResult(run_id, True, manifest.counts, dict(reasons), outputs, uri)


def _tag_matrices(storage: Storage, tracks: pa.Table, item_index: pa.Table, item_split: np.ndarray,
                  tag_index_old: pa.Table, min_count: int, export_dir: str):
    """items × tags CSR per split (Last.fm weights; a song takes the max weight over its tracks)."""
    tags_uri = storage.uri(TAGS)
    tags = storage.read_published(tags_uri, schema=TAGS_SCHEMA)  # empty when the catalog has no tags
    song_of = lookup(pa.table({"track_id": tracks["track_id"], "idx": pa.array(np.arange(tracks.num_rows, dtype=np.int32))}),
                     tags["track_id"].combine_chunks(), id_column="track_id")
    known = song_of >= 0
    items = lookup(item_index, pc.take(tracks["song_id"], pa.array(song_of[known])), id_column="song_id")
    tag_col = _flat(pc.filter(tags["tag"], pa.array(known)))
    weights = tags["weight"].to_numpy()[known]
    # keep tags on at least min_count distinct songs
    pairs = pa.table({"item": pa.array(items), "tag": tag_col}).group_by(["tag", "item"]).aggregate([])
    per_tag = pairs.group_by("tag").aggregate([("item", "count")])
    kept = _flat(per_tag.filter(pc.greater_equal(per_tag["item_count"], min_count))["tag"])
    tag_index = extend_index(tag_index_old, kept, id_column="tag")
    keep = pc.is_in(tag_col, value_set=kept).to_numpy(zero_copy_only=False)
    tcol = lookup(tag_index, tag_col, id_column="tag")
    items, tcol, weights = items[keep], tcol[keep], weights[keep]
    shape = (item_index.num_rows, tag_index.num_rows)
    files = []
    for name in SPLIT_NAMES:
        sel = item_split[items] == name if len(items) else np.zeros(0, bool)
        # a song with several tagged tracks takes the strongest weight, not the sum
        m = _max_duplicates(items[sel], tcol[sel], weights[sel], shape)
        f = join(export_dir, f"item_tags_{name}.npz")
        storage.write_bytes(f, save_npz_bytes(m))
        files.append(f)
    return tag_index, files, {"tag_pairs": int(keep.sum())}


def _max_duplicates(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape) -> sp.csr_matrix:
    if len(rows) == 0:
        return sp.csr_matrix(shape, dtype=np.float32)
    key = rows.astype(np.int64) * shape[1] + cols
    order = np.lexsort((-vals, key))
    key, vals = key[order], vals[order]
    first = np.concatenate([[True], key[1:] != key[:-1]])
    key, vals = key[first], vals[first]
    return sp.csr_matrix((vals.astype(np.float32), (key // shape[1], key % shape[1])), shape=shape)
