"""Windows and augmentation for log-mel spectrograms, numpy or torch alike.

The CNN trains on random ~3 s windows cut from 30 s clips, and a clip's prediction is the mean
over consecutive windows (thesis §4.5.2). Every function here takes numpy arrays or torch
tensors and returns the same kind (torch results stay on the input's device, so crops can be
cut from spectrograms resident in GPU memory, as docs/architecture.md recommends).

Log-mels are ``log(1 + C·S)`` of mel power ``S``; zero is silence (``S = 0``), which is what
windows are padded with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

__all__ = ["apply_gain", "consecutive_windows", "frequency_mask", "random_gain", "random_windows", "time_mask"]

Array = Union[np.ndarray, torch.Tensor]
RandomSource = Union[None, int, np.random.Generator, torch.Generator]


def _check_n_frames(n_frames: object) -> int:
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
    return int(n_frames)


def _uniform(n: int, generator: RandomSource) -> np.ndarray | torch.Tensor:
    """``n`` draws from U[0, 1): a torch tensor (on the generator's device) for a torch
    Generator, float64 numpy otherwise (``None`` / int seed / numpy Generator)."""
    if isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return np.random.default_rng(generator).random(n)


def _offsets(highs: Sequence[int], generator: RandomSource) -> list[int]:
    """One start offset per clip, uniform over ``0..highs[i]`` inclusive."""
    u = _uniform(len(highs), generator)
    u = u.cpu().numpy() if isinstance(u, torch.Tensor) else u
    # floor(u·(h+1)) is uniform on 0..h; min() guards the u -> 1 rounding edge.
    return [min(int(math.floor(ui * (h + 1))), h) for ui, h in zip(u.tolist(), highs)]


def _pad_frames(x: Array, n_frames: int) -> Array:
    """Zero-pad the last axis to ``n_frames`` (no-op when already long enough)."""
    short = n_frames - x.shape[-1]
    if short <= 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.pad(x, (0, short))
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, short)])


def random_windows(mels: Array | Sequence[Array], *, n_frames: int, generator: RandomSource = None) -> Array:
    """Cut one random window of ``n_frames`` frames from each spectrogram.

    Parameters
    ----------
    mels : array or tensor [shape=(batch, n_mels, n_frames_in)], or a sequence of (n_mels, T_i)
        Log-mel spectrograms; a sequence may mix lengths (whole clips of different duration) but
        not kinds (all numpy or all torch) or band counts.
    n_frames : int >= 1
        Window length (130 ≈ 3 s at hop 512 / 22,050 Hz).
    generator : None, int, np.random.Generator or torch.Generator
        Source of the offsets (``None``: fresh entropy; an int seeds a numpy Generator). Either
        kind works with either kind of input.

    Returns
    -------
    windows : same kind as the input [shape=(batch, n_mels, n_frames)]
        ``windows[b] = mels[b][:, o_b : o_b + n_frames]`` with ``o_b`` uniform on
        ``0..T_b - n_frames``. A clip shorter than ``n_frames`` is kept whole at the start of its
        window and zero-padded after it (zero = silence in the ``log(1 + C·x)`` domain).

    Raises
    ------
    ValueError
        For an empty batch, a wrong rank or mismatched band counts (the message shows them).
    """
    n_frames = _check_n_frames(n_frames)
    if isinstance(mels, (np.ndarray, torch.Tensor)):
        if mels.ndim != 3:
            raise ValueError(
                f"mels must have shape (batch, n_mels, n_frames) or be a list of (n_mels, n_frames), got shape "
                f"{tuple(mels.shape)}"
            )
        if mels.shape[0] == 0:
            raise ValueError("mels is an empty batch")
        x = _pad_frames(mels, n_frames)
        b, m, t = x.shape
        starts = _offsets([t - n_frames] * b, generator)
        if isinstance(x, torch.Tensor):
            idx = torch.as_tensor(starts, device=x.device)[:, None] + torch.arange(n_frames, device=x.device)
            return x.gather(2, idx[:, None, :].expand(b, m, n_frames))
        idx = np.asarray(starts)[:, None] + np.arange(n_frames)
        return np.take_along_axis(x, idx[:, None, :], axis=2)
    clips = list(mels)
    if not clips:
        raise ValueError("mels is an empty batch")
    is_torch = isinstance(clips[0], torch.Tensor)
    for i, c in enumerate(clips):
        if isinstance(c, torch.Tensor) != is_torch or not isinstance(c, (np.ndarray, torch.Tensor)):
            raise ValueError(f"mels[{i}] is a {type(c).__name__}; a list must be all numpy arrays or all tensors")
        if c.ndim != 2 or c.shape[0] != clips[0].shape[0]:
            raise ValueError(
                f"mels[{i}] has shape {tuple(c.shape)}; expected (n_mels={clips[0].shape[0]}, n_frames)"
            )
    starts = _offsets([max(c.shape[1] - n_frames, 0) for c in clips], generator)
    out = [_pad_frames(c[:, o : o + n_frames], n_frames) for c, o in zip(clips, starts)]
    return torch.stack(out) if is_torch else np.stack(out)


def apply_gain(x: Array, *, gain_db: float | Array) -> Array:
    """Scale the mel *power* under a ``log(1 + C·S)`` log-mel by ``gain_db`` decibels.

    With ``x = log(1 + C·S)`` and ``g = 10^(gain_db / 10)`` the log-mel of ``g·S`` is
    ``log1p(g · expm1(x))``, whatever ``C`` is (the constant cancels). It is computed as
    ``x + log(g + (1 - g)·exp(-x))``, which is the same quantity but never overflows (``expm1``
    of a loud float16 bin does) and is exactly ``x`` at 0 dB. An *amplitude* gain ``a`` is
    ``gain_db = 20·log10(a)``.

    Parameters
    ----------
    x : array or tensor, any shape, values >= 0
        Log-mels (``log1p``-compressed power); float16 input is computed in float32.
    gain_db : float, or array / tensor broadcastable to ``x``
        Power gain in dB, e.g. shape ``(batch, 1, 1)`` for one gain per example.

    Returns
    -------
    y : same kind, shape and dtype as ``x``
    """
    if isinstance(x, torch.Tensor):
        work = x if x.dtype == torch.float64 else x.float()
        g = torch.as_tensor(gain_db, dtype=work.dtype, device=x.device)
        g = torch.pow(torch.tensor(10.0, dtype=work.dtype, device=x.device), g / 10.0)
        y = work + torch.log(g + (1.0 - g) * torch.exp(-work))
        return y.to(x.dtype)
    x = np.asarray(x)
    work = x if x.dtype == np.float64 else x.astype(np.float32)
    g = np.power(work.dtype.type(10.0), np.asarray(gain_db, dtype=work.dtype) / 10.0)
    y = work + np.log(g + (1.0 - g) * np.exp(-work))
    return y.astype(x.dtype, copy=False)


def random_gain(x: Array, *, max_db: float, generator: RandomSource = None) -> Array:
    """:func:`apply_gain` with a gain drawn uniformly from ``[-max_db, +max_db]`` dB per example.

    Loudness is arbitrary in a catalog (mastering, normalisation), so a regressor of usage
    patterns should not key on it; this is the augmentation for that.

    Parameters
    ----------
    x : array or tensor [shape=(batch, n_mels, n_frames)] or (n_mels, n_frames)
        Log-mels; a 2-D input gets a single gain.
    max_db : float >= 0
        Largest gain magnitude in dB (of power). 0 returns ``x`` unchanged.
    generator : None, int, np.random.Generator or torch.Generator

    Returns
    -------
    y : same kind, shape and dtype as ``x``
    """
    if isinstance(max_db, bool) or not isinstance(max_db, (int, float)) or not math.isfinite(max_db) or max_db < 0:
        raise ValueError(f"max_db must be a finite number >= 0, got {max_db!r}")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have shape (batch, n_mels, n_frames) or (n_mels, n_frames), got {tuple(x.shape)}")
    n = x.shape[0] if x.ndim == 3 else 1
    u = _uniform(n, generator)
    if isinstance(x, torch.Tensor):
        u = torch.as_tensor(u, device=x.device)
    elif isinstance(u, torch.Tensor):  # numpy input, torch generator
        u = u.cpu().numpy()
    db = (2.0 * u - 1.0) * float(max_db)
    db = db.reshape(n, 1, 1) if x.ndim == 3 else db.reshape(())
    return apply_gain(x, gain_db=db)


def consecutive_windows(
    mel: Array, *, n_frames: int, hop: int | None = None, cover_tail: bool = False
) -> Array:
    """Split one clip into consecutive windows for clip-level prediction (thesis §4.5.2).

    A clip's predicted factors (or embedding) are the mean of the model's outputs over these
    windows.

    Parameters
    ----------
    mel : array or tensor [shape=(n_mels, T)]
    n_frames : int >= 1
        Window length.
    hop : int >= 1, optional
        Frames between window starts; default ``n_frames`` (back to back, no overlap).
    cover_tail : bool
        Also emit a last window ending at frame ``T`` when the regular ones stop short of it,
        so every frame is seen (it overlaps the window before). Default False.

    Returns
    -------
    windows : same kind as ``mel`` [shape=(n_windows, n_mels, n_frames)]
        Starts ``0, hop, 2·hop, ...`` while a full window fits: ``n_windows =
        1 + (T - n_frames) // hop`` (plus one with ``cover_tail`` if frames are left over), so
        without ``cover_tail`` up to ``hop - 1`` trailing frames go unused. A clip shorter than
        ``n_frames`` gives one zero-padded window. For ``T >= n_frames`` and no tail window
        the result is a strided *view* of ``mel`` (read-only for numpy): copy before writing.
    """
    n_frames = _check_n_frames(n_frames)
    hop = n_frames if hop is None else hop
    if isinstance(hop, bool) or not isinstance(hop, (int, np.integer)) or hop < 1:
        raise ValueError(f"hop must be an integer >= 1, got {hop!r}")
    if not isinstance(mel, (np.ndarray, torch.Tensor)) or mel.ndim != 2:
        shape = tuple(mel.shape) if hasattr(mel, "shape") else type(mel).__name__
        raise ValueError(f"mel must be a 2-D (n_mels, n_frames) array or tensor, got {shape}")
    t = mel.shape[1]
    if t < n_frames:
        return _pad_frames(mel, n_frames)[None]
    tail = cover_tail and (t - n_frames) % hop != 0
    if isinstance(mel, torch.Tensor):
        w = mel.unfold(1, n_frames, hop).permute(1, 0, 2)  # (n_windows, n_mels, n_frames)
        return torch.cat([w, mel[None, :, t - n_frames :]]) if tail else w
    w = np.lib.stride_tricks.sliding_window_view(mel, n_frames, axis=1)[:, ::hop].transpose(1, 0, 2)
    return np.concatenate([w, mel[None, :, t - n_frames :]]) if tail else w


def _spans(n: int, masks: int, *, size: int, max_width: int, generator: RandomSource) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, widths)`` of shape ``(n, masks)``: widths uniform on ``0..max_width`` (at
    most ``size``), starts uniform over where that width fits."""
    u = _uniform(2 * n * masks, generator)
    u = (u.cpu().numpy() if isinstance(u, torch.Tensor) else u).reshape(2, n, masks)
    top = min(int(max_width), int(size))
    widths = np.minimum(np.floor(u[0] * (top + 1)), top).astype(np.int64)
    starts = np.minimum(np.floor(u[1] * (size - widths + 1)), size - widths).astype(np.int64)
    return starts, widths


def _mask_axis(x: Array, *, axis: int, masks: int, max_width: int, generator: RandomSource) -> Array:
    if isinstance(masks, bool) or not isinstance(masks, int) or masks < 0:
        raise ValueError(f"masks must be an integer >= 0, got {masks!r}")
    if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width < 0:
        raise ValueError(f"the mask width must be an integer >= 0, got {max_width!r}")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have shape (batch, n_mels, n_frames) or (n_mels, n_frames), got {tuple(x.shape)}")
    if masks == 0 or max_width == 0:
        return x
    batched = x if x.ndim == 3 else x[None]
    n, size = batched.shape[0], batched.shape[axis]
    starts, widths = _spans(n, masks, size=size, max_width=max_width, generator=generator)
    pos = np.arange(size)
    hit = ((pos[None, None, :] >= starts[:, :, None]) & (pos[None, None, :] < (starts + widths)[:, :, None])).any(1)
    shape = (n, size, 1) if axis == 1 else (n, 1, size)
    if isinstance(x, torch.Tensor):
        keep = torch.as_tensor(~hit.reshape(shape), device=x.device)
        out = batched * keep.to(batched.dtype)  # masked bins become silence (0 in a log(1 + C·S) log-mel)
    else:
        out = np.where(hit.reshape(shape), np.zeros((), dtype=batched.dtype), batched)
    return out if x.ndim == 3 else out[0]


def time_mask(x: Array, *, masks: int, max_frames: int, generator: RandomSource = None) -> Array:
    """SpecAugment's time masking: ``masks`` spans of up to ``max_frames`` frames per example
    set to silence (0), each span's width and place drawn uniformly.

    Parameters
    ----------
    x : array or tensor [shape=(batch, n_mels, n_frames)] or (n_mels, n_frames)
    masks : int >= 0
        Spans per example (0 returns ``x`` unchanged).
    max_frames : int >= 0
        Largest span (capped at ``n_frames``).
    generator : None, int, np.random.Generator or torch.Generator

    Returns
    -------
    y : same kind, shape and dtype as ``x``
    """
    return _mask_axis(x, axis=2, masks=masks, max_width=max_frames, generator=generator)


def frequency_mask(x: Array, *, masks: int, max_bands: int, generator: RandomSource = None) -> Array:
    """SpecAugment's frequency masking: ``masks`` runs of up to ``max_bands`` mel bands per
    example set to silence (0); as :func:`time_mask` along the band axis.

    Parameters
    ----------
    x : array or tensor [shape=(batch, n_mels, n_frames)] or (n_mels, n_frames)
    masks : int >= 0
    max_bands : int >= 0
    generator : None, int, np.random.Generator or torch.Generator

    Returns
    -------
    y : same kind, shape and dtype as ``x``
    """
    return _mask_axis(x, axis=1, masks=masks, max_width=max_bands, generator=generator)
