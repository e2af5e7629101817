"""RawAudioCNN: a strided front end at ~43 frames/s feeding the PaperCNN / DeepCNN back ends."""

from __future__ import annotations

import pytest
import torch

from deepcontent.models.deep_cnn import DeepCNN
from deepcontent.models.paper_cnn import PaperCNN
from deepcontent.models.raw_audio import NONLINEARITIES, RawAudioCNN, StridedFrontEnd


def test_default_front_end_matches_the_spectrogram_frame_rate():
    front = StridedFrontEnd()
    assert front.filter_length == front.stride == 512
    assert 22050 / front.stride == pytest.approx(43.07, abs=0.01)
    assert front.n_frames(130 * 512) == 130
    assert front.n_frames(30 * 22050) == 1291  # the stored 30 s log-mel has 1292 (centred frames)
    out = front(torch.randn(2, 130 * 512) * 0.1)
    assert out.shape == (2, 128, 130)
    assert (out >= 0).all()


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_nonlinearities(nonlinearity):
    torch.manual_seed(0)
    front = StridedFrontEnd(n_filters=8, filter_length=256, nonlinearity=nonlinearity)
    audio = torch.randn(1, 256 * 10) * 0.1
    out = front(audio)
    h = front.conv(audio.unsqueeze(1))
    expected = {
        "relu": torch.relu(h),
        "log1p": torch.log1p(1e4 * torch.relu(h)),
        "log1p_square": torch.log1p(1e4 * h.square()),
    }[nonlinearity]
    torch.testing.assert_close(out, expected)


def test_paper_back_end_shapes_and_reuse():
    torch.manual_seed(0)
    model = RawAudioCNN(n_factors=50).eval()
    assert isinstance(model.backend, PaperCNN)
    assert model.backend.n_frames == 130 and model.backend.n_mels == 128
    x = torch.randn(3, 130 * 512) * 0.1
    pred, emb = model(x, return_embedding=True)
    assert pred.shape == (3, 50) and emb.shape == (3, 400)
    torch.testing.assert_close(model.embed(x), emb)
    torch.testing.assert_close(model.backend(model.frontend(x)), pred)
    # A (batch, 1, n_samples) input is the same thing.
    torch.testing.assert_close(model(x.unsqueeze(1)), pred)


def test_paper_back_end_with_a_longer_filter():
    model = RawAudioCNN(n_factors=5, filter_length=1024, n_samples=1024 * 130).eval()
    assert model.backend.n_frames == 130
    assert model(torch.randn(1, 1024 * 130) * 0.1).shape == (1, 5)
    with pytest.raises(ValueError, match="66560 samples"):
        model(torch.randn(1, 66_560))


@pytest.mark.parametrize("seconds", [1.0, 3.0])
def test_deep_back_end_takes_any_length_above_the_minimum(seconds):
    torch.manual_seed(0)
    model = RawAudioCNN(
        n_factors=10, backend="deep_cnn", backend_params={"channels": (32, 32), "pool_sizes": (4, 2), "embedding_dim": 16}
    ).eval()
    assert isinstance(model.backend, DeepCNN)
    n = int(seconds * 22050)
    pred, emb = model(torch.randn(2, n) * 0.1, return_embedding=True)
    assert pred.shape == (2, 10) and emb.shape == (2, 16) and model.embedding_dim == 16


def test_too_short_audio_raises_with_the_sample_count():
    model = RawAudioCNN(n_factors=3, backend="deep_cnn")
    assert model.min_samples == 512 * 32  # 32 frames for the default pools (4, 2, 2, 2)
    with pytest.raises(ValueError, match=r"\b16383 samples"):
        model(torch.randn(1, 16_383))
    with pytest.raises(ValueError, match="n_samples=4000 gives 7 front-end frames.*at least 45"):
        RawAudioCNN(n_factors=3, n_samples=4000)


def test_bad_configuration():
    with pytest.raises(ValueError, match="nonlinearity='tanh'"):
        RawAudioCNN(n_factors=3, nonlinearity="tanh")
    with pytest.raises(ValueError, match="backend='vgg'"):
        RawAudioCNN(n_factors=3, backend="vgg")
    with pytest.raises(ValueError, match="n_mels"):
        RawAudioCNN(n_factors=3, backend_params={"n_mels": 64})
