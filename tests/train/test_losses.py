"""MSE, WPE (the WMF loss with user factors fixed, without the dense users x items product) and NMSE."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from deepcontent.train.losses import gram_matrix, item_plays, mse_loss, nmse, wpe_loss


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def brute_force_wpe(pred: torch.Tensor, user_factors: torch.Tensor, conf: torch.Tensor, played: torch.Tensor):
    """Σ_{u,i} c_ui (p_ui − x_u·y_i)² over the dense (n_users, batch) matrices, / batch."""
    c = torch.where(played, conf, torch.ones_like(conf))
    p = played.to(pred.dtype)
    return (c * (p - user_factors @ pred.T) ** 2).sum() / pred.shape[0]


def random_problem(seed: int, n_users=40, batch=6, f=5, density=0.15):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(n_users, f, generator=g, dtype=torch.float64) * 0.5
    pred = torch.randn(batch, f, generator=g, dtype=torch.float64) * 0.5
    played = torch.rand(n_users, batch, generator=g) < density
    played[:, 0] = False  # an item nobody played
    conf = 1 + 40 * torch.log1p(torch.rand(n_users, batch, generator=g, dtype=torch.float64) * 20)
    play_users = [torch.nonzero(played[:, b]).flatten() for b in range(batch)]
    play_conf = [conf[play_users[b], b] for b in range(batch)]
    return users, pred, played, conf, play_users, play_conf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wpe_equals_brute_force_value_and_gradient(seed):
    users, pred, played, conf, play_users, play_conf = random_problem(seed)
    pred_a = pred.clone().requires_grad_(True)
    pred_b = pred.clone().requires_grad_(True)
    ours = wpe_loss(pred_a, user_factors=users, gram=gram_matrix(users), play_users=play_users, play_confidence=play_conf)
    ref = brute_force_wpe(pred_b, users, conf, played)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(pred_a.grad, pred_b.grad, rtol=1e-10, atol=1e-10)


def test_wpe_with_no_plays_is_the_quadratic_term():
    users, pred, *_ = random_problem(3)
    empty = [torch.zeros(0, dtype=torch.long)] * pred.shape[0]
    none = [torch.zeros(0, dtype=torch.float64)] * pred.shape[0]
    loss = wpe_loss(pred, user_factors=users, gram=users.T @ users, play_users=empty, play_confidence=none)
    torch.testing.assert_close(loss, ((users @ pred.T) ** 2).sum() / pred.shape[0])


def test_item_plays_from_csr_feed_wpe():
    users, pred, played, conf, *_ = random_problem(4)
    dense = torch.where(played, conf, torch.zeros_like(conf)).T.numpy()  # (items, users)
    m = sp.csr_matrix(dense)
    items = [3, 0, 5, 1, 2, 4]
    play_users, play_conf = item_plays(m, items)
    assert [u.dtype for u in play_users] == [torch.int64] * 6
    loss = wpe_loss(pred[items], user_factors=users, gram=gram_matrix(users), play_users=play_users, play_confidence=play_conf)
    torch.testing.assert_close(loss, brute_force_wpe(pred[items], users, conf[:, items], played[:, items]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="item index 6"):
        item_plays(m, [6])


def test_wpe_rejects_inconsistent_input():
    users, pred, _, _, play_users, play_conf = random_problem(5)
    gram = gram_matrix(users)
    with pytest.raises(ValueError, match="batch=6, got 5 and 6"):
        wpe_loss(pred, user_factors=users, gram=gram, play_users=play_users[:5], play_confidence=play_conf)
    with pytest.raises(ValueError, match=r"gram must be \(5, 5\)"):
        wpe_loss(pred, user_factors=users, gram=gram[:4], play_users=play_users, play_confidence=play_conf)
    bad = list(play_conf)
    bad[2] = torch.ones(bad[2].numel() + 1)
    with pytest.raises(ValueError, match="item 2"):
        wpe_loss(pred, user_factors=users, gram=gram, play_users=play_users, play_confidence=bad)


def test_mse_loss():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(mse_loss(a, b), torch.nn.functional.mse_loss(a, b))
    with pytest.raises(ValueError, match=r"\(4, 3\) vs \(4,\)"):
        mse_loss(a, b[:, 0])


def test_nmse_of_the_mean_prediction_is_one():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(100, 4)) * [1, 2, 3, 4] + [0, 5, -5, 1]
    mean = np.broadcast_to(y.mean(axis=0), y.shape)
    assert nmse(mean, y) == pytest.approx(1.0, rel=1e-12)
    assert nmse(y, y) == 0.0
    yt = torch.from_numpy(y)
    pred = torch.from_numpy(mean.copy()).requires_grad_(True)
    value = nmse(pred, yt)
    assert isinstance(value, torch.Tensor)
    torch.testing.assert_close(value, torch.tensor(1.0, dtype=torch.float64))
    value.backward()
    assert pred.grad is not None
    assert nmse(y[:, 0], y[:, 0] + 1.0) == pytest.approx(1.0 / y[:, 0].var())
    with pytest.raises(ValueError, match="zero variance"):
        nmse(np.ones((5, 2)), np.ones((5, 2)))
    with pytest.raises(TypeError, match="both be numpy or both torch"):
        nmse(mean, yt)
