"""Stage ``ingest`` (Spark): raw published formats -> canonical ``tracks``, ``plays``, ``tags``
and ``quarantine`` datasets in object storage.

Flow (driver on the left, Spark tasks on the right)::

    list inputs, fingerprint them ─┐
    nothing changed? stop          │
    parse sid_mismatches.txt       │
    unique_tracks.txt in ranges ───┼─> parse lines                  (returns rows)
    drop mismatches & duplicates,  │
    attach audio_uri from listing  │
    train_triplets.txt in ranges ──┼─> parse, check songs, write part + quarantine part
    Last.fm JSON files in groups ──┼─> parse, check tracks, write part + quarantine part
    check quarantine thresholds    │
    publish each dataset, write the run manifest last

Tasks write under ``data/<run_id>/`` of each dataset, invisible until the driver publishes the
pointer (see :mod:`deepcontent.storage`); a retried task rewrites its own deterministic file
name, so retries never duplicate rows. Object-store I/O happens inside the Python tasks through
:class:`~deepcontent.storage.Storage` (``mapInArrow``), never through Hadoop's S3 connector.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.config import Config
from deepcontent.interactions.sources import (
    QUARANTINE_SCHEMA,
    Reason,
    parse_lastfm_json,
    parse_mismatches,
    parse_triplets,
    parse_unique_tracks,
    quarantine_rows,
    read_lastfm_db,
)
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.storage import Storage, join, new_run_id, posix_basename

STAGE = "ingest"
TRACKS, PLAYS, TAGS = "canonical/tracks", "canonical/plays", "canonical/tags"
QUARANTINE = "quarantine/ingest"
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".flac", ".wav", ".au", ".m4a")

TRACKS_SCHEMA = pa.schema([("track_id", pa.string()), ("song_id", pa.string()), ("artist", pa.string()),
                           ("title", pa.string()), ("audio_uri", pa.string())])
PLAYS_SCHEMA = pa.schema([("user_id", pa.string()), ("song_id", pa.string()), ("play_count", pa.int32())])
TAGS_SCHEMA = pa.schema([("track_id", pa.string()), ("tag", pa.string()), ("weight", pa.int32())])
CANONICAL_QUARANTINE_SCHEMA = pa.schema([("stage", pa.string()), *QUARANTINE_SCHEMA, ("run_id", pa.string())])

# What a task returns to the driver: one row per file it wrote.
_SUMMARY = pa.schema([("dataset", pa.string()), ("file", pa.string()), ("rows", pa.int64()),
                      ("records", pa.int64()), ("reasons", pa.string())])
_SUMMARY_DDL = "dataset string, file string, rows long, records long, reasons string"


class QuarantineThresholdExceeded(RuntimeError):
    """Too large a fraction of some input was quarantined; the message says how much and where."""


def _quarantine_table(q: pa.Table, run_id: str) -> pa.Table:
    n = q.num_rows
    return pa.table({
        "stage": pa.array([STAGE] * n, pa.string()),
        "source": q["source"], "reason": q["reason"], "detail": q["detail"],
        "run_id": pa.array([run_id] * n, pa.string()),
    }, schema=CANONICAL_QUARANTINE_SCHEMA)


def _reason_counts(q: pa.Table) -> dict[str, int]:
    if q.num_rows == 0:
        return {}
    vc = pc.value_counts(q["reason"])
    return {v["values"].as_py(): v["counts"].as_py() for v in vc}


def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, size)) for s in range(0, max(size, 1), chunk)] if size else []


# ----------------------------------------------------------------------------- Spark tasks
def _tracks_task(storage: Storage, uri: str):
    """mapInArrow body: parse ranges of unique_tracks.txt, return tracks + quarantine rows."""

    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        for batch in batches:
            for start, end in zip(batch.column("start").to_pylist(), batch.column("end").to_pylist()):
                offset, data = storage.read_line_range(uri, start, end)
                tracks, q = parse_unique_tracks(data, uri=uri, base_offset=offset)
                n = tracks.num_rows
                # one output shape for both: a kind column tells them apart
                yield pa.RecordBatch.from_pydict({
                    "kind": ["track"] * n + ["quarantine"] * q.num_rows,
                    "a": tracks["track_id"].to_pylist() + q["source"].to_pylist(),
                    "b": tracks["song_id"].to_pylist() + q["reason"].to_pylist(),
                    "c": tracks["artist"].to_pylist() + q["detail"].to_pylist(),
                    "d": tracks["title"].to_pylist() + [None] * q.num_rows,
                }, schema=_TRACK_ROWS)

    return run


_TRACK_ROWS = pa.schema([("kind", pa.string()), ("a", pa.string()), ("b", pa.string()), ("c", pa.string()), ("d", pa.string())])


def _write_parts(storage: Storage, run_id: str, part: str, outputs: dict[str, pa.Table], records: int,
                 reasons: dict[str, int]) -> pa.RecordBatch:
    """Write one task's output tables (dataset -> rows) and summarise them for the driver.

    ``part`` must be unique across every task of the run that writes to the same dataset
    (plays and tags tasks both write quarantine parts)."""
    rows = {"dataset": [], "file": [], "rows": [], "records": [], "reasons": []}
    for dataset, table in outputs.items():
        uri = join(storage.staging_uri(storage.uri(dataset), run_id), f"part-{part}.parquet")
        storage.write_parquet(table, uri)
        rows["dataset"].append(dataset)
        rows["file"].append(uri)
        rows["rows"].append(table.num_rows)
        rows["records"].append(records if dataset != QUARANTINE else 0)
        rows["reasons"].append(json.dumps(reasons) if dataset == QUARANTINE else "{}")
    return pa.RecordBatch.from_pydict(rows, schema=_SUMMARY)


def _plays_task(storage: Storage, uri: str, run_id: str, known_songs_bc):
    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        known = known_songs_bc.value
        for batch in batches:
            for task, start, end in zip(*(batch.column(c).to_pylist() for c in ("task", "start", "end"))):
                offset, data = storage.read_line_range(uri, start, end)
                plays, q = parse_triplets(data, uri=uri, base_offset=offset, known_songs=known)
                records = plays.num_rows + q.num_rows
                yield _write_parts(storage, run_id, f"plays-{task:05d}",
                                   {PLAYS: plays, QUARANTINE: _quarantine_table(q, run_id)}, records, _reason_counts(q))

    return run


def _tags_task(storage: Storage, run_id: str, known_tracks_bc):
    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        known = known_tracks_bc.value
        for batch in batches:
            for task, uris in zip(batch.column("task").to_pylist(), batch.column("uris").to_pylist()):
                tag_parts, q_parts = [], []
                for uri in uris:
                    if uri.endswith(".db"):
                        with tempfile.TemporaryDirectory() as tmp:
                            path = os.path.join(tmp, "lastfm_tags.db")
                            with open(path, "wb") as f:
                                f.write(storage.read_bytes(uri))
                            tags, q = read_lastfm_db(path, uri=uri)
                    else:
                        tags, q = parse_lastfm_json(storage.read_bytes(uri), uri=uri)
                    unknown = np.asarray(pc.invert(pc.is_in(tags["track_id"], value_set=known)))
                    if unknown.any():
                        bad = tags.filter(pa.array(unknown))
                        q = pa.concat_tables([q, quarantine_rows(
                            [f"{uri}#{tag}" for tag in bad["tag"].to_pylist()], Reason.UNKNOWN_TRACK,
                            [f"track {t!r} is not in the track list" for t in bad["track_id"].to_pylist()])])
                        tags = tags.filter(pa.array(~unknown))
                    tag_parts.append(tags)
                    q_parts.append(q)
                tags = pa.concat_tables(tag_parts) if tag_parts else TAGS_SCHEMA.empty_table()
                q = pa.concat_tables(q_parts) if q_parts else QUARANTINE_SCHEMA.empty_table()
                records = tags.num_rows + q.num_rows
                yield _write_parts(storage, run_id, f"tags-{task:05d}",
                                   {TAGS: tags.cast(TAGS_SCHEMA), QUARANTINE: _quarantine_table(q, run_id)},
                                   records, _reason_counts(q))

    return run


# ----------------------------------------------------------------------------- driver
def _fingerprint(cfg: Config, listing: list[tuple[str, int]]) -> str:
    h = hashlib.sha256(cfg.fingerprint("ingest", "sources", "storage").encode())
    for uri, size in listing:
        h.update(f"{uri}\t{size}\n".encode())
    return h.hexdigest()[:24]


def _clean_tracks(tracks: pa.Table, mismatches: pa.Table, audio: dict[str, str], tracks_uri: str) -> tuple[pa.Table, pa.Table]:
    """Drop duplicate track ids and mismatched song–track pairs; attach ``audio_uri``."""
    q_parts = []
    ids = tracks["track_id"].to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    dup = np.ones(len(ids), dtype=bool)
    dup[first] = False
    if dup.any():
        idx = np.flatnonzero(dup)
        q_parts.append(quarantine_rows([f"{tracks_uri}#{ids[i]}" for i in idx], Reason.DUPLICATE_TRACK,
                                       [f"track {ids[i]!r} appears more than once; first occurrence kept" for i in idx]))
        tracks = tracks.filter(pa.array(~dup))
    if mismatches.num_rows:
        pair = pc.binary_join_element_wise(tracks["song_id"], tracks["track_id"], " ")
        bad_pairs = pc.binary_join_element_wise(mismatches["song_id"], mismatches["track_id"], " ")
        mis = pc.is_in(pair, value_set=bad_pairs)
        bad = tracks.filter(mis)
        if bad.num_rows:
            q_parts.append(quarantine_rows(
                [f"{tracks_uri}#{t}" for t in bad["track_id"].to_pylist()], Reason.MISMATCH,
                [f"song {s!r} / track {t!r} is listed in sid_mismatches.txt" for s, t in zip(bad["song_id"].to_pylist(), bad["track_id"].to_pylist())]))
            tracks = tracks.filter(pc.invert(mis))
    audio_uri = pa.array([audio.get(t) for t in tracks["track_id"].to_pylist()], pa.string())
    tracks = tracks.append_column("audio_uri", audio_uri).cast(TRACKS_SCHEMA)
    q = pa.concat_tables(q_parts) if q_parts else QUARANTINE_SCHEMA.empty_table()
    return tracks, q


def _audio_index(listing, track_ids: set[str]) -> tuple[dict[str, str], list[str]]:
    """track_id -> audio URI from an audio listing (first by URI order); URIs of unknown tracks."""
    audio, orphans = {}, []
    for obj in listing:
        name = posix_basename(obj.uri)
        stem, dot, ext = name.rpartition(".")
        if not dot or f".{ext.lower()}" not in AUDIO_EXTENSIONS:
            continue
        if stem in track_ids:
            audio.setdefault(stem, obj.uri)
        else:
            orphans.append(obj.uri)
    return audio, orphans


def run_ingest(cfg: Config, storage: Storage, spark, *, warehouse=None) -> StageResult:
    """Run the ingest stage; see the module docstring.

    With a :class:`~deepcontent.warehouse.Warehouse`, the published ``tracks`` are also upserted
    into the Iceberg ``tracks`` table and the run's quarantine appended to ``quarantine`` (one
    commit each, idempotent per run). Raises
    :class:`QuarantineThresholdExceeded` (after publishing the quarantine) when an input's bad
    fraction exceeds ``ingest.max_quarantine_fraction``."""
    src, raw = cfg.sources, (lambda key: storage.raw_uri(cfg.storage.raw_prefix, key))
    tracks_uri, triplets_uri, mismatch_uri = raw(src.tracks), raw(src.triplets), raw(src.mismatches)
    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("ingest", "sources"))

    with manifest.timed("list_inputs"):
        for required in (tracks_uri, triplets_uri):
            if not storage.exists(required):
                raise FileNotFoundError(f"ingest input missing: {required} (run `deepcontent generate` or set sources.*)")
        lastfm_files = [o for o in storage.list(raw(src.lastfm_json)) if o.uri.endswith(".json")]
        if storage.exists(raw(src.lastfm_db)):
            from deepcontent.storage import ObjectInfo

            lastfm_files.append(ObjectInfo(raw(src.lastfm_db), storage.size(raw(src.lastfm_db))))
        audio_listing = storage.list(raw(src.audio))
        singles = [(u, storage.size(u)) for u in (tracks_uri, triplets_uri) + ((mismatch_uri,) if storage.exists(mismatch_uri) else ())]
        listing = singles + [(o.uri, o.size) for o in lastfm_files] + [(o.uri, o.size) for o in audio_listing]
        fingerprint = _fingerprint(cfg, listing)
    manifest.inputs = {
        "fingerprint": fingerprint,
        "files": {u: s for u, s in singles},
        "lastfm_files": len(lastfm_files),
        "audio_files": len(audio_listing),
    }
    outputs = {name: storage.uri(name) for name in (TRACKS, PLAYS, TAGS, QUARANTINE)}
    current = [storage.published(u) for u in outputs.values()]
    if all(p is not None and p.get("input_fingerprint") == fingerprint for p in current):
        log.info("ingest: inputs unchanged since run %s; nothing to do", current[0]["run_id"])
        return StageResult(run_id=current[0]["run_id"], published=False, outputs=outputs)

    log.info("ingest: run %s — %d Last.fm files, %d audio files, triplets %.1f MB", run_id, len(lastfm_files),
             len(audio_listing), dict(singles)[triplets_uri] / 1e6)
    sc = spark.sparkContext
    chunk = cfg.ingest.chunk_bytes

    # --- tracks (parsed by tasks, cleaned on the driver: it needs the whole list)
    with manifest.timed("tracks"):
        mismatches = parse_mismatches(storage.read_bytes(mismatch_uri)) if storage.exists(mismatch_uri) else parse_mismatches(b"")
        ranges = _ranges(dict(singles)[tracks_uri], chunk)
        df = spark.createDataFrame([(s, e) for s, e in ranges], "start long, end long").repartition(max(1, len(ranges)))
        rows = df.mapInArrow(_tracks_task(storage, tracks_uri), "kind string, a string, b string, c string, d string").toArrow()
        is_track = pc.equal(rows["kind"], "track")
        raw_tracks = rows.filter(is_track)
        raw_tracks = pa.table({"track_id": raw_tracks["a"], "song_id": raw_tracks["b"], "artist": raw_tracks["c"], "title": raw_tracks["d"]})
        q_lines = rows.filter(pc.invert(is_track))
        q_lines = pa.table({"source": q_lines["a"], "reason": q_lines["b"], "detail": q_lines["c"]}, schema=QUARANTINE_SCHEMA)
        track_ids = set(raw_tracks["track_id"].to_pylist())
        audio, orphans = _audio_index(audio_listing, track_ids)
        tracks, q_tracks = _clean_tracks(raw_tracks, mismatches, audio, tracks_uri)
        q_orphans = quarantine_rows(orphans, Reason.UNKNOWN_TRACK, ["audio file for a track not in the track list"] * len(orphans))
        driver_q = pa.concat_tables([q_lines, q_tracks, q_orphans])
        track_q = pa.concat_tables([q_lines, q_tracks])
        tracks_file = join(storage.staging_uri(outputs[TRACKS], run_id), "part-00000.parquet")
        storage.write_parquet(tracks, tracks_file)
        driver_q_file = join(storage.staging_uri(outputs[QUARANTINE], run_id), "part-driver.parquet")
        storage.write_parquet(_quarantine_table(driver_q, run_id), driver_q_file)
    log.info("ingest: tracks %d kept (%d with audio), %d quarantined", tracks.num_rows,
             int(pc.sum(pc.is_valid(tracks["audio_uri"])).as_py() or 0), driver_q.num_rows)

    known_songs = pc.unique(tracks["song_id"])
    known_tracks = tracks["track_id"].combine_chunks()

    # --- plays
    with manifest.timed("plays"):
        ranges = _ranges(dict(singles)[triplets_uri], chunk)
        bc = sc.broadcast(known_songs)
        df = spark.createDataFrame([(i, s, e) for i, (s, e) in enumerate(ranges)], "task int, start long, end long")
        df = df.repartition(max(1, len(ranges)))
        plays_summary = df.mapInArrow(_plays_task(storage, triplets_uri, run_id, bc), _SUMMARY_DDL).toArrow()
    # --- tags
    with manifest.timed("tags"):
        groups = [lastfm_files[i : i + 500] for i in range(0, len(lastfm_files), 500)]
        if groups:
            bc_t = sc.broadcast(known_tracks)
            df = spark.createDataFrame([(i, [o.uri for o in g]) for i, g in enumerate(groups)], "task int, uris array<string>")
            df = df.repartition(max(1, min(len(groups), sc.defaultParallelism * 4)))
            tags_summary = df.mapInArrow(_tags_task(storage, run_id, bc_t), _SUMMARY_DDL).toArrow()
        else:
            tags_summary = _SUMMARY.empty_table()

    # --- counts, thresholds, publish
    def summed(summary: pa.Table, dataset: str, column: str) -> int:
        t = summary.filter(pc.equal(summary["dataset"], dataset))
        return int(pc.sum(t[column]).as_py() or 0)

    def reasons_of(summary: pa.Table) -> Counter:
        c: Counter = Counter()
        for r in summary.filter(pc.equal(summary["dataset"], QUARANTINE))["reasons"].to_pylist():
            c.update(json.loads(r))
        return c

    q_by_source = {
        "tracks": Counter(_reason_counts(track_q)),
        "audio": Counter(_reason_counts(q_orphans)),
        "plays": reasons_of(plays_summary),
        "tags": reasons_of(tags_summary),
    }
    records = {
        "tracks": raw_tracks.num_rows + q_lines.num_rows,
        "audio": len(audio_listing),
        "plays": summed(plays_summary, PLAYS, "records"),
        "tags": summed(tags_summary, TAGS, "records"),
    }
    manifest.counts = {
        "tracks": tracks.num_rows,
        "plays": summed(plays_summary, PLAYS, "rows"),
        "tags": summed(tags_summary, TAGS, "rows"),
        "track_lines": records["tracks"],
        "triplet_lines": records["plays"],
        "tag_records": records["tags"],
    }
    total_q: Counter = Counter()
    for c in q_by_source.values():
        total_q.update(c)
    manifest.quarantined = dict(sorted(total_q.items()))
    files = {
        TRACKS: [tracks_file],
        PLAYS: plays_summary.filter(pc.equal(plays_summary["dataset"], PLAYS))["file"].to_pylist(),
        TAGS: tags_summary.filter(pc.equal(tags_summary["dataset"], TAGS))["file"].to_pylist(),
        QUARANTINE: [driver_q_file] + plays_summary.filter(pc.equal(plays_summary["dataset"], QUARANTINE))["file"].to_pylist()
        + tags_summary.filter(pc.equal(tags_summary["dataset"], QUARANTINE))["file"].to_pylist(),
    }
    meta = {"input_fingerprint": fingerprint, "stage": STAGE}
    over = {k: (sum(q_by_source[k].values()), records[k]) for k in records
            if records[k] and sum(q_by_source[k].values()) / records[k] > cfg.ingest.max_quarantine_fraction}
    if over:
        # Publish the quarantine so the bad records can be inspected, but not the tables.
        storage.publish(outputs[QUARANTINE], run_id=run_id, files=files[QUARANTINE], meta={"stage": STAGE, "failed": True})
        manifest.outputs = {QUARANTINE: outputs[QUARANTINE]}
        uri = manifest.write(storage, status="failed")
        worst = "; ".join(
            f"{k}: {q:,} of {n:,} records ({q / n:.1%}: "
            + ", ".join(f"{r} {c:,}" for r, c in sorted(q_by_source[k].items())) + ")"
            for k, (q, n) in over.items())
        raise QuarantineThresholdExceeded(
            f"ingest quarantined more than {cfg.ingest.max_quarantine_fraction:.1%} of its input ({worst}); "
            f"nothing was published except the quarantine at {outputs[QUARANTINE]} (manifest {uri})")
    with manifest.timed("publish"):
        for name, uri in outputs.items():
            storage.publish(uri, run_id=run_id, files=files[name], meta={**meta, "rows": manifest.counts.get(name.split("/")[-1])})
    manifest.outputs = dict(outputs)
    if warehouse is not None:
        with manifest.timed("warehouse"):
            warehouse.ensure_tables(["tracks", "quarantine"])
            warehouse.upsert("tracks", tracks, run_id=run_id)
            q_all = storage.read_parquet(files[QUARANTINE])
            warehouse.append("quarantine", q_all, run_id=run_id)
        manifest.outputs["warehouse"] = f"{cfg.warehouse.namespace}.tracks, {cfg.warehouse.namespace}.quarantine"
    manifest_uri = manifest.write(storage, status="succeeded")
    log.info("ingest: published tracks=%d plays=%d tags=%d quarantined=%s; manifest %s", manifest.counts["tracks"],
             manifest.counts["plays"], manifest.counts["tags"], dict(total_q) or "none", manifest_uri)
    return StageResult(run_id, True, manifest.counts, dict(total_q), outputs, manifest_uri)
