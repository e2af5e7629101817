"""Stage ``spectrograms`` (Spark): audio clips -> log-mel shards, incremental, with quarantine.

For every track of ``canonical/tracks`` that has audio, a Spark task fetches the clip from object
storage, and an isolated decoder process (:mod:`deepcontent.engines.sandbox`) turns it into a
float16 log-mel spectrogram with :func:`deepcontent.audio.features.compute_log_mel` (mono,
22,050 Hz, window 1024, hop 512, 128 mel bands, log(1 + 10,000·x)). Each task writes one Parquet
shard; the driver publishes once.

Datasets (under the storage root):

``features/spectrograms``
    The contract table, one row per track: track_id, audio_sha256, sample_rate, hop_length,
    n_mels, n_frames, mel (float16 bytes, n_mels × n_frames, C order), harmonic and percussive
    (same, or null), plus the settings key it was computed with.
``features/audio_index``
    The stage's memory, one row per track it has seen: the audio object's URI, size and
    modification time, its SHA-256, the settings key, and the outcome (``ok`` or a quarantine
    reason). A track is processed again only when one of those changed, so a re-run with
    nothing new publishes nothing and adding 10 tracks processes exactly those 10. An object
    whose metadata changed but whose content hash did not is not decoded again.
``quarantine/spectrograms``
    One row per track whose current audio failed (``empty``, ``undecodable``, ``silent``,
    ``too_long``, ``too_short``, ``timeout``, ``crashed``, ``unreadable``): stage, source (the
    audio URI), reason, detail, run_id.

The manifest's ``timings_s`` holds, besides ``plan``, ``compute`` and ``publish``, the clips'
summed costs ``clip_read``, ``clip_decode``, ``clip_resample``, ``clip_mel``, ``clip_ipc`` and
``clip_write`` (:data:`CLIP_COSTS`): where a run's time went, clip by clip.

When a track's audio changes, the shard holding its old spectrogram is rewritten without it
(copy on write), so readers of the published version always see one row per track. If more
than ``spectrograms.max_quarantine_fraction`` of the clips processed in a run fail, the run
publishes the quarantine (and nothing else) and raises, naming the count and the location.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import AUDIO_INDEX, SHARD_ROW_GROUP, SPECTROGRAMS, TRACKS, Dataset
from deepcontent.engines.sandbox import TRANSIENT_REASONS
from deepcontent.errors import CorruptFileError
from deepcontent.manifest import log
from deepcontent.stages.base import QuarantineCheck, StageContext, StageResult, StageRun
from deepcontent.storage import Storage, join

__all__ = ["CLIP_COSTS", "STAGE", "decode_task", "run", "spectrogram_table"]

STAGE = "spectrograms"
QUARANTINE = datasets.quarantine(STAGE)
# What one clip costs in its task, in wall seconds, summed into the manifest's ``timings_s`` as
# ``clip_<cost>``: reading the object, decoding + downmixing, resampling, the mel spectrogram,
# the round trip to the isolated decoder beyond its own work (pickles, pipe), and building +
# writing its shard's rows (the shard's time shared by its clips).
CLIP_COSTS = ("read", "decode", "resample", "mel", "ipc", "write")
_TASK_DDL = ("track_id string, audio_uri string, audio_size long, audio_modified string, audio_sha256 string, "
             "settings_key string, status string, detail string, shard string, run_id string, attempts int, "
             + ", ".join(f"{c}_s double" for c in CLIP_COSTS))
_TASK_SCHEMA = pa.schema(list(AUDIO_INDEX.schema) + [pa.field(f"{c}_s", pa.float64()) for c in CLIP_COSTS])


def spectrogram_table(results: list[tuple[str, dict]], settings_key: str, *, schema: pa.Schema) -> pa.Table:
    """Contract rows of ``(track_id, result)`` pairs as one table, the arrays copied once; a
    result is :func:`~deepcontent.audio.features.compute_log_mel`'s or
    :func:`~deepcontent.audio.features.compute_waveform`'s.

    Each row group's float16 arrays are concatenated straight into the Arrow buffer of its
    binary column (no ``bytes`` per clip, no builder copy): one chunk per
    :data:`~deepcontent.datasets.SHARD_ROW_GROUP` rows, so no chunk nears Arrow's 2 GiB
    offset limit even for the longest clips.
    """
    def blob_column(key: str) -> pa.ChunkedArray:
        chunks = []
        for start in range(0, len(results), SHARD_ROW_GROUP):
            arrays = [r.get(key) for _, r in results[start : start + SHARD_ROW_GROUP]]
            if all(a is None for a in arrays):
                chunks.append(pa.nulls(len(arrays), pa.binary()))
                continue
            flat = [np.ascontiguousarray(a, dtype=np.float16).reshape(-1) if a is not None else _EMPTY_F16
                    for a in arrays]
            offsets = np.zeros(len(flat) + 1, dtype=np.int32)
            np.cumsum([f.nbytes for f in flat], out=offsets[1:])
            validity = None
            if any(a is None for a in arrays):
                validity = pa.array([a is not None for a in arrays]).buffers()[1]
            data = np.concatenate(flat).view(np.uint8)
            chunks.append(pa.BinaryArray.from_buffers(pa.binary(), len(flat), [validity, pa.py_buffer(offsets),
                                                                                 pa.py_buffer(data)]))
        return pa.chunked_array(chunks, pa.binary())

    def ints(key: str) -> pa.Array:
        return pa.array([int(r[key]) for _, r in results], pa.int32())

    columns = {
        "track_id": pa.array([t for t, _ in results], pa.string()),
        "audio_sha256": pa.array([r["audio_sha256"] for _, r in results], pa.string()),
        "sample_rate": ints("sample_rate"), "hop_length": ints("hop_length"), "n_mels": ints("n_mels"),
        "n_frames": ints("n_frames"),
        "mel": blob_column("mel"), "harmonic": blob_column("harmonic"), "percussive": blob_column("percussive"),
        "settings_key": pa.array([settings_key] * len(results), pa.string()),
    }
    return pa.table([columns[name] for name in schema.names], schema=schema)


_EMPTY_F16 = np.zeros(0, dtype=np.float16)


# ----------------------------------------------------------------------------- Spark task
def decode_task(storage: Storage, *, dataset: Dataset, compute_fn: str, settings, settings_key: str, sc_cfg,
                run_id: str, inputs_bc):
    """mapInArrow body over task numbers: fetch and decode each task's clips in an isolated
    child (:class:`~deepcontent.engines.sandbox.ClipDecoder`), write one shard of ``dataset``
    per task, return one audio-index row per clip.

    ``inputs_bc`` is a broadcast of ``{"groups": [[(track_id, uri, size, modified)], ...],
    "known": {track_id: sha256}}``: a clip whose content hash is in ``known`` is not decoded
    again (status ``unchanged``)."""

    def run(batches):
        from deepcontent.engines.sandbox import ClipDecoder, Failure
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        known = inputs_bc.value["known"]  # track_id -> sha256 of its current good output
        groups = inputs_bc.value["groups"]  # task number -> [(track_id, uri, size, modified)]
        with ClipDecoder(storage, compute_fn, settings=settings, timeout_s=sc_cfg.decode_timeout_s,
                         memory_limit_mb=sc_cfg.decoder_memory_mb, max_bytes=sc_cfg.max_audio_bytes) as decoder:
            for task in (t for batch in batches for t in batch.column("id").to_pylist()):
                items = groups[task]
                results, index = [], []
                for k, data, failure in decoder.fetch([(uri, size) for _, uri, size, _ in items]):
                    track_id, uri, size, modified = items[k]
                    entry = {"track_id": track_id, "audio_uri": uri, "audio_size": size, "audio_modified": modified,
                             "audio_sha256": None, "settings_key": settings_key, "status": "ok", "detail": None,
                             "shard": None, "run_id": run_id, "read_s": decoder.last_read_s}
                    index.append(entry)
                    if failure is not None:
                        entry.update(status=failure.reason, detail=failure.detail)
                        continue
                    if track_id in known:  # metadata changed; content may not have
                        entry["audio_sha256"] = hashlib.sha256(data).hexdigest()
                        if known[track_id] == entry["audio_sha256"]:
                            entry.update(status="unchanged")
                            continue
                    result = decoder.decode(data)
                    if isinstance(result, Failure):
                        entry.update(status=result.reason, detail=result.detail[:500],
                                     audio_sha256=entry["audio_sha256"] or hashlib.sha256(data).hexdigest())
                    else:
                        entry["audio_sha256"] = result["audio_sha256"]
                        seconds = result.get("seconds") or {}  # a custom compute_fn may not report them
                        entry.update(decode_s=seconds.get("decode"), resample_s=seconds.get("resample"),
                                     mel_s=seconds.get("mel"), ipc_s=decoder.last_ipc_s)
                        results.append((track_id, result))
                if results:
                    t0 = time.perf_counter()
                    shard = join(dataset.staging(storage, run_id), f"part-{task:05d}.parquet")
                    storage.write_parquet(spectrogram_table(results, settings_key, schema=dataset.schema), shard,
                                          compression="none", row_group_size=SHARD_ROW_GROUP)
                    write_s = (time.perf_counter() - t0) / len(results)
                    for e in index:
                        if e["status"] == "ok":
                            e.update(shard=shard, write_s=write_s)
                yield pa.RecordBatch.from_pylist(index, schema=_TASK_SCHEMA)

    return run


def task_groups(todo: list, *, clips_per_task: int, slots: int) -> list[list]:
    """``todo`` cut into contiguous groups of at most ``clips_per_task``, as equal as possible,
    their number rounded up to a multiple of ``slots`` (the cores running tasks): the last wave
    of tasks then keeps every core busy instead of one core finishing a full group while the
    others wait on a short one.

    >>> [len(g) for g in task_groups(list(range(200)), clips_per_task=64, slots=2)]
    [50, 50, 50, 50]
    """
    n = len(todo)
    if n == 0:
        return []
    k = -(-n // clips_per_task)
    if slots > 1:
        k = -(-k // slots) * slots
    k = min(k, n)
    return [todo[i * n // k : (i + 1) * n // k] for i in range(k)]


def decode_on_spark(spark, storage: Storage, *, dataset: Dataset, compute_fn: str, settings, settings_key: str,
                    sc_cfg, run_id: str, todo: list[tuple], known: dict[str, str]) -> tuple[pa.Table, dict[str, float]]:
    """Run :func:`decode_task` over ``todo`` ``(track_id, uri, size, modified)`` in groups of at
    most ``spectrograms.clips_per_task`` (:func:`task_groups`); returns the audio-index rows of
    every clip and the clips' summed costs, ``{"clip_read": seconds, ...}`` (:data:`CLIP_COSTS`)."""
    from deepcontent.hooks import check_hook

    check_hook(compute_fn, field="spectrograms.compute_fn")  # in the driver, before any task starts
    groups = task_groups(todo, clips_per_task=sc_cfg.clips_per_task, slots=spark.sparkContext.defaultParallelism)
    # The tasks' inputs travel as one broadcast and Spark only ships task numbers
    # (spark.range is generated in the JVM): no Python stage to turn rows into a DataFrame.
    bc = spark.sparkContext.broadcast({"known": known, "groups": groups})
    try:
        df = spark.range(0, len(groups), numPartitions=max(1, len(groups)))
        task = decode_task(storage, dataset=dataset, compute_fn=compute_fn, settings=settings,
                           settings_key=settings_key, sc_cfg=sc_cfg, run_id=run_id, inputs_bc=bc)
        out = df.mapInArrow(task, _TASK_DDL).toArrow()
    finally:
        bc.unpersist()
    costs = {f"clip_{c}": round(float(pc.sum(out[f"{c}_s"]).as_py() or 0.0), 3) for c in CLIP_COSTS}
    return out.select(AUDIO_INDEX.schema.names).cast(AUDIO_INDEX.schema), costs


# ----------------------------------------------------------------------------- driver
def _audio_versions(storage: Storage, uris: list[str], prefix: str) -> dict[str, tuple[int, str | None]]:
    """uri -> (size, modified) from one listing of the audio prefix (stat for strays)."""
    listed = {o.uri: (o.size, o.modified) for o in storage.list(prefix)}
    out = {}
    for uri in uris:
        if uri in listed:
            out[uri] = listed[uri]
        else:
            try:
                out[uri] = (storage.size(uri), None)
            except Exception:
                out[uri] = (-1, None)  # missing: the task will record it as unreadable
    return out


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the stage; see the module docstring."""
    storage = ctx.storage
    sc_cfg = cfg.spectrograms
    settings = sc_cfg.mel_settings()
    settings_key = settings.key()
    with StageRun(STAGE, cfg, storage) as run:
        outputs = {d.key: run.uri(d) for d in (SPECTROGRAMS, AUDIO_INDEX, QUARANTINE)}
        with run.timed("plan"):
            # Both are rebuilt from what is read here: a run that published them meanwhile
            # makes this run's publish a conflict, never a silent loss of its rows.
            run.plan_on(SPECTROGRAMS, AUDIO_INDEX)
            tracks = TRACKS.read(storage, columns=["track_id", "audio_uri"])
            tracks = tracks.filter(pc.is_valid(tracks["audio_uri"]))
            uris = tracks["audio_uri"].to_pylist()
            versions = _audio_versions(storage, uris, storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.audio))
            try:
                index = _with_attempts(AUDIO_INDEX.read_or_empty(storage))
                index_run = AUDIO_INDEX.run_id(storage)
            except CorruptFileError as exc:
                # The index is the stage's memory, and it can be rebuilt: every track is decoded
                # again and the published shards are re-derived from what this run computes.
                log.warning("spectrograms: the audio index does not read (%s); rebuilding it from the audio", exc)
                index, index_run = _with_attempts(AUDIO_INDEX.schema.empty_table()), None
            rows = index.to_pylist()
            seen = {(r["track_id"], r["audio_uri"], r["audio_size"], r["audio_modified"], r["settings_key"])
                    for r in rows if not _retry(r, sc_cfg.max_attempts)}
            retrying = {(r["track_id"], r["audio_uri"], r["audio_size"], r["audio_modified"], r["settings_key"])
                        for r in rows if _retry(r, sc_cfg.max_attempts)}
            todo = []
            for track_id, uri in zip(tracks["track_id"].to_pylist(), uris):
                size, modified = versions[uri]
                if (track_id, uri, size, modified, settings_key) not in seen:
                    todo.append((track_id, uri, size, modified))
        run.manifest.inputs = {"tracks": TRACKS.run_id(storage), "tracks_with_audio": len(uris), "settings_key": settings_key}
        if not todo:
            if run.previous(index_run or "") is not None and not _shards_changed(
                    storage, outputs[SPECTROGRAMS.key], _index_shards(index)):
                log.info("spectrograms: all %d tracks with audio are up to date; nothing to do", len(uris))
                return run.unchanged(outputs=outputs, counts={"tracks_with_audio": len(uris), "processed": 0})
            # The last run died between its publishes: make the outputs agree with the index.
            log.warning("spectrograms: the published outputs disagree with the audio index (run %s did not "
                        "finish); republishing them from the index", index_run)

        log.info("spectrograms: run %s — %d of %d tracks need spectrograms (%d clips per task)", run.run_id, len(todo),
                 len(uris), sc_cfg.clips_per_task)
        ok_index = index.filter(pc.equal(index["status"], "ok")) if index.num_rows else index
        known = {r["track_id"]: r["audio_sha256"] for r in ok_index.select(["track_id", "audio_sha256", "settings_key"]).to_pylist()
                 if r["settings_key"] == settings_key}

        with run.timed("compute"):
            results, costs = (decode_on_spark(ctx.spark, storage, dataset=SPECTROGRAMS, compute_fn=sc_cfg.compute_fn,
                                              settings=settings, settings_key=settings_key, sc_cfg=sc_cfg,
                                              run_id=run.run_id, todo=todo, known=known)
                              if todo else (AUDIO_INDEX.schema.empty_table(), {}))
            run.manifest.timings_s.update(costs)
            results = _count_attempts(results, index)

        status = Counter(results["status"].to_pylist())
        processed = len(todo)
        failed = {k: v for k, v in status.items() if k not in ("ok", "unchanged")}
        # A retried clip that fails again was counted against the threshold when it first
        # failed: the gate looks at this run's new clips (a flaky node must not fail a nightly
        # run over the same two clips forever).
        retried = sum(1 for t, u, size, m in todo if (t, u, size, m, settings_key) in retrying)
        again = Counter(r["status"] for r in results.to_pylist() if (r["attempts"] or 0) > 1)
        counts = {"tracks_with_audio": len(uris), "processed": processed, "computed": status.get("ok", 0),
                  "unchanged": status.get("unchanged", 0), "quarantined": sum(failed.values()),
                  "retried": retried, "to_retry": sum(1 for r in results.to_pylist() if _retry(r, sc_cfg.max_attempts))}

        # New index: the old one with this run's tracks replaced.
        done_ids = pa.array(results["track_id"].to_pylist(), pa.string())
        kept = index.filter(pc.invert(pc.is_in(index["track_id"], value_set=done_ids))) if index.num_rows else index
        unchanged = results.filter(pc.equal(results["status"], "unchanged"))
        if unchanged.num_rows:  # carry the stored shard forward under the new metadata
            prev = {r["track_id"]: r["shard"] for r in ok_index.select(["track_id", "shard"]).to_pylist()}
            unchanged = unchanged.set_column(unchanged.schema.get_field_index("shard"), "shard",
                                             pa.array([prev.get(t) for t in unchanged["track_id"].to_pylist()], pa.string()))
            unchanged = unchanged.set_column(unchanged.schema.get_field_index("status"), "status",
                                             pa.array(["ok"] * unchanged.num_rows, pa.string()))
        fresh = results.filter(pc.not_equal(results["status"], "unchanged"))
        new_index = pa.concat_tables([kept.cast(AUDIO_INDEX.schema), unchanged, fresh])

        # The quarantine is every track whose current audio failed, each with the run that saw it.
        bad = new_index.filter(pc.not_equal(new_index["status"], "ok"))
        quarantine = pa.table({"stage": pa.array([STAGE] * bad.num_rows, pa.string()), "source": bad["audio_uri"],
                               "reason": bad["status"], "detail": bad["detail"], "run_id": bad["run_id"]})
        run.add_quarantine_files([run.write_part(QUARANTINE, quarantine)])
        new_failed = {k: v - again.get(k, 0) for k, v in failed.items() if v - again.get(k, 0) > 0}
        run.check_quarantine([QuarantineCheck(new_failed, processed - retried, unit="clips")],
                             limit=sc_cfg.max_quarantine_fraction)

        with run.timed("publish"):
            _, rewritten = _rewrite_superseded(storage, run.run_id, index, results)
            if rewritten:  # index rows pointing at rewritten shards now point at their new versions
                shards = [rewritten.get(s, s) if s else s for s in new_index["shard"].to_pylist()]
                new_index = new_index.set_column(new_index.schema.get_field_index("shard"), "shard", pa.array(shards, pa.string()))
            # The published shards are exactly those the index names: shards of a run that died
            # after publishing them but before publishing its index are never carried forward.
            spec_files = _index_shards(new_index)
            meta = {"settings_key": settings_key}
            if _shards_changed(storage, outputs[SPECTROGRAMS.key], spec_files):
                run.publish(SPECTROGRAMS, spec_files, meta=meta)
            run.publish(AUDIO_INDEX, [run.write_part(AUDIO_INDEX, new_index)], meta=meta)
            run.publish_quarantine(meta=meta)
            run.commit_quarantine(ctx.warehouse)
        log.info("spectrograms: computed %d, unchanged %d, quarantined %s (%d to retry)", status.get("ok", 0),
                 status.get("unchanged", 0), failed or "none", counts["to_retry"])
        return run.succeed(counts=counts, quarantined=dict(sorted(failed.items())), outputs=outputs,
                           fingerprint=run.run_id)


def _with_attempts(index: pa.Table) -> pa.Table:
    """The index with an ``attempts`` column (indexes written before it had none)."""
    if "attempts" not in index.column_names:
        index = index.append_column("attempts", pa.nulls(index.num_rows, pa.int32()))
    return index.select(AUDIO_INDEX.schema.names).cast(AUDIO_INDEX.schema)


def _retry(row: dict, max_attempts: int) -> bool:
    """Whether a later run should try this index row's clip again."""
    return row["status"] in TRANSIENT_REASONS and (row.get("attempts") or 1) < max_attempts


def _count_attempts(results: pa.Table, index: pa.Table) -> pa.Table:
    """Set ``attempts`` of this run's rows: one more than before for a transient failure of the
    same audio version, 1 for a first one, null for every other outcome."""
    prev = {(r["track_id"], r["audio_uri"], r["audio_size"], r["audio_modified"]): (r["status"], r["attempts"] or 1)
            for r in index.select(["track_id", "audio_uri", "audio_size", "audio_modified", "status", "attempts"]).to_pylist()}
    attempts = []
    for r in results.select(["track_id", "audio_uri", "audio_size", "audio_modified", "status"]).to_pylist():
        if r["status"] not in TRANSIENT_REASONS:
            attempts.append(None)
            continue
        before = prev.get((r["track_id"], r["audio_uri"], r["audio_size"], r["audio_modified"]))
        attempts.append(before[1] + 1 if before and before[0] in TRANSIENT_REASONS else 1)
    return results.set_column(results.schema.get_field_index("attempts"), "attempts", pa.array(attempts, pa.int32()))


def _index_shards(index: pa.Table) -> list[str]:
    """The shards holding the index's ``ok`` spectrograms."""
    if not index.num_rows:
        return []
    return sorted({s for s in index.filter(pc.equal(index["status"], "ok"))["shard"].to_pylist() if s})


def _published_shards(storage: Storage, dataset_uri: str) -> list[str]:
    return storage.published_files(dataset_uri) if storage.published(dataset_uri) else []


def _shards_changed(storage: Storage, dataset_uri: str, files: list[str]) -> bool:
    return sorted(_published_shards(storage, dataset_uri)) != sorted(files)


def _rewrite_superseded(storage: Storage, run_id: str, index: pa.Table, results: pa.Table) -> tuple[list[str], dict[str, str]]:
    """The published shard list with every shard that holds a superseded spectrogram rewritten
    without it (a track re-computed or now failing loses its old row), and old -> new shard."""
    dataset = SPECTROGRAMS.uri(storage)
    current = _published_shards(storage, dataset)
    redone = set(results.filter(pc.not_equal(results["status"], "unchanged"))["track_id"].to_pylist())
    stale_by_shard: dict[str, set[str]] = {}
    if index.num_rows:
        for r in index.filter(pc.equal(index["status"], "ok")).select(["track_id", "shard"]).to_pylist():
            if r["track_id"] in redone and r["shard"]:
                stale_by_shard.setdefault(r["shard"], set()).add(r["track_id"])
    out, rewritten = [], {}
    for shard in current:
        stale = stale_by_shard.get(shard)
        if not stale:
            out.append(shard)
            continue
        table = storage.read_parquet(shard)
        keep = table.filter(pc.invert(pc.is_in(table["track_id"], value_set=pa.array(sorted(stale), pa.string()))))
        if keep.num_rows:
            name = shard.rsplit("/", 1)[1].replace(".parquet", f"-rw-{run_id[-8:]}.parquet")
            new = join(SPECTROGRAMS.staging(storage, run_id), name)
            storage.write_parquet(keep, new, compression="none", row_group_size=SHARD_ROW_GROUP)
            out.append(new)
            rewritten[shard] = new
    return out, rewritten
