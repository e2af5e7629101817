"""Parsers for the raw input formats, as published. Pure functions: bytes in, Arrow out.

Each parser returns the good records as an Arrow table in the canonical column names and the
bad ones as a quarantine table (``source``, ``reason``, ``detail``) where ``source`` locates the
record: ``<uri>@<byte offset of the line>`` for line-oriented files, the file URI for per-file
formats. Nothing is dropped silently: every input line is either a good row or a quarantine row
(blank lines included; only the empty remainder after a final newline is not a line).

Formats:

* Taste Profile ``train_triplets.txt``: ``user \\t song \\t count``.
* MSD ``unique_tracks.txt``: ``track<SEP>song<SEP>artist<SEP>title``.
* Taste Profile ``sid_mismatches.txt``: ``ERROR: <SONG TRACK> artist  -  title != ...``.
* Last.fm per-track JSON (``{"track_id", "tags": [[tag, "weight"], ...], ...}``) and the SQLite
  ``lastfm_tags.db`` (``tids``, ``tags``, ``tid_tag(tid, tag, val)``).
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from enum import Enum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from deepcontent.datasets import REJECTED_SCHEMA

INT32_MAX = 2**31 - 1


class Reason(str, Enum):
    """Why a record was quarantined (the ``reason`` column)."""

    MALFORMED_LINE = "malformed_line"  # wrong field count, blank line, empty field, bad UTF-8
    BAD_COUNT = "bad_count"  # play count not an integer, or beyond int32
    NONPOSITIVE_COUNT = "nonpositive_count"  # play count <= 0
    UNKNOWN_SONG = "unknown_song"  # song id not in the (mismatch-cleaned) track list
    UNKNOWN_TRACK = "unknown_track"  # tagged track id not in the track list
    MISMATCH = "mismatch"  # song-track pair listed in sid_mismatches.txt
    DUPLICATE_TRACK = "duplicate_track"  # track id listed twice in unique_tracks.txt
    BAD_WEIGHT = "bad_weight"  # tag weight not a number in [0, 100]
    MALFORMED_JSON = "malformed_json"  # a Last.fm file that is not the expected JSON
    DANGLING_ID = "dangling_id"  # a lastfm_tags.db tid_tag row whose track or tag id has no row
    BAD_TIMESTAMP = "bad_timestamp"  # a listening event whose time is not a time
    UNSUPPORTED_FORMAT = "unsupported_format"  # an object under the audio prefix that is not audio
    DUPLICATE_AUDIO = "duplicate_audio"  # a second audio object for a track that has one
    LINE_TOO_LONG = "line_too_long"  # a line longer than ingest.max_line_bytes (not read whole)



def quarantine_rows(sources: list[str], reason: Reason | str, details: list[str]) -> pa.Table:
    r = reason.value if isinstance(reason, Reason) else reason
    return pa.table(
        {"source": pa.array(sources, pa.string()), "reason": pa.array([r] * len(sources), pa.string()),
         "detail": pa.array(details, pa.string())},
        schema=REJECTED_SCHEMA,
    )


def too_long_rows(uri: str, offsets: list[int], max_line_bytes: int) -> pa.Table:
    """Quarantine rows for lines longer than ``max_line_bytes`` starting at ``offsets`` of ``uri``."""
    return quarantine_rows([f"{uri}@{o}" for o in offsets], Reason.LINE_TOO_LONG,
                           [f"line longer than ingest.max_line_bytes={max_line_bytes:,} bytes; not read"] * len(offsets))


def empty_quarantine() -> pa.Table:
    return REJECTED_SCHEMA.empty_table()


def _line_starts(data: bytes) -> np.ndarray:
    """Byte offset of every physical line's first byte, shape ``(n_lines,)`` int64."""
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    if len(starts) and starts[-1] == len(data):  # the empty remainder after a final newline
        starts = starts[:-1]
    return starts


def _read_delimited(data: bytes, names: list[str], delimiter: str) -> tuple[pa.Table, np.ndarray, list[tuple[int, str]]]:
    """Split lines into ``names`` binary columns.

    Returns the table, each row's physical line index (0-based, int64) and the
    ``(line index, text)`` of lines with the wrong number of fields."""
    bad: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        bad.append((row.number - 1, row.text))
        return "skip"

    if not data:
        return pa.table({n: pa.array([], pa.binary()) for n in names}), np.empty(0, np.int64), bad
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=1 << 26),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False, escape_char=False,
                                         ignore_empty_lines=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}),
    )
    n_total = table.num_rows + len(bad)
    if bad:
        bad_idx = np.array([b[0] for b in bad], dtype=np.int64)
        row_line = np.setdiff1d(np.arange(n_total, dtype=np.int64), bad_idx, assume_unique=True)
    else:
        row_line = np.arange(n_total, dtype=np.int64)
    return table, row_line, bad


def _utf8(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary column -> (string column with invalid entries nulled, mask of invalid entries)."""
    try:
        return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        vals = col.to_pylist()
        ok = []
        for v in vals:
            try:
                ok.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                ok.append(None)
        arr = pa.array(ok, pa.string())
        return arr, np.asarray(arr.is_null())


class _Locator:
    """Turns physical line indices of a chunk into ``uri@byte`` record locators."""

    def __init__(self, data: bytes, uri: str, base_offset: int) -> None:
        self.data, self.uri, self.base = data, uri, base_offset
        self._starts: np.ndarray | None = None

    def __call__(self, lines: np.ndarray) -> list[str]:
        if self._starts is None:  # only chunks with bad lines pay for the newline scan
            self._starts = _line_starts(self.data)
        return [f"{self.uri}@{self.base + int(self._starts[i])}" for i in lines]


def _preview(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_counts(count_txt: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(looks like an integer, its value as int64 — INT32_MAX + 1 when too long to hold)."""
    n = len(count_txt)
    if count_txt.null_count == 0:
        try:  # fast path: a clean chunk casts in one go
            return np.ones(n, dtype=bool), np.asarray(count_txt.cast(pa.int64()))
        except (pa.ArrowInvalid, OverflowError):
            pass
    is_int = np.asarray(pc.fill_null(pc.match_substring_regex(count_txt, r"^[+-]?[0-9]+$"), False))
    as_int = np.zeros(n, dtype=np.int64)
    digits = pc.filter(pc.replace_substring_regex(count_txt, r"^\+", ""), pa.array(is_int))
    if len(digits):
        fits = np.asarray(pc.binary_length(digits)) <= 18
        vals = np.full(len(digits), INT32_MAX + 1, dtype=np.int64)
        vals[fits] = np.asarray(pc.filter(digits, pa.array(fits)).cast(pa.int64()))
        as_int[is_int] = vals
    return is_int, as_int


def parse_triplets(
    data: bytes, *, uri: str, base_offset: int = 0, known_songs: pa.Array | None = None
) -> tuple[pa.Table, pa.Table]:
    """Parse Taste Profile triplet lines.

    Parameters
    ----------
    data : whole lines (a chunk of the file), ``user \\t song \\t count`` each.
    uri, base_offset : where ``data`` starts, for quarantine locators.
    known_songs : song ids that exist; other songs are quarantined as ``unknown_song``
        (None = accept every song).

    Returns
    -------
    plays : ``user_id`` string, ``song_id`` string, ``play_count`` int32 (> 0).
    quarantine : ``source``, ``reason``, ``detail``.
    """
    table, row_line, bad = _read_delimited(data, ["user_id", "song_id", "play_count"], "\t")
    loc = _Locator(data, uri, base_offset)
    quarantine = []
    if bad:
        quarantine.append(quarantine_rows(loc(np.array([b[0] for b in bad])), Reason.MALFORMED_LINE,
                                          [f"expected 3 tab-separated fields: {_preview(t)!r}" for _, t in bad]))
    user, bad_u = _utf8(table["user_id"].combine_chunks())
    song, bad_s = _utf8(table["song_id"].combine_chunks())
    count_raw, bad_c = _utf8(table["play_count"].combine_chunks())
    count_txt = pc.utf8_trim(count_raw, characters=" \r")
    empty = np.asarray(pc.fill_null(pc.or_(pc.or_(pc.equal(pc.binary_length(user), 0), pc.equal(pc.binary_length(song), 0)),
                                           pc.equal(pc.binary_length(count_txt), 0)), True))
    malformed = bad_u | bad_s | bad_c | empty
    is_int, as_int = _parse_counts(count_txt)
    bad_count = ~malformed & (~is_int | (as_int > INT32_MAX))
    nonpos = ~malformed & is_int & (as_int <= 0)
    good = ~(malformed | bad_count | nonpos)
    unknown = np.zeros(len(good), dtype=bool)
    if known_songs is not None and good.any():
        unknown = good & ~np.asarray(pc.fill_null(pc.is_in(song, value_set=known_songs), False))
        good &= ~unknown

    def add(mask: np.ndarray, reason: Reason, detail) -> None:
        idx = np.flatnonzero(mask)
        if len(idx):
            quarantine.append(quarantine_rows(loc(row_line[idx]), reason, [detail(i) for i in idx]))

    def raw_text(i: int) -> str:
        fields = [(table[c][i].as_py() or b"").decode("utf-8", "replace") for c in ("user_id", "song_id", "play_count")]
        return "blank line" if not any(f.strip() for f in fields) else repr(_preview("\t".join(fields)))

    add(malformed, Reason.MALFORMED_LINE, lambda i: f"empty field or invalid UTF-8: {raw_text(i)}")
    add(bad_count, Reason.BAD_COUNT, lambda i: f"play count {count_raw[i].as_py()!r} is not an int32 integer")
    add(nonpos, Reason.NONPOSITIVE_COUNT, lambda i: f"play count {as_int[i]} is not positive")
    add(unknown, Reason.UNKNOWN_SONG, lambda i: f"song {song[i].as_py()!r} is not in the track list")
    mask = pa.array(good)
    plays = pa.table({
        "user_id": pc.filter(user, mask),
        "song_id": pc.filter(song, mask),
        "play_count": pa.array(as_int[good].astype(np.int32), pa.int32()),
    })
    return plays, (pa.concat_tables(quarantine) if quarantine else empty_quarantine())


def parse_unique_tracks(data: bytes, *, uri: str, base_offset: int = 0) -> tuple[pa.Table, pa.Table]:
    """Parse MSD ``unique_tracks.txt`` lines -> (``track_id, song_id, artist, title``, quarantine).

    Artist and title may themselves contain anything but ``<SEP>``; a line without exactly
    four fields is ``malformed_line``."""
    rows: dict[str, list] = {"track_id": [], "song_id": [], "artist": [], "title": []}
    q_src, q_detail = [], []
    starts = _line_starts(data)
    lines = data.split(b"\n")
    for i, start in enumerate(starts):
        raw = lines[i].rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        parts = text.split("<SEP>") if text is not None else []
        if len(parts) != 4 or not parts[0] or not parts[1]:
            q_src.append(f"{uri}@{base_offset + int(start)}")
            q_detail.append(f"expected track<SEP>song<SEP>artist<SEP>title: {_preview(raw.decode('utf-8', 'replace'))!r}")
            continue
        for key, value in zip(rows, parts):
            rows[key].append(value)
    tracks = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
    return tracks, (quarantine_rows(q_src, Reason.MALFORMED_LINE, q_detail) if q_src else empty_quarantine())


_MISMATCH = re.compile(r"^ERROR: <(\S+) (\S+)>")


def parse_mismatches(data: bytes) -> pa.Table:
    """``sid_mismatches.txt`` -> ``song_id, track_id`` pairs to drop. Lines that do not start
    ``ERROR: <SONG TRACK>`` carry no pair and are ignored (the file has no other records)."""
    songs, tracks = [], []
    for line in data.decode("utf-8", "replace").splitlines():
        m = _MISMATCH.match(line)
        if m:
            songs.append(m.group(1))
            tracks.append(m.group(2))
    return pa.table({"song_id": pa.array(songs, pa.string()), "track_id": pa.array(tracks, pa.string())})


def _weight(value) -> int | None:
    try:
        w = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(w) or w < 0 or w > 100 or w != int(w):
        return None
    return int(w)


def parse_lastfm_json(data: bytes, *, uri: str) -> tuple[pa.Table, pa.Table]:
    """One Last.fm track file -> (``track_id, tag, weight`` int32 0–100, quarantine)."""
    try:
        doc = json.loads(data)
        track_id = doc["track_id"]
        pairs = doc["tags"]
        if not isinstance(track_id, str) or not isinstance(pairs, list):
            raise TypeError("track_id must be a string and tags a list")
    except (ValueError, KeyError, TypeError) as exc:
        return _tags_table([], [], []), quarantine_rows([uri], Reason.MALFORMED_JSON, [f"{type(exc).__name__}: {exc}"])
    ids, tags, weights, q_src, q_detail = [], [], [], [], []
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
            q_src.append(f"{uri}#tags[{k}]")
            q_detail.append(f"expected [tag, weight], got {_preview(json.dumps(pair))}")
            continue
        w = _weight(pair[1])
        if w is None:
            q_src.append(f"{uri}#tags[{k}]")
            q_detail.append(f"tag {pair[0]!r} has weight {pair[1]!r}, expected an integer in 0..100")
            continue
        ids.append(track_id)
        tags.append(pair[0])
        weights.append(w)
    reason = Reason.BAD_WEIGHT
    return _tags_table(ids, tags, weights), (quarantine_rows(q_src, reason, q_detail) if q_src else empty_quarantine())


def read_lastfm_db(path: str, *, uri: str) -> tuple[pa.Table, pa.Table]:
    """The SQLite ``lastfm_tags.db`` at a local ``path`` -> (tags, quarantine)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        # LEFT JOINs: a tid_tag row whose track or tag id has no row is a dangling record,
        # quarantined, not dropped by the join.
        rows = con.execute(
            "SELECT tids.tid, tags.tag, tid_tag.val, tid_tag.ROWID, tid_tag.tid, tid_tag.tag FROM tid_tag "
            "LEFT JOIN tids ON tids.ROWID = tid_tag.tid LEFT JOIN tags ON tags.ROWID = tid_tag.tag"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        return _tags_table([], [], []), quarantine_rows([uri], Reason.MALFORMED_JSON, [f"not a Last.fm tags database: {exc}"])
    finally:
        con.close()
    ids, tags, weights, q_src, q_detail, d_src, d_detail = [], [], [], [], [], [], []
    for tid, tag, val, rowid, tid_ref, tag_ref in rows:
        if tid is None or tag is None:
            d_src.append(f"{uri}#tid_tag[{rowid}]")
            d_detail.append(f"tid_tag row names track rowid {tid_ref!r} and tag rowid {tag_ref!r}; "
                            f"{'the track' if tid is None else 'the tag'} has no row")
            continue
        w = _weight(val)
        if w is None or not tag:
            q_src.append(f"{uri}#tid_tag[{rowid}]")
            q_detail.append(f"tag {tag!r} of {tid} has weight {val!r}, expected an integer in 0..100")
            continue
        ids.append(tid)
        tags.append(tag)
        weights.append(w)
    rejected = [quarantine_rows(q_src, Reason.BAD_WEIGHT, q_detail), quarantine_rows(d_src, Reason.DANGLING_ID, d_detail)]
    return _tags_table(ids, tags, weights), pa.concat_tables(rejected)


def _tags_table(ids: list, tags: list, weights: list) -> pa.Table:
    return pa.table({"track_id": pa.array(ids, pa.string()), "tag": pa.array(tags, pa.string()),
                     "weight": pa.array(weights, pa.int32())})
