"""A service's own catalog tables -> the canonical tables, with every bad row named (pure).

Each function takes an Arrow table as the service publishes it (its own column names, mapped
through ``columns``: canonical name -> source name) and returns the canonical rows plus the
rejected ``(source, reason, detail)`` rows, where ``source`` is ``<where>#row=<i>``. Nothing is
dropped silently: every input row is a canonical row, a rejected row, or (events outside the
time window, by design) counted in what :func:`play_events` returns.

* :func:`track_list` — ``track_id``, optional ``song_id`` (defaults to the track), ``artist``,
  ``title``, ``audio`` (a full URI, or a key under the audio prefix);
* :func:`play_counts` — ``user_id``, ``song_id`` or ``track_id``, ``play_count``;
* :func:`play_events` — ``user_id``, ``song_id`` or ``track_id``, ``timestamp`` (one row per
  listen; a timestamp, an ISO-8601 string, or epoch seconds / milliseconds);
* :func:`tag_rows` — ``track_id``, ``tag``, ``weight`` (0–100);
* :func:`folder_tracks` — object keys -> tracks with ids derived stably from the key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.datasets import REJECTED_SCHEMA
from deepcontent.interactions.sources import INT32_MAX, Reason, quarantine_rows

__all__ = ["folder_track_id", "folder_tracks", "play_counts", "play_events", "tag_rows", "track_list"]

EPOCH_MS_THRESHOLD = 10**11  # an epoch above this (year 5138 in seconds) is in milliseconds


def _pick(table: pa.Table, columns: dict[str, str], name: str, *, where: str, required: bool = True) -> pa.Array | None:
    src = columns.get(name, name)
    if src not in table.column_names:
        if required:
            raise KeyError(f"{where}: no column {src!r} for {name!r} (columns: {table.column_names}); set its mapping "
                           f"in sources.*.columns")
        return None
    col = table[src]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _as_text(col: pa.Array) -> pa.Array:
    """Any column -> strings, empty or blank strings as null."""
    text = col if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else pc.cast(col, pa.string())
    text = pc.utf8_trim_whitespace(text.cast(pa.string()))
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _rejected(where: str, rows: np.ndarray, reason: Reason | str, details: list[str]) -> pa.Table:
    return quarantine_rows([f"{where}#row={int(i)}" for i in rows], reason, details)


def _concat(parts: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(parts) if parts else REJECTED_SCHEMA.empty_table()


def track_list(table: pa.Table, *, columns: dict[str, str], where: str) -> tuple[pa.Table, pa.Table]:
    """A track-list table -> ``(track_id, song_id, artist, title, audio)`` and rejected rows.

    ``audio`` is the raw audio location as the table gives it (a URI or a key; the caller
    resolves keys against its prefix). A row without a track id is ``malformed_line``; a
    repeated track id is ``duplicate_track`` (the first row kept)."""
    track = _as_text(_pick(table, columns, "track_id", where=where))
    song = _pick(table, columns, "song_id", where=where, required=False)
    song = track if song is None else pc.coalesce(_as_text(song), track)
    artist, title, audio = (_pick(table, columns, c, where=where, required=False) for c in ("artist", "title", "audio"))
    n = table.num_rows
    none = pa.nulls(n, pa.string())
    out = pa.table({"track_id": track, "song_id": song, "artist": none if artist is None else _as_text(artist),
                    "title": none if title is None else _as_text(title), "audio": none if audio is None else _as_text(audio)})
    rejected = []
    missing = np.asarray(pc.is_null(track).to_numpy(zero_copy_only=False), dtype=bool)
    if missing.any():
        rejected.append(_rejected(where, np.flatnonzero(missing), Reason.MALFORMED_LINE,
                                  ["empty track id"] * int(missing.sum())))
    ids = np.asarray(track.to_pylist(), dtype=object)
    seen: set = set()
    dup = np.zeros(n, dtype=bool)
    for i, t in enumerate(ids):
        if t is None:
            continue
        if t in seen:
            dup[i] = True
        seen.add(t)
    if dup.any():
        rejected.append(_rejected(where, np.flatnonzero(dup), Reason.DUPLICATE_TRACK,
                                  [f"track {ids[i]!r} appears more than once; first occurrence kept" for i in np.flatnonzero(dup)]))
    return out.filter(pa.array(~(missing | dup))), _concat(rejected)


def _ids(table: pa.Table, columns: dict[str, str], where: str) -> tuple[str, pa.Array]:
    """The item column of a plays table: ``song_id`` if mapped or present, else ``track_id``."""
    for name in ("song_id", "track_id"):
        if name in columns or columns.get(name, name) in table.column_names:
            return name, _as_text(_pick(table, columns, name, where=where))
    raise KeyError(f"{where}: neither a song_id nor a track_id column (columns: {table.column_names}); set "
                   f"sources.play_table.columns")


def play_counts(table: pa.Table, *, columns: dict[str, str], where: str) -> tuple[str, pa.Table, pa.Table]:
    """A table of play counts -> ``(id_column, (user_id, <id_column>, play_count int64), rejected)``.

    Rejected: a missing user or item (``malformed_line``), a count that is not an integer
    (``bad_count``; beyond int32 too) or not positive (``nonpositive_count``)."""
    id_name, item = _ids(table, columns, where)
    user = _as_text(_pick(table, columns, "user_id", where=where))
    count = _pick(table, columns, "play_count", where=where)
    if pa.types.is_integer(count.type):
        as_int = count.cast(pa.int64())
        is_int = pc.is_valid(as_int)
    else:
        text = _as_text(count)
        is_int = pc.fill_null(pc.match_substring_regex(text, r"^[+-]?[0-9]{1,18}$"), False)
        as_int = pc.if_else(is_int, pc.cast(pc.if_else(is_int, text, "0"), pa.int64()), pa.scalar(None, pa.int64()))
    missing = np.asarray(pc.or_(pc.is_null(user), pc.is_null(item)).to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(pc.fill_null(as_int, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    ok_int = np.asarray(is_int.to_numpy(zero_copy_only=False), dtype=bool)
    bad_count = ~missing & (~ok_int | (values > INT32_MAX))
    nonpos = ~missing & ~bad_count & (values <= 0)
    raw = count.to_pylist()
    rejected = [
        _rejected(where, np.flatnonzero(missing), Reason.MALFORMED_LINE, ["empty user or item id"] * int(missing.sum())),
        _rejected(where, np.flatnonzero(bad_count), Reason.BAD_COUNT,
                  [f"play count {raw[i]!r} is not an int32 integer" for i in np.flatnonzero(bad_count)]),
        _rejected(where, np.flatnonzero(nonpos), Reason.NONPOSITIVE_COUNT,
                  [f"play count {values[i]} is not positive" for i in np.flatnonzero(nonpos)]),
    ]
    good = pa.array(~(missing | bad_count | nonpos))
    rows = pa.table({"user_id": pc.filter(user, good), id_name: pc.filter(item, good),
                     "play_count": pa.array(values[np.asarray(good)], pa.int64())})
    return id_name, rows, _concat(rejected)


def _timestamps(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Any timestamp column -> ``timestamp[us, UTC]`` (null where unparseable) and that mask."""
    target = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(col.type):
        out = col.cast(pa.timestamp("us", tz=col.type.tz)) if col.type.tz else col.cast(pa.timestamp("us"))
        out = pc.assume_timezone(out, "UTC") if not col.type.tz else out
        return out.cast(target), np.asarray(pc.is_null(out).to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        v = np.asarray(pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False))
        ms = np.nanmax(np.abs(v)) > EPOCH_MS_THRESHOLD if np.isfinite(v).any() else False
        us = np.where(np.isfinite(v), v * (1_000 if ms else 1_000_000), 0).astype(np.int64)
        bad = ~np.isfinite(v)
        return pa.array(us, target, mask=bad), bad
    values, bad = [], []
    for text in _as_text(col).to_pylist():
        try:
            t = dt.datetime.fromisoformat(text)
            t = t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
            values.append(t)
            bad.append(False)
        except (TypeError, ValueError):
            values.append(None)
            bad.append(True)
    return pa.array(values, target), np.asarray(bad, dtype=bool)


def _utc(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    t = dt.datetime.fromisoformat(value)
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def play_events(table: pa.Table, *, columns: dict[str, str], where: str, since: str | None = None,
                until: str | None = None) -> tuple[str, pa.Table, pa.Table, int]:
    """A table of listening events -> ``(id_column, (user_id, <id_column>, play_count=1 int64),
    rejected, events outside [since, until))``; aggregate the rows by (user, item) to counts.

    Rejected: a missing user or item (``malformed_line``), a timestamp that is not one
    (``bad_timestamp``)."""
    id_name, item = _ids(table, columns, where)
    user = _as_text(_pick(table, columns, "user_id", where=where))
    ts_col = _pick(table, columns, "timestamp", where=where)
    ts, bad_ts = _timestamps(ts_col)
    missing = np.asarray(pc.or_(pc.is_null(user), pc.is_null(item)).to_numpy(zero_copy_only=False), dtype=bool)
    bad_ts &= ~missing
    ok = ~(missing | bad_ts)
    inside = ok.copy()
    lo, hi = _utc(since), _utc(until)
    if lo is not None or hi is not None:
        filled = pc.fill_null(ts, pa.scalar(dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc), ts.type))
        if lo is not None:
            inside &= np.asarray(pc.greater_equal(filled, pa.scalar(lo, ts.type)).to_numpy(zero_copy_only=False), dtype=bool)
        if hi is not None:
            inside &= np.asarray(pc.less(filled, pa.scalar(hi, ts.type)).to_numpy(zero_copy_only=False), dtype=bool)
    raw = ts_col.to_pylist()
    rejected = [
        _rejected(where, np.flatnonzero(missing), Reason.MALFORMED_LINE, ["empty user or item id"] * int(missing.sum())),
        _rejected(where, np.flatnonzero(bad_ts), Reason.BAD_TIMESTAMP,
                  [f"timestamp {raw[i]!r} is not a time" for i in np.flatnonzero(bad_ts)]),
    ]
    keep = pa.array(inside)
    rows = pa.table({"user_id": pc.filter(user, keep), id_name: pc.filter(item, keep),
                     "play_count": pa.array(np.ones(int(inside.sum()), np.int64))})
    return id_name, rows, _concat(rejected), int((ok & ~inside).sum())


def tag_rows(table: pa.Table, *, columns: dict[str, str], where: str) -> tuple[pa.Table, pa.Table]:
    """A tag table -> ``(track_id, tag, weight int32)`` and rejected rows (``malformed_line``
    for a missing track or tag, ``bad_weight`` for a weight that is not an integer in 0..100)."""
    track = _as_text(_pick(table, columns, "track_id", where=where))
    tag = _as_text(_pick(table, columns, "tag", where=where))
    weight = _pick(table, columns, "weight", where=where)
    w = np.asarray(pc.fill_null(pc.cast(weight, pa.float64(), safe=False) if not pa.types.is_string(weight.type)
                                else pc.cast(pc.if_else(pc.match_substring_regex(_as_text(weight), r"^[+-]?[0-9]+(\.[0-9]*)?$"),
                                                        _as_text(weight), None), pa.float64()), np.nan)
                   .to_numpy(zero_copy_only=False), dtype=np.float64)
    missing = np.asarray(pc.or_(pc.is_null(track), pc.is_null(tag)).to_numpy(zero_copy_only=False), dtype=bool)
    with np.errstate(invalid="ignore"):
        bad = ~missing & ~(np.isfinite(w) & (w >= 0) & (w <= 100) & (w == np.round(w)))
    raw = weight.to_pylist()
    rejected = [
        _rejected(where, np.flatnonzero(missing), Reason.MALFORMED_LINE, ["empty track id or tag"] * int(missing.sum())),
        _rejected(where, np.flatnonzero(bad), Reason.BAD_WEIGHT,
                  [f"weight {raw[i]!r} is not an integer in 0..100" for i in np.flatnonzero(bad)]),
    ]
    good = ~(missing | bad)
    rows = pa.table({"track_id": pc.filter(track, pa.array(good)), "tag": pc.filter(tag, pa.array(good)),
                     "weight": pa.array(w[good].astype(np.int32), pa.int32())})
    return rows, _concat(rejected)


def folder_track_id(key: str) -> str:
    """A stable track id for an object key (relative to the audio prefix): ``TR`` + 16 hex
    digits of its SHA-1, so the same key always names the same track and renaming a file makes
    a new one."""
    return "TR" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:16].upper()


def folder_tracks(keys: list[str], uris: list[str]) -> pa.Table:
    """Tracks of a folder catalog: ``track_id`` from the key (:func:`folder_track_id`),
    ``song_id`` = ``track_id``, ``title`` = the file name without extension, ``artist`` = the
    top-level folder (``<artist>/<album>/<file>``) when there is one, ``audio_uri`` = the object."""
    ids = [folder_track_id(k) for k in keys]
    titles = [posixpath.splitext(posixpath.basename(k))[0] for k in keys]
    artists = [k.split("/", 1)[0] if "/" in k else None for k in keys]
    return pa.table({"track_id": pa.array(ids, pa.string()), "song_id": pa.array(ids, pa.string()),
                     "artist": pa.array(artists, pa.string()), "title": pa.array(titles, pa.string()),
                     "audio_uri": pa.array(uris, pa.string())})
