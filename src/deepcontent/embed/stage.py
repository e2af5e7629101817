"""Stage ``embed`` (Ray Data): spectrograms + a registered model -> the ``embeddings`` table.

1. The model is ``embed.model_version`` or the production one (``models/production.json``);
   only spectrograms computed with the settings the model was trained on are used.
2. **Incremental.** The (track, audio hash) pairs of the published spectrograms are compared
   with the ``embeddings`` rows of this model version: only new tracks and tracks whose audio
   changed are embedded, so a re-run with nothing new reads no clip and commits nothing.
3. Ray Data hands work items (a shard and some of its row groups) to a pool of
   :class:`~deepcontent.embed.inference.ClipEmbedder` actors (model loaded once each; a GPU each
   with ``embed.use_gpu``). An actor reads its clips from object storage, computes a clip-level
   ``predicted_factors`` (WMF units) and ``embedding`` (penultimate layer), both averaged over
   consecutive ~3 s windows, and stages them as Parquet under
   ``<root>/embeddings/staging/<run_id>/``. A nightly run with a handful of new clips (at most
   ``embed.in_process_max_clips``) does the same in the driver process: starting actors would
   cost more than the inference.
4. **One commit per run.** The driver upserts every staged vector into the Iceberg
   ``embeddings`` table (key: track_id, model_version) in a single catalog commit; the table's
   data files are Parquet in the same object store (``warehouse.location``). Until that commit
   readers see the previous version; a run killed before it leaves only staged files, which the
   next run ignores and sweeps. Clips whose outputs are not finite go to
   ``quarantine/embed`` (reason ``non_finite``) instead of the table; above
   ``embed.max_quarantine_fraction`` the run fails and commits nothing.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.config import Config
from deepcontent.embed.inference import STAGED_SCHEMA, ClipEmbedder, pair_keys, work_items
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.spectrograms import SPECTROGRAMS
from deepcontent.storage import Storage, join, new_run_id, safe_key

__all__ = ["EmbedQuarantineExceeded", "EmbedResult", "QUARANTINE", "STAGE", "production_version", "run_embed"]

STAGE = "embed"
STAGING = "embeddings/staging"
QUARANTINE = "quarantine/embed"
QUARANTINE_SCHEMA = pa.schema([("stage", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                               ("detail", pa.string()), ("run_id", pa.string())])


class EmbedQuarantineExceeded(RuntimeError):
    """Too many clips gave non-finite outputs; nothing was committed."""


@dataclass
class EmbedResult(StageResult):
    """:class:`StageResult` plus the model version that was applied."""

    model_version: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model_version": self.model_version, "seconds": self.seconds}


def production_version(storage: Storage) -> str:
    """The production model version (``models/production.json``)."""
    from deepcontent.train.registry import PRODUCTION

    uri = storage.uri(PRODUCTION)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no model in production: {uri} does not exist; run `deepcontent train` first")
    return storage.read_json(uri)["model_version"]


def spectrogram_pairs(storage: Storage, *, settings_key: str) -> pa.Table:
    """``(track_id, audio_sha256, uri, row_group)`` of every published spectrogram computed with
    ``settings_key`` (reads two small columns per row group, never the mels)."""
    import pyarrow.parquet as pq

    parts = []
    dataset = storage.uri(SPECTROGRAMS)
    if storage.published(dataset) is None:
        raise FileNotFoundError(f"no spectrograms published at {dataset}; run `deepcontent spectrograms` first")
    for uri in storage.published_files(dataset):
        with storage.open_input(uri) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=["track_id", "audio_sha256", "settings_key"])
                t = t.filter(pc.equal(t["settings_key"], settings_key)).select(["track_id", "audio_sha256"])
                parts.append(t.append_column("uri", pa.array([uri] * t.num_rows, pa.string()))
                             .append_column("row_group", pa.array([g] * t.num_rows, pa.int32())))
    schema = pa.schema([("track_id", pa.string()), ("audio_sha256", pa.string()), ("uri", pa.string()),
                        ("row_group", pa.int32())])
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _embedder_kwargs(cfg: Config, storage: Storage, *, version: str, todo_keys: pa.Array, staging: str) -> dict:
    ec = cfg.embed
    return {"storage": storage, "model_version": version, "todo_keys": todo_keys, "staging_uri": staging,
            "use_gpu": ec.use_gpu, "threads": ec.threads_per_actor, "precision": ec.precision,
            "clips_per_forward_batch": ec.clips_per_batch, "windows_per_forward": ec.windows_per_forward}


def _embed_on_ray(cfg: Config, storage: Storage, *, items: list[dict], embedder: dict) -> list[dict]:
    """Ray Data: work items -> a pool of :class:`ClipEmbedder` actors; returns one
    ``{"file", "rows", "ok"}`` per staged file."""
    import ray.data

    ec = cfg.embed
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ClipEmbedder, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(ec.actors, len(items)))),
                        num_gpus=1 if ec.use_gpu else 0, num_cpus=ec.cpus_per_actor, fn_constructor_kwargs=embedder)
    return ds.take_all()


def _embed_in_process(items: list[dict], *, embedder: dict) -> list[dict]:
    """The same work without Ray, for a handful of clips (``embed.in_process_max_clips``):
    starting actors would cost more than the inference."""
    worker = ClipEmbedder(**embedder)
    return worker(pa.Table.from_pylist(items)).to_pylist()


def _call_hook(path: str | None, **kwargs) -> None:
    if path:
        from deepcontent.audio.sandbox import resolve

        resolve(path)(**kwargs)


def run_embed(cfg: Config, storage: Storage, warehouse) -> EmbedResult:
    """Run the stage; see the module docstring. Starts Ray when it is not running (and shuts it
    down again); a Ray session the caller started is kept."""
    import ray

    from deepcontent.engines.ray import init_ray
    from deepcontent.train.registry import load_model

    ec = cfg.embed
    version = ec.model_version or production_version(storage)
    _, artifact = load_model(storage, version)
    if artifact.get("input", "log_mel") != "log_mel" or artifact.get("targets", "plays") != "plays":
        raise ValueError(f"embed: model {version} reads {artifact.get('input')} and predicts {artifact.get('targets')} "
                         f"factors; the embeddings table needs a log-mel model of the listening factors "
                         f"(set embed.model_version to one)")
    settings_key = artifact["spectrograms"]["settings_key"]
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("embed"))
    outputs = {"table": ".".join(warehouse.identifier("embeddings")), "quarantine": storage.uri(QUARANTINE)}
    warehouse.ensure_tables(["embeddings"])

    with manifest.timed("plan"):
        pairs = spectrogram_pairs(storage, settings_key=settings_key)
        stored = warehouse.read("embeddings", f"model_version = '{version}'", columns=["track_id", "audio_sha256"])
        stored = stored.cast(pa.schema([("track_id", pa.string()), ("audio_sha256", pa.string())]))
        stored_keys = pair_keys(stored["track_id"], stored["audio_sha256"]) if stored.num_rows else pa.array([], pa.string())
        pending = pairs.filter(pc.invert(pc.is_in(pair_keys(pairs["track_id"], pairs["audio_sha256"]),
                                                  value_set=stored_keys)))
        is_changed = pc.is_in(pending["track_id"], value_set=stored["track_id"])
        n_changed = int(pc.sum(is_changed).as_py() or 0)
    counts = {"spectrograms": pairs.num_rows, "to_embed": pending.num_rows, "new": pending.num_rows - n_changed,
              "changed": n_changed}
    manifest.inputs = {"model_version": version, "settings_key": settings_key,
                       "spectrograms": (storage.published(storage.uri(SPECTROGRAMS)) or {}).get("run_id")}
    if pending.num_rows == 0:
        log.info("embed: all %d spectrograms already embedded with %s; nothing to do", pairs.num_rows, version)
        return EmbedResult(run_id, False, {**counts, "embedded": 0}, {}, outputs, model_version=version,
                           seconds=dict(manifest.timings_s))

    shards = sorted(set(pending["uri"].to_pylist()))
    items = work_items(pending, clips_per_item=ec.clips_per_batch)
    staging = join(storage.uri(STAGING), safe_key(run_id))
    log.info("embed: run %s — %d clips to embed with %s (%d new, %d changed audio) from %d shards, %s",
             run_id, pending.num_rows, version, counts["new"], n_changed, len(shards),
             "in this process" if pending.num_rows <= ec.in_process_max_clips
             else f"{ec.actors} Ray actors" + (" on GPUs" if ec.use_gpu else ""))
    embedder = _embedder_kwargs(cfg, storage, version=version, staging=staging,
                                todo_keys=pair_keys(pending["track_id"], pending["audio_sha256"]))
    if pending.num_rows <= ec.in_process_max_clips:
        with manifest.timed("inference"):
            staged = _embed_in_process(items, embedder=embedder)
    else:
        started_here = not ray.is_initialized()
        try:
            init_ray(cfg.ray)
            with manifest.timed("inference"):
                staged = _embed_on_ray(cfg, storage, items=items, embedder=embedder)
        finally:
            if started_here:
                ray.shutdown()
    _call_hook(ec.before_commit_hook, run_id=run_id, staged=[s["file"] for s in staged])

    with manifest.timed("commit"):
        files = [s["file"] for s in staged]
        out = storage.read_parquet(files) if files else STAGED_SCHEMA.empty_table()
        # A shard re-read by a retried task can repeat a clip: keep one row per pair.
        out = _one_per_pair(out)
        status = Counter(out["status"].to_pylist())
        bad = out.filter(pc.not_equal(out["status"], "ok"))
        good = out.filter(pc.equal(out["status"], "ok"))
        missing = pending.num_rows - out.num_rows
        quarantine = pa.table({
            "stage": pa.array([STAGE] * bad.num_rows, pa.string()), "source": bad["track_id"],
            "reason": bad["status"], "detail": pa.array([f"model {version}: non-finite output for audio {s}"
                                                         for s in bad["audio_sha256"].to_pylist()], pa.string()),
            "run_id": pa.array([run_id] * bad.num_rows, pa.string())}, schema=QUARANTINE_SCHEMA)
        q_file = join(storage.staging_uri(outputs["quarantine"], run_id), "part-00000.parquet")
        storage.write_parquet(quarantine, q_file)
        n_bad = bad.num_rows + max(missing, 0)
        if n_bad / pending.num_rows > ec.max_quarantine_fraction:
            storage.publish(outputs["quarantine"], run_id=run_id, files=[q_file], meta={"stage": STAGE, "failed": True})
            uri = manifest.write(storage, status="failed")
            raise EmbedQuarantineExceeded(
                f"embed: {n_bad} of {pending.num_rows} clips failed with model {version} ({dict(status)}, "
                f"{missing} missing) > {ec.max_quarantine_fraction:.1%}; nothing committed; quarantine at "
                f"{outputs['quarantine']} (manifest {uri})")
        computed_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        rows = pa.table({
            "track_id": good["track_id"], "model_version": pa.array([version] * good.num_rows, pa.string()),
            "predicted_factors": good["predicted_factors"], "embedding": good["embedding"],
            "audio_sha256": good["audio_sha256"],
            "computed_at": pa.array([computed_at] * good.num_rows, pa.timestamp("us", tz="UTC")),
        })
        committed = warehouse.upsert("embeddings", rows, run_id=run_id)
        storage.publish(outputs["quarantine"], run_id=run_id, files=[q_file], meta={"stage": STAGE})
    # Staged files are only inputs of the commit: this run's, and any left by killed runs.
    storage.delete_prefix(storage.uri(STAGING))

    manifest.counts = {**counts, "embedded": good.num_rows, "quarantined": bad.num_rows}
    manifest.quarantined = {k: v for k, v in status.items() if k != "ok"}
    manifest.outputs = outputs
    manifest_uri = manifest.write(storage, status="succeeded")
    log.info("embed: committed %d embeddings (%d new, %d changed) to %s in one commit; quarantined %d; manifest %s",
             good.num_rows, counts["new"], n_changed, outputs["table"], bad.num_rows, manifest_uri)
    return EmbedResult(run_id, committed, manifest.counts, manifest.quarantined, outputs, manifest_uri,
                       model_version=version, seconds=dict(manifest.timings_s))


def _one_per_pair(t: pa.Table) -> pa.Table:
    if t.num_rows == 0:
        return t
    keys = pair_keys(t["track_id"], t["audio_sha256"]).to_pylist()
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return t.take(pa.array(sorted(first.values()), pa.int64())) if len(first) < t.num_rows else t


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """A ``list<float32>`` column -> ``(n_rows, d)`` float32 (all rows the same length)."""
    col = table[column].combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(col), -1)
