"""build_model builds every registered network by name and refuses unknown names and params."""

from __future__ import annotations

import pytest
import torch

from deepcontent.models import MODELS, DeepCNN, PaperCNN, RawAudioCNN, build_model


@pytest.mark.parametrize(
    "name, cls, x",
    [
        ("paper_cnn", PaperCNN, torch.zeros(1, 128, 130)),
        ("deep_cnn", DeepCNN, torch.zeros(1, 128, 130)),
        ("raw_audio", RawAudioCNN, torch.zeros(1, 130 * 512)),
    ],
)
def test_builds_each_model(name, cls, x):
    model = build_model(name, n_factors=12).eval()
    assert type(model) is cls
    assert model(x).shape == (1, 12)
    assert model.embed(x).shape == (1, model.embedding_dim)


def test_params_are_passed_through():
    model = build_model("deep_cnn", n_factors=4, channels=(8, 8), pool_sizes=(2, 2), embedding_dim=6)
    assert model.embedding_dim == 6 and model.min_frames == 4
    raw = build_model("raw_audio", n_factors=4, filter_length=256, n_samples=256 * 130)
    assert raw.frontend.filter_length == 256


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="'resnet'.*deep_cnn.*paper_cnn.*raw_audio"):
        build_model("resnet", n_factors=3)
    assert sorted(MODELS) == ["deep_cnn", "paper_cnn", "raw_audio"]


def test_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"\['channels'\].*n_frames"):
        build_model("paper_cnn", n_factors=3, channels=(8,))
