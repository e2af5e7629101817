"""PaperCNN is the network of the NIPS 2013 paper: layer shapes and parameter count by hand."""

from __future__ import annotations

import pytest
import torch

from deepcontent.models.paper_cnn import PaperCNN, conv_pool_length


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_layer_shapes_and_parameter_count_match_the_paper():
    f = 50
    model = PaperCNN(n_factors=f)
    # 128 filters spanning all 128 bands x 6 frames, then 128 x 128 x 6.
    assert tuple(model.conv1.weight.shape) == (128, 128, 6)
    assert tuple(model.conv2.weight.shape) == (128, 128, 6)
    # 130 -> conv 125 -> pool4 31 -> conv 26 -> pool5 5 time steps of 128 filters = 640.
    assert model.out_frames == 5
    assert tuple(model.dense.weight.shape) == (400, 640)
    assert tuple(model.output.weight.shape) == (f, 400)
    conv = 128 * 128 * 6 + 128
    expected = 2 * conv + (640 * 400 + 400) + (400 * f + f)
    assert expected == 473_314
    assert n_params(model) == expected
    assert n_params(PaperCNN(n_factors=400)) == 453_264 + 401 * 400


def test_forward_embed_and_return_embedding_agree():
    torch.manual_seed(0)
    model = PaperCNN(n_factors=50).eval()
    x = torch.rand(4, 128, 130) * 8
    pred = model(x)
    emb = model.embed(x)
    pred2, emb2 = model(x, return_embedding=True)
    assert pred.shape == (4, 50) and emb.shape == (4, 400)
    assert model.embedding_dim == 400 and model.n_factors == 50
    torch.testing.assert_close(pred, pred2)
    torch.testing.assert_close(emb, emb2)
    assert (emb >= 0).all()  # post-ReLU activations
    torch.testing.assert_close(model.output(emb), pred)


def test_float16_input_is_accepted():
    model = PaperCNN(n_factors=3).eval()
    x = torch.rand(2, 128, 130) * 8
    torch.testing.assert_close(model(x.half()), model(x.half().float()))


@pytest.mark.parametrize("frames", [100, 129])
def test_too_short_input_raises_with_the_frame_count(frames):
    model = PaperCNN(n_factors=5)
    with pytest.raises(ValueError, match=rf"\b{frames} frames") as exc:
        model(torch.zeros(2, 128, frames))
    assert "n_frames=130" in str(exc.value)


def test_longer_input_and_wrong_bands_raise():
    model = PaperCNN(n_factors=5)
    with pytest.raises(ValueError, match="140 frames"):
        model(torch.zeros(1, 128, 140))
    with pytest.raises(ValueError, match=r"\(1, 64, 130\)"):
        model(torch.zeros(1, 64, 130))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 128, 130, dtype=torch.int16))


def test_configurable_frame_count_sets_the_flatten_size():
    model = PaperCNN(n_factors=7, n_frames=260)
    # 260 -> 255 -> 63 -> 58 -> 11
    assert model.out_frames == 11 == conv_pool_length(260, filter_length=6, pool_sizes=(4, 5))
    assert tuple(model.dense.weight.shape) == (400, 128 * 11)
    assert model(torch.zeros(2, 128, 260)).shape == (2, 7)


def test_minimum_frame_count_is_enforced_at_construction():
    # One step after pool 5 needs 10 after pool 4, i.e. 40 after conv 1, i.e. 45 input frames.
    assert PaperCNN(n_factors=2, n_frames=45).out_frames == 1
    assert PaperCNN(n_factors=2, n_frames=45).min_frames == 45
    with pytest.raises(ValueError, match="n_frames=44.*at least 45"):
        PaperCNN(n_factors=2, n_frames=44)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_factors": 0}, "n_factors"),
        ({"n_factors": 5, "pool_sizes": (4,)}, "pool_sizes"),
        ({"n_factors": 5, "hidden": -1}, "hidden"),
        ({"n_factors": 5, "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_parameters_raise_with_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaperCNN(**kwargs)


def test_dropout_only_acts_in_training():
    torch.manual_seed(0)
    model = PaperCNN(n_factors=4, dropout=0.5)
    x = torch.rand(3, 128, 130)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
