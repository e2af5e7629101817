"""The log-mel front end on real encoded audio: agreement with librosa, shapes and dtypes, every
AudioError reason from a real input, content sniffing, partial decodes, settings keys and HPSS."""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import replace

import librosa
import numpy as np
import pytest
import scipy.sparse
import soundfile as sf

from deepcontent.audio.features import (
    AUDIO_ERROR_REASONS,
    AudioError,
    MelSettings,
    compute_log_mel,
    decode_mono,
    hpss_log_mels,
    log_mel,
    mel_filterbank,
    naive_log_mel,
    power_spectrogram,
    resample,
)
from deepcontent.synth.attributes import SongAttributes
from deepcontent.synth.audio import encode_audio, render_clip

SR_IN = 44100
SETTINGS = MelSettings()
# float32 log-mel vs librosa: measured max |diff| ~1.5e-5 on values in [0, ~16].
ATOL_F32 = 1e-4
# float16 output: rounding adds at most 2^-11 relative (half an ulp).
RTOL_F16 = 2.0**-10

DRUMS = SongAttributes(
    genre="rock", tempo_bpm=124.0, key=4, mode="minor", brightness=0.6, rhythm_density=0.8,
    percussion=0.95, distortion=0.3, timbre=0, swing=0.0,
)
NO_DRUMS = replace(DRUMS, genre="classical", percussion=0.0)


@pytest.fixture(scope="module")
def stereo() -> np.ndarray:
    return render_clip(DRUMS, seconds=12.0, sample_rate=SR_IN, seed=7)


@pytest.fixture(scope="module")
def clips(stereo) -> dict[str, bytes]:
    return {fmt: encode_audio(stereo, sample_rate=SR_IN, fmt=fmt) for fmt in ("mp3", "ogg", "wav")}


def librosa_log_mel(y: np.ndarray, settings: MelSettings = SETTINGS) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=y, sr=settings.sample_rate, n_fft=settings.n_fft, hop_length=settings.hop_length,
        n_mels=settings.n_mels, fmin=settings.fmin, fmax=settings.fmax, power=2.0,
    )
    return np.log1p(settings.compression * mel)


def reason_of(data: bytes, settings: MelSettings = SETTINGS) -> str:
    with pytest.raises(AudioError) as info:
        compute_log_mel(data, settings=settings)
    assert info.value.reason in AUDIO_ERROR_REASONS
    return info.value.reason


# -- agreement with librosa ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp3", "wav"])
def test_log_mel_matches_librosa(clips, fmt):
    y, sr = decode_mono(clips[fmt], max_seconds=600)
    y = resample(y, orig_sr=sr, target_sr=SETTINGS.sample_rate)
    ours = log_mel(y, settings=SETTINGS)
    ref = librosa_log_mel(y)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert ref.max() > 10.0  # real music: the compressed values span O(1)-O(15)
    assert float(np.abs(ours - ref).max()) < ATOL_F32


@pytest.mark.parametrize("fmt", ["mp3", "wav"])
def test_pipeline_matches_naive_librosa_path(clips, fmt):
    out = compute_log_mel(clips[fmt], settings=SETTINGS)
    ref = naive_log_mel(clips[fmt], settings=SETTINGS)  # librosa.load + melspectrogram + log1p
    mel = out["mel"].astype(np.float32)
    assert mel.shape == ref.shape
    np.testing.assert_allclose(mel, ref, rtol=RTOL_F16, atol=ATOL_F32)


def test_decode_downmix_equals_channel_mean(clips):
    y, sr = decode_mono(clips["wav"], max_seconds=600)
    full, sr_ref = sf.read(io.BytesIO(clips["wav"]), dtype="float32", always_2d=True)
    assert sr == sr_ref == SR_IN and y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, full.mean(axis=1, dtype=np.float32))


def test_power_spectrogram_matches_librosa_stft():
    rng = np.random.default_rng(1)
    for n in (1024, 5000, 22050 + 7):
        y = rng.standard_normal(n).astype(np.float32)
        S = power_spectrogram(y, n_fft=1024, hop_length=512)
        ref = np.abs(librosa.stft(y, n_fft=1024, hop_length=512)) ** 2
        assert S.shape == ref.shape == (513, 1 + n // 512)
        assert S.dtype == np.float32 and S.flags.c_contiguous
        np.testing.assert_allclose(S, ref, rtol=1e-3, atol=1e-5 * ref.max())


def test_mel_filterbank_is_librosas_sparse_and_cached():
    fb = mel_filterbank(SETTINGS)
    assert scipy.sparse.isspmatrix_csr(fb) and fb.dtype == np.float32 and fb.shape == (128, 513)
    np.testing.assert_array_equal(fb.toarray(), librosa.filters.mel(sr=22050, n_fft=1024, n_mels=128))
    assert mel_filterbank(MelSettings(hpss=True)) is fb  # same filterbank, built once
    assert not fb.data.flags.writeable
    other = mel_filterbank(MelSettings(n_mels=64, fmin=30.0, fmax=8000.0))
    np.testing.assert_array_equal(
        other.toarray(), librosa.filters.mel(sr=22050, n_fft=1024, n_mels=64, fmin=30.0, fmax=8000.0)
    )


# -- output contract ------------------------------------------------------------------------------


def test_compute_log_mel_output_contract(clips):
    data = clips["mp3"]
    out = compute_log_mel(data, settings=SETTINGS)
    mel = out["mel"]
    assert mel.dtype == np.float16 and mel.flags.c_contiguous
    assert np.isfinite(mel).all() and mel.min() >= 0.0 and mel.max() < 25.0
    y, sr = decode_mono(data, max_seconds=600)
    n = len(resample(y, orig_sr=sr, target_sr=22050))
    assert mel.shape == (128, 1 + n // 512) and out["n_frames"] == mel.shape[1]
    assert abs(out["n_frames"] - 12.0 * 22050 / 512) < 5
    assert (out["sample_rate"], out["hop_length"], out["n_mels"]) == (22050, 512, 128)
    assert out["audio_sha256"] == hashlib.sha256(data).hexdigest()
    assert out["settings_key"] == SETTINGS.key() and out["source_sample_rate"] == SR_IN
    assert "harmonic" not in out and "percussive" not in out


def test_frame_count_is_one_plus_len_over_hop():
    rng = np.random.default_rng(2)
    for n in (1024, 1025, 1536, 22050, 30 * 22050):
        y = rng.standard_normal(n).astype(np.float32) * 0.1
        assert log_mel(y, settings=SETTINGS).shape == (128, 1 + n // 512)


# -- content sniffing and partial decodes -----------------------------------------------------


def test_ogg_bytes_decode_whatever_the_caller_expected(clips):
    ogg = compute_log_mel(clips["ogg"], settings=SETTINGS)["mel"].astype(np.float32)
    wav = compute_log_mel(clips["wav"], settings=SETTINGS)["mel"].astype(np.float32)
    frames = min(ogg.shape[1], wav.shape[1])
    assert abs(ogg.shape[1] - wav.shape[1]) <= 2
    # A lossy codec, not a different song: close to the PCM original on average.
    assert float(np.abs(ogg[:, :frames] - wav[:, :frames]).mean()) < 0.5


def test_truncated_mp3_decodes_partially(clips):
    data = clips["mp3"]
    full, _ = decode_mono(data, max_seconds=600)
    part, sr = decode_mono(data[: int(0.3 * len(data))], max_seconds=600)
    assert sr == SR_IN and 0.2 * len(full) < len(part) < 0.4 * len(full)
    np.testing.assert_array_equal(part, full[: len(part)])  # what decodes is the real audio
    out = compute_log_mel(data[: int(0.3 * len(data))], settings=SETTINGS)
    assert out["n_frames"] < 0.4 * compute_log_mel(data, settings=SETTINGS)["n_frames"]
    assert np.isfinite(out["mel"]).all()


# -- every AudioError reason from a real input -----------------------------------------------------


def test_empty_bytes():
    assert reason_of(b"") == "empty"


def test_random_bytes_are_undecodable():
    assert reason_of(np.random.default_rng(3).bytes(20_000)) == "undecodable"


def test_first_100_bytes_of_an_mp3_are_undecodable(clips):
    assert reason_of(clips["mp3"][:100]) == "undecodable"


def test_all_zero_wav_is_silent():
    data = encode_audio(np.zeros((5 * SR_IN, 2), np.float32), sample_rate=SR_IN, fmt="wav")
    with pytest.raises(AudioError, match="RMS") as info:
        compute_log_mel(data, settings=SETTINGS)
    assert info.value.reason == "silent"


def test_too_short_clip():
    noise = np.random.default_rng(4).standard_normal(1500).astype(np.float32) * 0.1  # 750 samples at 22.05 kHz
    data = encode_audio(noise, sample_rate=SR_IN, fmt="wav")
    with pytest.raises(AudioError, match="1500 samples") as info:
        compute_log_mel(data, settings=SETTINGS)
    assert info.value.reason == "too_short"


@pytest.fixture(scope="module")
def long_flac() -> bytes:
    """700 s of 8 kHz mono: one second of noise, then silence (compresses to a few tens of kB)."""
    sr = 8000
    x = np.zeros(700 * sr, np.float32)
    x[:sr] = np.random.default_rng(5).standard_normal(sr).astype(np.float32) * 0.1
    return encode_audio(x, sample_rate=sr, fmt="flac")


def test_too_long_from_a_real_long_file(long_flac):
    with pytest.raises(AudioError, match="700.0 s") as info:
        compute_log_mel(long_flac, settings=SETTINGS)
    assert info.value.reason == "too_long"
    # Within the limit it is accepted.
    out = compute_log_mel(long_flac, settings=replace(SETTINGS, max_seconds=800.0))
    assert out["n_frames"] == 1 + (700 * 22050) // 512


def test_too_long_is_decided_from_the_header_before_decoding(long_flac):
    # Only the first 4 kB: the header still says 700 s, the bytes hold well under a second of
    # audio. Rejection therefore comes from the header, not from decoding the samples.
    head = long_flac[:4096]
    with sf.SoundFile(io.BytesIO(head)) as f:
        assert f.frames == 700 * 8000
    with pytest.raises(AudioError) as info:
        decode_mono(head, max_seconds=600.0)
    assert info.value.reason == "too_long"


def test_too_long_with_a_small_limit(clips):
    with pytest.raises(AudioError, match="max_seconds=5") as info:
        compute_log_mel(clips["mp3"], settings=replace(SETTINGS, max_seconds=5.0))
    assert info.value.reason == "too_long"


def test_audio_error_is_a_picklable_value_error():
    err = AudioError("silent", "RMS 0 is below the floor")
    assert isinstance(err, ValueError) and err.reason == "silent"
    back = pickle.loads(pickle.dumps(err))
    assert back.reason == "silent" and str(back) == str(err)
    with pytest.raises(ValueError, match="'loud'"):
        AudioError("loud", "not a reason")


def test_non_bytes_input_is_a_type_error():
    with pytest.raises(TypeError, match="str"):
        compute_log_mel("clip.mp3", settings=SETTINGS)


# -- resampling -----------------------------------------------------------------------------------


def test_resample_is_a_no_op_at_equal_rates():
    y = np.random.default_rng(6).standard_normal(1000).astype(np.float32)
    assert resample(y, orig_sr=22050, target_sr=22050) is y


def test_resample_keeps_a_tone_and_halves_the_length():
    t = np.arange(SR_IN) / SR_IN
    y = np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    out = resample(y, orig_sr=SR_IN, target_sr=22050)
    assert out.dtype == np.float32 and len(out) == 22050
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) - 1000) <= 1  # 1 Hz bins over one second
    with pytest.raises(ValueError, match="-5"):
        resample(y, orig_sr=-5, target_sr=22050)


# -- settings --------------------------------------------------------------------------------------


def test_settings_key_is_stable_and_tracks_the_output():
    key = MelSettings().key()
    assert key == MelSettings().key() == "mel-9c7613aa773df258"  # pinned: a change means stale data
    assert MelSettings(fmax=11025.0).key() == key  # same filterbank
    assert MelSettings(max_seconds=30.0).key() == key  # decides acceptance, not the output
    changed = [
        MelSettings(sample_rate=16000), MelSettings(n_fft=2048), MelSettings(hop_length=256),
        MelSettings(n_mels=96), MelSettings(fmin=20.0), MelSettings(fmax=8000.0),
        MelSettings(compression=1.0), MelSettings(hpss=True),
    ]
    keys = {s.key() for s in changed}
    assert len(keys) == len(changed) and key not in keys


@pytest.mark.parametrize(
    "kwargs, value",
    [({"n_fft": 0}, "0"), ({"hop_length": 1.5}, "1.5"), ({"fmax": 20000.0}, "20000.0"),
     ({"compression": -1.0}, "-1.0"), ({"max_seconds": 0}, "0"), ({"sample_rate": "22050"}, "'22050'")],
)
def test_settings_validation_names_the_value(kwargs, value):
    with pytest.raises(ValueError, match=value):
        MelSettings(**kwargs)


# -- HPSS ------------------------------------------------------------------------------------------


def _mono22(attrs: SongAttributes, seconds: float = 8.0) -> np.ndarray:
    data = encode_audio(render_clip(attrs, seconds=seconds, sample_rate=SR_IN, seed=11), sample_rate=SR_IN, fmt="mp3")
    y, sr = decode_mono(data, max_seconds=600)
    return resample(y, orig_sr=sr, target_sr=22050)


def test_hpss_matches_librosa_decompose_hpss():
    y = _mono22(DRUMS, seconds=4.0)
    harm, perc = hpss_log_mels(y, settings=SETTINGS)
    D = librosa.stft(y, n_fft=1024, hop_length=512)
    H, P = librosa.decompose.hpss(D, kernel_size=31, power=2.0, margin=1.0)
    fb = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=128)
    ref_h = np.log1p(1e4 * (fb @ np.abs(H) ** 2))
    ref_p = np.log1p(1e4 * (fb @ np.abs(P) ** 2))
    assert harm.shape == perc.shape == ref_h.shape
    assert float(np.abs(harm - ref_h).max()) < 1e-2 and float(np.median(np.abs(harm - ref_h))) < 1e-4
    assert float(np.abs(perc - ref_p).max()) < 1e-2 and float(np.median(np.abs(perc - ref_p))) < 1e-4


def test_hpss_outputs_and_percussive_energy():
    """Same song with and without its drum kit: the percussive share of the (linear) mel power
    rises, most clearly in the upper half of the bands where snare and hi-hat live (the kick is
    a decaying 45-155 Hz tone, which HPSS rightly calls largely harmonic)."""
    shares = {}
    for name, attrs in (("drums", DRUMS), ("none", NO_DRUMS)):
        y = _mono22(attrs)
        harm, perc = hpss_log_mels(y, settings=SETTINGS)
        full = log_mel(y, settings=SETTINGS)
        assert harm.shape == perc.shape == full.shape and harm.dtype == perc.dtype == np.float32
        assert np.isfinite(harm).all() and np.isfinite(perc).all()
        # Soft masks split the power, so neither part exceeds the original by more than rounding.
        assert (harm <= full + 1e-3).all() and (perc <= full + 1e-3).all()
        e_h, e_p = np.expm1(harm.astype(np.float64)), np.expm1(perc.astype(np.float64))
        assert e_h.sum() > 0 and e_p.sum() > 0
        shares[name] = (e_p.sum() / (e_h.sum() + e_p.sum()), e_p[64:].sum() / (e_h[64:].sum() + e_p[64:].sum()))
    # Measured: 0.078 vs 0.059 over all bands, 0.25 vs 0.13 over the upper 64.
    assert shares["drums"][0] > 1.15 * shares["none"][0], shares
    assert shares["drums"][1] > 1.5 * shares["none"][1], shares


def test_compute_log_mel_with_hpss(clips):
    out = compute_log_mel(clips["mp3"], settings=MelSettings(hpss=True))
    for name in ("mel", "harmonic", "percussive"):
        arr = out[name]
        assert arr.dtype == np.float16 and arr.shape == (128, out["n_frames"]) and arr.flags.c_contiguous
        assert np.isfinite(arr).all()
    assert out["settings_key"] == MelSettings(hpss=True).key() != SETTINGS.key()
    plain = compute_log_mel(clips["mp3"], settings=SETTINGS)["mel"].astype(np.float32)
    np.testing.assert_allclose(out["mel"].astype(np.float32), plain, rtol=RTOL_F16, atol=ATOL_F32)
    y, sr = decode_mono(clips["mp3"], max_seconds=600)
    harm, perc = hpss_log_mels(resample(y, orig_sr=sr, target_sr=22050), settings=SETTINGS)
    np.testing.assert_array_equal(out["harmonic"], harm.astype(np.float16))
    np.testing.assert_array_equal(out["percussive"], perc.astype(np.float16))
