"""Descriptors from a stored log-mel, on synthetic spectrograms with a known answer."""

import numpy as np
import pytest

from deepcontent.evaluate.descriptors import DESCRIPTORS, mel_descriptors

SR, HOP, C = 22050, 512, 1e4


def _log(power):
    return np.log1p(C * power).astype(np.float16)


def test_louder_brighter_and_more_percussive_clips_score_higher():
    n_mels, n_frames = 64, 430  # ~10 s
    # a steady low tone vs the same plus clicks every 0.5 s across all bands, 10 dB up, brighter
    tone = np.full((n_mels, n_frames), 1e-6)
    tone[8] = 1e-2
    clicks = tone * 10
    clicks[40:, :] += 1e-4
    clicks[:, ::22] += 1e-1
    a = mel_descriptors(_log(tone), sample_rate=SR, hop_length=HOP, compression=C)
    b = mel_descriptors(_log(clicks), sample_rate=SR, hop_length=HOP, compression=C)
    assert set(a) == set(DESCRIPTORS)
    assert b["loudness_db"] > a["loudness_db"] + 9
    assert b["spectral_centroid_hz"] > a["spectral_centroid_hz"]
    assert b["onset_rate"] > a["onset_rate"] and 1.0 <= b["onset_rate"] <= 3.0  # ~2 clicks per second
    assert b["harmonic_percussive_ratio_db"] < a["harmonic_percussive_ratio_db"]
    assert 60 <= b["tempo_bpm"] <= 250


def test_silence_gives_nan_not_errors_and_bad_input_is_refused():
    out = mel_descriptors(np.zeros((32, 100), np.float16), sample_rate=SR, hop_length=HOP, compression=C)
    assert all(np.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match="2-D"):
        mel_descriptors(np.zeros(10), sample_rate=SR, hop_length=HOP, compression=C)
    with pytest.raises(ValueError, match="compression"):
        mel_descriptors(np.zeros((4, 10)), sample_rate=SR, hop_length=HOP, compression=0)
