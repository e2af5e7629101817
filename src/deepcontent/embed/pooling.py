"""Clip-level outputs of a window model: the mean over consecutive windows (thesis §4.5.2).

The CNN regressors see ~3 s windows; a track's predicted factors and its embedding (the
penultimate layer) are the averages of the per-window outputs over back-to-back windows that
cover the whole clip. Predictions are trained on standardised targets, so they are mapped back
to WMF units with the train targets' mean and std stored in the model artifact.

Clips come one array per clip, or as blocks of clips that share a length (what
:func:`~deepcontent.datasets.mel_blocks` reads straight from Arrow): a block's windows are cut
with one strided copy, so a catalog of equal-length previews costs no Python per clip.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["clip_outputs", "clip_windows", "windows_per_clip"]


def windows_per_clip(n_frames_clip: int, *, n_frames: int) -> int:
    """Windows :func:`clip_windows` cuts from a clip of ``n_frames_clip`` frames: back-to-back
    windows while one fits, one more ending at the last frame when frames are left over, and
    one zero-padded window for a clip shorter than a window (the count of
    ``consecutive_windows(..., cover_tail=True)``)."""
    if n_frames_clip < n_frames:
        return 1
    return 1 + (n_frames_clip - n_frames) // n_frames + int((n_frames_clip - n_frames) % n_frames != 0)


def _blocks(clips: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
    blocks = []
    for i, c in enumerate(clips):
        a = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
        if a.ndim == 2:
            a = a[None]
        elif a.ndim != 3:
            raise ValueError(f"clips[{i}] must be one clip (n_mels, n_frames) or a block (clips, n_mels, n_frames), "
                             f"got shape {a.shape}")
        if blocks and a.shape[1] != blocks[0].shape[1]:
            raise ValueError(f"clips[{i}] has {a.shape[1]} mel bands, clips[0] has {blocks[0].shape[1]}")
        blocks.append(a)
    return blocks


def clip_windows(clips: Sequence[np.ndarray | torch.Tensor], *, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Every clip's consecutive windows, clip after clip, in one array.

    The same windows in the same order as concatenating
    ``consecutive_windows(clip, n_frames=n_frames, cover_tail=True)`` over the clips, but cut
    per block of equal-length clips (one strided copy each) instead of per clip.

    Parameters
    ----------
    clips : sequence of array [shape=(n_mels, T_i) or (r_i, n_mels, T_i)]
        Clips, or blocks of ``r_i`` clips of one length (read-only views are fine: nothing is
        written to them). All with the same ``n_mels``.
    n_frames : int >= 1
        The window length.

    Returns
    -------
    windows : np.ndarray [shape=(n_windows, n_mels, n_frames)]
        C-contiguous, in the clips' common dtype (float16 stays float16); a clip shorter than a
        window gives one window zero-padded at the end.
    counts : np.ndarray [shape=(n_clips,), dtype=int64]
        Windows per clip (:func:`windows_per_clip`); ``n_clips = Σ r_i``.

    Raises
    ------
    ValueError
        If a clip is not 2-D or a block not 3-D, the clips differ in ``n_mels``, or
        ``n_frames < 1``.
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
    blocks = _blocks(clips)
    n_mels = blocks[0].shape[1] if blocks else 0
    per = [windows_per_clip(b.shape[2], n_frames=n_frames) for b in blocks]
    counts = np.repeat(np.asarray(per, dtype=np.int64), [b.shape[0] for b in blocks])
    dtype = np.result_type(*blocks) if blocks else np.float32
    out = np.empty((int(counts.sum()), n_mels, n_frames), dtype=dtype)
    at = 0
    for b, k in zip(blocks, per):
        r, _, t = b.shape
        dst = out[at:at + r * k].reshape(r, k, n_mels, n_frames)
        if t < n_frames:
            dst[:, 0, :, :t] = b
            dst[:, 0, :, t:] = 0
        else:
            regular = (t - n_frames) // n_frames + 1
            # Splitting the frame axis into (window, frame) is a view: one copy per block.
            dst[:, :regular] = b[:, :, :regular * n_frames].reshape(r, n_mels, regular, n_frames).transpose(0, 2, 1, 3)
            if k > regular:
                dst[:, regular] = b[:, :, t - n_frames:]
        at += r * k
    return out, counts


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
    clips : sequence of array [shape=(n_mels, T_i) or (r_i, n_mels, T_i)]
        Whole log-mel clips (float16 or float32, any length; a clip shorter than a window is
        zero-padded to one window), or blocks of ``r_i`` clips of one length
        (:func:`~deepcontent.datasets.mel_blocks`); read-only views are fine.
    n_frames : int
        The model's window length.
    target_mean, target_std : array [shape=(f,)]
        Standardisation of the training targets: raw factors = ``pred * std + mean``.
    windows_per_forward : int
        Windows per forward pass; several clips share a pass. The windows stay in their
        stored dtype until their pass (float16 -> float32 on ``device``).
    device : torch.device or str
    autocast : callable, optional
        Returns the forward-pass context (bf16 autocast on GPU); None for fp32.

    Returns
    -------
    predicted_factors : np.ndarray [shape=(n_clips, f), dtype=float32]
        In WMF units (comparable with the ``item_factors`` of the factorisation); one row per
        clip, blocks unrolled in order.
    embedding : np.ndarray [shape=(n_clips, d), dtype=float32]
        Mean penultimate-layer activation.

    Raises
    ------
    ValueError
        If there are no clips, ``windows_per_forward < 1``, or the clips' shapes are wrong
        (:func:`clip_windows`).
    """
    if windows_per_forward < 1:
        raise ValueError(f"windows_per_forward must be >= 1, got {windows_per_forward!r}")
    windows, counts = clip_windows(clips, n_frames=n_frames)
    n_clips = len(counts)
    if not n_clips:
        raise ValueError("clip_outputs got no clips")
    device = torch.device(device)
    flat = torch.from_numpy(windows)
    preds, embs = [], []
    for s in range(0, flat.shape[0], windows_per_forward):
        x = flat[s : s + windows_per_forward].to(device=device, dtype=torch.float32, non_blocking=True)
        with autocast() if autocast else contextlib.nullcontext():
            p, e = model(x, return_embedding=True)
        preds.append(p.float().cpu())
        embs.append(e.float().cpu())
    pred, emb = torch.cat(preds), torch.cat(embs)
    owner = torch.repeat_interleave(torch.arange(n_clips), torch.from_numpy(counts))
    n = torch.from_numpy(counts.astype(np.float32))
    # index_add_ adds each clip's windows in window order, as it always has: outputs stay
    # bit-identical whichever way the clips arrive (one by one or in blocks).
    pred_sum = torch.zeros((n_clips, pred.shape[1])).index_add_(0, owner, pred)
    emb_sum = torch.zeros((n_clips, emb.shape[1])).index_add_(0, owner, emb)
    pred_mean = (pred_sum / n[:, None]).numpy()
    emb_mean = (emb_sum / n[:, None]).numpy()
    std = np.asarray(target_std, dtype=np.float32)
    mean = np.asarray(target_mean, dtype=np.float32)
    if std.shape != (pred_mean.shape[1],) or mean.shape != std.shape:
        raise ValueError(f"target_mean/target_std must have shape ({pred_mean.shape[1]},), got {mean.shape} and {std.shape}")
    return (pred_mean * std + mean).astype(np.float32), emb_mean.astype(np.float32)
