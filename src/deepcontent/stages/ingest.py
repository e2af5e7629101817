"""Stage ``ingest`` (Spark): the catalog as published -> canonical ``tracks``, ``plays``,
``tags`` and ``quarantine`` datasets in object storage (and their warehouse tables).

The catalog arrives in one of three shapes (``sources.catalog``, see
:class:`~deepcontent.config.SourcesConfig`):

``msd``     ``unique_tracks.txt`` + ``sid_mismatches.txt``, audio named ``<track_id>.<ext>``
``table``   a track list (CSV / TSV / Parquet / Iceberg) whose audio column names each track's
            object, by key under ``sources.audio`` or by full URI
``folder``  no list: every object under ``sources.audio`` is a track (id from its key)

and plays (Taste Profile triplets, a table of counts, or a table of listening events that Spark
aggregates to counts over a time window) and tags (Last.fm JSON / ``lastfm_tags.db``, or a
table) are optional: an audio-only catalog publishes empty plays and tags.

Flow (driver on the left, Spark tasks on the right)::

    list inputs, fingerprint them ─┐
    nothing changed? stop          │
    the track list ────────────────┼─> parse ranges / read the table      (returns rows)
    attach each audio object,      │
    account for every object       │
    plays (triplets in ranges) ────┼─> parse, check songs, write part + quarantine part
    plays (table files) ───────────┼─> map columns, check, (events: window) -> aggregate -> write
    tags (Last.fm files / table) ──┼─> parse, check tracks, write part + quarantine part
    check quarantine thresholds    │
    publish each dataset, commit the tables, write the run manifest last

**Every object under the audio prefix is accounted for**: attached to a track, or a quarantine
row — ``unknown_track`` (no track names it), ``duplicate_audio`` (a second object for a track
that has one), ``unsupported_format`` (a file type that is never audio: cover art, text,
playlists; any other object is a candidate and its *content* decides at the spectrogram stage).
The manifest's ``audio_objects`` = ``audio_used`` + the quarantined ones.

Tasks write under ``data/<run_id>/`` of each dataset, invisible until the driver publishes the
pointer (see :mod:`deepcontent.storage`); a retried task rewrites its own deterministic file
name, so retries never duplicate rows. Object-store I/O happens inside the Python tasks through
:class:`~deepcontent.storage.Storage` (``mapInArrow``), never through Hadoop's S3 connector.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent import datasets
from deepcontent.catalog import SourceTable, resolve_uri
from deepcontent.config import Config
from deepcontent.datasets import PLAYS, REJECTED_SCHEMA, TAGS, TRACKS, quarantine_table
from deepcontent.errors import InputMissingError
from deepcontent.interactions.sources import (
    INT32_MAX,
    Reason,
    parse_lastfm_json,
    parse_mismatches,
    parse_triplets,
    parse_unique_tracks,
    quarantine_rows,
    read_lastfm_db,
    too_long_rows,
)
from deepcontent.interactions.tables import folder_tracks, play_counts, play_events, tag_rows, track_list
from deepcontent.manifest import log
from deepcontent.stages.base import QuarantineCheck, StageContext, StageResult, StageRun
from deepcontent.storage import ObjectInfo, Storage, join, posix_basename, relative_key, safe_key

__all__ = ["STAGE", "run"]

STAGE = "ingest"
QUARANTINE = datasets.quarantine(STAGE)

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
_TRACK_ROWS = pa.schema([("kind", pa.string()), ("a", pa.string()), ("b", pa.string()), ("c", pa.string()),
                         ("d", pa.string())])


def _read_lines(storage: Storage, uri: str, start: int, end: int, max_line_bytes: int, parse) -> tuple[pa.Table, pa.Table]:
    """Parse the lines of one range with ``parse(data, uri=, base_offset=) -> (rows, rejected)``;
    lines over ``max_line_bytes`` are rejected as ``line_too_long`` without being read whole."""
    segments, too_long = storage.read_line_segments(uri, start, end, max_line_bytes=max_line_bytes)
    parts = [parse(data, uri=uri, base_offset=offset) for offset, data in segments] or [parse(b"", uri=uri, base_offset=start)]
    rows = pa.concat_tables([p[0] for p in parts])
    rejected = pa.concat_tables([p[1] for p in parts] + [too_long_rows(uri, too_long, max_line_bytes)])
    return rows, rejected


def _tracks_task(storage: Storage, uri: str, max_line_bytes: int):
    """mapInArrow body: parse ranges of unique_tracks.txt, return tracks + quarantine rows."""

    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        for batch in batches:
            for start, end in zip(batch.column("start").to_pylist(), batch.column("end").to_pylist()):
                tracks, q = _read_lines(storage, uri, start, end, max_line_bytes, parse_unique_tracks)
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


def _quarantined(run_id: str, q: pa.Table) -> pa.Table:
    return quarantine_table(q, stage=STAGE, run_id=run_id)


def _triplets_task(storage: Storage, uri: str, run_id: str, known_songs_bc, max_line_bytes: int):
    def run(batches):
        from functools import partial

        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        known = known_songs_bc.value
        parse = partial(parse_triplets, known_songs=known)
        for batch in batches:
            for task, start, end in zip(*(batch.column(c).to_pylist() for c in ("task", "start", "end"))):
                plays, q = _read_lines(storage, uri, start, end, max_line_bytes, parse)
                records = plays.num_rows + q.num_rows
                yield _write_parts(storage, run_id, f"plays-{task:05d}", {PLAYS: plays, QUARANTINE: _quarantined(run_id, q)},
                                   records, _reason_counts(q))

    return run


def _known_items(rows: pa.Table, id_name: str, known: dict, where: str) -> tuple[pa.Table, pa.Table]:
    """Rows whose item is in the catalog, their ``song_id`` attached (a track id maps to its
    song); the others rejected as ``unknown_track`` / ``unknown_song``."""
    ids = rows[id_name].combine_chunks()
    if id_name == "track_id":
        keys = pa.array(list(known["track_song"].keys()), pa.string())
        pos = pc.index_in(ids, value_set=keys)
        songs = pc.take(pa.array(list(known["track_song"].values()), pa.string()), pos)
        reason = Reason.UNKNOWN_TRACK
    else:
        songs = pc.if_else(pc.is_in(ids, value_set=known["songs"]), ids, pa.scalar(None, pa.string()))
        reason = Reason.UNKNOWN_SONG
    bad = np.asarray(pc.is_null(songs).to_numpy(zero_copy_only=False), dtype=bool)
    rejected = quarantine_rows([f"{where}#{id_name}={v}" for v in pc.filter(ids, pa.array(bad)).to_pylist()], reason,
                               [f"{id_name.split('_')[0]} {v!r} is not in the track list"
                                for v in pc.filter(ids, pa.array(bad)).to_pylist()])
    keep = pa.array(~bad)
    return pa.table({"user_id": pc.filter(rows["user_id"], keep), "song_id": pc.filter(songs, keep),
                     "play_count": pc.filter(rows["play_count"], keep)}), rejected


_PLAY_ROWS_DDL = "kind string, user_id string, song_id string, play_count long, file string, records long, reasons string"


def _play_table_task(table: SourceTable, run_id: str, known_bc, *, kind: str, since, until):
    """mapInArrow body over a plays table's files: map the columns, check every row (and, for
    events, the time window), write the rejected rows; emit good rows for aggregation plus one
    summary row per file."""

    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        known = known_bc.value
        cols = table.source.columns
        for batch in batches:
            for task, uri in zip(batch.column("task").to_pylist(), batch.column("file").to_pylist()):
                data = table.read_file(uri)
                if kind == "events":
                    id_name, rows, rejected, outside = play_events(data, columns=cols, where=uri, since=since, until=until)
                else:
                    (id_name, rows, rejected), outside = play_counts(data, columns=cols, where=uri), 0
                rows, unknown = _known_items(rows, id_name, known, uri)
                q = pa.concat_tables([rejected, unknown])
                q_file = join(QUARANTINE.staging(table.storage, run_id), f"part-playtable-{task:05d}.parquet")
                table.storage.write_parquet(_quarantined(run_id, q), q_file)
                n = rows.num_rows
                yield pa.RecordBatch.from_pydict({
                    "kind": ["play"] * n + ["summary"], "user_id": rows["user_id"].to_pylist() + [None],
                    "song_id": rows["song_id"].to_pylist() + [None],
                    "play_count": rows["play_count"].to_pylist() + [outside],
                    "file": [None] * n + [q_file], "records": [None] * n + [data.num_rows],
                    "reasons": [None] * n + [json.dumps(_reason_counts(q))]})

    return run


def _write_aggregated_task(storage: Storage, run_id: str):
    """mapInArrow body over the aggregated (user, song, count) rows: one plays part per
    partition (the partition id names it, so a retry rewrites the same file)."""

    def run(batches):
        from pyspark import TaskContext

        tables = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
        part = TaskContext.get().partitionId()
        rows = pa.concat_tables(tables) if tables else pa.table({"user_id": pa.array([], pa.string()),
                                                                  "song_id": pa.array([], pa.string()),
                                                                  "play_count": pa.array([], pa.int64())})
        counts = rows["play_count"].to_numpy(zero_copy_only=False)
        over = counts > INT32_MAX
        q = quarantine_rows([f"plays:{u}/{s}" for u, s in zip(pc.filter(rows["user_id"], pa.array(over)).to_pylist(),
                                                             pc.filter(rows["song_id"], pa.array(over)).to_pylist())],
                            Reason.BAD_COUNT, [f"aggregated play count {c} is beyond int32" for c in counts[over]])
        rows = rows.filter(pa.array(~over))
        plays = pa.table({"user_id": rows["user_id"], "song_id": rows["song_id"],
                          "play_count": rows["play_count"].cast(pa.int32())})
        yield _write_parts(storage, run_id, f"plays-agg-{part:05d}", {PLAYS: plays, QUARANTINE: _quarantined(run_id, q)},
                           0, _reason_counts(q))

    return run


def _tags_task(storage: Storage, run_id: str, known_tracks_bc, table: SourceTable | None = None):
    """mapInArrow body over groups of Last.fm files (JSON or ``lastfm_tags.db``) or of a tag
    table's files: parse, drop tags of tracks not in the list (quarantined), write parts."""

    def run(batches):
        from deepcontent.engines.spark import set_task_threads

        set_task_threads()
        known = known_tracks_bc.value
        for batch in batches:
            for task, uris in zip(batch.column("task").to_pylist(), batch.column("uris").to_pylist()):
                tag_parts, q_parts = [], []
                for uri in uris:
                    if table is not None:
                        tags, q = tag_rows(table.read_file(uri), columns=table.source.columns, where=uri)
                    elif uri.endswith(".db"):
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
                yield _write_parts(storage, run_id, f"tags-{task:05d}", {TAGS: tags, QUARANTINE: _quarantined(run_id, q)},
                                   records, _reason_counts(q))

    return run


# ----------------------------------------------------------------------------- driver
@dataclass
class _Inputs:
    """The catalog as this run sees it: which sources, which objects, and their fingerprint."""

    catalog: str
    plays: str
    tags: str
    singles: dict[str, ObjectInfo] = field(default_factory=dict)  # line files by URI
    audio: list[ObjectInfo] = field(default_factory=list)
    lastfm: list[ObjectInfo] = field(default_factory=list)
    tables: dict[str, SourceTable] = field(default_factory=dict)
    superseded: int = 0  # Last.fm JSON files the database replaces
    fingerprint: str = ""


def _resolve(cfg: Config, ctx: StageContext) -> _Inputs:
    """Decide the sources, list what they hold, fingerprint it; missing required inputs raise
    :class:`InputMissingError` naming them."""
    storage, src = ctx.storage, cfg.sources
    raw = lambda key: resolve_uri(storage, cfg.storage.raw_prefix, key)  # noqa: E731
    table = lambda s, what: SourceTable(s, storage, raw_prefix=cfg.storage.raw_prefix,  # noqa: E731
                                        warehouse=ctx.warehouse if s.uri.startswith("iceberg:") else None, what=what)
    inp = _Inputs(catalog=src.catalog_kind(), plays=src.plays, tags=src.tags)
    if inp.catalog == "msd":
        if not storage.exists(raw(src.tracks)):
            raise InputMissingError(f"ingest input missing: {raw(src.tracks)} (run `deepcontent generate`, set "
                                    f"sources.tracks, or use sources.catalog=table / folder)")
        inp.singles[raw(src.tracks)] = storage.info(raw(src.tracks))
        if storage.exists(raw(src.mismatches)):
            inp.singles[raw(src.mismatches)] = storage.info(raw(src.mismatches))
    elif inp.catalog == "table":
        inp.tables["tracks"] = table(src.track_table, "sources.track_table")
    if inp.plays == "auto":
        inp.plays = "table" if src.play_table is not None else (
            "taste_profile" if storage.exists(raw(src.triplets)) else "none")
    if inp.plays == "taste_profile":
        if not storage.exists(raw(src.triplets)):
            raise InputMissingError(f"ingest input missing: {raw(src.triplets)} (sources.plays=taste_profile)")
        inp.singles[raw(src.triplets)] = storage.info(raw(src.triplets))
    elif inp.plays == "table":
        inp.tables["plays"] = table(src.play_table, "sources.play_table")
    if inp.tags == "lastfm" or (inp.tags == "auto" and src.tag_table is None):
        inp.lastfm = [o for o in storage.list(raw(src.lastfm_json)) if o.uri.endswith(".json")]
        if storage.exists(raw(src.lastfm_db)):
            # The dataset ships the same tags twice (per-track JSON and one SQLite file): the
            # database alone, so no (track, tag) pair is read twice; the JSON files are counted.
            inp.superseded = len(inp.lastfm)
            inp.lastfm = [storage.info(raw(src.lastfm_db))]
        inp.tags = "lastfm" if inp.lastfm or inp.tags == "lastfm" else "none"
    elif inp.tags in ("auto", "table"):
        inp.tags = "table"
        inp.tables["tags"] = table(src.tag_table, "sources.tag_table")
    inp.audio = storage.list(raw(src.audio))
    h = hashlib.sha256(cfg.fingerprint("ingest", "sources", "storage").encode())
    # Each object by its version (ETag, else size and modification time): a same-size edit of
    # a triplets file is a new input.
    listing = [(o.uri, o.version) for o in list(inp.singles.values()) + inp.lastfm + inp.audio]
    for t in inp.tables.values():
        listing += t.fingerprint()
    for uri, version in listing:
        h.update(f"{uri}\t{version}\n".encode())
    inp.fingerprint = h.hexdigest()[:24]
    return inp


def _clean_msd_tracks(tracks: pa.Table, mismatches: pa.Table, tracks_uri: str) -> tuple[pa.Table, pa.Table]:
    """Drop duplicate track ids and mismatched song–track pairs of an MSD track list."""
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
                [f"song {s!r} / track {t!r} is listed in sid_mismatches.txt"
                 for s, t in zip(bad["song_id"].to_pylist(), bad["track_id"].to_pylist())]))
            tracks = tracks.filter(pc.invert(mis))
    return tracks, (pa.concat_tables(q_parts) if q_parts else REJECTED_SCHEMA.empty_table())


def _not_audio(listing: list[ObjectInfo], extensions: tuple[str, ...]) -> tuple[list[ObjectInfo], pa.Table]:
    """Split off objects whose extension is never audio (``unsupported_format``, not read)."""
    ext = {e.lower() for e in extensions}
    keep, bad = [], []
    for obj in listing:
        name = posix_basename(obj.uri).lower()
        suffix = posixpath.splitext(name)[1] or (name if name.startswith(".") else "")
        (bad if suffix in ext else keep).append(obj)
    rejected = quarantine_rows([o.uri for o in bad], Reason.UNSUPPORTED_FORMAT,
                               [f"{posixpath.splitext(o.uri)[1] or posix_basename(o.uri)} files are not audio "
                                f"(ingest.non_audio_extensions)" for o in bad])
    return keep, rejected


def _attach_by_stem(tracks: pa.Table, listing: list[ObjectInfo]) -> tuple[pa.Table, pa.Table, int]:
    """MSD layout: the object named ``<track_id>.<ext>`` (first by URI) is the track's audio;
    a second one is ``duplicate_audio``, one for no listed track ``unknown_track``."""
    ids = set(tracks["track_id"].to_pylist())
    audio: dict[str, str] = {}
    dup, orphans = [], []
    for obj in listing:
        name = posix_basename(obj.uri)
        stem = name.rpartition(".")[0] or name
        if stem in ids:
            if stem in audio:
                dup.append((obj.uri, audio[stem]))
            else:
                audio[stem] = obj.uri
        else:
            orphans.append(obj.uri)
    tracks = tracks.append_column("audio_uri", pa.array([audio.get(t) for t in tracks["track_id"].to_pylist()], pa.string()))
    rejected = pa.concat_tables([
        quarantine_rows(orphans, Reason.UNKNOWN_TRACK, ["audio file for a track not in the track list"] * len(orphans)),
        quarantine_rows([u for u, _ in dup], Reason.DUPLICATE_AUDIO,
                        [f"the track already has its audio at {first}" for _, first in dup])])
    return tracks.cast(TRACKS.schema), rejected, len(audio)


def _attach_by_location(tracks: pa.Table, listing: list[ObjectInfo], *, storage: Storage, audio_base: str,
                        where: str) -> tuple[pa.Table, pa.Table, pa.Table, int]:
    """Table layout: each track's audio column is a full URI or a key under ``audio_base``.
    Objects under the prefix no track names are ``unknown_track``; a key that would escape the
    prefix is rejected with its track (``malformed_line``)."""
    uris, bad_rows = [], []
    for i, (t, loc) in enumerate(zip(tracks["track_id"].to_pylist(), tracks["audio"].to_pylist())):
        if loc is None:
            uris.append(None)
        elif "://" in loc:
            uris.append(loc)
        else:
            try:
                uris.append(join(audio_base, safe_key(loc)))
            except ValueError as exc:
                uris.append(None)
                bad_rows.append((i, f"track {t!r}: audio key {loc!r} is not a safe key: {exc}"))
    keep = np.ones(tracks.num_rows, dtype=bool)
    keep[[i for i, _ in bad_rows]] = False
    rejected_rows = quarantine_rows([f"{where}#track_id={tracks['track_id'][i].as_py()}" for i, _ in bad_rows],
                                    Reason.MALFORMED_LINE, [d for _, d in bad_rows])
    out = tracks.drop_columns(["audio"]).append_column("audio_uri", pa.array(uris, pa.string())).filter(pa.array(keep))
    named = set(u for u in out["audio_uri"].to_pylist() if u)
    orphans = [o.uri for o in listing if o.uri not in named]
    rejected_objects = quarantine_rows(orphans, Reason.UNKNOWN_TRACK,
                                       ["audio object no track of the track list names"] * len(orphans))
    return out.cast(TRACKS.schema), rejected_rows, rejected_objects, len(listing) - len(orphans)


def _tracks(cfg: Config, ctx: StageContext, inp: _Inputs, run: StageRun, audio: list[ObjectInfo]):
    """The cleaned track list with each track's audio attached, the rejected track records and
    objects, and how many listed objects the tracks use."""
    storage, spark, src = ctx.storage, ctx.spark, cfg.sources
    audio_base = resolve_uri(storage, cfg.storage.raw_prefix, src.audio)
    empty = REJECTED_SCHEMA.empty_table()
    if inp.catalog == "folder":
        keys = [relative_key(audio_base, o.uri) for o in audio]
        return folder_tracks(keys, [o.uri for o in audio]).cast(TRACKS.schema), empty, empty, len(audio), len(audio)
    if inp.catalog == "table":
        t = inp.tables["tracks"]
        raw_tracks, rejected = track_list(t.read(), columns=t.source.columns, where=t.uri)
        tracks, bad_rows, bad_objects, used = _attach_by_location(raw_tracks, audio, storage=storage,
                                                                  audio_base=audio_base, where=t.uri)
        return tracks, pa.concat_tables([rejected, bad_rows]), bad_objects, raw_tracks.num_rows + rejected.num_rows, used
    # msd
    tracks_uri = resolve_uri(storage, cfg.storage.raw_prefix, src.tracks)
    mismatch_uri = resolve_uri(storage, cfg.storage.raw_prefix, src.mismatches)
    mismatches = parse_mismatches(storage.read_bytes(mismatch_uri) if mismatch_uri in inp.singles else b"")
    ranges = _ranges(inp.singles[tracks_uri].size, cfg.ingest.chunk_bytes)
    df = spark.createDataFrame([(s, e) for s, e in ranges], "start long, end long").repartition(max(1, len(ranges)))
    rows = df.mapInArrow(_tracks_task(storage, tracks_uri, cfg.ingest.max_line_bytes), "kind string, a string, b string, c string, d string").toArrow()
    is_track = pc.equal(rows["kind"], "track")
    raw_tracks = rows.filter(is_track)
    raw_tracks = pa.table({"track_id": raw_tracks["a"], "song_id": raw_tracks["b"], "artist": raw_tracks["c"],
                           "title": raw_tracks["d"]})
    q_lines = rows.filter(pc.invert(is_track))
    q_lines = pa.table({"source": q_lines["a"], "reason": q_lines["b"], "detail": q_lines["c"]}, schema=REJECTED_SCHEMA)
    cleaned, q_tracks = _clean_msd_tracks(raw_tracks, mismatches, tracks_uri)
    tracks, bad_objects, used = _attach_by_stem(cleaned, audio)
    return tracks, pa.concat_tables([q_lines, q_tracks]), bad_objects, raw_tracks.num_rows + q_lines.num_rows, used


def _plays(cfg: Config, ctx: StageContext, inp: _Inputs, run: StageRun, tracks: pa.Table) -> tuple[pa.Table, int]:
    """Plays tasks' summary rows (``_SUMMARY``) and events left out by the time window."""
    storage, spark = ctx.storage, ctx.spark
    sc = spark.sparkContext
    if inp.plays == "none":
        return _SUMMARY.empty_table(), 0
    if inp.plays == "taste_profile":
        uri = resolve_uri(storage, cfg.storage.raw_prefix, cfg.sources.triplets)
        ranges = _ranges(inp.singles[uri].size, cfg.ingest.chunk_bytes)
        bc = sc.broadcast(pc.unique(tracks["song_id"]))
        df = spark.createDataFrame([(i, s, e) for i, (s, e) in enumerate(ranges)], "task int, start long, end long")
        out = df.repartition(max(1, len(ranges))).mapInArrow(_triplets_task(storage, uri, run.run_id, bc, cfg.ingest.max_line_bytes), _SUMMARY_DDL)
        summary = out.toArrow()
        bc.unpersist()
        return summary, 0
    # a table of counts or events: checked per file, aggregated to one count per (user, song)
    from pyspark import StorageLevel

    table = inp.tables["plays"]
    files = table.files()
    if not files:  # an Iceberg table with row-level deletes: read whole here, staged as one file
        staged = run.part_uri(PLAYS, "source-00000.parquet")
        storage.write_parquet(table.read(), staged)
        table = SourceTable(table.source.model_copy(update={"uri": staged, "format": "parquet"}), storage,
                            raw_prefix=cfg.storage.raw_prefix, what=table.what)
        files = [staged]
    known = {"songs": pc.unique(tracks["song_id"]),
             "track_song": dict(zip(tracks["track_id"].to_pylist(), tracks["song_id"].to_pylist()))}
    bc = sc.broadcast(known)
    ps = cfg.sources.play_table
    df = spark.createDataFrame(list(enumerate(files)), "task int, file string").repartition(max(1, len(files)))
    rows = df.mapInArrow(_play_table_task(table, run.run_id, bc, kind=ps.kind, since=ps.since, until=ps.until),
                         _PLAY_ROWS_DDL).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        per_file = rows.filter("kind = 'summary'").toArrow()
        agg = (rows.filter("kind = 'play'").groupBy("user_id", "song_id").sum("play_count")
               .withColumnRenamed("sum(play_count)", "play_count"))
        written = agg.mapInArrow(_write_aggregated_task(storage, run.run_id), _SUMMARY_DDL).toArrow()
    finally:
        rows.unpersist()
        bc.unpersist()
    quarantine_summary = pa.table({
        "dataset": pa.array([QUARANTINE.key] * per_file.num_rows, pa.string()), "file": per_file["file"],
        "rows": pa.array([0] * per_file.num_rows, pa.int64()), "records": pa.array([0] * per_file.num_rows, pa.int64()),
        "reasons": per_file["reasons"]}, schema=_SUMMARY)
    records = int(pc.sum(per_file["records"]).as_py() or 0)
    outside = int(pc.sum(per_file["play_count"]).as_py() or 0)
    # the source rows are the records checked; aggregated rows are counted where they land
    totals = pa.table({"dataset": [PLAYS.key], "file": pa.array([None], pa.string()), "rows": pa.array([0], pa.int64()),
                       "records": pa.array([records], pa.int64()), "reasons": ["{}"]}, schema=_SUMMARY)
    return pa.concat_tables([written, quarantine_summary, totals]), outside


def _tags(cfg: Config, ctx: StageContext, inp: _Inputs, run: StageRun, tracks: pa.Table) -> pa.Table:
    storage, spark = ctx.storage, ctx.spark
    sc = spark.sparkContext
    table = inp.tables.get("tags")
    if inp.tags == "none":
        return _SUMMARY.empty_table()
    uris = table.files() if table is not None else [o.uri for o in inp.lastfm]
    if table is not None and not uris:  # an Iceberg table with deletes: staged whole
        staged = run.part_uri(TAGS, "source-00000.parquet")
        storage.write_parquet(table.read(), staged)
        table = SourceTable(table.source.model_copy(update={"uri": staged, "format": "parquet"}), storage,
                            raw_prefix=cfg.storage.raw_prefix, what=table.what)
        uris = [staged]
    per = 1 if table is not None else 500
    groups = [uris[i: i + per] for i in range(0, len(uris), per)]
    if not groups:
        return _SUMMARY.empty_table()
    bc = sc.broadcast(tracks["track_id"].combine_chunks())
    df = spark.createDataFrame(list(enumerate(groups)), "task int, uris array<string>")
    df = df.repartition(max(1, min(len(groups), sc.defaultParallelism * 4)))
    summary = df.mapInArrow(_tags_task(storage, run.run_id, bc, table), _SUMMARY_DDL).toArrow()
    bc.unpersist()
    return summary


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Run the ingest stage; see the module docstring.

    The published ``tracks`` are also upserted into the Iceberg ``tracks`` table, ``plays`` and
    ``tags`` replace their tables, and the run's quarantine is appended to ``quarantine`` (one
    commit each, idempotent per run). Raises :class:`~deepcontent.errors.QuarantineExceeded`
    (after publishing the quarantine) when an input's bad fraction exceeds
    ``ingest.max_quarantine_fraction``."""
    storage = ctx.storage
    with StageRun(STAGE, cfg, storage, sections=("ingest", "sources")) as run:
        with run.timed("list_inputs"):
            inp = _resolve(cfg, ctx)
        run.manifest.inputs = {"fingerprint": inp.fingerprint, "catalog": inp.catalog, "plays": inp.plays,
                               "tags": inp.tags, "files": {u: o.size for u, o in inp.singles.items()},
                               "tables": {k: t.uri for k, t in inp.tables.items()},
                               "lastfm_files": len(inp.lastfm), "audio_files": len(inp.audio)}
        outputs = {d.key: run.uri(d) for d in (TRACKS, PLAYS, TAGS, QUARANTINE)}
        done = run.previous(inp.fingerprint, warehouse=ctx.warehouse)
        if done is not None and all(storage.published(u) is not None for u in outputs.values()):
            log.info("ingest: inputs unchanged since run %s; nothing to do", done["run_id"])
            return run.unchanged(done["run_id"], outputs=outputs)
        log.info("ingest: run %s — %s catalog, plays: %s, tags: %s; %d audio objects, %d Last.fm files", run.run_id,
                 inp.catalog, inp.plays, inp.tags, len(inp.audio), len(inp.lastfm))

        with run.timed("tracks"):
            candidates, q_not_audio = _not_audio(inp.audio, cfg.ingest.non_audio_extensions)
            tracks, q_tracks, q_objects, track_records, used = _tracks(cfg, ctx, inp, run, candidates)
            for rejected in (q_tracks, q_objects, q_not_audio):
                run.reject(rejected)
            tracks_file = run.write_part(TRACKS, tracks)
        with_audio = int(pc.sum(pc.is_valid(tracks["audio_uri"])).as_py() or 0)
        log.info("ingest: tracks %d kept (%d with audio), %d track records and %d objects quarantined", tracks.num_rows,
                 with_audio, q_tracks.num_rows, q_objects.num_rows + q_not_audio.num_rows)
        with run.timed("plays"):
            plays_summary, outside_window = _plays(cfg, ctx, inp, run, tracks)
        with run.timed("tags"):
            tags_summary = _tags(cfg, ctx, inp, run, tracks)

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

        # Sidecar files (cover art, text) are accounted for but are no sign of bad input: the
        # threshold looks at the audio candidates only.
        audio_rejected = Counter(_reason_counts(q_objects))
        checks = {
            "tracks": QuarantineCheck(Counter(_reason_counts(q_tracks)), track_records, label="tracks"),
            "audio": QuarantineCheck(audio_rejected, len(candidates), unit="audio objects", label="audio"),
            "plays": QuarantineCheck(reasons_of(plays_summary), summed(plays_summary, PLAYS, "records"), label="plays"),
            "tags": QuarantineCheck(reasons_of(tags_summary), summed(tags_summary, TAGS, "records"), label="tags"),
        }
        tags_rows = [f for f in of(tags_summary, TAGS)["file"].to_pylist() if f]
        counts = {
            "tracks": tracks.num_rows, "tracks_with_audio": with_audio, "plays": summed(plays_summary, PLAYS, "rows"),
            "tags": summed(tags_summary, TAGS, "rows"), "track_lines": checks["tracks"].total,
            "triplet_lines": checks["plays"].total, "tag_records": checks["tags"].total,
            "audio_objects": len(inp.audio), "audio_used": used,
            "audio_quarantined": checks["audio"].count + q_not_audio.num_rows,
            "plays_outside_window": outside_window, "lastfm_json_superseded_by_db": inp.superseded,
        }
        if counts["audio_objects"] != counts["audio_used"] + counts["audio_quarantined"]:
            raise AssertionError(f"ingest: {counts['audio_objects']} audio objects listed but {counts['audio_used']} "
                                 f"used + {counts['audio_quarantined']} quarantined")  # a bug, never a data problem
        total_q: Counter = Counter(_reason_counts(q_not_audio))
        for c in checks.values():
            total_q.update(c.rejected)
        run.add_quarantine_files(of(plays_summary, QUARANTINE)["file"].to_pylist() + of(tags_summary, QUARANTINE)["file"].to_pylist())
        run.check_quarantine(checks.values(), limit=cfg.ingest.max_quarantine_fraction)
        files = {TRACKS: [tracks_file], PLAYS: [f for f in of(plays_summary, PLAYS)["file"].to_pylist() if f],
                 TAGS: tags_rows, QUARANTINE: run.quarantine_files()}
        sources = {TRACKS: inp.catalog, PLAYS: inp.plays, TAGS: inp.tags, QUARANTINE: STAGE}
        with run.timed("publish"):
            for dataset, parts in files.items():
                run.publish(dataset, parts, meta={"input_fingerprint": inp.fingerprint, "source": sources[dataset],
                                                  "rows": counts.get(dataset.key.split("/")[-1])})
        with run.timed("warehouse"):
            wh = ctx.warehouse
            wh.ensure_tables(["tracks", "plays", "tags", "quarantine"])
            run.committed("tracks", wh.upsert("tracks", tracks, run_id=run.run_id))
            for dataset in (PLAYS, TAGS):  # re-derived whole each run: replaced, one part at a time
                run.committed(dataset.table, wh.replace(
                    dataset.table, lambda d=dataset: (storage.read_parquet(f) for f in files[d]), run_id=run.run_id))
            run.committed("quarantine", wh.append("quarantine", storage.read_parquet(files[QUARANTINE]), run_id=run.run_id))
        log.info("ingest: published tracks=%d plays=%d tags=%d; audio objects %d = %d used + %d quarantined; "
                 "quarantined %s", counts["tracks"], counts["plays"], counts["tags"], counts["audio_objects"],
                 counts["audio_used"], counts["audio_quarantined"], dict(total_q) or "none")
        return run.succeed(counts=counts, quarantined=dict(sorted(total_q.items())), outputs=outputs,
                           fingerprint=inp.fingerprint, tables=[f"{cfg.warehouse.namespace}.{t}" for t in ("tracks", "plays", "tags", "quarantine")])
