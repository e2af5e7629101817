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
