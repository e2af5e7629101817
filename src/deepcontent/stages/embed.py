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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import EMBED_STAGING, SPECTROGRAMS
from deepcontent.embed.inference import STAGED_SCHEMA, ClipEmbedder, pair_keys, work_items
from deepcontent.errors import InputMissingError
from deepcontent.manifest import log
from deepcontent.registry import model_registry, production_version
from deepcontent.stages.base import QuarantineCheck, StageContext, StageResult, StageRun
from deepcontent.storage import Storage, join, safe_key

__all__ = ["STAGE", "clips_per_item", "matching_settings", "run", "spectrogram_pairs"]

STAGE = "embed"
QUARANTINE = datasets.quarantine(STAGE)
#: Work items per actor a run is cut into (fewer once items reach MAX_ITEM_CLIPS): enough that
#: the actors finish close together, few enough that what each item costs (a Ray task, a shard
#: footer, a staged file) stays small next to its clips.
ITEMS_PER_ACTOR = 8
#: The largest work item (clips): about one shard, a few MB of staged vectors.
MAX_ITEM_CLIPS = 4096
#: Rows per part the commit hands to the upsert. Each part becomes its own data files (one per
#: partition it touches: 16 track buckets), so a part per staged file made thousands of small
#: files at catalog scale; the Iceberg writer holds ~15 times a part's bytes while it splits
#: and writes it, so parts stay at ~30 MB of 450-float vectors (~0.5 GB of driver memory).
COMMIT_PART_ROWS = 16_384


def clips_per_item(n_pending: int, *, actors: int, clips_per_batch: int) -> int:
    """Clips per work item for ``n_pending`` clips: ~:data:`ITEMS_PER_ACTOR` items an actor,
    at least ``clips_per_batch`` and at most :data:`MAX_ITEM_CLIPS`. Each item costs a Ray task,
    a shard footer read and a staged file (written, then read by the commit), so a large run
    wants few large items; a nightly with a few thousand clips still gives every actor work."""
    target = -(-n_pending // max(1, actors * ITEMS_PER_ACTOR))
    return max(clips_per_batch, min(MAX_ITEM_CLIPS, target))


def spectrogram_pairs(storage: Storage, *, threads: int = 8) -> pa.Table:
    """``(track_id, audio_sha256, settings_key, uri, row_group, row)`` of every published
    spectrogram, ``row`` being its position in ``row_group``.

    Reads three small columns of each shard in one call (``threads`` shards at a time: object
    storage answers in latency, not bandwidth), never the mels; row groups and positions come
    from the shard's footer, so a catalog of many small row groups costs no call per group."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    SPECTROGRAMS.require(storage, needed_by="embed")
    schema = pa.schema([("track_id", pa.string()), ("audio_sha256", pa.string()), ("settings_key", pa.string()),
                        ("uri", pa.string()), ("row_group", pa.int32()), ("row", pa.int32())])

    def read(uri: str) -> pa.Table:
        with storage.open_input(uri) as f:
            pf = pq.ParquetFile(f, pre_buffer=True)
            t = pf.read(columns=["track_id", "audio_sha256", "settings_key"])
            sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
        first = np.repeat(np.cumsum(sizes) - sizes, sizes)
        return (t.append_column("uri", pa.repeat(pa.scalar(uri, pa.string()), t.num_rows))
                .append_column("row_group", pa.array(np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)))
                .append_column("row", pa.array((np.arange(t.num_rows) - first).astype(np.int32)))
                .cast(schema))

    files = SPECTROGRAMS.files(storage)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        parts = list(pool.map(read, files))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def matching_settings(pairs: pa.Table, *, settings_key: str, model_version: str) -> pa.Table:
    """The spectrograms computed with the model's settings. None matching while others exist is
    an error (the catalog would silently get no embeddings); some not matching is logged.

    Raises
    ------
    InputMissingError
        Naming both keys and the count, and what to run.
    """
    match = pairs.filter(pc.equal(pairs["settings_key"], settings_key))
    others = pairs.num_rows - match.num_rows
    if others:
        found = sorted(set(pc.filter(pairs["settings_key"], pc.not_equal(pairs["settings_key"], settings_key)).to_pylist()))
        message = (f"{others} of {pairs.num_rows} published spectrograms were computed with settings {', '.join(found)}, "
                   f"but model {model_version} was trained on {settings_key}")
        if not match.num_rows:
            raise InputMissingError(f"embed: {message}; none match, so nothing can be embedded. Re-run `deepcontent "
                                    f"spectrograms` with the model's spectrogram settings, or train a model on the new ones")
        log.warning("embed: %s; only the %d matching ones are embedded", message, match.num_rows)
    return match.drop_columns(["settings_key"])


def _embedder_kwargs(cfg: Config, storage: Storage, *, version: str, staging: str) -> dict:
    ec = cfg.embed
    return {"storage": storage, "model_version": version, "staging_uri": staging,
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
        from deepcontent.hooks import resolve_hook

        resolve_hook(path, field="embed.before_commit_hook")(**kwargs)


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage; see the module docstring. Ray is joined or started through ``ctx`` when
    there are more clips than ``embed.in_process_max_clips``."""
    from pyiceberg.expressions import EqualTo

    from deepcontent.registry import load_model

    storage, warehouse, ec = ctx.storage, ctx.warehouse, cfg.embed
    if ec.before_commit_hook:
        from deepcontent.hooks import check_hook

        check_hook(ec.before_commit_hook, field="embed.before_commit_hook")  # before any work
    registry = model_registry(cfg, storage)
    version = ec.model_version or production_version(registry)
    _, artifact = load_model(registry, version)
    if artifact.get("input", "log_mel") != "log_mel" or artifact.get("targets", "plays") != "plays":
        raise ValueError(f"embed: model {version} reads {artifact.get('input')} and predicts {artifact.get('targets')} "
                         f"factors; the embeddings table needs a log-mel model of the listening factors "
                         f"(set embed.model_version to one)")
    settings_key = artifact["spectrograms"]["settings_key"]
    with StageRun(STAGE, cfg, storage) as run:
        outputs = {"table": ".".join(warehouse.identifier("embeddings")), "quarantine": run.uri(QUARANTINE)}
        warehouse.ensure_tables(["embeddings"])

        with run.timed("plan"):
            all_pairs = spectrogram_pairs(storage)
            pairs = matching_settings(all_pairs, settings_key=settings_key, model_version=version)
            stored = warehouse.read("embeddings", EqualTo("model_version", version), columns=["track_id", "audio_sha256"])
            stored = stored.cast(pa.schema([("track_id", pa.string()), ("audio_sha256", pa.string())]))
            stored_keys = pair_keys(stored["track_id"], stored["audio_sha256"]) if stored.num_rows else pa.array([], pa.string())
            pending = pairs.filter(pc.invert(pc.is_in(pair_keys(pairs["track_id"], pairs["audio_sha256"]),
                                                      value_set=stored_keys)))
            is_changed = pc.is_in(pending["track_id"], value_set=stored["track_id"])
            n_changed = int(pc.sum(is_changed).as_py() or 0)
        counts = {"spectrograms": pairs.num_rows, "to_embed": pending.num_rows, "new": pending.num_rows - n_changed,
                  "changed": n_changed, "other_settings": all_pairs.num_rows - pairs.num_rows}
        run.manifest.inputs = {"model_version": version, "settings_key": settings_key,
                               "spectrograms": SPECTROGRAMS.run_id(storage)}
        # What this run sees; the completion marker (written last) says a run on it finished.
        fingerprint = f"{version}:{settings_key}:{SPECTROGRAMS.run_id(storage)}"
        if pending.num_rows == 0:
            if run.previous(fingerprint, warehouse=warehouse) is None:
                # Everything is embedded but the run that committed it died before its last
                # step: publish the (now empty) quarantine and the marker it never wrote.
                log.info("embed: all %d spectrograms embedded with %s; finishing the previous run's publish",
                         pairs.num_rows, version)
                run.publish_quarantine()
                return run.succeed(counts={**counts, "embedded": 0, "quarantined": 0}, outputs=outputs,
                                   published=False, fingerprint=fingerprint, model_version=version,
                                   seconds=dict(run.manifest.timings_s))
            log.info("embed: all %d spectrograms already embedded with %s; nothing to do", pairs.num_rows, version)
            return run.unchanged(outputs=outputs, counts={**counts, "embedded": 0}, model_version=version,
                                 seconds=dict(run.manifest.timings_s))

        n_shards = len(pc.unique(pending["uri"]))
        items = work_items(pending, clips_per_item=clips_per_item(pending.num_rows, actors=ec.actors,
                                                                     clips_per_batch=ec.clips_per_batch))
        staging = join(storage.uri(EMBED_STAGING), safe_key(run.run_id))
        in_process = pending.num_rows <= ec.in_process_max_clips
        log.info("embed: run %s — %d clips to embed with %s (%d new, %d changed audio) from %d shards, %s",
                 run.run_id, pending.num_rows, version, counts["new"], n_changed, n_shards,
                 "in this process" if in_process else f"{ec.actors} Ray actors" + (" on GPUs" if ec.use_gpu else ""))
        embedder = _embedder_kwargs(cfg, storage, version=version, staging=staging)
        embedder["registry"] = registry
        if not in_process:
            ctx.ensure_ray()
        with run.timed("inference"):
            staged = (_embed_in_process(items, embedder=embedder) if in_process
                      else _embed_on_ray(cfg, storage, items=items, embedder=embedder))
        _call_hook(ec.before_commit_hook, run_id=run.run_id, staged=[s["file"] for s in staged])

        with run.timed("commit"):
            files = [s["file"] for s in staged]
            # The driver reads only the small columns of the staged files to account for every
            # clip; the vectors stream from the staged files to the table's data files one part
            # (COMMIT_PART_ROWS) at a time.
            heads = [storage.read_parquet(f, columns=["track_id", "audio_sha256", "status"]) for f in files]
            head = pa.concat_tables(heads) if heads else STAGED_SCHEMA.empty_table().select(
                ["track_id", "audio_sha256", "status"])
            # A shard re-read by a retried task can repeat a clip: keep one row per pair.
            first = _first_per_pair(head)
            out = head.filter(pa.array(first))
            status = Counter(out["status"].to_pylist())
            bad = out.filter(pc.not_equal(out["status"], "ok"))
            n_good = out.num_rows - bad.num_rows
            missing = max(pending.num_rows - out.num_rows, 0)
            run.reject(pa.table({
                "source": bad["track_id"], "reason": bad["status"],
                "detail": pa.array([f"model {version}: non-finite output for audio {s}" for s in bad["audio_sha256"].to_pylist()],
                                   pa.string())}))
            rejected = {k: v for k, v in status.items() if k != "ok"}
            if missing:
                rejected["missing"] = missing
            run.check_quarantine([QuarantineCheck(rejected, pending.num_rows, unit="clips", label=f"model {version}")],
                                 limit=ec.max_quarantine_fraction)
            computed_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
            keep = [pc.and_(pa.array(first[o:o + h.num_rows]), pc.equal(h["status"], "ok"))
                    for o, h in zip(np.cumsum([0] + [h.num_rows for h in heads]), heads)]
            # The rows() parts in order, keys only: the upsert plans from these instead of
            # reading every staged file an extra time.
            good = head.filter(pa.array(np.concatenate([k.to_numpy() for k in keep]))) if keep else head
            upsert_heads = pa.table({"track_id": good["track_id"],
                                     "model_version": pa.repeat(pa.scalar(version, pa.string()), good.num_rows),
                                     "audio_sha256": good["audio_sha256"]})

            def part(tables: list[pa.Table]) -> pa.Table:
                good = pa.concat_tables(tables)
                n = good.num_rows
                return pa.table({
                    "track_id": good["track_id"], "model_version": pa.repeat(pa.scalar(version, pa.string()), n),
                    "predicted_factors": good["predicted_factors"], "embedding": good["embedding"],
                    "audio_sha256": good["audio_sha256"],
                    "computed_at": pa.repeat(pa.scalar(computed_at, pa.timestamp("us", tz="UTC")), n),
                })

            def rows():
                held, n = [], 0
                for f, mask in zip(files, keep):
                    if not pc.any(mask).as_py():
                        continue
                    held.append(storage.read_parquet(f).filter(mask))
                    n += held[-1].num_rows
                    if n >= COMMIT_PART_ROWS:
                        yield part(held)
                        held, n = [], 0
                if held:
                    yield part(held)

            committed = run.committed("embeddings", warehouse.upsert("embeddings", rows, run_id=run.run_id,
                                                                     heads=upsert_heads))
            run.publish_quarantine()
            run.commit_quarantine(warehouse)
        # Staged files are only inputs of the commit: this run's, and those killed runs left
        # (older than the grace period; a concurrent run's are younger).
        storage.sweep_prefix(storage.uri(EMBED_STAGING), own=staging)

        log.info("embed: committed %d embeddings (%d new, %d changed) to %s in one commit; quarantined %d",
                 n_good, counts["new"], n_changed, outputs["table"], bad.num_rows)
        return run.succeed(counts={**counts, "embedded": n_good, "quarantined": bad.num_rows},
                           quarantined={k: v for k, v in status.items() if k != "ok"}, outputs=outputs,
                           published=committed, model_version=version, seconds=dict(run.manifest.timings_s),
                           fingerprint=fingerprint)


def _first_per_pair(t: pa.Table) -> np.ndarray:
    """``(n,)`` bool: the first row of each (track_id, audio_sha256) pair."""
    if t.num_rows == 0:
        return np.zeros(0, dtype=bool)
    rows = pa.table({"k": pair_keys(t["track_id"], t["audio_sha256"]),
                     "i": pa.array(np.arange(t.num_rows, dtype=np.int64))})
    firsts = rows.group_by("k").aggregate([("i", "min")])["i_min"].to_numpy()
    mask = np.zeros(t.num_rows, dtype=bool)
    mask[firsts] = True
    return mask
