"""The generated catalog: real formats, determinism, and a learning problem that is real."""

import csv
import io
import json

import numpy as np
import pytest
import soundfile as sf

from support import config_for
from deepcontent.interactions.sources import parse_mismatches, parse_triplets, parse_unique_tracks
from deepcontent.synth.attributes import GENRES
from deepcontent.synth.generate import generate, msd_subdir
from deepcontent.synth.world import iter_plays, make_songs, make_users, n_communities


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    from deepcontent.storage import Storage

    tmp = tmp_path_factory.mktemp("catalog")
    storage = Storage(f"file://{tmp}/store")
    storage.ensure_root()
    cfg = config_for(storage, tmp, **{
        "synth.songs": 40, "synth.users": 300, "synth.clip_seconds": 4.0, "synth.gtzan_per_genre": 2,
        "synth.mtat_clips": 16, "synth.lastfm_format": "both", "synth.mismatch_fraction": 0.05,
    })
    summary = generate(cfg, storage)
    return cfg, storage, summary


def raw(cfg, storage, key):
    return storage.raw_uri(cfg.storage.raw_prefix, key)


def test_track_list_and_triplets_are_in_the_published_formats(small_catalog):
    cfg, storage, summary = small_catalog
    data = storage.read_bytes(raw(cfg, storage, cfg.sources.tracks))
    first = data.split(b"\n", 1)[0].decode().split("<SEP>")
    assert len(first) == 4 and first[0].startswith("TR") and len(first[0]) == 18 and first[1].startswith("SO")
    tracks, q = parse_unique_tracks(data, uri="x")
    assert tracks.num_rows == summary["songs"] and q.num_rows == 0
    tdata = storage.read_bytes(raw(cfg, storage, cfg.sources.triplets))
    line = tdata.split(b"\n", 1)[0].decode().split("\t")
    assert len(line) == 3 and len(line[0]) == 40 and int(line[0], 16) >= 0 and line[1].startswith("SO") and int(line[2]) > 0
    plays, q = parse_triplets(tdata, uri="x", known_songs=tracks["song_id"])
    assert plays.num_rows == summary["triplets"] and q.num_rows == 0
    users = plays["user_id"].to_pylist()
    assert users == sorted(users, key=users.index)  # grouped by user, as the real file is
    pairs = parse_mismatches(storage.read_bytes(raw(cfg, storage, cfg.sources.mismatches)))
    assert pairs.num_rows == summary["mismatches"] == 2
    assert set(pairs["track_id"].to_pylist()) <= set(tracks["track_id"].to_pylist())


def test_lastfm_json_and_sqlite_hold_the_same_tags(small_catalog, tmp_path):
    import sqlite3

    cfg, storage, summary = small_catalog
    files = storage.list(raw(cfg, storage, cfg.sources.lastfm_json))
    assert len(files) == summary["tagged_tracks"] > 0
    doc = json.loads(storage.read_bytes(files[0].uri))
    assert set(doc) == {"artist", "timestamp", "similars", "tags", "track_id", "title"}
    assert files[0].uri.endswith(f"{msd_subdir(doc['track_id'])}/{doc['track_id']}.json")
    assert all(isinstance(t, str) and w.isdigit() for t, w in doc["tags"])
    path = tmp_path / "lastfm_tags.db"
    path.write_bytes(storage.read_bytes(raw(cfg, storage, cfg.sources.lastfm_db)))
    con = sqlite3.connect(path)
    n_db = con.execute("SELECT COUNT(*) FROM tid_tag").fetchone()[0]
    con.close()
    n_json = sum(len(json.loads(storage.read_bytes(f.uri))["tags"]) for f in files)
    assert n_db == n_json


def test_audio_clips_decode_at_the_configured_format(small_catalog):
    cfg, storage, summary = small_catalog
    clips = storage.list(raw(cfg, storage, cfg.sources.audio))
    assert len(clips) == summary["songs"] and all(c.uri.endswith(".mp3") for c in clips)
    audio, sr = sf.read(io.BytesIO(storage.read_bytes(clips[0].uri)), always_2d=True)
    assert sr == 44100 and audio.shape[1] == 2
    assert abs(audio.shape[0] / sr - cfg.synth.clip_seconds) < 0.15


def test_gtzan_and_magnatagatune_layouts(small_catalog):
    cfg, storage, _ = small_catalog
    gtzan = [o.uri for o in storage.list(raw(cfg, storage, cfg.sources.gtzan))]
    groups_uri = raw(cfg, storage, f"{cfg.sources.gtzan}/groups.csv")
    assert groups_uri in gtzan  # each clip's artist, for the grouped transfer protocol
    gtzan.remove(groups_uri)
    assert len(gtzan) == len(GENRES) * 2
    groups = storage.read_bytes(groups_uri).decode().splitlines()
    assert groups[0] == "path,artist" and len(groups) == 1 + len(gtzan)
    assert "blues/blues.00001.wav,blues_artist001" in groups  # one clip per artist by default
    assert raw(cfg, storage, f"{cfg.sources.gtzan}/blues/blues.00001.wav") in gtzan
    audio, sr = sf.read(io.BytesIO(storage.read_bytes(gtzan[0])), always_2d=True)
    assert sr == 22050 and audio.shape[1] == 1 and abs(audio.shape[0] / sr - 30.0) < 0.01
    ann = storage.read_bytes(raw(cfg, storage, f"{cfg.sources.mtat}/annotations_final.csv")).decode()
    rows = list(csv.reader(io.StringIO(ann), delimiter="\t"))
    assert rows[0][0] == "clip_id" and rows[0][-1] == "mp3_path" and ann.startswith('"clip_id"\t')
    assert len(rows) == 1 + 16
    for row in rows[1:]:
        assert set(row[1:-1]) <= {"0", "1"}
        assert row[-1][0] in "0123456789abcdef" and row[-1][1] == "/"
        assert storage.exists(raw(cfg, storage, f"{cfg.sources.mtat}/{row[-1]}"))


def test_generation_is_deterministic_for_a_seed(small_catalog, tmp_path):
    from deepcontent.storage import Storage

    cfg, storage, _ = small_catalog
    other = Storage(f"file://{tmp_path}/again")
    other.ensure_root()
    cfg2 = cfg.model_copy(deep=True)
    cfg2.synth.audio = False
    generate(cfg2, other)
    for key in (cfg.sources.triplets, cfg.sources.tracks, cfg.sources.mismatches):
        assert other.read_bytes(raw(cfg, other, key)) == storage.read_bytes(raw(cfg, storage, key))


def test_plays_follow_taste_genre_and_popularity():
    """Users concentrate on their favourite genres, and play counts have a heavy tail."""
    songs = make_songs(400, seed=3, with_attributes=False)
    users = make_users(2000, n_comm=n_communities(400), mean_songs=25, seed=3)
    ui, si, counts = (np.concatenate(x) for x in zip(*iter_plays(songs, users, seed=3)))
    assert len(np.unique(ui.astype(np.int64) * songs.n + si)) == len(ui)  # one line per pair
    fav = users.genre_taste.argmax(axis=1)
    share = np.mean(songs.genre_idx[si] == fav[ui])
    assert share > 0.25  # chance would be ~0.1
    assert counts.min() >= 1 and np.median(counts) <= 3 and counts.max() >= 20
    per_song = np.bincount(si, minlength=songs.n)
    top = np.sort(per_song)[::-1][: songs.n // 10]
    assert top.sum() > 0.25 * per_song.sum()  # popularity: the top 10% of songs draw over a quarter of plays


def test_plays_only_mode_scales_without_attributes():
    songs = make_songs(20_000, seed=0, with_attributes=False)
    users = make_users(20_000, n_comm=n_communities(20_000), mean_songs=47.5, seed=0)
    n = sum(len(b[0]) for b in iter_plays(songs, users, seed=0))
    assert 30 * users.n < n < 60 * users.n


def test_gtzan_clips_of_one_synthetic_artist_share_its_sound(tmp_path):
    from deepcontent.config import load_config
    from deepcontent.storage import Storage
    from deepcontent.synth.generate import gtzan_groups, gtzan_jobs

    storage = Storage(f"file://{tmp_path}/s")
    one = load_config(None, overrides=["synth.gtzan_per_genre=4"], environ={})
    two = load_config(None, overrides=["synth.gtzan_per_genre=4", "synth.gtzan_clips_per_artist=2"], environ={})
    solo, paired = gtzan_jobs(one, storage), gtzan_jobs(two, storage)
    for a, b in ((paired[0].attrs, paired[1].attrs), (paired[2].attrs, paired[3].attrs)):
        assert (a.key, a.mode, a.timbre, a.swing) == (b.key, b.mode, b.timbre, b.swing)
        assert a.tempo_bpm != b.tempo_bpm and abs(a.tempo_bpm - b.tempo_bpm) < 0.2 * a.tempo_bpm
    assert [j.uri for j in solo] == [j.uri for j in paired]
    assert gtzan_groups(two).decode().splitlines()[1:3] == ["blues/blues.00000.wav,blues_artist000",
                                                            "blues/blues.00001.wav,blues_artist000"]
