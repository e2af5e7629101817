"""DeepCNN: any window length from its minimum up, global pooling, the shared embedding API."""

from __future__ import annotations

import pytest
import torch

from deepcontent.models.deep_cnn import DeepCNN


@pytest.mark.parametrize("frames", [130, 431])
def test_shapes_for_two_window_lengths(frames):
    torch.manual_seed(0)
    model = DeepCNN(n_factors=20).eval()
    x = torch.rand(2, 128, frames) * 8
    pred, emb = model(x, return_embedding=True)
    assert pred.shape == (2, 20)
    assert emb.shape == (2, 512) == (2, model.embedding_dim)
    torch.testing.assert_close(model.embed(x), emb)
    torch.testing.assert_close(model(x), pred)


def test_minimum_length_is_the_product_of_the_pools():
    model = DeepCNN(n_factors=3, channels=(16, 16, 32), pool_sizes=(4, 2, 2), embedding_dim=24).eval()
    assert model.min_frames == 16
    assert model(torch.rand(1, 128, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match="15 frames.*min_frames=16"):
        model(torch.rand(1, 128, 15))


def test_configuration_errors_name_the_value():
    with pytest.raises(ValueError, match="equal length"):
        DeepCNN(n_factors=3, channels=(8, 8), pool_sizes=(2,))
    with pytest.raises(ValueError, match=r"channels\[1\].*0"):
        DeepCNN(n_factors=3, channels=(8, 0), pool_sizes=(2, 2))
    with pytest.raises(ValueError, match="n_mels=128"):
        DeepCNN(n_factors=3)(torch.rand(1, 96, 130))


def test_train_mode_uses_batch_statistics_and_dropout():
    torch.manual_seed(0)
    model = DeepCNN(n_factors=3, channels=(16, 16), pool_sizes=(2, 2), embedding_dim=8, dropout=0.5)
    x = torch.rand(4, 128, 64)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # dropout
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    # eval is per-example: a batch of one gives the same row as the batch
    torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


def test_one_gradient_step_runs():
    torch.manual_seed(0)
    model = DeepCNN(n_factors=3, channels=(16, 16), pool_sizes=(2, 2), embedding_dim=8)
    loss = model(torch.rand(4, 128, 40)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
