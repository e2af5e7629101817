"""The ingest stage end to end on a generated catalog in a real S3 server, with real Spark."""

from collections import Counter

import numpy as np
import pytest

from deepcontent import datasets
from deepcontent.errors import QuarantineExceeded
from support import config_for, run_stage

from deepcontent.interactions.sources import parse_mismatches
from deepcontent.synth.generate import generate

PLAYS, TAGS, TRACKS = datasets.PLAYS.key, datasets.TAGS.key, datasets.TRACKS.key
QUARANTINE = datasets.quarantine("ingest").key

# (reason, how to spoil a good "user \t song \t count" line)
SPOILERS = [
    ("malformed_line", lambda u, s, c: f"{u}\t{s}"),  # missing field
    ("malformed_line", lambda u, s, c: f"{u}\t{s}\t{c}\t{c}"),  # extra field
    ("malformed_line", lambda u, s, c: ""),  # blank line
    ("bad_count", lambda u, s, c: f"{u}\t{s}\t{c}.5"),  # not an integer
    ("bad_count", lambda u, s, c: f"{u}\t{s}\tmany"),
    ("bad_count", lambda u, s, c: f"{u}\t{s}\t99999999999"),  # beyond int32
    ("nonpositive_count", lambda u, s, c: f"{u}\t{s}\t0"),
    ("nonpositive_count", lambda u, s, c: f"{u}\t{s}\t-{c}"),
    ("unknown_song", lambda u, s, c: f"{u}\tSONOSUCHSONG000000\t{c}"),
]


@pytest.fixture
def catalog(s3_storage, tmp_path):
    cfg = config_for(s3_storage, tmp_path, **{"synth.songs": 150, "synth.users": 1500, "synth.audio": "false",
                                               "synth.mismatch_fraction": 0.02, "ingest.chunk_bytes": 65536})
    generate(cfg, s3_storage)
    return cfg, s3_storage


def _triplets_uri(cfg, storage):
    return storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.triplets)


def test_salted_triplets_quarantine_counts_are_exact_and_no_good_line_is_lost(catalog, spark):
    cfg, storage = catalog
    uri = _triplets_uri(cfg, storage)
    lines = storage.read_bytes(uri).decode().splitlines()
    rng = np.random.default_rng(7)
    salted = rng.choice(len(lines), size=len(lines) // 100, replace=False)  # 1% of lines
    expected = Counter()
    for k, i in enumerate(salted):
        reason, spoil = SPOILERS[k % len(SPOILERS)]
        lines[i] = spoil(*lines[i].split("\t"))
        expected[reason] += 1
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())

    mismatched = set(parse_mismatches(storage.read_bytes(storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.mismatches)))["song_id"].to_pylist())
    assert mismatched, "the generated catalog should list mismatches"
    salted_set = set(salted.tolist())
    good = Counter()
    for i, line in enumerate(lines):
        if i in salted_set:
            continue
        u, s, c = line.split("\t")
        if s in mismatched:  # song left without a track: quarantined as unknown
            expected["unknown_song"] += 1
        else:
            good[(u, s, int(c))] += 1

    result = run_stage("ingest", cfg, storage, spark)
    assert result.published
    q = storage.read_dataset(storage.uri(QUARANTINE))
    from_triplets = np.array([src.startswith(uri + "@") for src in q["source"].to_pylist()])
    plays_q = q.filter(from_triplets)
    assert Counter(plays_q["reason"].to_pylist()) == expected
    assert set(q["stage"].to_pylist()) == {"ingest"} and set(q["run_id"].to_pylist()) == {result.run_id}
    # every quarantined triplet points at the exact line it came from
    data = storage.read_bytes(uri)
    for src in plays_q["source"].to_pylist()[:50]:
        offset = int(src.rsplit("@", 1)[1])
        assert offset == 0 or data[offset - 1:offset] == b"\n"
    plays = storage.read_dataset(storage.uri(PLAYS))
    got = Counter(zip(plays["user_id"].to_pylist(), plays["song_id"].to_pylist(), plays["play_count"].to_pylist()))
    assert got == good
    assert result.counts["triplet_lines"] == len(lines)  # every physical line is a row or a quarantine record


def test_tracks_drop_mismatches_and_tags_of_unknown_tracks(catalog, spark):
    cfg, storage = catalog
    run_stage("ingest", cfg, storage, spark)
    tracks = storage.read_dataset(storage.uri(TRACKS))
    pairs = parse_mismatches(storage.read_bytes(storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.mismatches)))
    assert tracks.num_rows == cfg.synth.songs - pairs.num_rows
    assert not set(pairs["track_id"].to_pylist()) & set(tracks["track_id"].to_pylist())
    assert tracks.column_names == ["track_id", "song_id", "artist", "title", "audio_uri"]
    tags = storage.read_dataset(storage.uri(TAGS))
    assert set(tags["track_id"].to_pylist()) <= set(tracks["track_id"].to_pylist())
    assert tags.num_rows > 0 and 0 <= min(tags["weight"].to_pylist()) and max(tags["weight"].to_pylist()) <= 100
    q = storage.read_dataset(storage.uri(QUARANTINE))
    reasons = Counter(q["reason"].to_pylist())
    assert reasons["mismatch"] == pairs.num_rows


def test_rerun_with_nothing_new_publishes_nothing(catalog, spark):
    cfg, storage = catalog
    first = run_stage("ingest", cfg, storage, spark)
    pointers = {name: storage.published(storage.uri(name)) for name in (TRACKS, PLAYS, TAGS, QUARANTINE)}
    listing = [o.uri for o in storage.list(storage.uri(""))]
    second = run_stage("ingest", cfg, storage, spark)
    assert not second.published and second.run_id == first.run_id
    assert {name: storage.published(storage.uri(name)) for name in pointers} == pointers
    assert [o.uri for o in storage.list(storage.uri(""))] == listing  # not even a manifest


def test_too_much_bad_input_fails_loudly_and_publishes_only_the_quarantine(catalog, spark):
    cfg, storage = catalog
    uri = _triplets_uri(cfg, storage)
    lines = storage.read_bytes(uri).decode().splitlines()
    for i in range(0, len(lines), 10):  # 10% garbage > the 5% default threshold
        lines[i] = "garbage"
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    with pytest.raises(QuarantineExceeded) as err:
        run_stage("ingest", cfg, storage, spark)
    msg = str(err.value)
    assert f"plays: " in msg and f"of {len(lines):,} records" in msg and storage.uri(QUARANTINE) in msg
    assert f"malformed_line {len(range(0, len(lines), 10)):,}" in msg
    assert storage.published(storage.uri(PLAYS)) is None
    q = storage.read_dataset(storage.uri(QUARANTINE))
    assert Counter(q["reason"].to_pylist())["malformed_line"] == len(range(0, len(lines), 10))
