"""Bring-your-own catalog: track lists, plays and tags as tables, a bare folder of audio, every
codec, and real-data quirks — every input object and record used or quarantined with a reason,
the counts adding up."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from catalog_files import codec_files, libsndfile_bytes, music
from deepcontent import datasets
from deepcontent.interactions.sources import parse_triplets, read_lastfm_db
from deepcontent.interactions.tables import folder_track_id, play_counts, play_events, tag_rows, track_list
from support import config_for, run_stage

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "deepcontent.cli"]


# --------------------------------------------------------------------------- pure parsers
def test_a_track_list_with_its_own_column_names():
    table = pa.table({"isrc": ["A1", "A2", "", "A1"], "name": ["x", "y", "z", "w"], "who": ["p", None, "q", "r"],
                      "path": ["d/1.mp3", "s3://other/2.flac", None, "d/4.mp3"]})
    tracks, rejected = track_list(table, columns={"track_id": "isrc", "title": "name", "artist": "who", "audio": "path"},
                                  where="list.csv")
    assert tracks["track_id"].to_pylist() == ["A1", "A2"] and tracks["song_id"].to_pylist() == ["A1", "A2"]
    assert tracks["audio"].to_pylist() == ["d/1.mp3", "s3://other/2.flac"]
    assert sorted(rejected["reason"].to_pylist()) == ["duplicate_track", "malformed_line"]
    assert set(rejected["source"].to_pylist()) == {"list.csv#row=2", "list.csv#row=3"}
    with pytest.raises(KeyError, match="'isrc'"):
        track_list(table.drop_columns(["isrc"]), columns={"track_id": "isrc"}, where="list.csv")


def test_play_counts_check_every_row():
    table = pa.table({"u": ["a", "b", None, "d", "e", "f"], "t": ["T1", "T2", "T3", "T4", None, "T6"],
                      "n": ["3", "0", "2", "x", "1", "99999999999"]})
    id_name, rows, rejected = play_counts(table, columns={"user_id": "u", "track_id": "t", "play_count": "n"}, where="p")
    assert id_name == "track_id" and rows.to_pylist() == [{"user_id": "a", "track_id": "T1", "play_count": 3}]
    assert Counter(rejected["reason"].to_pylist()) == {"malformed_line": 2, "nonpositive_count": 1, "bad_count": 2}
    assert rows.num_rows + rejected.num_rows == table.num_rows


@pytest.mark.parametrize("kind", ["timestamp", "iso", "epoch_s", "epoch_ms"])
def test_listening_events_in_a_window(kind):
    times = [dt.datetime(2026, 1, d, 12, tzinfo=dt.timezone.utc) for d in (1, 5, 9, 20)]
    col = {"timestamp": pa.array(times, pa.timestamp("us", tz="UTC")),
           "iso": pa.array([t.isoformat() for t in times[:3]] + ["not a time"]),
           "epoch_s": pa.array([int(t.timestamp()) for t in times], pa.int64()),
           "epoch_ms": pa.array([int(t.timestamp() * 1000) for t in times], pa.int64())}[kind]
    table = pa.table({"user_id": ["u1", "u1", "u2", "u2"], "track_id": ["T1", "T1", "T2", "T3"], "ts": col})
    id_name, rows, rejected, outside = play_events(table, columns={"timestamp": "ts"}, where="ev",
                                                   since="2026-01-02", until="2026-01-15")
    assert id_name == "track_id"
    assert rows.to_pylist() == [{"user_id": "u1", "track_id": "T1", "play_count": 1},
                                {"user_id": "u2", "track_id": "T2", "play_count": 1}]
    if kind == "iso":
        assert rejected["reason"].to_pylist() == ["bad_timestamp"] and outside == 1
    else:
        assert rejected.num_rows == 0 and outside == 2  # Jan 1 and Jan 20 are outside
    assert rows.num_rows + rejected.num_rows + outside == table.num_rows


def test_tags_keep_weight_zero_and_reject_bad_weights():
    table = pa.table({"track_id": ["T1", "T1", "T2", "T3"], "tag": ["rock", "seen live", "jazz", "pop"],
                      "weight": ["100", "0", "101", "abc"]})
    rows, rejected = tag_rows(table, columns={}, where="tags")
    assert rows.to_pylist() == [{"track_id": "T1", "tag": "rock", "weight": 100}, {"track_id": "T1", "tag": "seen live", "weight": 0}]
    assert rejected["reason"].to_pylist() == ["bad_weight", "bad_weight"]


def test_folder_track_ids_are_stable_and_distinct():
    a = folder_track_id("artist/album/01 intro.flac")
    assert a == folder_track_id("artist/album/01 intro.flac") and a.startswith("TR") and len(a) == 18
    assert a != folder_track_id("artist/album/01 intro.ogg")


def test_an_empty_count_field_is_a_malformed_line():
    _, q = parse_triplets(b"u1\tS1\t\nu2\tS2\t3\n", uri="t")
    assert q["reason"].to_pylist() == ["malformed_line"]


def test_dangling_lastfm_db_rows_are_quarantined_not_joined_away(tmp_path):
    path = tmp_path / "lastfm_tags.db"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE tids (tid TEXT); CREATE TABLE tags (tag TEXT); CREATE TABLE tid_tag (tid INT, tag INT, val FLOAT);"
                      "INSERT INTO tids VALUES ('TRA'); INSERT INTO tags VALUES ('rock'); INSERT INTO tags VALUES ('seen live');"
                      "INSERT INTO tid_tag VALUES (1, 1, 100); INSERT INTO tid_tag VALUES (1, 2, 0);"
                      "INSERT INTO tid_tag VALUES (7, 1, 50); INSERT INTO tid_tag VALUES (1, 9, 50);")
    con.commit()
    con.close()
    tags, q = read_lastfm_db(str(path), uri="db")
    assert tags.to_pylist() == [{"track_id": "TRA", "tag": "rock", "weight": 100}, {"track_id": "TRA", "tag": "seen live", "weight": 0}]
    assert q["reason"].to_pylist() == ["dangling_id", "dangling_id"] and "has no row" in q["detail"][0].as_py()


# --------------------------------------------------------------------------- ingest on tables
def _write_parquet(storage, key, table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.uri("raw", key), buf.getvalue())


def test_events_and_tag_tables_through_ingest_and_matrices(file_storage, tmp_path, spark):
    storage = file_storage
    ids = [f"ISRC{i:04d}" for i in range(12)]
    csv = "code,label\n" + "".join(f"{t},Song {i}\n" for i, t in enumerate(ids))
    storage.write_bytes(storage.uri("raw", "catalog", "tracks.csv"), csv.encode())
    rng = np.random.default_rng(0)
    users = [f"user{u}" for u in rng.integers(0, 40, 600)]
    tracks = [ids[i] for i in rng.integers(0, 12, 600)]
    times = [dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=int(h)) for h in rng.integers(0, 24 * 60, 600)]
    events = pa.table({"listener": users + ["ghost", None], "isrc": tracks + ["NOPE", ids[0]],
                       "at": pa.array(times + times[:2], pa.timestamp("us", tz="UTC"))})
    _write_parquet(storage, "logs/events/part-0.parquet", events.slice(0, 300))
    _write_parquet(storage, "logs/events/part-1.parquet", events.slice(300))
    _write_parquet(storage, "catalog/tags.parquet", pa.table({
        "track_id": ids[:6] + ["NOPE"], "tag": ["rock", "rock", "jazz", "jazz", "seen live", "rock", "x"],
        "weight": pa.array([100, 80, 90, 0, 0, 50, 10], pa.int32())}))
    cfg = config_for(storage, tmp_path, **{
        "sources.catalog": "table", "sources.track_table.uri": "catalog/tracks.csv",
        "sources.track_table.columns.track_id": "code", "sources.track_table.columns.title": "label",
        "sources.play_table.uri": "logs/events", "sources.play_table.kind": "events",
        "sources.play_table.columns.user_id": "listener", "sources.play_table.columns.track_id": "isrc",
        "sources.play_table.columns.timestamp": "at", "sources.play_table.since": "2026-03-15",
        "sources.play_table.until": "2026-04-15", "sources.tag_table.uri": "catalog/tags.parquet",
        "ingest.max_quarantine_fraction": 0.2})
    result = run_stage("ingest", cfg, storage, spark)
    c = result.counts
    assert c["tracks"] == 12 and c["tracks_with_audio"] == 0 and c["audio_objects"] == 0
    plays = datasets.PLAYS.read(storage)
    inside = [(u, t) for u, t, at in zip(users, tracks, times)
              if dt.datetime(2026, 3, 15, tzinfo=dt.timezone.utc) <= at < dt.datetime(2026, 4, 15, tzinfo=dt.timezone.utc)]
    expected = Counter(inside)
    got = {(u, s): n for u, s, n in zip(*(plays[k].to_pylist() for k in ("user_id", "song_id", "play_count")))}
    assert got == dict(expected)  # aggregated by Spark: one count per (user, song), song = track here
    assert c["plays_outside_window"] + sum(expected.values()) + 2 == events.num_rows  # + 2 quarantined
    assert result.quarantined == {"malformed_line": 1, "unknown_track": 2}  # None user; NOPE event and NOPE tag
    tags = datasets.TAGS.read(storage)
    assert tags.num_rows == 6 and pc.sum(pc.equal(tags["weight"], 0)).as_py() == 2  # weight 0 kept

    m = run_stage("matrices", cfg, storage, spark)
    assert m.counts["tags_below_min_weight"] == 2  # ... but not in the tag matrix


def test_an_audio_only_catalog_publishes_no_plays_and_matrices_says_why(file_storage, tmp_path, spark):
    storage = file_storage
    for i in range(3):
        storage.write_bytes(storage.uri("raw", "audio", "artist", f"{i:02d} song.flac"),
                            libsndfile_bytes(music(i, channels=1), 44100, "FLAC", "PCM_16"))
    storage.write_bytes(storage.uri("raw", "audio", "artist", "cover.jpg"), b"\xff\xd8\xff\xe0 not music")
    cfg = config_for(storage, tmp_path, **{"sources.catalog": "folder"})
    result = run_stage("ingest", cfg, storage, spark)
    assert result.counts["tracks"] == 3 and result.counts["plays"] == 0 and result.quarantined == {"unsupported_format": 1}
    assert result.counts["audio_objects"] == 4 == result.counts["audio_used"] + result.counts["audio_quarantined"]
    tracks = datasets.TRACKS.read(storage).to_pylist()
    assert {t["track_id"] for t in tracks} == {folder_track_id(f"artist/{i:02d} song.flac") for i in range(3)}
    assert {t["artist"] for t in tracks} == {"artist"} and {t["title"] for t in tracks} == {f"{i:02d} song" for i in range(3)}
    from deepcontent.errors import InputMissingError

    with pytest.raises(InputMissingError, match="no plays"):
        run_stage("matrices", cfg, storage, spark)


# --------------------------------------------------------------------------- the whole product
def _cli(args, cwd, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _last_json(out):
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A label's catalog as it arrives: audio in every codec at keys unrelated to the track ids
    (one in another bucket), a CSV track list, a Parquet table of play counts; ``pipeline``
    run on it through the CLI up to the neighbours."""
    work = tmp_path_factory.mktemp("service")
    s3 = work / ".deepcontent" / "s3"
    raw = s3 / "deepcontent" / "raw"
    files = codec_files()
    rng = np.random.default_rng(1)
    for i in range(30):  # ordinary WAV tracks, so there is something to learn from
        files[f"plain-{i:02d}.wav"] = (libsndfile_bytes(music(200 + i, seconds=3.0), 44100, "WAV", "PCM_16"), "ok")
    rows, outcome = [], {}
    for n, (name, (data, expected)) in enumerate(sorted(files.items())):
        track = f"ISRC-{n:04d}"
        if name == "flac-16k-mono.flac":  # audio in another bucket, named by full URI
            (s3 / "label-masters" / "x").mkdir(parents=True, exist_ok=True)
            (s3 / "label-masters" / "x" / name).write_bytes(data)
            location = f"s3://label-masters/x/{name}"
        else:
            key = f"releases/{rng.integers(1e9):09d}/{name}"
            (raw / "audio" / key).parent.mkdir(parents=True, exist_ok=True)
            (raw / "audio" / key).write_bytes(data)
            location = key
        rows.append(f"{track},Title {n},Artist {n % 7},{location}")
        outcome[track] = (name, expected)
    (raw / "audio" / "releases" / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))  # not audio
    (raw / "audio" / "releases" / "stray.wav").write_bytes(files["plain-00.wav"][0])  # in no track list
    (raw / "catalog").mkdir(parents=True)
    (raw / "catalog" / "tracks.csv").write_text("isrc,name,performer,file\n" + "\n".join(rows) + "\n")
    tracks = sorted(outcome)
    users = [f"u{u:03d}" for u in range(150)]
    plays = [(u, tracks[int(t)], int(c)) for u in users for t, c in zip(rng.integers(0, len(tracks), 12),
                                                                       rng.integers(1, 20, 12))]
    table = pa.table({"listener": [p[0] for p in plays] + ["u001"], "isrc": [p[1] for p in plays] + ["ISRC-9999"],
                      "n": [p[2] for p in plays] + [3]})
    (raw / "logs").mkdir()
    pq.write_table(table, raw / "logs" / "counts.parquet")
    config = work / "catalog.yaml"
    config.write_text(f"""extends: {REPO / 'conf' / 'local.yaml'}
sources:
  catalog: table
  track_table: {{uri: catalog/tracks.csv, columns: {{track_id: isrc, title: name, artist: performer, audio: file}}}}
  play_table: {{uri: logs/counts.parquet, kind: counts, columns: {{user_id: listener, track_id: isrc, play_count: n}}}}
spark: {{master: "local[2]"}}
matrices: {{split_fractions: [0.6, 0.4, 0.0]}}
factorize: {{factors: 8}}
train: {{epochs: 1, batch_size: 16}}
embed: {{in_process_max_clips: 0}}
neighbors: {{k: 3}}
spectrograms: {{max_quarantine_fraction: 0.2}}
""")
    result = _last_json(_cli(["pipeline", "--json", "--skip-generate", "--stop-after", "neighbors", "--config", str(config)], work))
    return work, config, result, outcome


def _warehouse_read(work, table, *, root="s3://deepcontent", uri="sqlite:///.deepcontent/catalog.db"):
    """A warehouse table (str) or a published dataset of the embedded default in ``work``."""
    from deepcontent.config import WarehouseConfig
    from deepcontent.engines.s3server import EmbeddedS3Server
    from deepcontent.storage import Storage
    from deepcontent.warehouse import Warehouse

    cwd = os.getcwd()
    os.chdir(work)
    try:
        with EmbeddedS3Server(work / ".deepcontent" / "s3") as server:
            storage = Storage(root, endpoint_url=server.endpoint_url, credentials=server.credentials)
            if isinstance(table, datasets.Dataset):
                return table.read(storage)
            with Warehouse.from_config(WarehouseConfig(uri=uri), storage) as wh:
                return wh.read(table)
    finally:
        os.chdir(cwd)


def test_every_codec_is_embedded_or_quarantined_and_the_counts_add_up(service):
    work, _, result, outcome = service
    ingest, spec, embed = result["ingest"], result["spectrograms"], result["embed"]
    c = ingest["counts"]
    # every object under the audio prefix: used, or quarantined with its reason
    assert c["audio_objects"] == len(outcome) - 1 + 2  # one track's audio is in another bucket; + cover + stray
    assert c["audio_objects"] == c["audio_used"] + c["audio_quarantined"]
    assert ingest["quarantined"] == {"unsupported_format": 1, "unknown_track": 2}  # cover.jpg, stray.wav; ISRC-9999 play
    assert c["tracks"] == c["tracks_with_audio"] == len(outcome)
    expected_bad = Counter(e for _, e in outcome.values() if e != "ok")
    assert spec["quarantined"] == dict(expected_bad)
    good = {t for t, (_, e) in outcome.items() if e == "ok"}
    assert spec["counts"]["computed"] == len(good) and embed["counts"]["embedded"] == len(good)
    emb = _warehouse_read(work, "embeddings")
    assert set(emb["track_id"].to_pylist()) == good  # Opus, AAC, ALAC, AIFF, the odd extension, the other bucket
    q = _warehouse_read(work, "quarantine")
    reasons = {(r["stage"], r["reason"]) for r in q.to_pylist()}
    assert {("ingest", "unsupported_format"), ("ingest", "unknown_track")} <= reasons
    spec_q = _warehouse_read(work, datasets.quarantine("spectrograms")).to_pylist()
    assert Counter(r["reason"] for r in spec_q) == expected_bad
    truncated = [r for r in spec_q if r["reason"] == "truncated"]
    assert truncated and "of the 4.00 s its header declares" in truncated[0]["detail"]


def test_an_audio_only_catalog_is_embedded_with_a_model_trained_on_another(service):
    work, _, result, _ = service
    folder = work / ".deepcontent" / "s3" / "audio-only" / "raw" / "audio"
    for i, name in enumerate(("a.opus", "b.m4a", "c.flac")):
        data, _ = codec_files(seed=3)[{"a.opus": "opus-48k-stereo.opus", "b.m4a": "aac-48k-stereo.m4a",
                                       "c.flac": "flac-16k-mono.flac"}[name]]
        (folder / f"album {i}").mkdir(parents=True, exist_ok=True)
        (folder / f"album {i}" / name).write_bytes(data)
    common = ["storage.root=s3://audio-only", "sources.catalog=folder", "embed.registry_root=s3://deepcontent",
              "warehouse.uri=sqlite:///.deepcontent/audio-only.db", "spark.master=local[2]", "neighbors.k=2"]
    summary = _last_json(_cli(["nightly", "--json", *common], work))
    assert summary["status"] == "succeeded" and summary["new"] == 3
    assert summary["model_version"] == result["train"]["model_version"]
    emb = _warehouse_read(work, "embeddings", root="s3://audio-only", uri="sqlite:///.deepcontent/audio-only.db")
    assert emb.num_rows == 3
    out = _cli(["matrices", *common], work)
    assert out.returncode == 1 and "no plays" in out.stderr and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if "failed:" in line]) == 1
