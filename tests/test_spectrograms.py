"""The spectrogram stage on a generated catalog in a real S3 server, with real Spark and real codecs."""

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from deepcontent import datasets
from deepcontent.errors import QuarantineExceeded
from deepcontent.synth.audio import encode_audio, render_clip
from deepcontent.synth.attributes import sample_attributes
from deepcontent.synth.generate import generate
from support import config_for, run_stage

TRACKS, AUDIO_INDEX, SPECTROGRAMS = datasets.TRACKS.key, datasets.AUDIO_INDEX.key, datasets.SPECTROGRAMS.key
QUARANTINE = datasets.quarantine("spectrograms").key


def read_spectrograms(storage, *, columns=None):
    return datasets.SPECTROGRAMS.read(storage, columns=columns)


def decode_mel(row):
    return datasets.mel_arrays(pa.Table.from_pylist([row]))[0]


def _catalog(storage, tmp_path, spark, songs=24, **extra):
    cfg = config_for(storage, tmp_path, **{
        "synth.songs": songs, "synth.users": 200, "synth.clip_seconds": 4.0, "synth.gtzan_per_genre": 0,
        "synth.mtat_clips": 0, "synth.mismatch_fraction": 0.0, "synth.lastfm_format": "none",
        "spectrograms.compute_fn": "spectro_faults:compute_with_faults", "spectrograms.decode_timeout_s": 4,
        "spectrograms.clips_per_task": 8, **extra})
    generate(cfg, storage)
    run_stage("ingest", cfg, storage, spark)
    return cfg


def _ogg_bytes():
    audio = render_clip(sample_attributes("jazz", np.random.default_rng(1)), seconds=3.0, sample_rate=44100, seed=1)
    return encode_audio(audio, sample_rate=44100, fmt="ogg")


def _flac_of_silence(seconds: float, sr: int = 8000) -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(sr * 600, dtype=np.int16)
        for _ in range(int(seconds // 600)):
            f.write(block)
    return buf.getvalue()


def _wav_of_silence(seconds: float = 3.0, sr: int = 44100) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(sr * seconds), 2), dtype=np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# (expected outcome, how to spoil the clip's bytes)
SALTS = [
    ("undecodable", lambda b: b[:100]),  # truncated to its first frames' header
    ("empty", lambda b: b""),
    ("undecodable", lambda b: np.random.default_rng(5).bytes(len(b))),  # random bytes named .mp3
    ("silent", lambda b: _wav_of_silence()),
    ("too_long", lambda b: _flac_of_silence(3 * 3600)),  # three hours, rejected from the header
    ("timeout", lambda b: b"HANG" + b),
    ("crashed", lambda b: b"CRASH" + b),
    ("ok", lambda b: _ogg_bytes()),  # a different codec behind .mp3: sniffed and decoded
]


def _salt(storage, tracks, salts):
    salted = {}
    for row, (outcome, spoil) in zip(tracks, salts):
        storage.write_bytes(row["audio_uri"], spoil(storage.read_bytes(row["audio_uri"])))
        salted[row["track_id"]] = outcome
    return salted


def test_bad_files_are_quarantined_exactly_and_good_spectrograms_are_unaffected(s3_storage, tmp_path, spark):
    storage = s3_storage
    cfg = _catalog(storage, tmp_path, spark, **{"spectrograms.max_quarantine_fraction": 0.5})
    clean = run_stage("spectrograms", cfg, storage, spark)
    assert clean.published and clean.counts["computed"] == 24
    clean_rows = {r["track_id"]: r for r in read_spectrograms(storage).to_pylist()}
    row = next(iter(clean_rows.values()))
    mel = decode_mel(row)
    assert mel.shape == (128, row["n_frames"]) and np.isfinite(mel.astype(np.float32)).all()
    assert (row["sample_rate"], row["hop_length"], row["n_mels"]) == (22050, 512, 128)
    assert abs(row["n_frames"] - (1 + int(4.0 * 22050) // 512)) <= 4  # MP3 adds encoder delay and padding

    # Salt a fresh copy: wipe the stage's state and spoil eight clips.
    for name in (SPECTROGRAMS, AUDIO_INDEX, QUARANTINE):
        storage.delete_prefix(storage.uri(name))
    tracks = storage.read_dataset(storage.uri(TRACKS)).to_pylist()
    salted = _salt(storage, tracks[:len(SALTS)], SALTS)

    result = run_stage("spectrograms", cfg, storage, spark)
    expected = Counter(v for v in salted.values() if v != "ok")
    assert Counter(result.quarantined) == expected
    q = storage.read_dataset(storage.uri(QUARANTINE))
    assert Counter(q["reason"].to_pylist()) == expected
    by_uri = {r["audio_uri"]: r["track_id"] for r in tracks}
    assert {by_uri[s]: r for s, r in zip(q["source"].to_pylist(), q["reason"].to_pylist())} == {
        t: o for t, o in salted.items() if o != "ok"}
    assert all(d for d in q["detail"].to_pylist())

    rows = {r["track_id"]: r for r in read_spectrograms(storage).to_pylist()}
    good = [t for t in clean_rows if t not in salted]
    assert len(good) == 16 and set(rows) == set(good) | {t for t, o in salted.items() if o == "ok"}
    for t in good:  # byte-identical to the clean run's
        assert rows[t]["mel"] == clean_rows[t]["mel"] and rows[t]["audio_sha256"] == clean_rows[t]["audio_sha256"]


def test_too_many_bad_clips_fail_the_run_naming_count_and_location(s3_storage, tmp_path, spark):
    storage = s3_storage
    cfg = _catalog(storage, tmp_path, spark, songs=20)
    tracks = storage.read_dataset(storage.uri(TRACKS)).to_pylist()
    _salt(storage, tracks[:3], [("empty", lambda b: b"")] * 3)  # 15% > the default 5%
    with pytest.raises(QuarantineExceeded) as err:
        run_stage("spectrograms", cfg, storage, spark)
    assert "3 of 20 clips" in str(err.value) and storage.uri(QUARANTINE) in str(err.value)
    assert storage.published(storage.uri(SPECTROGRAMS)) is None
    assert storage.read_dataset(storage.uri(QUARANTINE)).num_rows == 3


def test_incremental_reruns_and_added_tracks(s3_storage, tmp_path, spark):
    storage = s3_storage
    # 10 of 30 clips have no track yet: their audio is quarantined by ingest, above its default
    cfg = _catalog(storage, tmp_path, spark, songs=30, **{"ingest.max_quarantine_fraction": 0.6})
    tracks_uri = storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.tracks)
    full = storage.read_bytes(tracks_uri)
    lines = full.decode().splitlines()
    # Start from a catalog that lacks the last 10 tracks, then add them.
    storage.write_bytes(tracks_uri, ("\n".join(lines[:20]) + "\n").encode())
    run_stage("ingest", cfg, storage, spark)
    first = run_stage("spectrograms", cfg, storage, spark)
    assert first.counts["processed"] == 20

    pointers = {n: storage.published(storage.uri(n)) for n in (SPECTROGRAMS, AUDIO_INDEX, QUARANTINE)}
    again = run_stage("spectrograms", cfg, storage, spark)
    assert not again.published and again.counts["processed"] == 0
    assert {n: storage.published(storage.uri(n)) for n in pointers} == pointers  # nothing published

    storage.write_bytes(tracks_uri, full)
    run_stage("ingest", cfg, storage, spark)
    added = run_stage("spectrograms", cfg, storage, spark)
    assert added.counts["processed"] == 10 and added.counts["computed"] == 10
    table = read_spectrograms(storage, columns=["track_id"])
    assert table.num_rows == 30 and len(set(table["track_id"].to_pylist())) == 30

    # Same bytes rewritten (new modification time): hashed, not decoded again, nothing recomputed.
    import time as _time

    touched = storage.read_dataset(storage.uri(TRACKS)).to_pylist()[1]
    _time.sleep(1.1)  # object stores keep modification times to the second
    storage.write_bytes(touched["audio_uri"], storage.read_bytes(touched["audio_uri"]))
    spec_pointer = storage.published(storage.uri(SPECTROGRAMS))
    same = run_stage("spectrograms", cfg, storage, spark)
    assert same.counts["processed"] == 1 and same.counts["unchanged"] == 1 and same.counts["computed"] == 0
    assert storage.published(storage.uri(SPECTROGRAMS)) == spec_pointer
    assert run_stage("spectrograms", cfg, storage, spark).counts["processed"] == 0  # and remembered

    # Changed audio replaces the old spectrogram (one row per track, new hash).
    track = storage.read_dataset(storage.uri(TRACKS)).to_pylist()[0]
    old = {r["track_id"]: r["audio_sha256"] for r in read_spectrograms(storage, columns=["track_id", "audio_sha256"]).to_pylist()}
    storage.write_bytes(track["audio_uri"], _ogg_bytes())
    changed = run_stage("spectrograms", cfg, storage, spark)
    assert changed.counts["processed"] == 1
    now = {r["track_id"]: r["audio_sha256"] for r in read_spectrograms(storage, columns=["track_id", "audio_sha256"]).to_pylist()}
    assert len(now) == 30 and now[track["track_id"]] != old[track["track_id"]]
    assert {t: s for t, s in now.items() if t != track["track_id"]} == {t: s for t, s in old.items() if t != track["track_id"]}


# ----------------------------------------------------------------------------- byte identity
def _reference_clips() -> dict[str, bytes]:
    """Three fixed clips, one per decode path: 44.1 kHz stereo WAV (resampled), 22.05 kHz mono
    FLAC (not resampled), 48 kHz stereo MP3 (mpg123, resampled)."""
    rng = np.random.default_rng(20261207)
    out = {}
    for name, sr, channels, fmt, subtype in (("wav", 44100, 2, "WAV", "PCM_16"), ("flac", 22050, 1, "FLAC", "PCM_16"),
                                             ("mp3", 48000, 2, "MP3", "MPEG_LAYER_III")):
        t = np.arange(int(sr * 3.0)) / sr
        tone = 0.3 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 2.0 * t))
        y = np.stack([tone + 0.05 * rng.standard_normal(t.size) for _ in range(channels)], axis=1).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, y, sr, format=fmt, subtype=subtype)
        out[name] = buf.getvalue()
    return out


# SHA-256 of the float16 mel bytes of each reference clip, as the stage wrote them before its
# transport and shard writer changed (computed at commit 2b3e925 with the pinned numpy, scipy,
# soxr and libsndfile): the spectrograms every published catalog holds must not move.
REFERENCE_MEL_SHA256 = {
    "wav": "f3944cfa79717111cc1f2f6181587d8d4a0dd9ec89b555f43c208cb1fee76d11",
    "flac": "aef7965297e00b06a565ee31ca2aa269662c5df3f715e54f13d9f0cf016303f6",
    "mp3": "90d5ae1b675afce95316154d63ffd963badcfa9bf550c009f0b637b6ef427879",
}


def test_the_job_writes_todays_spectrograms_byte_for_byte(s3_storage, tmp_path, spark):
    import hashlib

    from deepcontent.audio.features import compute_log_mel

    storage = s3_storage
    cfg = _catalog(storage, tmp_path, spark, songs=11, **{
        "spectrograms.compute_fn": "deepcontent.audio.features:compute_log_mel"})
    tracks = storage.read_dataset(storage.uri(TRACKS)).to_pylist()
    clips = _reference_clips()
    for row, data in zip(tracks, clips.values()):
        storage.write_bytes(row["audio_uri"], data)
    result = run_stage("spectrograms", cfg, storage, spark)
    assert result.counts["computed"] == 11

    rows = {r["track_id"]: r for r in read_spectrograms(storage).to_pylist()}
    for row, name in zip(tracks, clips):
        assert hashlib.sha256(rows[row["track_id"]]["mel"]).hexdigest() == REFERENCE_MEL_SHA256[name], name
    settings = cfg.spectrograms.mel_settings()
    for row in tracks[len(clips):]:  # the generated MP3s: what the pure function computes in-process
        expected = compute_log_mel(storage.read_bytes(row["audio_uri"]), settings=settings)
        got = rows[row["track_id"]]
        assert got["mel"] == expected["mel"].tobytes() and got["n_frames"] == expected["n_frames"]
        assert got["audio_sha256"] == expected["audio_sha256"]

    # Where each clip's time went, summed over clips, in the run's manifest.
    manifest = storage.read_json(storage.uri("runs", "spectrograms", f"{result.run_id}.json"))
    costs = {k: v for k, v in manifest["timings_s"].items() if k.startswith("clip_")}
    assert set(costs) == {"clip_read", "clip_decode", "clip_resample", "clip_mel", "clip_ipc", "clip_write"}
    assert costs["clip_decode"] > 0 and costs["clip_mel"] > 0 and costs["clip_write"] > 0


def spectrogram_row(track_id: str, result: dict, settings_key: str) -> dict:
    """The contract row of one result, built field by field: the reference the stage's
    table builder is checked against."""
    def blob(a):
        return None if a is None else np.ascontiguousarray(a, dtype=np.float16).tobytes()

    return {
        "track_id": track_id, "audio_sha256": result["audio_sha256"], "sample_rate": int(result["sample_rate"]),
        "hop_length": int(result["hop_length"]), "n_mels": int(result["n_mels"]), "n_frames": int(result["n_frames"]),
        "mel": blob(result["mel"]), "harmonic": blob(result.get("harmonic")), "percussive": blob(result.get("percussive")),
        "settings_key": settings_key,
    }


def test_spectrogram_table_equals_the_rows_built_one_by_one():
    from deepcontent.stages.spectrograms import spectrogram_table

    rng = np.random.default_rng(3)
    results = []
    for i in range(19):  # more than two row groups, clips of different lengths
        mel = rng.random((4, 5 + i), dtype=np.float32).astype(np.float16)
        r = {"audio_sha256": f"{i:064x}", "sample_rate": 22050, "hop_length": 512, "n_mels": 4, "n_frames": 5 + i,
             "mel": mel}
        if i % 3 == 0:  # HPSS parts on some rows only: nulls elsewhere
            r["harmonic"], r["percussive"] = mel * 0.5, mel * 0.25
        results.append((f"T{i:03d}", r))
    schema = datasets.SPECTROGRAMS.schema
    expected = pa.Table.from_pylist([spectrogram_row(t, r, "key") for t, r in results], schema=schema)
    got = spectrogram_table(results, "key", schema=schema)
    assert got.schema == expected.schema and got.to_pylist() == expected.to_pylist()
    none = spectrogram_table([(t, {k: v for k, v in r.items() if k not in ("harmonic", "percussive")})
                              for t, r in results], "key", schema=schema)
    assert none["harmonic"].null_count == 19 and none["mel"].to_pylist() == expected["mel"].to_pylist()


def test_task_groups_are_even_and_fill_every_core():
    from deepcontent.stages.spectrograms import task_groups

    todo = list(range(1000))
    groups = task_groups(todo, clips_per_task=64, slots=2)
    assert len(groups) == 16 and {len(g) for g in groups} == {62, 63}  # not 15 × 64 + 40
    assert [x for g in groups for x in g] == todo
    assert [len(g) for g in task_groups(list(range(200)), clips_per_task=64, slots=2)] == [50] * 4
    assert [len(g) for g in task_groups(list(range(5)), clips_per_task=64, slots=8)] == [1] * 5
    assert task_groups([], clips_per_task=64, slots=2) == []
    assert [len(g) for g in task_groups(list(range(130)), clips_per_task=64, slots=1)] == [43, 43, 44]
