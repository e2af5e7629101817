"""Faults inside a stage that must not become permanent or silent: transient decoder failures
are retried by later runs within a budget, a same-size edit of an input is a new input, a giant
line is quarantined without being read whole, a hook outside the allow-list is refused."""

from __future__ import annotations

import hashlib
import os

import pyarrow.compute as pc
import pytest

from deepcontent import datasets
from deepcontent.errors import ConfigError, CorruptFileError
from deepcontent.hooks import resolve_hook
from deepcontent.synth.generate import generate
from spectro_faults import HANG_LIST
from support import config_for, run_stage


@pytest.fixture
def hang_list():
    yield HANG_LIST
    if os.path.exists(HANG_LIST):
        os.remove(HANG_LIST)


def _catalog(storage, tmp_path, spark, **extra):
    cfg = config_for(storage, tmp_path, **{
        "synth.songs": 24, "synth.users": 200, "synth.clip_seconds": 3.0, "synth.gtzan_per_genre": 0,
        "synth.mtat_clips": 0, "synth.lastfm_format": "none", "synth.audio_format": "wav",
        "spectrograms.compute_fn": "spectro_faults:compute_flaky", "spectrograms.decode_timeout_s": 3,
        "spectrograms.clips_per_task": 12, "spectrograms.max_quarantine_fraction": 0.5, **extra})
    generate(cfg, storage)
    run_stage("ingest", cfg, storage, spark)
    return cfg


def test_clips_that_timed_out_are_retried_by_the_next_run(file_storage, tmp_path, spark, hang_list):
    storage = file_storage
    cfg = _catalog(storage, tmp_path, spark)
    tracks = datasets.TRACKS.read(storage).to_pylist()[:2]
    with open(hang_list, "w") as f:
        f.write("\n".join(hashlib.sha256(storage.read_bytes(t["audio_uri"])).hexdigest() for t in tracks))
    first = run_stage("spectrograms", cfg, storage, spark)
    assert first.quarantined == {"timeout": 2} and first.counts["to_retry"] == 2
    os.remove(hang_list)  # the node is healthy again
    again = run_stage("spectrograms", cfg, storage, spark)
    assert again.counts["processed"] == 2 and again.counts["computed"] == 2 and again.quarantined == {}
    have = set(datasets.SPECTROGRAMS.read(storage, columns=["track_id"])["track_id"].to_pylist())
    assert {t["track_id"] for t in tracks} <= have
    assert run_stage("spectrograms", cfg, storage, spark).counts["processed"] == 0


def test_a_clip_that_keeps_timing_out_stops_being_retried_after_its_budget(file_storage, tmp_path, spark, hang_list):
    storage = file_storage
    cfg = _catalog(storage, tmp_path, spark, **{"spectrograms.max_attempts": 2})
    track = datasets.TRACKS.read(storage).to_pylist()[0]
    with open(hang_list, "w") as f:
        f.write(hashlib.sha256(storage.read_bytes(track["audio_uri"])).hexdigest())
    assert run_stage("spectrograms", cfg, storage, spark).quarantined == {"timeout": 1}
    second = run_stage("spectrograms", cfg, storage, spark)
    assert second.counts["processed"] == 1 and second.quarantined == {"timeout": 1}
    third = run_stage("spectrograms", cfg, storage, spark)
    assert third.counts["processed"] == 0  # budget spent: quarantined until the audio changes
    index = datasets.AUDIO_INDEX.read(storage)
    row = index.filter(pc.equal(index["track_id"], track["track_id"])).to_pylist()[0]
    assert row["status"] == "timeout" and row["attempts"] == 2
    q = datasets.quarantine("spectrograms").read(storage)
    assert q.filter(pc.equal(q["reason"], "timeout")).num_rows == 1  # still accounted for


def test_a_permanent_failure_is_not_retried(file_storage, tmp_path, spark):
    storage = file_storage
    cfg = _catalog(storage, tmp_path, spark)
    track = datasets.TRACKS.read(storage).to_pylist()[0]
    storage.write_bytes(track["audio_uri"], b"")
    assert run_stage("spectrograms", cfg, storage, spark).quarantined == {"empty": 1}
    assert run_stage("spectrograms", cfg, storage, spark).counts["processed"] == 0


def test_a_same_size_edit_of_the_triplets_file_is_a_new_input(file_storage, tmp_path, spark):
    storage = file_storage
    cfg = config_for(storage, tmp_path, **{"synth.songs": 20, "synth.users": 100, "synth.clip_seconds": 1.0,
                                           "synth.gtzan_per_genre": 0, "synth.mtat_clips": 0,
                                           "synth.lastfm_format": "none"})
    generate(cfg, storage)
    assert run_stage("ingest", cfg, storage, spark).published
    triplets = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.triplets)
    data = storage.read_bytes(triplets)
    first = data.split(b"\n", 1)[0]
    user, song, count = first.split(b"\t")
    edited = b"\t".join([user, song, (b"7" if count != b"7" else b"8") * len(count)])
    assert len(edited) == len(first)
    storage.write_bytes(triplets, edited + data[len(first):])
    assert storage.size(triplets) == len(data)
    rerun = run_stage("ingest", cfg, storage, spark)
    assert rerun.published, "a same-size edit of the triplets file was taken for the old input"


def test_a_giant_line_is_quarantined_without_being_read_whole(file_storage, tmp_path, spark):
    storage = file_storage
    cfg = config_for(storage, tmp_path, **{"synth.songs": 20, "synth.users": 100, "synth.clip_seconds": 1.0,
                                           "synth.gtzan_per_genre": 0, "synth.mtat_clips": 0,
                                           "synth.lastfm_format": "none", "ingest.max_line_bytes": 4096,
                                           "ingest.chunk_bytes": 65536, "ingest.max_quarantine_fraction": 0.5})
    generate(cfg, storage)
    triplets = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.triplets)
    data = storage.read_bytes(triplets)
    giant = b"u" * (3 << 20)  # one 3 MiB line in the middle of the file
    cut = data.index(b"\n", len(data) // 2) + 1
    storage.write_bytes(triplets, data[:cut] + giant + b"\n" + data[cut:])
    result = run_stage("ingest", cfg, storage, spark)
    assert result.quarantined.get("line_too_long") == 1
    q = datasets.quarantine("ingest").read(storage)
    row = q.filter(pc.equal(q["reason"], "line_too_long")).to_pylist()
    assert row and row[0]["source"] == f"{triplets}@{cut}"
    assert result.counts["plays"] > 0


def test_line_segments_never_hold_more_than_the_range_and_the_cap(file_storage):
    uri = file_storage.uri("giant.txt")
    file_storage.write_bytes(uri, b"a\tb\t1\n" + b"x" * (70 << 20) + b"\nc\td\t2\n")
    size = file_storage.size(uri)
    chunk, cap = 1 << 20, 1 << 16
    held = []
    for start in range(0, size, chunk):
        segments, too_long = file_storage.read_line_segments(uri, start, min(start + chunk, size), max_line_bytes=cap)
        held.append(sum(len(b) for _, b in segments))
        assert all(len(b) <= chunk + cap for _, b in segments)
    assert max(held) <= chunk + cap


@pytest.mark.parametrize("path", ["os:system", "subprocess:run", "builtins:exec", "tests_helpers:anything"])
def test_a_hook_outside_the_allow_list_is_refused(path, monkeypatch):
    monkeypatch.setenv("DEEPCONTENT_ALLOW_HOOKS", "spectro_faults")
    with pytest.raises(ConfigError, match="not allowed to run as a hook"):
        resolve_hook(path, field="embed.before_commit_hook")
    assert resolve_hook("spectro_faults:compute_flaky", field="spectrograms.compute_fn").__name__ == "compute_flaky"
    assert resolve_hook("deepcontent.audio.features:compute_log_mel", field="spectrograms.compute_fn")


def test_a_stage_refuses_a_config_hook_it_is_not_allowed_to_run(file_storage, tmp_path, spark, monkeypatch):
    storage = file_storage
    cfg = _catalog(storage, tmp_path, spark, **{"spectrograms.compute_fn": "os:system"})
    with pytest.raises(ConfigError, match="os"):
        run_stage("spectrograms", cfg, storage, spark)


def test_a_corrupt_index_part_is_rebuilt_by_the_next_run(file_storage, tmp_path, spark):
    storage = file_storage
    cfg = _catalog(storage, tmp_path, spark, **{"spectrograms.compute_fn": "deepcontent.audio.features:compute_log_mel"})
    first = run_stage("spectrograms", cfg, storage, spark)
    n = first.counts["computed"]
    part = datasets.AUDIO_INDEX.files(storage)[0]
    storage.write_bytes(part, b"PAR1 this is not a parquet file")
    with pytest.raises(CorruptFileError, match="rollback"):
        datasets.AUDIO_INDEX.read(storage)
    again = run_stage("spectrograms", cfg, storage, spark)
    assert again.counts["processed"] == n
    spec = datasets.SPECTROGRAMS.read(storage, columns=["track_id"])
    assert spec.num_rows == n and len(set(spec["track_id"].to_pylist())) == n


def test_rollback_returns_a_dataset_to_its_last_readable_version(file_storage):
    import pyarrow as pa

    from deepcontent.storage import join

    st = file_storage
    ds = st.uri("features/things")
    for i in range(2):
        part = join(st.staging_uri(ds, f"run-{i}"), "part.parquet")
        st.write_parquet(pa.table({"x": [i]}), part)
        st.publish(ds, run_id=f"run-{i}", files=[part])
    st.write_bytes(st.published_files(ds)[0], b"garbage")
    with pytest.raises(CorruptFileError, match=r"part\.parquet.*deepcontent rollback"):
        st.read_dataset(ds)
    pointer = st.rollback(ds, run_id="rollback-1")
    assert pointer["rolled_back_to"] == "run-0" and pointer["generation"] == 3
    assert st.read_dataset(ds)["x"].to_pylist() == [0]
