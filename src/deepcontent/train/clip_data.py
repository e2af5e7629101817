"""Ray Data ingest for the train stage: spectrogram shards + targets -> worker shards.

:func:`clip_datasets` builds one dataset for ``train`` and one for ``valid``: one block per
published spectrogram shard, read in the task through :class:`~deepcontent.storage.Storage`
(the same client code as every other stage; credentials travel inside the pickled Storage,
never in logs or the environment) and joined with the targets in ``map_batches`` (a hash
lookup on track_id that drops every other track, so test songs never leave the read task).
:func:`clip_data_config` shards ``train`` into equal parts and ``valid`` into disjoint parts
that together keep every clip.

This module imports only pyarrow and the storage module: Ray Data's task processes import it
to run :func:`read_clip_shards`, and each process pays the import once.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.storage import Storage

__all__ = ["SPECTROGRAM_COLUMNS", "attach_targets", "clip_data_config", "clip_datasets", "read_clip_shards"]

#: Columns of the spectrogram shards a worker needs.
SPECTROGRAM_COLUMNS = ["track_id", "n_mels", "n_frames", "mel"]


def attach_targets(batch: pa.Table, *, targets: pa.Table) -> pa.Table:
    """``map_batches`` body: keep the spectrogram rows whose track has a target and add its
    ``target`` and ``item_idx`` (a hash lookup, no shuffle)."""
    pos = pc.index_in(batch["track_id"], value_set=targets["track_id"])
    keep = pc.is_valid(pos)
    kept, pos = batch.filter(keep), pos.filter(keep)
    return (kept.select(SPECTROGRAM_COLUMNS)
            .append_column("target", pc.take(targets["target"], pos))
            .append_column("item_idx", pc.take(targets["item_idx"], pos)))


def read_clip_shards(batch: pa.Table, *, storage: Storage, targets: pa.Table, rows_per_batch: int = 16) -> Iterator[pa.Table]:
    """``map_batches`` body over a table of shard URIs: stream each spectrogram shard from
    object storage in small record batches and yield the rows with a target
    (:func:`attach_targets`), so a task never holds more than one shard's read buffer plus a
    few clips."""
    for uri in batch["uri"].to_pylist():
        for rb in storage.iter_parquet_batches(uri, columns=SPECTROGRAM_COLUMNS, batch_size=rows_per_batch):
            out = attach_targets(pa.Table.from_batches([rb]), targets=targets)
            if out.num_rows:
                yield out


def clip_datasets(storage: Storage, *, files: list[str], train: pa.Table, valid: pa.Table, num_cpus: float = 0.0,
                  concurrency: int = 2) -> dict:
    """``{"train": Dataset, "valid": Dataset}`` streaming the spectrogram shards ``files`` with
    the ``train`` / ``valid`` targets (tables of track_id, item_idx, target).

    One Ray Data block per shard URI; a task reads its shard through :class:`Storage` (the
    same client code as every other stage, with the credentials inside the pickled Storage,
    never in logs or the environment). ``ray.data.read_parquet`` with the Storage's pyarrow
    filesystem would do the same, but in Ray 2.60 its path resolution can fail with
    ``ImportError: cannot import name 'HTTPFileSystem'`` when ``aiohttp`` is not installed.

    ``num_cpus`` / ``concurrency``: resources of each read task and how many run at once
    (``train.ingest_cpus`` / ``train.ingest_concurrency``).
    """
    import ray.data

    if not files:
        raise ValueError("clip_datasets needs at least one spectrogram shard")
    out = {}
    for name, targets in (("train", train), ("valid", valid)):
        uris = ray.data.from_items([{"uri": u} for u in files], override_num_blocks=len(files))
        out[name] = uris.map_batches(read_clip_shards, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                                     compute=ray.data.TaskPoolStrategy(size=concurrency),
                                     fn_kwargs={"storage": storage, "targets": targets})
    return out


def _clip_data_config_cls():
    from ray.train import DataConfig

    class ClipDataConfig(DataConfig):
        """``train`` in equal shards (balanced work per DDP rank; at most ``world - 1`` clips
        dropped), ``valid`` in disjoint shards that together hold every clip, so the
        validation NMSE does not depend on the number of workers."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=name != "valid", locality_hints=hints)):
                    output[i][name] = split
            return output

    return ClipDataConfig


def clip_data_config():
    """A :class:`ray.train.DataConfig` for the ``train`` / ``valid`` clip datasets (the class
    is built on first use, so importing this module does not import Ray)."""
    return _clip_data_config_cls()()
