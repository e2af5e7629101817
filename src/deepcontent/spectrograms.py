"""Stage ``spectrograms`` (Spark): audio clips -> log-mel shards, incremental, with quarantine.

For every track of ``canonical/tracks`` that has audio, a Spark task fetches the clip from object
storage, and an isolated decoder process (:mod:`deepcontent.audio.sandbox`) turns it into a
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

When a track's audio changes, the shard holding its old spectrogram is rewritten without it
(copy on write), so readers of the published version always see one row per track. If more
than ``spectrograms.max_quarantine_fraction`` of the clips processed in a run fail, the run
publishes the quarantine (and nothing else) and raises, naming the count and the location.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.config import Config, SpectrogramConfig
from deepcontent.ingest import TRACKS
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.storage import Storage, join, new_run_id

STAGE = "spectrograms"
SPECTROGRAMS = "features/spectrograms"
AUDIO_INDEX = "features/audio_index"
QUARANTINE = "quarantine/spectrograms"
#: Clips per Parquet row group in a shard (~2.6 MB for 30 s clips): readers downstream (training
#: ingest, embed) can split a shard between several tasks by row group.
SHARD_ROW_GROUP = 8

SPECTROGRAM_SCHEMA = pa.schema([
    ("track_id", pa.string()), ("audio_sha256", pa.string()), ("sample_rate", pa.int32()),
    ("hop_length", pa.int32()), ("n_mels", pa.int32()), ("n_frames", pa.int32()), ("mel", pa.binary()),
    ("harmonic", pa.binary()), ("percussive", pa.binary()), ("settings_key", pa.string()),
])
INDEX_SCHEMA = pa.schema([
    ("track_id", pa.string()), ("audio_uri", pa.string()), ("audio_size", pa.int64()), ("audio_modified", pa.string()),
    ("audio_sha256", pa.string()), ("settings_key", pa.string()), ("status", pa.string()), ("detail", pa.string()),
    ("shard", pa.string()), ("run_id", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("stage", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                               ("detail", pa.string()), ("run_id", pa.string())])
_TASK_DDL = ("track_id string, audio_uri string, audio_size long, audio_modified string, audio_sha256 string, "
             "settings_key string, status string, detail string, shard string, run_id string")


class SpectrogramQuarantineExceeded(RuntimeError):
    """Too many clips of a run failed; the message gives the counts and the quarantine location."""


def mel_settings(cfg: SpectrogramConfig):
    from deepcontent.audio.features import MelSettings

    return MelSettings(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels,
                       compression=cfg.compression, hpss=cfg.hpss, max_seconds=cfg.max_seconds)


def spectrogram_row(track_id: str, result: dict, settings_key: str) -> dict:
    """One contract row from :func:`compute_log_mel`'s result."""
    def blob(a):
        return None if a is None else np.ascontiguousarray(a, dtype=np.float16).tobytes()

    return {
        "track_id": track_id, "audio_sha256": result["audio_sha256"], "sample_rate": int(result["sample_rate"]),
        "hop_length": int(result["hop_length"]), "n_mels": int(result["n_mels"]), "n_frames": int(result["n_frames"]),
        "mel": blob(result["mel"]), "harmonic": blob(result.get("harmonic")), "percussive": blob(result.get("percussive")),
        "settings_key": settings_key,
    }


def decode_mel(row: dict, column: str = "mel") -> np.ndarray:
    """A stored spectrogram back to float16 ``(n_mels, n_frames)``."""
    return np.frombuffer(row[column], dtype=np.float16).reshape(row["n_mels"], row["n_frames"])


# ----------------------------------------------------------------------------- Spark task
_WARM: set[str] = set()


def _warm_up(compute_fn: str, settings) -> None:
    """Run the decoder once in this (long-lived, reused) Spark worker on a short generated clip,
    so lazy imports and cached filterbanks are loaded *before* the isolated child is forked
    and every child starts warm (otherwise each task pays ~3 s of first-call set-up)."""
    if compute_fn in _WARM:
        return
    import soundfile as sf

    from deepcontent.audio.sandbox import resolve

    noise = np.random.default_rng(0).standard_normal(settings.sample_rate).astype(np.float32) * 0.1
    buf = io.BytesIO()
    sf.write(buf, noise, settings.sample_rate, format="WAV", subtype="PCM_16")
    resolve(compute_fn)(buf.getvalue(), settings=settings)
    _WARM.add(compute_fn)
def _spectrogram_task(storage: Storage, cfg: SpectrogramConfig, run_id: str, inputs_bc):
    """mapInArrow body over task numbers: decode each task's clips in an isolated child, one shard per task."""

    def run(batches):
        from deepcontent.audio.sandbox import Failure, IsolatedWorker
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        settings = mel_settings(cfg)
        key = settings.key()
        _warm_up(cfg.compute_fn, settings)
        known = inputs_bc.value["known"]  # track_id -> sha256 of its current good spectrogram
        groups = inputs_bc.value["groups"]  # task number -> [(track_id, uri, size, modified)]

        def fetch(uri: str, size: int):
            if size is not None and size > cfg.max_audio_bytes:  # never load an absurd object
                return None, ("too_long", f"object is {size:,} bytes, above spectrograms.max_audio_bytes={cfg.max_audio_bytes:,}")
            try:
                return storage.read_bytes(uri), None
            except Exception as exc:  # missing object, permissions, network: recorded, not fatal
                return None, ("unreadable", f"{type(exc).__name__}: {exc}"[:500])

        with IsolatedWorker(cfg.compute_fn, timeout_s=cfg.decode_timeout_s, memory_limit_mb=cfg.decoder_memory_mb) as worker, \
                ThreadPoolExecutor(max_workers=1) as io_pool:
            for task in (t for batch in batches for t in batch.column("id").to_pylist()):
                items = groups[task]
                # Fetch the next clip while the child decodes this one: S3 latency stays hidden.
                pending = [io_pool.submit(fetch, items[0][1], items[0][2])] if items else []
                rows, index = [], []
                for k, (track_id, uri, size, modified) in enumerate(items):
                    data, error = pending.pop(0).result()
                    if k + 1 < len(items):
                        pending.append(io_pool.submit(fetch, items[k + 1][1], items[k + 1][2]))
                    entry = {"track_id": track_id, "audio_uri": uri, "audio_size": size, "audio_modified": modified,
                             "audio_sha256": None, "settings_key": key, "status": "ok", "detail": None, "shard": None,
                             "run_id": run_id}
                    index.append(entry)
                    if error is not None:
                        entry.update(status=error[0], detail=error[1])
                        continue
                    if track_id in known:  # metadata changed; content may not have
                        entry["audio_sha256"] = hashlib.sha256(data).hexdigest()
                        if known[track_id] == entry["audio_sha256"]:
                            entry.update(status="unchanged")
                            continue
                    result = worker.call(data, settings=settings)
                    if isinstance(result, Failure):
                        entry.update(status=result.reason, detail=result.detail[:500],
                                     audio_sha256=entry["audio_sha256"] or hashlib.sha256(data).hexdigest())
                    else:
                        entry["audio_sha256"] = result["audio_sha256"]
                        rows.append(spectrogram_row(track_id, result, key))
                shard = None
                if rows:
                    shard = join(storage.staging_uri(storage.uri(SPECTROGRAMS), run_id), f"part-{task:05d}.parquet")
                    storage.write_parquet(pa.Table.from_pylist(rows, schema=SPECTROGRAM_SCHEMA), shard, compression="none",
                                          row_group_size=SHARD_ROW_GROUP)
                    for e in index:
                        if e["status"] == "ok":
                            e["shard"] = shard
                yield pa.RecordBatch.from_pylist(index, schema=INDEX_SCHEMA)

    return run


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


def run_spectrograms(cfg: Config, storage: Storage, spark) -> StageResult:
    """Run the stage; see the module docstring."""
    sc_cfg = cfg.spectrograms
    settings_key = mel_settings(sc_cfg).key()
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("spectrograms"))
    outputs = {name: storage.uri(name) for name in (SPECTROGRAMS, AUDIO_INDEX, QUARANTINE)}

    with manifest.timed("plan"):
        tracks = storage.read_dataset(storage.uri(TRACKS), columns=["track_id", "audio_uri"])
        tracks = tracks.filter(pc.is_valid(tracks["audio_uri"]))
        uris = tracks["audio_uri"].to_pylist()
        versions = _audio_versions(storage, uris, storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.audio))
        index = storage.read_published(storage.uri(AUDIO_INDEX), schema=INDEX_SCHEMA)
        seen = {(r["track_id"], r["audio_uri"], r["audio_size"], r["audio_modified"], r["settings_key"])
                for r in index.select(["track_id", "audio_uri", "audio_size", "audio_modified", "settings_key"]).to_pylist()}
        todo = []
        for track_id, uri in zip(tracks["track_id"].to_pylist(), uris):
            size, modified = versions[uri]
            if (track_id, uri, size, modified, settings_key) not in seen:
                todo.append((track_id, uri, size, modified))
    manifest.inputs = {"tracks": storage.published(storage.uri(TRACKS))["run_id"], "tracks_with_audio": len(uris),
                       "settings_key": settings_key}
    if not todo:
        log.info("spectrograms: all %d tracks with audio are up to date; nothing to do", len(uris))
        return StageResult(run_id, False, {"tracks_with_audio": len(uris), "processed": 0}, {}, outputs)

    log.info("spectrograms: run %s — %d of %d tracks need spectrograms (%d clips per task)", run_id, len(todo),
             len(uris), sc_cfg.clips_per_task)
    ok_index = index.filter(pc.equal(index["status"], "ok")) if index.num_rows else index
    known = {r["track_id"]: r["audio_sha256"] for r in ok_index.select(["track_id", "audio_sha256", "settings_key"]).to_pylist()
             if r["settings_key"] == settings_key}

    with manifest.timed("compute"):
        per = sc_cfg.clips_per_task
        groups = [todo[i : i + per] for i in range(0, len(todo), per)]
        # The tasks' inputs travel as one broadcast and Spark only ships task numbers
        # (spark.range is generated in the JVM): no Python stage to turn rows into a DataFrame.
        bc = spark.sparkContext.broadcast({"known": known, "groups": groups})
        df = spark.range(0, len(groups), numPartitions=len(groups))
        results = df.mapInArrow(_spectrogram_task(storage, sc_cfg, run_id, bc), _TASK_DDL).toArrow()
        bc.unpersist()
        results = results.cast(INDEX_SCHEMA)

    status = Counter(results["status"].to_pylist())
    processed = len(todo)
    failed = {k: v for k, v in status.items() if k not in ("ok", "unchanged")}
    manifest.counts = {"tracks_with_audio": len(uris), "processed": processed, "computed": status.get("ok", 0),
                       "unchanged": status.get("unchanged", 0), "quarantined": sum(failed.values())}
    manifest.quarantined = dict(sorted(failed.items()))

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
    new_index = pa.concat_tables([kept, unchanged, fresh])

    bad = new_index.filter(pc.not_equal(new_index["status"], "ok"))
    quarantine = pa.table({"stage": pa.array([STAGE] * bad.num_rows, pa.string()), "source": bad["audio_uri"],
                           "reason": bad["status"], "detail": bad["detail"], "run_id": bad["run_id"]}, schema=QUARANTINE_SCHEMA)
    q_file = join(storage.staging_uri(outputs[QUARANTINE], run_id), "part-00000.parquet")
    storage.write_parquet(quarantine, q_file)

    if processed and sum(failed.values()) / processed > sc_cfg.max_quarantine_fraction:
        storage.publish(outputs[QUARANTINE], run_id=run_id, files=[q_file], meta={"stage": STAGE, "failed": True})
        manifest.outputs = {QUARANTINE: outputs[QUARANTINE]}
        uri = manifest.write(storage, status="failed")
        detail = ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))
        raise SpectrogramQuarantineExceeded(
            f"spectrograms: {sum(failed.values())} of {processed} clips failed ({sum(failed.values()) / processed:.1%} > "
            f"{sc_cfg.max_quarantine_fraction:.1%}: {detail}); nothing was published except the quarantine at "
            f"{outputs[QUARANTINE]} (manifest {uri})")

    with manifest.timed("publish"):
        spec_files, rewritten = _rewrite_superseded(storage, run_id, index, results)
        spec_files += sorted({s for s in fresh["shard"].to_pylist() if s})
        if rewritten:  # index rows pointing at rewritten shards now point at their new versions
            shards = [rewritten.get(s, s) if s else s for s in new_index["shard"].to_pylist()]
            new_index = new_index.set_column(new_index.schema.get_field_index("shard"), "shard", pa.array(shards, pa.string()))
        idx_file = join(storage.staging_uri(outputs[AUDIO_INDEX], run_id), "part-00000.parquet")
        storage.write_parquet(new_index, idx_file)
        meta = {"stage": STAGE, "settings_key": settings_key}
        if status.get("ok", 0) or _shards_changed(storage, outputs[SPECTROGRAMS], spec_files):
            storage.publish(outputs[SPECTROGRAMS], run_id=run_id, files=spec_files, meta=meta, keep_versions=2)
        storage.publish(outputs[AUDIO_INDEX], run_id=run_id, files=[idx_file], meta=meta)
        storage.publish(outputs[QUARANTINE], run_id=run_id, files=[q_file], meta=meta)
    manifest.outputs = outputs
    manifest_uri = manifest.write(storage, status="succeeded")
    log.info("spectrograms: computed %d, unchanged %d, quarantined %s; manifest %s", status.get("ok", 0),
             status.get("unchanged", 0), failed or "none", manifest_uri)
    return StageResult(run_id, True, manifest.counts, failed, outputs, manifest_uri)


def _published_shards(storage: Storage, dataset_uri: str) -> list[str]:
    return storage.published_files(dataset_uri) if storage.published(dataset_uri) else []


def _shards_changed(storage: Storage, dataset_uri: str, files: list[str]) -> bool:
    return sorted(_published_shards(storage, dataset_uri)) != sorted(files)


def _rewrite_superseded(storage: Storage, run_id: str, index: pa.Table, results: pa.Table) -> tuple[list[str], dict[str, str]]:
    """The published shard list with every shard that holds a superseded spectrogram rewritten
    without it (a track re-computed or now failing loses its old row), and old -> new shard."""
    dataset = storage.uri(SPECTROGRAMS)
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
            new = join(storage.staging_uri(dataset, run_id), name)
            storage.write_parquet(keep, new, compression="none", row_group_size=SHARD_ROW_GROUP)
            out.append(new)
            rewritten[shard] = new
    return out, rewritten


def read_spectrograms(storage: Storage, *, columns: list[str] | None = None) -> pa.Table:
    """The published spectrograms (one row per track)."""
    return storage.read_dataset(storage.uri(SPECTROGRAMS), columns=columns, schema=SPECTROGRAM_SCHEMA)
