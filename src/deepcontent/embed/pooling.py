"""Clip-level outputs of a window model: the mean over consecutive windows (thesis §4.5.2).

The CNN regressors see ~3 s windows; a track's predicted factors and its embedding (the
penultimate layer) are the averages of the per-window outputs over back-to-back windows that
cover the whole clip. Predictions are trained on standardised targets, so they are mapped back
to WMF units with the train targets' mean and std stored in the model artifact.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from deepcontent.models.augment import consecutive_windows

__all__ = ["clip_outputs"]


@torch.no_grad()
def clip_outputs(
    model: torch.nn.Module,
    clips: Sequence[np.ndarray | torch.Tensor],
    *,
    n_frames: int,
    target_mean: np.ndarray | Sequence[float],
    target_std: np.ndarray | Sequence[float],
    windows_per_forward: int = 256,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted factors and embeddings per clip, averaged over consecutive windows.

    Parameters
    ----------
    model : EmbeddingRegressor
        In eval mode on ``device``; ``model(x, return_embedding=True)`` gives
        ``(pred (b, f), embedding (b, d))``.
    clips : sequence of array [shape=(n_mels, n_frames_i)]
        Whole log-mel clips (float16 or float32, any length; a clip shorter than a window is
        zero-padded to one window).
    n_frames : int
        The model's window length.
    target_mean, target_std : array [shape=(f,)]
        Standardisation of the training targets: raw factors = ``pred * std + mean``.
    windows_per_forward : int
        Windows per forward pass; several clips share a pass.
    device : torch.device or str
    autocast : callable, optional
        Returns the forward-pass context (bf16 autocast on GPU); None for fp32.

    Returns
    -------
    predicted_factors : np.ndarray [shape=(n_clips, f), dtype=float32]
        In WMF units (comparable with the ``item_factors`` of the factorisation).
    embedding : np.ndarray [shape=(n_clips, d), dtype=float32]
        Mean penultimate-layer activation.

    Raises
    ------
    ValueError
        If ``clips`` is empty or ``windows_per_forward < 1``.
    """
    if not len(clips):
        raise ValueError("clip_outputs got no clips")
    if windows_per_forward < 1:
        raise ValueError(f"windows_per_forward must be >= 1, got {windows_per_forward!r}")
    device = torch.device(device)
    # np.array copies: frombuffer views are read-only and torch wants writable memory
    windows = [consecutive_windows(torch.as_tensor(np.array(c)), n_frames=n_frames, cover_tail=True) for c in clips]
    counts = torch.as_tensor([w.shape[0] for w in windows], dtype=torch.float32)
    owner = torch.repeat_interleave(torch.arange(len(clips)), counts.long())
    flat = torch.cat(windows)
    preds, embs = [], []
    for s in range(0, flat.shape[0], windows_per_forward):
        x = flat[s : s + windows_per_forward].to(device=device, dtype=torch.float32, non_blocking=True)
        with autocast() if autocast else contextlib.nullcontext():
            p, e = model(x, return_embedding=True)
        preds.append(p.float().cpu())
        embs.append(e.float().cpu())
    pred, emb = torch.cat(preds), torch.cat(embs)
    pred_sum = torch.zeros((len(clips), pred.shape[1])).index_add_(0, owner, pred)
    emb_sum = torch.zeros((len(clips), emb.shape[1])).index_add_(0, owner, emb)
    pred_mean = (pred_sum / counts[:, None]).numpy()
    emb_mean = (emb_sum / counts[:, None]).numpy()
    std = np.asarray(target_std, dtype=np.float32)
    mean = np.asarray(target_mean, dtype=np.float32)
    if std.shape != (pred_mean.shape[1],) or mean.shape != std.shape:
        raise ValueError(f"target_mean/target_std must have shape ({pred_mean.shape[1]},), got {mean.shape} and {std.shape}")
    return (pred_mean * std + mean).astype(np.float32), emb_mean.astype(np.float32)
