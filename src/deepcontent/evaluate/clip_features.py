"""Clip features for transfer on a folder of audio (pure: log-mels in, numpy out).

- :func:`excerpt_bounds` / :func:`excerpts` — fixed-length excerpts from the middle of a track,
  several per track, so a folder of full-length songs is measured on comparable material (and
  a 30 s GTZAN clip on the whole clip); :func:`average_by_track` averages excerpt features
  back to one row per track.
- :func:`logmel_statistics` — mean and standard deviation of each log-mel band over time.
- :func:`mfcc_statistics` — mean and standard deviation of the 13 MFCCs + Δ + ΔΔ over time
  (:func:`~deepcontent.models.baselines.mfcc_frames`, recovered from the stored log-mel).

These are the fixed-feature baselines beside spherical K-means
(:class:`~deepcontent.models.baselines.SphericalKMeansFeatures`) and the listening models'
predicted factors and penultimate layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepcontent.models.baselines import mfcc_frames

__all__ = ["average_by_track", "excerpt_bounds", "excerpts", "logmel_statistics", "mfcc_statistics"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def excerpt_bounds(n_frames: int, *, excerpt_frames: int | None, count: int = 1) -> list[tuple[int, int]]:
    """Frame ranges ``[(start, stop), ...]`` of ``count`` excerpts of ``excerpt_frames`` frames
    from the middle of a track of ``n_frames`` frames.

    - ``excerpt_frames`` None, or a track no longer than one excerpt: one excerpt, the whole track.
    - A track holding ``count`` whole excerpts: they tile its central ``count × excerpt_frames``
      frames, back to back.
    - Otherwise: ``count`` excerpts with evenly spaced starts from the first to the last frame
      where one fits (they overlap), distinct starts only.

    Parameters
    ----------
    n_frames : int >= 1
    excerpt_frames : int >= 1 or None
    count : int >= 1

    Returns
    -------
    list of (int, int)
        Sorted, each ``stop - start == min(excerpt_frames, n_frames)``.
    """
    n = _check_positive_int("n_frames", n_frames)
    count = _check_positive_int("count", count)
    if excerpt_frames is None:
        return [(0, n)]
    length = _check_positive_int("excerpt_frames", excerpt_frames)
    if n <= length:
        return [(0, n)]
    span = count * length
    if span <= n:
        first = (n - span) // 2
        return [(first + i * length, first + (i + 1) * length) for i in range(count)]
    starts = sorted(set(np.round(np.linspace(0, n - length, count)).astype(int).tolist()))
    return [(s, s + length) for s in starts]


def excerpts(clips: Sequence[np.ndarray], *, excerpt_frames: int | None,
             count: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """The excerpts of every clip (views, no copy) and the clip each belongs to.

    Parameters
    ----------
    clips : sequence of np.ndarray [shape=(n_mels, n_frames_i)]
    excerpt_frames, count
        As in :func:`excerpt_bounds`.

    Returns
    -------
    views : list of np.ndarray [shape=(n_mels, excerpt length)]
    owner : np.ndarray [shape=(len(views),), dtype=int64]
        Index into ``clips`` of each view.
    """
    views, owner = [], []
    for i, m in enumerate(clips):
        a = np.asarray(m)
        if a.ndim != 2 or a.shape[1] == 0:
            raise ValueError(f"clips[{i}] must be a non-empty (n_mels, n_frames) array, got shape {a.shape}")
        for start, stop in excerpt_bounds(a.shape[1], excerpt_frames=excerpt_frames, count=count):
            views.append(a[:, start:stop])
            owner.append(i)
    return views, np.asarray(owner, dtype=np.int64)


def average_by_track(features: np.ndarray, owner: np.ndarray, n_tracks: int) -> np.ndarray:
    """Mean of the excerpt rows of each track.

    Parameters
    ----------
    features : np.ndarray [shape=(n_excerpts, d)]
    owner : np.ndarray [shape=(n_excerpts,)]
        Track index of each row; every track in ``range(n_tracks)`` must have at least one.
    n_tracks : int

    Returns
    -------
    np.ndarray [shape=(n_tracks, d), dtype=float32]
    """
    F = np.asarray(features, dtype=np.float64)
    o = np.asarray(owner, dtype=np.int64)
    if F.ndim != 2 or o.shape != (F.shape[0],):
        raise ValueError(f"features must be (n_excerpts, d) with one owner per row, got {F.shape} and {o.shape}")
    counts = np.bincount(o, minlength=n_tracks)
    if len(counts) != n_tracks or (counts == 0).any():
        missing = np.flatnonzero(counts[:n_tracks] == 0)
        raise ValueError(f"every track needs at least one excerpt; tracks {missing[:5].tolist()} have none "
                         f"(or owner indexes beyond n_tracks={n_tracks})")
    sums = np.zeros((n_tracks, F.shape[1]))
    np.add.at(sums, o, F)
    return (sums / counts[:, None]).astype(np.float32)


def logmel_statistics(clips: Sequence[np.ndarray]) -> np.ndarray:
    """Per band, the mean and the standard deviation over time of each log-mel.

    Parameters
    ----------
    clips : sequence of np.ndarray [shape=(n_mels, n_frames_i)]

    Returns
    -------
    np.ndarray [shape=(n_clips, 2 * n_mels), dtype=float32]
        ``[means | stds]`` per clip.
    """
    rows = []
    for i, m in enumerate(clips):
        a = np.asarray(m, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] == 0:
            raise ValueError(f"clips[{i}] must be a non-empty (n_mels, n_frames) array, got shape {a.shape}")
        rows.append(np.concatenate([a.mean(axis=1), a.std(axis=1)]))
    if not rows:
        raise ValueError("clips is empty")
    return np.asarray(rows, dtype=np.float32)


def mfcc_statistics(clips: Sequence[np.ndarray], *, compression: float = 10_000.0) -> np.ndarray:
    """Mean and standard deviation over time of 13 MFCCs + Δ + ΔΔ per clip.

    Parameters
    ----------
    clips : sequence of np.ndarray [shape=(n_mels, n_frames_i)]
        Stored log-mels ``log(1 + compression · S)``.
    compression : float
        The ``C`` the log-mels were made with (``spectrograms.compression``).

    Returns
    -------
    np.ndarray [shape=(n_clips, 78), dtype=float32]
        ``[means (39) | stds (39)]`` per clip.
    """
    rows = []
    for i, m in enumerate(clips):
        frames = mfcc_frames(np.asarray(m), compression=compression)  # (n_frames, 39)
        rows.append(np.concatenate([frames.mean(axis=0), frames.std(axis=0)]))
    if not rows:
        raise ValueError("clips is empty")
    return np.asarray(rows, dtype=np.float32)
