"""Fixed-feature baselines: MFCCs from stored log-mels, bag of words, spherical K-means, regressors."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from deepcontent.models.baselines import (
    BagOfWords,
    SphericalKMeansFeatures,
    fit_linear,
    fit_mlp,
    mfcc_frames,
    spherical_kmeans,
)
from deepcontent.train.losses import nmse

SR = 22050


@pytest.fixture(scope="module")
def mel_power():
    """librosa's mel power of 3 s of a rich synthetic signal (tones, noise bursts, silence)."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    y = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1375 * t) * (t % 0.5 < 0.25)
    y += 0.05 * rng.standard_normal(t.size) * (t % 0.3 < 0.05)
    y[-SR // 4 :] = 0.0  # a silent tail exercises the top_db floor
    return librosa.feature.melspectrogram(y=y.astype(np.float32), sr=SR, n_fft=1024, hop_length=512, n_mels=128, power=2.0)


def librosa_reference(S: np.ndarray) -> np.ndarray:
    m = librosa.feature.mfcc(S=librosa.power_to_db(S), n_mfcc=13)
    return np.concatenate([m, librosa.feature.delta(m), librosa.feature.delta(m, order=2)]).T


def test_mfcc_frames_match_librosa_on_the_same_mel_power(mel_power):
    log_mel = np.log1p(1e4 * mel_power.astype(np.float64)).astype(np.float32)
    ours = mfcc_frames(log_mel)
    ref = librosa_reference(mel_power.astype(np.float64))
    assert ours.shape == (mel_power.shape[1], 39) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)


def test_mfcc_frames_from_float16_storage_stay_close(mel_power):
    log_mel = np.log1p(1e4 * mel_power).astype(np.float16)  # what the spectrogram stage stores
    ours = mfcc_frames(log_mel)
    ref = librosa_reference(mel_power.astype(np.float64))
    # float16 keeps ~3 significant digits of log(1 + C·S): ~0.03 dB per band, summed by the DCT.
    assert np.abs(ours[:, :13] - ref[:, :13]).max() < 0.5
    assert np.abs(ours - ref).mean() < 0.05


def test_mfcc_frames_short_clips_and_errors():
    assert mfcc_frames(np.ones((128, 5), dtype=np.float16)).shape == (5, 39)  # delta width shrinks to 5
    two = mfcc_frames(np.ones((128, 2)))
    assert two.shape == (2, 39) and (two[:, 13:] == 0).all()
    assert mfcc_frames(np.ones((40, 10)), n_mfcc=20).shape == (10, 60)
    with pytest.raises(ValueError, match="n_mfcc=20 exceeds the 16"):
        mfcc_frames(np.ones((16, 10)), n_mfcc=20)
    with pytest.raises(ValueError, match=r"shape \(128,\)"):
        mfcc_frames(np.ones(128))
    with pytest.raises(ValueError, match="delta_width must be odd, got 4"):
        mfcc_frames(np.ones((128, 10)), delta_width=4)


# -- bag of words -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_clips():
    """Twelve random log-mel-like clips of varying length, in three loudness/brightness groups."""
    rng = np.random.default_rng(1)
    clips = []
    for i in range(12):
        t = int(rng.integers(60, 120))
        tilt = np.linspace(1.0, 0.2 + 0.4 * (i % 3), 128)[:, None]
        clips.append((rng.gamma(2.0, 1.5, size=(128, t)) * tilt).astype(np.float16))
    return clips


def test_bag_of_words_shapes_and_histograms(small_clips):
    bow = BagOfWords(n_words=16, max_frames=600, seed=0).fit(small_clips)
    hist = bow.histograms(small_clips)
    assert hist.shape == (12, 16)
    np.testing.assert_allclose(hist.sum(axis=1), 1.0, rtol=1e-6)
    feats = bow.transform(small_clips)
    assert feats.shape == (12, bow.n_components_) and feats.dtype == np.float32
    assert 1 <= bow.n_components_ <= 12
    assert bow.pca_.explained_variance_ratio_.sum() >= 0.95
    assert bow.transform(small_clips[:2]).shape == (2, bow.n_components_)


def test_bag_of_words_is_deterministic_for_a_seed(small_clips):
    a = BagOfWords(n_words=16, max_frames=600, seed=3).fit_transform(small_clips)
    b = BagOfWords(n_words=16, max_frames=600, seed=3).fit_transform(small_clips)
    np.testing.assert_array_equal(a, b)


def test_bag_of_words_on_ready_frames_without_pca():
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(40, 5)) + (i % 2) * 4 for i in range(6)]
    bow = BagOfWords(n_words=4, features="frames", variance=None, seed=0).fit(frames)
    h = bow.transform(frames)
    assert h.shape == (6, 4) and bow.n_components_ == 4
    # the two well-separated groups use disjoint words
    assert (np.minimum(h[0], h[1]) == 0).all()


def test_bag_of_words_errors(small_clips):
    with pytest.raises(ValueError, match="only 24 frames to fit n_words=64"):
        BagOfWords(n_words=64, max_frames=24).fit(small_clips)
    with pytest.raises(RuntimeError, match="not fitted"):
        BagOfWords(n_words=4).transform(small_clips)
    with pytest.raises(ValueError, match="features must be 'mfcc' or 'frames', got 'raw'"):
        BagOfWords(features="raw")


# -- spherical K-means ------------------------------------------------------------------------


def test_spherical_kmeans_unit_centroids_and_empty_cluster_reseeding():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 10))
    # 95 copies of one direction: the random seeding is bound to pick it several times, which
    # leaves duplicate centroids without points until they are re-seeded.
    data = np.concatenate([np.repeat(distinct[:1], 95, axis=0), distinct[1:]])
    c = spherical_kmeans(data, n_centroids=6, n_iter=20, seed=0)
    assert c.shape == (6, 10)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    unit = distinct / np.linalg.norm(distinct, axis=1, keepdims=True)
    np.testing.assert_allclose(np.sort((unit @ c.T).max(axis=1)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="5 rows cannot seed n_centroids=6"):
        spherical_kmeans(distinct[:5], n_centroids=6)


def test_spherical_kmeans_features_shapes_and_encoding(small_clips):
    skm = SphericalKMeansFeatures(32, max_windows=2000, pool_frames=20, seed=0).fit(small_clips)
    d = 128 * 4
    assert skm.mean_.shape == (d,)
    assert skm.whitening_.shape[0] == d and skm.whitening_.shape[1] == skm.centroids_.shape[1]
    np.testing.assert_allclose(np.linalg.norm(skm.centroids_, axis=1), 1.0, rtol=1e-5)
    assert skm.projection_.shape == (d, 32)
    clip = small_clips[0].astype(np.float32)
    acts = skm.encode(clip)
    assert acts.shape == (clip.shape[1] - 3, 32)
    # the convolution equals whitening each flattened (band-major) window, then dot products
    t = 17
    window = clip[:, t : t + 4].reshape(-1)
    expected = ((window - skm.mean_) @ skm.whitening_) @ skm.centroids_.T
    np.testing.assert_allclose(acts[t], expected, rtol=1e-3, atol=1e-3)
    feats = skm.transform(small_clips)
    assert feats.shape == (12, 32) and feats.dtype == np.float32
    # max over groups of 20 windows, then the mean (a trailing group under 10 windows dropped)
    n = acts.shape[0]
    starts = list(range(0, n, 20))
    if n - starts[-1] < 10:
        starts.pop()
    groups = [acts[s : s + 20].max(axis=0) for s in starts]
    np.testing.assert_allclose(feats[0], np.mean(groups, axis=0), rtol=1e-5, atol=1e-5)


def test_spherical_kmeans_features_deterministic_and_short_clips(small_clips):
    a = SphericalKMeansFeatures(16, max_windows=1000, seed=4).fit_transform(small_clips)
    b = SphericalKMeansFeatures(16, max_windows=1000, seed=4).fit_transform(small_clips)
    np.testing.assert_array_equal(a, b)
    skm = SphericalKMeansFeatures(16, max_windows=1000, seed=4).fit(small_clips)
    assert skm.transform([small_clips[0][:, :2]]).shape == (1, 16)  # padded to one window
    with pytest.raises(ValueError, match="64 bands"):
        skm.encode(np.ones((64, 30)))


# -- regressors -------------------------------------------------------------------------------


def test_fit_linear_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * [1, 10, 0.1, 1, 5, 2] + 3
    w = rng.normal(size=(6, 4))
    y = x @ w + [1, -2, 0, 0.5]
    exact = fit_linear(x, y, l2=0.0)
    np.testing.assert_allclose(exact.predict(x), y, atol=1e-3)
    np.testing.assert_allclose(exact.weights, w, atol=1e-6)
    ridge = fit_linear(x, y, l2=1e-3)
    assert nmse(ridge.predict(x), y) < 1e-2
    heavy = fit_linear(x, y, l2=1e3)
    assert nmse(heavy.predict(x), y) > nmse(ridge.predict(x), y)
    with pytest.raises(ValueError, match=r"\(200, 6\) and \(199, 4\)"):
        fit_linear(x, y[:-1])
    with pytest.raises(ValueError, match=r"\(n, 6\), got \(3, 5\)"):
        exact.predict(np.zeros((3, 5)))


def test_fit_mlp_learns_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 5))
    y = np.stack([np.tanh(x[:, 0] * x[:, 1]), np.abs(x[:, 2])], axis=1)
    a = fit_mlp(x, y, hidden=64, epochs=30, lr=3e-3, seed=1)
    b = fit_mlp(x, y, hidden=64, epochs=30, lr=3e-3, seed=1)
    pa = a.predict(x)
    assert pa.shape == (256, 2) and pa.dtype == np.float32
    np.testing.assert_array_equal(pa, b.predict(x))
    assert nmse(pa, y) < 0.2  # linear regression gets ~0.98 here
    assert nmse(pa, y) < nmse(fit_linear(x, y).predict(x), y)
    assert a.embed(x).shape == (256, 64)
    assert (a.embed(x) >= 0).all()
