"""``deepcontent generate``: write a synthetic catalog in the real published formats.

What is written below ``<storage.root>/<storage.raw_prefix>`` (keys from ``sources`` config):

* ``taste_profile/train_triplets.txt`` — ``user \\t song \\t count`` lines, grouped by user;
* ``taste_profile/sid_mismatches.txt`` — ``ERROR: <SO… TR…> artist  -  title != …`` lines;
* ``msd/unique_tracks.txt`` — ``track<SEP>song<SEP>artist<SEP>title``;
* ``lastfm/lastfm_train/A/B/C/TRABC….json`` — one Last.fm JSON per tagged track (and/or the
  SQLite ``lastfm/lastfm_tags.db`` with its ``tids``, ``tags``, ``tid_tag`` tables);
* ``audio/A/B/C/TRABC….mp3`` — 30 s, 44.1 kHz stereo clips (OGG/FLAC/WAV by config);
* ``gtzan/genres/<genre>/<genre>.000NN.wav`` — a disjoint labelled set, GTZAN layout
  (30 s, 22,050 Hz mono), and ``gtzan/genres/groups.csv`` naming each clip's artist
  (``synth.gtzan_clips_per_artist`` clips each) for the grouped transfer protocol;
* ``magnatagatune/annotations_final.csv`` + ``magnatagatune/<0-9a-f>/…mp3`` — a disjoint tagged
  set in the MagnaTagATune layout (29.1 s, 16 kHz mono, parts 0–f).

The model behind the data is in :mod:`deepcontent.synth.world`. Audio is rendered in a process
pool (``synth.workers``, default all cores), each worker uploading its own clips.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sqlite3
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from deepcontent.config import Config
from deepcontent.manifest import Progress, RunManifest, log
from deepcontent.storage import Storage, join, new_run_id
from deepcontent.synth.attributes import GENRES, SongAttributes, sample_attributes
from deepcontent.synth.world import (
    Songs,
    make_songs,
    make_users,
    n_communities,
    iter_plays,
    tags_for_song,
)

MTAT_PARTS = "0123456789abcdef"


def msd_subdir(track_id: str) -> str:
    """MSD-style three-level folder of a track: ``TRABC…`` -> ``A/B/C``."""
    return f"{track_id[2]}/{track_id[3]}/{track_id[4]}"


@dataclass(frozen=True)
class ClipJob:
    uri: str
    attrs: SongAttributes
    seed: int
    seconds: float
    sample_rate: int
    channels: int
    fmt: str


def _render_and_upload(storage: Storage, jobs: list[ClipJob]) -> int:
    """Worker: render, encode and upload a batch of clips; returns bytes written."""
    # One BLAS/OpenMP thread per worker process: the pool already uses every core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from deepcontent.synth.audio import encode_audio, render_clip

    written = 0
    for job in jobs:
        audio = render_clip(job.attrs, seconds=job.seconds, sample_rate=job.sample_rate, seed=job.seed)
        if job.channels == 1:
            audio = audio.mean(axis=1, keepdims=True)
        data = encode_audio(audio, sample_rate=job.sample_rate, fmt=job.fmt)
        storage.write_bytes(job.uri, data)
        written += len(data)
    return written


def _run_clip_jobs(storage: Storage, jobs: list[ClipJob], *, workers: int, what: str) -> int:
    if not jobs:
        return 0
    progress = Progress("generate", what, len(jobs))
    batch = 4
    batches = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    total = 0
    if workers <= 1:
        for b in batches:
            total += _render_and_upload(storage, b)
            progress.update(len(b))
        return total
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        futures = [(pool.submit(_render_and_upload, storage, b), len(b)) for b in batches]
        for fut, n in futures:
            total += fut.result()
            progress.update(n)
    return total


# ----------------------------------------------------------------------------- text formats
def write_unique_tracks(storage: Storage, uri: str, songs: Songs) -> None:
    lines = (f"{t}<SEP>{s}<SEP>{a}<SEP>{ti}" for t, s, a, ti in zip(songs.track_id, songs.song_id, songs.artist_name, songs.title))
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())


def write_mismatches(storage: Storage, uri: str, songs: Songs, rows: np.ndarray, rng: np.random.Generator) -> None:
    """The Taste Profile's ``sid_mismatches.txt``: song–track pairs whose match is wrong."""
    out = []
    for i in rows:
        j = int(rng.integers(songs.n))
        out.append(
            f"ERROR: <{songs.song_id[i]} {songs.track_id[i]}> {songs.artist_name[i]}  -  {songs.title[i]}  !=  "
            f"{songs.artist_name[j]}  -  {songs.title[j]}"
        )
    storage.write_bytes(uri, ("\n".join(out) + "\n").encode() if out else b"")


def write_triplets(storage: Storage, uri: str, songs: Songs, users, *, seed: int) -> int:
    """Stream ``user \\t song \\t count`` lines block by block; returns the line count."""
    user_dict = pa.array(users.user_id, type=pa.string())
    song_dict = pa.array(songs.song_id, type=pa.string())
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    n = 0
    progress = Progress("generate", "triplet users", users.n)
    with storage.open_output(uri) as sink:
        for ui, si, counts in iter_plays(songs, users, seed=seed):
            table = pa.table({"u": pc.take(user_dict, pa.array(ui)), "s": pc.take(song_dict, pa.array(si)), "c": pa.array(counts)})
            pacsv.write_csv(table, sink, write_options=options)
            n += len(ui)
            progress.update(int(ui[-1]) + 1 - progress.done if len(ui) else 0)
    return n


#: Tags Last.fm lists with weight 0 on many tracks (they barely apply; the real dataset has them).
ZERO_WEIGHT_TAGS = ("seen live", "favorites", "albums i own")


def _lastfm_tags(songs: Songs, seed: int, fraction: float = 0.85,
                 zero_weight_fraction: float = 0.0) -> dict[int, list[tuple[str, int]]]:
    """Tags for the subset of songs Last.fm knows (``fraction`` of the catalog); with
    ``zero_weight_fraction`` that share of them also carries one tag of weight 0, as the real
    dataset does (drawn from a stream of its own, so the other tags do not change)."""
    rng = np.random.default_rng([seed, 7])
    zero = np.random.default_rng([seed, 9])
    out = {}
    for i in range(songs.n):
        if rng.random() < fraction:
            tags = tags_for_song(songs.attributes[i], int(songs.community[i]), rng)
            if tags:
                if zero.random() < zero_weight_fraction:
                    extra = ZERO_WEIGHT_TAGS[int(zero.integers(len(ZERO_WEIGHT_TAGS)))]
                    if extra not in {t for t, _ in tags}:
                        tags = [*tags, (extra, 0)]
                out[i] = tags
    return out


def _similars(songs: Songs, i: int, rng: np.random.Generator, k: int = 5) -> list[list]:
    same = np.flatnonzero((songs.genre_idx == songs.genre_idx[i]) & (songs.community == songs.community[i]))
    same = same[same != i]
    pick = rng.choice(same, size=min(k, len(same)), replace=False) if len(same) else []
    return [[songs.track_id[j], round(float(rng.uniform(0.2, 1.0)), 6)] for j in pick]


def write_lastfm_json(storage: Storage, base_uri: str, songs: Songs, tags: dict[int, list], *, seed: int, workers: int) -> int:
    rng = np.random.default_rng([seed, 8])
    items = []
    for i, tlist in tags.items():
        tid = songs.track_id[i]
        doc = {
            "artist": songs.artist_name[i],
            "timestamp": "2011-08-15 18:%02d:%02d.%06d" % (i // 60 % 60, i % 60, i % 1_000_000),
            "similars": _similars(songs, i, rng),
            "tags": [[t, str(w)] for t, w in tlist],
            "track_id": tid,
            "title": songs.title[i],
        }
        items.append((join(base_uri, msd_subdir(tid), f"{tid}.json"), json.dumps(doc).encode()))
    _upload_many(storage, items, workers=workers)
    return len(items)


def _upload_batch(storage: Storage, items: list[tuple[str, bytes]]) -> None:
    for uri, data in items:
        storage.write_bytes(uri, data)


def _upload_many(storage: Storage, items: list[tuple[str, bytes]], *, workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    chunks = [items[i : i + 64] for i in range(0, len(items), 64)]
    with ThreadPoolExecutor(max_workers=max(2, workers * 4)) as pool:
        list(pool.map(lambda c: _upload_batch(storage, c), chunks))


def write_lastfm_db(storage: Storage, uri: str, songs: Songs, tags: dict[int, list], *, dangling: int = 0) -> None:
    """The Last.fm dataset's SQLite layout: ``tids(tid)``, ``tags(tag)``, ``tid_tag(tid, tag, val)``
    where ``tid_tag.tid``/``tag`` are ROWIDs of the first two tables; ``dangling`` extra
    ``tid_tag`` rows name ROWIDs that have no row (as a damaged copy of the dataset would)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lastfm_tags.db")
        con = sqlite3.connect(path)
        con.executescript("CREATE TABLE tids (tid TEXT); CREATE TABLE tags (tag TEXT); CREATE TABLE tid_tag (tid INT, tag INT, val FLOAT);")
        tag_rowid: dict[str, int] = {}
        for i, tlist in tags.items():
            cur = con.execute("INSERT INTO tids VALUES (?)", (songs.track_id[i],))
            tid_row = cur.lastrowid
            for tag, w in tlist:
                if tag not in tag_rowid:
                    tag_rowid[tag] = con.execute("INSERT INTO tags VALUES (?)", (tag,)).lastrowid
                con.execute("INSERT INTO tid_tag VALUES (?, ?, ?)", (tid_row, tag_rowid[tag], float(w)))
        for k in range(dangling):  # alternately a missing track and a missing tag
            n_tids, n_tags = len(tags), len(tag_rowid)
            row = (n_tids + 1000 + k, 1, 50.0) if k % 2 == 0 else (1, n_tags + 1000 + k, 50.0)
            con.execute("INSERT INTO tid_tag VALUES (?, ?, ?)", row)
        con.execute("CREATE INDEX idx_tid_tag_tid ON tid_tag(tid)")
        con.commit()
        con.close()
        with open(path, "rb") as f:
            storage.write_bytes(uri, f.read())


# ----------------------------------------------------------------------------- target sets
def gtzan_artist(genre: str, k: int, clips_per_artist: int) -> str:
    """The synthetic artist of GTZAN-layout clip ``k`` of ``genre`` (its group in ``groups.csv``)."""
    return f"{genre}_artist{k // clips_per_artist:03d}"


def _artist_clip(base: SongAttributes, rng: np.random.Generator) -> SongAttributes:
    """One song of an artist: the artist's key, mode, lead timbre and swing, its tempo and sound
    varied a little (what makes an artist recognisable without saying its genre)."""
    def near(x: float, spread: float = 0.04) -> float:
        return float(np.clip(x + rng.normal(0.0, spread), 0.0, 1.0))

    return dataclasses.replace(
        base, tempo_bpm=float(np.clip(base.tempo_bpm * (1.0 + rng.normal(0.0, 0.03)), 60.0, 190.0)),
        brightness=near(base.brightness), rhythm_density=near(base.rhythm_density),
        percussion=near(base.percussion) if base.percussion > 0 else 0.0, distortion=near(base.distortion))


def gtzan_jobs(cfg: Config, storage: Storage) -> list[ClipJob]:
    """GTZAN layout: ``genres/<genre>/<genre>.000NN.wav``, 30 s 22,050 Hz mono, disjoint songs.

    With ``synth.gtzan_clips_per_artist`` > 1, consecutive clips of a genre share an artist (its
    key, mode, timbre, swing; tempo and sound varied a little); with 1 every clip is drawn on its
    own, as in GTZAN-style sets without an artist filter."""
    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    per_artist = cfg.synth.gtzan_clips_per_artist
    jobs = []
    for g, genre in enumerate(GENRES):
        for k in range(cfg.synth.gtzan_per_genre):
            rng = np.random.default_rng([cfg.synth.seed, 0x67, g, k])
            if per_artist > 1:
                artist = sample_attributes(genre, np.random.default_rng([cfg.synth.seed, 0x68, g, k // per_artist]))
                attrs = _artist_clip(artist, rng)
            else:
                attrs = sample_attributes(genre, rng)
            jobs.append(ClipJob(join(base, genre, f"{genre}.{k:05d}.wav"), attrs, int(rng.integers(2**31)), 30.0,
                                22050, 1, "wav"))
    return jobs


def gtzan_groups(cfg: Config) -> bytes:
    """``groups.csv`` of the GTZAN-layout set: ``path,artist`` per clip (the grouping the transfer
    evaluation holds out whole)."""
    per_artist = cfg.synth.gtzan_clips_per_artist
    rows = [f"{genre}/{genre}.{k:05d}.wav,{gtzan_artist(genre, k, per_artist)}\n"
            for genre in GENRES for k in range(cfg.synth.gtzan_per_genre)]
    return ("path,artist\n" + "".join(rows)).encode()


def mtat_clips(cfg: Config, storage: Storage) -> tuple[list[ClipJob], bytes]:
    """MagnaTagATune layout: ``annotations_final.csv`` (tab-separated, quoted; ``clip_id``, one 0/1
    column per tag, ``mp3_path``) and ``<part>/<artist>-<album>-<nn>-<title>-<a>-<b>.mp3`` clips,
    parts ``0``–``f`` (the papers train on 0–b, validate on c, test on d–f)."""
    n = cfg.synth.mtat_clips
    rng = np.random.default_rng([cfg.synth.seed, 0x77])
    base = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.mtat)
    rows, jobs, vocab = [], [], set()
    for k in range(n):
        genre = GENRES[int(rng.integers(len(GENRES)))]
        attrs = sample_attributes(genre, np.random.default_rng([cfg.synth.seed, 0x78, k]))
        tags = {t for t, w in tags_for_song(attrs, int(rng.integers(8)), rng) if w >= 30}
        vocab |= tags
        part = MTAT_PARTS[k * len(MTAT_PARTS) // max(n, 1)]
        name = f"{part}/artist_{k % 37:02d}-album_{k % 11:02d}-{k % 20 + 1:02d}-track_{k:05d}-{(k % 10) * 30}-{(k % 10) * 30 + 29}.mp3"
        rows.append((k, tags, name))
        jobs.append(ClipJob(join(base, name), attrs, int(rng.integers(2**31)), 29.1, 16000, 1, "mp3"))
    vocab_sorted = sorted(vocab)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["clip_id", *vocab_sorted, "mp3_path"])
    for k, tags, name in rows:
        writer.writerow([k, *(1 if t in tags else 0 for t in vocab_sorted), name])
    return jobs, buf.getvalue().encode()


# ----------------------------------------------------------------------------- orchestration
def generate(cfg: Config, storage: Storage) -> dict:
    """Write the whole synthetic catalog; returns a summary (also written as a run manifest)."""
    s = cfg.synth
    run_id = new_run_id("generate")
    manifest = RunManifest("generate", run_id, cfg.public_dict(), cfg.fingerprint("synth", "sources"))
    raw = lambda key: storage.raw_uri(cfg.storage.raw_prefix, key)  # noqa: E731
    workers = s.workers or os.cpu_count() or 1
    storage.ensure_root()
    t0 = time.perf_counter()
    log.info("generate: %d songs, %d users, audio=%s (%s), seed %d -> %s", s.songs, s.users, s.audio,
             s.audio_format, s.seed, raw(""))
    need_attrs = s.audio or s.lastfm_format != "none"
    with manifest.timed("world"):
        songs = make_songs(s.songs, seed=s.seed, with_attributes=need_attrs, songs_per_artist=s.songs_per_artist)
        users = make_users(s.users, n_comm=n_communities(s.songs), mean_songs=s.mean_plays_per_user, seed=s.seed)
    with manifest.timed("tracks"):
        write_unique_tracks(storage, raw(cfg.sources.tracks), songs)
        rng = np.random.default_rng([s.seed, 9])
        n_mis = int(round(s.mismatch_fraction * songs.n))
        mismatched = np.sort(rng.choice(songs.n, size=n_mis, replace=False)) if n_mis else np.empty(0, int)
        write_mismatches(storage, raw(cfg.sources.mismatches), songs, mismatched, rng)
    with manifest.timed("triplets"):
        n_triplets = write_triplets(storage, raw(cfg.sources.triplets), songs, users, seed=s.seed)
    log.info("generate: wrote %d triplets, %d tracks, %d mismatches", n_triplets, songs.n, n_mis)
    n_tagged = 0
    if s.lastfm_format != "none":
        with manifest.timed("lastfm"):
            tags = _lastfm_tags(songs, s.seed, zero_weight_fraction=s.zero_weight_tag_fraction)
            n_tagged = len(tags)
            if s.lastfm_format in ("json", "both"):
                write_lastfm_json(storage, raw(cfg.sources.lastfm_json), songs, tags, seed=s.seed, workers=workers)
            if s.lastfm_format in ("db", "both"):
                write_lastfm_db(storage, raw(cfg.sources.lastfm_db), songs, tags, dangling=s.dangling_tag_rows)
        log.info("generate: wrote Last.fm tags for %d tracks (%s)", n_tagged, s.lastfm_format)
    audio_bytes = 0
    if s.audio:
        from deepcontent.synth.audio import FORMAT_EXTENSIONS

        ext = FORMAT_EXTENSIONS[s.audio_format]
        jobs = [
            ClipJob(join(raw(cfg.sources.audio), msd_subdir(tid), f"{tid}{ext}"), songs.attributes[i],
                    int(np.random.default_rng([s.seed, 0xA0, i]).integers(2**31)), s.clip_seconds,
                    s.sample_rate, 2, s.audio_format)
            for i, tid in enumerate(songs.track_id)
        ]
        with manifest.timed("audio"):
            audio_bytes = _run_clip_jobs(storage, jobs, workers=workers, what="catalog clips")
        with manifest.timed("targets"):
            g_jobs = gtzan_jobs(cfg, storage)
            if g_jobs:
                storage.write_bytes(join(raw(cfg.sources.gtzan), "groups.csv"), gtzan_groups(cfg))
            m_jobs, annotations = mtat_clips(cfg, storage)
            storage.write_bytes(join(raw(cfg.sources.mtat), "annotations_final.csv"), annotations)
            _run_clip_jobs(storage, g_jobs + m_jobs, workers=workers, what="GTZAN/MTAT clips")
    summary = {
        "run_id": run_id,
        "raw_uri": raw(""),
        "songs": songs.n,
        "users": users.n,
        "triplets": n_triplets,
        "mismatches": n_mis,
        "tagged_tracks": n_tagged,
        "audio_clips": songs.n if s.audio else 0,
        "audio_bytes": audio_bytes,
        "gtzan_clips": len(GENRES) * s.gtzan_per_genre if s.audio else 0,
        "mtat_clips": s.mtat_clips if s.audio else 0,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    manifest.counts = {k: v for k, v in summary.items() if isinstance(v, int)}
    manifest.outputs = {"raw": raw("")}
    summary["manifest"] = manifest.write(storage, status="succeeded")
    log.info("generate: done in %.1fs; manifest %s", summary["seconds"], summary["manifest"])
    return summary
