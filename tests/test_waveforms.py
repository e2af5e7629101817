"""Waveforms for the raw-audio CNN: decoded, resampled, stored in the spectrogram schema so the
train stage reads them unchanged; bad audio left out with its reason; re-runs publish nothing."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from deepcontent import datasets
from deepcontent.stages.waveforms import publish_waveforms
from support import config_for, context

AUDIO_INDEX, WAVEFORMS = datasets.AUDIO_INDEX.key, datasets.WAVEFORMS.key
INDEX_SCHEMA, SPECTROGRAM_SCHEMA = datasets.AUDIO_INDEX.schema, datasets.SPECTROGRAMS.schema


def _wav(y: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y.astype(np.float32), sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _index(storage, entries: list[tuple[str, str, str]]) -> None:
    """Publish an audio index as the spectrogram stage would: (track_id, uri, status)."""
    rows = [{"track_id": t, "audio_uri": u, "audio_size": 0, "audio_modified": None, "audio_sha256": f"sha-{t}",
             "settings_key": "k", "status": st, "detail": None, "shard": None, "run_id": "r1"} for t, u, st in entries]
    f = storage.uri(AUDIO_INDEX, "data", "r1", "part-00000.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), f)
    storage.publish(storage.uri(AUDIO_INDEX), run_id="r1", files=[f])


def test_waveforms_are_resampled_mono_in_the_spectrogram_schema(file_storage, tmp_path, spark):
    cfg = config_for(file_storage, tmp_path)
    sr = cfg.spectrograms.sample_rate
    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 220 * t), 0.5 * np.sin(2 * np.pi * 220 * t)], axis=1)
    file_storage.write_bytes(file_storage.uri("raw", "a.wav"), _wav(stereo, 44100))
    file_storage.write_bytes(file_storage.uri("raw", "b.wav"), b"RIFF but not really a wave file")
    _index(file_storage, [("TRA", file_storage.uri("raw", "a.wav"), "ok"),
                          ("TRB", file_storage.uri("raw", "b.wav"), "ok"),
                          ("TRC", file_storage.uri("raw", "c.wav"), "undecodable")])

    out = publish_waveforms(cfg, context(cfg, file_storage, spark), track_ids=["TRA", "TRB", "TRC", "TRD"])
    assert out["published"] and out["tracks"] == 1
    assert set(out["left_out"]) == {"TRB", "TRC", "TRD"}
    assert out["left_out"]["TRB"].startswith("undecodable")
    assert "no decoded audio" in out["left_out"]["TRC"] and "no decoded audio" in out["left_out"]["TRD"]

    table = file_storage.read_dataset(file_storage.uri(WAVEFORMS), schema=SPECTROGRAM_SCHEMA)
    row = table.to_pylist()[0]
    assert row["track_id"] == "TRA" and row["n_mels"] == 1 and row["hop_length"] == 1
    assert row["sample_rate"] == sr and abs(row["n_frames"] - 2 * sr) <= 2
    y = np.frombuffer(row["mel"], np.float16).astype(np.float32)
    assert y.size == row["n_frames"]
    expected = 0.5 * np.sin(2 * np.pi * 220 * np.arange(y.size) / sr)
    # the resampler's edges aside, the stored samples are the tone to float16 precision
    np.testing.assert_allclose(y[500:-500], expected[500:-500], atol=5e-3)

    again = publish_waveforms(cfg, context(cfg, file_storage, spark), track_ids=["TRD", "TRC", "TRB", "TRA"])
    assert not again["published"] and again["run_id"] == out["run_id"]
    assert again["left_out"] == out["left_out"]  # the decode failure is still reported


def test_no_decodable_track_is_an_error_naming_one(file_storage, tmp_path):
    cfg = config_for(file_storage, tmp_path)
    _index(file_storage, [])
    with pytest.raises(ValueError, match=r"none of the 1 requested tracks .*TRX"):
        publish_waveforms(cfg, context(cfg, file_storage), track_ids=["TRX"])
