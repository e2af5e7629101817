"""The synthesiser renders valid stereo audio, encodes to every catalog format, and every
attribute it is given is measurable in the result (brightness, tempo, percussion, genre)."""

from __future__ import annotations

from dataclasses import replace

import librosa
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from deepcontent.synth.attributes import N_TIMBRES, SongAttributes, sample_attributes
from deepcontent.synth.audio import (
    FORMAT_EXTENSIONS,
    TIMBRE_NAMES,
    decode_audio_bytes,
    encode_audio,
    render_clip,
)

SR = 22050  # half rate keeps the suite fast; the synthesiser is rate-agnostic

BASE = SongAttributes(
    genre="pop",
    tempo_bpm=110.0,
    key=2,
    mode="major",
    brightness=0.5,
    rhythm_density=0.45,
    percussion=0.6,
    distortion=0.1,
    timbre=2,
    swing=0.0,
)


def mono(audio: np.ndarray) -> np.ndarray:
    return audio.mean(axis=1)


# -- basic contract ----------------------------------------------------------------------------


def test_clip_shape_dtype_and_level():
    audio = render_clip(BASE, seconds=6.0, sample_rate=SR, seed=0)
    assert audio.shape == (6 * SR, 2)
    assert audio.dtype == np.float32
    assert np.all(np.isfinite(audio))
    peak = np.max(np.abs(audio))
    assert peak <= 1.0
    assert peak == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("seconds, sample_rate", [(1.2345, 44100), (0.5, 8000), (7.0, 22050)])
def test_length_is_rounded_seconds_times_rate(seconds, sample_rate):
    audio = render_clip(BASE, seconds=seconds, sample_rate=sample_rate, seed=3)
    assert audio.shape == (round(seconds * sample_rate), 2)


@pytest.mark.parametrize("genre", ["classical", "metal", "reggae"])
def test_no_silent_stretches(genre):
    # Every second of the clip carries sound, including the drumless, sparse classical prior.
    attrs = sample_attributes(genre, np.random.default_rng(5))
    audio = mono(render_clip(attrs, seconds=8.0, sample_rate=SR, seed=1))
    rms_per_second = np.sqrt(np.mean(audio.reshape(8, SR) ** 2, axis=1))
    assert rms_per_second.min() > 0.02, rms_per_second


def test_deterministic_per_seed():
    a = render_clip(BASE, seconds=4.0, sample_rate=SR, seed=11)
    b = render_clip(BASE, seconds=4.0, sample_rate=SR, seed=11)
    c = render_clip(BASE, seconds=4.0, sample_rate=SR, seed=12)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)


def test_stereo_is_spread_but_coherent():
    audio = render_clip(BASE, seconds=6.0, sample_rate=SR, seed=2)
    left, right = audio[:, 0], audio[:, 1]
    assert not np.allclose(left, right, atol=1e-3)
    assert np.corrcoef(left, right)[0, 1] > 0.5


def test_every_timbre_renders():
    assert len(TIMBRE_NAMES) == N_TIMBRES
    spectra = []
    for timbre in range(N_TIMBRES):
        # No drums, no chords to speak of: the average spectrum is mostly bass + lead.
        attrs = replace(BASE, timbre=timbre, percussion=0.0, brightness=0.67)
        audio = mono(render_clip(attrs, seconds=4.0, sample_rate=SR, seed=4))
        assert np.all(np.isfinite(audio)) and np.std(audio) > 0.02
        spectra.append(librosa.power_to_db(librosa.feature.melspectrogram(y=audio, sr=SR).mean(axis=1)))
    spectra = np.array(spectra)
    # Same notes, same seed: only the lead's harmonic recipe differs, and it shows.
    for i in range(N_TIMBRES):
        for j in range(i + 1, N_TIMBRES):
            assert np.mean(np.abs(spectra[i] - spectra[j])) > 2.0, (TIMBRE_NAMES[i], TIMBRE_NAMES[j])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seconds": 0.0}, "seconds=0.0"),
        ({"seconds": float("nan")}, "seconds=nan"),
        ({"sample_rate": 100}, "sample_rate=100"),
        ({"attrs": replace(BASE, timbre=N_TIMBRES)}, f"timbre={N_TIMBRES}"),
        ({"attrs": replace(BASE, brightness=1.5)}, "brightness=1.5"),
        ({"attrs": replace(BASE, mode="dorian")}, "mode='dorian'"),
        ({"attrs": replace(BASE, key=12)}, "key=12"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"attrs": BASE, "seconds": 1.0, "sample_rate": SR, "seed": 0} | kwargs
    attrs = args.pop("attrs")
    with pytest.raises(ValueError, match=match):
        render_clip(attrs, **args)


# -- encoding ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_clip() -> np.ndarray:
    return render_clip(BASE, seconds=3.0, sample_rate=SR, seed=6)


@pytest.mark.parametrize("fmt", sorted(FORMAT_EXTENSIONS))
def test_encode_decode_round_trip(fmt, short_clip):
    data = encode_audio(short_clip, sample_rate=SR, fmt=fmt)
    assert isinstance(data, bytes) and len(data) > 1000
    decoded, sample_rate = decode_audio_bytes(data)
    assert sample_rate == SR
    assert decoded.dtype == np.float32
    assert decoded.shape[1] == 2
    # Lossy codecs pad: MP3 adds the encoder delay plus up to a frame (~1,152 samples) of
    # padding, as every real MP3 does; 100 ms is generous.
    assert abs(decoded.shape[0] - short_clip.shape[0]) <= 0.1 * SR
    n = min(decoded.shape[0], short_clip.shape[0])
    if fmt in ("wav", "flac"):
        assert decoded.shape == short_clip.shape
        np.testing.assert_allclose(decoded, short_clip, atol=1e-4)  # 16-bit quantisation only
    else:
        # Perceptual codecs change the samples but must keep the waveform (after the codec's
        # start-up delay, found as the best-aligning lag).
        ref = short_clip[: n - 3000, 0]
        best = max(np.corrcoef(decoded[lag : lag + len(ref), 0], ref)[0, 1] for lag in range(0, 3000, 1))
        assert best > 0.9


def test_encoded_bytes_carry_their_container_signature(short_clip):
    magic = {
        "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),  # ID3 tag or an MPEG frame sync
        "ogg": (b"OggS",),
        "flac": (b"fLaC",),
        "wav": (b"RIFF",),
    }
    for fmt, prefixes in magic.items():
        assert encode_audio(short_clip, sample_rate=SR, fmt=fmt).startswith(prefixes), fmt
    assert FORMAT_EXTENSIONS == {"mp3": ".mp3", "ogg": ".ogg", "flac": ".flac", "wav": ".wav"}


def test_encode_mono_and_clips_out_of_range():
    tone = 1.5 * np.sin(2 * np.pi * 440.0 * np.arange(SR) / SR)
    decoded, _ = decode_audio_bytes(encode_audio(tone, sample_rate=SR, fmt="wav"))
    assert decoded.shape == (SR, 1)
    assert decoded.max() <= 1.0 and decoded.max() > 0.99  # clipped, not wrapped around


def test_unknown_format_is_named(short_clip):
    with pytest.raises(ValueError, match="aiff"):
        encode_audio(short_clip, sample_rate=SR, fmt="aiff")


def test_encode_rejects_non_finite():
    bad = np.zeros((100, 2), dtype=np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        encode_audio(bad, sample_rate=SR, fmt="wav")


# -- attributes are audible --------------------------------------------------------------------


@pytest.mark.parametrize("seed, timbre", [(0, 0), (1, 2), (2, 3), (3, 5), (4, 7)])
def test_brightness_raises_spectral_centroid(seed, timbre):
    centroids = []
    for brightness in (0.1, 0.9):
        attrs = replace(BASE, brightness=brightness, timbre=timbre)
        audio = mono(render_clip(attrs, seconds=6.0, sample_rate=SR, seed=seed))
        centroids.append(librosa.feature.spectral_centroid(y=audio, sr=SR).mean())
    dark, bright = centroids
    assert bright > 1.12 * dark, (dark, bright)


@pytest.mark.parametrize("bpm", [90.0, 150.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_beat_tracker_recovers_tempo(bpm, seed):
    attrs = replace(BASE, tempo_bpm=bpm, percussion=0.9, rhythm_density=0.4)
    audio = mono(render_clip(attrs, seconds=10.0, sample_rate=SR, seed=seed))
    tempo, _ = librosa.beat.beat_track(y=audio, sr=SR)
    tempo = float(np.atleast_1d(tempo)[0])
    # Beat trackers legitimately lock onto half or double time.
    assert any(abs(tempo - bpm * k) <= 0.06 * bpm * k for k in (0.5, 1.0, 2.0)), tempo


@pytest.mark.parametrize("seed, timbre", [(0, 0), (1, 2), (2, 6)])
def test_percussion_adds_onsets(seed, timbre):
    envelopes = []
    for percussion in (0.0, 0.9):
        attrs = replace(BASE, percussion=percussion, timbre=timbre)
        audio = mono(render_clip(attrs, seconds=8.0, sample_rate=SR, seed=seed))
        envelopes.append(librosa.onset.onset_strength(y=audio, sr=SR))
    dry, drummed = envelopes
    assert drummed.mean() > 1.5 * dry.mean()
    strong = np.percentile(drummed, 90)
    assert np.sum(dry > strong) < 0.5 * np.sum(drummed > strong)


def test_genres_are_separable_from_mfccs():
    genres = ("classical", "disco", "hiphop", "metal", "reggae")
    rng = np.random.default_rng(0)
    features, labels = [], []
    for label, genre in enumerate(genres):
        for _ in range(12):
            attrs = sample_attributes(genre, rng)
            audio = mono(render_clip(attrs, seconds=8.0, sample_rate=SR, seed=int(rng.integers(2**31))))
            mfcc = librosa.feature.mfcc(y=audio, sr=SR, n_mfcc=20)
            features.append(np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]))
            labels.append(label)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    accuracy = cross_val_score(model, np.array(features), np.array(labels), cv=folds).mean()
    assert accuracy >= 0.6, accuracy  # chance is 0.2
