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

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import PLAYS, REJECTED_SCHEMA, TAGS, TRACKS, quarantine_table
from deepcontent.errors import InputMissingError
from deepcontent.interactions.sources import (
    Reason,
    parse_lastfm_json,
    parse_mismatches,
    parse_triplets,
    parse_unique_tracks,
    quarantine_rows,
    read_lastfm_db,
)
from deepcontent.manifest import log
from deepcontent.stages.base import QuarantineCheck, StageContext, StageResult, StageRun
from deepcontent.storage import ObjectInfo, Storage, join, posix_basename

__all__ = ["AUDIO_EXTENSIONS", "STAGE", "run"]

STAGE = "ingest"
QUARANTINE = datasets.quarantine(STAGE)
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".flac", ".wav", ".au", ".m4a")

# What a task returns to the driver: one row per file it wrote.
_SUMMARY = pa.schema([("dataset", pa.string()), ("file", pa.string()), ("rows", pa.int64()),
                      ("records", pa.int64()), ("reasons", pa.string())])
_SUMMARY_DDL = "dataset string, file string, rows long, records long, reasons string"


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


def _write_parts(storage: Storage, run_id: str, part: str, outputs: dict[datasets.Dataset, pa.Table], records: int,
                 reasons: dict[str, int]) -> pa.RecordBatch:
    """Write one task's output tables (dataset -> rows) and summarise them for the driver.

    ``part`` must be unique across every task of the run that writes to the same dataset
    (plays and tags tasks both write quarantine parts)."""
    rows = {"dataset": [], "file": [], "rows": [], "records": [], "reasons": []}
    for dataset, table in outputs.items():
        uri = join(dataset.staging(storage, run_id), f"part-{part}.parquet")
        storage.write_parquet(table.cast(dataset.schema), uri)
        rows["dataset"].append(dataset.key)
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
                                   {PLAYS: plays, QUARANTINE: quarantine_table(q, stage=STAGE, run_id=run_id)}, records,
                                   _reason_counts(q))

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
                tags = pa.concat_tables(tag_parts) if tag_parts else TAGS.schema.empty_table()
                q = pa.concat_tables(q_parts) if q_parts else REJECTED_SCHEMA.empty_table()
                records = tags.num_rows + q.num_rows
                yield _write_parts(storage, run_id, f"tags-{task:05d}",
                                   {TAGS: tags, QUARANTINE: quarantine_table(q, stage=STAGE, run_id=run_id)},
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
    tracks = tracks.append_column("audio_uri", audio_uri).cast(TRACKS.schema)
    q = pa.concat_tables(q_parts) if q_parts else REJECTED_SCHEMA.empty_table()
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


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the ingest stage; see the module docstring.

    The published ``tracks`` are also upserted into the Iceberg ``tracks`` table and the run's
    quarantine appended to ``quarantine`` (one commit each, idempotent per run). Raises
    :class:`~deepcontent.errors.QuarantineExceeded` (after publishing the quarantine) when an
    input's bad fraction exceeds ``ingest.max_quarantine_fraction``."""
    storage, spark = ctx.storage, ctx.spark
    src, raw = cfg.sources, (lambda key: storage.raw_uri(cfg.storage.raw_prefix, key))
    tracks_uri, triplets_uri, mismatch_uri = raw(src.tracks), raw(src.triplets), raw(src.mismatches)
    with StageRun(STAGE, cfg, storage, sections=("ingest", "sources")) as run:
        with run.timed("list_inputs"):
            for required in (tracks_uri, triplets_uri):
                if not storage.exists(required):
                    raise InputMissingError(f"ingest input missing: {required} (run `deepcontent generate` or set sources.*)")
            lastfm_files = [o for o in storage.list(raw(src.lastfm_json)) if o.uri.endswith(".json")]
            if storage.exists(raw(src.lastfm_db)):
                lastfm_files.append(ObjectInfo(raw(src.lastfm_db), storage.size(raw(src.lastfm_db))))
            audio_listing = storage.list(raw(src.audio))
            singles = [(u, storage.size(u)) for u in (tracks_uri, triplets_uri) + ((mismatch_uri,) if storage.exists(mismatch_uri) else ())]
            listing = singles + [(o.uri, o.size) for o in lastfm_files] + [(o.uri, o.size) for o in audio_listing]
            fingerprint = _fingerprint(cfg, listing)
        run.manifest.inputs = {"fingerprint": fingerprint, "files": {u: s for u, s in singles},
                               "lastfm_files": len(lastfm_files), "audio_files": len(audio_listing)}
        outputs = {d.key: run.uri(d) for d in (TRACKS, PLAYS, TAGS, QUARANTINE)}
        current = [storage.published(u) for u in outputs.values()]
        if all(p is not None and p.get("input_fingerprint") == fingerprint for p in current):
            log.info("ingest: inputs unchanged since run %s; nothing to do", current[0]["run_id"])
            return run.unchanged(current[0]["run_id"], outputs=outputs)

        log.info("ingest: run %s — %d Last.fm files, %d audio files, triplets %.1f MB", run.run_id, len(lastfm_files),
                 len(audio_listing), dict(singles)[triplets_uri] / 1e6)
        sc = spark.sparkContext
        chunk = cfg.ingest.chunk_bytes

        # --- tracks (parsed by tasks, cleaned on the driver: it needs the whole list)
        with run.timed("tracks"):
            mismatches = parse_mismatches(storage.read_bytes(mismatch_uri) if storage.exists(mismatch_uri) else b"")
            ranges = _ranges(dict(singles)[tracks_uri], chunk)
            df = spark.createDataFrame([(s, e) for s, e in ranges], "start long, end long").repartition(max(1, len(ranges)))
            rows = df.mapInArrow(_tracks_task(storage, tracks_uri), "kind string, a string, b string, c string, d string").toArrow()
            is_track = pc.equal(rows["kind"], "track")
            raw_tracks = rows.filter(is_track)
            raw_tracks = pa.table({"track_id": raw_tracks["a"], "song_id": raw_tracks["b"], "artist": raw_tracks["c"],
                                   "title": raw_tracks["d"]})
            q_lines = rows.filter(pc.invert(is_track))
            q_lines = pa.table({"source": q_lines["a"], "reason": q_lines["b"], "detail": q_lines["c"]}, schema=REJECTED_SCHEMA)
            track_ids = set(raw_tracks["track_id"].to_pylist())
            audio, orphans = _audio_index(audio_listing, track_ids)
            tracks, q_tracks = _clean_tracks(raw_tracks, mismatches, audio, tracks_uri)
            q_orphans = quarantine_rows(orphans, Reason.UNKNOWN_TRACK, ["audio file for a track not in the track list"] * len(orphans))
            track_q = pa.concat_tables([q_lines, q_tracks])
            for rejected in (q_lines, q_tracks, q_orphans):
                run.reject(rejected)
            tracks_file = run.write_part(TRACKS, tracks)
        log.info("ingest: tracks %d kept (%d with audio), %d quarantined", tracks.num_rows,
                 int(pc.sum(pc.is_valid(tracks["audio_uri"])).as_py() or 0), track_q.num_rows + q_orphans.num_rows)

        known_songs = pc.unique(tracks["song_id"])
        known_tracks = tracks["track_id"].combine_chunks()

        # --- plays
        with run.timed("plays"):
            ranges = _ranges(dict(singles)[triplets_uri], chunk)
            bc = sc.broadcast(known_songs)
            df = spark.createDataFrame([(i, s, e) for i, (s, e) in enumerate(ranges)], "task int, start long, end long")
            df = df.repartition(max(1, len(ranges)))
            plays_summary = df.mapInArrow(_plays_task(storage, triplets_uri, run.run_id, bc), _SUMMARY_DDL).toArrow()
        # --- tags
        with run.timed("tags"):
            groups = [lastfm_files[i : i + 500] for i in range(0, len(lastfm_files), 500)]
            if groups:
                bc_t = sc.broadcast(known_tracks)
                df = spark.createDataFrame([(i, [o.uri for o in g]) for i, g in enumerate(groups)], "task int, uris array<string>")
                df = df.repartition(max(1, min(len(groups), sc.defaultParallelism * 4)))
                tags_summary = df.mapInArrow(_tags_task(storage, run.run_id, bc_t), _SUMMARY_DDL).toArrow()
            else:
                tags_summary = _SUMMARY.empty_table()

        # --- counts, thresholds, publish
        def of(summary: pa.Table, dataset: datasets.Dataset) -> pa.Table:
            return summary.filter(pc.equal(summary["dataset"], dataset.key))

        def summed(summary: pa.Table, dataset: datasets.Dataset, column: str) -> int:
            return int(pc.sum(of(summary, dataset)[column]).as_py() or 0)

        def reasons_of(summary: pa.Table) -> Counter:
            c: Counter = Counter()
            for r in of(summary, QUARANTINE)["reasons"].to_pylist():
                c.update(json.loads(r))
            return c

        checks = {
            "tracks": QuarantineCheck(Counter(_reason_counts(track_q)), raw_tracks.num_rows + q_lines.num_rows, label="tracks"),
            "audio": QuarantineCheck(Counter(_reason_counts(q_orphans)), len(audio_listing), label="audio"),
            "plays": QuarantineCheck(reasons_of(plays_summary), summed(plays_summary, PLAYS, "records"), label="plays"),
            "tags": QuarantineCheck(reasons_of(tags_summary), summed(tags_summary, TAGS, "records"), label="tags"),
        }
        counts = {
            "tracks": tracks.num_rows, "plays": summed(plays_summary, PLAYS, "rows"), "tags": summed(tags_summary, TAGS, "rows"),
            "track_lines": checks["tracks"].total, "triplet_lines": checks["plays"].total, "tag_records": checks["tags"].total,
        }
        total_q: Counter = Counter()
        for c in checks.values():
            total_q.update(c.rejected)
        run.add_quarantine_files(of(plays_summary, QUARANTINE)["file"].to_pylist() + of(tags_summary, QUARANTINE)["file"].to_pylist())
        run.check_quarantine(checks.values(), limit=cfg.ingest.max_quarantine_fraction)
        files = {TRACKS: [tracks_file], PLAYS: of(plays_summary, PLAYS)["file"].to_pylist(),
                 TAGS: of(tags_summary, TAGS)["file"].to_pylist(), QUARANTINE: run.quarantine_files()}
        with run.timed("publish"):
            for dataset, parts in files.items():
                run.publish(dataset, parts, meta={"input_fingerprint": fingerprint, "rows": counts.get(dataset.key.split("/")[-1])})
        with run.timed("warehouse"):
            wh = ctx.warehouse
            wh.ensure_tables(["tracks", "plays", "tags", "quarantine"])
            wh.upsert("tracks", tracks, run_id=run.run_id)
            for dataset in (PLAYS, TAGS):  # re-derived whole each run: replaced, one part at a time
                wh.replace(dataset.table, lambda d=dataset: (storage.read_parquet(f) for f in files[d]), run_id=run.run_id)
            wh.append("quarantine", storage.read_parquet(files[QUARANTINE]), run_id=run.run_id)
        log.info("ingest: published tracks=%d plays=%d tags=%d quarantined=%s", counts["tracks"], counts["plays"],
                 counts["tags"], dict(total_q) or "none")
        return run.succeed(counts=counts, quarantined=dict(sorted(total_q.items())), outputs=outputs,
                           tables=[f"{cfg.warehouse.namespace}.{t}" for t in ("tracks", "plays", "tags", "quarantine")])
