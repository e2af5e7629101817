"""The dataset catalog: every dataset the stages exchange, declared once.

A :class:`Dataset` is a published Parquet dataset under the storage root (see
:mod:`deepcontent.storage`, publish-by-commit): its key, its Arrow schema, the stage that
produces it, and — when downstream engines read it as a warehouse table — the Iceberg table it
is mirrored to. A :class:`Table` is a warehouse table; its Iceberg schema is derived from the
same Arrow schema (:func:`deepcontent.warehouse.iceberg_schema`), so the two cannot drift.
The stages never spell a key or a schema themselves: they name a declaration from here.

The module also holds the helpers every stage uses to turn stored columns back into arrays —
float16 log-mels with their sizes checked (:func:`mel_arrays` per row, :func:`mel_blocks` as
zero-copy blocks of same-shaped rows), ``list<float32>`` vectors
(:func:`vectors` / :func:`vector_column`) — and the one quarantine schema
(:func:`quarantine_table`).

Layout under the storage root::

    raw/...                       the catalog as published (sources.*)
    canonical/{tracks,plays,tags} ingest
    features/{spectrograms,audio_index,waveforms}
    matrices/{user_index,item_index,tag_index,splits,plays_coo,csr}
    factors/<plays|tags>/{item_factors,user_factors,tag_factors}
    quarantine/<stage>            one per stage that rejects records
    warehouse/                    Iceberg data and metadata (embeddings, similar_tracks, ...)
    embeddings/staging/<run_id>/  embed's staged files, swept after the commit
    models/                       the model registry (deepcontent.registry)
    train/ray/<model_version>/    Ray Train checkpoints
    runs/<stage>/<run_id>.json    run manifests
    evaluate/<run_id>/            metrics.json, report.html
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from deepcontent.errors import InputMissingError

if TYPE_CHECKING:  # the catalog itself is plain data: importing it loads no client
    from deepcontent.storage import Storage

__all__ = [
    "AUDIO_INDEX", "DATASETS", "EMBEDDINGS", "EMBED_STAGING", "EXPORTS", "ITEM_INDEX", "PLAYS", "PLAYS_COO",
    "QUARANTINE_SCHEMA", "REJECTED_SCHEMA", "SIMILAR_TRACKS", "SPECTROGRAMS", "SPLITS", "TABLES", "TAGS",
    "TAG_INDEX", "TRACKS", "USER_INDEX", "WAVEFORMS", "Dataset", "Table", "csr_exports", "factors", "factors_table",
    "load_csr", "mel_arrays", "mel_blocks", "quarantine", "quarantine_table", "vector_column", "vectors",
]

#: Clips per Parquet row group in a spectrogram or waveform shard (~2.6 MB for 30 s clips):
#: readers downstream (training ingest, embed) can split a shard between tasks by row group.
SHARD_ROW_GROUP = 8

# Prefixes that are not datasets (no schema, no pointer) but have one owner each.
EMBED_STAGING = "embeddings/staging"
CHECKPOINTS = "train/ray"
RUNS = "runs"
EVALUATE = "evaluate"


def _f(name: str, type_: pa.DataType, *, required: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=not required)


_FLOATS = pa.list_(pa.field("element", pa.float32(), nullable=False))


@dataclass(frozen=True)
class Table:
    """A warehouse (Iceberg) table: name, Arrow schema (non-nullable fields are Iceberg
    ``required``), key columns (Iceberg identifier fields: at most one row per key after an
    upsert).

    ``partition``: the Iceberg partition fields, ``("identity", column)`` or ``("bucket", column,
    n)``; an upsert reads only the partitions its keys fall in, and maintenance compacts per
    partition. ``change_columns``: the columns whose difference makes a stored row "changed"
    for an upsert (default: every non-key column); an upsert reads only keys and these."""

    name: str
    schema: pa.Schema
    keys: tuple[str, ...]
    doc: str
    partition: tuple[tuple, ...] = ()
    change_columns: tuple[str, ...] | None = None

    @property
    def compare_columns(self) -> tuple[str, ...]:
        if self.change_columns is not None:
            return self.change_columns
        return tuple(n for n in self.schema.names if n not in self.keys)


@dataclass(frozen=True)
class Dataset:
    """A published Parquet dataset under the storage root.

    Attributes
    ----------
    key : str
        Its prefix under the root (``canonical/tracks``).
    schema : pa.Schema or None
        The Arrow schema of its parts; None for a dataset of other files (the CSR exports).
    producer : str
        The stage that publishes it (named in errors when it is missing).
    doc : str
    table : str or None
        The warehouse table the producer also commits it to.
    """

    key: str
    schema: pa.Schema | None
    producer: str
    doc: str
    table: str | None = None

    def uri(self, storage: Storage) -> str:
        return storage.uri(self.key)

    def pointer(self, storage: Storage) -> dict | None:
        """The current pointer (``run_id``, ``files``, the producer's metadata), or None."""
        return storage.published(self.uri(storage))

    def run_id(self, storage: Storage) -> str | None:
        p = self.pointer(storage)
        return None if p is None else p["run_id"]

    def require(self, storage: Storage, *, needed_by: str) -> dict:
        """The pointer; raises :class:`InputMissingError` naming the stage to run when the
        dataset was never published."""
        p = self.pointer(storage)
        if p is None:
            raise InputMissingError(f"{needed_by} needs {self.uri(storage)}, which has never been published; "
                                    f"run `deepcontent {self.producer}` first")
        return p

    def files(self, storage: Storage) -> list[str]:
        """URIs of the published version's files (raises if never published)."""
        return storage.published_files(self.uri(storage))

    def staging(self, storage: Storage, run_id: str) -> str:
        """Where ``run_id`` writes parts of this dataset before publishing them."""
        return storage.staging_uri(self.uri(storage), run_id)

    def read(self, storage: Storage, *, columns: list[str] | None = None, filters=None) -> pa.Table:
        """The published version (raises :class:`InputMissingError` if never published)."""
        self.require(storage, needed_by=f"reading {self.key}")
        return storage.read_dataset(self.uri(storage), columns=columns, schema=self.schema, filters=filters)

    def read_or_empty(self, storage: Storage, *, columns: list[str] | None = None) -> pa.Table:
        """The published version, or an empty table of :attr:`schema` before its first run."""
        return storage.read_published(self.uri(storage), schema=self.schema, columns=columns)


# --------------------------------------------------------------------------- schemas
TRACKS_SCHEMA = pa.schema([_f("track_id", pa.string(), required=True), _f("song_id", pa.string(), required=True),
                           _f("artist", pa.string()), _f("title", pa.string()), _f("audio_uri", pa.string())])
PLAYS_SCHEMA = pa.schema([_f("user_id", pa.string(), required=True), _f("song_id", pa.string(), required=True),
                          _f("play_count", pa.int32(), required=True)])
TAGS_SCHEMA = pa.schema([_f("track_id", pa.string(), required=True), _f("tag", pa.string(), required=True),
                         _f("weight", pa.int32(), required=True)])  # 0-100, as Last.fm publishes it

#: A record a parser or a stage rejected: where it came from (``<uri>@<byte offset>``, a URI, a
#: track id), why (a reason code) and the detail naming the bad value.
REJECTED_SCHEMA = pa.schema([_f("source", pa.string(), required=True), _f("reason", pa.string(), required=True),
                             _f("detail", pa.string())])
#: Rows of every ``quarantine/<stage>`` dataset and of the warehouse ``quarantine`` table.
QUARANTINE_SCHEMA = pa.schema([_f("stage", pa.string(), required=True), *REJECTED_SCHEMA,
                               _f("run_id", pa.string(), required=True)])

SPECTROGRAM_SCHEMA = pa.schema([
    _f("track_id", pa.string()), _f("audio_sha256", pa.string()), _f("sample_rate", pa.int32()),
    _f("hop_length", pa.int32()), _f("n_mels", pa.int32()), _f("n_frames", pa.int32()),
    _f("mel", pa.binary()),  # float16 bytes, row-major (n_mels, n_frames)
    _f("harmonic", pa.binary()), _f("percussive", pa.binary()),  # same layout, HPSS parts, or null
    _f("settings_key", pa.string()),
])
AUDIO_INDEX_SCHEMA = pa.schema([
    _f("track_id", pa.string()), _f("audio_uri", pa.string()), _f("audio_size", pa.int64()),
    _f("audio_modified", pa.string()), _f("audio_sha256", pa.string()), _f("settings_key", pa.string()),
    _f("status", pa.string()), _f("detail", pa.string()), _f("shard", pa.string()), _f("run_id", pa.string()),
    # How many runs in a row failed this audio version for a transient reason (timeout...).
    _f("attempts", pa.int32()),
])


def _index_schema(id_column: str) -> pa.Schema:
    return pa.schema([_f(id_column, pa.string(), required=True), _f("idx", pa.int32(), required=True)])


COO_SCHEMA = pa.schema([_f("user_idx", pa.int32()), _f("item_idx", pa.int32()), _f("play_count", pa.int32()),
                        _f("split", pa.string())])
SPLITS_SCHEMA = pa.schema([_f("song_id", pa.string(), required=True),
                           _f("split", pa.string(), required=True)])  # train | valid | test


def _factors_schema(id_column: str, *, split: bool) -> pa.Schema:
    fields = [_f(id_column, pa.string(), required=True), _f("factors", _FLOATS, required=True)]
    if split:
        fields.append(_f("split", pa.string(), required=True))  # train | valid
    return pa.schema(fields + [_f("run_id", pa.string(), required=True)])  # the factorisation run


EMBEDDINGS_SCHEMA = pa.schema([
    _f("track_id", pa.string(), required=True), _f("model_version", pa.string(), required=True),
    _f("predicted_factors", _FLOATS, required=True), _f("embedding", _FLOATS, required=True),
    _f("audio_sha256", pa.string(), required=True),
    _f("computed_at", pa.timestamp("us", tz="UTC"), required=True),
])
SIMILAR_TRACKS_SCHEMA = pa.schema([
    _f("track_id", pa.string(), required=True), _f("neighbor_track_id", pa.string(), required=True),
    _f("rank", pa.int32(), required=True),  # 1 = nearest
    _f("score", pa.float32(), required=True), _f("model_version", pa.string(), required=True),
])

# --------------------------------------------------------------------------- warehouse tables
#: Buckets of track id in the per-track tables: ~60k rows a bucket at a million tracks, so a
#: nightly's files per partition stay few and a compaction rewrites one bucket at a time.
TRACK_BUCKETS = 16
TABLES: dict[str, Table] = {t.name: t for t in (
    Table("tracks", TRACKS_SCHEMA, ("track_id",), "the catalog's tracks with their audio location (ingest)"),
    Table("plays", PLAYS_SCHEMA, ("user_id", "song_id"), "listening counts per user and song (ingest)"),
    Table("tags", TAGS_SCHEMA, ("track_id", "tag"), "Last.fm tags per track with weights 0-100 (ingest)"),
    Table("quarantine", QUARANTINE_SCHEMA, ("stage", "source", "reason", "run_id"),
          "every rejected record of every stage, with its reason (ingest appends its runs)"),
    Table("user_index", _index_schema("user_id"), ("user_id",), "user id -> row of the play matrix (matrices)"),
    Table("item_index", _index_schema("song_id"), ("song_id",), "song id -> column of the play matrix (matrices)"),
    Table("tag_index", _index_schema("tag"), ("tag",), "tag -> column of the tag matrix (matrices)"),
    Table("splits", SPLITS_SCHEMA, ("song_id",), "train / valid / test per song (matrices)"),
    Table("item_factors", _factors_schema("song_id", split=True), ("song_id",),
          "WMF song factors of the train and valid songs (factorize)"),
    Table("user_factors", _factors_schema("user_id", split=False), ("user_id",), "WMF user factors (factorize)"),
    # Partitioned by model version and a bucket of the track id: a nightly's upsert reads the
    # key columns of the partitions it touches, never the vectors (an embedding changes exactly
    # when its audio does: same model version, same audio -> same vector).
    Table("embeddings", EMBEDDINGS_SCHEMA, ("track_id", "model_version"),
          "one predicted-factor vector and one embedding per track and model version (embed)",
          partition=(("identity", "model_version"), ("bucket", "track_id", TRACK_BUCKETS)),
          change_columns=("audio_sha256",)),
    Table("similar_tracks", SIMILAR_TRACKS_SCHEMA, ("track_id", "model_version", "rank"),
          "top-k cosine neighbours per track and model version (neighbors)",
          partition=(("identity", "model_version"), ("bucket", "track_id", TRACK_BUCKETS))),
)}

# --------------------------------------------------------------------------- datasets
TRACKS = Dataset("canonical/tracks", TRACKS_SCHEMA, "ingest", "track list after mismatch and duplicate removal",
                 table="tracks")
PLAYS = Dataset("canonical/plays", PLAYS_SCHEMA, "ingest", "listening counts (play_count > 0)", table="plays")
TAGS = Dataset("canonical/tags", TAGS_SCHEMA, "ingest", "Last.fm tags with weights 0-100", table="tags")
SPECTROGRAMS = Dataset("features/spectrograms", SPECTROGRAM_SCHEMA, "spectrograms",
                       "one float16 log-mel per track with audio, and the settings key it was computed with")
AUDIO_INDEX = Dataset("features/audio_index", AUDIO_INDEX_SCHEMA, "spectrograms",
                      "each track's audio object (URI, size, mtime, SHA-256) and outcome: the stage's memory")
WAVEFORMS = Dataset("features/waveforms", SPECTROGRAM_SCHEMA, "waveforms",
                    "mono float16 PCM per track in the spectrogram schema (1 channel, hop 1): raw-audio input")
USER_INDEX = Dataset("matrices/user_index", _index_schema("user_id"), "matrices", "user id -> row (stable)",
                     table="user_index")
ITEM_INDEX = Dataset("matrices/item_index", _index_schema("song_id"), "matrices", "song id -> column (stable)",
                     table="item_index")
TAG_INDEX = Dataset("matrices/tag_index", _index_schema("tag"), "matrices", "tag -> column (stable)", table="tag_index")
SPLITS = Dataset("matrices/splits", SPLITS_SCHEMA, "matrices", "train / valid / test per song", table="splits")
PLAYS_COO = Dataset("matrices/plays_coo", COO_SCHEMA, "matrices", "the play matrix as COO rows, for Spark consumers")
EXPORTS = Dataset("matrices/csr", None, "matrices",
                  "CSR exports user_items_<split>.npz and item_tags_<split>.npz for single-node solvers")


def factors(matrix: str, kind: str) -> Dataset:
    """``factors/<matrix>/<kind>``: ``matrix`` is ``plays`` or ``tags``, ``kind`` one of
    ``item_factors``, ``user_factors`` (plays) or ``tag_factors`` (tags)."""
    if (matrix, kind) not in {("plays", "item_factors"), ("plays", "user_factors"), ("tags", "item_factors"),
                              ("tags", "tag_factors")}:
        raise ValueError(f"no factors dataset {matrix!r}/{kind!r}")
    id_column = {"item_factors": "song_id", "user_factors": "user_id", "tag_factors": "tag"}[kind]
    table = kind if matrix == "plays" else None
    return Dataset(f"factors/{matrix}/{kind}", _factors_schema(id_column, split=kind == "item_factors"), "factorize",
                   f"WMF {kind.replace('_', ' ')} of the {matrix} matrix", table=table)


def quarantine(stage: str) -> Dataset:
    """``quarantine/<stage>``: the records ``stage`` rejected in its last run, with reasons."""
    return Dataset(f"quarantine/{stage}", QUARANTINE_SCHEMA, stage, f"records the {stage} stage rejected")


#: Every fixed dataset, by key (factors and quarantine datasets come from their functions).
DATASETS: dict[str, Dataset] = {d.key: d for d in (
    TRACKS, PLAYS, TAGS, SPECTROGRAMS, AUDIO_INDEX, WAVEFORMS, USER_INDEX, ITEM_INDEX, TAG_INDEX, SPLITS,
    PLAYS_COO, EXPORTS)}
EMBEDDINGS = TABLES["embeddings"]
SIMILAR_TRACKS = TABLES["similar_tracks"]


# --------------------------------------------------------------------------- helpers
def quarantine_table(rejected: pa.Table, *, stage: str, run_id: str) -> pa.Table:
    """``(source, reason, detail)`` rows -> :data:`QUARANTINE_SCHEMA` rows of ``stage`` / ``run_id``."""
    n = rejected.num_rows
    return pa.table({
        "stage": pa.array([stage] * n, pa.string()), "source": rejected["source"], "reason": rejected["reason"],
        "detail": rejected["detail"], "run_id": pa.array([run_id] * n, pa.string()),
    }, schema=QUARANTINE_SCHEMA)


def vectors(column: pa.ChunkedArray | pa.Array, *, width: int | None = None) -> np.ndarray:
    """A ``list<float32>`` column of equal-length lists -> ``(n, width)`` float32.

    ``width`` is only needed to shape an empty column (``(0, width)``; ``(0, 0)`` without it).

    Raises
    ------
    ValueError
        If the lists differ in length (the message gives the first two lengths).
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n == 0:
        return flat.reshape(0, width or 0)
    if flat.size % n:
        lengths = sorted(set(arr.value_lengths().to_pylist()))
        raise ValueError(f"vectors of different lengths {lengths[:2]} in one column")
    return flat.reshape(n, -1)


def vector_column(m: np.ndarray, *, valid: np.ndarray | None = None) -> pa.ListArray:
    """``(n, d)`` -> a ``list<float32>`` column of n vectors (no copy of a C-contiguous float32
    ``m``: Arrow wraps its memory).

    ``valid`` : ``(n,)`` bool, optional — rows where it is False become null lists (their
    values stay in the buffer, unread).
    """
    m = np.ascontiguousarray(m, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"vectors must be (n, d), got shape {m.shape}")
    if valid is not None and np.shape(valid) != (m.shape[0],):
        raise ValueError(f"valid must have shape ({m.shape[0]},), got {np.shape(valid)}")
    offsets = pa.array(np.arange(m.shape[0] + 1, dtype=np.int32) * np.int32(m.shape[1]))
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1), pa.float32()), type=_FLOATS, mask=mask)


def mel_blocks(table: pa.Table, *, column: str = "mel") -> list[np.ndarray]:
    """Stored spectrogram rows -> float16 blocks ``(r, n_mels, n_frames)``, one per run of
    consecutive rows of the same shape, in row order (the blocks' ``r`` add up to the rows).

    Each block is a read-only view of the column's Arrow data buffer: a binary column's values
    lie back to back, so a run of equal-sized blobs *is* a C-contiguous 3-D array. The sizes are
    checked for all rows at once (no per-row Python), so catalog-scale readers pay nothing per
    clip. :func:`mel_arrays` gives the same values one array per row.

    Parameters
    ----------
    table : pa.Table
        With ``track_id`` (for messages), ``n_mels``, ``n_frames`` and ``column`` (float16
        bytes, row-major ``(n_mels, n_frames)``); any chunking.
    column : str
        ``mel``, ``harmonic`` or ``percussive``.

    Returns
    -------
    blocks : list of np.ndarray [shape=(r_i, n_mels_i, n_frames_i), dtype=float16]
        A run never crosses a chunk of ``column`` (chunks are separate buffers).

    Raises
    ------
    ValueError
        If a row's blob is null or does not hold ``n_mels × n_frames`` float16 values, or a
        size is null; the message names the first such track.
    """
    n = table.num_rows
    ids = table["track_id"] if "track_id" in table.column_names else None

    def track(i: int):
        return None if ids is None else ids[int(i)].as_py()

    sizes = []
    for name in ("n_mels", "n_frames"):
        c = table[name]
        if c.null_count:
            bad = np.flatnonzero(c.is_null().to_numpy(zero_copy_only=False))[0]
            raise ValueError(f"track {track(bad)!r}: no {name} stored for its {column}")
        sizes.append(np.asarray(c.to_numpy(), dtype=np.int64).reshape(n))
    mels, frames = sizes
    blocks: list[np.ndarray] = []
    start = 0
    for chunk in table[column].chunks:
        k = len(chunk)
        if not k:
            continue
        if chunk.null_count:
            bad = start + np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0]
            raise ValueError(f"track {track(bad)!r}: no {column} values stored")
        wide = pa.types.is_large_binary(chunk.type)
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int64 if wide else np.int32)[chunk.offset:chunk.offset + k + 1]
        m, f = mels[start:start + k], frames[start:start + k]
        nbytes = np.diff(offsets)
        wrong = np.flatnonzero(nbytes != 2 * m * f)
        if len(wrong):
            i = wrong[0]
            raise ValueError(f"track {track(start + i)!r}: {column} blob holds {nbytes[i] / 2:g} values, expected "
                             f"n_mels × n_frames = {m[i]} × {f[i]} = {m[i] * f[i]}")
        raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        cuts = np.flatnonzero((m[1:] != m[:-1]) | (f[1:] != f[:-1])) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, k]):
            b = raw[offsets[s]:offsets[e]]
            if b.ctypes.data % 2:  # only a sliced buffer starts mid-value; float16 wants 2-byte alignment
                b = b.copy()
            block = b.view(np.float16).reshape(e - s, m[s], f[s])
            block.flags.writeable = False  # Arrow data is immutable even where its buffer is not
            blocks.append(block)
        start += k
    return blocks


def mel_arrays(table: pa.Table, *, column: str = "mel", dtype=np.float16, copy: bool = False) -> list[np.ndarray]:
    """Stored spectrogram (or waveform) rows -> one ``(n_mels, n_frames)`` array per row.

    Parameters
    ----------
    table : pa.Table
        With ``track_id``, ``n_mels``, ``n_frames`` and ``column`` (float16 bytes, row-major).
    column : str
        ``mel``, ``harmonic`` or ``percussive``.
    dtype : numpy dtype
        float16 keeps the stored values (and is a view unless ``copy``); float32 converts.
    copy : bool
        Writable copies (torch wants them) instead of read-only views of the Arrow buffers.

    Raises
    ------
    ValueError
        If a row's blob does not hold ``n_mels × n_frames`` float16 values, or is null; the
        message names the track.
    """
    ids = table["track_id"].to_pylist() if "track_id" in table.column_names else [None] * table.num_rows
    out = []
    for track, blob, m, f in zip(ids, table[column].to_pylist(), table["n_mels"].to_pylist(),
                                 table["n_frames"].to_pylist()):
        if blob is None:
            raise ValueError(f"track {track!r}: no {column} values stored")
        a = np.frombuffer(blob, dtype=np.float16)
        if a.size != m * f:
            raise ValueError(f"track {track!r}: {column} blob holds {a.size} values, expected n_mels × n_frames = "
                             f"{m} × {f} = {m * f}")
        a = a.reshape(m, f)
        if dtype is not np.float16 and np.dtype(dtype) != np.float16:
            a = a.astype(dtype)
        elif copy:
            a = a.copy()
        out.append(a)
    return out


def factors_table(ids: list[str], matrix: np.ndarray, *, id_column: str, run_id: str,
                  split: list[str] | None = None) -> pa.Table:
    """A factors dataset's rows ``(id, factors[, split], run_id)`` from ``matrix (n, f)``."""
    cols = {id_column: pa.array(ids, pa.string()), "factors": vector_column(np.asarray(matrix))}
    if split is not None:
        cols["split"] = pa.array(split, pa.string())
    cols["run_id"] = pa.array([run_id] * len(ids), pa.string())
    return pa.table(cols)


def csr_exports(storage: "Storage", *, needed_by: str) -> dict[str, str]:
    """The published CSR exports by file name (``user_items_train.npz`` …) -> their URIs."""
    pointer = EXPORTS.require(storage, needed_by=needed_by)
    base = EXPORTS.uri(storage)
    return {f.rsplit("/", 1)[-1]: f"{base}/{f}" for f in pointer["files"]}


def load_csr(storage: "Storage", uri: str):
    """One CSR export (``.npz``) as a ``scipy.sparse.csr_matrix``."""
    import io

    import scipy.sparse as sp

    return sp.load_npz(io.BytesIO(storage.read_bytes(uri))).tocsr()


def require_plays(storage: "Storage", *, needed_by: str) -> dict:
    """The published plays' pointer; raises :class:`InputMissingError` with one line saying
    why when the catalog has none (an audio-only catalog: embed it with a model trained on
    another, ``embed.registry_root``)."""
    pointer = PLAYS.require(storage, needed_by=needed_by)
    if not pointer.get("files") and not pointer.get("rows"):
        raise InputMissingError(
            f"{needed_by} needs listening data, and this catalog has no plays (ingest run {pointer['run_id']} found "
            f"{pointer.get('source', 'none')!r}); set sources.play_table or sources.triplets, or embed it with a model "
            f"trained on another catalog (embed.registry_root, embed.model_version)")
    return pointer
