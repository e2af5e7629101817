"""Random crops, gain augmentation in the compressed domain, and consecutive windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcontent.models.augment import apply_gain, consecutive_windows, random_gain, random_windows


def ramp(n_mels: int, n_frames: int, start: float = 0.0) -> np.ndarray:
    """A spectrogram whose every band holds its frame index: a crop reveals its offset."""
    return np.broadcast_to(np.arange(n_frames, dtype=np.float32) + start, (n_mels, n_frames)).copy()


def check_crops(windows, source_lengths, n_frames):
    w = np.asarray(windows)
    assert w.shape == (len(source_lengths), 8, n_frames)
    for b, t in enumerate(source_lengths):
        start = w[b, 0, 0]
        assert (w[b] == w[b, :1]).all()  # the same frames in every band
        if t >= n_frames:
            assert 0 <= start <= t - n_frames
            np.testing.assert_array_equal(w[b, 0], np.arange(start, start + n_frames))
        else:
            np.testing.assert_array_equal(w[b, 0, :t], np.arange(t))
            assert (w[b, :, t:] == 0).all()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batch_crops_stay_in_bounds(kind):
    x = np.stack([ramp(8, 50)] * 64)
    x = torch.from_numpy(x) if kind == "torch" else x
    w = random_windows(x, n_frames=20, generator=np.random.default_rng(0))
    assert isinstance(w, type(x))
    check_crops(w, [50] * 64, 20)
    starts = np.asarray(w)[:, 0, 0]
    assert len(np.unique(starts)) > 10  # offsets vary
    assert starts.min() >= 0 and starts.max() <= 30


def test_list_of_clips_of_different_lengths_crops_and_pads():
    clips = [ramp(8, 50), ramp(8, 20), ramp(8, 7), ramp(8, 21)]
    w = random_windows(clips, n_frames=20, generator=3)
    assert w.dtype == np.float32
    check_crops(w, [50, 20, 7, 21], 20)
    wt = random_windows([torch.from_numpy(c) for c in clips], n_frames=20, generator=3)
    assert isinstance(wt, torch.Tensor)
    np.testing.assert_array_equal(wt.numpy(), w)  # same seed, same crops whatever the kind


def test_short_batch_is_padded_and_offsets_cover_the_range():
    w = random_windows(np.stack([ramp(8, 10)] * 3), n_frames=16, generator=0)
    check_crops(w, [10] * 3, 16)
    # With 4 frames of slack every offset 0..4 is reachable.
    starts = random_windows(np.stack([ramp(8, 20)] * 400), n_frames=16, generator=1)[:, 0, 0]
    assert set(starts.tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_seeds_and_torch_generators_are_reproducible():
    x = torch.from_numpy(np.stack([ramp(8, 300)] * 5))
    a = random_windows(x, n_frames=130, generator=torch.Generator().manual_seed(5))
    b = random_windows(x, n_frames=130, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    check_crops(a, [300] * 5, 130)
    np.testing.assert_array_equal(random_windows(x.numpy(), n_frames=9, generator=2), random_windows(x.numpy(), n_frames=9, generator=2))


def test_random_windows_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(8, 50\)"):
        random_windows(ramp(8, 50), n_frames=10)
    with pytest.raises(ValueError, match=r"mels\[1\] has shape \(12, 50\)"):
        random_windows([ramp(8, 50), ramp(12, 50)], n_frames=10)
    with pytest.raises(ValueError, match="n_frames must be.*0"):
        random_windows([ramp(8, 50)], n_frames=0)
    with pytest.raises(ValueError, match="empty"):
        random_windows([], n_frames=10)


def test_gain_is_identity_at_zero_db():
    rng = np.random.default_rng(0)
    x = (rng.random((4, 128, 30)) * 12).astype(np.float16)
    np.testing.assert_array_equal(random_gain(x, max_db=0.0, generator=0), x)
    np.testing.assert_array_equal(apply_gain(x, gain_db=0.0), x)
    xt = torch.from_numpy(x)
    torch.testing.assert_close(random_gain(xt, max_db=0.0, generator=torch.Generator().manual_seed(0)), xt, rtol=0, atol=0)


def test_gain_scales_the_power_under_the_compression():
    rng = np.random.default_rng(1)
    power = rng.gamma(0.5, 1e-3, size=(128, 40))  # mel power, quiet to loud
    for c in (1e4, 100.0):
        x = np.log1p(c * power)
        for db in (-12.0, 6.0):
            expected = np.log1p(c * power * 10 ** (db / 10))
            np.testing.assert_allclose(apply_gain(x, gain_db=db), expected, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(apply_gain(x, gain_db=db), np.log1p(10 ** (db / 10) * np.expm1(x)), rtol=1e-10, atol=1e-12)


def test_gain_does_not_overflow_float16_and_round_trips():
    x = np.full((2, 4, 3), 15.0, dtype=np.float16)  # expm1(15) = 3.3e6 would overflow float16
    y = apply_gain(x, gain_db=20.0)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float32), 15.0 + np.log(100.0), atol=0.02)
    back = apply_gain(apply_gain(x.astype(np.float32), gain_db=7.0), gain_db=-7.0)
    np.testing.assert_allclose(back, x.astype(np.float32), atol=1e-4)


def test_random_gain_draws_one_gain_per_example_within_bounds():
    x = torch.full((50, 4, 6), 5.0)
    y = random_gain(x, max_db=10.0, generator=torch.Generator().manual_seed(0))
    # invert per example: the gain is constant over bands and frames
    assert torch.allclose(y, y[:, :1, :1].expand_as(y))
    g = torch.expm1(y[:, 0, 0].double()) / torch.expm1(torch.tensor(5.0, dtype=torch.float64))
    db = 10 * torch.log10(g)
    assert db.abs().max() <= 10.0 + 1e-3 and db.std() > 2.0
    with pytest.raises(ValueError, match="max_db.*-1"):
        random_gain(x, max_db=-1.0)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_consecutive_windows_count_and_content(kind):
    mel = ramp(8, 1292)
    m = torch.from_numpy(mel) if kind == "torch" else mel
    w = consecutive_windows(m, n_frames=130)
    assert w.shape == (9, 8, 130)  # a 30 s clip: 9 back-to-back 3 s windows, 122 frames unused
    for i in range(9):
        np.testing.assert_array_equal(np.asarray(w[i, 0]), np.arange(130 * i, 130 * (i + 1)))
    assert consecutive_windows(m, n_frames=130, hop=65).shape == (1 + (1292 - 130) // 65, 8, 130)
    tail = consecutive_windows(m, n_frames=130, cover_tail=True)
    assert tail.shape == (10, 8, 130)
    np.testing.assert_array_equal(np.asarray(tail[-1, 0]), np.arange(1292 - 130, 1292))
    # no tail window when the regular ones already end at the last frame
    assert consecutive_windows(m[:, :260], n_frames=130, cover_tail=True).shape == (2, 8, 130)


def test_consecutive_windows_of_a_short_clip_is_one_padded_window():
    w = consecutive_windows(ramp(8, 100, start=1.0), n_frames=130)
    assert w.shape == (1, 8, 130)
    np.testing.assert_array_equal(w[0, 0, :100], np.arange(1, 101))
    assert (w[0, :, 100:] == 0).all()
    with pytest.raises(ValueError, match="hop must be.*0"):
        consecutive_windows(ramp(8, 200), n_frames=130, hop=0)
    with pytest.raises(ValueError, match=r"\(2, 8, 200\)"):
        consecutive_windows(np.zeros((2, 8, 200)), n_frames=130)
