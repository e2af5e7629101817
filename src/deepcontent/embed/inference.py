"""The work of the ``embed`` stage on one batch of clips: read, run the model, stage the output.

:class:`ClipEmbedder` is a Ray Data actor (or, for a handful of clips, a plain object in the
driver). It loads the registered model **once** (on its GPU with ``embed.use_gpu``) and for each
work item ``(shard URI, row groups)``:

1. streams those row groups of the spectrogram shard from object storage through
   :class:`~deepcontent.storage.Storage`, keeping only the (track, audio hash) pairs the run
   must embed (:func:`read_todo_clips`);
2. computes clip-level predicted factors and embeddings
   (:func:`~deepcontent.embed.pooling.clip_outputs`); a clip whose outputs are not finite is
   marked ``non_finite`` instead of carrying vectors;
3. writes them as one Parquet file under the run's staging prefix and returns only the file's
   URI and counts. Nothing staged is visible to readers until the driver commits.

Reading and writing inside the actor (rather than in separate Ray Data tasks) matters here: the
actors hold the CPUs, and zero-CPU read/write tasks made Ray start extra worker processes, each
paying the imports, for every run.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.datasets import mel_arrays
from deepcontent.storage import Storage, join

__all__ = ["CLIP_COLUMNS", "STAGED_SCHEMA", "ClipEmbedder", "pair_keys", "read_todo_clips", "work_items", "write_staged"]

CLIP_COLUMNS = ["track_id", "audio_sha256", "n_mels", "n_frames", "mel"]
STAGED_SCHEMA = pa.schema([
    ("track_id", pa.string()), ("audio_sha256", pa.string()), ("status", pa.string()),
    ("predicted_factors", pa.list_(pa.float32())), ("embedding", pa.list_(pa.float32())),
])


def pair_keys(track_id: pa.ChunkedArray | pa.Array, audio_sha256: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """One string per (track, audio hash) pair, for set membership in Arrow (``string`` whatever
    the inputs' string flavour: Iceberg reads give ``large_string``)."""
    return pc.binary_join_element_wise(pc.cast(track_id, pa.string()), pc.cast(audio_sha256, pa.string()), "\x00")


def read_todo_clips(batch: pa.Table, *, storage: Storage, todo_keys: pa.Array) -> Iterator[pa.Table]:
    """Work items ``(uri, row_groups)`` -> those row groups of each spectrogram shard, keeping
    the rows whose (track_id, audio_sha256) is in ``todo_keys`` (:func:`pair_keys`), one row
    group at a time."""
    for uri, groups in zip(batch["uri"].to_pylist(), batch["row_groups"].to_pylist()):
        for _, t in storage.read_row_groups(uri, groups, columns=CLIP_COLUMNS):
            t = t.filter(pc.is_in(pair_keys(t["track_id"], t["audio_sha256"]), value_set=todo_keys))
            if t.num_rows:
                yield t


def work_items(pending: pa.Table, *, clips_per_item: int) -> list[dict]:
    """Split the pending clips into read tasks: ``[{"uri", "row_groups"}]`` with about
    ``clips_per_item`` pending clips each (whole row groups of one shard per item), so that
    several actors get work even when everything new sits in one shard.

    ``pending`` has columns ``uri`` and ``row_group`` (one row per clip to embed)."""
    counts: dict[tuple[str, int], int] = {}
    for uri, g in zip(pending["uri"].to_pylist(), pending["row_group"].to_pylist()):
        counts[(uri, g)] = counts.get((uri, g), 0) + 1
    items: list[dict] = []
    current: dict | None = None
    for (uri, g), n in sorted(counts.items()):
        if current is None or current["uri"] != uri or current["n"] >= clips_per_item:
            current = {"uri": uri, "row_groups": [], "n": 0}
            items.append(current)
        current["row_groups"].append(g)
        current["n"] += n
    return [{"uri": i["uri"], "row_groups": i["row_groups"]} for i in items]


class ClipEmbedder:
    """Ray Data actor: work items -> staged Parquet files of clip vectors, one model load per actor.

    Parameters
    ----------
    storage : Storage
        Where the shards and the staging prefix are.
    registry : Storage, optional
        Where the model registry is (default: ``storage``).
    model_version : str
    todo_keys : pa.Array
        :func:`pair_keys` of the (track, audio hash) pairs to embed.
    staging_uri : str
        Prefix for the staged files.
    use_gpu : bool
        Run on ``cuda`` (the GPU Ray assigned to this actor) with bf16 autocast unless
        ``precision="fp32"``; otherwise CPU fp32 with ``threads`` torch threads.
    threads : int
    precision : {"auto", "fp32", "bf16"}
    clips_per_forward_batch : int
        Clips pooled per call of :func:`clip_outputs`.
    windows_per_forward : int
    """

    def __init__(self, *, storage: Storage, model_version: str, todo_keys: pa.Array, staging_uri: str,
                 registry: Storage | None = None,
                 use_gpu: bool = False, threads: int = 1, precision: str = "auto", clips_per_forward_batch: int = 32,
                 windows_per_forward: int = 256) -> None:
        import torch

        from deepcontent.registry import load_model

        torch.set_num_threads(threads)
        if precision == "bf16" and not use_gpu:
            raise ValueError("embed.precision='bf16' needs embed.use_gpu=true; use 'auto' or 'fp32' on CPU")
        self.storage, self.todo_keys, self.staging_uri = storage, todo_keys, staging_uri
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

        clips = mel_arrays(batch, copy=True)  # writable (torch wants it), float16 until the device
        pred, emb = clip_outputs(self.model, clips, n_frames=self.n_frames, target_mean=self.mean, target_std=self.std,
                                 windows_per_forward=self.windows_per_forward, device=self.device, autocast=self.autocast)
        ok = np.isfinite(pred).all(axis=1) & np.isfinite(emb).all(axis=1)
        return pa.table({
            "track_id": batch["track_id"], "audio_sha256": batch["audio_sha256"],
            "status": pa.array(np.where(ok, "ok", "non_finite"), pa.string()),
            "predicted_factors": pa.array([p.tolist() if k else None for p, k in zip(pred, ok)], pa.list_(pa.float32())),
            "embedding": pa.array([e.tolist() if k else None for e, k in zip(emb, ok)], pa.list_(pa.float32())),
        }, schema=STAGED_SCHEMA)

    def __call__(self, items: pa.Table) -> pa.Table:
        """Work items ``(uri, row_groups)`` -> ``(file, rows, ok)``, one staged file per item."""
        out = []
        for item in items.to_pylist():
            parts, pending, n = [], [], 0
            for t in read_todo_clips(pa.Table.from_pylist([item]), storage=self.storage, todo_keys=self.todo_keys):
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
    storage.write_parquet(batch.cast(STAGED_SCHEMA), uri)
    n_ok = int(pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0)
    return pa.table({"file": [uri], "rows": [batch.num_rows], "ok": [n_ok]})
