"""Training objectives for audio -> latent-factor regressors (thesis §4.5.3) and NMSE.

* :func:`mse_loss` — Eq. 4.4, squared error on the WMF item factors ``y_i``;
* :func:`wpe_loss` — Eq. 4.5, the WMF objective with the user factors ``X`` fixed, over *all*
  users of each item in the batch, computed without the dense ``users x batch`` score matrix;
* :func:`nmse` — MSE divided by the variance of the targets (the ISMIR 2014 source metric).

The thesis found MSE better: WPE weights a song by its popularity, so the model learns the
popular training songs at the expense of the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["gram_matrix", "item_plays", "mse_loss", "nmse", "wpe_loss"]


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of ``(batch, n_factors)`` (Eq. 4.4 / (batch · f)).

    Raises
    ------
    ValueError
        If the shapes differ (no silent broadcasting of a ``(batch,)`` against ``(batch, f)``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return torch.mean((pred - target.to(pred.dtype)) ** 2)


def gram_matrix(user_factors: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` ``(f, f)`` of the fixed user factors ``(n_users, f)``: computed once per training
    run, it stands in for the sum over every user in :func:`wpe_loss`."""
    if user_factors.dim() != 2:
        raise ValueError(f"user_factors must be (n_users, f), got shape {tuple(user_factors.shape)}")
    return user_factors.T @ user_factors


def wpe_loss(
    pred_item_factors: torch.Tensor,
    *,
    user_factors: torch.Tensor,
    gram: torch.Tensor,
    play_users: Sequence[torch.Tensor],
    play_confidence: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Weighted prediction error (Eq. 4.5) of predicted item factors, users fixed, batch mean.

    For item ``i`` with prediction ``y_i`` and scores ``s_ui = x_u · y_i``, the WMF loss over
    all users, ``Σ_u c_ui (p_ui − s_ui)²`` with ``c = 1, p = 0`` for unplayed pairs, equals::

        y_iᵀ (XᵀX) y_i  +  Σ_{u ∈ plays(i)} [ c_ui (1 − s_ui)² − s_ui² ]

    (the all-users sum of ``s²``, corrected on the played pairs). That costs ``O(f² + nnz_i·f)``
    per item instead of ``O(n_users·f)``.

    Parameters
    ----------
    pred_item_factors : torch.Tensor [shape=(batch, f)]
        The model's predictions ``y'_i``.
    user_factors : torch.Tensor [shape=(n_users, f)]
        Fixed WMF user factors ``X`` (no gradient needed).
    gram : torch.Tensor [shape=(f, f)]
        ``XᵀX``, precomputed with :func:`gram_matrix`.
    play_users : sequence of ``batch`` LongTensors
        ``play_users[b]``: indices (rows of ``user_factors``) of the users who played item ``b``.
    play_confidence : sequence of ``batch`` FloatTensors
        ``play_confidence[b]``: their confidences ``c_ui``, aligned with ``play_users[b]``.

    Returns
    -------
    loss : torch.Tensor, scalar
        The per-item loss averaged over the batch (WMF's regularisation term is left out: it
        does not involve the model).

    Raises
    ------
    ValueError
        For inconsistent shapes or ragged lists of the wrong length.
    """
    y = pred_item_factors
    if y.dim() != 2:
        raise ValueError(f"pred_item_factors must be (batch, f), got shape {tuple(y.shape)}")
    b, f = y.shape
    if user_factors.dim() != 2 or user_factors.shape[1] != f:
        raise ValueError(f"user_factors must be (n_users, {f}), got shape {tuple(user_factors.shape)}")
    if tuple(gram.shape) != (f, f):
        raise ValueError(f"gram must be ({f}, {f}), got shape {tuple(gram.shape)}")
    if len(play_users) != b or len(play_confidence) != b:
        raise ValueError(
            f"play_users and play_confidence need one entry per item: batch={b}, got {len(play_users)} and "
            f"{len(play_confidence)}"
        )
    counts = [int(u.numel()) for u in play_users]
    for i, (u, c) in enumerate(zip(play_users, play_confidence)):
        if c.numel() != u.numel():
            raise ValueError(f"item {i}: {u.numel()} users but {c.numel()} confidences")
    device = y.device
    quad = torch.einsum("bf,fg,bg->", y, gram.to(device=device, dtype=y.dtype), y)
    if sum(counts) == 0:
        return quad / b
    users = torch.cat([u.reshape(-1) for u in play_users]).to(device=device, dtype=torch.long)
    conf = torch.cat([c.reshape(-1) for c in play_confidence]).to(device=device, dtype=y.dtype)
    item = torch.repeat_interleave(
        torch.arange(b, device=device), torch.as_tensor(counts, device=device), output_size=len(users)
    )
    s = (user_factors.to(device=device, dtype=y.dtype)[users] * y[item]).sum(dim=1)
    correction = conf * (1.0 - s) ** 2 - s**2
    return (quad + correction.sum()) / b


def item_plays(
    item_user_confidence: sp.csr_matrix, items: Sequence[int] | np.ndarray
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ragged ``play_users`` / ``play_confidence`` lists of :func:`wpe_loss` for a batch.

    Parameters
    ----------
    item_user_confidence : scipy.sparse.csr_matrix [shape=(n_items, n_users)]
        ``c_ui`` on the played pairs (the transpose of
        :func:`deepcontent.interactions.weighting.confidence_matrix`, as CSR).
    items : sequence of int
        Row indices of the batch's items, in batch order.

    Returns
    -------
    (play_users, play_confidence) : lists of LongTensor / FloatTensor, one per item
    """
    m = item_user_confidence
    if not sp.issparse(m) or m.format != "csr":
        raise TypeError(f"item_user_confidence must be CSR, got {type(m).__name__}")
    users, conf = [], []
    for i in np.asarray(items, dtype=np.int64).tolist():
        if not 0 <= i < m.shape[0]:
            raise ValueError(f"item index {i} is outside 0..{m.shape[0] - 1}")
        lo, hi = m.indptr[i], m.indptr[i + 1]
        users.append(torch.from_numpy(m.indices[lo:hi].astype(np.int64)))
        conf.append(torch.from_numpy(np.asarray(m.data[lo:hi], dtype=np.float32)))
    return users, conf


def nmse(pred, target):
    """Normalised MSE: ``mean((pred − target)²) / mean_j var(target[:, j])``.

    The denominator is the MSE of predicting each target column's mean (population variance),
    so that baseline scores exactly 1 and a useful regressor scores below 1.

    Parameters
    ----------
    pred, target : np.ndarray or torch.Tensor [shape=(n, f) or (n,)]
        Both numpy or both torch.

    Returns
    -------
    float for numpy input; a scalar tensor (differentiable in ``pred``) for torch input.

    Raises
    ------
    ValueError
        For mismatched shapes or constant targets (variance 0).
    """
    if tuple(pred.shape) != tuple(target.shape) or len(pred.shape) not in (1, 2) or pred.shape[0] < 1:
        raise ValueError(f"pred and target must share a (n, f) or (n,) shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        t = target.to(pred.dtype)
        var = t.var(dim=0, unbiased=False).mean()
        if float(var) == 0.0:
            raise ValueError("target has zero variance; NMSE is undefined")
        return torch.mean((pred - t) ** 2) / var
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        raise TypeError(f"pred and target must both be numpy or both torch, got {type(pred).__name__} and {type(target).__name__}")
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    var = float(t.var(axis=0).mean())
    if var == 0.0:
        raise ValueError("target has zero variance; NMSE is undefined")
    return float(np.mean((p - t) ** 2) / var)
