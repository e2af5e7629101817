"""The work of the ``embed`` stage on one batch of clips: read, run the model, stage the output.

:class:`ClipEmbedder` is a Ray Data actor (or, for a handful of clips, a plain object in the
driver). It loads the registered model **once** (on its GPU with ``embed.use_gpu``) and for each
work item ``(shard URI, row groups, pending rows of each)``:

1. streams those row groups of the spectrogram shard from object storage through
   :class:`~deepcontent.storage.Storage`, keeping only the rows the run must embed
   (:func:`read_item_clips`);
2. computes clip-level predicted factors and embeddings
   (:func:`~deepcontent.embed.pooling.clip_outputs`) on float16 blocks that view the Arrow
   buffers (:func:`~deepcontent.datasets.mel_blocks`); a clip whose outputs are not finite is
   marked ``non_finite`` instead of carrying vectors;
3. writes them as one Parquet file under the run's staging prefix, the vectors wrapped as Arrow
   lists straight from the model's output arrays (:func:`staged_rows`), and returns only the
   file's URI and counts. Nothing staged is visible to readers until the driver commits.

Reading and writing inside the actor (rather than in separate Ray Data tasks) matters here: the
actors hold the CPUs, and zero-CPU read/write tasks made Ray start extra worker processes, each
paying the imports, for every run.
"""

from __future__ import annotations

import uuid
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.datasets import mel_blocks, vector_column
from deepcontent.storage import Storage, join

__all__ = ["CLIP_COLUMNS", "STAGED_SCHEMA", "ClipEmbedder", "pair_keys", "read_item_clips", "retain_freed_memory",
           "staged_rows", "work_items", "write_staged"]

CLIP_COLUMNS = ["track_id", "audio_sha256", "n_mels", "n_frames", "mel"]
STAGED_SCHEMA = pa.schema([
    ("track_id", pa.string()), ("audio_sha256", pa.string()), ("status", pa.string()),
    ("predicted_factors", pa.list_(pa.float32())), ("embedding", pa.list_(pa.float32())),
])


def pair_keys(track_id: pa.ChunkedArray | pa.Array, audio_sha256: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """One string per (track, audio hash) pair, for set membership in Arrow (``string`` whatever
    the inputs' string flavour: Iceberg reads give ``large_string``)."""
    return pc.binary_join_element_wise(pc.cast(track_id, pa.string()), pc.cast(audio_sha256, pa.string()), "\x00")


def read_item_clips(item: Mapping, *, storage: Storage) -> Iterator[pa.Table]:
    """A work item ``{"uri", "row_groups", "rows"}`` (:func:`work_items`) -> the rows to embed
    (:data:`CLIP_COLUMNS`), one row group at a time.

    ``rows[i]`` are the positions in ``row_groups[i]`` the plan found pending: selecting by
    position costs nothing per clip (a membership test of every row against every pending key
    costs the size of the pending set per row group, quadratic in a full run). Spectrogram
    shards are never rewritten in place, so the positions the driver read are these rows.

    Raises
    ------
    ValueError
        If a position is outside its row group (the shard is not the one planned from).
    """
    uri, groups, rows = item["uri"], item["row_groups"], item["rows"]
    for (g, t), pos in zip(storage.read_row_groups(uri, groups, columns=CLIP_COLUMNS), rows):
        if len(pos) and pos[-1] >= t.num_rows:
            raise ValueError(f"{uri}: row group {g} has {t.num_rows} rows, the work item names row {pos[-1]}")
        if len(pos) < t.num_rows:
            t = t.take(pa.array(pos, pa.int64()))
        if t.num_rows:
            yield t


def work_items(pending: pa.Table, *, clips_per_item: int) -> list[dict]:
    """Split the pending clips into read tasks: ``[{"uri", "row_groups", "rows"}]``, so that
    several actors get work even when everything new sits in one shard.

    A shard with ``p`` pending clips becomes ``ceil(p / clips_per_item)`` items of about equal
    size (whole row groups, in row group order): no item is a small leftover, which would leave
    one actor finishing a full-size item alone at the end of a run.

    ``pending`` has columns ``uri``, ``row_group`` and ``row`` (the position in the row group),
    one row per clip to embed; ``rows[i]`` of an item are the sorted positions in
    ``row_groups[i]``. Items come in shard and row group order.
    """
    if pending.num_rows == 0:
        return []
    enc = pc.dictionary_encode(pending["uri"]).combine_chunks()
    uris = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    order = np.argsort(uris, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    shard = rank[enc.indices.to_numpy(zero_copy_only=False)]
    group = pending["row_group"].to_numpy().astype(np.int64)
    row = pending["row"].to_numpy().astype(np.int64)
    srt = np.lexsort((row, group, shard))
    shard, group, row = shard[srt], group[srt], row[srt]
    cuts = np.flatnonzero((shard[1:] != shard[:-1]) | (group[1:] != group[:-1])) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(row)]
    group_shard = shard[starts]
    shard_cuts = np.flatnonzero(group_shard[1:] != group_shard[:-1]) + 1
    items: list[dict] = []
    for a, b in zip(np.r_[0, shard_cuts], np.r_[shard_cuts, len(starts)]):
        sizes = ends[a:b] - starts[a:b]
        total = int(sizes.sum())
        k = -(-total // max(1, clips_per_item))
        # Each row group goes to the item its middle clip falls in: k runs of about total / k.
        which = np.minimum(k - 1, ((np.cumsum(sizes) - sizes / 2) * k // total).astype(np.int64))
        item_cuts = np.flatnonzero(which[1:] != which[:-1]) + 1
        for c, d in zip(a + np.r_[0, item_cuts], a + np.r_[item_cuts, b - a]):
            items.append({"uri": uris[order[group_shard[a]]], "row_groups": group[starts[c:d]].tolist(),
                          "rows": [row[s:e].tolist() for s, e in zip(starts[c:d], ends[c:d])]})
    return items


def staged_rows(*, track_id: pa.Array | pa.ChunkedArray, audio_sha256: pa.Array | pa.ChunkedArray,
                predicted_factors: np.ndarray, embedding: np.ndarray) -> pa.Table:
    """Clip outputs -> :data:`STAGED_SCHEMA` rows, the vectors wrapped by Arrow without a copy.

    Parameters
    ----------
    track_id, audio_sha256 : array [shape=(n,)]
    predicted_factors : np.ndarray [shape=(n, f), dtype=float32]
    embedding : np.ndarray [shape=(n, d), dtype=float32]

    Returns
    -------
    pa.Table
        ``status`` is ``ok``, or ``non_finite`` when either vector holds a NaN or an infinity;
        those rows' vectors are null.

    Raises
    ------
    ValueError
        If the row counts differ.
    """
    n = len(track_id)
    if not (len(audio_sha256) == predicted_factors.shape[0] == embedding.shape[0] == n):
        raise ValueError(f"staged rows: {n} track ids, {len(audio_sha256)} audio hashes, "
                         f"{predicted_factors.shape[0]} predicted factor rows and {embedding.shape[0]} embeddings")
    ok = np.isfinite(predicted_factors).all(axis=1) & np.isfinite(embedding).all(axis=1)
    vector = STAGED_SCHEMA.field("embedding").type
    return pa.table({
        "track_id": track_id, "audio_sha256": audio_sha256,
        "status": pc.if_else(pa.array(ok), "ok", "non_finite"),
        "predicted_factors": vector_column(predicted_factors, valid=ok).cast(vector),
        "embedding": vector_column(embedding, valid=ok).cast(vector),
    }, schema=STAGED_SCHEMA)


def retain_freed_memory(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Make glibc's malloc keep freed blocks up to ``mmap_threshold`` bytes in the heap, and
    up to ``trim_threshold`` bytes of free heap, instead of returning them to the kernel.

    A fresh process (a Ray actor) starts with a 128 KiB mmap threshold that only grows as
    large blocks are freed, and trims the heap eagerly: every forward pass then maps fresh
    pages for its MB-sized activations and faults them in, which made a new actor's forward
    about a third slower than the same code in a long-lived process. Costs at most
    ``trim_threshold`` bytes of retained memory. Returns False (and changes nothing) where the
    C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_trim_threshold, int(trim_threshold)))


class ClipEmbedder:
    """Ray Data actor: work items -> staged Parquet files of clip vectors, one model load per actor.

    Parameters
    ----------
    storage : Storage
        Where the shards and the staging prefix are.
    registry : Storage, optional
        Where the model registry is (default: ``storage``).
    model_version : str
    staging_uri : str
        Prefix for the staged files.
    use_gpu : bool
        Run on ``cuda`` (the GPU Ray assigned to this actor) with bf16 autocast unless
        ``precision="fp32"``; otherwise CPU fp32 with ``threads`` torch threads.
    threads : int
    precision : {"auto", "fp32", "bf16"}
    clips_per_forward_batch : int
        Clips pooled per call of :func:`clip_outputs` (at least; whole row groups are read).
    windows_per_forward : int
    """

    def __init__(self, *, storage: Storage, model_version: str, staging_uri: str, registry: Storage | None = None,
                 use_gpu: bool = False, threads: int = 1, precision: str = "auto", clips_per_forward_batch: int = 32,
                 windows_per_forward: int = 256) -> None:
        import torch

        from deepcontent.registry import load_model

        if precision == "bf16" and not use_gpu:
            raise ValueError("embed.precision='bf16' needs embed.use_gpu=true; use 'auto' or 'fp32' on CPU")
        torch.set_num_threads(threads)
        retain_freed_memory()
        self.storage, self.staging_uri = storage, staging_uri
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model, artifact = load_model(registry or storage, model_version, map_location=self.device)
        self.model.to(self.device)
        self.n_frames = int(artifact["window_frames"])
        self.mean = np.asarray(artifact["target_mean"], np.float32)
        self.std = np.asarray(artifact["target_std"], np.float32)
        self.clips_per_forward_batch = clips_per_forward_batch
        self.windows_per_forward = windows_per_forward
        bf16 = use_gpu and precision in ("auto", "bf16")
        self.autocast = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if bf16 else None

    def vectors(self, batch: pa.Table) -> pa.Table:
        """Spectrogram rows (:data:`CLIP_COLUMNS`) -> :data:`STAGED_SCHEMA` rows."""
        from deepcontent.embed.pooling import clip_outputs

        pred, emb = clip_outputs(self.model, mel_blocks(batch), n_frames=self.n_frames, target_mean=self.mean,
                                 target_std=self.std, windows_per_forward=self.windows_per_forward, device=self.device,
                                 autocast=self.autocast)
        return staged_rows(track_id=batch["track_id"], audio_sha256=batch["audio_sha256"], predicted_factors=pred,
                           embedding=emb)

    def __call__(self, items: pa.Table) -> pa.Table:
        """Work items (:func:`work_items`) -> ``(file, rows, ok)``, one staged file per item."""
        out = []
        for item in items.to_pylist():
            parts, pending, n = [], [], 0
            for t in read_item_clips(item, storage=self.storage):
                pending.append(t)
                n += t.num_rows
                if n >= self.clips_per_forward_batch:
                    parts.append(self.vectors(pa.concat_tables(pending)))
                    pending, n = [], 0
            if pending:
                parts.append(self.vectors(pa.concat_tables(pending)))
            if parts:
                out.append(write_staged(pa.concat_tables(parts), storage=self.storage, staging_uri=self.staging_uri))
        schema = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("ok", pa.int64())])
        return pa.concat_tables([t.cast(schema) for t in out]) if out else schema.empty_table()


def write_staged(batch: pa.Table, *, storage: Storage, staging_uri: str) -> pa.Table:
    """Write the batch as one Parquet file under ``staging_uri``; returns ``(file, rows, ok)``
    so that only file names travel back to the driver."""
    uri = join(staging_uri, f"part-{uuid.uuid4().hex}.parquet")
    # Staged files live until the commit reads them once. Model outputs barely compress (zstd
    # saves ~40% of the bytes for twice the write time of the whole file, a few percent of an
    # actor's time per clip), and dictionary pages on float vectors cost more than that again.
    storage.write_parquet(batch.cast(STAGED_SCHEMA), uri, compression="none", use_dictionary=["status"])
    n_ok = int(pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0)
    return pa.table({"file": [uri], "rows": [batch.num_rows], "ok": [n_ok]})
